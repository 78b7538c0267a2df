"""UNet configurations of SD 1.5 and SD 2.1, built with random weights (no download) for timing."""

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
ARCHITECTURES = {"sd15": (SD15_UNET, 768), "sd21": (SD21_UNET, 1024)}


def build_unet(name: str, seed: int = 0):
    """(UNet2DConditionModel with random weights, text hidden size) for an architecture name."""
    import torch
    from diffusers import UNet2DConditionModel

    config, text_dim = ARCHITECTURES[name]
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config), text_dim


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
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=text_dim, intermediate_size=4 * text_dim, num_hidden_layers=12 if name == "sd15" else 23,
        num_attention_heads=text_dim // 64, max_position_embeddings=77, projection_dim=text_dim,
        hidden_act="quick_gelu" if name == "sd15" else "gelu",
    ))
    tiny = build_tiny_pipeline(prediction_type="epsilon" if name == "sd15" else "v_prediction", seed=seed)
    full_size = dict(vae=vae, text_encoder=text_encoder, unet=unet)
    StableDiffusionPipeline(**{**tiny.components, **full_size}, requires_safety_checker=False).save_pretrained(folder)
    return folder
