"""Time one UNet training step (batch 2, AdamW step included) with BOFT: the fast forward, stock peft, the floor.

The floor is the frozen UNet with the gradient flowing to its input: what any adapter costs at least. Each
configuration runs in a fresh process (so peak RSS is its own); the floor runs first and last, and ratios use
the mean of the two, which cancels slow drift of a shared machine.

    python -m benchmarks.boft_step --quick                  # about a minute: SD 1.5, 128 px, m = 1
    python -m benchmarks.boft_step --arch sd15 sd21 --resolution 128 256 512 --factors 1 2 4
Prints a markdown table: seconds per step (median of --repeats after a warm-up), ratio to the floor, peak RSS.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.sd_architectures import build_unet


def peak_rss_mb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    return 0


def make_model(unet, mode: str, n_factors: int, block_num: int):
    """(model, optimizer): the frozen UNet for the floor, else the UNet with a BOFT adapter."""
    if mode == "floor":
        return unet.requires_grad_(False), None
    from peft import BOFTConfig, get_peft_model

    from utils.boft import UNET_TARGET_MODULES, install_block_diagonal, use_fast_forward

    install_block_diagonal()
    config = BOFTConfig(boft_block_num=block_num, boft_block_size=0, boft_n_butterfly_factor=n_factors,
                        boft_dropout=0.1, target_modules=UNET_TARGET_MODULES)
    model = get_peft_model(unet, config)
    if mode == "fast":
        use_fast_forward(model)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def time_steps(model, optimizer, inputs, repeats: int) -> float:
    latents, timesteps, context = inputs
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        noisy = latents.clone().requires_grad_(optimizer is None)
        model(noisy, timesteps, context).sample.float().pow(2).mean().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if i:  # the first step warms up allocators and caches
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_one(arch, resolution, mode, n_factors, block_num, repeats) -> dict:
    unet, text_dim = build_unet(arch)
    model, optimizer = make_model(unet, mode, n_factors, block_num)
    generator = torch.Generator().manual_seed(0)
    size = resolution // 8
    inputs = (torch.randn(2, 4, size, size, generator=generator), torch.tensor([10, 500]),
              torch.randn(2, 77, text_dim, generator=generator))
    seconds = time_steps(model, optimizer, inputs, repeats)
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def measure_in_subprocess(arch, resolution, mode, n_factors, block_num, repeats) -> dict:
    command = [sys.executable, "-m", "benchmarks.boft_step", "--one", arch, str(resolution), mode, str(n_factors),
               "--block_num", str(block_num), "--repeats", str(repeats)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(arch, resolution, factors, block_num, repeats, modes):
    configs = [(mode, m) for m in factors for mode in modes]
    first = measure_in_subprocess(arch, resolution, "floor", 0, block_num, repeats)
    results = [(mode, m, measure_in_subprocess(arch, resolution, mode, m, block_num, repeats)) for mode, m in configs]
    last = measure_in_subprocess(arch, resolution, "floor", 0, block_num, repeats)
    floor = (first["seconds"] + last["seconds"]) / 2
    floor_row = ("floor", "-", {"seconds": floor, "peak_rss_mb": max(first["peak_rss_mb"], last["peak_rss_mb"])})
    for mode, m, measured in [floor_row] + results:
        print(f"| {arch} | {resolution} | {mode} | {m} | {measured['seconds']:.2f} | {measured['seconds'] / floor:.2f} "
              f"| {measured['peak_rss_mb']} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["sd15"], choices=["sd15", "sd21"])
    parser.add_argument("--resolution", nargs="+", type=int, default=[256])
    parser.add_argument("--factors", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--block_num", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["fast", "peft"], choices=["fast", "peft"])
    parser.add_argument("--quick", action="store_true", help="SD 1.5, 128 px, m = 1, two repeats")
    parser.add_argument("--one", nargs=4, metavar=("ARCH", "PX", "MODE", "M"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        arch, resolution, mode, n_factors = args.one
        print(json.dumps(measure_one(arch, int(resolution), mode, int(n_factors), args.block_num, args.repeats)))
        return
    if args.quick:
        args.arch, args.resolution, args.factors, args.repeats = ["sd15"], [128], [1], 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, block_num {args.block_num}, batch 2, "
          f"median of {args.repeats} steps")
    print("| arch | px | BOFT forward | factors | s/step | x floor | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.arch:
        for resolution in args.resolution:
            run(arch, resolution, args.factors, args.block_num, args.repeats, args.modes)


if __name__ == "__main__":
    main()
