"""What the tests share besides fixtures: running the project's commands as a user does, and reading what they wrote."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DREAMBOOTH = REPO.parent / "shared" / "dreambooth"


def free_ports(count: int = 1) -> list[int]:
    """Ports no one listens on now, for a launcher's main process or a cluster's daemons: tests may run side by side
    (pytest -n 2), so none takes a fixed port such as accelerate's 29500."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def readme_gpu_setup_installs() -> list[list[str]]:
    """The `pip install` commands of the README's GPU set-up, in order, but xformers (optional, CUDA only)."""
    section = (REPO / "README.md").read_text().split("### Set-up on a GPU machine", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].split() for line in block.splitlines() if line.startswith("pip install")]
    return [command for command in commands if "xformers" not in command]


def cli_env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1", **extra)
    env.pop("WANDB_API_KEY", None)
    return env


def base_args(model, subject, output_dir, **overrides) -> list[str]:
    """Flags of a small, fast run; keyword overrides replace or add flags (None drops one, True is a switch)."""
    flags = {
        "pretrained_model_name_or_path": model,
        "instance_data_dir": subject,
        "instance_prompt": "a photo of qwe toy",
        "output_dir": output_dir,
        "use_boft": True,
        "resolution": 64,
        "train_batch_size": 1,
        "max_train_steps": 2,
        "boft_block_num": 8,
        "boft_block_size": 0,
        "boft_n_butterfly_factor": 2,
        "learning_rate": 1e-3,
        "seed": 0,
        "report_to": "none",
        "num_dataloader_workers": 0,
        "no_tracemalloc": True,
    }
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        if value is None or value is False:
            continue
        argv += [f"--{key}"] if value is True else [f"--{key}", *([str(v) for v in value] if isinstance(value, list) else [str(value)])]
    return argv


def run_trainer(argv, timeout=600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "train_dreambooth.py"), *argv],
        cwd=REPO, env=cli_env(**env), capture_output=True, text=True, timeout=timeout,
    )


def assert_clean_error(result, *phrases):
    """Exit status 2, no traceback, and every phrase in the message."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for phrase in phrases:
        assert phrase in output, f"{phrase!r} not in:\n{output[-3000:]}"


# What the dependencies print on their own: any warning or traceback raised in their code (its path is printed), and
# the log lines seen from them so far. None of it may reach a user of the project (utils/quiet.py).
DEPENDENCY_NOISE = ("site-packages", "gemm_4bit", "requires torchvision", "should be kept in float32",
                    "were not passed to `accelerate launch`", "to instantiate a model of type",
                    "disabled the safety checker", "DecompressionBombWarning", "MissingIDFieldWarning")


def assert_quiet(output: str) -> None:
    noise = [line for line in output.splitlines() if any(marker in line for marker in DEPENDENCY_NOISE)]
    assert not noise, "\n".join(noise[:10])


def start_in_session(command, **env) -> subprocess.Popen:
    """Start a command as a terminal or a scheduler does: in a session (process group) of its own."""
    return subprocess.Popen([str(c) for c in command], cwd=REPO, env=cli_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(path, process, timeout=300):
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def group_ends(pgid, timeout=120) -> bool:
    """True once no process of the group is left (each one ended by itself, none orphaned)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)
    return False


def large_photos(folder, count=3, side=7000) -> Path:
    """Photos that take a loader worker about a second each to decode and resize (7000 x 7000 PNG, 0.7 MB)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    for i in range(count):
        channels = [np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side)), np.full((side, side), 60 * i, np.uint8)]
        Image.fromarray(np.stack(channels, -1)).save(folder / f"{i:02d}.png", compress_level=1)
    return folder


def process_stats():
    """(pid, the fields of /proc/PID/stat after the command name) of every process."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            yield int(stat.parent.name), stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue


def processes_in_group(pgid) -> list[int]:
    """The live processes of a process group (read from /proc: they may have been reparented)."""
    return [pid for pid, fields in process_stats() if int(fields[2]) == pgid and fields[0] != "Z"]


def adapter_weights(out, step, run="dreambooth_boft", models=("unet",)):
    from safetensors.torch import load_file

    return {f"{m}.{k}": v for m in models
            for k, v in load_file(Path(out, m, str(step), run, "adapter_model.safetensors")).items()}


def make_config(num_processes=1, num_examples=3, **overrides):
    """A real RunConfig for unit tests: the flags of a small run (overrides as in base_args) parsed and checked as the
    trainer does, then frozen with the SD 1.x/2.x family's defaults. No file is read."""
    import tempfile

    from utils.families.stable_diffusion import StableDiffusion
    from utils.run.config import RunConfig
    from utils.run.flags import parse_args

    model = overrides.pop("pretrained_model_name_or_path", "model")
    flags = parse_args(base_args(model, "photos", overrides.pop("output_dir", tempfile.gettempdir()), **overrides))
    return RunConfig.from_flags(flags, StableDiffusion(), num_processes, num_examples)


def run_in_process(argv) -> subprocess.CompletedProcess:
    """train_dreambooth.main(argv) in this process, for runs that stop before training (usage errors, --dry_run):
    the same code path as run_trainer without a subprocess's seconds of imports. stdout, stderr, log records and
    warnings are captured as a subprocess's streams would be; an unexpected exception prints its traceback there,
    as it would; the process-wide state the trainer sets (signal handlers, argv, accelerate's state) is put back."""
    import contextlib
    import io
    import logging
    import traceback
    import warnings

    from accelerate.state import AcceleratorState

    import train_dreambooth

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root, level = logging.getLogger(), logging.getLogger().level
    signals, saved_argv = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}, sys.argv[:]
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    keep_freed_memory = train_dreambooth.keep_freed_memory
    train_dreambooth.keep_freed_memory = lambda: False  # malloc settings are process-wide: not the test process's
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, category, *_, **__: err.write(f"{category.__name__}: {message}\n")
            try:
                train_dreambooth.main([str(a) for a in argv])
                code = 0
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        train_dreambooth.keep_freed_memory = keep_freed_memory
        root.removeHandler(handler)
        root.setLevel(level)
        for signum, handler_before in signals.items():
            signal.signal(signum, handler_before)
        sys.argv[:] = saved_argv
        AcceleratorState._reset_state(reset_partial_state=True)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def counting_inverses(monkeypatch) -> list:
    """The number of blocks of each Cayley inversion from now on."""
    from utils.boft import peft_seam, rotation

    calls, inverse = [], rotation.skew_inverse

    def counted(r):
        calls.append(r.shape[0])
        return inverse(r)

    monkeypatch.setattr(peft_seam, "skew_inverse", counted)  # a RotationCache's
    monkeypatch.setattr(rotation, "skew_inverse", counted)  # cayley()'s own
    return calls


def recipe_run(tmp_path_factory, name: str, args) -> Path:
    """A family's launcher-recipe run (`args(root)`: its trainer flags, writing to root / "out"), trained once for a
    module's end-to-end tests; returns root."""
    root = tmp_path_factory.mktemp(name)
    result = run_trainer(args(root))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return root


def assert_recipe_outputs(root: Path, parts, run: str, steps=(2, 3)) -> None:
    """Two class images generated, a stock peft BOFT folder for every trained part at every saved step."""
    out = root / "out"
    assert sorted(p.name for p in (root / "class").glob("class_*.jpg")) == ["class_00000.jpg", "class_00001.jpg"]
    for part in parts:
        for step in steps:
            config = json.loads((out / part / str(step) / run / "adapter_config.json").read_text())
            assert config["peft_type"] == "BOFT"


def assert_unmerged_merged_and_saved_agree(pipe, pipeline_class, merged_folder, parts, run, guidance_scale,
                                           generation) -> None:
    """A BoftPipeline with `run` loaded: its adapter changes the image; merged, and saved as a plain folder that
    `pipeline_class` loads without peft, it gives the unmerged image (within 1e-3)."""
    import numpy as np
    import torch

    unmerged = pipe.generate("a qwe toy", **generation)[0]
    pipe.set_adapter(None)
    base = pipe.generate("a qwe toy", **generation)[0]
    pipe.set_adapter(run)
    pipe.merge()
    merged = pipe.generate("a qwe toy", **generation)[0]
    saved = pipeline_class.from_pretrained(pipe.save_merged(merged_folder))
    assert not any("boft" in key for part in parts for key in getattr(saved, part).state_dict())
    image = saved(prompt="a qwe toy", guidance_scale=guidance_scale, generator=[torch.Generator().manual_seed(0)],
                  **generation).images[0]
    assert np.abs(unmerged - base).max() > 1e-2
    assert np.abs(unmerged - merged).max() <= 1e-3 and np.abs(unmerged - image).max() <= 1e-3


def assert_stock_peft_reproduces_validation(pipeline, out: Path, parts, run: str, **call) -> None:
    """`pipeline` (a diffusers pipeline loaded without peft) with stock peft's PeftModel.from_pretrained of `run`'s
    step-3 adapters on every part gives the run's validation image of "a red qwe toy" (within 2/255); `call`: the
    pipeline arguments validation used."""
    import numpy as np
    import torch
    from peft import PeftModel
    from PIL import Image

    from utils.boft import peft_seam

    peft_seam.install()
    for part in parts:
        setattr(pipeline, part, PeftModel.from_pretrained(getattr(pipeline, part), out / part / "3" / run,
                                                          adapter_name=run))
    image = pipeline(prompt="a red qwe toy", num_inference_steps=3, height=64, width=64,
                     generator=[torch.Generator().manual_seed(0)], **call).images[0]
    saved = np.asarray(Image.open(out / "validation" / run / "3" / "00_a_red_qwe_toy_0.png"), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - saved).max() <= 2


def assert_resumes_exactly(recipe_root: Path, out: Path, argv, parts, run: str) -> None:
    """A run from the recipe run's step-2 checkpoint (copied to `out` with its adapters and latent cache; `argv`:
    the recipe's flags writing to `out`, with --resume_from_checkpoint latest) ends with the adapters the
    uninterrupted run has at step 3, bit for bit."""
    import shutil

    import torch
    from safetensors.torch import load_file

    shutil.copytree(recipe_root / "out" / "checkpoints", out / "checkpoints")
    for part in parts:
        shutil.copytree(recipe_root / "out" / part / "2", out / part / "2")
    shutil.copytree(recipe_root / "out" / "latent_cache", out / "latent_cache")
    result = run_trainer(argv)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Resumed from" in result.stderr
    for part in parts:
        resumed = load_file(out / part / "3" / run / "adapter_model.safetensors")
        reference = load_file(recipe_root / "out" / part / "3" / run / "adapter_model.safetensors")
        assert resumed.keys() == reference.keys()
        assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def planned_at_real_size(configs, subject, output_dir, lines, **flags):
    """--dry_run on a folder of a real model's configurations (no weights) at its own resolution, with every text
    encoder BOFT may train (unless train_text_encoder=None), in bf16: it passes, and its plan holds every one of `lines`; returns the result."""
    flags = {"train_text_encoder": True, **flags}  # None: a family that trains no text encoder
    result = run_in_process(base_args(configs, subject, output_dir, resolution=None, dry_run=True,
                                      mixed_precision="bf16", **flags))
    assert result.returncode == 0, result.stderr[-3000:]
    for line in lines:
        assert line in result.stdout, result.stdout
    return result


def run_notebook_cells(monkeypatch, env: dict, unset=()) -> None:
    """The notebook's code cells run in this process, its parameters set from `env` (and `unset` removed) as an
    unattended run sets them."""
    import nbformat

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in unset:
        monkeypatch.delenv(name, raising=False)
    notebook = nbformat.read(REPO / "dreambooth_inference.ipynb", as_version=4)
    namespace = {}
    for cell in notebook.cells:
        if cell.cell_type == "code":
            exec(compile(cell.source, "dreambooth_inference.ipynb", "exec"), namespace)
