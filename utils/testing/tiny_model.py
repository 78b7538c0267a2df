"""Tiny Stable Diffusion, SDXL, FLUX.1, SD3 and FLUX.2 [klein] pipelines with random weights, and a synthetic subject to train on.

Tests, the demo and CI cannot download real weights, so they build a pipeline with the real component classes
(UNet2DConditionModel, CLIPTextModel(WithProjection), CLIPTokenizer, AutoencoderKL, DDPMScheduler) at toy sizes,
save it with `save_pretrained`, and load it back through the same `from_pretrained` path a real model takes.

    python -m utils.testing.tiny_model data/tiny-sd                     # the pipeline
    python -m utils.testing.tiny_model data/tiny-sd --subject data/demo  # and a synthetic subject
    python -m utils.testing.tiny_model data/tiny-sdxl --family sdxl      # an SDXL pipeline
    python -m utils.testing.tiny_model data/tiny-flux --family flux      # a FLUX.1 [dev] pipeline
    python -m utils.testing.tiny_model data/tiny-sd3 --family sd3        # an SD3.5 Medium-shaped pipeline
    python -m utils.testing.tiny_model data/tiny-klein --family klein    # a FLUX.2 [klein] base pipeline
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

# Channel widths are multiples of 8 and 16 so every BOFT block number the tests use divides them.
UNET_CHANNELS = (32, 64)
TEXT_HIDDEN_SIZE = 32
# Byte-level BPE alphabet of CLIP's tokenizer: every byte maps to one printable character.
_BYTE_RANGES = [(ord("!"), ord("~")), (ord("¡"), ord("¬")), (ord("®"), ord("ÿ"))]


def _byte_alphabet() -> list[str]:
    printable = [b for lo, hi in _BYTE_RANGES for b in range(lo, hi + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def _tiny_vocabulary() -> dict[str, int]:
    """CLIP's byte alphabet alone, with no merges: every character is a token."""
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=64,
    )


def _tiny_text_config(hidden_size=TEXT_HIDDEN_SIZE):
    from transformers import CLIPTextConfig

    vocab_size = len(_tiny_vocabulary())
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_HIDDEN_SIZE,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _tiny_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_tiny_vocabulary(), merges=[], model_max_length=77)


def _tiny_scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type, steps_offset=1, clip_sample=False)


def build_tiny_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """Return a StableDiffusionPipeline with random weights, small enough to train on a CPU in seconds."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    return StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_tiny_text_config()),
        tokenizer=_tiny_tokenizer(),
        unet=unet,
        scheduler=_tiny_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


XL_TIME_EMBED_DIM = 8  # per added condition; SDXL has six (original size, crop corner, target size)
# The second text encoder is wider than the first, as in SDXL (1280 and 768): single-file loaders tell them apart
# by width.
XL_SECOND_TEXT_HIDDEN_SIZE = 48


def build_tiny_xl_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """A StableDiffusionXLPipeline with random weights: SDXL's structure (two text encoders side by side, the
    pooled embedding and the six size-and-crop numbers as added conditioning, a plain first block) at toy size."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=XL_TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=TEXT_HIDDEN_SIZE + 6 * XL_TIME_EMBED_DIM,
        cross_attention_dim=TEXT_HIDDEN_SIZE + XL_SECOND_TEXT_HIDDEN_SIZE,
        norm_num_groups=16,
    )
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_tiny_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_tiny_text_config(XL_SECOND_TEXT_HIDDEN_SIZE)),
        tokenizer=_tiny_tokenizer(),
        tokenizer_2=_tiny_tokenizer(),
        unet=unet,
        scheduler=_tiny_scheduler(prediction_type),
        add_watermarker=False,
    )


FLUX_HEADS, FLUX_HEAD_DIM = 2, 16  # 32 wide, the real model's 24 x 128 = 3072 at toy size
T5_HIDDEN_SIZE = 32
T5_MAX_LENGTH = 512


def _tiny_t5_tokenizer():
    """A Unigram tokenizer over single characters (T5's model, no sentencepiece file needed)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(c), -2.0) for c in range(ord("!"), ord("~") + 1)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _tiny_shifted_vae(shift_factor: float, scaling_factor: float):
    """A VAE that shifts and scales its latents, as the flow-matching families' do (no quant convolutions)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8, layers_per_block=1,
        sample_size=64, shift_factor=shift_factor, scaling_factor=scaling_factor, use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _tiny_t5(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def build_tiny_flux_pipeline(guidance_embeds: bool = True, seed: int = 0):
    """A FluxPipeline with random weights: FLUX.1's structure (double- and single-stream blocks over 2 x 2 packed
    16-channel latents, CLIP-L pooled and T5 sequence conditioning, a guidance embedding for [dev], none for
    [schnell]) at toy size, with a VAE that shifts and scales its latents as FLUX's does."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer_2 = _tiny_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=FLUX_HEAD_DIM,
        num_attention_heads=FLUX_HEADS, joint_attention_dim=T5_HIDDEN_SIZE, pooled_projection_dim=TEXT_HIDDEN_SIZE,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )
    vae = _tiny_shifted_vae(shift_factor=0.1159, scaling_factor=0.3611)
    t5 = _tiny_t5(tokenizer_2, T5_HIDDEN_SIZE)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=guidance_embeds, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=CLIPTextModel(_tiny_text_config()),
                        tokenizer=_tiny_tokenizer(), text_encoder_2=t5, tokenizer_2=tokenizer_2,
                        transformer=transformer)


SD3_HEADS, SD3_HEAD_DIM = 2, 16  # 32 wide (SD3.5 Medium: 24 x 64)
# T5 is wider than both CLIPs side by side (32 + 48), which the pipeline zero-pads to T5's width, as in SD3 (4096).
SD3_T5_HIDDEN_SIZE = 96


def build_tiny_sd3_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline with random weights: SD3.5 Medium's structure (joint blocks over 2 x 2 patches,
    the first with a second image self-attention, RMS q/k norms; CLIP-L and CLIP-G with projections and T5) at toy
    size, with a VAE that shifts and scales its latents as SD3's does."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer_3 = _tiny_t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=SD3_HEAD_DIM,
        num_attention_heads=SD3_HEADS, joint_attention_dim=SD3_T5_HIDDEN_SIZE, caption_projection_dim=SD3_HEADS *
        SD3_HEAD_DIM, pooled_projection_dim=2 * TEXT_HIDDEN_SIZE, pos_embed_max_size=16, dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer,
        vae=_tiny_shifted_vae(shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=CLIPTextModelWithProjection(_tiny_text_config()), tokenizer=_tiny_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_tiny_text_config(XL_SECOND_TEXT_HIDDEN_SIZE)),
        tokenizer_2=_tiny_tokenizer(), text_encoder_3=_tiny_t5(tokenizer_3, SD3_T5_HIDDEN_SIZE),
        tokenizer_3=tokenizer_3,
    )


# Qwen3's chat template as far as Flux2KleinPipeline uses it: one user turn, the assistant's turn opened, thinking off.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- if enable_thinking is defined and enable_thinking is "
    "false %}<think>\n\n</think>\n\n{%- endif %}{%- endif %}")
QWEN_HIDDEN_SIZE = 16
QWEN_LAYERS = 28  # the pipeline reads the hidden states of layers 9, 18 and 27


def _tiny_qwen_tokenizer():
    """A byte-level BPE over CLIP's byte alphabet with no merges (every byte a token), Qwen's special tokens and a
    chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocabulary = {token: i for i, token in enumerate(_byte_alphabet() + specials)}
    backend = Tokenizer(models.BPE(vocab=vocabulary, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def build_tiny_klein_pipeline(seed: int = 0):
    """A Flux2KleinPipeline with random weights: FLUX.2 [klein] base's structure (double- and single-stream blocks
    over patchified latents normalised by the VAE's batch norm, four-axis rotary ids, no guidance embedding; Qwen3
    read at three layers through its chat template) at toy size."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from diffusers import Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = _tiny_qwen_tokenizer()
    qwen = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=QWEN_HIDDEN_SIZE, intermediate_size=32, num_hidden_layers=QWEN_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
        tie_word_embeddings=True))
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=FLUX_HEAD_DIM,
        num_attention_heads=FLUX_HEADS, joint_attention_dim=3 * QWEN_HIDDEN_SIZE, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    vae = AutoencoderKLFlux2(block_out_channels=(16, 16, 16, 16), latent_channels=4, norm_num_groups=8,
                             layers_per_block=1, sample_size=64, use_quant_conv=False, use_post_quant_conv=False)
    vae.bn.running_mean.uniform_(-0.5, 0.5)  # statistics away from (0, 1), so that the normalisation shows
    vae.bn.running_var.uniform_(0.5, 2.0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=qwen, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)


def save_tiny_metric_models(folder, seed: int = 0) -> tuple[Path, Path]:
    """A tiny DINO-style ViT and a tiny CLIP, random weights, with their processors: (dino folder, clip folder)."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    torch.manual_seed(seed)
    dino, clip = Path(folder, "dino"), Path(folder, "clip")
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64)).save_pretrained(dino)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(dino)
    vocabulary = _tiny_vocabulary()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocabulary), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=len(vocabulary) - 2,
                         eos_token_id=len(vocabulary) - 1, pad_token_id=len(vocabulary) - 1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(clip)
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=_tiny_tokenizer(),
    ).save_pretrained(clip)
    return dino, clip


# family -> (builder, whether it takes a prediction type: the DDPM families do, flow matching has none)
BUILDERS = {"sd": (build_tiny_pipeline, True), "sdxl": (build_tiny_xl_pipeline, True),
            "flux": (lambda: build_tiny_flux_pipeline(guidance_embeds=True), False),
            "flux-schnell": (lambda: build_tiny_flux_pipeline(guidance_embeds=False), False),
            "sd3": (build_tiny_sd3_pipeline, False), "klein": (build_tiny_klein_pipeline, False)}


def save_tiny_pipeline(folder, prediction_type: str | None = None, family: str = "sd") -> Path:
    folder = Path(folder)
    build, takes_prediction_type = BUILDERS[family]
    if prediction_type and not takes_prediction_type:
        raise ValueError(f"a prediction type applies to sd and sdxl; {family} is trained by flow matching")
    (build(prediction_type or "epsilon") if takes_prediction_type else build()).save_pretrained(folder)
    return folder


def make_synthetic_subject(folder, num_images: int = 4, size: int = 96, seed: int = 0) -> Path:
    """Photos of one made-up object: a red disc on a blue square, seen at different places and scales."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        background = tuple(int(v) for v in rng.integers(150, 255, 3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        half = int(size * rng.uniform(0.2, 0.35))
        cx, cy = (int(v) for v in rng.integers(half, size - half, 2))
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=(30, 60, 200))
        draw.ellipse([cx - half // 2, cy - half // 2, cx + half // 2, cy + half // 2], fill=(220, 30, 30))
        image.save(folder / f"{i:02d}.jpg", quality=95)
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", nargs="?", help="folder to write the pipeline to (save_pretrained layout)")
    parser.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction"],
                        help="sd and sdxl (default epsilon); flow-matching families have none")
    parser.add_argument("--family", default="sd", choices=list(BUILDERS),
                        help="sd: SD 1.x/2.x structure; sdxl; flux: FLUX.1 [dev]; flux-schnell: without guidance; "
                        "sd3: SD3.5 Medium's structure; klein: FLUX.2 [klein] base's")
    parser.add_argument("--subject", help="also write a synthetic subject's photos to this folder")
    parser.add_argument("--metric_models", help="also write tiny random DINO and CLIP models to this folder (dino/, "
                        "clip/), for utils.evaluate's --dino_model and --clip_model offline")
    args = parser.parse_args(argv)
    if not (args.output or args.subject or args.metric_models):
        parser.error("give a folder for the pipeline, --subject or --metric_models")
    if args.prediction_type and not BUILDERS[args.family][1]:
        parser.error(f"--prediction_type applies to sd and sdxl; {args.family} is trained by flow matching")
    if args.output:
        print(f"tiny pipeline written to {save_tiny_pipeline(args.output, args.prediction_type, args.family)}")
    if args.subject:
        print(f"synthetic subject written to {make_synthetic_subject(args.subject)}")
    if args.metric_models:
        dino, clip = save_tiny_metric_models(args.metric_models)
        print(f"tiny metric models written to {dino} and {clip}")


if __name__ == "__main__":
    main()
