"""Putting the run's BOFT adapters on the loaded models, with their precision, attention and checkpointing."""

import logging

from utils.boft import peft_seam
from utils.families import cast_frozen, enable_xformers, vae_dtype, weight_dtype
from utils.quantization import quantize_base

logger = logging.getLogger(__name__)


def wrap_with_adapters(config, family, components, device, mixed_precision, sharded=False) -> dict:
    """BOFT adapters on the denoiser (and the family's trainable text encoders with --train_text_encoder); frozen weights in the
    mixed-precision dtype on `device` (a VAE that overflows in fp16 stays fp32). Returns the trained models by part
    (the family's denoiser part, "text_encoder", ...); the components then hold the wrapped models. `sharded` (FSDP):
    the trained models stay on the CPU, for FSDP to move each process's shards to its device (no whole copy there)."""
    dtype = weight_dtype(mixed_precision)
    components.vae.requires_grad_(False).to(device, vae_dtype(family, mixed_precision,
                                                              bool(config.pretrained_vae_model_name_or_path)))
    denoiser = family.denoiser_part
    if config.base_quantization:  # before the adapters, which then wrap the quantized layers
        logger.info(quantize_base(family, {denoiser: components.denoiser, **components.text_encoders},
                                  config.base_quantization, dtype, device))
    trained = {denoiser: peft_seam.add_boft_adapter(components.denoiser, family.denoiser_target_modules, config.boft,
                                                    config.run_name, family.denoiser_label)}
    components.denoiser = trained[denoiser]
    for part, encoder in components.text_encoders.items():
        if config.train_text_encoder and part in family.trainable_text_encoders:
            encoder = trained[part] = peft_seam.add_boft_adapter(encoder, family.text_encoder_target_modules,
                                                                 config.boft, config.run_name, part.replace("_", " "))
            components.text_encoders[part] = encoder
        else:
            encoder.requires_grad_(False)
        cast_frozen(encoder.to("cpu" if sharded and part in trained else device), dtype)
    cast_frozen(components.denoiser.to("cpu" if sharded else device), dtype)
    for part, model in trained.items():
        logger.info(peft_seam.trainable_parameter_summary(model, part.replace("_", " ")))
    if config.enable_xformers_memory_efficient_attention and (warning := enable_xformers(components.denoiser)):
        logger.warning(warning)
    if config.gradient_checkpointing:
        components.denoiser.enable_gradient_checkpointing()
        for part, model in trained.items():
            if part != denoiser:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return trained
