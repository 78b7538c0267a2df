"""Model families: picking one from model_index.json, and what SD 1.x/2.x answers to the interface."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from utils.errors import UserError
from utils.families import Components, family_of
from utils.families.stable_diffusion import StableDiffusion, TextConditioning


def test_the_family_comes_from_model_index_json(tiny_model, tmp_path):
    assert isinstance(family_of(str(tiny_model)), StableDiffusion)
    renamed = tmp_path / "sdxl-looking-name"  # the name says nothing: the pipeline class does
    shutil.copytree(tiny_model, renamed)
    assert isinstance(family_of(str(renamed)), StableDiffusion)
    index = json.loads((renamed / "model_index.json").read_text())
    (renamed / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(UserError, match="is a KandinskyPipeline; this trainer supports Stable Diffusion 1.x/2.x"):
        family_of(str(renamed))


def test_a_folder_without_model_index_or_a_component_is_named(tiny_model, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(UserError, match="has no vae/ sub-folder"):
        family_of(str(broken))
    (broken / "model_index.json").unlink()
    with pytest.raises(UserError, match="has no model_index.json"):
        family_of(str(broken))


def test_meta_models_have_shapes_and_no_weights(tiny_model):
    unet, text_encoders = StableDiffusion().empty_models(str(tiny_model))
    assert list(text_encoders) == ["text_encoder"]
    assert all(p.device.type == "meta" for p in unet.parameters())


class CountingEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.embedding = torch.nn.Embedding(600, 8)

    def forward(self, ids):
        self.calls += 1
        return (self.embedding(ids),)


class CharTokenizer:
    model_max_length = 6

    def __call__(self, prompt, truncation=True, padding=None, max_length=None, return_tensors=None):
        ids = [ord(c) % 600 for c in prompt]
        if truncation:
            ids = ids[: self.model_max_length]
        if padding:
            ids += [0] * (max_length - len(ids))
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors else ids)

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_a_frozen_text_encoder_runs_once_per_prompt_at_start_up():
    encoder = CountingEncoder()
    conditioning = TextConditioning(encoder, CharTokenizer(), {0: "a qwe", 1: "a dog"}, trained=False,
                                    device="cpu", dtype=torch.float32)
    assert encoder.calls == 2
    batch = {"keys": [(0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)]}
    states = conditioning(batch)["encoder_hidden_states"]
    assert encoder.calls == 2 and states.shape == (4, 6, 8)
    expected = encoder(CharTokenizer()("a dog", True, "max_length", 6, "pt").input_ids)[0][0]
    assert torch.equal(states[3], expected) and torch.equal(states[0], states[1])


def test_a_trained_text_encoder_runs_every_step_on_the_batchs_ids():
    encoder = CountingEncoder()
    conditioning = TextConditioning(encoder, CharTokenizer(), {0: "a qwe"}, trained=True, device="cpu",
                                    dtype=torch.float32)
    ids = torch.zeros(1, 6, dtype=torch.long)
    states = conditioning({"keys": [(0, 0, 0)], "input_ids": ids})["encoder_hidden_states"]
    assert encoder.calls == 1 and torch.equal(states, encoder.embedding(ids))


def test_prompt_ids_are_padded_and_a_long_prompt_names_what_is_cut(caplog):
    components = Components(vae=None, denoiser=None, noise_scheduler=None, tokenizers={"tokenizer": CharTokenizer()})
    ids = StableDiffusion().prompt_ids(components, {0: "a qwe", 1: "a dog with a hat"}, None)
    assert ids[0].shape == ids[1].shape == (6,)
    assert "--class_prompt is 16 tokens long" in caplog.text and "--instance_prompt" not in caplog.text


def test_a_family_that_lacks_a_member_fails_naming_it():
    from utils.families import ModelFamily
    from utils.families.stable_diffusion import StableDiffusion

    with pytest.raises(TypeError, match="does not define default_resolution"):
        type("NoResolution", (ModelFamily,), {k: getattr(StableDiffusion, k) for k in ModelFamily.REQUIRED_ATTRIBUTES
                                              if k != "default_resolution"})
    attributes = {k: getattr(StableDiffusion, k) for k in ModelFamily.REQUIRED_ATTRIBUTES}
    no_maths = type("NoTrainingMaths", (ModelFamily,), {**attributes, **{
        name: getattr(StableDiffusion, name) for name in ModelFamily.__abstractmethods__
        if name not in ("objective", "sampling_scheduler")}})
    with pytest.raises(TypeError, match="objective.*sampling_scheduler|sampling_scheduler.*objective"):
        no_maths()


def test_the_sd_families_sample_with_dpm_solver_from_the_training_schedule():
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    from utils.families.stable_diffusion import StableDiffusion
    from utils.families.stable_diffusion_xl import StableDiffusionXL

    training = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    for family in (StableDiffusion(), StableDiffusionXL()):
        sampling = family.sampling_scheduler(training.config)
        assert isinstance(sampling, DPMSolverMultistepScheduler) and sampling.config.prediction_type == "v_prediction"
