"""The training data loader: instance (and class) images, as cached latents where that is exact, else pixels."""

import atexit
import logging
import math
import multiprocessing
import multiprocessing.util  # registers its exit handler now, so that ours below runs before it

import torch

from utils.images import list_images
from utils.run.dataset import DreamBoothDataset, EpochShuffleSampler, collate_fn
from utils.run.latents import fill_latent_cache, model_fingerprint, plan_latent_cache
from utils.run.stopping import ignore_stop_signals

logger = logging.getLogger(__name__)


def make_dataloader(config, accelerator, components, images, prompt_ids: dict, cache_folder, unreadable=()):
    """The training data: instance (and class) images, as cached latents where that is exact, else pixels."""
    class_images = [p for p in list_images(config.class_data_dir) if p not in unreadable] if config.with_prior_preservation else []
    class_images = class_images[: config.num_class_images]
    cache, cache_keys, notice = plan_latent_cache(
        images + class_images, config.resolution, config.center_crop, config.cache_latents, cache_folder,
        model_fingerprint(config.pretrained_vae_model_name_or_path or config.pretrained_model_name_or_path,
                          config.revision, dict(components.vae.config)),
    )
    logger.info(notice)
    if cache is not None:
        with accelerator.main_process_first():  # the main process encodes; the others find the files
            encoded = fill_latent_cache(cache, cache_keys, components.vae, config.resolution, config.center_crop)
        logger.info("Latent cache: %d image(s) encoded, %d found", encoded, len(cache_keys) - encoded)
    dataset = DreamBoothDataset(images, prompt_ids, config.resolution, config.center_crop, config.seed,
                                class_images=class_images, latent_cache=cache, cache_keys=cache_keys)
    workers = config.num_dataloader_workers
    if workers and len(cache_keys) == len(set(images + class_images)):
        logger.info("Every image's latents are cached: the loader reads them in this process (--num_dataloader_workers "
                    "%d would start %d process(es) with nothing to decode)", workers, workers)
        workers = 0
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        sampler=EpochShuffleSampler(len(dataset), config.seed),
        collate_fn=lambda examples: collate_fn(examples, config.with_prior_preservation),
        num_workers=workers,
        persistent_workers=workers > 0,  # an epoch is a handful of images: start workers once, keep their decoded photos
        worker_init_fn=ignore_stop_signals,  # the main process saves first, then ends them
        generator=torch.Generator().manual_seed(config.seed),  # keeps the global RNG untouched by the loader
    )
    return loader, cache


def per_process_batch(train_batch_size: int, examples: int, num_processes: int) -> int:
    """The batch each process really gets: fewer examples than --train_batch_size per process make it smaller."""
    batch = min(train_batch_size, math.ceil(examples / num_processes))
    if batch < train_batch_size:
        logger.warning("--train_batch_size %d is more than the %d example(s) each process has: batches of %d",
                       train_batch_size, batch, batch)
    return batch


def stop_workers(loader) -> None:
    """End the loader's persistent workers now, in at most 10 s each. They ignore stop signals (the main process
    saves first), so they cannot be left to the interpreter's exit, which ends daemonic children with SIGTERM and
    then waits for them forever.

    torch has no public way to end them early: its iterator's own shutdown is used where it exists (it asks each
    worker to finish the item it is on, waits 5 s, sends SIGTERM, which they ignore, and waits 5 s more). A worker
    still alive after that (busy with a huge photo), or every worker on a torch without that shutdown, is killed:
    workers hold nothing to save."""
    iterator = getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()
        loader._iterator = None
    if loader.num_workers > 0:
        kill_leftover_workers()


def kill_leftover_workers() -> None:
    """Kill this process's daemonic children (the loader workers: nothing else in the trainer starts any)."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


# Whatever ends the trainer (an exception, a broken pipe, SystemExit from a library), its workers end with it:
# this runs before multiprocessing's own exit handler (registered earlier, at its import), which would wait on them.
atexit.register(kill_leftover_workers)
