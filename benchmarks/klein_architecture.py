"""FLUX.2 [klein] base 4B's and 9B's real configurations (transformer, Qwen3 text encoder, VAE, scheduler) for the dry
run's plan and the benchmarks, without any weights; as black-forest-labs/FLUX.2-klein-base-4B and -9B publish them."""

import json
from pathlib import Path

KLEIN_TRANSFORMERS = {
    "4b": dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
               axes_dims_rope=[32, 32, 32, 32], rope_theta=2000, guidance_embeds=False),
    "9b": dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=24, attention_head_dim=128,
               num_attention_heads=32, joint_attention_dim=12288, timestep_guidance_channels=256, mlp_ratio=3.0,
               axes_dims_rope=[32, 32, 32, 32], rope_theta=2000, guidance_embeds=False),
}
# Qwen3-4B and Qwen3-8B: the transformer reads three of their layers' hidden states side by side (3 x hidden)
QWEN3 = {
    "4b": dict(hidden_size=2560, intermediate_size=9728, tie_word_embeddings=True),
    "9b": dict(hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False),
}
QWEN3_COMMON = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], num_hidden_layers=36,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000)
KLEIN_VAE = dict(block_out_channels=[128, 256, 512, 512], latent_channels=32, layers_per_block=2,
                 norm_num_groups=32, sample_size=1024, batch_norm_eps=1e-4)


def save_klein_configs(folder, variant: str = "4b") -> Path:
    """A FLUX.2 [klein] base pipeline folder (4B or 9B) with every configuration and no weights: what --dry_run
    reads."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    configs = {"transformer": {**KLEIN_TRANSFORMERS[variant], "_class_name": "Flux2Transformer2DModel"},
               "vae": {**KLEIN_VAE, "_class_name": "AutoencoderKLFlux2"},
               "text_encoder": {**QWEN3_COMMON, **QWEN3[variant]}}
    for part, config in configs.items():
        (folder / part).mkdir(parents=True, exist_ok=True)
        (folder / part / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                    base_image_seq_len=256, max_image_seq_len=4096).save_config(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": False,
                                                         "_diffusers_version": "0.42.1"}))
    return folder


def build_klein_transformer(variant: str = "4b", seed: int = 0, **depth):
    """A Flux2Transformer2DModel of klein base's widths with random weights, one double- and one single-stream block
    of the real ones by default (so that a step fits a CPU)."""
    import torch
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(**{**KLEIN_TRANSFORMERS[variant], **(depth or dict(num_layers=1,
                                                                                      num_single_layers=1))})


def klein_step_inputs(transformer, batch: int, resolution: int, text_tokens: int, generator) -> tuple:
    """(the patchified latents as tokens, the other keyword arguments of a training forward call) at `resolution`."""
    import torch

    from utils.families.flux2_klein import image_ids, text_ids

    side = resolution // 16
    latents = torch.randn(batch, side * side, transformer.config.in_channels, generator=generator)
    arguments = dict(encoder_hidden_states=torch.randn(batch, text_tokens, transformer.config.joint_attention_dim,
                                                       generator=generator),
                     timestep=torch.tensor([0.01, 0.5])[:batch], guidance=None, img_ids=image_ids(side, side, "cpu"),
                     txt_ids=text_ids(text_tokens, "cpu"), return_dict=False)
    return latents, arguments
