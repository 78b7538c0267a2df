"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, the UNet conditioned on its hidden states.

A local folder in diffusers layout and a hub id (honouring --revision) take the same path.
"""

import logging

import torch

from utils.errors import UserError
from utils.families import Components, ModelFamily, load_vae
from utils.families.diffusion import DenoisingDiffusion

logger = logging.getLogger(__name__)

UNET_TARGET_MODULES = ("to_q", "to_v", "to_k", "query", "value", "key", "to_out.0", "add_k_proj", "add_v_proj")
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "v_proj")
SUPPORTED_TEXT_ENCODERS = ("CLIPTextModel",)
PROMPT_FLAGS = {0: "--instance_prompt", 1: "--class_prompt"}


def text_encoder_class(name_or_path: str, revision=None, subfolder="text_encoder", supported=SUPPORTED_TEXT_ENCODERS,
                       family="Stable Diffusion 1.x and 2.x"):
    """The transformers class of a pipeline's text encoder, after checking it is one the family supports."""
    import transformers
    from transformers import PretrainedConfig

    # The raw config: building a PretrainedConfig from a CLIP one logs a spurious model-type mismatch.
    config, _ = PretrainedConfig.get_config_dict(name_or_path, subfolder=subfolder, revision=revision)
    architecture = (config.get("architectures") or ["(none given)"])[0]
    if architecture not in supported:
        raise UserError(
            f"the {subfolder.replace('_', ' ')} of {name_or_path} is a {architecture}; this trainer supports "
            f"{', '.join(supported)} there ({family})"
        )
    return getattr(transformers, architecture)


def warn_if_truncated(tokenizer, prompt: str, what: str, max_length=None, encoder="the text encoder") -> None:
    """The text encoder reads max_length tokens (CLIP's model_max_length, 77, unless given); say which words a
    longer prompt loses."""
    max_length = max_length or tokenizer.model_max_length
    ids = tokenizer(prompt, truncation=False).input_ids
    if len(ids) > max_length:
        lost = tokenizer.decode(ids[max_length - 1 : -1])
        logger.warning("%s is %d tokens long; %s reads %d, so this part is cut: %r", what, len(ids), encoder,
                       max_length, lost)


def tokenize(tokenizer, prompt: str, max_length=None) -> torch.Tensor:
    return tokenizer(prompt, truncation=True, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                     return_tensors="pt").input_ids[0]


class TextConditioning:
    """The UNet's conditioning for a batch: the text encoder's hidden states of each row's prompt. A frozen text
    encoder runs once per prompt, at start-up, and can then leave the accelerator; a trained one runs every step on
    the token ids the batch carries."""

    def __init__(self, text_encoder, tokenizer, prompts: dict, trained: bool, device, dtype):
        self.text_encoder, self.trained = text_encoder, trained
        self.embeddings = {}
        if not trained:
            with torch.no_grad():
                for part, prompt in prompts.items():
                    ids = tokenize(tokenizer, prompt).unsqueeze(0).to(device)
                    self.embeddings[part] = text_encoder(ids)[0][0].to(dtype)

    def __call__(self, batch) -> dict:
        if self.trained:
            return {"encoder_hidden_states": self.text_encoder(batch["input_ids"])[0]}
        return {"encoder_hidden_states": torch.stack([self.embeddings[part] for _, _, part in batch["keys"]])}


class StableDiffusion(DenoisingDiffusion, ModelFamily):
    name = "Stable Diffusion 1.x/2.x"
    pipeline_class_names = ("StableDiffusionPipeline",)
    component_folders = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    denoiser_part, denoiser_label = "unet", "UNet"
    denoiser_target_modules = UNET_TARGET_MODULES
    trainable_text_encoders = ("text_encoder",)
    text_encoder_target_modules = TEXT_ENCODER_TARGET_MODULES
    default_resolution = 512  # the guide's; SD 2.1 was also trained at 768, which --resolution 768 gives
    resolution_multiple = 8
    accepted_flags = ("tokenizer_name",)
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te"}

    def load(self, source, revision=None, tokenizer_name=None, vae_name=None, dtype=None) -> Components:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer

        if tokenizer_name:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, revision=revision)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision)
        text_encoder = text_encoder_class(source, revision).from_pretrained(source, subfolder="text_encoder",
                                                                            revision=revision, dtype=dtype)
        return Components(
            vae=load_vae(source, revision, vae_name),
            denoiser=UNet2DConditionModel.from_pretrained(source, subfolder="unet", revision=revision, dtype=dtype),
            noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", revision=revision),
            text_encoders={"text_encoder": text_encoder},
            tokenizers={"tokenizer": tokenizer},
        )

    def empty_models(self, source, revision=None):
        from accelerate import init_empty_weights
        from diffusers import UNet2DConditionModel

        encoder_class = text_encoder_class(source, revision)
        encoder_config = encoder_class.config_class.from_pretrained(source, subfolder="text_encoder", revision=revision)
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(source, subfolder="unet",
                                                                                     revision=revision))
            text_encoder = encoder_class(encoder_config)
        return unet, {"text_encoder": text_encoder}

    def prompt_ids(self, components, prompts, config):
        tokenizer = components.tokenizers["tokenizer"]
        for part, prompt in prompts.items():
            warn_if_truncated(tokenizer, prompt, PROMPT_FLAGS.get(part, "the prompt"))
        return {part: tokenize(tokenizer, prompt) for part, prompt in prompts.items()}

    def conditioning(self, components, prompts, trained, device, dtype, config):
        return TextConditioning(components.text_encoders["text_encoder"], components.tokenizers["tokenizer"], prompts,
                                trained, device, dtype)

    def pipeline(self, components, scheduler):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=components.vae,
            text_encoder=components.text_encoders["text_encoder"],
            tokenizer=components.tokenizers["tokenizer"],
            unet=components.denoiser,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def load_pipeline(self, source, revision=None, dtype=None, vae_name=None):
        from diffusers import StableDiffusionPipeline

        replaced = {"vae": load_vae(source, revision, vae_name, dtype)} if vae_name else {}
        return StableDiffusionPipeline.from_pretrained(source, revision=revision, dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False, **replaced)

    def single_file_tensors(self, state_of, pipeline):
        from utils.original_layout import stable_diffusion_single_file

        return stable_diffusion_single_file(state_of, pipeline, self.original_text_encoders(pipeline))

    def original_text_encoders(self, pipeline):
        """{part: (key prefix, naming)}: where each text encoder sits in the original single-file layout."""
        if is_open_clip(pipeline.text_encoder):
            return {"text_encoder": ("cond_stage_model.model.", "open_clip")}
        return {"text_encoder": ("cond_stage_model.transformer.", "clip")}

    def base_model_version(self, pipeline):
        return "sd_v2" if is_open_clip(pipeline.text_encoder) else "sd_v1"


def is_open_clip(text_encoder) -> bool:
    """SD 2.x's text encoder is OpenCLIP's (GELU); SD 1.x's is OpenAI's CLIP (quick GELU)."""
    return text_encoder.config.hidden_act == "gelu"
