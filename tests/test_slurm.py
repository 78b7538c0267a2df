"""The Slurm scripts on a real single-node Slurm (tests/slurm_cluster.py): slurm/sweep.sh trains a job array of
subjects, evaluates each and writes the table; a task sent SIGTERM saves, is requeued and resumes exactly; a task
with bad input is not requeued; one subject trains on two machines (two srun tasks on the one node). Skipped, saying
why, where Slurm cannot run (not installed, not root): .ci/run installs it."""

import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from tests.helpers import REPO, adapter_weights, cli_env, large_photos
from tests.slurm_cluster import SlurmCluster, Unavailable
from utils.testing.tiny_model import make_synthetic_subject, save_tiny_metric_models, save_tiny_pipeline

pytestmark = pytest.mark.e2e  # every test here runs the project's scripts under Slurm

STEPS = 12
# The launcher's recipe, made small: 64 px, two class images, a checkpoint every 2 steps, validation at the end only.
TRAIN_ARGS = (f"--resolution=64 --num_class_images=2 --sample_batch_size=2 --max_train_steps={STEPS} "
              "--checkpointing_steps=2 --validation_steps=1000 --num_validation_images=1 --validation_inference_steps=1 "
              "--num_dataloader_workers=0 --no_tracemalloc --no_cache_latents --learning_rate=1e-3")
# The #SBATCH lines are a GPU cluster's; this node has 2 CPUs, 2 (fake) GPUs and 24 GB: what a user overrides.
SBATCH_OVERRIDES = ["--mem=2G", "--cpus-per-task=1"]
DOG, BAD, OTHERS = 10, 4, (0, 27)  # dog, can (no photos: bad input), backpack and teapot


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        with SlurmCluster(tmp_path_factory.mktemp("slurm")) as running:
            yield running
    except Unavailable as reason:
        pytest.skip(f"no Slurm here: {reason}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny pipeline, tiny metric models, and photos for backpack, dog and teapot (none for can). The dog's photos
    are large, so that each of its steps takes about a second: a stop sent after its first checkpoint lands mid-run."""
    root = tmp_path_factory.mktemp("sweep")
    save_tiny_pipeline(root / "tiny-sd")
    dino, clip = save_tiny_metric_models(root / "metrics")
    for index, name in ((0, "backpack"), (27, "teapot")):
        make_synthetic_subject(root / "dataset" / name, num_images=3, seed=index)
    large_photos(root / "dataset" / "dog")
    env = cli_env(MODEL_NAME=str(root / "tiny-sd"), DATASET_DIR=str(root / "dataset"), REPORT_TO="tensorboard",
                  CLASS_DATA_DIR=str(root / "class"), TRAIN_ARGS=TRAIN_ARGS, EVAL_IMAGES="1",
                  EVAL_ARGS="--num_inference_steps 2 --resolution 64", SCORE_ARGS=f"--dino_model {dino} --clip_model {clip}",
                  PYTHON=sys.executable)
    return root, env


def slurm(cluster, *command, **env) -> str:
    result = subprocess.run([str(c) for c in command], cwd=REPO, env=cluster.env(**env), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def job_fields(cluster, job: str) -> dict:
    """scontrol's record of a job or array task (kept MinJobAge=600 s after it ends)."""
    line = slurm(cluster, "scontrol", "show", "job", "-o", job)
    return dict(field.split("=", 1) for field in line.split() if "=" in field)


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout} s"
        time.sleep(0.2)


def test_a_sweep_trains_requeues_a_stopped_subject_resumes_it_exactly_and_tabulates(cluster, world, tmp_path):
    root, env = world
    out, reference = tmp_path / "out", tmp_path / "reference"
    started = time.monotonic()
    ids = dict(line.split() for line in slurm(cluster, REPO / "slurm" / "sweep.sh", f"{BAD},{DOG},{OTHERS[0]},{OTHERS[1]}",
                                              *SBATCH_OVERRIDES, f"--chdir={tmp_path}",
                                              **env, OUTPUT_DIR=str(out)).splitlines())
    train = ids["train"]
    # The same subject, uninterrupted, in another output folder: what the stopped one must end with.
    slurm(cluster, "sbatch", f"--array={DOG}", *SBATCH_OVERRIDES, f"--chdir={tmp_path}",
          REPO / "slurm" / "train_subjects.sbatch", **env, OUTPUT_DIR=str(reference))

    dog_run = out / "checkpoints" / "dog_boft_801"
    wait_until(lambda: (dog_run / "checkpoint-2").is_dir(), 300, "the dog's first checkpoint")
    # What --signal=B:TERM@... delivers before a time limit: SIGTERM to the batch shell alone.
    slurm(cluster, "scancel", "--batch", "--signal=TERM", f"{train}_{DOG}")
    wait_until(lambda: job_fields(cluster, f"{train}_{DOG}")["Restarts"] == "1", 120, "the requeue")
    # Slurm holds a requeued job for two minutes (BeginTime); the test does not wait for that.
    wait_until(lambda: job_fields(cluster, f"{train}_{DOG}")["JobState"] == "PENDING", 60, "the pending requeued task")
    slurm(cluster, "scontrol", "update", f"JobId={train}_{DOG}", "StartTime=now")
    cluster.wait_until_empty(timeout=600)
    elapsed = time.monotonic() - started

    dog_log = (tmp_path / f"slurm-dreambooth-boft-{train}_{DOG}.out").read_text()
    assert "SIGTERM: passed on to the job step" in dog_log and "requeued, it resumes from it" in dog_log, dog_log[-3000:]
    assert "start 1 of this task" in dog_log and "Resumed from" in dog_log and "finished" in dog_log, dog_log[-3000:]
    dog = job_fields(cluster, f"{train}_{DOG}")
    assert (dog["JobState"], dog["Restarts"]) == ("COMPLETED", "1")
    expected, got = adapter_weights(reference, STEPS, "dog_boft_801"), adapter_weights(out, STEPS, "dog_boft_801")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)

    bad = job_fields(cluster, f"{train}_{BAD}")
    assert (bad["JobState"], bad["Restarts"], bad["ExitCode"]) == ("FAILED", "0", "2:0")
    assert "bad input (exit 2" in (tmp_path / f"slurm-dreambooth-boft-{train}_{BAD}.out").read_text()
    for index in OTHERS:
        task = job_fields(cluster, f"{train}_{index}")
        assert (task["JobState"], task["Restarts"]) == ("COMPLETED", "0")
        assert job_fields(cluster, f"{ids['evaluate']}_{index}")["JobState"] == "COMPLETED"
    assert job_fields(cluster, f"{ids['evaluate']}_{BAD}")["JobState"] == "CANCELLED"  # its training failed

    table = (out / "sweep" / "table.md").read_text()
    for index, name in ((0, "backpack"), (DOG, "dog"), (27, "teapot")):
        assert f"| {index} | {name} | " in table
    assert "3 of 4 subjects scored" in table and f"- {BAD} can (can_boft_801): not trained" in table
    assert Image.open(out / "sweep" / "subjects.png").text["subjects"] == "backpack,dog,teapot"
    assert Image.open(out / "sweep" / "metrics.png").size == (720, 420)
    print(f"three-subject sweep with a requeue on Slurm: {elapsed:.0f} s")


def test_one_subject_on_two_machines(cluster, world, tmp_path):
    """Two srun tasks on the one node stand for two nodes: each launcher gets its rank from SLURM_PROCID and the
    first host of the job's node list as the main process; the two CPU processes (gloo) train one run together."""
    root, env = world
    out = tmp_path / "out"
    job = slurm(cluster, "sbatch", "--parsable", f"--array={OTHERS[0]}", *SBATCH_OVERRIDES, "--ntasks-per-node=2",
                f"--chdir={tmp_path}", REPO / "slurm" / "train_subjects.sbatch",
                **{**env, "OUTPUT_DIR": str(out), "ACCELERATE_ARGS": "--cpu",
                   "TRAIN_ARGS": TRAIN_ARGS.replace(f"max_train_steps={STEPS}", "max_train_steps=2")})
    job = job.strip().split(";")[0]
    cluster.wait_until_empty(timeout=300)
    log = (tmp_path / f"slurm-dreambooth-boft-{job}_{OTHERS[0]}.out").read_text()
    assert job_fields(cluster, f"{job}_{OTHERS[0]}")["JobState"] == "COMPLETED", log[-3000:]
    assert "Process index: 0" in log and "Process index: 1" in log and "Num processes: 2" in log
    assert "batch 1 per device x 2 process(es)" in log
    assert (out / "unet" / "2" / "backpack_boft_801" / "adapter_model.safetensors").is_file()


def test_a_submission_outside_the_repository_or_array_is_refused(cluster, world, tmp_path):
    root, env = world
    for extra, message in ((["--array=0"], "is not this repository's folder"), ([], "submit as a job array")):
        job = slurm(cluster, "sbatch", "--parsable", *SBATCH_OVERRIDES, f"--output={tmp_path}/%j.out", *extra,
                    REPO / "slurm" / "train_subjects.sbatch", **env,
                    **({"DREAMBOOTH_DIR": str(tmp_path)} if extra else {})).strip().split(";")[0]
        cluster.wait_until_empty(timeout=60)
        assert message in (tmp_path / f"{job}.out").read_text()
        assert job_fields(cluster, job)["ExitCode"] == "2:0"


def test_the_sweep_refuses_subjects_it_cannot_read_before_submitting_anything():
    for subjects in ("dog", "0-29:2"):
        result = subprocess.run(["bash", str(REPO / "slurm" / "sweep.sh"), subjects], cwd=REPO, env=cli_env(),
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and "usage:" in result.stderr and "train" not in result.stdout
