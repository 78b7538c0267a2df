"""The training data loader: instance (and class) images, as cached latents where that is exact, else pixels."""

import logging

import torch

from utils.dataset import DreamBoothDataset, EpochShuffleSampler, collate_fn, list_images
from utils.latents import fill_latent_cache, model_fingerprint, plan_latent_cache
from utils.models import weight_dtype
from utils.stopping import ignore_stop_signals

logger = logging.getLogger(__name__)


def make_dataloader(args, accelerator, parts, images, seed, cache_folder, unreadable=()):
    """The training data: instance (and class) images, as cached latents where that is exact, else pixels."""
    class_images = [p for p in list_images(args.class_data_dir) if p not in unreadable] if args.with_prior_preservation else []
    class_images = class_images[: args.num_class_images]
    cache, cache_keys, notice = plan_latent_cache(
        images + class_images, args.resolution, args.center_crop, args.cache_latents, cache_folder,
        model_fingerprint(args.pretrained_model_name_or_path, args.revision, dict(parts.vae.config)),
    )
    logger.info(notice)
    if cache is not None:
        with accelerator.main_process_first():  # the main process encodes; the others find the files
            encoded = fill_latent_cache(cache, cache_keys, parts.vae, args.resolution, args.center_crop,
                                        weight_dtype(accelerator.mixed_precision))
        logger.info("Latent cache: %d image(s) encoded, %d found", encoded, len(cache_keys) - encoded)
    dataset = DreamBoothDataset(
        images, args.instance_prompt, parts.tokenizer, args.resolution, args.center_crop, seed,
        class_images=class_images, class_prompt=args.class_prompt, latent_cache=cache, cache_keys=cache_keys,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed),
        collate_fn=lambda examples: collate_fn(examples, args.with_prior_preservation),
        num_workers=args.num_dataloader_workers,
        worker_init_fn=ignore_stop_signals,  # the main process saves first, then ends them
        generator=torch.Generator().manual_seed(seed),  # keeps the global RNG untouched by the loader
    )
    return loader, cache
