"""The trainer's own training step against the floor, with the launcher's recipe: what users run is what is measured.

By default the trainer is set up in this process by its own code (train_dreambooth.configure and DreamBoothRun's
set_up, from the command-line flags), and its step (DreamBoothRun.training_step on the loader's next batch: data,
latents, noise, UNet forward and backward, clipping, fused AdamW, the schedule) alternates with floor steps on the
same batches: the same UNet with its adapters disabled, frozen, the gradient flowing to its input
(benchmarks/boft_step.py's floor). Ratios divide the two medians, so drift hits both alike. The recipe is the
launcher's: batch 1 with prior preservation, block_num 8, --boft_dropout 0.1 --boft_bias boft_only; extra trainer
flags go after `--`.

--command_line times the command line instead: the wall time of a run of N + k steps minus one of N steps,
divided by k (start-up, loading and the first epoch cancel out), against a floor measured in another process.
Full-size SD 1.5 architecture with random weights, built once into data/bench/ (about 4 GB); photos are
synthetic 1536 px JPEGs, as phone photos are.

    python -m benchmarks.train_step                                   # 256 px, one factor
    python -m benchmarks.train_step --factors 2 --no_prior                # batch 1 without class images
    python -m benchmarks.train_step --profile                         # the top operations of one trainer step
    python -m benchmarks.train_step --command_line --baseline         # also stock peft, latents encoded every step
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.boft_step import WARM_UP_ROUNDS, measure_in_subprocess, peak_rss_mb
from benchmarks.sd_architectures import save_random_pipeline

REPO = Path(__file__).resolve().parents[1]
BENCH_DATA = REPO / "data" / "bench"


def synthetic_photos(folder: Path, count: int, size: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        if not (folder / f"{i:02d}.jpg").exists():
            pixels = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((size, size), Image.BICUBIC).save(folder / f"{i:02d}.jpg", quality=92)
    return folder


def recipe(model, out, resolution, factors, prior, steps, extra) -> list[str]:
    """The launcher's flags (train_dreambooth.sh) on the benchmark's model and synthetic photos."""
    photos = synthetic_photos(BENCH_DATA / "photos", 5, 1536, 0)
    argv = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(photos),
            "--instance_prompt", "a photo of qwe toy", "--output_dir", str(out), "--use_boft",
            "--resolution", str(resolution), "--train_batch_size", "1", "--boft_block_num", "8",
            "--boft_block_size", "0", "--boft_n_butterfly_factor", str(factors), "--boft_dropout", "0.1",
            "--boft_bias", "boft_only", "--report_to", "none", "--seed", "0", "--max_train_steps", str(steps),
            "--checkpointing_steps", "100000", "--num_dataloader_workers", "0"]
    if prior:
        classes = synthetic_photos(BENCH_DATA / "class", 5, 512, 1)
        argv += ["--with_prior_preservation", "--class_data_dir", str(classes), "--class_prompt", "a photo of toy",
                 "--num_class_images", "5"]
    return argv + list(extra)


# --- the trainer's step in this process ------------------------------------------------------------------------


def set_up_trainer(argv):
    """A DreamBoothRun set up by the trainer's own code from command-line flags, ready to train."""
    import train_dreambooth as trainer
    from utils.families import family_of
    from utils.layout import RunLayout
    from utils.run.flags import parse_args
    from utils.run.stopping import StopRequests

    from utils.boft import peft_seam

    peft_seam.install()
    flags = parse_args(argv)
    family = family_of(flags.pretrained_model_name_or_path, flags.revision)
    layout = RunLayout(flags.output_dir, flags.wandb_run_name)
    accelerator = trainer.make_accelerator(flags, [], layout)  # keeps freed memory on a CPU, as the trainer does
    config, images, unreadable = trainer.configure(flags, family, accelerator)
    run = trainer.DreamBoothRun(config, family, accelerator, layout, StopRequests(), [])
    run.set_up(images, unreadable)
    for model in run.trained.values():
        model.train()
    return run


def endless_batches(run):
    epoch = 0
    while True:
        run.loader.set_epoch(epoch)
        yield from run.loader
        epoch += 1


def trainer_step(run, batches) -> float:
    """Seconds of one trainer step: the next batch, then DreamBoothRun.training_step under accelerate."""
    start = time.perf_counter()
    batch = next(batches)
    with run.accelerator.accumulate(*run.trained.values()):
        run.training_step(batch)
    return time.perf_counter() - start


def floor_step(run, batches) -> float:
    """Seconds of the frozen UNet's forward and backward (gradient to its input) on a batch of the same rows."""
    from utils.run.loss import latent_posterior

    batch = next(batches)
    mean, _ = latent_posterior(batch, run.components.vae, run.dtype, run.latent_cache)
    conditioning = run.conditioning(batch)
    unet = run.accelerator.unwrap_model(run.denoiser)
    timesteps = torch.randint(0, 1000, (mean.shape[0],), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    noisy = mean.detach().clone().requires_grad_()
    with unet.disable_adapter():
        unet(noisy, timesteps, **conditioning).sample.float().pow(2).mean().backward()
    seconds = time.perf_counter() - start
    run.optimizer.zero_grad(set_to_none=True)  # trained biases got gradients from the floor step
    return seconds


def measure_trainer(argv, repeats: int) -> dict:
    run = set_up_trainer(argv)
    batches = endless_batches(run)
    trainer_times, floor_times = [], []
    for i in range(WARM_UP_ROUNDS + repeats):
        floor_seconds, trainer_seconds = floor_step(run, batches), trainer_step(run, batches)
        if i >= WARM_UP_ROUNDS:
            floor_times.append(floor_seconds)
            trainer_times.append(trainer_seconds)
    return {"seconds": statistics.median(trainer_times), "floor_seconds": statistics.median(floor_times),
            "peak_rss_mb": peak_rss_mb()}


def profile_trainer(argv, rows=20) -> str:
    from torch.profiler import ProfilerActivity, profile

    run = set_up_trainer(argv)
    batches = endless_batches(run)
    for _ in range(WARM_UP_ROUNDS):
        trainer_step(run, batches)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        trainer_step(run, batches)
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# --- the command line, as a user times it --------------------------------------------------------------------------


def timed_run(argv) -> tuple[float, int]:
    """(wall seconds, peak RSS in MB) of one trainer run."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(REPO / "train_dreambooth.py"), *argv], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"trainer failed:\n{process.stderr.read()[-3000:]}")
    return seconds, usage.ru_maxrss // 1024


def command_line_step(model, args, extra) -> tuple[float, int]:
    peaks, times = [], []
    for max_steps in (args.steps, args.steps + args.more):
        with tempfile.TemporaryDirectory() as out:
            seconds, peak = timed_run(recipe(model, out, args.resolution, args.factors, not args.no_prior, max_steps,
                                             extra))
        times.append(seconds)
        peaks.append(peak)
    return (times[1] - times[0]) / args.more, max(peaks)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--factors", type=int, default=1)
    parser.add_argument("--no_prior", action="store_true", help="batch 1 without prior preservation")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds, after three untimed ones")
    parser.add_argument("--profile", action="store_true", help="print the top operations of one trainer step")
    parser.add_argument("--command_line", action="store_true", help="time runs of the command line (N + k steps)")
    parser.add_argument("--steps", type=int, default=5, help="--command_line's N: one epoch, so caching is done")
    parser.add_argument("--more", type=int, default=5, help="--command_line's k")
    parser.add_argument("--baseline", action="store_true", help="--command_line: also --no_cache_latents --boft_impl peft")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    model = save_random_pipeline("sd15", BENCH_DATA / "sd15-random")
    batch = "batch 1" + ("" if args.no_prior else " + 1 class image")
    print(f"SD 1.5 architecture, random weights, {args.resolution} px, {batch}, block_num 8, {args.factors} "
          f"factor(s), --boft_dropout 0.1 --boft_bias boft_only {' '.join(extra)}")
    with tempfile.TemporaryDirectory() as out:
        argv = recipe(model, out, args.resolution, args.factors, not args.no_prior, 10**6, extra)
        if args.profile:
            return print(profile_trainer(argv))
        if not args.command_line:
            measured = measure_trainer(argv, args.repeats)
            print("| step | s/step | x floor | peak RSS MB |\n|---|---|---|---|")
            print(f"| floor (UNet frozen, gradient to its input, same batches) | {measured['floor_seconds']:.2f} | 1.00 | - |")
            print(f"| trainer step (DreamBoothRun.training_step) | {measured['seconds']:.2f} | "
                  f"{measured['seconds'] / measured['floor_seconds']:.2f} | {measured['peak_rss_mb']} |")
            return
    floor = measure_in_subprocess("sd15", args.resolution, "floor", 0, 8, 3)
    print("| configuration | s/step | x floor | peak RSS MB |\n|---|---|---|---|")
    print(f"| floor (another process, batch 2) | {floor['seconds']:.2f} | 1.00 | {floor['peak_rss_mb']} |")
    configs = [("trainer (defaults: cached latents, fast BOFT)", extra)]
    if args.baseline:
        configs.append(("trainer, --no_cache_latents --boft_impl peft", [*extra, "--no_cache_latents", "--boft_impl", "peft"]))
    for name, flags in configs:
        seconds, peak = command_line_step(model, args, flags)
        print(f"| {name} | {seconds:.2f} | {seconds / floor['seconds']:.2f} | {peak} |", flush=True)


if __name__ == "__main__":
    main()
