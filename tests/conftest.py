"""Fixtures built once per session (the tiny pipelines, a synthetic subject) and the e2e marker; helpers.py has the
CLI runner and the other shared functions."""

import os
from pathlib import Path

import pytest

from tests.helpers import REPO, base_args, readme_gpu_setup_installs, run_trainer
from utils.testing.tiny_model import make_synthetic_subject, save_tiny_metric_models, save_tiny_pipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_v_model(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd-v", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_xl_model(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", family="sdxl")


@pytest.fixture(scope="session")
def tiny_flux_model(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-flux", family="flux")


@pytest.fixture(scope="session")
def tiny_schnell_model(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-flux-schnell", family="flux-schnell")


@pytest.fixture(scope="session")
def tiny_sd3_model(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd3", family="sd3")


@pytest.fixture(scope="session")
def tiny_klein_model(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-klein", family="klein")


@pytest.fixture(scope="session")
def subject(tmp_path_factory) -> Path:
    return make_synthetic_subject(tmp_path_factory.mktemp("subject") / "toy", num_images=3)


@pytest.fixture(scope="session")
def trained(tiny_model, subject, tmp_path_factory):
    """Two subjects in one output folder, both with trained biases as the launcher trains them: 'toy' with both
    adapters (2 factors, biases of the BOFT layers; steps 2 and 3 saved), 'teapot' with a UNet adapter only (every
    bias trained). Shared by the inference and evaluation tests."""
    out = tmp_path_factory.mktemp("inference") / "out"
    for name, extra in (("toy", dict(train_text_encoder=True, max_train_steps=3, checkpointing_steps=2,
                                     boft_bias="boft_only")),
                        ("teapot", dict(boft_n_butterfly_factor=1, boft_block_num=4, seed=1, boft_bias="all"))):
        result = run_trainer(base_args(tiny_model, subject, out, wandb_run_name=name, learning_rate=1e-2, **extra))
        assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def gpu_setup_venv(tmp_path_factory) -> Path:
    """A fresh venv made with the pip commands of the README's GPU set-up. The torch the suite runs with stands for
    the user's CUDA build, already there as on a GPU machine: the venv sees it through a .pth file (its files
    linked, not copied: pip never uninstalls outside the environment), so the README's `pip install torch` finds
    it installed and the lock installs everything else, as it does beside a CUDA torch."""
    import subprocess
    import sys
    import sysconfig

    import torch

    root = tmp_path_factory.mktemp("gpu-setup")
    venv, users_torch = root / "venv", root / "users-torch"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site_packages = Path(torch.__file__).parents[1]
    users_torch.mkdir()
    for entry in site_packages.iterdir():
        if entry.name in ("torch", "torchgen", "functorch") or (entry.name.startswith("torch-")
                                                                 and entry.name.endswith(".dist-info")):
            (users_torch / entry.name).symlink_to(entry)
    venv_site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (venv_site / "users-torch.pth").write_text(f"{users_torch}\n")
    for command in readme_gpu_setup_installs():
        command = [f"torch=={torch.__version__.split('+')[0]}" if word == "torch" else word for word in command]
        command.append("--no-compile")  # what is installed is the same; the notebook compiles what it imports (-20 s)
        subprocess.run([str(venv / "bin" / command[0]), *command[1:]], cwd=REPO, check=True, timeout=900,
                       stdout=subprocess.DEVNULL)
    return venv


@pytest.fixture(scope="session")
def metric_models(tmp_path_factory):
    """Tiny random DINO and CLIP models for the DreamBooth metrics."""
    return save_tiny_metric_models(tmp_path_factory.mktemp("metrics"))


# The layers: a test (or a whole module, with pytestmark) marked e2e runs a command of the project in a subprocess or
# uses a fixture that trains; `make test-fast` runs the rest (pytest -m "not e2e"), the unit layer. A unit test that
# starts a process or asks for a trained fixture fails, saying to mark it: the split is declared, and checked.
TRAINED_FIXTURES = {"trained", "full_run", "two_process_run", "launcher_reference", "xl_run"}


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: runs a command of the project in a subprocess or uses a trained fixture "
                                       "(not in make test-fast)")
    share_the_cores()


def share_the_cores():
    """Under pytest -n N (make test) each worker, and every process it starts, gets its share of the cores: torch's
    default of one thread per core in each would have 2N threads wait on each other's cores, which slows small
    operations many times over (two workers measured hardly faster than one process)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


# The module that takes longest by far (a Slurm cluster and its sweep, about two and a half minutes): it starts
# first, so that under pytest -n 2 the other worker's modules fill that time rather than waiting at the end.
LONGEST_MODULE = "test_slurm.py"


def pytest_collection_modifyitems(items):
    unmarked = [f"{item.nodeid} ({', '.join(sorted(TRAINED_FIXTURES & set(item.fixturenames)))})" for item in items
                if "e2e" not in item.keywords and TRAINED_FIXTURES & set(item.fixturenames)]
    if unmarked:
        raise pytest.UsageError("unit tests that use a trained fixture; mark them e2e:\n  " + "\n  ".join(unmarked))
    longest_first(items)


def longest_first(items):
    """Modules in the order that keeps the workers of pytest -n 2 (make test) busy to the end: the longest module,
    then the modules with end-to-end tests, then the unit-only ones (short: they fill the last minutes). Each module's
    tests stay together and in their order, so its module fixtures are built once."""
    modules = {}
    for item in items:
        modules.setdefault(item.path, []).append(item)

    def weight(path):
        return (path.name != LONGEST_MODULE, not any("e2e" in item.keywords for item in modules[path]))

    items[:] = [item for path in sorted(modules, key=weight) for item in modules[path]]


@pytest.fixture(autouse=True)
def unit_tests_start_no_process(request, monkeypatch):
    if "e2e" in request.keywords:
        return
    import subprocess

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} is a unit test and started a process: mark it e2e")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
