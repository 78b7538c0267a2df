"""SD3: the family (conditioning as the pipeline's encode_prompt, the preconditioned rectified-flow objective, the
single-file layout diffusers reads back), its flags and bad input, and the trainer, inference, merging and export
end to end on a tiny random pipeline of SD3.5 Medium's structure."""

import shutil
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import (assert_clean_error, assert_recipe_outputs, assert_resumes_exactly,
                           assert_stock_peft_reproduces_validation, assert_unmerged_merged_and_saved_agree, base_args,
                           planned_at_real_size, recipe_run, run_in_process)
from utils.families import Components, family_of
from utils.families.stable_diffusion_3 import StableDiffusion3
from utils.run.config import TimestepSampling

RUN = "sd3_toy"
PARTS = ("transformer", "text_encoder", "text_encoder_2")
GENERATION = dict(num_inference_steps=3, height=64, width=64, output_type="np")


# --- the family -------------------------------------------------------------------------------------------------
def test_the_sd3_family_is_read_from_model_index_json(tiny_sd3_model, tmp_path):
    family = family_of(str(tiny_sd3_model))
    assert isinstance(family, StableDiffusion3) and family.denoiser_part == "transformer"
    transformer, encoders = family.empty_models(str(tiny_sd3_model))
    assert [type(e).__name__ for e in encoders.values()] == ["CLIPTextModelWithProjection"] * 2 + ["T5EncoderModel"]
    assert all(p.device.type == "meta" for p in transformer.parameters())
    broken = tmp_path / "no-t5"
    shutil.copytree(tiny_sd3_model, broken)
    shutil.rmtree(broken / "text_encoder_3")
    with pytest.raises(Exception, match="has no text_encoder_3/ sub-folder"):
        family_of(str(broken))


def sd3_objective(tiny_sd3_model, precondition_outputs=None, weighting_scheme=None):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3_model, subfolder="scheduler")
    vae = SimpleNamespace(config=SimpleNamespace(shift_factor=0.25, scaling_factor=0.5))
    sampling = TimestepSampling(**({"weighting_scheme": weighting_scheme} if weighting_scheme else {}))
    config = SimpleNamespace(timestep_sampling=sampling, weighting_scheme=weighting_scheme,
                             precondition_outputs=precondition_outputs)
    return StableDiffusion3().objective(Components(vae=vae, denoiser=None, noise_scheduler=scheduler), config), scheduler


@pytest.mark.parametrize("precondition_outputs", [None, 0])
def test_the_objective_is_diffusers_sd3_recipe(tiny_sd3_model, precondition_outputs):
    objective, scheduler = sd3_objective(tiny_sd3_model, precondition_outputs)
    assert objective.sampling.weighting_scheme == "logit_normal"  # diffusers' SD3 default
    mean, std, eps, noise = (torch.randn(2, 4, 4, 4) for _ in range(4))
    indices = torch.tensor([0, 700])
    terms = objective.terms(mean, std, eps, noise, indices)
    latents = (mean + std * eps - 0.25) * 0.5
    sigma = scheduler.sigmas[indices].view(-1, 1, 1, 1)
    assert torch.allclose(terms.model_input, (1 - sigma) * latents + sigma * noise)
    assert torch.equal(terms.timesteps, scheduler.timesteps[indices])  # the transformer reads them as they are
    prediction = torch.randn(2, 4, 4, 4)
    predicted = objective.predict(lambda **call: (prediction,), terms.model_input, terms.timesteps, {})
    if precondition_outputs is None:  # default 1: x_t - sigma * v against the clean latents
        assert torch.allclose(terms.target, latents, atol=1e-6)
        assert torch.allclose(predicted, terms.model_input - sigma * prediction, atol=1e-6)
    else:
        assert torch.allclose(terms.target, noise - latents) and torch.equal(predicted, prediction)


def test_conditioning_is_the_pipelines_encode_prompt_and_caches_t5(tiny_sd3_model):
    from diffusers import StableDiffusion3Pipeline

    family = StableDiffusion3()
    components = family.load(str(tiny_sd3_model))
    config = SimpleNamespace(max_sequence_length=24)
    prompts = {0: "a photo of qwe toy", 1: "a photo of toy"}
    ids = family.prompt_ids(components, prompts, config)
    assert ids[0].shape == (2, 77)  # both CLIPs' ids ride in the batch; T5's are encoded once
    batch = {"keys": [(0, 0, 0), (0, 0, 1)], "input_ids": torch.stack([ids[0], ids[1]])}
    frozen = family.conditioning(components, prompts, False, "cpu", torch.float32, config)(batch)
    trained = family.conditioning(components, prompts, True, "cpu", torch.float32, config)(batch)
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model)
    embeds, _, pooled, _ = pipeline.encode_prompt(list(prompts.values()), None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=24)
    for conditioning in (frozen, trained):
        assert torch.allclose(conditioning["encoder_hidden_states"], embeds, atol=1e-5)
        assert torch.allclose(conditioning["pooled_projections"], pooled, atol=1e-5)
    assert embeds.shape == (2, 77 + 24, 96)


def test_the_stability_layout_is_the_one_diffusers_single_file_loader_reads(tiny_sd3_model):
    """Our single-file state dict, converted back by diffusers, is the transformer's own, tensor for tensor: the
    fused qkv of both streams and of attn2, the q/k norms, the last block's text half, the swapped norms."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from utils.families.sd3_layout import STABILITY
    from utils.families.transformer_layout import to_original

    state = SD3Transformer2DModel.from_pretrained(tiny_sd3_model, subfolder="transformer").state_dict()
    original = to_original(STABILITY, state)
    assert {"joint_blocks.0.x_block.attn2.qkv.weight", "joint_blocks.1.context_block.attn.qkv.bias", "pos_embed",
            "joint_blocks.0.x_block.attn.ln_q.weight"} <= set(original)
    assert not any(k.startswith("joint_blocks.1.context_block.mlp") for k in original)  # the last block's text half
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


# --- flags and bad input ------------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("flags, phrase", [
    (dict(resolution=72), "Stable Diffusion 3/3.5 trains at resolutions that are multiples of 16; got 72: use 64"),
    (dict(max_sequence_length=600), "--max_sequence_length 600: SD3's T5 reads at most 512 tokens"),
    (dict(guidance_scale=1.0), "--guidance_scale applies to FLUX.1; Stable Diffusion 3/3.5 does not read it"),
])
def test_flags_sd3_cannot_honour_are_refused_before_anything_loads(tiny_sd3_model, subject, tmp_path, flags, phrase):
    result = run_in_process(base_args(tiny_sd3_model, subject, tmp_path / "out", dry_run=True, **flags))
    assert_clean_error(result, phrase)
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_sd3_flags_on_other_families_are_refused(tiny_model, tiny_flux_model, subject, tmp_path):
    for model, family in ((tiny_model, "Stable Diffusion 1.x/2.x"), (tiny_flux_model, "FLUX.1")):
        result = run_in_process(base_args(model, subject, tmp_path / "out", dry_run=True, precondition_outputs=0))
        assert_clean_error(result, f"--precondition_outputs applies to Stable Diffusion 3/3.5; {family} does not")


@pytest.fixture(scope="module")
def sd35_configs(tmp_path_factory):
    from benchmarks.sd3_architecture import save_sd3_configs

    return save_sd3_configs(tmp_path_factory.mktemp("sd3-configs") / "sd35-large", "large")


@pytest.mark.e2e
def test_real_sd35_large_widths_pass_the_block_shape_check_and_are_planned(sd35_configs, subject, tmp_path):
    # 37 joint blocks x 8 projections + the last one's 7 (no to_add_out); both CLIPs' q and v; T5 never. Weights:
    # the transformer, the VAE and both CLIPs (trained); one row a step (the README's table counts two)
    planned_at_real_size(
        sd35_configs, subject, tmp_path / "out",
        ("model: Stable Diffusion 3/3.5, trained at 1024 px", "transformer: BOFT on 303 layers",
         "text encoder: BOFT on 24 layers", "text encoder 2: BOFT on 64 layers", "weights 16.69 GB (bf16)",
         "activations of the transformer, 1 row(s) a step at 1024 px: 14.71 GB, 0.75 GB with --gradient_checkpointing"),
        boft_block_num=0, boft_block_size=32, boft_n_butterfly_factor=2)


# --- end to end ---------------------------------------------------------------------------------------------------
def sd3_args(model, subject, root, output_dir, **extra):
    flags = dict(with_prior_preservation=True, class_data_dir=root / "class", class_prompt="a photo of toy",
                 num_class_images=2, class_inference_steps=2, train_text_encoder=True, max_train_steps=3,
                 checkpointing_steps=2, validation_steps=3, validation_prompt="a red qwe toy", num_validation_images=1,
                 validation_inference_steps=3, boft_bias="boft_only", wandb_run_name=RUN, learning_rate=1e-2,
                 boft_block_num=4, max_sequence_length=24)
    return base_args(model, subject, output_dir, **{**flags, **extra})


@pytest.fixture(scope="module")
def sd3_run(tiny_sd3_model, subject, tmp_path_factory):
    """The launcher's recipe on SD3: prior preservation (class images from the SD3 pipeline), both CLIPs trained,
    trained biases, logit-normal timesteps and preconditioned outputs (the defaults), a checkpoint at step 2 of 3,
    validation at the end."""
    return recipe_run(tmp_path_factory, "sd3_run", lambda root: sd3_args(tiny_sd3_model, subject, root, root / "out"))


@pytest.mark.e2e
def test_sd3_trains_with_prior_preservation_and_both_clips(sd3_run):
    out = sd3_run / "out"
    assert_recipe_outputs(sd3_run, PARTS, RUN)
    assert not (out / "text_encoder_3").exists()  # T5 stays frozen
    assert (out / "validation" / RUN / "3" / "00_a_red_qwe_toy_0.png").is_file()


@pytest.mark.e2e
def test_sd3_resumes_exactly(sd3_run, tiny_sd3_model, subject, tmp_path):
    out = tmp_path / "out"
    assert_resumes_exactly(sd3_run, out, sd3_args(tiny_sd3_model, subject, sd3_run, out, validation_prompt=None,
                                                  resume_from_checkpoint="latest"), PARTS, RUN)



@pytest.mark.e2e
def test_sd3_adapters_reproduce_the_validation_image_with_stock_peft(sd3_run, tiny_sd3_model):
    from diffusers import StableDiffusion3Pipeline

    assert_stock_peft_reproduces_validation(StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model), sd3_run / "out",
                                            PARTS, RUN, max_sequence_length=24, guidance_scale=4.5)



@pytest.mark.e2e
def test_sd3_unmerged_merged_and_saved_merged_give_the_same_image(sd3_run, tiny_sd3_model, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from utils.inference import BoftPipeline

    pipe = BoftPipeline.from_pretrained(tiny_sd3_model, device="cpu")
    assert pipe.load_adapter(sd3_run / "out", RUN) == 3 and set(pipe.peft_models) == set(PARTS)
    assert pipe.sampling_defaults == (40, 4.5)  # SD3.5 Medium's card (its blocks have attn2)
    assert_unmerged_merged_and_saved_agree(pipe, StableDiffusion3Pipeline, tmp_path / "merged", PARTS, RUN, 4.5,
                                           GENERATION)


@pytest.mark.e2e
def test_sd3_exports_read_back_by_diffusers(sd3_run, tiny_sd3_model, tmp_path):
    """--format lora through StableDiffusion3Pipeline.load_lora_weights and --format checkpoint through
    SD3Transformer2DModel.from_single_file give the merged weights; --format comfyui holds the fused differences."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from safetensors.torch import load_file

    from tests.test_export import merged_pipeline, run_export

    merged = merged_pipeline(tiny_sd3_model, sd3_run / "out", RUN)
    lora = run_export(tiny_sd3_model, sd3_run / "out", RUN, "lora", tmp_path / "l.safetensors", "--rank", 64,
                      "--dtype", "fp32")
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model)
    pipeline.load_lora_weights(str(lora))
    pipeline.fuse_lora(components=list(PARTS))
    for part in PARTS:  # rank 64 is above every width: exact, but for the trained biases LoRA has no term for
        expected, got = merged.state_dict_of(part), getattr(pipeline, part).state_dict()
        changed = [k for k in merged.weight_changes()[part] if k.endswith(".weight")]
        assert changed, part
        for key in changed:
            fused = got.get(key, got.get(key.replace(".weight", ".base_layer.weight")))
            assert torch.allclose(fused, expected[key], atol=1e-5), key

    single = run_export(tiny_sd3_model, sd3_run / "out", RUN, "checkpoint", tmp_path / "sd3.safetensors", "--dtype",
                        "fp32")
    transformer = SD3Transformer2DModel.from_single_file(str(single), config=str(tiny_sd3_model),
                                                         subfolder="transformer")
    expected = merged.state_dict_of("transformer")
    assert all(torch.allclose(value, expected[key], atol=1e-6) for key, value in transformer.state_dict().items())

    comfy = load_file(run_export(tiny_sd3_model, sd3_run / "out", RUN, "comfyui", tmp_path / "c.safetensors",
                                 "--dtype", "fp32"))
    changes = merged.weight_changes()["transformer"]
    parts = [f"transformer_blocks.0.attn2.{p}.weight" for p in ("to_q", "to_k", "to_v")]
    stacked = torch.cat([changes[p][1] - changes[p][0] for p in parts])
    assert torch.allclose(comfy["diffusion_model.joint_blocks.0.x_block.attn2.qkv.diff"], stacked, atol=1e-6)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in comfy)


def test_the_launcher_recipe_is_diffusers_sd3_readme(tiny_sd3_model, capsys):
    from utils import recipe

    recipe.main([str(tiny_sd3_model)])
    assert capsys.readouterr().out.split() == ["--learning_rate=4e-4", "--max_train_steps=500", "--mixed_precision=bf16",
                                               "--gradient_checkpointing"]
