"""FLUX.1 [dev] and [schnell]: a rectified-flow transformer over packed latents, conditioned on T5 and CLIP-L.

The transformer (FluxTransformer2DModel) reads the VAE's 16-channel latents packed in 2 x 2 patches, with image
position ids for every patch and text position ids for every T5 token; T5's hidden states are its sequence
conditioning and CLIP-L's pooled embedding its global one. [dev] has a guidance embedding, fed with
--guidance_scale in training as in diffusers' FLUX script; [schnell] has none. The training maths is rectified
flow (flow_matching.py) on latents shifted and scaled by the VAE's shift_factor and scaling_factor.

With --train_text_encoder BOFT goes on CLIP-L; T5 stays frozen (as in diffusers' scripts), and its embeddings are
computed once per prompt at start-up, so it can leave the accelerator for the whole run.
"""

import functools
import logging

import torch

from utils.errors import UserError
from utils.families import Components, ModelFamily
from utils.families.flow_matching import FlowMatchingTransformer, RectifiedFlow
from utils.families.flux_layout import BFL
from utils.families.stable_diffusion import PROMPT_FLAGS, TEXT_ENCODER_TARGET_MODULES, tokenize
from utils.families.stable_diffusion import warn_if_truncated

logger = logging.getLogger(__name__)

FAMILY = "FLUX.1"
# The attention projections of the double-stream blocks (image: to_q/k/v, to_out.0; text: add_*_proj, to_add_out)
# and of the single-stream blocks (to_q/k/v, which match there too). The single blocks' proj_out is left out: it
# reads attention and MLP outputs side by side (15,360 inputs in FLUX.1), as the LoRA trainers leave it.
TRANSFORMER_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                              "to_add_out")
SUPPORTED_ENCODERS = {"text_encoder": ("CLIPTextModel",), "text_encoder_2": ("T5EncoderModel",)}
T5_MAX_LENGTH = 512  # T5's position limit as FLUX's pipeline enforces it
DEFAULT_MAX_LENGTH = {True: 512, False: 256}  # by guidance embedding: [dev] 512, [schnell] 256, as their pipelines
DEFAULT_TRAINING_GUIDANCE = 3.5  # diffusers' train_dreambooth_lora_flux.py default
SAMPLING_DEFAULTS = {True: (28, 3.5), False: (4, 0.0)}  # (steps, guidance) of [dev] and [schnell], as BFL's cards


def transformer_config(source, revision=None) -> dict:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.load_config(source, subfolder="transformer", revision=revision)


@functools.lru_cache
def guidance_embeds_of(source, revision=None) -> bool:
    """Whether a FLUX.1 folder's transformer has [dev]'s guidance embedding, from its config (read once)."""
    return bool(transformer_config(source, revision).get("guidance_embeds"))


def has_guidance_embedding(components: Components) -> bool:
    """[dev]'s guidance embedding, read through whatever wraps the transformer (peft, and DDP once prepared)."""
    from accelerate.utils import extract_model_from_parallel

    return bool(extract_model_from_parallel(components.denoiser).config.guidance_embeds)


def max_sequence_length(config, guidance_embeds: bool) -> int:
    return config.max_sequence_length or DEFAULT_MAX_LENGTH[guidance_embeds]


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(batch, channels, h, w) latents as (batch, h/2 * w/2, channels * 4): one token per 2 x 2 patch."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack` for latents `height` x `width`."""
    b, _, packed_channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, packed_channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, packed_channels // 4, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """Position ids (0, row, column) of the packed latent's tokens, as FLUX's pipeline makes them."""
    rows, columns = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


class FluxObjective(RectifiedFlow):
    """Rectified flow with FLUX's forward call: packed latents, position ids, timestep / 1000, guidance."""

    def __init__(self, components: Components, config):
        vae = components.vae.config
        super().__init__(components.noise_scheduler, vae.shift_factor, vae.scaling_factor, config.timestep_sampling)
        has_guidance = has_guidance_embedding(components)
        guidance = DEFAULT_TRAINING_GUIDANCE if config.guidance_scale is None else config.guidance_scale
        self.guidance = guidance if has_guidance else None

    def predict(self, denoiser, model_input, timesteps, conditioning: dict):
        batch, _, height, width = model_input.shape
        guidance = None if self.guidance is None else torch.full((batch,), self.guidance, device=model_input.device)
        tokens = denoiser(hidden_states=pack(model_input), timestep=timesteps / 1000, guidance=guidance,
                          img_ids=image_ids(height, width, model_input.device, model_input.dtype), return_dict=False,
                          **conditioning)[0]
        return unpack(tokens, height, width)


class FluxConditioning:
    """The transformer's conditioning for a batch: T5's hidden states of each row's prompt (computed once, T5 is
    never trained), CLIP-L's pooled embedding (once when frozen; every step from the batch's token ids when
    trained), and the text position ids (zeros, as FLUX's pipeline)."""

    def __init__(self, components: Components, prompts: dict, trained: bool, device, dtype, max_length: int):
        self.clip, self.trained, self.device, self.dtype = components.text_encoders["text_encoder"], trained, device, dtype
        t5, t5_tokenizer = components.text_encoders["text_encoder_2"], components.tokenizers["tokenizer_2"]
        clip_tokenizer = components.tokenizers["tokenizer"]
        self.t5_embeddings, self.pooled = {}, {}
        with torch.no_grad():
            for part, prompt in prompts.items():
                ids = tokenize(t5_tokenizer, prompt, max_length).unsqueeze(0).to(device)
                self.t5_embeddings[part] = t5(ids)[0][0].to(dtype)
                if not trained:
                    clip_ids = tokenize(clip_tokenizer, prompt).unsqueeze(0).to(device)
                    self.pooled[part] = self.clip(clip_ids).pooler_output[0].to(dtype)
        self.text_ids = torch.zeros(max_length, 3, device=device, dtype=dtype)

    def __call__(self, batch) -> dict:
        parts = [part for _, _, part in batch["keys"]]
        if self.trained:
            pooled = self.clip(batch["input_ids"].to(self.device)).pooler_output
        else:
            pooled = torch.stack([self.pooled[part] for part in parts])
        hidden = torch.stack([self.t5_embeddings[part] for part in parts])
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled, "txt_ids": self.text_ids}


class Flux(FlowMatchingTransformer, ModelFamily):
    name = FAMILY
    pipeline_class_names = ("FluxPipeline",)
    component_folders = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                         "scheduler")
    denoiser_part, denoiser_label = "transformer", "transformer"
    denoiser_target_modules = TRANSFORMER_TARGET_MODULES
    trainable_text_encoders = ("text_encoder",)  # CLIP-L; T5 stays frozen
    text_encoder_target_modules = TEXT_ENCODER_TARGET_MODULES
    default_resolution = 1024
    resolution_multiple = 16  # the VAE's 8, times the 2 x 2 packing
    accepted_flags = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale",
                      "max_sequence_length")
    kohya_prefixes = {"transformer": "lora_unet", "text_encoder": "lora_te1"}
    transformer_class_name = "FluxTransformer2DModel"
    supported_encoders = SUPPORTED_ENCODERS
    tokenizer_parts = ("tokenizer", "tokenizer_2")
    single_file_layout = BFL  # flux1-dev.safetensors' names: fused qkv and linear1, double_blocks / single_blocks
    takes_negative_prompt = False  # guidance-distilled: the guidance is an embedding, not a second pass
    # diffusers' FLUX DreamBooth recipe for AdamW (README_flux.md), bf16 and checkpointing to fit the 12 B transformer
    launcher_recipe = ("--learning_rate=1e-4", "--max_train_steps=500", "--guidance_scale=1", "--mixed_precision=bf16",
                       "--gradient_checkpointing")

    def check_flags(self, flags, resolution):
        super().check_flags(flags, resolution)
        if flags.max_sequence_length is not None and flags.max_sequence_length > T5_MAX_LENGTH:
            raise UserError(f"--max_sequence_length {flags.max_sequence_length}: FLUX.1's T5 reads at most "
                            f"{T5_MAX_LENGTH} tokens")
        if flags.guidance_scale is not None and not guidance_embeds_of(flags.pretrained_model_name_or_path,
                                                                       flags.revision):
            logger.warning("--guidance_scale %g is not used: %s has no guidance embedding (FLUX.1 [schnell] is "
                           "distilled without one)", flags.guidance_scale, flags.pretrained_model_name_or_path)

    def prompt_ids(self, components, prompts, config):
        """CLIP-L's token ids (what a trained CLIP reads every step); T5's are encoded once (`conditioning`)."""
        clip, t5 = components.tokenizers["tokenizer"], components.tokenizers["tokenizer_2"]
        length = max_sequence_length(config, has_guidance_embedding(components))
        for part, prompt in prompts.items():
            warn_if_truncated(t5, prompt, PROMPT_FLAGS.get(part, "the prompt"), length, "T5 (--max_sequence_length)")
            warn_if_truncated(clip, prompt, PROMPT_FLAGS.get(part, "the prompt"), encoder="CLIP-L (its pooled embedding)")
        return {part: tokenize(clip, prompt) for part, prompt in prompts.items()}

    def objective(self, components, config):
        return FluxObjective(components, config)

    def conditioning(self, components, prompts, trained, device, dtype, config):
        length = max_sequence_length(config, has_guidance_embedding(components))
        return FluxConditioning(components, prompts, trained, device, dtype, length)

    def meta_step(self, transformer, resolution, rows, dtype, config):
        """The transformer's forward call on meta tensors of a training step's shapes (packed latents and
        --max_sequence_length T5 tokens), for utils/run/activations.py."""
        tokens, meta = (resolution // 16) ** 2, dict(device="meta", dtype=dtype)
        text_tokens = max_sequence_length(config, transformer.config.guidance_embeds)
        arguments = dict(
            hidden_states=torch.randn(rows, tokens, transformer.config.in_channels, **meta).requires_grad_(),
            encoder_hidden_states=torch.randn(rows, text_tokens, transformer.config.joint_attention_dim, **meta),
            pooled_projections=torch.randn(rows, transformer.config.pooled_projection_dim, **meta),
            timestep=torch.full((rows,), 0.5, **meta), img_ids=image_ids(resolution // 8, resolution // 8, "cpu", dtype),
            txt_ids=torch.zeros(text_tokens, 3, dtype=dtype), return_dict=False,
            guidance=torch.full((rows,), 1.0, **meta) if transformer.config.guidance_embeds else None)
        return lambda: transformer(**arguments)

    def generation_arguments(self, config):
        guidance_embeds = guidance_embeds_of(config.pretrained_model_name_or_path, config.revision)
        return {"max_sequence_length": max_sequence_length(config, guidance_embeds)}

    def sampling_defaults(self, pipeline):
        return SAMPLING_DEFAULTS[bool(pipeline.transformer.config.guidance_embeds)]

    def base_model_version(self, pipeline):
        return "flux1"
