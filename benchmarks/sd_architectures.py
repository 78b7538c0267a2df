"""SD 1.5, SD 2.1 and SDXL base 1.0 architectures, built with random weights (no download) for timing, and SDXL's
configurations alone (a pipeline folder without weights) for --dry_run's memory plan.

    python -m benchmarks.sd_architectures data/sdxl-configs   # then train_dreambooth.py ... --dry_run on it
"""

import json
from pathlib import Path

SD15_UNET = dict(
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
)
SD21_UNET = dict(
    sample_size=96,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    block_out_channels=(320, 640, 1280, 1280),
)
SDXL_UNET = dict(
    sample_size=128,
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # pooled 1280 + 6 size-and-crop numbers x 256
)
SDXL_POOLED_DIM = 1280
ARCHITECTURES = {"sd15": (SD15_UNET, 768), "sd21": (SD21_UNET, 1024), "sdxl": (SDXL_UNET, 2048)}
# SDXL's text encoders: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (the second with its projection).
SDXL_TEXT_ENCODERS = {
    "text_encoder": dict(architectures=["CLIPTextModel"], hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768),
    "text_encoder_2": dict(architectures=["CLIPTextModelWithProjection"], hidden_size=1280, intermediate_size=5120,
                           num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu", projection_dim=1280),
}
# The VAE of SD 1.x/2.x; SDXL's has the same architecture, another scale and trained at 1024 px.
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)


def build_unet(name: str, seed: int = 0):
    """(UNet2DConditionModel with random weights, text hidden size) for an architecture name."""
    import torch
    from diffusers import UNet2DConditionModel

    config, text_dim = ARCHITECTURES[name]
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config), text_dim


def added_conditioning(unet, batch: int, resolution: int) -> dict:
    """SDXL's added conditions (pooled embedding, size and crop) for a batch; nothing for SD 1.x/2.x."""
    import torch

    if unet.config.addition_embed_type != "text_time":
        return {}
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=torch.float32)
    return {"added_cond_kwargs": {"text_embeds": torch.randn(batch, SDXL_POOLED_DIM), "time_ids": time_ids}}


def save_sdxl_configs(folder) -> Path:
    """An SDXL base 1.0 pipeline folder with every configuration and no weights: what --dry_run reads."""
    from diffusers import DDPMScheduler

    folder = Path(folder)
    text_common = {"model_type": "clip_text_model", "vocab_size": 49408, "max_position_embeddings": 77}
    configs = {"unet": {**SDXL_UNET, "_class_name": "UNet2DConditionModel"},
               "vae": {**SDXL_VAE, "_class_name": "AutoencoderKL"},
               **{part: {**config, **text_common} for part, config in SDXL_TEXT_ENCODERS.items()}}
    for part, config in configs.items():
        (folder / part).mkdir(parents=True, exist_ok=True)
        (folder / part / "config.json").write_text(json.dumps(config, indent=1))
    for part in ("tokenizer", "tokenizer_2"):
        (folder / part).mkdir(parents=True, exist_ok=True)
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_config(folder / "scheduler")
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1"}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder


def save_random_pipeline(name: str, folder, seed: int = 0):
    """A full Stable Diffusion pipeline of the real sizes with random weights, in diffusers layout (about 4 GB).

    Tokenizer, scheduler and assembly are the tiny pipeline's (utils/testing/tiny_model.py); its byte-level tokenizer
    gives token ids valid for the full-size text encoder, and tokenization costs nothing either way.
    """
    from pathlib import Path

    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from utils.testing.tiny_model import build_tiny_pipeline

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    unet, text_dim = build_unet(name, seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**SD_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=text_dim, intermediate_size=4 * text_dim, num_hidden_layers=12 if name == "sd15" else 23,
        num_attention_heads=text_dim // 64, max_position_embeddings=77, projection_dim=text_dim,
        hidden_act="quick_gelu" if name == "sd15" else "gelu",
    ))
    tiny = build_tiny_pipeline(prediction_type="epsilon" if name == "sd15" else "v_prediction", seed=seed)
    full_size = dict(vae=vae, text_encoder=text_encoder, unet=unet)
    StableDiffusionPipeline(**{**tiny.components, **full_size}, requires_safety_checker=False).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import sys

    print(f"SDXL configurations written to {save_sdxl_configs(sys.argv[1] if len(sys.argv) > 1 else 'data/sdxl-configs')}")
