"""--dry_run's plan from configs alone: images, class images to generate, adapter sizes, steps and memory."""

import pytest

from tests.helpers import make_config
from utils.boft.shapes import BoftSettings, adapter_parameters
from utils.families.stable_diffusion import StableDiffusion
from utils.run.plan import plan_lines


@pytest.fixture(scope="module")
def meta_models(tiny_model):
    return StableDiffusion().empty_models(str(tiny_model))


def test_the_plan_names_images_adapters_steps_and_memory(tiny_model, subject, tmp_path, meta_models):
    (tmp_path / "class").mkdir()
    config = make_config(num_examples=5, pretrained_model_name_or_path=tiny_model, instance_data_dir=subject,
                         with_prior_preservation=True, class_data_dir=tmp_path / "class", class_prompt="a toy",
                         num_class_images=5, train_text_encoder=True, max_train_steps=None, num_train_epochs=2)
    lines = "\n".join(plan_lines(config, StableDiffusion(), "bf16", 3, *meta_models))
    for phrase in ("Dry run: every check passed", "3 image(s)", "0 image(s) in", "5 to generate", "UNet: BOFT on",
                   "text encoder: BOFT on", "optimizer steps: 10 (5 examples per epoch", "(bf16)", "optimizer state"):
        assert phrase in lines, (phrase, lines)
    big_batch = make_config(num_examples=3, num_processes=2, pretrained_model_name_or_path=tiny_model,
                            instance_data_dir=subject, train_batch_size=4)
    lines = "\n".join(plan_lines(big_batch, StableDiffusion(), "no", 3, *meta_models))
    assert "batch 2 x 2 process(es)" in lines  # what each process gets of 3 examples, not --train_batch_size 4


@pytest.mark.parametrize("settings", [BoftSettings(8, 0, 2), BoftSettings(0, 16, 1, bias="boft_only")])
def test_the_counted_adapter_parameters_are_the_ones_peft_builds(tiny_model, meta_models, settings):
    from diffusers import UNet2DConditionModel

    from utils.boft import peft_seam

    targets = StableDiffusion.denoiser_target_modules
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    model = peft_seam.add_boft_adapter(unet, targets, settings, "a", "UNet")
    trainable, _ = model.get_nb_trainable_parameters()
    assert adapter_parameters(meta_models[0], targets, settings) == trainable
