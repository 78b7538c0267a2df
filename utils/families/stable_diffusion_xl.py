"""Stable Diffusion XL: two CLIP text encoders, and the UNet's added conditioning on image size and crop.

The UNet reads the penultimate hidden states of both text encoders side by side, and "added conditions": the
second encoder's pooled (projected) embedding and six numbers per example, the original image size (height,
width), the top-left corner of the crop (top, left) and the target size. The dataset computes those numbers for
every example from the photo's real size and its crop (utils/run/dataset.py) and the latent cache keeps them with
the latents, so a cached run conditions exactly as an uncached one.

The SDXL VAE overflows in fp16: under mixed precision it stays in fp32, unless --pretrained_vae_model_name_or_path
gives one that does not (madebyollin/sdxl-vae-fp16-fix), as diffusers' SDXL scripts do.
"""

import torch

from utils.families import Components, ModelFamily, load_vae
from utils.families.diffusion import DenoisingDiffusion
from utils.families.stable_diffusion import PROMPT_FLAGS, TEXT_ENCODER_TARGET_MODULES, text_encoder_class, tokenize
from utils.families.stable_diffusion import warn_if_truncated

# The attention projections of every transformer block: self-attention, and cross-attention whose keys and values
# read the text (2048 wide in SDXL base).
UNET_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
# Both text encoders, with --train_text_encoder.
ENCODER_PARTS = ("text_encoder", "text_encoder_2")
TOKENIZER_PARTS = ("tokenizer", "tokenizer_2")
SUPPORTED_ENCODERS = {"text_encoder": ("CLIPTextModel",), "text_encoder_2": ("CLIPTextModelWithProjection",)}
FAMILY = "Stable Diffusion XL"


def encoder_class(source, revision, part):
    return text_encoder_class(source, revision, part, SUPPORTED_ENCODERS[part], FAMILY)


def both_prompt_ids(components, prompts: dict) -> dict:
    """Each prompt's token ids from both tokenizers, one row per tokenizer."""
    tokenizers = [components.tokenizers[part] for part in TOKENIZER_PARTS]
    return {part: torch.stack([tokenize(tokenizer, prompt) for tokenizer in tokenizers]) for part, prompt in prompts.items()}


class XLConditioning:
    """The UNet's conditioning for a batch: both encoders' penultimate hidden states, concatenated, and the added
    conditions (pooled embedding of the second encoder, the batch's size-and-crop numbers). Frozen encoders run
    once per prompt at start-up; trained ones every step on the token ids the batch carries (one row per
    tokenizer)."""

    def __init__(self, text_encoders: dict, prompt_ids: dict, trained: bool, device, dtype):
        self.encoders = [text_encoders[part] for part in ENCODER_PARTS]
        self.trained, self.device = trained, device
        self.embeddings = {}
        if not trained:
            with torch.no_grad():
                for part, ids in prompt_ids.items():
                    hidden, pooled = self.encode(ids.unsqueeze(0))
                    self.embeddings[part] = (hidden[0].to(dtype), pooled[0].to(dtype))

    def encode(self, ids: torch.Tensor):
        """(hidden states, pooled embedding) of token ids shaped (batch, encoder, tokens)."""
        hidden = []
        for k, encoder in enumerate(self.encoders):
            output = encoder(ids[:, k].to(self.device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
        return torch.cat(hidden, dim=-1), output.text_embeds

    def __call__(self, batch) -> dict:
        if self.trained:
            hidden, pooled = self.encode(batch["input_ids"])
        else:
            rows = [self.embeddings[part] for _, _, part in batch["keys"]]
            hidden, pooled = torch.stack([h for h, _ in rows]), torch.stack([p for _, p in rows])
        time_ids = batch["time_ids"].to(hidden.device, hidden.dtype)
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


class StableDiffusionXL(DenoisingDiffusion, ModelFamily):
    name = FAMILY
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    component_folders = ("unet", "vae", *ENCODER_PARTS, *TOKENIZER_PARTS, "scheduler")
    denoiser_part, denoiser_label = "unet", "UNet"
    denoiser_target_modules = UNET_TARGET_MODULES
    trainable_text_encoders = ENCODER_PARTS
    text_encoder_target_modules = TEXT_ENCODER_TARGET_MODULES
    default_resolution = 1024
    resolution_multiple = 8
    accepted_flags = ()  # two tokenizers matched to their encoders: no --tokenizer_name
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    vae_overflows_in_fp16 = True

    def load(self, source, revision=None, tokenizer_name=None, vae_name=None, dtype=None) -> Components:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer

        return Components(
            vae=load_vae(source, revision, vae_name),
            denoiser=UNet2DConditionModel.from_pretrained(source, subfolder="unet", revision=revision, dtype=dtype),
            noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", revision=revision),
            text_encoders={part: encoder_class(source, revision, part).from_pretrained(source, subfolder=part,
                                                                                       revision=revision, dtype=dtype)
                           for part in ENCODER_PARTS},
            tokenizers={part: AutoTokenizer.from_pretrained(source, subfolder=part, revision=revision)
                        for part in TOKENIZER_PARTS},
        )

    def empty_models(self, source, revision=None):
        from accelerate import init_empty_weights
        from diffusers import UNet2DConditionModel

        classes = {part: encoder_class(source, revision, part) for part in ENCODER_PARTS}
        configs = {part: cls.config_class.from_pretrained(source, subfolder=part, revision=revision)
                   for part, cls in classes.items()}
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(source, subfolder="unet",
                                                                                     revision=revision))
            encoders = {part: classes[part](configs[part]) for part in ENCODER_PARTS}
        return unet, encoders

    def prompt_ids(self, components, prompts, config):
        for part, prompt in prompts.items():
            warn_if_truncated(components.tokenizers["tokenizer"], prompt, PROMPT_FLAGS.get(part, "the prompt"))
        return both_prompt_ids(components, prompts)

    def conditioning(self, components, prompts, trained, device, dtype, config):
        return XLConditioning(components.text_encoders, both_prompt_ids(components, prompts), trained, device, dtype)

    def pipeline(self, components, scheduler):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=components.vae,
            unet=components.denoiser,
            scheduler=scheduler,
            add_watermarker=False,  # an invisible watermark would change the images the metrics score
            **components.text_encoders,
            **components.tokenizers,
        )

    def load_pipeline(self, source, revision=None, dtype=None, vae_name=None):
        from diffusers import StableDiffusionXLPipeline

        replaced = {"vae": load_vae(source, revision, vae_name, dtype)} if vae_name else {}
        return StableDiffusionXLPipeline.from_pretrained(source, revision=revision, dtype=dtype,
                                                         add_watermarker=False, **replaced)

    def single_file_tensors(self, state_of, pipeline):
        from utils.original_layout import stable_diffusion_single_file

        return stable_diffusion_single_file(state_of, pipeline, self.original_text_encoders(pipeline))

    def original_text_encoders(self, pipeline):
        """{part: (key prefix, naming)}: where each text encoder sits in the original single-file layout."""
        return {"text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
                "text_encoder_2": ("conditioner.embedders.1.model.", "open_clip")}

    def base_model_version(self, pipeline):
        return "sdxl_base_v1-0"
