"""Several subjects in one output folder, as the launcher's recipe trains them: each run owns its files, a run
name trains once at a time, class folders are shared safely."""

import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.helpers import REPO, adapter_weights, assert_clean_error, base_args, cli_env, run_in_process, run_trainer
from utils.images import list_images
from utils.layout import RunLayout
from utils.run.lock import FileLock
from utils.testing.tiny_model import make_synthetic_subject

pytestmark = pytest.mark.e2e  # every test here runs a command of the project or a trained fixture

SCHEDULE = dict(checkpointing_steps=2, validation_steps=2, validation_prompt="a qwe toy", num_validation_images=1,
                validation_inference_steps=2)


@pytest.fixture(scope="module")
def second_subject(tmp_path_factory):
    return make_synthetic_subject(tmp_path_factory.mktemp("cat") / "cat", num_images=3, seed=9)


def files_of(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_subjects_in_one_folder_then_resuming_the_first_is_exact(tiny_model, subject, second_subject, tmp_path):
    out = tmp_path / "out"
    dog = run_trainer(base_args(tiny_model, subject, out, wandb_run_name="dog", max_train_steps=4, **SCHEDULE))
    assert dog.returncode == 0, dog.stderr[-3000:]
    dog_validation = files_of(out / "validation" / "dog")
    cat = run_trainer(base_args(tiny_model, second_subject, out, wandb_run_name="cat", max_train_steps=4,
                                instance_prompt="a photo of qwe cat", checkpoints_total_limit=1, **SCHEDULE))
    assert cat.returncode == 0, cat.stderr[-3000:]
    assert files_of(out / "validation" / "dog") == dog_validation  # the second subject overwrote nothing
    assert [p.name for p in RunLayout(out, "dog").checkpoint_folders()] == ["checkpoint-2", "checkpoint-4"]
    assert [p.name for p in RunLayout(out, "cat").checkpoint_folders()] == ["checkpoint-4"]  # its limit, its own

    resumed = run_trainer(base_args(tiny_model, subject, out, wandb_run_name="dog", max_train_steps=6,
                                    resume_from_checkpoint="latest", **SCHEDULE))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from {RunLayout(out, 'dog').checkpoint(4)} at step 4" in resumed.stderr
    assert "Latent cache: 0 image(s) encoded, 3 found" in resumed.stderr  # the cache is reused, not rebuilt
    reference = run_trainer(base_args(tiny_model, subject, tmp_path / "ref", wandb_run_name="dog", max_train_steps=6,
                                      **SCHEDULE))
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected, got = adapter_weights(tmp_path / "ref", 6, "dog"), adapter_weights(out, 6, "dog")
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def test_a_run_held_by_a_live_process_is_refused_and_nothing_is_written(tiny_model, subject, tmp_path):
    layout = RunLayout(tmp_path / "out", "dog")
    with FileLock(layout.lock_file) as held:
        assert held.try_acquire()[0]
        refused = run_in_process(base_args(tiny_model, subject, layout.output_dir, wandb_run_name="dog"))
        assert_clean_error(refused, "'dog' is already training into", "--wandb_run_name")
        assert [p for p in layout.output_dir.rglob("*") if p.is_file()] == [layout.lock_file]


def test_a_lock_left_by_a_dead_process_is_taken_over(tiny_model, subject, tmp_path):
    layout = RunLayout(tmp_path / "out", "dog")
    layout.lock_file.parent.mkdir(parents=True)
    layout.lock_file.write_text("999999999 on a-crashed-machine since 2026-01-01 00:00:00\n")  # not held
    result = run_trainer(base_args(tiny_model, subject, layout.output_dir, wandb_run_name="dog"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Taking over the lock of run 'dog' left by process 999999999" in result.stderr
    assert layout.lock_file.read_text() == ""  # released at the end


def test_runs_side_by_side_share_a_class_folder_and_a_duplicate_name_is_refused(tiny_model, subject,
                                                                               second_subject, tmp_path):
    out, class_dir = tmp_path / "out", tmp_path / "class"
    prior = dict(with_prior_preservation=True, class_data_dir=class_dir, class_prompt="a photo of toy",
                 num_class_images=4, class_inference_steps=2, sample_batch_size=1, max_train_steps=3)
    commands = {
        "dog": base_args(tiny_model, subject, out, wandb_run_name="dog", **prior),
        "cat": base_args(tiny_model, second_subject, out, wandb_run_name="cat", **prior),
        "dog again": base_args(tiny_model, subject, out, wandb_run_name="dog", **prior),
    }
    # One thread each: three runs on two cores would otherwise spend their time waiting on each other's threads.
    processes = {name: subprocess.Popen([sys.executable, str(REPO / "train_dreambooth.py"), *argv], cwd=REPO,
                                        env=cli_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
                 for name, argv in commands.items()}
    outputs = {name: process.communicate(timeout=600)[0] for name, process in processes.items()}
    codes = {name: process.returncode for name, process in processes.items()}
    assert codes["cat"] == 0, outputs["cat"][-3000:]
    assert sorted([codes["dog"], codes["dog again"]]) == [0, 2], outputs
    refused = "dog" if codes["dog"] == 2 else "dog again"
    assert "'dog' is already training" in outputs[refused] and "Traceback" not in outputs[refused]
    assert RunLayout(out, "dog").adapter("unet", 3).is_dir() and RunLayout(out, "cat").adapter("unet", 3).is_dir()
    images = list_images(class_dir)
    assert [p.name for p in images] == [f"class_0000{i}.jpg" for i in range(4)]
    for image in images:
        Image.open(image).load()  # whole
    generated = sum(int(line.split("Generating ")[1].split()[0]) for text in outputs.values()
                    for line in text.splitlines() if "Generating " in line and "class images" in line)
    assert generated == 4  # each image once, by one of the runs
    assert not list(class_dir.glob(".*partial"))
