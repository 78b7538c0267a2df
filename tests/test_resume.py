"""Kill a real training process, resume it, and get exactly the weights of an uninterrupted run."""

import os
import re
import signal
import sys

import pytest
import torch

from tests.helpers import (
    REPO,
    adapter_weights,
    assert_clean_error,
    base_args,
    processes_in_group,
    run_in_process,
    run_trainer,
    start_in_session,
    wait_for,
)

pytestmark = pytest.mark.e2e  # every test here runs a command of the project or a trained fixture

STEPS = 8


def start_trainer(argv):
    return start_in_session([sys.executable, REPO / "train_dreambooth.py", *argv])


CONFIGS = {
    "prior_accumulation_text_encoder": dict(with_prior_preservation=True, class_prompt="a photo of toy",
                                            num_class_images=2, class_inference_steps=2, gradient_accumulation_steps=2,
                                            train_text_encoder=True, num_dataloader_workers=1, no_cache_latents=True),
    # SDXL: its size-and-crop conditioning comes back from the latent cache on resume.
    "sdxl_batch_2": dict(train_batch_size=2),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_sigkill_then_resume_equals_an_uninterrupted_run(config, request, subject, tmp_path):
    flags = dict(CONFIGS[config])
    tiny_model = request.getfixturevalue("tiny_xl_model" if config.startswith("sdxl") else "tiny_model")
    if "class_prompt" in flags:
        flags["class_data_dir"] = tmp_path / "class"
    models = ("unet", "text_encoder") if flags.get("train_text_encoder") else ("unet",)

    reference = run_trainer(base_args(tiny_model, subject, tmp_path / "ref", max_train_steps=STEPS,
                                      checkpointing_steps=2, checkpoints_total_limit=2, **flags))
    assert reference.returncode == 0, reference.stderr[-3000:]
    kept = (tmp_path / "ref" / "checkpoints" / "dreambooth_boft").glob("checkpoint-*")
    assert sorted(p.name for p in kept) == [f"checkpoint-{STEPS - 2}", f"checkpoint-{STEPS}"]  # the total limit

    killed = start_trainer(base_args(tiny_model, subject, tmp_path / "run", max_train_steps=1000,
                                     checkpointing_steps=2, **flags))
    wait_for(tmp_path / "run" / "checkpoints" / "dreambooth_boft" / "checkpoint-2", killed)
    # The OOM killer's way: the main process alone. Its loader workers outlive it (torch's notice their parent is
    # gone within 5 s); frozen here, they live on for the whole resume, which must still take the lock at once.
    workers = [pid for pid in processes_in_group(killed.pid) if pid != killed.pid]
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    try:
        resumed = run_trainer(base_args(tiny_model, subject, tmp_path / "run", max_train_steps=STEPS,
                                        checkpointing_steps=2, resume_from_checkpoint="latest", **flags))
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
    assert len(workers) == flags.get("num_dataloader_workers", 0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Taking over the lock of run 'dreambooth_boft' left by process" in resumed.stderr
    resumed_at = int(re.search(r"Resumed from \S+ at step (\d+)", resumed.stdout + resumed.stderr).group(1))
    assert 2 <= resumed_at < STEPS  # the kill came before the end, so the last steps were really redone
    expected = adapter_weights(tmp_path / "ref", STEPS, models=models)
    got = adapter_weights(tmp_path / "run", STEPS, models=models)
    assert expected.keys() == got.keys()
    for key in expected:  # identical tensors: every kernel used here is deterministic on the CPU
        assert torch.equal(expected[key], got[key]), key


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tiny_model, subject, tmp_path):
    argv = base_args(tiny_model, subject, tmp_path / "out", max_train_steps=1000, checkpointing_steps=2)
    process = start_trainer(argv)
    wait_for(tmp_path / "out" / "checkpoints" / "dreambooth_boft" / "checkpoint-2", process)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 143, output[-3000:]
    assert "--resume_from_checkpoint latest" in output and "Traceback" not in output
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "out" / "checkpoints" / "dreambooth_boft").glob("checkpoint-*"))
    final = steps[-1]
    assert (tmp_path / "out" / "unet" / str(final) / "dreambooth_boft" / "adapter_model.safetensors").is_file()
    # Resuming after a stop, exactly: tests/test_signals.py (the same deferred stop, through the launchers).


def test_resume_with_another_block_shape_or_model_is_refused(tiny_model, tiny_v_model, subject, tmp_path):
    first = run_trainer(base_args(tiny_model, subject, tmp_path / "out", max_train_steps=2, checkpointing_steps=2))
    assert first.returncode == 0, first.stderr[-3000:]
    other_shape = run_in_process(base_args(tiny_model, subject, tmp_path / "out", boft_block_num=4,
                                           resume_from_checkpoint="latest", max_train_steps=4))
    assert_clean_error(other_shape, "--boft_block_num: checkpoint 8, now 4")
    other_rate = run_in_process(base_args(tiny_model, subject, tmp_path / "out", learning_rate=3e-5,
                                          resume_from_checkpoint="latest", max_train_steps=4))
    assert_clean_error(other_rate, "--learning_rate: checkpoint 0.001, now 3e-05")  # never silently ignored
    other_model = run_in_process(base_args(tiny_v_model, subject, tmp_path / "out", resume_from_checkpoint="latest",
                                           max_train_steps=4))
    assert_clean_error(other_model, "--pretrained_model_name_or_path")
