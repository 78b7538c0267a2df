"""--dry_run: what a run would do and what its weights, adapters and optimizer would take, from configs alone."""

import math

from utils.boft import TEXT_ENCODER_TARGET_MODULES, UNET_TARGET_MODULES, targeted_linears
from utils.dataset import list_images

GB = 2**30


def adapter_parameters(model, targets, n_butterfly_factor: int, block_num: int, block_size: int, bias: str) -> int:
    """Trainable parameters a BOFT adapter would add to `model`: blocks (m x in x size), scales (out), biases."""
    total, layers = 0, targeted_linears(model, targets)
    for name, module in model.named_modules():
        if name in layers:
            size = block_size or module.in_features // block_num
            total += n_butterfly_factor * module.in_features * size + module.out_features
            total += module.out_features if bias == "boft_only" and module.bias is not None else 0
    if bias == "all":
        total += sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    return total


def optimizer_steps(args, num_examples: int, num_processes: int) -> int:
    if args.max_train_steps:
        return args.max_train_steps
    batches = math.ceil(num_examples / (args.train_batch_size * num_processes))
    return args.num_train_epochs * math.ceil(batches / args.gradient_accumulation_steps)


def plan_lines(args, accelerator, unet, text_encoder, images) -> list[str]:
    """The --dry_run report, from meta-device models: nothing is loaded but configs."""
    num_images, num_processes, mixed_precision = len(images), accelerator.num_processes, accelerator.mixed_precision
    num_class_present = len(list_images(args.class_data_dir)) if args.with_prior_preservation else 0
    vae_parameters = vae_parameter_count(args)
    models = [("UNet", unet, UNET_TARGET_MODULES)]
    if args.train_text_encoder:
        models.append(("text encoder", text_encoder, TEXT_ENCODER_TARGET_MODULES))
    shape = (args.boft_n_butterfly_factor, args.boft_block_num, args.boft_block_size, args.boft_bias)
    trainable = {name: adapter_parameters(model, targets, *shape) for name, model, targets in models}
    weights = sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in text_encoder.parameters()) + vae_parameters
    weight_bytes = {"fp16": 2, "bf16": 2}.get(mixed_precision, 4)
    adapters = sum(trainable.values())
    optimizer_bytes = 2 if args.use_8bit_adam else 8
    examples = max(num_images, args.num_class_images if args.with_prior_preservation else 0)
    to_generate = max(0, args.num_class_images - num_class_present) if args.with_prior_preservation else 0
    lines = [
        "Dry run: every check passed. The plan:",
        f"  subject: {num_images} image(s) in {args.instance_data_dir}, prompt {args.instance_prompt!r}",
    ]
    if args.with_prior_preservation:
        lines.append(f"  class: {num_class_present} image(s) in {args.class_data_dir}, {to_generate} to generate "
                     f"from {args.class_prompt!r}")
    for name, model, targets in models:
        lines.append(f"  {name}: BOFT on {len(targeted_linears(model, targets))} layers, {trainable[name]:,} trainable parameters")
    lines += [
        f"  optimizer steps: {optimizer_steps(args, examples, num_processes)} ({examples} examples per epoch, batch "
        f"{args.train_batch_size} x {num_processes} process(es) x {args.gradient_accumulation_steps} accumulation)",
        f"  memory per process, before activations: weights {weights * weight_bytes / GB:.2f} GB "
        f"({mixed_precision or 'fp32'}), adapters and their gradients {2 * adapters * 4 / GB:.3f} GB, "
        f"optimizer state {adapters * optimizer_bytes / GB:.3f} GB",
    ]
    return lines


def vae_parameter_count(args) -> int:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    with init_empty_weights():
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(args.pretrained_model_name_or_path, subfolder="vae",
                                                                  revision=args.revision))
    return sum(p.numel() for p in vae.parameters())
