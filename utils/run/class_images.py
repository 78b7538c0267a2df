"""Class images for prior preservation: count what is there, generate what is missing, split over processes.

Image i of the class is always generated from seed i and saved as class_{i:05d}.jpg (written to a temporary name,
then renamed), so an interrupted generation resumes where it stopped, a rerun yields the same images, and several
processes share the missing indices without duplicates or gaps. Runs of other subjects of the same class share the
folder: while one generates, it holds the folder's lock, and another waits for it and then counts again, so each
image is generated once, whole.
"""

import logging
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from utils.atomic import atomic_file, remove_partials
from utils.checks import unwritable_ancestor
from utils.images import list_images
from utils.quantization import quantize_pipeline
from utils.errors import UserError
from utils.run.lock import FileLock

logger = logging.getLogger(__name__)


def class_image_name(index: int) -> str:
    return f"class_{index:05d}.jpg"


def missing_class_indices(class_dir, num_class_images: int) -> list[int]:
    """Indices of the images still to generate so that the folder holds `num_class_images` images."""
    present = list_images(class_dir)
    shortfall = num_class_images - len(present)
    if shortfall <= 0:
        return []
    taken = {p.name for p in present}
    free = (i for i in range(num_class_images + len(present)) if class_image_name(i) not in taken)
    return [next(free) for _ in range(shortfall)]


def generation_dtype(precision, device_type: str) -> torch.dtype:
    """--prior_generation_precision as a dtype; fp16 has no fast CPU kernels, so the CPU falls back."""
    if precision in ("fp32", "no"):
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16" or (precision is None and device_type == "cuda"):
        if device_type == "cpu":
            warnings.warn("--prior_generation_precision fp16 is not supported on a CPU; generating in fp32 instead")
            return torch.float32
        return torch.float16
    return torch.float32


LOCK_NAME = ".generating.lock"


def generate_class_images(config, family, accelerator) -> int:
    """Fill --class_data_dir up to --num_class_images images; return how many this process generated."""
    class_dir = Path(config.class_data_dir)
    shortfall = len(missing_class_indices(class_dir, config.num_class_images))
    if not shortfall:
        return 0  # nothing to write: a complete folder may be read-only or in use by another run
    if (blocked := unwritable_ancestor(class_dir)) is not None:  # every process checks, so all stop together
        raise UserError(f"--class_data_dir {class_dir} needs {shortfall} more class image(s) but {blocked} cannot be "
                        f"written (read-only or not yours). Give a writable folder, or put {config.num_class_images} "
                        "images of the class there")
    lock = FileLock(class_dir / LOCK_NAME, remove_on_release=True)  # the folder keeps the images alone
    if accelerator.is_main_process:
        class_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire(f"Waiting for another run that is generating class images in {class_dir}")
        if removed := remove_partials(class_dir):  # the lock's holder is the folder's only writer
            logger.info("Removed %d partial class image(s) a killed run left in %s", removed, class_dir)
    try:
        accelerator.wait_for_everyone()
        todo = missing_class_indices(class_dir, config.num_class_images)
        accelerator.wait_for_everyone()  # every process has planned before any writes
        if not todo:
            return 0
        logger.info("Generating %d class images from %r", len(todo), config.class_prompt)
        mine = share_of(todo, accelerator.process_index, accelerator.num_processes)
        generate_indices(config, family, mine, accelerator.device, show_progress=accelerator.is_local_main_process)
        accelerator.wait_for_everyone()
        return len(mine)
    finally:
        lock.release()


def share_of(indices: list[int], process_index: int, num_processes: int) -> list[int]:
    return indices[process_index::num_processes]


def generate_indices(config, family, indices: list[int], device, show_progress: bool = True) -> None:
    """Generate and save class images with these indices, --sample_batch_size at a time, with the family's pipeline."""
    class_dir = Path(config.class_data_dir)
    dtype = generation_dtype(config.prior_generation_precision, device.type)
    pipeline = family.load_pipeline(config.pretrained_model_name_or_path, config.revision, dtype,
                                    config.pretrained_vae_model_name_or_path)
    if config.base_quantization:  # the class images come from the base the run trains on
        logger.info(quantize_pipeline(family, pipeline, config.base_quantization, dtype, device))
    pipeline = pipeline.to(device)
    if config.class_scheduler == "dpm":
        pipeline.scheduler = family.sampling_scheduler(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    batches = [indices[i : i + config.sample_batch_size] for i in range(0, len(indices), config.sample_batch_size)]
    arguments = family.generation_arguments(config)
    for batch in tqdm(batches, desc="Class images", disable=not show_progress):
        images = pipeline(
            prompt=[config.class_prompt] * len(batch),
            height=config.resolution,
            width=config.resolution,
            num_inference_steps=config.class_inference_steps,
            generator=[torch.Generator().manual_seed(index) for index in batch],
            **arguments,
        ).images
        for index, image in zip(batch, images):
            with atomic_file(class_dir / class_image_name(index)) as partial:
                image.save(partial, format="JPEG", quality=95)
