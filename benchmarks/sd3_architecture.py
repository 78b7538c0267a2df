"""SD3.5 Large's and Medium's real configurations (transformer, CLIP-L, CLIP-G, T5-XXL, VAE, scheduler) for the dry
run's plan and the benchmarks, without any weights."""

import json
from pathlib import Path

from benchmarks.flux_architecture import CLIP_L, T5_XXL

SD35_TRANSFORMERS = {
    "large": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm",
                  dual_attention_layers=[]),
    "medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=list(range(13))),
}
CLIP_G = dict(model_type="clip_text_model", architectures=["CLIPTextModelWithProjection"], hidden_size=1280,
              intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280,
              vocab_size=49408, max_position_embeddings=77, hidden_act="gelu")
SD3_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=16, layers_per_block=2, norm_num_groups=32,
               sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False, force_upcast=True)


def save_sd3_configs(folder, variant: str = "large") -> Path:
    """An SD3.5 pipeline folder (Large or Medium) with every configuration and no weights: what --dry_run reads."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    configs = {"transformer": {**SD35_TRANSFORMERS[variant], "_class_name": "SD3Transformer2DModel"},
               "vae": {**SD3_VAE, "_class_name": "AutoencoderKL"},
               "text_encoder": {**CLIP_L, "architectures": ["CLIPTextModelWithProjection"]},
               "text_encoder_2": CLIP_G, "text_encoder_3": T5_XXL}
    for part, config in configs.items():
        (folder / part).mkdir(parents=True, exist_ok=True)
        (folder / part / "config.json").write_text(json.dumps(config, indent=1))
    for part in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        (folder / part).mkdir(parents=True, exist_ok=True)
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                         "_diffusers_version": "0.42.1"}))
    return folder


def build_sd3_transformer(variant: str = "medium", seed: int = 0, num_layers: int = 2):
    """An SD3Transformer2DModel of SD3.5's widths with random weights and `num_layers` joint blocks (Medium's first
    ones have the second self-attention; the last block reads the text only)."""
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    config = dict(SD35_TRANSFORMERS[variant], num_layers=num_layers)
    config["dual_attention_layers"] = [i for i in config["dual_attention_layers"] if i < num_layers - 1]
    return SD3Transformer2DModel(**config)


def sd3_step_inputs(transformer, batch: int, resolution: int, t5_tokens: int, generator) -> tuple:
    """(the latents, the other keyword arguments of a training forward call) at `resolution`: 77 CLIP tokens and
    `t5_tokens` T5 tokens."""
    import torch

    size = resolution // 8
    latents = torch.randn(batch, transformer.config.in_channels, size, size, generator=generator)
    arguments = dict(encoder_hidden_states=torch.randn(batch, 77 + t5_tokens, transformer.config.joint_attention_dim,
                                                       generator=generator),
                     pooled_projections=torch.randn(batch, transformer.config.pooled_projection_dim,
                                                    generator=generator),
                     timestep=torch.tensor([10.0, 500.0])[:batch], return_dict=False)
    return latents, arguments
