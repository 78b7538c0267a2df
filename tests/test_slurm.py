"""The Slurm scripts on a real single-node Slurm (tests/slurm_cluster.py): slurm/sweep.sh trains a job array of
subjects, evaluates each and writes the table; tasks sent SIGTERM (to the batch shell, or to the job's every process)
save, are requeued and resume exactly; a task with bad input is not requeued; one subject trains on two machines (two srun tasks on the one node). Skipped, saying
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
DOG, TEAPOT, BACKPACK, BAD = 10, 27, 0, 4  # can has no photos: bad input


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        with SlurmCluster(tmp_path_factory.mktemp("slurm")) as running:
            yield running
    except Unavailable as reason:
        pytest.skip(f"no Slurm here: {reason}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny pipeline, tiny metric models, and photos for backpack, dog and teapot (none for can). The dog's and the
    teapot's photos are large, so that each of their steps takes about a second: a stop sent after their first
    checkpoint lands mid-run."""
    root = tmp_path_factory.mktemp("sweep")
    save_tiny_pipeline(root / "tiny-sd")
    dino, clip = save_tiny_metric_models(root / "metrics")
    make_synthetic_subject(root / "dataset" / "backpack", num_images=3)
    for name in ("dog", "teapot"):
        large_photos(root / "dataset" / name)
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


def stop_and_release(cluster, task: str, *how):
    """SIGTERM as `scancel --signal=TERM` `how` delivers it, then, once the task is requeued and pending again, its
    start in a few seconds: Slurm holds a requeued job for two minutes (BeginTime), which the test does not wait for,
    but not less than a second: slurmd refuses a credential issued in the second its previous run's credential was
    revoked ("Job credential revoked"), and the task then fails without starting (seen with StartTime=now)."""
    slurm(cluster, "scancel", *how, "--signal=TERM", task)
    wait_until(lambda: job_fields(cluster, task)["Restarts"] == "1", 120, f"the requeue of {task}")
    wait_until(lambda: job_fields(cluster, task)["JobState"] == "PENDING", 60, f"{task} pending again")
    slurm(cluster, "scontrol", "update", f"JobId={task}", "StartTime=now+3")


def test_a_sweep_trains_requeues_stopped_subjects_resumes_them_exactly_and_tabulates(cluster, world, tmp_path):
    root, env = world
    out, reference = tmp_path / "out", tmp_path / "reference"
    started = time.monotonic()
    ids = dict(line.split() for line in slurm(cluster, REPO / "slurm" / "sweep.sh", f"{BAD},{DOG},{BACKPACK},{TEAPOT}",
                                              *SBATCH_OVERRIDES, f"--chdir={tmp_path}",
                                              **env, OUTPUT_DIR=str(out)).splitlines())
    train = ids["train"]
    # The same subject, uninterrupted, in another output folder: what the stopped one must end with.
    slurm(cluster, "sbatch", f"--array={DOG}", *SBATCH_OVERRIDES, f"--chdir={tmp_path}",
          REPO / "slurm" / "train_subjects.sbatch", **env, OUTPUT_DIR=str(reference))

    # The dog: what --signal=B:TERM@... delivers before a time limit, SIGTERM to the batch shell alone. The teapot:
    # what `scancel --full` and preemption deliver, SIGTERM to the batch shell and every process under it.
    for name, index, how in (("dog", DOG, "--batch"), ("teapot", TEAPOT, "--full")):
        first = out / "checkpoints" / f"{name}_boft_801" / "checkpoint-2"
        wait_until(first.is_dir, 300, f"the {name}'s first checkpoint")
        stop_and_release(cluster, f"{train}_{index}", how)
    cluster.wait_until_all_ended(timeout=600)
    elapsed = time.monotonic() - started

    for index in (DOG, TEAPOT):  # each saved when stopped (not killed), was requeued once and resumed to the end
        log = (tmp_path / f"slurm-dreambooth-boft-{train}_{index}.out").read_text()
        for phrase in ("SIGTERM: passed on to the launcher", "Interrupted at step", "requeued, it resumes from it",
                       "start 1 of this task", "Resumed from", "finished"):
            assert phrase in log, (f"{phrase!r} not in:\n{log[-3000:]}\n{job_fields(cluster, f'{train}_{index}')}\n"
                                   f"{cluster.logs()}")
        task = job_fields(cluster, f"{train}_{index}")
        assert (task["JobState"], task["Restarts"]) == ("COMPLETED", "1")
        assert job_fields(cluster, f"{ids['evaluate']}_{index}")["JobState"] == "COMPLETED"
    expected, got = adapter_weights(reference, STEPS, "dog_boft_801"), adapter_weights(out, STEPS, "dog_boft_801")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)

    bad = job_fields(cluster, f"{train}_{BAD}")
    assert (bad["JobState"], bad["Restarts"], bad["ExitCode"]) == ("FAILED", "0", "2:0")
    assert "bad input (exit 2" in (tmp_path / f"slurm-dreambooth-boft-{train}_{BAD}.out").read_text()
    backpack = job_fields(cluster, f"{train}_{BACKPACK}")
    assert (backpack["JobState"], backpack["Restarts"]) == ("COMPLETED", "0")
    assert job_fields(cluster, f"{ids['evaluate']}_{BACKPACK}")["JobState"] == "COMPLETED"
    assert job_fields(cluster, f"{ids['evaluate']}_{BAD}")["JobState"] == "CANCELLED"  # its training failed

    table = (out / "sweep" / "table.md").read_text()
    for index, name in ((BACKPACK, "backpack"), (DOG, "dog"), (TEAPOT, "teapot")):
        assert f"| {index} | {name} | " in table
    assert "3 of 4 subjects scored" in table and f"- {BAD} can (can_boft_801): not trained" in table
    assert Image.open(out / "sweep" / "subjects.png").text["subjects"] == "backpack,dog,teapot"
    assert Image.open(out / "sweep" / "metrics.png").size == (720, 420)
    print(f"three-subject sweep with two requeues on Slurm: {elapsed:.0f} s")


def test_one_subject_on_two_machines(cluster, world, tmp_path):
    """Two srun tasks on the one node stand for two nodes: each launcher gets its rank from SLURM_PROCID and the
    first host of the job's node list as the main process; the two CPU processes (gloo) train one run together."""
    root, env = world
    out = tmp_path / "out"
    job = slurm(cluster, "sbatch", "--parsable", f"--array={BACKPACK}", *SBATCH_OVERRIDES, "--ntasks-per-node=2",
                f"--chdir={tmp_path}", REPO / "slurm" / "train_subjects.sbatch",
                **{**env, "OUTPUT_DIR": str(out), "ACCELERATE_ARGS": "--cpu",
                   "TRAIN_ARGS": TRAIN_ARGS.replace(f"max_train_steps={STEPS}", "max_train_steps=2")})
    job = job.strip().split(";")[0]
    cluster.wait_until_all_ended(timeout=300)
    log = (tmp_path / f"slurm-dreambooth-boft-{job}_{BACKPACK}.out").read_text()
    assert job_fields(cluster, f"{job}_{BACKPACK}")["JobState"] == "COMPLETED", log[-3000:]
    assert "Process index: 0" in log and "Process index: 1" in log and "Num processes: 2" in log
    assert "batch 1 per device x 2 process(es)" in log
    assert (out / "unet" / "2" / "backpack_boft_801" / "adapter_model.safetensors").is_file()


def test_a_submission_outside_the_repository_or_array_is_refused(cluster, world, tmp_path):
    root, env = world
    for extra, message in ((["--array=0"], "is not this repository's folder"), ([], "submit as a job array")):
        job = slurm(cluster, "sbatch", "--parsable", *SBATCH_OVERRIDES, f"--output={tmp_path}/%j.out", *extra,
                    REPO / "slurm" / "train_subjects.sbatch", **env,
                    **({"DREAMBOOTH_DIR": str(tmp_path)} if extra else {})).strip().split(";")[0]
        cluster.wait_until_all_ended(timeout=60)
        assert message in (tmp_path / f"{job}.out").read_text()
        assert job_fields(cluster, job)["ExitCode"] == "2:0"


def test_the_sweep_refuses_subjects_it_cannot_read_before_submitting_anything():
    for subjects in ("dog", "0-29:2"):
        result = subprocess.run(["bash", str(REPO / "slurm" / "sweep.sh"), subjects], cwd=REPO, env=cli_env(),
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and "usage:" in result.stderr and "train" not in result.stdout
