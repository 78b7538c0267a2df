"""Time one UNet training step (batch 2, AdamW step included) with BOFT: the fast forward, stock peft, the floor.

The floor is the frozen UNet with the gradient flowing to its input: what any adapter costs at least.
    python -m benchmarks.boft_step --quick                  # one minute: SD 1.5, 128 px, m = 1
    python -m benchmarks.boft_step --arch sd15 --resolution 256 --factors 1 2 4
Prints a markdown table: seconds per step (median of --repeats after a warm-up), ratio to the floor, peak RSS.
"""

import argparse
import copy
import gc
import statistics
import time

import psutil
import torch

from benchmarks.sd_architectures import build_unet
from utils.boft import UNET_TARGET_MODULES, install_block_diagonal, use_fast_forward


def peak_rss_mb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    return psutil.Process().memory_info().rss // 2**20


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        pass


def make_model(unet, mode: str, n_factors: int, block_num: int):
    from peft import BOFTConfig, get_peft_model

    model = copy.deepcopy(unet)
    if mode == "floor":
        model.requires_grad_(False)
        return model, None
    install_block_diagonal()
    config = BOFTConfig(
        boft_block_num=block_num,
        boft_block_size=0,
        boft_n_butterfly_factor=n_factors,
        boft_dropout=0.1,
        target_modules=UNET_TARGET_MODULES,
    )
    model = get_peft_model(model, config)
    if mode == "fast":
        use_fast_forward(model)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def time_step(model, optimizer, inputs, repeats: int) -> float:
    latents, timesteps, context = inputs
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        noisy = latents.clone().requires_grad_(optimizer is None)
        loss = model(noisy, timesteps, context).sample.float().pow(2).mean()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if i:  # the first step warms up allocators and caches
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(arch, resolutions, factors, block_num, repeats, modes):
    unet, text_dim = build_unet(arch)
    rows = []
    for resolution in resolutions:
        size = resolution // 8
        generator = torch.Generator().manual_seed(0)
        inputs = (
            torch.randn(2, 4, size, size, generator=generator),
            torch.tensor([10, 500]),
            torch.randn(2, 77, text_dim, generator=generator),
        )
        floor = None
        for mode, n_factors in [("floor", 0)] + [(m, f) for f in factors for m in modes]:
            model, optimizer = make_model(unet, mode, n_factors, block_num)
            gc.collect()
            reset_peak_rss()
            seconds = time_step(model, optimizer, inputs, repeats)
            floor = seconds if mode == "floor" else floor
            rows.append((arch, resolution, mode, n_factors or "-", seconds, seconds / floor, peak_rss_mb()))
            print(f"| {' | '.join(str(v) if not isinstance(v, float) else f'{v:.2f}' for v in rows[-1])} |", flush=True)
            del model, optimizer
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["sd15"], choices=["sd15", "sd21"])
    parser.add_argument("--resolution", nargs="+", type=int, default=[256])
    parser.add_argument("--factors", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--block_num", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["fast", "peft"], choices=["fast", "peft"])
    parser.add_argument("--quick", action="store_true", help="SD 1.5, 128 px, m = 1, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.resolution, args.factors, args.repeats = ["sd15"], [128], [1], 1
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, block_num {args.block_num}, batch 2")
    print("| arch | px | BOFT forward | factors | s/step | x floor | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.arch:
        run(arch, args.resolution, args.factors, args.block_num, args.repeats, args.modes)


if __name__ == "__main__":
    main()
