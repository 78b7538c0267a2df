"""Validation: generate the validation prompts with the models in memory, save the images, log them."""

import re
from pathlib import Path

import torch

MAX_SLUG_LENGTH = 80


def image_filename(prompt_index: int, prompt: str, image_index: int) -> str:
    """A readable name that cannot leave its folder: letters, digits and underscores only."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:MAX_SLUG_LENGTH] or "prompt"
    return f"{prompt_index:02d}_{slug}_{image_index}.png"


def build_pipeline(parts, unet, text_encoder):
    """A StableDiffusionPipeline over the training components, with DPM-Solver multistep as in the guide."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=text_encoder,
        tokenizer=parts.tokenizer,
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(parts.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def generate_validation_images(pipeline, prompts, num_images, seed, steps, resolution, autocast):
    """All images of all prompts, each seeded by (seed, image index) so steps are comparable."""
    pipeline.set_progress_bar_config(disable=True)
    images, captions = [], []
    for prompt in prompts:
        generators = [torch.Generator().manual_seed(seed + k) for k in range(num_images)]
        with autocast():
            result = pipeline(
                prompt,
                num_images_per_prompt=num_images,
                num_inference_steps=steps,
                height=resolution,
                width=resolution,
                generator=generators,
            )
        images += result.images
        captions += [prompt] * num_images
    return images, captions


def save_validation_images(images, captions, prompts, folder) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    images_per_prompt = len(images) // len(prompts)
    for i, (image, caption) in enumerate(zip(images, captions)):
        path = folder / image_filename(i // images_per_prompt, caption, i % images_per_prompt)
        image.save(path)
        paths.append(path)
    return paths
