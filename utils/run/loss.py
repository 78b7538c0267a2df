"""The training step's parts: latents, the diffusion loss, the optimizer and the lr schedule."""

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from utils import quiet
from utils.run.dataset import example_noise
from utils.run.latents import encode_one


def latent_posterior(batch, vae, dtype, cache=None):
    """(mean, std) of each row's VAE posterior in `dtype`: read for cached rows, encoded now in the VAE's dtype
    (one row at a time, see utils/run/latents.py) for pixel rows, and cached when allowed."""
    rows = [None] * len(batch["keys"])
    for j, row in enumerate(batch["pixel_rows"]):
        rows[row] = encode_one(vae, batch["pixel_values"][j], vae.dtype)
        if cache is not None and batch["pixel_cache_keys"][j] is not None:
            cache.save(batch["pixel_cache_keys"][j], *rows[row], batch["time_ids"][row])
    for j, row in enumerate(batch["latent_rows"]):
        rows[row] = (batch["latent_mean"][j], batch["latent_std"][j])
    return (torch.stack([mean for mean, _ in rows]).to(vae.device, dtype),
            torch.stack([std for _, std in rows]).to(vae.device, dtype))


def diffusion_loss(batch, mean, std, conditioning: dict, denoiser, objective, seed, prior_loss_weight=None,
                   timer=None):
    """Draw each example's latent sample, noise and timestep (keyed by the example: utils/run/dataset.py), let the
    model family's objective turn them into the denoiser's input and target (its training maths: utils/families),
    and regress the target, each example weighted where the objective weights them. `conditioning` holds the
    denoiser's keyword arguments for the batch.

    With prior preservation (`prior_loss_weight` given) the class half of the batch gets its own weighted loss.
    """
    draws = example_noise(seed, batch["keys"], mean.shape[1:], objective.draw_timestep)
    latent_eps, noise, timesteps = (draw.to(mean.device) for draw in draws)
    terms = objective.terms(mean, std, latent_eps, noise, timesteps)
    with timer("denoiser_forward") if timer else nullcontext():
        prediction = objective.predict(denoiser, terms.model_input, terms.timesteps, conditioning)
    errors = (prediction.float() - terms.target.float()) ** 2
    if terms.weight is not None:
        errors = terms.weight.float() * errors
    if prior_loss_weight is None:
        return errors.mean()
    instance, prior = errors.chunk(2)
    return instance.mean() + prior_loss_weight * prior.mean()


# Devices where torch's single-kernel AdamW runs; elsewhere (mps, xpu, ...) its default implementation is used.
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def make_optimizer(config, params):
    """AdamW (or bitsandbytes' 8-bit AdamW) at the configured learning rate (--scale_lr is already in it)."""
    settings = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                    weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    if config.use_8bit_adam:
        return quiet.import_bitsandbytes().optim.AdamW8bit(params, **settings)
    # One pass over the adapter weights instead of one per update term: 3x faster steps on a CPU.
    fused = all(p.device.type in FUSED_ADAMW_DEVICES and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **settings)


def make_lr_scheduler(config, optimizer):
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process for every optimizer step.
    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * config.num_processes,
        num_training_steps=config.max_train_steps * config.num_processes,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )
