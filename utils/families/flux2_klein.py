"""FLUX.2 [klein] (4B, 9B; base and distilled): a rectified-flow transformer over patchified latents, conditioned on
Qwen3's hidden states.

The VAE (AutoencoderKLFlux2) gives 32-channel latents; FLUX.2 patchifies them 2 x 2 into 128 channels and
normalises each channel by the VAE's batch-norm running statistics (no shift and scale factors), then reads one
token per latent position with (t, h, w, l) position ids. Its only conditioning is Qwen3's hidden states of three
layers side by side, of the prompt in the pipeline's chat template, padded to --max_sequence_length tokens; the base
models have no guidance embedding (classifier-free guidance is a second pass). The training maths is rectified flow
(flow_matching.py) on those normalised latents, as diffusers' train_dreambooth_lora_flux2_klein.py does it.

Qwen3 stays frozen (no peer trains it): its embeddings are computed once per prompt at start-up, and
--train_text_encoder is refused. The layers it is read from are the pipeline's (9, 18, 27): diffusers' training script
and PEFT's image-generation benchmark read (10, 20, 30), but the pipeline generates from (9, 18, 27), and an adapter
should be trained on the conditioning it is used with.
"""

import functools
import logging

import torch

from utils.errors import UserError
from utils.families import Components, ModelFamily
from utils.families.flow_matching import FlowMatchingTransformer, RectifiedFlow
from utils.families.flux_layout import DOUBLE_BLOCK_FUSED  # BFL fuses a double block's q, k, v as in FLUX.1
from utils.families.stable_diffusion import PROMPT_FLAGS
from utils.families.transformer_layout import Layout, block_count

logger = logging.getLogger(__name__)

FAMILY = "FLUX.2 [klein]"
# The layers of PEFT's image-generation benchmark (its LoRA, OFT and BOFT experiments on FLUX.2 [klein] base 4B): the
# double blocks' attention projections of both streams and their MLPs (ff / ff_context linear_in and linear_out),
# and the single blocks' fused q, k, v and MLP input (to_qkv_mlp_proj). The single blocks' output projection
# (attn.to_out, 12,288 inputs in the 4B) is left out there and here.
TRANSFORMER_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                              "to_add_out", "linear_in", "linear_out", "to_qkv_mlp_proj")
SUPPORTED_ENCODERS = {"text_encoder": ("Qwen3ForCausalLM",)}
QWEN_LAYERS = (9, 18, 27)  # the hidden states Flux2KleinPipeline conditions on
MAX_LENGTH = 512  # the pipeline's tokenizer_max_length and default
# (steps, guidance) by is_distilled: the base models as their pipeline's defaults, the distilled ones as their cards
SAMPLING_DEFAULTS = {False: (50, 4.0), True: (4, 1.0)}

# Black Forest Labs' single-file layout (flux-2-klein-base-4b.safetensors), as Flux2Transformer2DModel.from_single_file
# and ComfyUI read it: a double block's q, k, v as one qkv per stream; the single blocks' fused layers as they are.
TOP_LEVEL = {
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "context_embedder": "txt_in", "x_embedder": "img_in",
    "norm_out.linear": "final_layer.adaLN_modulation.1", "proj_out": "final_layer.linear",
}
DOUBLE_BLOCK = {
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
}
SINGLE_BLOCK = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm",
                "attn.norm_k": "norm.key_norm"}


def _blocks(state: dict) -> list:
    return ([(f"transformer_blocks.{i}.", f"double_blocks.{i}.", DOUBLE_BLOCK, DOUBLE_BLOCK_FUSED)
             for i in range(block_count(state, "transformer_blocks."))]
            + [(f"single_transformer_blocks.{i}.", f"single_blocks.{i}.", SINGLE_BLOCK, {})
               for i in range(block_count(state, "single_transformer_blocks."))])


BFL_FLUX2 = Layout(top_level=TOP_LEVEL, blocks=_blocks, swapped=lambda state: ("final_layer.adaLN_modulation.1",),
                   scale_layers=("query_norm", "key_norm"))


@functools.lru_cache
def is_distilled(source, revision=None) -> bool:
    """Whether a klein folder holds a step-distilled model (model_index.json's is_distilled), read once."""
    from utils.families import read_model_index

    return bool(read_model_index(source, revision).get("is_distilled"))


def max_sequence_length(config) -> int:
    return config.max_sequence_length or MAX_LENGTH


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(batch, c, h, w) latents as (batch, 4c, h/2, w/2): each 2 x 2 patch's values as channels, as FLUX.2's."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(b, c * 4, h // 2, w // 2)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(batch, c, h, w) patchified latents as (batch, h * w, c) tokens, row by row."""
    return latents.flatten(2).transpose(1, 2)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)


def image_ids(height: int, width: int, device) -> torch.Tensor:
    """(t, h, w, l) position ids of the tokens of patchified latents height x width: (0, row, column, 0)."""
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, columns, zeros], dim=-1).reshape(-1, 4).to(device)


def text_ids(length: int, device) -> torch.Tensor:
    """(t, h, w, l) position ids of the prompt's tokens: (0, 0, 0, token index)."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids.to(device)


def templated(tokenizer, prompt: str) -> str:
    """The prompt as Flux2KleinPipeline gives it to Qwen3: a user turn of its chat template, thinking off."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)


def warn_if_truncated(tokenizer, prompt: str, what: str, max_length: int) -> None:
    """Say, once, what of a prompt is lost when its chat template is cut at max_length tokens (the end goes)."""
    text = templated(tokenizer, prompt)
    total = len(tokenizer(text).input_ids)
    if total <= max_length:
        return
    kept = max(0, max_length - len(tokenizer(text[: text.index(prompt)]).input_ids))
    words = tokenizer(prompt, add_special_tokens=False).input_ids
    lost = repr(tokenizer.decode(words[kept:])) if kept < len(words) else "only the chat template's closing tokens"
    logger.warning("%s is %d tokens long in Qwen3's chat template; --max_sequence_length %d cuts it there, so the "
                   "prompt keeps %d of its %d tokens and loses %s", what, total, max_length, min(kept, len(words)),
                   len(words), lost)


def qwen_inputs(tokenizer, prompts: list, max_length: int):
    """The templated prompts' token ids and attention mask, padded or cut to max_length, as the pipeline's."""
    return tokenizer([templated(tokenizer, p) for p in prompts], return_tensors="pt", padding="max_length",
                     truncation=True, max_length=max_length)


def encode_prompts(text_encoder, tokenizer, prompts: list, max_length: int, device) -> torch.Tensor:
    """(prompts, max_length, 3 x hidden): Qwen3's hidden states of QWEN_LAYERS side by side, token by token, as
    Flux2KleinPipeline.encode_prompt makes them."""
    inputs = qwen_inputs(tokenizer, prompts, max_length)
    output = text_encoder(input_ids=inputs.input_ids.to(device), attention_mask=inputs.attention_mask.to(device),
                          output_hidden_states=True, use_cache=False)
    hidden = torch.stack([output.hidden_states[k] for k in QWEN_LAYERS], dim=2)  # (prompts, tokens, 3, hidden)
    return hidden.flatten(2)


class KleinObjective(RectifiedFlow):
    """Rectified flow on patchified latents normalised by the VAE's batch-norm statistics, with FLUX.2's forward
    call (tokens, position ids, timestep / 1000, no guidance)."""

    def __init__(self, components: Components, config):
        super().__init__(components.noise_scheduler, 0.0, 1.0, config.timestep_sampling)
        bn, eps = components.vae.bn, components.vae.config.batch_norm_eps
        self.bn_mean = bn.running_mean.detach().float().view(1, -1, 1, 1)
        self.bn_std = torch.sqrt(bn.running_var.detach().float() + eps).view(1, -1, 1, 1)

    def normalised(self, latents, noise):
        """The noise is patchified too: a permutation of i.i.d. draws, so still standard normal."""
        mean, std = (s.to(latents.device, latents.dtype) for s in (self.bn_mean, self.bn_std))
        return (patchify(latents) - mean) / std, patchify(noise)

    def predict(self, denoiser, model_input, timesteps, conditioning: dict):
        _, _, height, width = model_input.shape
        tokens = denoiser(hidden_states=pack(model_input), timestep=timesteps / 1000, guidance=None,
                          img_ids=image_ids(height, width, model_input.device), return_dict=False, **conditioning)[0]
        return unpack(tokens, height, width)


class KleinConditioning:
    """The transformer's conditioning for a batch: each row's prompt embeddings (Qwen3 runs once per prompt, at
    start-up) and their position ids."""

    def __init__(self, components: Components, prompts: dict, device, dtype, max_length: int):
        qwen, tokenizer = components.text_encoders["text_encoder"], components.tokenizers["tokenizer"]
        with torch.no_grad():
            embeddings = encode_prompts(qwen, tokenizer, list(prompts.values()), max_length, device).to(dtype)
        self.embeddings = dict(zip(prompts, embeddings))
        self.text_ids = text_ids(max_length, device)

    def __call__(self, batch) -> dict:
        hidden = torch.stack([self.embeddings[part] for _, _, part in batch["keys"]])
        return {"encoder_hidden_states": hidden, "txt_ids": self.text_ids}


class Flux2Klein(FlowMatchingTransformer, ModelFamily):
    name = FAMILY
    pipeline_class_names = ("Flux2KleinPipeline",)
    component_folders = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    denoiser_part, denoiser_label = "transformer", "transformer"
    denoiser_target_modules = TRANSFORMER_TARGET_MODULES
    trainable_text_encoders = ()  # Qwen3 stays frozen
    text_encoder_target_modules = ()
    default_resolution = 1024
    resolution_multiple = 16  # the VAE's 8, times the 2 x 2 patches
    accepted_flags = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "max_sequence_length")
    kohya_prefixes = {"transformer": "lora_unet"}
    vae_class_name = "AutoencoderKLFlux2"
    transformer_class_name = "Flux2Transformer2DModel"
    supported_encoders = SUPPORTED_ENCODERS
    tokenizer_parts = ("tokenizer",)
    single_file_layout = BFL_FLUX2
    takes_negative_prompt = False  # the pipeline's unconditional pass always reads the empty prompt
    # PEFT's image-generation benchmark on [klein] base 4B (750 steps, batch 2, 512 px, lr 1e-4, no adapter
    # dropout), in bf16 with checkpointing as there; prior preservation stays, as in every recipe of this launcher
    launcher_recipe = ("--learning_rate=1e-4", "--max_train_steps=750", "--resolution=512", "--train_batch_size=2",
                       "--boft_dropout=0", "--mixed_precision=bf16", "--gradient_checkpointing")

    def check_flags(self, flags, resolution):
        super().check_flags(flags, resolution)
        if flags.train_text_encoder:
            raise UserError(f"--train_text_encoder: {FAMILY}'s text encoder (Qwen3) stays frozen here, as in "
                            "diffusers' klein script; drop the flag to train the transformer")
        if flags.max_sequence_length is not None and flags.max_sequence_length > MAX_LENGTH:
            raise UserError(f"--max_sequence_length {flags.max_sequence_length}: {FAMILY}'s pipeline reads at most "
                            f"{MAX_LENGTH} tokens")

    def prompt_ids(self, components, prompts, config):
        """Qwen3's token ids of each templated prompt (nothing reads them every step: Qwen3 is encoded once)."""
        tokenizer, length = components.tokenizers["tokenizer"], max_sequence_length(config)
        for part, prompt in prompts.items():
            warn_if_truncated(tokenizer, prompt, PROMPT_FLAGS.get(part, "the prompt"), length)
        ids = qwen_inputs(tokenizer, list(prompts.values()), length).input_ids
        return dict(zip(prompts, ids))

    def conditioning(self, components, prompts, trained, device, dtype, config):
        return KleinConditioning(components, prompts, device, dtype, max_sequence_length(config))

    def objective(self, components, config):
        return KleinObjective(components, config)

    def meta_step(self, transformer, resolution, rows, dtype, config):
        """The transformer's forward call on meta tensors of a training step's shapes (one token per 16 x 16
        pixels, --max_sequence_length text tokens), for utils/run/activations.py."""
        side, length, meta = resolution // 16, max_sequence_length(config), dict(device="meta", dtype=dtype)
        arguments = dict(
            hidden_states=torch.randn(rows, side * side, transformer.config.in_channels, **meta).requires_grad_(),
            encoder_hidden_states=torch.randn(rows, length, transformer.config.joint_attention_dim, **meta),
            timestep=torch.full((rows,), 0.5, **meta), img_ids=image_ids(side, side, "cpu"),
            txt_ids=text_ids(length, "cpu"), guidance=None, return_dict=False)
        return lambda: transformer(**arguments)

    def generation_arguments(self, config):
        """Qwen3's length as in training, and the guidance of the model's kind: validation's pipeline is built from
        the run's components, which do not carry model_index.json's is_distilled (that turns guidance off)."""
        _, guidance = SAMPLING_DEFAULTS[is_distilled(config.pretrained_model_name_or_path, config.revision)]
        return {"max_sequence_length": max_sequence_length(config), "guidance_scale": guidance}

    def sampling_defaults(self, pipeline):
        return SAMPLING_DEFAULTS[bool(pipeline.config.is_distilled)]

    def base_model_version(self, pipeline):
        return "flux2_klein"
