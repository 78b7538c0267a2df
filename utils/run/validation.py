"""Validation: generate the validation prompts with the models in memory, save the images, log them."""

import re
from pathlib import Path

import torch

MAX_SLUG_LENGTH = 80


def image_filename(prompt_index: int, prompt: str, image_index: int) -> str:
    """A readable name that cannot leave its folder: letters, digits and underscores only."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:MAX_SLUG_LENGTH] or "prompt"
    return f"{prompt_index:02d}_{slug}_{image_index}.png"


def build_pipeline(family, components):
    """The family's pipeline over the training components, with its sampling scheduler (SD: DPM-Solver, the guide's)."""
    pipeline = family.pipeline(components, family.sampling_scheduler(components.noise_scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def generate_validation_images(pipeline, prompts, num_images, seed, steps, resolution, autocast, batch_size,
                               should_stop=lambda: False, pipeline_arguments=None):
    """num_images images of every prompt, prompt after prompt, generated batch_size images at a time; None when
    `should_stop()` turned true between batches (a stop signal: the checkpoint matters, the images do not).

    Image k of each prompt is seeded with seed + k (a CPU generator), so steps and runs are comparable.
    `pipeline_arguments`: the family's generation_arguments (FLUX: T5's sequence length, as in training).
    """
    jobs = [(prompt, k) for prompt in prompts for k in range(num_images)]
    images = []
    for start in range(0, len(jobs), batch_size):
        if should_stop():
            return None
        batch = jobs[start : start + batch_size]
        with autocast():
            images += pipeline(
                prompt=[prompt for prompt, _ in batch],
                num_inference_steps=steps,
                height=resolution,
                width=resolution,
                generator=[torch.Generator().manual_seed(seed + k) for _, k in batch],
                **(pipeline_arguments or {}),
            ).images
    return images, [prompt for prompt, _ in jobs]


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
