"""Stable Diffusion XL: the family (two text encoders, the added size-and-crop conditioning), and the trainer,
inference, merging, export and evaluation end to end on a tiny random SDXL pipeline. Its exact resume after a
SIGKILL is a case of tests/test_resume.py."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.helpers import (assert_recipe_outputs, assert_stock_peft_reproduces_validation,
                           assert_unmerged_merged_and_saved_agree, base_args, planned_at_real_size, recipe_run,
                           run_in_process)
from utils.families import family_of
from utils.families.stable_diffusion_xl import ENCODER_PARTS, StableDiffusionXL
from utils.images import upright_size
from utils.run.dataset import DreamBoothDataset, collate_fn, training_example

RUN = "xl_toy"
PARTS = ("unet", *ENCODER_PARTS)
GENERATION = dict(num_inference_steps=3, height=64, width=64, output_type="np")


# --- the family -------------------------------------------------------------------------------------------------
def test_the_sdxl_family_is_read_from_model_index_json(tiny_xl_model, tmp_path):
    family = family_of(str(tiny_xl_model))
    assert isinstance(family, StableDiffusionXL) and family.default_resolution == 1024
    unet, encoders = family.empty_models(str(tiny_xl_model))
    assert list(encoders) == ["text_encoder", "text_encoder_2"]
    assert type(encoders["text_encoder_2"]).__name__ == "CLIPTextModelWithProjection"
    assert all(p.device.type == "meta" for p in unet.parameters())
    broken = tmp_path / "model"
    shutil.copytree(tiny_xl_model, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(Exception, match="has no tokenizer_2/ sub-folder"):
        family_of(str(broken))


def test_conditioning_reads_both_encoders_and_the_batchs_size_and_crop(tiny_xl_model):
    family = StableDiffusionXL()
    components = family.load(str(tiny_xl_model))
    prompts = {0: "a photo of qwe toy", 1: "a photo of toy"}
    ids = family.prompt_ids(components, prompts, None)
    assert ids[0].shape == (2, 77)  # one row per tokenizer
    frozen = family.conditioning(components, prompts, False, "cpu", torch.float32, None)
    trained = family.conditioning(components, prompts, True, "cpu", torch.float32, None)
    time_ids = torch.tensor([[96.0, 128, 0, 16, 64, 64], [64, 64, 0, 0, 64, 64]])
    batch = {"keys": [(0, 0, 0), (0, 0, 1)], "input_ids": torch.stack([ids[0], ids[1]]), "time_ids": time_ids}
    once, every_step = frozen(batch), trained(batch)
    hidden = once["encoder_hidden_states"]
    assert hidden.shape == (2, 77, 80)  # both encoders' states (32 and 48 wide) side by side
    assert once["added_cond_kwargs"]["text_embeds"].shape == (2, 32)
    assert torch.equal(once["added_cond_kwargs"]["time_ids"], time_ids)
    assert torch.allclose(hidden, every_step["encoder_hidden_states"], atol=1e-6)
    assert torch.allclose(once["added_cond_kwargs"]["text_embeds"], every_step["added_cond_kwargs"]["text_embeds"],
                          atol=1e-6)
    noisy = torch.randn(2, 4, 8, 8)
    assert components.denoiser(noisy, torch.tensor([1, 2]), **once).sample.shape == noisy.shape


def test_size_and_crop_come_from_the_photo_and_its_crop(tmp_path):
    photo = tmp_path / "wide.jpg"
    Image.new("RGB", (200, 100), "red").save(photo)
    turned = tmp_path / "turned.jpg"  # stored 200 x 100, shown upright as 100 x 200 (EXIF orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (200, 100), "blue").save(turned, exif=exif)
    assert upright_size(photo) == (200, 100) and upright_size(turned) == (100, 200)
    pixels, time_ids = training_example(photo, 64, True, torch.Generator())
    assert pixels.shape == (3, 64, 64)
    assert time_ids.tolist() == [100, 200, 0, 32, 64, 64]  # (height, width), center crop's (top, left), target
    _, time_ids = training_example(turned, 64, True, torch.Generator())
    assert time_ids.tolist() == [200, 100, 32, 0, 64, 64]
    lefts = {training_example(photo, 64, False, torch.Generator().manual_seed(s))[1][3].item() for s in range(8)}
    assert len(lefts) > 1 and all(0 <= left <= 64 for left in lefts)  # a random crop says where it is


def test_every_row_carries_its_size_and_crop_into_the_batch(tmp_path):
    photo = tmp_path / "wide.jpg"
    Image.new("RGB", (200, 100), "red").save(photo)
    dataset = DreamBoothDataset([photo], {0: torch.zeros(2, 77, dtype=torch.long)}, 64, False, 0)
    batch = collate_fn([dataset[(0, 0)]], with_prior_preservation=False)
    left = batch["time_ids"][0, 3].item()
    assert batch["time_ids"][0].tolist() == [100, 200, 0, left, 64, 64]
    assert batch["input_ids"].shape == (1, 2, 77)


def test_the_sdxl_vae_stays_fp32_under_mixed_precision_unless_another_is_given(tiny_xl_model):
    from tests.helpers import make_config
    from utils.run.adapters import wrap_with_adapters

    family = StableDiffusionXL()
    for vae_name, expected in ((None, torch.float32), (str(tiny_xl_model / "vae"), torch.bfloat16)):
        config = make_config(pretrained_model_name_or_path=str(tiny_xl_model), mixed_precision="bf16",
                             pretrained_vae_model_name_or_path=vae_name)
        components = family.load(str(tiny_xl_model), vae_name=vae_name)
        wrap_with_adapters(config, family, components, torch.device("cpu"), "bf16")
        assert components.vae.dtype == expected
        assert next(components.text_encoders["text_encoder_2"].parameters()).dtype == torch.bfloat16


@pytest.mark.e2e
def test_a_vae_flag_that_names_no_vae_is_refused_before_any_weight_loads(tiny_xl_model, subject, tmp_path):
    for vae, phrase in ((tmp_path / "missing", "the VAE folder"),
                        (tiny_xl_model / "unet", "holds a UNet2DConditionModel, not an AutoencoderKL")):
        result = run_in_process(base_args(tiny_xl_model, subject, tmp_path / "out", dry_run=True,
                                          pretrained_vae_model_name_or_path=vae))
        assert result.returncode == 2 and phrase in result.stderr, result.stderr[-2000:]


def test_a_pipeline_for_generating_takes_the_runs_vae(tiny_xl_model, tmp_path):
    from diffusers import AutoencoderKL

    from utils.inference import BoftPipeline

    vae = AutoencoderKL.from_pretrained(tiny_xl_model / "vae")
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.mul_(0.5)
    vae.save_pretrained(tmp_path / "other-vae")
    pipe = BoftPipeline.from_pretrained(str(tiny_xl_model), device="cpu", dtype="fp32",
                                        vae_name=str(tmp_path / "other-vae"))
    assert all(torch.equal(a, b) for a, b in zip(pipe.pipeline.vae.state_dict().values(), vae.state_dict().values()))


@pytest.mark.e2e
def test_tokenizer_name_is_refused_for_sdxl(tiny_xl_model, subject, tmp_path):
    result = run_in_process(base_args(tiny_xl_model, subject, tmp_path / "out", tokenizer_name=tiny_xl_model,
                                      dry_run=True))
    assert result.returncode == 2 and "--tokenizer_name applies to Stable Diffusion 1.x/2.x" in result.stderr


@pytest.mark.e2e
def test_dry_run_plans_both_text_encoders(tiny_xl_model, subject, tmp_path):
    result = run_in_process(base_args(tiny_xl_model, subject, tmp_path / "out", train_text_encoder=True,
                                      resolution=None, dry_run=True))
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("model: Stable Diffusion XL, trained at 1024 px", "UNet: BOFT on 64 layers", "text encoder: BOFT on 4 layers", "text encoder 2: BOFT on 4 layers"):
        assert line in result.stdout


# --- end to end ---------------------------------------------------------------------------------------------------
def xl_args(model, subject, root, output_dir, **extra):
    return base_args(
        model, subject, output_dir, with_prior_preservation=True, class_data_dir=root / "class",
        class_prompt="a photo of toy", num_class_images=2, class_inference_steps=2, train_text_encoder=True,
        max_train_steps=3, checkpointing_steps=2, validation_steps=3, validation_prompt="a red qwe toy",
        num_validation_images=1, validation_inference_steps=3, boft_bias="boft_only", wandb_run_name=RUN,
        learning_rate=1e-2, **extra)


@pytest.fixture(scope="module")
def xl_run(tiny_xl_model, subject, tmp_path_factory):
    """The launcher's recipe on SDXL: prior preservation (class images from the SDXL pipeline), both text encoders
    trained, trained biases, a checkpoint at step 2 of 3, validation at the end."""
    return recipe_run(tmp_path_factory, "xl_run", lambda root: xl_args(tiny_xl_model, subject, root, root / "out"))


@pytest.mark.e2e
def test_sdxl_trains_with_prior_preservation_and_both_text_encoders(xl_run):
    out = xl_run / "out"
    assert_recipe_outputs(xl_run, PARTS, RUN)
    caches = [load_file(path) for path in (out / "latent_cache").glob("*.safetensors")]
    assert len(caches) == 5  # 3 photos and 2 class images, each with its size and crop
    assert sorted(tuple(c["time_ids"].tolist()) for c in caches)[0] == (64, 64, 0, 0, 64, 64)


@pytest.mark.e2e
def test_sdxl_adapters_reproduce_the_validation_image_with_stock_peft(xl_run, tiny_xl_model):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_xl_model, add_watermarker=False)
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    assert_stock_peft_reproduces_validation(pipeline, xl_run / "out", PARTS, RUN)



@pytest.mark.e2e
def test_sdxl_unmerged_merged_and_exported_give_the_same_image(xl_run, tiny_xl_model, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from utils.inference import BoftPipeline

    pipe = BoftPipeline.from_pretrained(tiny_xl_model, device="cpu")
    assert pipe.load_adapter(xl_run / "out", RUN) == 3
    assert set(pipe.peft_models) == set(PARTS)
    assert_unmerged_merged_and_saved_agree(pipe, StableDiffusionXLPipeline, tmp_path / "merged", PARTS, RUN, 7.5,
                                           GENERATION)


@pytest.mark.e2e
def test_sdxl_evaluate_generates_from_the_adapters(xl_run, tiny_xl_model, tmp_path):
    from utils import evaluate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a qwe toy in the snow\n")
    evaluate.main(["generate", "--pretrained_model_name_or_path", str(tiny_xl_model), "--output_dir",
                   str(xl_run / "out"), "--adapter_name", RUN, "--prompts_file", str(prompts), "--num_images", "1",
                   "--num_inference_steps", "2", "--resolution", "64"])
    assert Image.open(xl_run / "out" / "eval" / RUN / "3" / "000" / "00.png").size == (64, 64)


@pytest.mark.e2e
def test_the_notebooks_code_generates_merges_and_exports_sdxl_adapters(xl_run, tiny_xl_model, tmp_path, monkeypatch,
                                                                       capsys):
    """The notebook's cells with MODEL_NAME an SDXL pipeline, run in this process (test_inference.py runs the whole
    notebook through nbconvert for SD)."""
    from tests.helpers import run_notebook_cells

    run_notebook_cells(monkeypatch, dict(MODEL_NAME=str(tiny_xl_model), OUTPUT_DIR=str(xl_run / "out"), RUN_NAME=RUN,
                                         PROMPT="a qwe toy", MERGED_DIR=str(tmp_path / "merged"), NUM_INFERENCE_STEPS="2",
                                         RESOLUTION="64", EXPORT_FILE=str(tmp_path / "export.safetensors")))
    text = capsys.readouterr().out
    assert f"{RUN} at step 3" in text and f"comfyui export of {RUN}" in text
    assert json.loads((tmp_path / "merged" / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert (tmp_path / "export.safetensors").is_file()


@pytest.fixture(scope="module")
def sdxl_configs(tmp_path_factory):
    """SDXL base 1.0's real configurations, without weights (what --dry_run reads)."""
    from benchmarks.sd_architectures import save_sdxl_configs

    return save_sdxl_configs(tmp_path_factory.mktemp("sdxl-configs") / "sdxl")


@pytest.mark.e2e
def test_real_sdxl_widths_pass_the_block_shape_check_and_are_planned(sdxl_configs, subject, tmp_path):
    planned_at_real_size(sdxl_configs, subject, tmp_path / "out",
                         ("trained at 1024 px", "UNet: BOFT on 560 layers, 150,865,920 trainable parameters",
                          "text encoder: BOFT on 24 layers", "text encoder 2: BOFT on 64 layers"),
                         boft_n_butterfly_factor=1)
    refused = run_in_process(base_args(sdxl_configs, subject, tmp_path / "out", boft_block_num=3, dry_run=True))
    assert refused.returncode == 2 and "--boft_block_num=3" in refused.stderr
    assert "[640, 1280, 2048]" in refused.stderr  # the UNet's targeted widths, cross-attention keys included


@pytest.mark.e2e
def test_sdxl_exports_a_single_file_checkpoint_and_kohya_files(xl_run, tiny_xl_model, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file as load_tensors

    from tests.test_export import assert_same_weights, merged_pipeline, run_export

    out = run_export(tiny_xl_model, xl_run / "out", RUN, "checkpoint", tmp_path / "xl.safetensors", "--dtype", "fp32")
    keys = set(load_tensors(out))
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in keys)
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # the size-and-crop embedding
    loaded = StableDiffusionXLPipeline.from_single_file(str(out), config=str(tiny_xl_model), local_files_only=True)
    pipe = merged_pipeline(tiny_xl_model, xl_run / "out", RUN)
    assert_same_weights(pipe, loaded, PARTS + ("vae",))
    expected = pipe.generate("a qwe toy", **GENERATION)[0]
    loaded.scheduler = type(pipe.pipeline.scheduler).from_config(pipe.pipeline.scheduler.config)
    image = loaded("a qwe toy", guidance_scale=7.5, generator=[torch.Generator().manual_seed(0)], **GENERATION).images[0]
    assert np.abs(expected - image).max() <= 2 / 255

    comfy = load_tensors(run_export(tiny_xl_model, xl_run / "out", RUN, "comfyui", tmp_path / "c.safetensors"))
    assert {k.split("_")[1] for k in comfy} == {"unet", "te1", "te2"} and all(v.dtype == torch.float16 for v in comfy.values())
    lora = run_export(tiny_xl_model, xl_run / "out", RUN, "lora", tmp_path / "l.safetensors", "--rank", 4)
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_xl_model, add_watermarker=False)
    pipeline.load_lora_weights(str(lora))
    assert {"unet", "text_encoder", "text_encoder_2"} <= {name for name, _ in pipeline.get_list_adapters().items()}
