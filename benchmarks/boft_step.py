"""Time one denoiser training step (batch 2, AdamW step included) with BOFT: the fast forward, stock peft, the floor.

The floor is the frozen denoiser (a UNet, or a transformer) with the gradient flowing to its input: what any
adapter costs at least. Each configuration runs in a fresh process (so peak RSS is its own) that alternates BOFT
steps with floor steps of the same denoiser, adapters disabled; ratios divide medians from that one process, so a
shared machine's drift hits both alike. The floor's own row (time and peak RSS) comes from a process that holds only
the frozen denoiser. Every process keeps freed memory for the next step (utils/run/cpu_allocator.py), as the
trainer does on a CPU.

    python -m benchmarks.boft_step --quick                  # about three minutes on 2 cores: SD 1.5, 128 px, m = 1
    python -m benchmarks.boft_step --arch sd15 sd21 --resolution 128 256 512 --factors 1 2 4
    python -m benchmarks.boft_step --arch sdxl --factors 1            # SDXL base (2.6 B parameters, 11 GB fp32)
    python -m benchmarks.boft_step --arch flux1 --resolution 256      # FLUX.1's widths, one block of each kind
    python -m benchmarks.boft_step --arch klein4b sd35m --block_size 32 --resolution 256 512 --modes fast
                                                                      # FLUX.2 [klein] 4B's and SD3.5 Medium's widths
    python -m benchmarks.boft_step --profile --resolution 256         # the top operations of one BOFT step
    python -m benchmarks.boft_step --accumulation 4 --factors 1 2     # 4 micro-batches a step, against 4 floor steps
    python -m benchmarks.boft_step --device cuda --resolution 512 --precision fp16   # on a GPU, under fp16 autocast
Prints a markdown table: seconds per step (median of --repeats after 3 untimed rounds), ratio to the floor, the
lower bound arithmetic sets on that ratio (benchmarks/arithmetic.py: BOFT's extra multiply-adds over the floor's,
counted at the layer shapes and token counts of the step), the same bound with the Cayley inverses at the time this
machine measures for them, the ATen operations one step dispatches, all and those that compute (each of these a
kernel launch on a GPU; views and allocations launch nothing; counted with a TorchDispatchMode after the untimed
rounds) and how many the adapter adds over the floor's, peak RSS (on a GPU: peak GPU memory allocated).
`--modes lora` adds LoRA rank 4 on the same layers; `--modes together` computes the rotations together before each
forward on any device (what "fast" does on a GPU), `--modes layered` layer by layer; `--side weight` puts every
layer on the weight side.
--profile prints the top operations of one BOFT step instead.

    python -m benchmarks.boft_step --arch sd15 sdxl --resolution 128 --factors 1 2 4 --modes lora fast peft --repeats 1
                                                                      # operations a step beside LoRA's
    python -m benchmarks.boft_step --resolution 128 --modes layered together --side weight --repeats 1
                                                                      # the fewest kernels: together, weight side
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.arithmetic import (counted_floor, inverse_multiply_adds, lower_bound, measured_inverse_seconds,
                                   with_measured_inverse)
from benchmarks.flux_architecture import build_flux_transformer, flux_step_inputs
from benchmarks.klein_architecture import build_klein_transformer, klein_step_inputs
from benchmarks.sd3_architecture import build_sd3_transformer, sd3_step_inputs
from benchmarks.sd_architectures import added_conditioning, build_unet
from utils.run.cpu_allocator import keep_freed_memory


def peak_memory_mb(device: str) -> int:
    """Peak RSS of this process, or on a GPU the peak memory torch allocated there."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() // 2**20
    return peak_rss_mb()


def synchronize(device) -> None:
    """Wait for the device's queued work, so that wall-clock time measures it (a no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    return 0


LORA_RANK = 4  # the LoRA beside BOFT: rank 4 on the same layers (diffusers' DreamBooth LoRA default)


# The fast forward's modes: whether each model's rotations are computed together before its forward (None: where
# the device is a GPU, as the trainer does).
FAST_MODES = {"fast": None, "together": True, "layered": False}


def make_model(unet, mode: str, n_factors: int, block_num: int, targets, block_size: int = 0, lora_rank=LORA_RANK):
    """(model, optimizer, rotation cache or None): the frozen UNet for the floor, LoRA of `lora_rank` on the same
    layers for "lora", else the UNet with a BOFT adapter: "fast", the fast forward with the trainer's RotationCache
    (its rotations computed together where the device is a GPU); "together" and "layered", the same with them
    computed together or layer by layer on any device; "peft", stock peft."""
    if mode == "floor":
        return unet.requires_grad_(False), None, None
    from peft import BOFTConfig, LoraConfig, get_peft_model

    from utils.boft import peft_seam

    if mode == "lora":
        model = get_peft_model(unet, LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=list(targets)))
        trained = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(trained, lr=1e-5, fused=True), None

    if not peft_seam.install():
        raise SystemExit("peft is not recognised by utils/boft/peft_seam.py: nothing to benchmark")
    config = BOFTConfig(boft_block_num=0 if block_size else block_num, boft_block_size=block_size,
                        boft_n_butterfly_factor=n_factors,
                        boft_dropout=0.1, target_modules=list(targets))
    model = get_peft_model(unet, config)
    rotations = None
    if mode in FAST_MODES:
        peft_seam.use_fast_forward(model)
        rotations = peft_seam.RotationCache(model, together=FAST_MODES[mode])
    trained = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trained, lr=1e-5, fused=True), rotations  # the trainer's optimizer on a CPU


# Untimed rounds first: the heap takes two or three steps to reach the layout it then reuses.
WARM_UP_ROUNDS = 3


# --precision: the autocast dtype of the forward, as accelerate's --mixed_precision sets it (weights stay fp32).
AUTOCAST = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def one_step(model, optimizer, inputs, micro_batches=1, rotations=None, precision="fp32") -> float:
    """Seconds for one step of `micro_batches` forward and backward passes: BOFT (adapters trained, then one AdamW
    step, after which the rotation cache is cleared, as in the trainer) with an optimizer, else the floor.
    `inputs`: (the noisy latents, forward(model, latents) -> prediction)."""
    latents, forward = inputs
    dtype = AUTOCAST[precision]
    synchronize(latents.device)
    start = time.perf_counter()
    for _ in range(micro_batches):
        noisy = latents.clone().requires_grad_(optimizer is None)
        with torch.autocast(latents.device.type, dtype=dtype, enabled=dtype is not None):
            prediction = forward(model, noisy)
        prediction.float().pow(2).mean().backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if rotations is not None:
        rotations.clear()
    synchronize(latents.device)
    return time.perf_counter() - start


def floor_step(model, inputs, micro_batches=1, precision="fp32") -> float:
    if not hasattr(model, "disable_adapter"):
        return one_step(model, None, inputs, micro_batches, precision=precision)
    with model.disable_adapter():
        return one_step(model, None, inputs, micro_batches, precision=precision)


ARCHITECTURES = ["sd15", "sd21", "sdxl", "flux1", "klein4b", "sd35m"]
FLUX_TEXT_TOKENS = 64  # a DreamBooth prompt's T5 (klein: Qwen3) tokens; the pipelines' defaults pad to 512 (SD3: 77)


def transformer_set_up(arch):
    """(transformer, its family's BOFT targets, inputs(transformer, batch, px, text tokens, generator)) of a
    transformer architecture, at one or two blocks of the real widths."""
    from utils.families import flux, flux2_klein, stable_diffusion_3

    if arch == "flux1":
        return build_flux_transformer(), flux.TRANSFORMER_TARGET_MODULES, flux_step_inputs
    if arch == "klein4b":
        return build_klein_transformer("4b"), flux2_klein.TRANSFORMER_TARGET_MODULES, klein_step_inputs
    return build_sd3_transformer("medium"), stable_diffusion_3.TRANSFORMER_TARGET_MODULES, sd3_step_inputs


def set_up(arch, resolution, mode, n_factors, block_num, device="cpu", block_size=0, lora_rank=LORA_RANK):
    """(model, optimizer or None, rotation cache or None, (latents, forward)) at batch 2 for an architecture and a
    BOFT forward, on `device`."""
    from utils.families.stable_diffusion import UNET_TARGET_MODULES
    from utils.families.stable_diffusion_xl import UNET_TARGET_MODULES as XL_UNET_TARGET_MODULES

    generator = torch.Generator().manual_seed(0)
    on_device = lambda value: value.to(device) if isinstance(value, torch.Tensor) else value
    if arch in ("flux1", "klein4b", "sd35m"):
        denoiser, targets, step_inputs = transformer_set_up(arch)
        denoiser.to(device)
        model, optimizer, rotations = make_model(denoiser, mode, n_factors, block_num, targets, block_size, lora_rank)
        latents, arguments = step_inputs(denoiser, 2, resolution, FLUX_TEXT_TOKENS, generator)
        arguments = {name: on_device(value) for name, value in arguments.items()}
        return model, optimizer, rotations, (latents.to(device), lambda m, x: m(hidden_states=x, **arguments)[0])
    unet, text_dim = build_unet(arch)
    unet.to(device)
    targets = XL_UNET_TARGET_MODULES if arch == "sdxl" else UNET_TARGET_MODULES
    model, optimizer, rotations = make_model(unet, mode, n_factors, block_num, targets, block_size, lora_rank)
    size = resolution // 8
    latents, timesteps = torch.randn(2, 4, size, size, generator=generator), torch.tensor([10, 500])
    context = torch.randn(2, 77, text_dim, generator=generator)
    added = {name: {key: on_device(v) for key, v in value.items()}
             for name, value in added_conditioning(unet, 2, resolution).items()}
    timesteps, context = timesteps.to(device), context.to(device)
    return model, optimizer, rotations, (latents.to(device),
                                         lambda m, x: m(x, timesteps, context, **added).sample)


def force_side(side: str) -> None:
    """Every fast BOFT layer of this process rotating on `side` ("weight" or "activation") instead of the side
    utils/boft/rotation.cheaper_side picks: what a step would cost with that choice."""
    from utils.boft import peft_seam

    peft_seam.cheaper_side = lambda *shape, **options: side


def measure_one(arch, resolution, mode, n_factors, block_num, repeats, micro_batches=1, device="cpu",
                precision="fp32", block_size=0, lora_rank=LORA_RANK, side="cost") -> dict:
    keep_freed_memory()
    if side != "cost":
        force_side(side)
    model, optimizer, rotations, inputs = set_up(arch, resolution, mode, n_factors, block_num, device, block_size,
                                                 lora_rank)
    bound = attainable = None
    boft = mode in (*FAST_MODES, "peft")
    if boft:
        floor_flops, extra = counted_floor(lambda: floor_step(model, inputs), model, micro_batches)
        bound = lower_bound(floor_flops, extra)
    floor_times, boft_times = [], []
    for i in range(WARM_UP_ROUNDS + repeats):
        floor_seconds = floor_step(model, inputs, micro_batches, precision)
        boft_seconds = floor_seconds if optimizer is None else one_step(model, optimizer, inputs, micro_batches,
                                                                        rotations, precision)
        if i >= WARM_UP_ROUNDS:
            floor_times.append(floor_seconds)
            boft_times.append(boft_seconds)
    if boft:  # a step of all its micro-batches takes one inverse
        attainable = with_measured_inverse(bound, floor_flops * micro_batches, statistics.median(floor_times),
                                           inverse_multiply_adds(model), measured_inverse_seconds(model))
    operations, kernels = operation_count(lambda: one_step(model, optimizer, inputs, micro_batches, rotations, precision)
                                          if optimizer is not None else floor_step(model, inputs, micro_batches, precision))
    floor_operations, floor_kernels = operation_count(lambda: floor_step(model, inputs, micro_batches, precision))
    return {"seconds": statistics.median(boft_times), "floor_seconds": statistics.median(floor_times),
            "peak_rss_mb": peak_memory_mb(device), "bound": bound, "with_measured_inverse": attainable,
            "operations": operations, "floor_operations": floor_operations, "kernels": kernels,
            "floor_kernels": floor_kernels}


# Operations that launch no kernel: those that only make a new view of a tensor's storage (ATen marks the others
# as views), allocations (on a GPU the caching allocator's bookkeeping on the host), and the profiler's range
# marks (the optimizer's step and zero_grad open and close one each, on the host).
LAUNCH_NOTHING = {"aten::_unsafe_view", "aten::_reshape_alias", "aten::empty", "aten::empty_strided",
                  "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
                  "profiler::_record_function_enter_new", "profiler::_record_function_exit"}


def operation_count(step) -> tuple[int, int]:
    """(all ATen operations, those that compute) one call of `step` dispatches (forward, backward, optimizer; after
    the warm-up rounds). On a GPU each computing one is a kernel launch, which at a few microseconds each bounds the
    small layers' steps; views (view, transpose, expand, split, ...) and allocations launch nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = kernels = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.count += 1
            Counter.kernels += not (func.is_view or func._schema.name in LAUNCH_NOTHING)
            return func(*args, **(kwargs or {}))

    with Counter():
        step()
    return Counter.count, Counter.kernels


def profile_one(arch, resolution, n_factors, block_num, rows=15, block_size=0) -> str:
    """The top operations (by their own CPU time) of one fast BOFT step, after the untimed rounds."""
    from torch.profiler import ProfilerActivity, profile

    keep_freed_memory()
    model, optimizer, rotations, inputs = set_up(arch, resolution, "fast", n_factors, block_num, block_size=block_size)
    for _ in range(WARM_UP_ROUNDS):
        one_step(model, optimizer, inputs, rotations=rotations)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        one_step(model, optimizer, inputs, rotations=rotations)
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def one_command(arch, resolution, mode, n_factors, block_num, repeats, micro_batches=1, device="cpu",
                precision="fp32", block_size=0, lora_rank=LORA_RANK, side="cost") -> list[str]:
    """The command that measures one configuration in a process of its own and prints its result as JSON."""
    return [sys.executable, "-m", "benchmarks.boft_step", "--one", arch, str(resolution), mode, str(n_factors),
            "--block_num", str(block_num), "--block_size", str(block_size), "--repeats", str(repeats),
            "--accumulation", str(micro_batches), "--device", device, "--precision", precision,
            "--lora_rank", str(lora_rank), "--side", side]


def measure_in_subprocess(*configuration, **options) -> dict:
    result = subprocess.run(one_command(*configuration, **options), capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def row(arch, resolution, mode, factors, measured, floor) -> str:
    ratio = measured["seconds"] / measured["floor_seconds"]
    bounds = [f"{measured[key]:.3f}" if measured[key] is not None else "-" for key in ("bound", "with_measured_inverse")]
    return (f"| {arch} | {resolution} | {mode} | {factors} | {measured['seconds']:.3f} | {ratio:.3f} | {bounds[0]} "
            f"| {bounds[1]} | {counts(measured, floor)} | {measured['peak_rss_mb']} |")


def counts(measured, floor=None) -> str:
    """"all (+added) / computing (+added)": a step's ATen operations, and over the floor's when given."""
    def one(key):
        added = f" (+{measured[key] - floor[key]:,})" if floor is not None else ""
        return f"{measured[key]:,}{added}"
    return f"{one('operations')} / {one('kernels')}"


def run(arch, resolution, factors, block_num, repeats, modes, micro_batches, device, precision, block_size=0,
        lora_rank=LORA_RANK, side="cost"):
    floor = measure_in_subprocess(arch, resolution, "floor", 0, block_num, repeats, micro_batches, device, precision,
                                  block_size)
    print(f"| {arch} | {resolution} | floor | - | {floor['seconds']:.3f} | 1.00 | 1.00 | 1.00 | "
          f"{counts(floor)} | {floor['peak_rss_mb']} |", flush=True)
    if "lora" in modes:
        lora = measure_in_subprocess(arch, resolution, "lora", 0, block_num, repeats, micro_batches, device,
                                     precision, block_size, lora_rank)
        print(row(arch, resolution, f"LoRA r={lora_rank}", "-", lora, floor), flush=True)
    for m in factors:
        for mode in (mode for mode in modes if mode != "lora"):
            measured = measure_in_subprocess(arch, resolution, mode, m, block_num, repeats, micro_batches, device,
                                             precision, block_size, side=side)
            print(row(arch, resolution, mode, m, measured, floor), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["sd15"], choices=ARCHITECTURES)
    parser.add_argument("--resolution", nargs="+", type=int, default=[256])
    parser.add_argument("--factors", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--block_num", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=0, help="BOFT blocks of this size (instead of --block_num)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=["fast", "peft"], choices=[*FAST_MODES, "peft", "lora"],
                        help="BOFT forwards to measure, and lora: LoRA (--lora_rank) on the same layers")
    parser.add_argument("--lora_rank", type=int, default=LORA_RANK, help=f"the rank of --modes lora ({LORA_RANK})")
    parser.add_argument("--side", choices=["cost", "weight", "activation"], default="cost",
                        help="where fast BOFT rotates: each layer's cheaper side by the cost model (the trainer's "
                             "choice), or every layer on the weight or the activation side")
    parser.add_argument("--accumulation", type=int, default=1, metavar="K",
                        help="a step is K micro-batches and one optimizer step, against K floor steps")
    parser.add_argument("--device", default="cpu", help="where the UNet runs, e.g. cuda")
    parser.add_argument("--precision", default="fp32", choices=sorted(AUTOCAST),
                        help="autocast dtype of the forward, as --mixed_precision (weights stay fp32)")
    parser.add_argument("--quick", action="store_true", help="SD 1.5, 128 px, m = 1, two repeats")
    parser.add_argument("--profile", action="store_true",
                        help="print the top operations of one fast BOFT step (first --arch, --resolution, --factors)")
    parser.add_argument("--one", nargs=4, metavar=("ARCH", "PX", "MODE", "M"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        arch, resolution, mode, n_factors = args.one
        print(json.dumps(measure_one(arch, int(resolution), mode, int(n_factors), args.block_num, args.repeats,
                                     args.accumulation, args.device, args.precision, args.block_size,
                                     args.lora_rank, args.side)))
        return
    if args.quick:
        args.arch, args.resolution, args.factors, args.repeats = ["sd15"], [128], [1], 2
    if args.profile:
        print(profile_one(args.arch[0], args.resolution[0], args.factors[0], args.block_num,
                          block_size=args.block_size))
        return
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
        f"{torch.get_num_threads()} CPU threads"
    shape = f"block_size {args.block_size}" if args.block_size else f"block_num {args.block_num}"
    print(f"torch {torch.__version__}, {where}, {args.precision}, {shape}, batch 2, "
          f"{args.accumulation} micro-batch(es) per step, median of {args.repeats} steps; x floor: against floor "
          "steps interleaved in the same process" + ("" if args.side == "cost" else
                                                       f"; every BOFT layer rotating on the {args.side} side"))
    memory = "peak GPU MB" if args.device.startswith("cuda") else "peak RSS MB"
    print(f"| arch | px | adapter | factors | s/step | x floor | arithmetic bound | bound with measured inverse "
          f"| ATen ops a step, all / computing (added over the floor) | {memory} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arch in args.arch:
        for resolution in args.resolution:
            run(arch, resolution, args.factors, args.block_num, args.repeats, args.modes, args.accumulation,
                args.device, args.precision, args.block_size, args.lora_rank, args.side)


if __name__ == "__main__":
    main()
