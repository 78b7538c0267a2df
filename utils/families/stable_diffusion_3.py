"""Stable Diffusion 3 and 3.5 (Medium, Large): an MMDiT over 2 x 2 patches of the latents, conditioned on two CLIPs
and T5.

The transformer (SD3Transformer2DModel) patchifies the VAE's 16-channel latents itself, so it takes them unpacked;
its sequence conditioning is the two CLIPs' penultimate hidden states side by side, zero-padded to T5's width, with
T5's hidden states after them; its global conditioning is both CLIPs' projected pooled embeddings. SD3.5 Medium's
first blocks also have a second self-attention (`attn2`), which the target names reach as well. The training maths
is rectified flow (flow_matching.py) as diffusers' train_dreambooth_lora_sd3.py does it: logit-normal timesteps by
default, latents shifted and scaled by the VAE's config, and with --precondition_outputs (the default) the
prediction turned into one of the clean latents, x_t - sigma * prediction, regressed on them.

With --train_text_encoder BOFT goes on both CLIPs; T5 stays frozen (as in diffusers' script), and its embeddings
are computed once per prompt at start-up.
"""

import dataclasses
import functools

import torch

from utils.errors import UserError
from utils.families import Components, ModelFamily, TrainingTerms
from utils.families.flow_matching import FlowMatchingTransformer, RectifiedFlow
from utils.families.sd3_layout import STABILITY
from utils.families.stable_diffusion import PROMPT_FLAGS, TEXT_ENCODER_TARGET_MODULES, tokenize
from utils.families.stable_diffusion import warn_if_truncated

FAMILY = "Stable Diffusion 3/3.5"
# Every attention projection of the joint blocks: the image stream's to_q/k/v and to_out.0, the text stream's
# add_*_proj and to_add_out (the last block, which only reads the text, has no to_add_out), and SD3.5 Medium's
# second image self-attention (attn2.to_q ...), which the same names match; as diffusers' SD3 LoRA script.
TRANSFORMER_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                              "to_add_out")
CLIP_PARTS = ("text_encoder", "text_encoder_2")  # CLIP-L and CLIP-G, both with projections; trained with BOFT
SUPPORTED_ENCODERS = {"text_encoder": ("CLIPTextModelWithProjection",),
                      "text_encoder_2": ("CLIPTextModelWithProjection",), "text_encoder_3": ("T5EncoderModel",)}
TOKENIZER_PARTS = ("tokenizer", "tokenizer_2", "tokenizer_3")
T5_MAX_LENGTH = 512
DEFAULT_MAX_LENGTH = 77  # T5 tokens, diffusers' train_dreambooth_lora_sd3.py default
DEFAULT_WEIGHTING_SCHEME = "logit_normal"  # ... and its timestep sampling
# (steps, guidance) of Stability AI's model cards: SD3.5 Medium (its blocks have attn2) and Large
SAMPLING_DEFAULTS = {True: (40, 4.5), False: (28, 3.5)}


@functools.lru_cache
def has_second_attention(source, revision=None) -> bool:
    """Whether an SD3 folder's transformer has SD3.5 Medium's attn2 blocks, from its config (read once)."""
    from diffusers import SD3Transformer2DModel

    config = SD3Transformer2DModel.load_config(source, subfolder="transformer", revision=revision)
    return bool(config.get("dual_attention_layers"))


def clip_prompt_ids(components, prompts: dict) -> dict:
    """Each prompt's token ids from both CLIP tokenizers, one row per CLIP."""
    tokenizers = [components.tokenizers[part] for part in TOKENIZER_PARTS[:2]]
    return {part: torch.stack([tokenize(tokenizer, prompt) for tokenizer in tokenizers])
            for part, prompt in prompts.items()}


def max_sequence_length(config) -> int:
    return config.max_sequence_length or DEFAULT_MAX_LENGTH


def preconditioned(config) -> bool:
    return config.precondition_outputs is None or bool(config.precondition_outputs)


class SD3Objective(RectifiedFlow):
    """Rectified flow with SD3's forward call (unpacked latents, the schedule's timestep in 0..1000) and, when
    preconditioned, the clean latents as the target of x_t - sigma * prediction."""

    def __init__(self, components: Components, config):
        vae = components.vae.config
        sampling = config.timestep_sampling
        if config.weighting_scheme is None:
            sampling = dataclasses.replace(sampling, weighting_scheme=DEFAULT_WEIGHTING_SCHEME)
        super().__init__(components.noise_scheduler, vae.shift_factor, vae.scaling_factor, sampling)
        self.preconditioned = preconditioned(config)

    def terms(self, mean, std, latent_eps, noise, timesteps) -> TrainingTerms:
        terms = super().terms(mean, std, latent_eps, noise, timesteps)
        if not self.preconditioned:
            return terms
        return terms._replace(target=noise.to(terms.target.dtype) - terms.target)  # eps - (eps - x) = x

    def predict(self, denoiser, model_input, timesteps, conditioning: dict):
        prediction = denoiser(hidden_states=model_input, timestep=timesteps, return_dict=False, **conditioning)[0]
        if not self.preconditioned:
            return prediction
        sigma = (timesteps / self.num_timesteps).to(prediction.dtype).view(-1, *[1] * (prediction.ndim - 1))
        return model_input - sigma * prediction  # the schedule's timesteps are its sigmas x num_train_timesteps


class SD3Conditioning:
    """The transformer's conditioning for a batch: [CLIP-L | CLIP-G penultimate states, zero-padded to T5's width;
    T5's states] and [CLIP-L | CLIP-G pooled], as StableDiffusion3Pipeline.encode_prompt builds them. T5 runs once
    per prompt; frozen CLIPs too, trained ones every step on the token ids the batch carries (one row per CLIP)."""

    def __init__(self, components: Components, prompt_ids: dict, prompts: dict, trained: bool, device, dtype,
                 max_length: int):
        self.clips = [components.text_encoders[part] for part in CLIP_PARTS]
        self.trained, self.device, self.dtype = trained, device, dtype
        t5, t5_tokenizer = components.text_encoders["text_encoder_3"], components.tokenizers["tokenizer_3"]
        self.t5_embeddings, self.clip_embeddings = {}, {}
        with torch.no_grad():
            for part, prompt in prompts.items():
                self.t5_embeddings[part] = t5(tokenize(t5_tokenizer, prompt, max_length).unsqueeze(0).to(device))[0][0]
                if not trained:
                    hidden, pooled = self.encode(prompt_ids[part].unsqueeze(0))
                    self.clip_embeddings[part] = (hidden[0], pooled[0])

    def encode(self, ids: torch.Tensor):
        """(both CLIPs' penultimate hidden states side by side, their pooled embeddings side by side) of token ids
        shaped (batch, CLIP, tokens)."""
        hidden, pooled = [], []
        for k, clip in enumerate(self.clips):
            output = clip(ids[:, k].to(self.device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled.append(output.text_embeds)
        return torch.cat(hidden, dim=-1), torch.cat(pooled, dim=-1)

    def __call__(self, batch) -> dict:
        parts = [part for _, _, part in batch["keys"]]
        if self.trained:
            clip_hidden, pooled = self.encode(batch["input_ids"])
        else:
            clip_hidden = torch.stack([self.clip_embeddings[part][0] for part in parts])
            pooled = torch.stack([self.clip_embeddings[part][1] for part in parts])
        t5_hidden = torch.stack([self.t5_embeddings[part] for part in parts]).to(clip_hidden.dtype)
        padded = torch.nn.functional.pad(clip_hidden, (0, t5_hidden.shape[-1] - clip_hidden.shape[-1]))
        return {"encoder_hidden_states": torch.cat([padded, t5_hidden], dim=-2).to(self.dtype),
                "pooled_projections": pooled.to(self.dtype)}


class StableDiffusion3(FlowMatchingTransformer, ModelFamily):
    name = FAMILY
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    component_folders = ("transformer", "vae", *SUPPORTED_ENCODERS, *TOKENIZER_PARTS, "scheduler")
    denoiser_part, denoiser_label = "transformer", "transformer"
    denoiser_target_modules = TRANSFORMER_TARGET_MODULES
    trainable_text_encoders = CLIP_PARTS  # T5 stays frozen
    text_encoder_target_modules = TEXT_ENCODER_TARGET_MODULES
    default_resolution = 1024
    resolution_multiple = 16  # the VAE's 8, times the transformer's 2 x 2 patches
    accepted_flags = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "max_sequence_length",
                      "precondition_outputs")
    kohya_prefixes = {"transformer": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    transformer_class_name = "SD3Transformer2DModel"
    supported_encoders = SUPPORTED_ENCODERS
    tokenizer_parts = TOKENIZER_PARTS
    single_file_layout = STABILITY  # sd3.5_large.safetensors' names: joint_blocks, fused qkv, attn2
    # the LoRA command of diffusers' SD3 DreamBooth README (4e-4, 500 steps), in bf16 with checkpointing so that
    # SD3.5 Large's 8 B transformer trains on one card
    launcher_recipe = ("--learning_rate=4e-4", "--max_train_steps=500", "--mixed_precision=bf16",
                       "--gradient_checkpointing")

    def check_flags(self, flags, resolution):
        super().check_flags(flags, resolution)
        if flags.max_sequence_length is not None and flags.max_sequence_length > T5_MAX_LENGTH:
            raise UserError(f"--max_sequence_length {flags.max_sequence_length}: SD3's T5 reads at most "
                            f"{T5_MAX_LENGTH} tokens")

    def prompt_ids(self, components, prompts, config):
        """Both CLIPs' token ids, one row per CLIP (what trained CLIPs read every step); T5's are encoded once."""
        t5 = components.tokenizers["tokenizer_3"]
        for part, prompt in prompts.items():
            what = PROMPT_FLAGS.get(part, "the prompt")
            warn_if_truncated(t5, prompt, what, max_sequence_length(config), "T5 (--max_sequence_length)")
            warn_if_truncated(components.tokenizers["tokenizer"], prompt, what, encoder="the CLIPs")
        return clip_prompt_ids(components, prompts)

    def conditioning(self, components, prompts, trained, device, dtype, config):
        return SD3Conditioning(components, clip_prompt_ids(components, prompts), prompts, trained, device, dtype,
                               max_sequence_length(config))

    def objective(self, components, config):
        return SD3Objective(components, config)

    def meta_step(self, transformer, resolution, rows, dtype, config):
        """The transformer's forward call on meta tensors of a training step's shapes (77 CLIP and
        --max_sequence_length T5 tokens), for utils/run/activations.py."""
        size, meta = resolution // 8, dict(device="meta", dtype=dtype)
        tokens = 77 + max_sequence_length(config)
        arguments = dict(
            hidden_states=torch.randn(rows, transformer.config.in_channels, size, size, **meta).requires_grad_(),
            encoder_hidden_states=torch.randn(rows, tokens, transformer.config.joint_attention_dim, **meta),
            pooled_projections=torch.randn(rows, transformer.config.pooled_projection_dim, **meta),
            timestep=torch.full((rows,), 500.0, **meta), return_dict=False)
        return lambda: transformer(**arguments)

    def generation_arguments(self, config):
        """T5's length as in training, and the model card's guidance (the pipeline's own default, 7, is neither
        card's), as inference samples."""
        _, guidance = SAMPLING_DEFAULTS[has_second_attention(config.pretrained_model_name_or_path, config.revision)]
        return {"max_sequence_length": max_sequence_length(config), "guidance_scale": guidance}

    def sampling_defaults(self, pipeline):
        return SAMPLING_DEFAULTS[bool(pipeline.transformer.config.dual_attention_layers)]

    def base_model_version(self, pipeline):
        return "sd3"
