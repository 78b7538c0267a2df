"""Stops as the world delivers them: SIGTERM/SIGINT to a whole process group started with setsid, or to the
launcher alone, through accelerate launch, utils.launch and train_dreambooth.sh; usage errors through launchers."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import (REPO, adapter_weights, assert_quiet, base_args, cli_env, free_ports, group_ends, large_photos,
                           start_in_session, wait_for)
from utils.layout import RunLayout
from utils.run import checkpoints

pytestmark = pytest.mark.e2e  # every test here runs a command of the project or a trained fixture

ONE_PROCESS = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
LAUNCH = [sys.executable, "-m", "utils.launch"]
VENV_PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


def stopped_at(output: str) -> int:
    match = re.search(r"Interrupted at step (\d+); the training state is saved", output)
    assert match, output[-3000:]
    return int(match.group(1))


@pytest.mark.parametrize("target", ["group", "launcher"])
def test_sigterm_through_accelerate_launch_saves_with_two_workers(target, tiny_model, subject, tmp_path):
    out = tmp_path / "out"
    argv = base_args(tiny_model, subject, out, max_train_steps=1000, checkpointing_steps=2, num_dataloader_workers=2,
                     no_cache_latents=True)  # photos to decode: the workers really start
    process = start_in_session([*ACCELERATE, *ONE_PROCESS, REPO / "train_dreambooth.py", *argv])
    layout = RunLayout(out, "dreambooth_boft")
    wait_for(layout.checkpoint(2), process)
    if target == "group":  # Slurm, systemd, a terminal
        os.killpg(process.pid, signal.SIGTERM)
    else:  # `kill PID` of the launcher: accelerate does not pass it on; the trainer follows its launcher's death
        process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode != 0  # accelerate's launcher dies of the signal; the trainer saves and ends
    assert group_ends(process.pid), "a process of the run was left behind"
    step = stopped_at(output)
    assert "DataLoader worker" not in output and "Traceback" not in output, output[-3000:]
    assert layout.checkpoint(step).is_dir() and layout.adapter("unet", step).is_dir()
    assert (layout.checkpoint(step) / checkpoints.STATE_FILE).is_file()  # complete: resumable


@pytest.mark.parametrize("photos", ["small", "large"])
def test_a_trainer_whose_launcher_is_killed_alone_saves_ends_its_workers_and_exits(photos, tiny_model, subject,
                                                                                   tmp_path):
    """SIGKILL to accelerate launch alone (a crashed terminal multiplexer, an agent): the kernel sends the trainer
    SIGTERM, the stderr it wrote through accelerate's pipe has no reader any more, and its two persistent workers are
    idle (small photos) or busy decoding (large ones). It saves, ends its workers and exits 143 within 30 s."""
    photos_dir = subject if photos == "small" else large_photos(tmp_path / "large")
    out = tmp_path / "out"
    argv = base_args(tiny_model, photos_dir, out, max_train_steps=1000, checkpointing_steps=2,
                     num_dataloader_workers=2, no_cache_latents=True)
    layout = RunLayout(out, "dreambooth_boft")
    supervisor = subprocess.run(
        [sys.executable, "-m", "tests.supervise", str(layout.checkpoint(2)), *ACCELERATE, *ONE_PROCESS,
         str(REPO / "train_dreambooth.py"), *argv], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    report = json.loads(supervisor.stdout.strip().splitlines()[-1])
    assert report.get("trainer_status") == 143, report
    assert not report["left"] and report["seconds"] < 30, report
    saved = checkpoints.complete_checkpoints(layout)[-1]
    step = int(saved.name.split("-")[1])
    assert step >= 2 and (saved / checkpoints.STATE_FILE).is_file() and layout.adapter("unet", step).is_dir()


STEPS, RUN = 10, "teapot_boft_801"


def launcher_run(root, model, subject, out, *flags):
    """./train_dreambooth.sh 27 (teapot) on the tiny pipeline, in a session of its own."""
    dataset = root / "dataset"
    if not dataset.exists():
        dataset.mkdir()
        (dataset / "teapot").symlink_to(subject)
    env = dict(MODEL_NAME=str(model), DATASET_DIR=str(dataset), CLASS_DATA_DIR=str(root / "class"),
               OUTPUT_DIR=str(out), REPORT_TO="none", ACCELERATE_ARGS="--cpu --num_processes 1", PATH=VENV_PATH)
    common = ["--resolution=64", "--num_class_images=2", "--class_inference_steps=2", "--checkpointing_steps=2",
              "--validation_prompt=a qwe teapot", "--num_validation_images=1", "--validation_inference_steps=1",
              "--validation_steps=1000", "--no_tracemalloc"]
    return start_in_session([REPO / "train_dreambooth.sh", "27", *common, *flags], **env)


@pytest.fixture(scope="module")
def launcher_reference(tiny_model, subject, tmp_path_factory):
    """The launcher's recipe run to STEPS without interruption: what every stopped and resumed run must equal."""
    root = tmp_path_factory.mktemp("launcher")
    reference = launcher_run(root, tiny_model, subject, root / "reference", f"--max_train_steps={STEPS}")
    assert reference.wait(timeout=600) == 0, reference.stdout.read()[-3000:]
    return root, adapter_weights(root / "reference", STEPS, RUN)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_through_the_launcher_script_resumes_exactly(signum, launcher_reference, tiny_model, subject):
    root, expected = launcher_reference
    out = root / signal.Signals(signum).name
    stopped = launcher_run(root, tiny_model, subject, out, "--max_train_steps=1000")
    wait_for(RunLayout(out, RUN).checkpoint(2), stopped)
    os.killpg(stopped.pid, signum)  # Ctrl-C, a scheduler's stop, a closed terminal: the whole process group
    output = stopped.communicate(timeout=300)[0]
    assert stopped.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGHUP: 129}[signum], output[-3000:]
    assert group_ends(stopped.pid) and "Traceback" not in output, output[-3000:]
    assert output.strip().splitlines()[-1].startswith("Interrupted at step"), output[-1000:]
    assert_quiet(output)  # accelerate's block on the values the launcher did not pass among them
    step = stopped_at(output)
    assert step < STEPS and RunLayout(out, RUN).checkpoint(step).is_dir()
    if signum != signal.SIGTERM:  # the same deferred stop as SIGTERM: its resume is checked once, below, for SIGTERM
        return
    resumed = launcher_run(root, tiny_model, subject, out, f"--max_train_steps={STEPS}", "--resume_from_checkpoint=latest")
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()[-3000:]
    got = adapter_weights(out, STEPS, RUN)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected), f"stopped at step {step}"


def test_sigterm_to_the_multi_process_launcher_alone_saves_on_every_process(tiny_model, subject, tmp_path):
    out = tmp_path / "out"
    argv = base_args(tiny_model, subject, out, max_train_steps=1000, checkpointing_steps=2, num_dataloader_workers=1,
                     no_cache_latents=True)
    process = start_in_session([*LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                                str(free_ports()[0]), REPO / "train_dreambooth.py", *argv], ACCELERATE_USE_CPU="1")
    layout = RunLayout(out, "dreambooth_boft")
    wait_for(layout.checkpoint(2), process)
    process.send_signal(signal.SIGTERM)  # the launcher only, as a spot-instance agent or `kill PID` does
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 143, output[-3000:]
    assert group_ends(process.pid) and "Traceback" not in output, output[-3000:]
    step = stopped_at(output)
    assert (layout.checkpoint(step) / "random_states_1.pkl").is_file()  # both processes saved


@pytest.mark.parametrize("launcher", ["script", "utils.launch", "accelerate --quiet"])
def test_a_usage_error_through_a_launcher_ends_with_the_message_and_no_traceback(launcher, tiny_model, subject,
                                                                               tmp_path):
    argv = base_args(tiny_model, subject, tmp_path / "out", resolution=33)
    if launcher == "script":
        (tmp_path / "dataset").mkdir()
        (tmp_path / "dataset" / "teapot").symlink_to(subject)
        command = [REPO / "train_dreambooth.sh", "27", "--resolution=33"]
        env = dict(MODEL_NAME=str(tiny_model), DATASET_DIR=str(tmp_path / "dataset"), PATH=VENV_PATH,
                   OUTPUT_DIR=str(tmp_path / "out"), ACCELERATE_ARGS="--cpu --num_processes 1")
    else:
        flags = ["--quiet"] if launcher.endswith("--quiet") else []
        command = [*(ACCELERATE if launcher.startswith("accelerate") else LAUNCH), *flags, *ONE_PROCESS,
                   REPO / "train_dreambooth.py", *argv]
        env = {}
    process = start_in_session(command, **env)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == (1 if launcher.startswith("accelerate") else 2), output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    assert output.strip().splitlines()[-1] == (
        "train_dreambooth.py: error: --resolution must be a multiple of 8 (the VAE downsamples by 8), got 33")
    assert not (tmp_path / "out").exists()
