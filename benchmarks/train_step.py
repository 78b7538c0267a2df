"""End-to-end training step of the trainer's command line against the floor, as a user would measure it.

A step is the wall time of a run of N + k steps minus one of N steps, divided by k: start-up, model loading and
the first epoch (where latents get cached) cancel out. The floor is one UNet step at the same batch with the UNet
frozen and the gradient flowing to its input (benchmarks/boft_step.py). Full-size SD 1.5 architecture with random
weights, built once into data/bench/ (about 4 GB); photos are synthetic 1536 px JPEGs, as phone photos are.

    python -m benchmarks.train_step                       # 256 px, batch 1 with prior preservation, block_num 8
    python -m benchmarks.train_step --baseline            # also: latents encoded every step, stock peft forward
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.boft_step import measure_in_subprocess
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


def trainer_step(model, extra, steps, more, resolution) -> tuple[float, int]:
    photos = synthetic_photos(BENCH_DATA / "photos", 5, 1536, 0)
    classes = synthetic_photos(BENCH_DATA / "class", 5, 512, 1)
    peaks, times = [], []
    for max_steps in (steps, steps + more):
        with tempfile.TemporaryDirectory() as out:
            seconds, peak = timed_run([
                "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(photos),
                "--instance_prompt", "a photo of qwe toy", "--with_prior_preservation", "--class_data_dir", str(classes),
                "--class_prompt", "a photo of toy", "--num_class_images", "5", "--output_dir", out, "--use_boft",
                "--resolution", str(resolution), "--train_batch_size", "1", "--boft_block_num", "8",
                "--boft_block_size", "0", "--boft_n_butterfly_factor", "1", "--report_to", "none", "--seed", "0",
                "--max_train_steps", str(max_steps), "--checkpointing_steps", "100000", "--num_dataloader_workers", "0",
                *extra,
            ])
        times.append(seconds)
        peaks.append(peak)
    return (times[1] - times[0]) / more, max(peaks)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="N: at least one epoch (5 here), so caching is done")
    parser.add_argument("--more", type=int, default=5, help="k")
    parser.add_argument("--baseline", action="store_true", help="also time --no_cache_latents --boft_impl peft")
    args = parser.parse_args(argv)
    model = save_random_pipeline("sd15", BENCH_DATA / "sd15-random")
    floor = measure_in_subprocess("sd15", args.resolution, "floor", 0, 8, 3)
    print(f"SD 1.5 architecture, random weights, {args.resolution} px, batch 1 + 1 class image, block_num 8, m = 1")
    print("| configuration | s/step | x floor | peak RSS MB |")
    print("|---|---|---|---|")
    print(f"| floor (UNet frozen, gradient to its input, batch 2) | {floor['seconds']:.2f} | 1.00 | {floor['peak_rss_mb']} |")
    configs = [("trainer (defaults: cached latents, fast BOFT)", [])]
    if args.baseline:
        configs.append(("trainer, --no_cache_latents --boft_impl peft", ["--no_cache_latents", "--boft_impl", "peft"]))
    for name, extra in configs:
        seconds, peak = trainer_step(model, extra, args.steps, args.more, args.resolution)
        print(f"| {name} | {seconds:.2f} | {seconds / floor['seconds']:.2f} | {peak} |", flush=True)


if __name__ == "__main__":
    main()
