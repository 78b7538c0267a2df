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

    def meta_step(self, unet, resolution: int, rows: int, dtype, config):
        """The UNet's forward call on meta tensors of a training step's shapes, for utils/run/activations.py:
        latents 8 x smaller than the image, 77 text tokens, SDXL's added conditions."""
        size, meta = resolution // 8, dict(device="meta", dtype=dtype)
        latents = torch.randn(rows, unet.config.in_channels, size, size, **meta).requires_grad_()
        context = torch.randn(rows, 77, unet.config.cross_attention_dim, **meta)
        added = {}
        if unet.config.addition_embed_type == "text_time":
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            added = {"added_cond_kwargs": {"text_embeds": torch.randn(rows, pooled, **meta),
                                           "time_ids": torch.randn(rows, 6, **meta)}}
        timesteps = torch.tensor([10] * rows, device="meta")
        return lambda: unet(latents, timesteps, context, **added)

    def sampling_scheduler(self, scheduler_config):
        """The scheduler validation, DPM class images and inference sample with (the guide's DPM-Solver)."""
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(scheduler_config)
