"""What the flow-matching transformer families (FLUX.1, SD3, FLUX.2 [klein]) share: rectified flow, and their
pipelines' sampling, loading and export.

Latents are shifted and scaled as the family's VAE says (FLUX.2 [klein] normalises them by its VAE's statistics
instead); a timestep is an index into the training scheduler's (shifted) schedule, drawn per example with diffusers'
weighting schemes (uniform, logit-normal, mode; cosmap and sigma_sqrt draw uniformly and weight the loss instead);
the noisy input is x_t = (1 - sigma) x + sigma eps and the target the velocity eps - x. A family adds its own input
packing and forward call (flux.py, stable_diffusion_3.py, flux2_klein.py).
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

    def normalised(self, latents, noise):
        """(the latents as the transformer reads them, the noise in the same space): here shifted and scaled as
        the VAE's config says, the noise as drawn."""
        return (latents - self.shift_factor) * self.scaling_factor, noise

    def terms(self, mean, std, latent_eps, noise, timesteps) -> TrainingTerms:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        latents, noise = self.normalised(mean + std * latent_eps.to(mean.dtype), noise.to(mean.dtype))
        indices = timesteps.to("cpu")
        sigma = self.sigmas[indices].to(latents.device, latents.dtype).view(-1, *[1] * (latents.ndim - 1))
        noisy = (1 - sigma) * latents + sigma * noise
        weight = compute_loss_weighting_for_sd3(self.sampling.weighting_scheme, sigma)
        return TrainingTerms(noisy, self.schedule_timesteps[indices].to(latents.device), noise - latents, weight)


class FlowMatchingTransformer:
    """The ModelFamily members the flow-matching transformer families share (listed before ModelFamily among a
    family's bases): sampling with the flow-matching Euler scheduler (there is no DPM-Solver variant to swap in), the
    pipeline class named first in `pipeline_class_names`, loading a transformer, text encoders and tokenizers as the
    family declares them, diffusers' own LoRA names, and the makers' single-file layout (`single_file_layout`, a
    transformer_layout.Layout) for the merged checkpoint and ComfyUI's differences."""

    single_file_layout = None  # the family's transformer_layout.Layout
    transformer_class_name = None  # the diffusers class of its transformer/
    supported_encoders = None  # {text encoder part: the transformers classes accepted there}
    tokenizer_parts = None  # its tokenizer folders

    def _encoder_class(self, source, revision, part):
        from utils.families.stable_diffusion import text_encoder_class

        return text_encoder_class(source, revision, part, self.supported_encoders[part], self.name)

    def _transformer_class(self):
        import diffusers

        return getattr(diffusers, self.transformer_class_name)

    def load(self, source, revision=None, tokenizer_name=None, vae_name=None, dtype=None):
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer

        from utils.families import Components, load_vae

        return Components(
            vae=load_vae(source, revision, vae_name, class_name=self.vae_class_name),
            denoiser=self._transformer_class().from_pretrained(source, subfolder="transformer", revision=revision,
                                                               dtype=dtype),
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler",
                                                                            revision=revision),
            text_encoders={part: self._encoder_class(source, revision, part).from_pretrained(
                source, subfolder=part, revision=revision, dtype=dtype) for part in self.supported_encoders},
            tokenizers={part: AutoTokenizer.from_pretrained(source, subfolder=part, revision=revision)
                        for part in self.tokenizer_parts},
        )

    def empty_models(self, source, revision=None):
        from accelerate import init_empty_weights

        classes = {part: self._encoder_class(source, revision, part) for part in self.supported_encoders}
        configs = {part: cls.config_class.from_pretrained(source, subfolder=part, revision=revision)
                   for part, cls in classes.items()}
        transformer_class = self._transformer_class()
        with init_empty_weights(include_buffers=True):  # SD3's position embedding is a buffer
            transformer = transformer_class.from_config(transformer_class.load_config(source, subfolder="transformer",
                                                                                      revision=revision))
        with init_empty_weights():
            encoders = {part: classes[part](configs[part]) for part in self.supported_encoders}
        return transformer, encoders

    def sampling_scheduler(self, scheduler_config):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def _pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_names[0])

    def pipeline(self, components, scheduler):
        return self._pipeline_class()(vae=components.vae, transformer=components.denoiser, scheduler=scheduler,
                                      **components.text_encoders, **components.tokenizers)

    def load_pipeline(self, source, revision=None, dtype=None, vae_name=None):
        from utils.families import load_vae

        replaced = {"vae": load_vae(source, revision, vae_name, dtype, self.vae_class_name)} if vae_name else {}
        return self._pipeline_class().from_pretrained(source, revision=revision, dtype=dtype, **replaced)

    def lora_keys(self, part, module):
        """diffusers' own LoRA names (`transformer.<module>.lora_A.weight`, no alpha: scale 1), which the pipeline's
        load_lora_weights reads (and ComfyUI's FLUX key map maps onto its fused layers)."""
        return f"{part}.{module}.lora_A.weight", f"{part}.{module}.lora_B.weight", None

    def single_file_tensors(self, state_of, pipeline):
        """The merged transformer in its makers' single-file layout (their single files hold the transformer alone)."""
        from utils.families.transformer_layout import to_original

        return to_original(self.single_file_layout, state_of("transformer"))

    def difference_tensors(self, changes, state_of):
        """The transformer's differences under its makers' names after `diffusion_model.` (a fused layer's stacked
        from its parts'), which ComfyUI maps onto its model; the text encoders' under kohya's."""
        from utils.families.transformer_layout import fused_differences

        encoders = {part: changed for part, changed in changes.items() if part != "transformer"}
        tensors = super().difference_tensors(encoders, state_of)
        tensors.update(fused_differences(self.single_file_layout, changes.get("transformer", {}),
                                         state_of("transformer"), "diffusion_model."))
        return tensors
