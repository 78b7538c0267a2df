"""utils.export: single-file checkpoints, LyCORIS full differences and LoRA extraction, for SD 1.x/2.x (SDXL's
round trips are in test_sdxl.py); the key mapping of utils/original_layout.py."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from utils import export
from utils.families import family_of
from utils.inference import BoftPipeline
from utils.original_layout import kohya_name, unet_to_original, vae_to_original

GENERATION = dict(num_inference_steps=3, height=64, width=64, output_type="np", guidance_scale=7.5)


def run_export(model, out_dir, adapter, fmt, out, *extra):
    export.main(["--pretrained_model_name_or_path", str(model), "--output_dir", str(out_dir), "--adapter_name",
                 adapter, "--format", fmt, "--out", str(out), *map(str, extra)])
    return out


def merged_pipeline(model, out_dir, adapter):
    pipe = BoftPipeline.from_pretrained(model, device="cpu", scheduler="pipeline")
    pipe.load_adapter(out_dir, adapter)
    pipe.merge()
    return pipe


def assert_same_weights(pipe, loaded, parts):
    for part in parts:
        expected, got = pipe.state_dict_of(part), getattr(loaded, part).state_dict()
        assert set(expected) <= set(got), (part, sorted(set(expected) - set(got))[:5])
        assert all(torch.equal(expected[k].float(), got[k].float()) for k in expected), part


def test_the_key_mapping_is_one_to_one_and_keeps_shapes(tiny_model):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    for model, convert in ((pipeline.unet, unet_to_original), (pipeline.vae, vae_to_original)):
        state = model.state_dict()
        converted = convert(state, model)
        assert len(converted) == len(state)  # no two parameters share a name
        assert sorted(v.numel() for v in converted.values()) == sorted(v.numel() for v in state.values())
    names = unet_to_original(pipeline.unet.state_dict(), pipeline.unet)
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in names
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in names and "model.diffusion_model.out.2.bias" in names


@pytest.mark.e2e
def test_checkpoint_loads_with_from_single_file_and_gives_the_merged_image(trained, tiny_model, tmp_path):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    out = run_export(tiny_model, trained, "toy", "checkpoint", tmp_path / "toy.safetensors", "--dtype", "fp32")
    with safe_open(out, "pt") as file:
        keys = set(file.keys())
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_model), local_files_only=True,
                                                      safety_checker=None)
    pipe = merged_pipeline(tiny_model, trained, "toy")
    assert_same_weights(pipe, loaded, ("unet", "vae", "text_encoder"))
    assert len(keys) == sum(len(pipe.state_dict_of(p)) for p in ("unet", "vae", "text_encoder"))  # nothing left over
    pipe.pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipe.pipeline.scheduler.config)
    loaded.scheduler = DPMSolverMultistepScheduler.from_config(loaded.scheduler.config)
    expected = pipe.generate("a qwe toy", **GENERATION)[0]
    image = loaded("a qwe toy", generator=[torch.Generator().manual_seed(0)], **GENERATION).images[0]
    assert np.abs(expected - image).max() <= 2 / 255


@pytest.mark.e2e
def test_an_sd2_text_encoder_is_written_in_open_clip_names(trained, tiny_model, tmp_path):
    """SD 2.x's text encoder is OpenCLIP's: fused query-key-value projections under cond_stage_model.model."""
    from diffusers import StableDiffusionPipeline

    sd2 = tmp_path / "tiny-sd2"
    shutil.copytree(tiny_model, sd2)
    config = json.loads((sd2 / "text_encoder" / "config.json").read_text())
    (sd2 / "text_encoder" / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    out = run_export(sd2, trained, "toy", "checkpoint", tmp_path / "toy.safetensors", "--dtype", "fp32")
    keys = set(load_file(out))
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(sd2), local_files_only=True,
                                                      safety_checker=None)
    assert_same_weights(merged_pipeline(sd2, trained, "toy"), loaded, ("unet", "text_encoder"))


@pytest.mark.e2e
def test_comfyui_differences_reproduce_the_merged_weights_under_kohya_names(trained, tiny_model, tmp_path):
    out = run_export(tiny_model, trained, "toy", "comfyui", tmp_path / "toy.safetensors", "--dtype", "fp32")
    tensors = load_file(out)
    with safe_open(out, "pt") as file:
        metadata = file.metadata()
    assert metadata["ss_network_module"] == "lycoris.kohya" and json.loads(metadata["ss_network_args"]) == {"algo": "full"}
    base = BoftPipeline.from_pretrained(tiny_model, device="cpu", scheduler="pipeline").pipeline
    merged = merged_pipeline(tiny_model, trained, "toy")
    family = family_of(str(tiny_model))
    modules = {kohya_name(family.kohya_prefixes[part], name): (part, name) for part in ("unet", "text_encoder")
               for name, _ in getattr(base, part).named_modules() if name}
    assert any(k.endswith(".diff_b") for k in tensors)  # the trained biases (--boft_bias boft_only)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in tensors)
    for key, difference in tensors.items():
        module, suffix = key.rsplit(".", 1)
        part, name = modules[module]  # every key names a module of the model
        parameter = f"{name}.{'bias' if suffix == 'diff_b' else 'weight'}"
        expected = merged.state_dict_of(part)[parameter]
        assert (getattr(base, part).state_dict()[parameter] + difference - expected).abs().max() <= 1e-6


@pytest.mark.e2e
def test_lora_loads_in_diffusers_and_its_reported_error_is_what_it_gives(trained, tiny_model, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    merged = merged_pipeline(tiny_model, trained, "toy")  # UNet and text encoder adapters, biases trained
    parts = ("unet", "text_encoder")
    for rank in (2, 10_000):  # lossy, then full rank (capped at the widest layer's)
        out = run_export(tiny_model, trained, "toy", "lora", tmp_path / f"r{rank}.safetensors", "--rank", rank,
                         "--dtype", "fp32")
        printed = capsys.readouterr().out
        reported = float(printed.split("overall relative error of the rank-")[1].split(":")[1].split()[0])
        assert "trained bias(es) left out" in printed
        pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
        base = {p: {k: v.clone() for k, v in getattr(pipeline, p).state_dict().items()} for p in parts}
        pipeline.load_lora_weights(str(out))
        pipeline.fuse_lora(components=list(parts))
        pipeline.unload_lora_weights()
        residual = total = 0.0
        for part in parts:
            fused, target = getattr(pipeline, part).state_dict(), merged.state_dict_of(part)
            changed = [k for k in target if k.endswith(".weight") and not torch.equal(base[part][k], target[k])]
            assert changed, part
            residual += sum((fused[k] - target[k]).double().norm() ** 2 for k in changed)
            total += sum((target[k] - base[part][k]).double().norm() ** 2 for k in changed)
            if rank > 2:
                assert all((fused[k] - target[k]).abs().max() <= 1e-5 for k in changed), part
        assert abs((residual / total) ** 0.5 - reported) <= 1e-3
        assert reported > 0.01 if rank == 2 else reported < 1e-5


@pytest.mark.e2e
def test_mistakes_are_refused_before_anything_loads(trained, tiny_model, tmp_path, capsys):
    common = ["--pretrained_model_name_or_path", str(tiny_model), "--output_dir", str(trained)]
    existing = tmp_path / "there.safetensors"
    existing.write_bytes(b"keep")
    other_family = tmp_path / "kandinsky"
    shutil.copytree(tiny_model, other_family)
    index = json.loads((other_family / "model_index.json").read_text())
    (other_family / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    cases = [
        (["--adapter_name", "toy", "--format", "checkpoint", "--out", tmp_path / "a.safetensors",
          "--pretrained_model_name_or_path", other_family], "is a KandinskyPipeline; this trainer supports"),
        (["--adapter_name", "nobody", "--format", "comfyui", "--out", tmp_path / "a.safetensors"], "no adapter named 'nobody'"),
        (["--adapter_name", "toy", "--step", "7", "--format", "comfyui", "--out", tmp_path / "a.safetensors"], "has no step 7"),
        (["--adapter_name", "toy", "--format", "comfyui", "--out", existing], "exists; pass --overwrite"),
        (["--adapter_name", "toy", "--format", "lora", "--out", tmp_path / "a.safetensors"], "--format lora needs --rank"),
        (["--adapter_name", "toy", "--format", "checkpoint", "--rank", "4", "--out", tmp_path / "a.safetensors"],
         "--rank applies to --format lora only"),
        (["--adapter_name", "toy", "--format", "comfyui", "--out", tmp_path / "a.ckpt"], "ending in .safetensors"),
    ]
    for argv, phrase in cases:
        with pytest.raises(SystemExit) as exit:
            export.main(common + [str(a) for a in argv])
        assert exit.value.code == 2 and phrase in capsys.readouterr().err, phrase
    assert existing.read_bytes() == b"keep" and not list(tmp_path.glob("a.*"))
