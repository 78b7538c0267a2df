"""The training maths of the denoising-diffusion families (SD 1.x/2.x, SDXL): the VAE's latents scaled by its
scaling factor, noise added at integer DDPM timesteps, an epsilon or v target, the UNet's forward call, and
DPM-Solver multistep for sampling. A flow-matching family (FLUX, SD3) brings its own versions of these members."""

from utils.errors import UserError


class DenoisingDiffusion:
    """ModelFamily's training-maths members for a UNet trained on DDPM noise."""

    def num_train_timesteps(self, components) -> int:
        return components.noise_scheduler.config.num_train_timesteps

    def training_terms(self, components, mean, std, latent_eps, noise, timesteps):
        """(the denoiser's input, its timestep argument, the target) for latents drawn from the posterior."""
        scheduler = components.noise_scheduler
        latents = (mean + std * latent_eps.to(mean.dtype)) * components.vae.config.scaling_factor
        noise = noise.to(latents.dtype)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction_type = scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noisy, timesteps, noise
        if prediction_type == "v_prediction":
            return noisy, timesteps, scheduler.get_velocity(latents, noise, timesteps)
        raise UserError(f"unknown prediction_type {prediction_type!r} in the scheduler config")

    def predict(self, denoiser, model_input, timesteps, conditioning: dict):
        return denoiser(model_input, timesteps, **conditioning).sample

    def sampling_scheduler(self, scheduler_config):
        """The scheduler validation, DPM class images and inference sample with (the guide's DPM-Solver)."""
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(scheduler_config)
