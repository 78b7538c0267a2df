"""benchmarks.gpu_check: the configurations it runs, how it reads a trainer's output, the table and its targets; on a
machine without CUDA it says so (the measurements themselves need the GPU)."""

import subprocess
import sys

import pytest

from benchmarks.gpu_check import Step, TrainerCase, plan, read_trainer_output, table_lines
from tests.helpers import REPO, cli_env


def test_the_plan_covers_the_issues_configurations_most_important_first():
    rows = plan(smoke=False, device="cuda")
    assert [r.part for r in rows] == sorted(r.part for r in rows)
    first = [(r.precision, r.mode, r.factors) for r in rows if r.part == "1"]
    for precision in ("fp16", "bf16"):
        assert [(p, m, f) for p, m, f in first if p == precision] == [
            (precision, "floor", 0), (precision, "fast", 1), (precision, "fast", 2), (precision, "fast", 4),
            (precision, "lora", 0)]
    assert [(r.mode, r.factors, r.side) for r in rows if r.part == "3"] == [
        ("floor", 0, "cost"), ("layered", 1, "cost"), ("fast", 1, "weight"), ("fast", 4, "weight")]
    assert {r.name for r in rows if isinstance(r, TrainerCase)} == {
        "fp16", "bf16", "xformers", "8-bit Adam", "gradient checkpointing", "prior preservation"}
    assert {(r.arch, r.resolution) for r in rows if r.part in ("5", "6")} == {("sdxl", 1024), ("flux1", 512)}
    assert all(r.block_size == 32 for r in rows if r.part == "6")
    on_cpu = plan(smoke=True, device="cpu")
    assert {r.name for r in on_cpu if isinstance(r, TrainerCase)} == {"bf16", "gradient checkpointing",
                                                                      "prior preservation"}
    assert {r.resolution for r in on_cpu if isinstance(r, Step)} == {64}


RUN_OUTPUT = ("Steps: 50%| 10/20 [loss=0.173, lr=0.0001]\rSteps: 100%| 20/20 [loss=0.151, lr=0.0001]\n"
              "Time: 4.1 s for 20 optimizer steps (4.878 steps/s)\n"
              "NVIDIA H100 80GB HBM3 total peak memory (max): 9123 MB\nCPU total peak memory (max): 5000 MB\n")


def test_a_trainer_run_is_read_from_its_output(tmp_path):
    adapter = tmp_path / "unet" / "20" / "dreambooth_boft"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    result, problem = read_trainer_output(RUN_OUTPUT, 0, adapter)
    assert problem is None and result == {"steps_per_second": 4.878, "peak_mb": 9123, "last_loss": 0.151}
    assert read_trainer_output(RUN_OUTPUT.replace("0.151", "nan"), 0, adapter)[1].startswith("losses not finite")
    assert read_trainer_output("x\ntrain_dreambooth.py: error: no GPU\n", 2, adapter)[1] == \
        "exit 2: train_dreambooth.py: error: no GPU"
    assert read_trainer_output(RUN_OUTPUT, 0, tmp_path / "missing")[1].startswith("no adapter in")


def measured(seconds, floor_seconds, operations):
    return {"seconds": seconds, "floor_seconds": floor_seconds, "operations": operations,
            "kernels": operations // 2, "peak_rss_mb": 100}


def test_the_table_marks_each_target_met_or_missed():
    floor = Step("1", "sd15", 512, "fp16", "floor", result=measured(0.1, 0.1, 1000))
    one = Step("1", "sd15", 512, "fp16", "fast", 1, result=measured(0.11, 0.1, 1300))
    four = Step("1", "sd15", 512, "fp16", "fast", 4, result=measured(0.14, 0.1, 1900))
    lora = Step("1", "sd15", 512, "fp16", "lora", result=measured(0.12, 0.1, 1600))
    case = TrainerCase("2", "fp16", result={"steps_per_second": 5.0, "peak_mb": 9000, "last_loss": 0.2})
    late = TrainerCase("2", "bf16", problem="skipped: out of time")
    lines = table_lines([floor, one, four, lora, case, late], "header")
    assert "| 1 | sd15 512 px fp16: fast BOFT m=1 | 0.1100 | 1.100 | 1,300 (+300) / 650 (+150) | 100 | meets <= 1.15; " \
           "no slower than LoRA r=16 |" in lines
    assert any("fast BOFT m=4" in line and "misses <= 1.25; slower than LoRA r=16" in line for line in lines)
    assert "| 2 | trainer, fp16 | 0.200 | | | 9000 | exit 0, losses finite (last 0.200), adapter saved |" in lines
    assert lines[-1] == "| 2 | trainer, bf16 | | | | | skipped: out of time |"


@pytest.mark.e2e
def test_without_cuda_it_says_so_and_its_plan_runs_nothing():
    refused = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=REPO, env=cli_env(),
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "no CUDA device here" in refused.stderr
    planned = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--plan"], cwd=REPO, env=cli_env(),
                             capture_output=True, text=True, timeout=120)
    assert planned.returncode == 0 and len(planned.stdout.splitlines()) == len(plan(False, "cuda"))
