"""--dry_run: what a run would do and what its weights, adapters and optimizer would take, from configs alone."""

from utils.boft.shapes import adapter_parameters, targeted_linears
from utils.families import vae_dtype, weight_dtype
from utils.run.activations import activation_bytes
from utils.images import list_images
from utils.run.data import per_process_batch
from utils.quantization import quantizable_layers, quantized_bytes, quantized_part

GB = 2**30


def plan_lines(config, family, mixed_precision, num_images: int, denoiser, text_encoders: dict) -> list[str]:
    """The --dry_run report for `num_images` readable photos, from meta-device models: nothing is loaded but
    configs."""
    num_class_present = len(list_images(config.class_data_dir)) if config.with_prior_preservation else 0
    models = [(family.denoiser_label, denoiser, family.denoiser_target_modules)]
    if config.train_text_encoder:
        models += [(part.replace("_", " "), text_encoders[part], family.text_encoder_target_modules)
                   for part in family.trainable_text_encoders]
    trainable = {name: adapter_parameters(model, targets, config.boft) for name, model, targets in models}
    dtype = weight_dtype(mixed_precision)
    weight_bytes = dtype.itemsize
    vae_bytes = vae_dtype(family, mixed_precision, bool(config.pretrained_vae_model_name_or_path)).itemsize
    trained_parts = family.trainable_text_encoders if config.train_text_encoder else ()
    quantization = config.base_quantization
    encoders = {part: model_bytes(model, weight_bytes, quantization if quantized_part(family, part) else None)
                for part, model in text_encoders.items()}
    frozen = sum(n for part, n in encoders.items() if part not in trained_parts)
    weights = (model_bytes(denoiser, weight_bytes, quantization) + sum(encoders[part] for part in trained_parts)
               + vae_parameter_count(config, family) * vae_bytes)
    adapters = sum(trainable.values())
    adapter_bytes, optimizer_bytes = 2 * adapters * 4, adapters * (2 if config.use_8bit_adam else 8)
    batch = per_process_batch(config.train_batch_size, config.num_examples, config.num_processes)
    to_generate = max(0, config.num_class_images - num_class_present) if config.with_prior_preservation else 0
    lines = [
        "Dry run: every check passed. The plan:",
        f"  subject: {num_images} image(s) in {config.instance_data_dir}, "
        f"prompt {config.instance_prompt!r}",
        f"  model: {family.name}, trained at {config.resolution} px",
    ]
    if config.with_prior_preservation:
        lines.append(f"  class: {num_class_present} image(s) in {config.class_data_dir}, {to_generate} to generate "
                     f"from {config.class_prompt!r}")
    for name, model, targets in models:
        lines.append(f"  {name}: BOFT on {len(targeted_linears(model, targets))} layers, {trainable[name]:,} trainable parameters")
    lines += [
        f"  optimizer steps: {config.max_train_steps} ({config.num_examples} examples per epoch, batch "
        f"{batch} x {config.num_processes} process(es) x {config.gradient_accumulation_steps} accumulation)",
        f"  memory per process, before activations: weights {weights / GB:.2f} GB "
        f"({mixed_precision or 'fp32'}{', the VAE in fp32' if vae_bytes > weight_bytes else ''}"
        f"{f', the {family.denoiser_label} Linear layers in {quantization}' if quantization else ''}), adapters and "
        f"their gradients {adapter_bytes / GB:.3f} GB, optimizer state {optimizer_bytes / GB:.3f} GB",
    ]
    if frozen:
        lines.append(f"  on a GPU the frozen text encoders ({frozen / GB:.2f} GB) leave it once the prompts "
                     "are encoded, and come back for validation")
    rows = batch * (2 if config.with_prior_preservation else 1)
    kept = activation_bytes(family, denoiser, config.resolution, rows, dtype, config)
    total = weights + adapter_bytes + optimizer_bytes + kept[config.gradient_checkpointing]
    lines.append(f"  activations of the {family.denoiser_label}, {rows} row(s) a step at {config.resolution} px: "
                 f"{kept[False] / GB:.2f} GB, {kept[True] / GB:.2f} GB with --gradient_checkpointing (counted on "
                 f"the meta device, attention as GPU flash kernels keep it); total about {total / GB:.1f} GB as "
                 f"configured (gradient checkpointing {'on' if config.gradient_checkpointing else 'off'}), plus the "
                 "framework's workspace")
    return lines


def model_bytes(model, weight_bytes: int, quantization=None) -> int:
    """What a frozen model's weights take on the accelerator (a meta-device model will do): `weight_bytes` a
    parameter, but the quantizable Linear weights quantized when `quantization` is given."""
    total = sum(p.numel() for p in model.parameters()) * weight_bytes
    if quantization:
        full = sum(layer.weight.numel() for layer in quantizable_layers(model).values()) * weight_bytes
        total += quantized_bytes(model, quantization) - full
    return total


def vae_parameter_count(config, family) -> int:
    import diffusers
    from accelerate import init_empty_weights

    vae_class = getattr(diffusers, family.vae_class_name)
    with init_empty_weights():
        vae = vae_class.from_config(vae_class.load_config(config.pretrained_model_name_or_path, subfolder="vae",
                                                          revision=config.revision))
    return sum(p.numel() for p in vae.parameters())
