"""The training maths of the denoising-diffusion families (SD 1.x/2.x, SDXL): the VAE's latents scaled by its
scaling factor, noise added at integer DDPM timesteps drawn uniformly, an epsilon or v target, the UNet's forward
call, and DPM-Solver multistep for sampling. The flow-matching families bring theirs (flow_matching.py)."""

import torch

from utils.errors import UserError
from utils.families import Objective, TrainingTerms


class DDPMObjective(Objective):
    """DDPM's noising at a timestep drawn uniformly from the training schedule's; the target the scheduler's
    prediction type names."""

    def __init__(self, noise_scheduler, scaling_factor: float):
        self.scheduler, self.scaling_factor = noise_scheduler, scaling_factor
        self.num_timesteps = noise_scheduler.config.num_train_timesteps

    def draw_timestep(self, generator):
        return torch.randint(0, self.num_timesteps, (), generator=generator)

    def terms(self, mean, std, latent_eps, noise, timesteps) -> TrainingTerms:
        latents = (mean + std * latent_eps.to(mean.dtype)) * self.scaling_factor
        noise = noise.to(latents.dtype)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return TrainingTerms(noisy, timesteps, noise)
        if prediction_type == "v_prediction":
            return TrainingTerms(noisy, timesteps, self.scheduler.get_velocity(latents, noise, timesteps))
        raise UserError(f"unknown prediction_type {prediction_type!r} in the scheduler config")

    def predict(self, denoiser, model_input, timesteps, conditioning: dict):
        return denoiser(model_input, timesteps, **conditioning).sample


class DenoisingDiffusion:
    """ModelFamily's training-maths and sampling members for a UNet trained on DDPM noise."""

    def objective(self, components, config) -> DDPMObjective:
        return DDPMObjective(components.noise_scheduler, components.vae.config.scaling_factor)

    def sampling_scheduler(self, scheduler_config):
        """The scheduler validation, DPM class images and inference sample with (the guide's DPM-Solver)."""
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(scheduler_config)
