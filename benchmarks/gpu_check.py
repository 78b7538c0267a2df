"""What only a GPU shows, in one run of at most --budget seconds (480), written as one markdown table with the card's
name (--out, default gpu_check.md). `make gpu-check` runs it; nothing is downloaded (random weights, built here).

Parts, most important first; every configuration runs in a process of its own within what is left of the budget, and
what cannot fit any more is listed as skipped:
  1. step, fp16 and bf16: SD 1.5's architecture at 512 px, batch 2: the frozen floor, fast BOFT with 1, 2 and 4
     butterfly factors (each model's rotations computed together before its forward, as on any GPU), in fp16 also
     one factor with the rotations layer by layer (what computing them together saves), LoRA r=16 on the same
     layers (benchmarks/boft_step.py). Targets: fast BOFT at most 1.15 x the floor with one factor and 1.25 x with
     four, and no slower than LoRA r=16.
  2. trainer: train_dreambooth.py for 20 steps on SD 1.5's architecture (random weights, 512 px, block_num 8) per
     case: fp16, bf16, xformers (when it imports), 8-bit Adam, gradient checkpointing, prior preservation. Checked:
     exit status 0, every logged loss finite, the adapter saved; measured: steps a second, peak GPU memory.
  3. the rotation's choices, fp16 (against part 1's fast rows, which compute each model's rotations together
     before its forward and pick each layer's side by the cost model): one factor with the rotations layer by
     layer; one and four factors with every layer rotating its weight (the fewest kernels a step).
  4. step, fp32: the rows of part 1.
  5. SDXL at 1024 px, bf16: floor, fast BOFT with one factor, LoRA r=16.
  6. FLUX.1's widths (one double- and one single-stream block), 512 px, bf16, blocks of 32: floor, fast BOFT with 1
     and 2 factors, LoRA r=16.

    python -m benchmarks.gpu_check                          # on a CUDA machine
    python -m benchmarks.gpu_check --plan                   # what it would run, nothing run
    python -m benchmarks.gpu_check --device cpu --smoke     # every part at toy size on a CPU: checks this script
"""

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LORA_RANK = 16
TARGETS = {1: 1.15, 4: 1.25}  # fast BOFT's x floor in fp16/bf16 at 512 px (issue 28)
TRAINER_CASES = {  # name: (extra trainer flags, needs CUDA)
    "fp16": (["--mixed_precision", "fp16"], True),
    "bf16": (["--mixed_precision", "bf16"], False),
    "xformers": (["--mixed_precision", "fp16", "--enable_xformers_memory_efficient_attention"], True),
    "8-bit Adam": (["--mixed_precision", "bf16", "--use_8bit_adam"], True),
    "gradient checkpointing": (["--mixed_precision", "bf16", "--gradient_checkpointing"], False),
    "prior preservation": (["--mixed_precision", "bf16", "--with_prior_preservation", "--class_prompt", "a photo of toy",
                            "--num_class_images", "4", "--class_inference_steps", "5", "--sample_batch_size", "4"],
                           False),
}


@dataclass
class Step:
    """One configuration of benchmarks/boft_step.py."""
    part: str
    arch: str
    resolution: int
    precision: str
    mode: str  # floor, fast, layered, lora
    factors: int = 0
    block_size: int = 0
    side: str = "cost"  # benchmarks/boft_step.py --side
    result: dict | None = None
    problem: str | None = None

    def command(self, device, repeats) -> list[str]:
        from benchmarks.boft_step import one_command

        return one_command(self.arch, self.resolution, self.mode, self.factors, 8, repeats, 1, device, self.precision,
                           self.block_size, LORA_RANK, self.side)

    @property
    def label(self) -> str:
        what = {"floor": "floor", "lora": f"LoRA r={LORA_RANK}",
                "layered": f"fast BOFT m={self.factors}, rotations layer by layer"}.get(self.mode,
                                                                                      f"fast BOFT m={self.factors}")
        what += f", every layer rotating its {self.side}" if self.side != "cost" else ""
        shape = f", blocks of {self.block_size}" if self.block_size else ""
        return f"{self.arch} {self.resolution} px {self.precision}{shape}: {what}"


@dataclass
class TrainerCase:
    part: str
    name: str
    flags: list = field(default_factory=list)
    result: dict | None = None
    problem: str | None = None

    @property
    def label(self) -> str:
        return f"trainer, {self.name}"


def plan(smoke: bool, device: str) -> list:
    """The configurations, most important first (`smoke`: toy sizes, and only what runs on `device`)."""
    on_gpu = device.startswith("cuda")
    px, factors = (64, [1]) if smoke else (512, [1, 2, 4])

    def step_rows(part, arch, resolution, precision, factor_list, block_size=0):
        rows = [Step(part, arch, resolution, precision, "floor", block_size=block_size)]
        rows += [Step(part, arch, resolution, precision, "fast", m, block_size) for m in factor_list]
        return rows + [Step(part, arch, resolution, precision, "lora", block_size=block_size)]

    configurations = []
    for precision in (["fp16", "bf16"] if on_gpu else ["bf16"]):
        configurations += step_rows("1", "sd15", px, precision, factors)
    configurations += [TrainerCase("2", name, flags) for name, (flags, needs_cuda) in TRAINER_CASES.items()
                       if on_gpu or not needs_cuda]
    precision = "fp16" if on_gpu else "bf16"  # the rotation's choices, against part 1's fast rows
    configurations += [Step("3", "sd15", px, precision, "floor"), Step("3", "sd15", px, precision, "layered", 1)]
    configurations += [Step("3", "sd15", px, precision, "fast", m, side="weight") for m in sorted({1, factors[-1]})]
    if not smoke:
        configurations += step_rows("4", "sd15", px, "fp32", factors)
        configurations += step_rows("5", "sdxl", 1024, "bf16", [1])
        configurations += step_rows("6", "flux1", 512, "bf16", [1, 2], block_size=32)
    return configurations


# --- running ------------------------------------------------------------------------------------------------------


def run_step(step: Step, device, repeats, timeout) -> None:
    try:
        done = subprocess.run(step.command(device, repeats), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        step.problem = f"did not finish in the {timeout:.0f} s left"
        return
    if done.returncode:
        step.problem = failure(done.returncode, done.stderr)
        return
    step.result = json.loads(done.stdout.strip().splitlines()[-1])


XFORMERS_FELL_BACK = "using PyTorch scaled-dot-product attention"  # the trainer's warning when xformers cannot run
LOSS = re.compile(r"loss=([^,\]\s]+)")
RATE = re.compile(r"Time: [\d.]+ s for (\d+) optimizer steps \(([\d.]+) steps/s\)")
PEAK = re.compile(r"total peak memory \(max\): (\d+) MB")


def failure(returncode: int, output: str) -> str:
    """A failed command, for the table: its exit status and the last line it wrote."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return f"exit {returncode}: {lines[-1] if lines else 'no message'}"[:200]


def read_trainer_output(output: str, returncode: int, adapter: Path) -> tuple[dict | None, str | None]:
    """(measurements, None) for a good run, else (None, what went wrong), from the trainer's terminal output."""
    losses = [float(value) for value in LOSS.findall(output)]
    if returncode:
        return None, failure(returncode, output)
    if not losses or not all(math.isfinite(loss) for loss in losses):
        return None, f"losses not finite: {losses[-5:]}" if losses else "no loss logged"
    if not (adapter / "adapter_model.safetensors").is_file():
        return None, f"no adapter in {adapter}"
    rate, peak = RATE.search(output), PEAK.search(output)
    return {"steps_per_second": float(rate.group(2)) if rate else None,
            "peak_mb": int(peak.group(1)) if peak else None, "last_loss": losses[-1]}, None


def trainer_command(case: TrainerCase, model, subject, out, smoke, steps) -> list[str]:
    return [sys.executable, str(REPO / "train_dreambooth.py"), "--pretrained_model_name_or_path", str(model),
            "--instance_data_dir", str(subject), "--instance_prompt", "a photo of qwe toy", "--output_dir", str(out),
            "--class_data_dir", str(out.parent / "class"), "--use_boft", "--resolution", "64" if smoke else "512",
            "--train_batch_size", "1", "--max_train_steps", str(steps), "--checkpointing_steps", str(steps),
            "--boft_block_num", "8", "--boft_block_size", "0", "--boft_n_butterfly_factor", "1",
            "--learning_rate", "1e-4", "--seed", "0", "--report_to", "none", "--num_dataloader_workers", "2",
            "--overwrite_run", *case.flags]


def run_trainer_case(case: TrainerCase, model, subject, work, smoke, timeout) -> None:
    out, steps = work / re.sub(r"\W+", "-", case.name), 2 if smoke else 20
    try:
        done = subprocess.run(trainer_command(case, model, subject, out, smoke, steps), cwd=REPO, capture_output=True,
                              text=True, timeout=timeout, env=_offline_env())
    except subprocess.TimeoutExpired:
        case.problem = f"did not finish in the {timeout:.0f} s left"
        return
    output = done.stdout + done.stderr
    case.result, case.problem = read_trainer_output(output, done.returncode, out / "unet" / str(steps) / "dreambooth_boft")
    if case.result and "enable_xformers_memory_efficient_attention" in case.flags and XFORMERS_FELL_BACK in output:
        case.result["note"] = "xformers did not import: PyTorch attention ran"


def _offline_env() -> dict:
    import os

    return dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")


# --- the table ----------------------------------------------------------------------------------------------------


def step_checks(step: Step, rows: list) -> str:
    """The targets a fast BOFT row of part 1 meets or misses (its floor and LoRA are rows of the same part)."""
    if step.mode != "fast" or step.part != "1" or step.result is None:
        return ""
    ratio = step.result["seconds"] / step.result["floor_seconds"]
    checks = [f"{'meets' if ratio <= TARGETS[step.factors] else 'misses'} <= {TARGETS[step.factors]}"] \
        if step.factors in TARGETS else []
    lora = next((r for r in rows if isinstance(r, Step) and r.mode == "lora" and r.part == step.part
                 and r.precision == step.precision and r.result), None)
    if lora is not None:
        faster = step.result["seconds"] <= lora.result["seconds"]
        checks.append(f"{'no slower than' if faster else 'slower than'} LoRA r={LORA_RANK}")
    return "; ".join(checks)


def table_lines(rows: list, header: str) -> list[str]:
    from benchmarks.boft_step import counts

    floors = {(r.part, r.arch, r.precision): r.result for r in rows if isinstance(r, Step) and r.mode == "floor"
              and r.result}
    lines = [header, "", "| part | configuration | s/step | x floor | ATen ops a step, all / computing (added) | "
             "peak GPU MB | check |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.result is None:
            lines.append(f"| {row.part} | {row.label} | | | | | {row.problem or 'skipped: out of time'} |")
        elif isinstance(row, Step):
            floor = floors.get((row.part, row.arch, row.precision))
            ratio = f"{row.result['seconds'] / row.result['floor_seconds']:.3f}" if row.mode != "floor" else "1.000"
            operations = counts(row.result, floor if row.mode != "floor" else None)
            lines.append(f"| {row.part} | {row.label} | {row.result['seconds']:.4f} | {ratio} | {operations} | "
                         f"{row.result['peak_rss_mb']} | {step_checks(row, rows)} |")
        else:
            rate = row.result["steps_per_second"]
            note = f"; {row.result['note']}" if row.result.get("note") else ""
            seconds = f"{1 / rate:.3f}" if rate else ""
            lines.append(f"| {row.part} | {row.label} | {seconds} | | | {row.result['peak_mb'] or ''} | "
                         f"exit 0, losses finite (last {row.result['last_loss']:.3f}), adapter saved{note} |")
    return lines


def header_line(device) -> str:
    import diffusers
    import peft
    import torch

    card = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    return (f"benchmarks.gpu_check on {card}, {time.strftime('%Y-%m-%d')}: torch {torch.__version__}, diffusers "
            f"{diffusers.__version__}, peft {peft.__version__}; random weights; step rows: batch 2, block_num 8, median "
            "of the repeats; ratios against floor steps of the same process")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=float, default=480, help="seconds for everything (default 480)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="gpu_check.md")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: checks the script, measures nothing")
    parser.add_argument("--plan", action="store_true", help="print the configurations and commands, run nothing")
    args = parser.parse_args(argv)
    rows = plan(args.smoke, args.device)
    if args.plan:
        for row in rows:
            command = row.command(args.device, args.repeats)[1:] if isinstance(row, Step) else \
                ["train_dreambooth.py", "...", *row.flags]
            print(f"part {row.part}: {row.label}: {' '.join(command)}")
        return
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks.gpu_check: error: no CUDA device here (--device cpu --smoke checks the script on a CPU)",
              file=sys.stderr)
        raise SystemExit(2)
    deadline = time.monotonic() + args.budget
    header = header_line(args.device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        work = Path(scratch)
        model = subject = None
        for row in rows:
            left = deadline - time.monotonic()
            if left < 15:
                row.problem = "skipped: out of time"
                continue
            if isinstance(row, Step):
                run_step(row, args.device, 1 if args.smoke else args.repeats, left)
            else:
                if model is None:  # built once, inside the budget
                    model, subject = trainer_inputs(work, args.smoke)
                run_trainer_case(row, model, subject, work, args.smoke, deadline - time.monotonic())
            Path(args.out).write_text("\n".join(table_lines(rows, header)) + "\n")  # a cut run keeps its rows
            print(f"{row.label}: {'ok' if row.result else row.problem}", flush=True)
    Path(args.out).write_text("\n".join(table_lines(rows, header)) + "\n")
    print(Path(args.out).read_text())


def trainer_inputs(work: Path, smoke: bool) -> tuple[Path, Path]:
    """The trainer's model (SD 1.5's architecture with random weights, built once into data/bench/ as
    benchmarks.train_step keeps it; the tiny pipeline for --smoke) and photos."""
    from benchmarks.sd_architectures import save_random_pipeline
    from benchmarks.train_step import BENCH_DATA
    from utils.testing.tiny_model import make_synthetic_subject, save_tiny_pipeline

    model = save_tiny_pipeline(work / "tiny-sd") if smoke else save_random_pipeline("sd15", BENCH_DATA / "sd15-random")
    return model, make_synthetic_subject(work / "subject", num_images=4, size=64 if smoke else 512)


if __name__ == "__main__":
    main()
