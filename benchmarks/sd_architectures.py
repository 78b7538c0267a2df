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
