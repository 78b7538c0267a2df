"""The training maths of the flow-matching families (FLUX.1; SD3.5 and FLUX.2 next): rectified flow.

Latents are shifted and scaled as the family's VAE says; a timestep is an index into the training scheduler's
(shifted) schedule, drawn per example with diffusers' weighting schemes (uniform, logit-normal, mode; cosmap and
sigma_sqrt draw uniformly and weight the loss instead); the noisy input is x_t = (1 - sigma) x + sigma eps and the
target the velocity eps - x. A family adds its own input packing and forward call (flux.py).
"""

import math

import torch

from utils.families import Objective, TrainingTerms


def draw_schedule_fraction(generator, sampling) -> torch.Tensor:
    """u in [0, 1): where in the schedule one example's timestep falls, drawn as diffusers'
    compute_density_for_timestep_sampling draws it, but from the example's own generator (exact resume)."""
    if sampling.weighting_scheme == "logit_normal":
        return torch.sigmoid(torch.randn((), generator=generator) * sampling.logit_std + sampling.logit_mean)
    u = torch.rand((), generator=generator)
    if sampling.weighting_scheme == "mode":
        return 1 - u - sampling.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


class RectifiedFlow(Objective):
    """Rectified flow over a FlowMatchEulerDiscreteScheduler's training schedule; `predict` is the family's."""

    def __init__(self, noise_scheduler, shift_factor: float, scaling_factor: float, sampling):
        self.sigmas = noise_scheduler.sigmas.detach().clone().float()  # as loaded: the training schedule
        self.schedule_timesteps = noise_scheduler.timesteps.detach().clone().float()
        self.num_timesteps = noise_scheduler.config.num_train_timesteps
        self.shift_factor, self.scaling_factor, self.sampling = shift_factor or 0.0, scaling_factor, sampling

    def draw_timestep(self, generator):
        u = draw_schedule_fraction(generator, self.sampling)
        return (u * self.num_timesteps).long().clamp(0, self.num_timesteps - 1)

    def terms(self, mean, std, latent_eps, noise, timesteps) -> TrainingTerms:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        latents = (mean + std * latent_eps.to(mean.dtype) - self.shift_factor) * self.scaling_factor
        noise = noise.to(latents.dtype)
        indices = timesteps.to("cpu")
        sigma = self.sigmas[indices].to(latents.device, latents.dtype).view(-1, *[1] * (latents.ndim - 1))
        noisy = (1 - sigma) * latents + sigma * noise
        weight = compute_loss_weighting_for_sd3(self.sampling.weighting_scheme, sigma)
        return TrainingTerms(noisy, self.schedule_timesteps[indices].to(latents.device), noise - latents, weight)
