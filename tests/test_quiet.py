"""No dependency's own output reaches the user (utils/quiet.py): --help and usage errors answer before torch loads
(the trainer and the tools),
a run, an export read by another user; the training run, inference and evaluate checks are in their modules
(assert_quiet)."""

import os
import stat
import subprocess
import sys

import pytest

from tests.helpers import REPO, assert_quiet, base_args, cli_env

pytestmark = pytest.mark.e2e


def run(*command, **kwargs):
    return subprocess.run([sys.executable, *map(str, command)], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=300, **kwargs)


def imported_modules(stderr: str) -> set[str]:
    """The top-level packages a `python -X importtime` run imported."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("argv", [["--help"], ["--use_boft"], ["--pretrained_model_name_or_path=m",
                                  "--instance_data_dir=.", "--instance_prompt=x", "--use_boft", "--resolution=33"]])
def test_help_and_usage_errors_answer_before_torch_peft_or_diffusers_load(argv):
    result = run("-X", "importtime", REPO / "train_dreambooth.py", *argv)
    assert result.returncode == (0 if argv == ["--help"] else 2), result.stderr[-2000:]
    assert not imported_modules(result.stderr) & {"torch", "peft", "diffusers", "transformers", "accelerate"}
    assert_quiet(result.stdout + result.stderr)


@pytest.mark.parametrize("tool", ["utils.inference", "utils.evaluate", "utils.export", "utils.launch"])
def test_the_tools_help_is_quiet_and_light(tool):
    result = run("-X", "importtime", "-m", tool, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-2000:]
    assert_quiet(result.stdout + result.stderr)
    if tool != "utils.launch":  # the launcher's flags are accelerate's own parser
        assert not imported_modules(result.stderr) & {"torch", "peft", "diffusers", "transformers"}


def test_an_export_is_quiet_and_readable_by_other_users_under_umask_022(trained, tiny_model, tmp_path):
    out = tmp_path / "toy_lora.safetensors"
    result = run("-m", "utils.export", "--pretrained_model_name_or_path", tiny_model, "--output_dir", trained,
                 "--adapter_name", "toy", "--format", "lora", "--rank", 4, "--out", out, preexec_fn=lambda: os.umask(0o022))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_quiet(result.stdout + result.stderr)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # safetensors itself writes 0600


def test_bitsandbytes_is_imported_only_when_asked_for(tiny_model, subject, tmp_path):
    code = """
import sys
import utils.boft.peft_seam, peft, diffusers, transformers
assert "bitsandbytes" not in sys.modules or sys.modules["bitsandbytes"] is None, "imported with peft"
from utils.quiet import import_bitsandbytes
print(import_bitsandbytes().optim.AdamW8bit.__name__)
"""
    result = run("-c", code)
    assert result.returncode == 0 and result.stdout.strip() == "AdamW8bit", result.stderr[-2000:]
    assert_quiet(result.stdout + result.stderr)
