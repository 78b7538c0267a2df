"""FLUX.2 [klein]: the family (patchified latents normalised by the VAE's batch norm, position ids and Qwen3's
conditioning as the pipeline makes them, BFL's single-file layout as diffusers reads it back), its flags and bad
input, and the trainer, inference, merging and export end to end on a tiny random pipeline of klein base's
structure."""

import logging
import shutil
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import (assert_clean_error, assert_recipe_outputs, assert_resumes_exactly,
                           assert_stock_peft_reproduces_validation, assert_unmerged_merged_and_saved_agree, base_args,
                           planned_at_real_size, recipe_run, run_in_process)
from utils.families import Components, family_of
from utils.families import flux2_klein
from utils.families.flux2_klein import Flux2Klein
from utils.run.config import TimestepSampling

RUN = "klein_toy"
PARTS = ("transformer",)
GENERATION = dict(num_inference_steps=3, height=64, width=64, output_type="np")


# --- the family -------------------------------------------------------------------------------------------------
def test_the_klein_family_is_read_from_model_index_json(tiny_klein_model, tmp_path):
    family = family_of(str(tiny_klein_model))
    assert isinstance(family, Flux2Klein) and family.denoiser_part == "transformer"
    transformer, encoders = family.empty_models(str(tiny_klein_model))
    assert [type(e).__name__ for e in encoders.values()] == ["Qwen3ForCausalLM"]
    assert all(p.device.type == "meta" for p in transformer.parameters())
    broken = tmp_path / "no-qwen"
    shutil.copytree(tiny_klein_model, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(Exception, match="has no text_encoder/ sub-folder"):
        family_of(str(broken))


def test_patches_tokens_and_position_ids_are_the_pipelines():
    from diffusers import Flux2KleinPipeline

    latents = torch.randn(2, 4, 6, 8)
    patched = flux2_klein.patchify(latents)
    assert torch.equal(patched, Flux2KleinPipeline._patchify_latents(latents))
    assert torch.equal(flux2_klein.pack(patched), Flux2KleinPipeline._pack_latents(patched))
    assert torch.equal(flux2_klein.unpack(flux2_klein.pack(patched), 3, 4), patched)
    assert torch.equal(flux2_klein.image_ids(3, 4, "cpu"), Flux2KleinPipeline._prepare_latent_ids(patched)[0])
    embeds = torch.zeros(1, 5, 8)
    assert torch.equal(flux2_klein.text_ids(5, "cpu"), Flux2KleinPipeline._prepare_text_ids(embeds)[0])


def klein_objective(tiny_klein_model):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_klein_model, subfolder="scheduler")
    vae = AutoencoderKLFlux2.from_pretrained(tiny_klein_model, subfolder="vae")
    config = SimpleNamespace(timestep_sampling=TimestepSampling())
    objective = Flux2Klein().objective(Components(vae=vae, denoiser=None, noise_scheduler=scheduler), config)
    return objective, scheduler, vae


def test_the_objective_is_rectified_flow_on_latents_normalised_by_the_vaes_batch_norm(tiny_klein_model):
    """As diffusers' klein script: patchify, (x - running mean) / sqrt(running var + eps), x_t = (1 - s) x + s eps,
    target eps - x; the transformer reads tokens, timestep / 1000 and no guidance."""
    from diffusers import Flux2KleinPipeline

    objective, scheduler, vae = klein_objective(tiny_klein_model)
    mean, std, eps, noise = (torch.randn(2, 4, 4, 4) for _ in range(4))
    indices = torch.tensor([0, 700])
    terms = objective.terms(mean, std, eps, noise, indices)
    bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
    bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    assert not torch.allclose(bn_mean, torch.zeros_like(bn_mean))  # the tiny VAE's statistics show
    latents = (Flux2KleinPipeline._patchify_latents(mean + std * eps) - bn_mean) / bn_std
    patched_noise = Flux2KleinPipeline._patchify_latents(noise)
    sigma = scheduler.sigmas[indices].view(-1, 1, 1, 1)
    assert terms.model_input.shape == (2, 16, 2, 2)
    assert torch.allclose(terms.model_input, (1 - sigma) * latents + sigma * patched_noise, atol=1e-6)
    assert torch.allclose(terms.target, patched_noise - latents, atol=1e-6)
    assert torch.equal(terms.timesteps, scheduler.timesteps[indices])
    calls = []

    def transformer(**call):
        calls.append(call)
        return (call["hidden_states"] * 2,)

    predicted = objective.predict(transformer, terms.model_input, terms.timesteps, {"encoder_hidden_states": 0})
    assert torch.allclose(predicted, terms.model_input * 2)
    assert calls[0]["guidance"] is None and torch.equal(calls[0]["timestep"], terms.timesteps / 1000)
    assert calls[0]["img_ids"].shape == (4, 4)


def test_conditioning_is_the_pipelines_encode_prompt(tiny_klein_model):
    from diffusers import Flux2KleinPipeline

    family = Flux2Klein()
    components = family.load(str(tiny_klein_model))
    config = SimpleNamespace(max_sequence_length=40)
    prompts = {0: "a photo of qwe toy", 1: "a photo of toy"}
    ids = family.prompt_ids(components, prompts, config)
    assert ids[0].shape == (40,)
    batch = {"keys": [(0, 0, 1), (0, 0, 0)], "input_ids": torch.stack([ids[1], ids[0]])}
    conditioning = family.conditioning(components, prompts, False, "cpu", torch.float32, config)(batch)
    pipeline = Flux2KleinPipeline.from_pretrained(tiny_klein_model)
    embeds, text_ids = pipeline.encode_prompt([prompts[1], prompts[0]], device="cpu", max_sequence_length=40)
    assert torch.allclose(conditioning["encoder_hidden_states"], embeds, atol=1e-6)
    assert embeds.shape == (2, 40, 48)  # three layers of Qwen3 (16 wide) side by side
    assert torch.equal(conditioning["txt_ids"], text_ids[0])


def test_a_long_prompt_is_named_with_what_the_cut_chat_template_loses(tiny_klein_model, caplog):
    family = Flux2Klein()
    components = family.load(str(tiny_klein_model))
    with caplog.at_level(logging.WARNING):
        family.prompt_ids(components, {0: "a photo of qwe toy on a red chair"}, SimpleNamespace(max_sequence_length=20))
    assert len(caplog.records) == 1  # said once
    message = caplog.records[0].getMessage()
    # the tiny tokenizer reads a character a token; "<|im_start|>user\n" opens the template: 6 tokens
    assert message.startswith("--instance_prompt is 67 tokens long in Qwen3's chat template; --max_sequence_length 20")
    assert message.endswith("keeps 14 of its 33 tokens and loses ' toy on a red chair'")


def test_the_bfl_layout_is_the_one_diffusers_single_file_loader_reads(tiny_klein_model):
    """Our single-file state dict, converted back by diffusers, is the transformer's own, tensor for tensor: the
    double blocks' fused qkv, the single blocks' fused layers, the modulations, the swapped final norm."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    from utils.families.transformer_layout import to_original

    state = Flux2Transformer2DModel.from_pretrained(tiny_klein_model, subfolder="transformer").state_dict()
    original = to_original(flux2_klein.BFL_FLUX2, state)
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
            "double_stream_modulation_img.lin.weight", "double_blocks.0.txt_attn.norm.key_norm.scale"} <= set(original)
    back = convert_flux2_transformer_checkpoint_to_diffusers(dict(original))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_a_distilled_model_samples_as_its_card_says_in_validation_too(tiny_klein_model, tmp_path):
    """Validation's pipeline is built from the run's components, which lose model_index.json's is_distilled: the
    family passes the distilled model's guidance (1: no unconditional pass) itself."""
    import json

    from diffusers import Flux2KleinPipeline

    distilled = tmp_path / "klein-distilled"
    shutil.copytree(tiny_klein_model, distilled)
    index = json.loads((distilled / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    family = Flux2Klein()
    config = SimpleNamespace(pretrained_model_name_or_path=str(distilled), revision=None, max_sequence_length=None)
    assert family.generation_arguments(config) == {"max_sequence_length": 512, "guidance_scale": 1.0}
    assert family.sampling_defaults(Flux2KleinPipeline.from_pretrained(distilled)) == (4, 1.0)
    base = SimpleNamespace(pretrained_model_name_or_path=str(tiny_klein_model), revision=None, max_sequence_length=40)
    assert family.generation_arguments(base) == {"max_sequence_length": 40, "guidance_scale": 4.0}


def test_the_launcher_recipe_is_pefts_image_generation_benchmark(tiny_klein_model, capsys):
    from utils import recipe

    recipe.main([str(tiny_klein_model)])
    assert capsys.readouterr().out.split() == ["--learning_rate=1e-4", "--max_train_steps=750", "--resolution=512",
                                               "--train_batch_size=2", "--boft_dropout=0", "--mixed_precision=bf16",
                                               "--gradient_checkpointing"]


# --- flags and bad input ------------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("flags, phrase", [
    (dict(resolution=72), "FLUX.2 [klein] trains at resolutions that are multiples of 16; got 72: use 64"),
    (dict(max_sequence_length=600), "--max_sequence_length 600: FLUX.2 [klein]'s pipeline reads at most 512 tokens"),
    (dict(train_text_encoder=True), "--train_text_encoder: FLUX.2 [klein]'s text encoder (Qwen3) stays frozen"),
    (dict(guidance_scale=1.0), "--guidance_scale applies to FLUX.1; FLUX.2 [klein] does not read it"),
    (dict(pretrained_vae_model_name_or_path="{model}/transformer"),
     "holds a Flux2Transformer2DModel, not an AutoencoderKLFlux2 (the VAE FLUX.2 [klein] decodes with)"),
])
def test_flags_klein_cannot_honour_are_refused_before_anything_loads(tiny_klein_model, subject, tmp_path, flags,
                                                                     phrase):
    flags = {k: v.format(model=tiny_klein_model) if isinstance(v, str) else v for k, v in flags.items()}
    result = run_in_process(base_args(tiny_klein_model, subject, tmp_path / "out", dry_run=True, **flags))
    assert_clean_error(result, phrase)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def klein_configs(tmp_path_factory):
    from benchmarks.klein_architecture import save_klein_configs

    return save_klein_configs(tmp_path_factory.mktemp("klein-configs") / "klein-base-4b", "4b")


@pytest.mark.e2e
def test_real_klein_4b_widths_pass_the_block_shape_check_and_are_planned(klein_configs, subject, tmp_path):
    # PEFT's benchmark layers: 5 double blocks x (8 attention projections + 4 MLP layers) + 20 single blocks' fused
    # input; the transformer and the VAE resident in bf16, Qwen3-4B offloaded once the prompts are encoded
    planned_at_real_size(
        klein_configs, subject, tmp_path / "out",
        ("model: FLUX.2 [klein], trained at 1024 px", "transformer: BOFT on 80 layers", "weights 7.38 GB (bf16)",
         "the frozen text encoders (8.22 GB) leave it",
         "activations of the transformer, 1 row(s) a step at 1024 px: 13.84 GB, 0.68 GB with --gradient_checkpointing"),
        train_text_encoder=None, boft_block_num=0, boft_block_size=32, boft_n_butterfly_factor=2)


# --- end to end ---------------------------------------------------------------------------------------------------
def klein_args(model, subject, root, output_dir, **extra):
    flags = dict(with_prior_preservation=True, class_data_dir=root / "class", class_prompt="a photo of toy",
                 num_class_images=2, class_inference_steps=2, max_train_steps=3, checkpointing_steps=2,
                 validation_steps=3, validation_prompt="a red qwe toy", num_validation_images=1,
                 validation_inference_steps=3, wandb_run_name=RUN, learning_rate=5e-2, boft_block_num=4,
                 max_sequence_length=40, weighting_scheme="logit_normal")
    return base_args(model, subject, output_dir, **{**flags, **extra})


@pytest.fixture(scope="module")
def klein_run(tiny_klein_model, subject, tmp_path_factory):
    """The launcher's recipe on klein: prior preservation (class images from the klein pipeline), logit-normal
    timesteps, a checkpoint at step 2 of 3, validation at the end."""
    return recipe_run(tmp_path_factory, "klein_run",
                      lambda root: klein_args(tiny_klein_model, subject, root, root / "out"))


@pytest.mark.e2e
def test_klein_trains_with_prior_preservation(klein_run):
    out = klein_run / "out"
    assert_recipe_outputs(klein_run, PARTS, RUN)
    assert not (out / "text_encoder").exists()  # Qwen3 stays frozen
    assert (out / "validation" / RUN / "3" / "00_a_red_qwe_toy_0.png").is_file()


@pytest.mark.e2e
def test_klein_resumes_exactly(klein_run, tiny_klein_model, subject, tmp_path):
    out = tmp_path / "out"
    assert_resumes_exactly(klein_run, out, klein_args(tiny_klein_model, subject, klein_run, out, validation_prompt=None,
                                                      resume_from_checkpoint="latest"), PARTS, RUN)


@pytest.mark.e2e
def test_klein_adapters_reproduce_the_validation_image_with_stock_peft(klein_run, tiny_klein_model):
    from diffusers import Flux2KleinPipeline

    assert_stock_peft_reproduces_validation(Flux2KleinPipeline.from_pretrained(tiny_klein_model), klein_run / "out",
                                            PARTS, RUN, max_sequence_length=40)


@pytest.mark.e2e
def test_klein_unmerged_merged_and_saved_merged_give_the_same_image(klein_run, tiny_klein_model, tmp_path):
    from diffusers import Flux2KleinPipeline

    from utils.inference import BoftPipeline

    pipe = BoftPipeline.from_pretrained(tiny_klein_model, device="cpu")
    assert pipe.load_adapter(klein_run / "out", RUN) == 3 and set(pipe.peft_models) == set(PARTS)
    assert pipe.sampling_defaults == (50, 4.0)  # the base model's, as its pipeline
    assert_unmerged_merged_and_saved_agree(pipe, Flux2KleinPipeline, tmp_path / "merged", PARTS, RUN, 4.0, GENERATION)


@pytest.mark.e2e
def test_klein_exports_read_back_by_diffusers(klein_run, tiny_klein_model, tmp_path):
    """--format lora through Flux2KleinPipeline.load_lora_weights and --format checkpoint through
    Flux2Transformer2DModel.from_single_file give the merged weights; --format comfyui holds BFL's fused
    differences."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from safetensors.torch import load_file

    from tests.test_export import merged_pipeline, run_export

    merged = merged_pipeline(tiny_klein_model, klein_run / "out", RUN)
    expected = merged.state_dict_of("transformer")
    changes = merged.weight_changes()["transformer"]
    assert changes
    lora = run_export(tiny_klein_model, klein_run / "out", RUN, "lora", tmp_path / "l.safetensors", "--rank", 64,
                      "--dtype", "fp32")
    pipeline = Flux2KleinPipeline.from_pretrained(tiny_klein_model)
    pipeline.load_lora_weights(str(lora))
    pipeline.fuse_lora(components=["transformer"])
    fused = pipeline.transformer.state_dict()
    for key in changes:  # rank 64 is above every width: exact
        assert torch.allclose(fused.get(key, fused.get(key.replace(".weight", ".base_layer.weight"))), expected[key],
                              atol=1e-5), key

    single = run_export(tiny_klein_model, klein_run / "out", RUN, "checkpoint", tmp_path / "klein.safetensors",
                        "--dtype", "fp32")
    transformer = Flux2Transformer2DModel.from_single_file(str(single), config=str(tiny_klein_model),
                                                           subfolder="transformer")
    assert all(torch.allclose(value, expected[key], atol=1e-6) for key, value in transformer.state_dict().items())

    comfy = load_file(run_export(tiny_klein_model, klein_run / "out", RUN, "comfyui", tmp_path / "c.safetensors",
                                 "--dtype", "fp32"))
    parts = [f"transformer_blocks.0.attn.{p}.weight" for p in ("to_q", "to_k", "to_v")]
    stacked = torch.cat([changes[p][1] - changes[p][0] for p in parts])
    assert torch.allclose(comfy["diffusion_model.double_blocks.0.img_attn.qkv.diff"], stacked, atol=1e-6)
    linear1 = changes["single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight"]
    assert torch.allclose(comfy["diffusion_model.single_blocks.0.linear1.diff"], linear1[1] - linear1[0], atol=1e-6)
