"""FLUX.1: the family (packing, position ids, the rectified-flow objective and its timestep draws, T5 + CLIP-L
conditioning), its flags and bad input, and the trainer, inference, merging and evaluation end to end on tiny
random FLUX.1 [dev] and [schnell] pipelines."""

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from tests.helpers import (assert_clean_error, assert_recipe_outputs, assert_resumes_exactly,
                           assert_stock_peft_reproduces_validation, assert_unmerged_merged_and_saved_agree, base_args,
                           planned_at_real_size, recipe_run, run_in_process, run_trainer)
from utils.families import Components, family_of
from utils.families.flux import Flux, image_ids, pack, unpack
from utils.run.config import TimestepSampling

RUN = "flux_toy"
PARTS = ("transformer", "text_encoder")
GENERATION = dict(num_inference_steps=3, height=64, width=64, output_type="np")


# --- the family -------------------------------------------------------------------------------------------------
def test_the_flux_family_is_read_from_model_index_json(tiny_flux_model, tmp_path):
    family = family_of(str(tiny_flux_model))
    assert isinstance(family, Flux) and family.denoiser_part == "transformer" and family.default_resolution == 1024
    transformer, encoders = family.empty_models(str(tiny_flux_model))
    assert [type(e).__name__ for e in encoders.values()] == ["CLIPTextModel", "T5EncoderModel"]
    assert all(p.device.type == "meta" for p in transformer.parameters())
    for part in ("text_encoder_2", "tokenizer_2"):
        broken = tmp_path / part
        shutil.copytree(tiny_flux_model, broken)
        shutil.rmtree(broken / part)
        with pytest.raises(Exception, match=f"has no {part}/ sub-folder"):
            family_of(str(broken))


def test_packing_and_position_ids_are_fluxs_own():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 8, 6)
    packed = pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 6))
    assert torch.equal(unpack(packed, 8, 6), latents)
    assert torch.equal(image_ids(8, 6, "cpu", torch.float32), FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu",
                                                                                                      torch.float32))


def flux_objective(tiny_flux_model, **sampling):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_flux_model, subfolder="scheduler")
    vae = SimpleNamespace(config=SimpleNamespace(shift_factor=0.25, scaling_factor=0.5))
    transformer = torch.nn.Module()  # what the objective reads of it: its config's guidance embedding
    transformer.config = SimpleNamespace(guidance_embeds=True)
    config = SimpleNamespace(timestep_sampling=TimestepSampling(**sampling), guidance_scale=None)
    return Flux().objective(Components(vae=vae, denoiser=transformer, noise_scheduler=scheduler), config), scheduler


def test_the_objective_is_rectified_flow_on_shifted_and_scaled_latents(tiny_flux_model):
    objective, scheduler = flux_objective(tiny_flux_model)
    mean, std, eps, noise = (torch.randn(2, 4, 4, 4) for _ in range(4))
    indices = torch.tensor([0, 700])
    terms = objective.terms(mean, std, eps, noise, indices)
    latents = (mean + std * eps - 0.25) * 0.5
    sigma = scheduler.sigmas[indices].view(-1, 1, 1, 1)
    assert torch.allclose(terms.model_input, (1 - sigma) * latents + sigma * noise)
    assert torch.allclose(terms.target, noise - latents)
    assert torch.equal(terms.timesteps, scheduler.timesteps[indices])  # what the transformer gets, / 1000
    assert torch.equal(terms.weight, torch.ones_like(sigma))  # "none": uniform draws, unweighted
    assert objective.guidance == 3.5  # [dev]'s guidance embedding gets diffusers' default


def test_timestep_draws_follow_the_weighting_scheme(tiny_flux_model):
    draws = {}
    for scheme in ("none", "logit_normal", "mode", "cosmap"):
        objective, _ = flux_objective(tiny_flux_model, weighting_scheme=scheme, logit_mean=1.0)
        generator = torch.Generator().manual_seed(0)
        draws[scheme] = torch.stack([objective.draw_timestep(generator) for _ in range(4000)]).float() / 1000
    assert abs(draws["none"].mean() - 0.5) < 0.02 and abs(draws["cosmap"].mean() - 0.5) < 0.02
    fractions = draws["logit_normal"].clamp(1e-3, 1 - 1e-3)
    assert abs(torch.log(fractions / (1 - fractions)).mean() - 1.0) < 0.1  # logit-normal around --logit_mean
    assert abs(draws["mode"].mean() - 0.5) < 0.02 and draws["mode"].std() < draws["none"].std()  # 1.29: the middle
    objective, _ = flux_objective(tiny_flux_model, weighting_scheme="cosmap")
    sigma = torch.tensor([0.5])
    weight = objective.terms(*(torch.zeros(1, 4, 2, 2),) * 4, torch.tensor([500])).weight.flatten()
    sigma = torch.tensor(objective.sigmas[500].item())
    assert torch.allclose(weight, 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)))


def test_conditioning_caches_t5_and_reads_clip_every_step_when_trained(tiny_flux_model):
    family = Flux()
    components = family.load(str(tiny_flux_model))
    config = SimpleNamespace(max_sequence_length=40)
    prompts = {0: "a photo of qwe toy", 1: "a photo of toy"}
    ids = family.prompt_ids(components, prompts, config)
    assert ids[0].shape == (77,)  # CLIP-L's ids ride in the batch; T5's are encoded once
    frozen = family.conditioning(components, prompts, False, "cpu", torch.float32, config)
    trained = family.conditioning(components, prompts, True, "cpu", torch.float32, config)
    batch = {"keys": [(0, 0, 0), (0, 0, 1)], "input_ids": torch.stack([ids[0], ids[1]])}
    once, every_step = frozen(batch), trained(batch)
    assert once["encoder_hidden_states"].shape == (2, 40, 32) and torch.equal(once["txt_ids"], torch.zeros(40, 3))
    assert torch.allclose(once["pooled_projections"], every_step["pooled_projections"], atol=1e-6)
    assert not torch.allclose(once["encoder_hidden_states"][0], once["encoder_hidden_states"][1])


def test_a_long_prompt_is_named_with_what_t5_cuts(tiny_flux_model, caplog):
    family = Flux()
    components = family.load(str(tiny_flux_model))
    family.prompt_ids(components, {0: "a photo of qwe toy on a long beach"}, SimpleNamespace(max_sequence_length=20))
    assert "T5 (--max_sequence_length) reads 20" in caplog.text and "long beach" in caplog.text


# --- flags and bad input ------------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("flags, phrase", [
    (dict(resolution=72), "FLUX.1 trains at resolutions that are multiples of 16; got 72: use 64"),
    (dict(max_sequence_length=600), "--max_sequence_length 600: FLUX.1's T5 reads at most 512 tokens"),
    (dict(tokenizer_name="x"), "--tokenizer_name applies to Stable Diffusion 1.x/2.x; FLUX.1 does not read it"),
])
def test_flags_flux_cannot_honour_are_refused_before_anything_loads(tiny_flux_model, subject, tmp_path, flags, phrase):
    result = run_in_process(base_args(tiny_flux_model, subject, tmp_path / "out", dry_run=True, **flags))
    assert_clean_error(result, phrase)
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_flux_flags_on_stable_diffusion_are_refused(tiny_model, subject, tmp_path):
    flow_matching = "FLUX.1, Stable Diffusion 3/3.5 and FLUX.2 [klein]"
    for flag, value, takers in (("weighting_scheme", "logit_normal", flow_matching), ("guidance_scale", 1.0, "FLUX.1"),
                                ("max_sequence_length", 77, flow_matching)):
        result = run_in_process(base_args(tiny_model, subject, tmp_path / "out", dry_run=True, **{flag: value}))
        assert_clean_error(result, f"--{flag} applies to {takers}; Stable Diffusion 1.x/2.x does not read it")


@pytest.mark.e2e
def test_guidance_for_a_model_without_its_embedding_is_a_warning(tiny_schnell_model, subject, tmp_path):
    result = run_in_process(base_args(tiny_schnell_model, subject, tmp_path / "out", guidance_scale=1.0, dry_run=True))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--guidance_scale 1 is not used" in result.stderr and "no guidance embedding" in result.stderr


@pytest.fixture(scope="module")
def flux_configs(tmp_path_factory):
    from benchmarks.flux_architecture import save_flux_configs

    return save_flux_configs(tmp_path_factory.mktemp("flux-configs") / "flux-dev")


@pytest.mark.e2e
def test_real_flux_widths_pass_the_block_shape_check_and_are_planned(flux_configs, subject, tmp_path):
    # 19 double blocks x 8 projections + 38 single blocks x 3; CLIP-L's q and v; T5 is never adapted.
    result = planned_at_real_size(
        flux_configs, subject, tmp_path / "out",
        ("model: FLUX.1, trained at 1024 px", "transformer: BOFT on 266 layers", "text encoder: BOFT on 24 layers",
         "weights 22.55 GB (bf16)", "frozen text encoders (9.1",
         "activations of the transformer, 1 row(s) a step at 1024 px: 25.63 GB, 1.53 GB with --gradient_checkpointing"),
        boft_block_num=0, boft_block_size=32, boft_n_butterfly_factor=2)
    assert "text encoder 2" not in result.stdout
    refused = run_in_process(base_args(flux_configs, subject, tmp_path / "out", boft_block_num=7, dry_run=True))
    assert refused.returncode == 2 and "--boft_block_num=7" in refused.stderr and "3072" in refused.stderr


# --- end to end ---------------------------------------------------------------------------------------------------
def flux_args(model, subject, root, output_dir, **extra):
    flags = dict(with_prior_preservation=True, class_data_dir=root / "class", class_prompt="a photo of toy",
                 num_class_images=2, class_inference_steps=2, train_text_encoder=True, max_train_steps=3,
                 checkpointing_steps=2, validation_steps=3, validation_prompt="a red qwe toy", num_validation_images=1,
                 validation_inference_steps=3, boft_bias="boft_only", wandb_run_name=RUN, learning_rate=1e-2,
                 boft_block_num=4, weighting_scheme="logit_normal", max_sequence_length=32)
    return base_args(model, subject, output_dir, **{**flags, **extra})


@pytest.fixture(scope="module")
def flux_run(tiny_flux_model, subject, tmp_path_factory):
    """The launcher's recipe on FLUX.1 [dev]: prior preservation (class images from the FLUX pipeline), CLIP-L
    trained, trained biases, logit-normal timesteps, a checkpoint at step 2 of 3, validation at the end."""
    return recipe_run(tmp_path_factory, "flux_run", lambda root: flux_args(tiny_flux_model, subject, root, root / "out"))


@pytest.mark.e2e
def test_flux_trains_with_prior_preservation_and_clip(flux_run):
    out = flux_run / "out"
    assert_recipe_outputs(flux_run, PARTS, RUN)
    assert not (out / "text_encoder_2").exists()  # T5 stays frozen
    assert (out / "validation" / RUN / "3" / "00_a_red_qwe_toy_0.png").is_file()


@pytest.mark.e2e
def test_flux_resumes_exactly(flux_run, tiny_flux_model, subject, tmp_path):
    out = tmp_path / "out"
    assert_resumes_exactly(flux_run, out, flux_args(tiny_flux_model, subject, flux_run, out, validation_prompt=None,
                                                    resume_from_checkpoint="latest"), PARTS, RUN)



@pytest.mark.e2e
def test_flux_adapters_reproduce_the_validation_image_with_stock_peft(flux_run, tiny_flux_model):
    from diffusers import FluxPipeline

    assert_stock_peft_reproduces_validation(FluxPipeline.from_pretrained(tiny_flux_model), flux_run / "out", PARTS, RUN,
                                            max_sequence_length=32)  # T5 read as in training



@pytest.mark.e2e
def test_flux_unmerged_merged_and_saved_merged_give_the_same_image(flux_run, tiny_flux_model, tmp_path):
    from diffusers import FluxPipeline

    from utils.inference import BoftPipeline

    pipe = BoftPipeline.from_pretrained(tiny_flux_model, device="cpu")
    assert pipe.load_adapter(flux_run / "out", RUN) == 3 and set(pipe.peft_models) == set(PARTS)
    assert pipe.sampling_defaults == (28, 3.5)
    assert_unmerged_merged_and_saved_agree(pipe, FluxPipeline, tmp_path / "merged", PARTS, RUN, 3.5, GENERATION)
    with pytest.raises(Exception, match="takes no negative prompt"):
        pipe.generate("a qwe toy", negative_prompt="blurry", **GENERATION)


@pytest.mark.e2e
def test_flux_inference_and_evaluate_use_the_familys_sampler(flux_run, tiny_flux_model, tmp_path):
    from utils import evaluate, inference

    image = tmp_path / "toy.png"
    inference.main(["--pretrained_model_name_or_path", str(tiny_flux_model), "--output_dir", str(flux_run / "out"),
                    "--adapter_name", RUN, "--prompt", "a qwe toy", "--resolution", "64", "--num_inference_steps", "2",
                    "--device", "cpu", "--out", str(image)])
    assert Image.open(image).size == (64, 64)
    with pytest.raises(SystemExit) as refused:
        inference.main(["--pretrained_model_name_or_path", str(tiny_flux_model), "--output_dir",
                        str(flux_run / "out"), "--adapter_name", RUN, "--prompt", "a qwe toy", "--resolution", "72",
                        "--out", str(image)])
    assert refused.value.code == 2
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a qwe toy in the snow\n")
    evaluate.main(["generate", "--pretrained_model_name_or_path", str(tiny_flux_model), "--output_dir",
                   str(flux_run / "out"), "--adapter_name", RUN, "--prompts_file", str(prompts), "--num_images", "1",
                   "--num_inference_steps", "2", "--resolution", "64"])
    folder = flux_run / "out" / "eval" / RUN / "3"
    assert Image.open(folder / "000" / "00.png").size == (64, 64)
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["scheduler"] == "FlowMatchEulerDiscreteScheduler" and settings["guidance_scale"] == 3.5


@pytest.mark.e2e
def test_schnell_trains_without_guidance(tiny_schnell_model, subject, tmp_path):
    result = run_trainer(base_args(tiny_schnell_model, subject, tmp_path / "out", boft_block_num=4,
                                   max_sequence_length=16))
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "out" / "transformer" / "2" / "dreambooth_boft" / "adapter_model.safetensors").is_file()


@pytest.mark.e2e
def test_flux_lora_export_loads_in_diffusers_and_gives_the_merged_weights(flux_run, tiny_flux_model, tmp_path):
    from diffusers import FluxPipeline

    from tests.test_export import merged_pipeline, run_export

    lora = run_export(tiny_flux_model, flux_run / "out", RUN, "lora", tmp_path / "l.safetensors", "--rank", 64,
                      "--dtype", "fp32")
    pipeline = FluxPipeline.from_pretrained(tiny_flux_model)
    pipeline.load_lora_weights(str(lora))
    pipeline.fuse_lora(components=list(PARTS))  # diffusers fuses the transformer alone unless told
    merged = merged_pipeline(tiny_flux_model, flux_run / "out", RUN)
    for part in PARTS:  # rank 64 is above every width (32): exact, but for the trained biases LoRA has no term for
        expected, got = merged.state_dict_of(part), getattr(pipeline, part).state_dict()
        changed = [k for k in expected if k.endswith(".weight") and k.rsplit(".", 1)[0] + ".lora_A.weight" in
                   {key.split(".", 1)[1] for key in load_keys(lora)}]
        assert changed, part
        for key in changed:
            fused = got.get(key, got.get(key.replace(".weight", ".base_layer.weight")))
            assert torch.allclose(fused, expected[key], atol=1e-5), key


@pytest.mark.e2e
def test_the_bfl_layout_is_the_one_diffusers_single_file_loader_reads():
    """diffusers' FLUX single-file converter assumes FLUX.1's real width (3072 and a 4 x MLP), so the layout is
    checked on a transformer of that width, one block of each kind: our BFL state dict, converted back by diffusers,
    is the transformer's own, tensor for tensor."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from utils.families.flux_layout import BFL
    from utils.families.transformer_layout import to_original

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                                             num_attention_heads=24, joint_attention_dim=64, pooled_projection_dim=32,
                                             guidance_embeds=True)
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(value.shape, generator=generator).to(torch.bfloat16)
             for name, value in transformer.state_dict().items()}  # bf16: 1 GB for one block of each kind
    original = to_original(BFL, state)
    assert "double_blocks.0.txt_attn.qkv.weight" in original and "single_blocks.0.linear1.bias" in original
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.e2e
def test_flux_exports_bfls_single_file_and_comfyuis_fused_differences(flux_run, tiny_flux_model, tmp_path):
    from safetensors.torch import load_file

    from tests.test_export import merged_pipeline, run_export
    from utils.families.flux_layout import BFL
    from utils.families.transformer_layout import layer_map

    merged = merged_pipeline(tiny_flux_model, flux_run / "out", RUN)
    out = run_export(tiny_flux_model, flux_run / "out", RUN, "checkpoint", tmp_path / "flux.safetensors", "--dtype",
                     "fp32")
    keys = set(load_file(out))
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "guidance_in.in_layer.weight",
            "double_blocks.0.img_attn.norm.query_norm.scale"} <= keys and not any("transformer_blocks" in k for k in keys)
    assert all(v.shape[0] == 3 * 32 for k, v in load_file(out).items() if k.endswith("img_attn.qkv.weight"))

    comfy = load_file(run_export(tiny_flux_model, flux_run / "out", RUN, "comfyui", tmp_path / "c.safetensors",
                                 "--dtype", "fp32"))
    changes = merged.weight_changes()["transformer"]
    _, fused = layer_map(BFL, merged.state_dict_of("transformer"))
    qkv = comfy["diffusion_model.double_blocks.0.img_attn.qkv.diff"]
    parts = fused["double_blocks.0.img_attn.qkv"]
    stacked = torch.cat([changes[f"{p}.weight"][1] - changes[f"{p}.weight"][0] for p in parts])
    assert torch.allclose(qkv, stacked, atol=1e-6)  # this pipeline's base weights come back from an un-merge
    linear1 = comfy["diffusion_model.single_blocks.0.linear1.diff"]
    assert linear1.shape == (3 * 32 + 4 * 32, 32)  # q, k, v and the MLP's input (4 x wide), stacked
    assert torch.count_nonzero(linear1[96:]) == 0 and torch.count_nonzero(linear1[:96])  # the MLP input is not adapted
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in comfy)
    assert any(k.endswith(".diff_b") for k in comfy)  # trained biases (boft_only)


def load_keys(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        return list(file.keys())


@pytest.mark.e2e
def test_the_launcher_adds_fluxs_recipe_before_the_callers_flags(tiny_flux_model, tmp_path):
    import stat
    import sys

    from tests.helpers import cli_env
    from tests.test_train_cli import launch

    record = tmp_path / "argv.txt"
    python = tmp_path / "python"  # runs utils.recipe for real, records the launch instead of training
    python.write_text(f'#!/usr/bin/env bash\nif [[ $2 == utils.recipe ]]; then exec {sys.executable} "$@"; fi\n'
                      'printf "%s\\n" "$@" > "$RECORD"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    env = cli_env(PYTHON=str(python), RECORD=str(record), MODEL_NAME=str(tiny_flux_model))
    result = launch("5", "--learning_rate=3e-4", env=env)
    assert result.returncode == 0, result.stderr
    argv = record.read_text().splitlines()
    recipe = ["--learning_rate=1e-4", "--max_train_steps=500", "--guidance_scale=1", "--mixed_precision=bf16",
              "--gradient_checkpointing"]
    start = argv.index(recipe[0])
    assert argv[start:start + len(recipe)] == recipe and argv[-1] == "--learning_rate=3e-4"  # the caller's wins
    env["MODEL_NAME"] = str(tmp_path / "missing")
    record.unlink()
    refused = launch("5", env=env)
    assert refused.returncode == 2 and "does not exist" in refused.stderr and not record.exists()  # nothing launched


@pytest.mark.e2e
def test_the_notebooks_code_generates_merges_and_exports_flux_adapters(flux_run, tiny_flux_model, tmp_path,
                                                                       monkeypatch, capsys):
    """The notebook's cells with MODEL_NAME a FLUX.1 pipeline and its defaults for steps and guidance."""
    from tests.helpers import run_notebook_cells

    run_notebook_cells(monkeypatch, dict(MODEL_NAME=str(tiny_flux_model), OUTPUT_DIR=str(flux_run / "out"), RUN_NAME=RUN,
                                         PROMPT="a qwe toy", MERGED_DIR=str(tmp_path / "merged"), RESOLUTION="64",
                                         EXPORT_FORMAT="checkpoint", EXPORT_FILE=str(tmp_path / "export.safetensors")),
                       unset=["NUM_INFERENCE_STEPS"])
    text = capsys.readouterr().out
    assert f"{RUN} at step 3" in text and f"checkpoint export of {RUN}" in text and "(FLUX.1)" in text
    assert json.loads((tmp_path / "merged" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
