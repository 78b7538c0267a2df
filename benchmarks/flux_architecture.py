"""FLUX.1 [dev]'s real configurations (transformer, CLIP-L, T5-XXL, VAE, scheduler) for the dry run's plan and the
benchmarks, without any weights."""

import json
from pathlib import Path

FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=[16, 56, 56])
FLUX_VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=16, layers_per_block=2, norm_num_groups=32,
                sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False, force_upcast=True)
CLIP_L = dict(model_type="clip_text_model", architectures=["CLIPTextModel"], hidden_size=768, intermediate_size=3072,
              num_hidden_layers=12, num_attention_heads=12, projection_dim=768, vocab_size=49408,
              max_position_embeddings=77, hidden_act="quick_gelu")
T5_XXL = dict(model_type="t5", architectures=["T5EncoderModel"], d_model=4096, d_ff=10240, d_kv=64, num_heads=64,
              num_layers=24, vocab_size=32128, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
              is_encoder_decoder=False, use_cache=False)


def save_flux_configs(folder, guidance_embeds: bool = True) -> Path:
    """A FLUX.1 pipeline folder ([dev]; [schnell] without the guidance embedding) with every configuration and no
    weights: what --dry_run reads."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    configs = {"transformer": {**FLUX_DEV_TRANSFORMER, "guidance_embeds": guidance_embeds,
                               "_class_name": "FluxTransformer2DModel"},
               "vae": {**FLUX_VAE, "_class_name": "AutoencoderKL"}, "text_encoder": CLIP_L, "text_encoder_2": T5_XXL}
    for part, config in configs.items():
        (folder / part).mkdir(parents=True, exist_ok=True)
        (folder / part / "config.json").write_text(json.dumps(config, indent=1))
    for part in ("tokenizer", "tokenizer_2"):
        (folder / part).mkdir(parents=True, exist_ok=True)
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=guidance_embeds, base_shift=0.5, max_shift=1.15,
                                    base_image_seq_len=256, max_image_seq_len=4096).save_config(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1"}))
    return folder


# The benchmark's FLUX.1: the real widths (3072, 24 heads of 128, a 4 x MLP, T5's 4096-wide states) at one double- and
# one single-stream block of the real 19 and 38, so that a step fits a CPU; `text_tokens` T5 tokens a prompt.
BENCHMARK_DEPTH = dict(num_layers=1, num_single_layers=1)


def build_flux_transformer(seed: int = 0, **depth):
    """A FluxTransformer2DModel of FLUX.1 [dev]'s widths with random weights (one block of each kind by default)."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**FLUX_DEV_TRANSFORMER, **(depth or BENCHMARK_DEPTH)})


def flux_step_inputs(transformer, batch: int, resolution: int, text_tokens: int, generator) -> tuple:
    """(packed latents, the other keyword arguments of a training forward call) at `resolution`."""
    import torch

    from utils.families.flux import image_ids

    size = resolution // 8
    latents = torch.randn(batch, (size // 2) ** 2, transformer.config.in_channels, generator=generator)
    arguments = dict(encoder_hidden_states=torch.randn(batch, text_tokens, 4096, generator=generator),
                     pooled_projections=torch.randn(batch, 768, generator=generator),
                     timestep=torch.tensor([0.01, 0.5])[:batch], guidance=torch.full((batch,), 1.0),
                     img_ids=image_ids(size, size, "cpu", torch.float32), txt_ids=torch.zeros(text_tokens, 3),
                     return_dict=False)
    return latents, arguments
