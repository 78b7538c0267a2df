"""Loading the Stable Diffusion components: tokenizer, text encoder, VAE, UNet and noise scheduler.

A local folder in diffusers layout and a hub id (honouring --revision) take the same path. Every way this can
fail that a user can fix (a missing sub-folder, an id that is not cached while offline, an unsupported text
encoder) ends in a UserError naming what is missing.
"""

from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError
from utils.hub import hub_offline

COMPONENT_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SUPPORTED_TEXT_ENCODERS = ("CLIPTextModel",)


@dataclass
class StableDiffusionParts:
    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    noise_scheduler: object


def check_model_source(name_or_path: str, revision=None) -> None:
    """Fail early, with a fix, when the model cannot be found; download nothing but configs."""
    if Path(name_or_path).is_dir():
        missing = [f for f in COMPONENT_FOLDERS if not (Path(name_or_path) / f).is_dir()]
        if missing:
            raise UserError(
                f"the model folder {name_or_path} has no {', '.join(f + '/' for f in missing)} sub-folder: "
                "pass a Stable Diffusion folder in diffusers layout (as written by save_pretrained)"
            )
        return
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"the model folder {name_or_path} does not exist")
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(name_or_path, "model_index.json", revision=revision)
    except Exception as error:  # huggingface_hub raises many types here; all mean "cannot reach this model"
        reason = "HF_HUB_OFFLINE is set and it is not in the local cache" if hub_offline() else type(error).__name__
        raise UserError(
            f"cannot load the model {name_or_path} ({reason}). Download it once with network access "
            f"(`hf download {name_or_path}`), or pass a local folder in diffusers layout to "
            "--pretrained_model_name_or_path"
        ) from None


def text_encoder_class(name_or_path: str, revision=None):
    from transformers import CLIPTextModel, PretrainedConfig

    # The raw config: building a PretrainedConfig from a CLIP one logs a spurious model-type mismatch.
    config, _ = PretrainedConfig.get_config_dict(name_or_path, subfolder="text_encoder", revision=revision)
    architecture = (config.get("architectures") or ["(none given)"])[0]
    if architecture not in SUPPORTED_TEXT_ENCODERS:
        raise UserError(
            f"the text encoder of {name_or_path} is a {architecture}; this trainer supports "
            f"{', '.join(SUPPORTED_TEXT_ENCODERS)} (Stable Diffusion 1.x and 2.x)"
        )
    return CLIPTextModel


def load_models(args) -> StableDiffusionParts:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer

    source, revision = args.pretrained_model_name_or_path, args.revision
    if args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name, revision=revision)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision)
    return StableDiffusionParts(
        tokenizer=tokenizer,
        text_encoder=text_encoder_class(source, revision).from_pretrained(
            source, subfolder="text_encoder", revision=revision
        ),
        vae=AutoencoderKL.from_pretrained(source, subfolder="vae", revision=revision),
        unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", revision=revision),
        noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", revision=revision),
    )


def empty_models(args):
    """The UNet and text encoder built from their configs on the meta device: layer shapes, no weights."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    source, revision = args.pretrained_model_name_or_path, args.revision
    encoder_class = text_encoder_class(source, revision)
    encoder_config = encoder_class.config_class.from_pretrained(source, subfolder="text_encoder", revision=revision)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(source, subfolder="unet", revision=revision))
        text_encoder = encoder_class(encoder_config)
    return unet, text_encoder


def cast_frozen(model, dtype):
    """Frozen weights take the mixed-precision dtype; trainable (adapter) parameters stay fp32."""
    for parameter in model.parameters():
        if not parameter.requires_grad:
            parameter.data = parameter.data.to(dtype)


def enable_xformers(unet) -> str | None:
    """xformers attention where it works (CUDA and the package); otherwise a warning and PyTorch SDPA stays."""
    import torch
    from diffusers.utils.import_utils import is_xformers_available

    if not (torch.cuda.is_available() and is_xformers_available()):
        return "xformers needs CUDA and the xformers package; using PyTorch scaled-dot-product attention"
    try:
        unet.enable_xformers_memory_efficient_attention()
    except Exception as error:  # a wheel built for another torch fails here; SDPA is the safe fallback
        return f"xformers failed ({error}); using PyTorch scaled-dot-product attention"
    return None


def weight_dtype(mixed_precision):
    """The dtype frozen weights take under accelerate's mixed precision setting."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
