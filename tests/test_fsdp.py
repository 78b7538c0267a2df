"""configs/fsdp.yaml: FSDP 2 shards the frozen base and the BOFT adapters across processes (two CPU processes with
gloo here, through tests/fsdp_on_cpu.py: accelerate picks FSDP only on accelerators). A tiny FLUX.1 run trains,
validates on every process and checkpoints; its adapters equal DDP's, load with stock peft, and a run resumed from
its checkpoint ends with the same adapters."""

import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, adapter_weights, assert_clean_error, base_args, cli_env, free_ports

pytestmark = pytest.mark.e2e  # every test here launches the trainer

RUN = "dreambooth_boft"
FLAGS = dict(boft_block_num=0, boft_block_size=4, checkpointing_steps=2, max_train_steps=4, validation_steps=2,
             validation_prompt="a qwe toy", num_validation_images=1, validation_inference_steps=2)


def launch(sharded: bool, model, subject, out, **overrides):
    port = ["--main_process_port", str(free_ports()[0])]
    accelerate = (["--config_file", "configs/fsdp.yaml", "--num_processes", "2", "--mixed_precision", "no", *port,
                   str(REPO / "tests" / "fsdp_on_cpu.py")] if sharded else
                  ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no", *port])
    return subprocess.run([sys.executable, "-m", "utils.launch", *accelerate, str(REPO / "train_dreambooth.py"),
                           *base_args(model, subject, out, **{**FLAGS, **overrides})],
                          cwd=REPO, env=cli_env(ACCELERATE_USE_CPU="1", PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def sharded_run(tiny_flux_model, subject, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "out"
    result = launch(True, tiny_flux_model, subject, out)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    return out, result


def test_fsdp_trains_the_same_adapters_as_ddp_and_saves_stock_peft_folders(sharded_run, tiny_flux_model, subject,
                                                                        tmp_path):
    out, result = sharded_run
    assert "DistributedType.FSDP" in result.stderr and "Num processes: 2" in result.stderr
    checkpoint = out / "checkpoints" / RUN / "checkpoint-4"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()  # sharded state
    assert sorted(p.name for p in (out / "validation" / RUN / "4").iterdir()) == ["00_a_qwe_toy_0.png"]
    ddp = launch(False, tiny_flux_model, subject, tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr[-5000:]
    sharded, reference = adapter_weights(out, 4, RUN, ("transformer",)), adapter_weights(tmp_path / "ddp", 4, RUN,
                                                                                        ("transformer",))
    assert sharded.keys() == reference.keys() and len(sharded) > 0
    for key in reference:  # the same gradients, summed in another order: equal to fp32 rounding
        torch.testing.assert_close(sharded[key], reference[key], rtol=1e-5, atol=1e-6)

    from diffusers import FluxTransformer2DModel
    from peft import PeftModel

    from utils.boft import peft_seam

    peft_seam.install()
    base = FluxTransformer2DModel.from_pretrained(tiny_flux_model, subfolder="transformer")
    loaded = PeftModel.from_pretrained(base, out / "transformer" / "4" / RUN)
    state = {k: v for k, v in loaded.state_dict().items() if "boft_R" in k}
    assert len(state) == sum("boft_R" in k for k in sharded)


def test_a_run_resumed_under_fsdp_ends_with_the_same_adapters(sharded_run, tiny_flux_model, subject, tmp_path):
    out, _ = sharded_run
    resumed = tmp_path / "out"
    shutil.copytree(out / "checkpoints" / RUN / "checkpoint-2", resumed / "checkpoints" / RUN / "checkpoint-2")
    shutil.copytree(out / "transformer" / "2", resumed / "transformer" / "2")
    result = launch(True, tiny_flux_model, subject, resumed, resume_from_checkpoint="latest")
    assert result.returncode == 0, result.stderr[-5000:]
    assert "Resumed from" in result.stderr
    expected, got = adapter_weights(out, 4, RUN, ("transformer",)), adapter_weights(resumed, 4, RUN, ("transformer",))
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def test_what_fsdp_cannot_shard_is_refused_before_anything_is_written(tiny_flux_model, subject, tmp_path):
    result = launch(True, tiny_flux_model, subject, tmp_path / "out", train_text_encoder=True)
    assert_clean_error(result, "--train_text_encoder does not go with FSDP", "configs/multi_gpu.yaml")
    assert not (tmp_path / "out" / "transformer").exists() and not (tmp_path / "out" / "checkpoints").exists()
