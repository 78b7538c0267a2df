"""Two CPU processes (gloo) through `accelerate launch`, as users run several GPUs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, assert_clean_error, base_args, cli_env, free_ports, run_in_process
from utils.images import list_images
from utils.testing.tiny_model import make_synthetic_subject

pytestmark = pytest.mark.e2e  # every test here runs a command of the project or a trained fixture


def launch(argv, processes=2, timeout=600):
    """Two CPU processes: accelerate's torchrun launcher, told to stay on the CPU (its --cpu starts only one)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_ports()[0]), str(REPO / "train_dreambooth.py"), *argv]
    return subprocess.run(command, cwd=REPO, env=cli_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def four_photos(tmp_path_factory):
    return make_synthetic_subject(tmp_path_factory.mktemp("four") / "toy", num_images=4, seed=5)


@pytest.fixture(scope="module")
def two_process_run(tiny_model, four_photos, tmp_path_factory):
    root = tmp_path_factory.mktemp("two_processes")
    argv = base_args(tiny_model, four_photos, root / "out", with_prior_preservation=True,
                     class_data_dir=root / "class", class_prompt="a photo of toy", num_class_images=3,
                     class_inference_steps=2, max_train_steps=4, checkpointing_steps=2, validation_steps=4,
                     validation_prompt="a qwe toy. a red qwe toy.", num_validation_images=1,
                     validation_inference_steps=2, report_to="tensorboard")
    result = launch(argv)
    assert result.returncode == 0, result.stderr[-5000:]
    return root, argv, result


def test_class_images_are_split_without_duplicates_or_gaps(two_process_run):
    root, argv, _ = two_process_run
    assert [p.name for p in list_images(root / "class")] == [f"class_0000{i}.jpg" for i in range(3)]
    again = launch(argv + ["--max_train_steps", "4", "--output_dir", str(root / "again")])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Generating" not in again.stderr and len(list_images(root / "class")) == 3


def test_everything_is_written_once_by_the_main_process(two_process_run):
    root, _, result = two_process_run
    out = root / "out"
    assert sorted(p.name for p in (out / "validation" / "dreambooth_boft" / "4").iterdir()) == [
        "00_a_qwe_toy_0.png", "01_a_red_qwe_toy_0.png"]
    assert result.stderr.count("Saved adapter") == 2  # steps 2 and 4, once each
    assert len(list((out / "logs").rglob("events.out.tfevents.*"))) >= 1
    checkpoint = out / "checkpoints" / "dreambooth_boft" / "checkpoint-2"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert not list(out.glob(".*partial*"))


def test_resume_needs_the_same_number_of_processes(two_process_run, tiny_model, four_photos):
    root, argv, _ = two_process_run
    resumed = launch(argv + ["--max_train_steps", "6", "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stderr and (root / "out" / "unet" / "6").is_dir()
    single = run_in_process([*argv, "--max_train_steps", "8", "--resume_from_checkpoint", "latest"])
    assert_clean_error(single, "--num_processes: checkpoint 2, now 1")


@pytest.mark.parametrize("model, part", [("tiny_model", "unet"), ("tiny_flux_model", "transformer")])
def test_two_processes_equal_one_with_twice_the_batch(model, part, four_photos, tmp_path, request):
    # Adam divides each gradient by its own magnitude, so a rounding difference in a near-zero gradient moves that
    # weight by up to the learning rate: a small one keeps that below the tolerance.
    tiny_model = request.getfixturevalue(model)
    common = dict(boft_dropout=0.0, max_train_steps=2, learning_rate=1e-4, with_prior_preservation=True, class_data_dir=tmp_path / "class",
                  class_prompt="a photo of toy", num_class_images=4, class_inference_steps=2)
    two = launch(base_args(tiny_model, four_photos, tmp_path / "two", train_batch_size=1, **common))
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(REPO / "train_dreambooth.py"),
                          *base_args(tiny_model, four_photos, tmp_path / "one", train_batch_size=2, **common)],
                         cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    weights = [load_file(tmp_path / run / part / "2" / "dreambooth_boft" / "adapter_model.safetensors")
               for run in ("one", "two")]
    for key in weights[0]:
        assert torch.allclose(weights[0][key], weights[1][key], atol=1e-5, rtol=0), key


def test_the_launcher_and_plain_accelerate_cpu_flags(tiny_model, four_photos, tmp_path):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "teapot").symlink_to(four_photos)
    env = cli_env(MODEL_NAME=str(tiny_model), DATASET_DIR=str(dataset), CLASS_DATA_DIR=str(tmp_path / "class"),
                  OUTPUT_DIR=str(tmp_path / "out"), REPORT_TO="none",
                  ACCELERATE_ARGS=f"--cpu --num_processes 2 --main_process_port {free_ports()[0]}",
                  PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    flags = ["--resolution=64", "--max_train_steps=2", "--checkpointing_steps=2", "--num_class_images=2",
             "--class_inference_steps=2", "--validation_inference_steps=2", "--num_validation_images=1",
             "--num_dataloader_workers=0", "--no_tracemalloc", "--validation_prompt=a qwe teapot"]
    result = subprocess.run([str(REPO / "train_dreambooth.sh"), "27", *flags], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "out" / "checkpoints" / "teapot_boft_801" / "checkpoint-2" / "random_states_1.pkl").is_file()  # really two processes
    assert (tmp_path / "out" / "unet" / "2" / "teapot_boft_801" / "adapter_model.safetensors").is_file()
    assert len(list_images(tmp_path / "class" / "teapot")) == 2
    plain = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "train_dreambooth.py"),
         *base_args(tiny_model, four_photos, tmp_path / "plain", dry_run=True)],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stderr[-4000:]
    assert "started one process" in plain.stderr and "ACCELERATE_USE_CPU=1" in plain.stderr


def test_two_processes_stopped_mid_epoch_resume_exactly(tiny_model, four_photos, tmp_path):
    """Four photos over two processes: two batches per process and epoch, so step 3 is the middle of the second
    epoch, where resuming skips a batch of an epoch that is not the first."""
    import shutil

    argv = dict(max_train_steps=6, checkpointing_steps=3, validation_prompt=None)
    reference = launch(base_args(tiny_model, four_photos, tmp_path / "ref", **argv))
    assert reference.returncode == 0, reference.stderr[-4000:]
    shutil.copytree(tmp_path / "ref", tmp_path / "run")  # as if stopped right after step 3's checkpoint
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "dreambooth_boft" / "checkpoint-6")
    shutil.rmtree(tmp_path / "run" / "unet" / "6")
    resumed = launch(base_args(tiny_model, four_photos, tmp_path / "run", resume_from_checkpoint="latest", **argv))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "at step 3 (epoch 1, batch 1)" in resumed.stderr, resumed.stderr[-3000:]
    expected, got = (load_file(tmp_path / out / "unet" / "6" / "dreambooth_boft" / "adapter_model.safetensors")
                     for out in ("ref", "run"))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
