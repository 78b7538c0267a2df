"""The training dataset built from instance and class images, its epoch-seeded sampler, and per-example noise."""

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from utils.errors import UserError
from utils.images import load_rgb, upright_size

logger = logging.getLogger(__name__)


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    scale = size / min(image.size)
    return image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BILINEAR)


def crop_to_tensor(resized: Image.Image, size: int, center_crop: bool, generator: torch.Generator):
    """Crop a size x size square (center, or where the generator says), scale to [-1, 1], channels first; returns
    (pixels, (top, left)) of the crop."""
    spare_x, spare_y = resized.width - size, resized.height - size
    if center_crop:
        left, top = spare_x // 2, spare_y // 2
    else:
        left = int(torch.randint(0, spare_x + 1, (1,), generator=generator))
        top = int(torch.randint(0, spare_y + 1, (1,), generator=generator))
    cropped = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32)
    return torch.from_numpy(cropped / 127.5 - 1.0).permute(2, 0, 1).contiguous(), (top, left)


def size_and_crop(original_size: tuple[int, int], top: int, left: int, size: int) -> torch.Tensor:
    """SDXL's six added conditions of an example: original (height, width), crop (top, left), target (size, size).
    Every row carries them; families that do not read them ignore them."""
    width, height = original_size
    return torch.tensor([height, width, top, left, size, size], dtype=torch.float32)


def training_example(path, size: int, center_crop: bool, generator: torch.Generator, resized=None):
    """(pixels, size-and-crop conditions) of one image: the short side resized to `size` (or `resized`, that image
    already resized), a size x size square cropped."""
    if resized is None:
        resized = resize_short_side(load_rgb(path, size), size)
    pixels, (top, left) = crop_to_tensor(resized, size, center_crop, generator)
    return pixels, size_and_crop(upright_size(path), top, left, size)


class DreamBoothDataset(Dataset):
    """Pairs of (instance image, instance prompt) and, with prior preservation, (class image, class prompt); the
    prompts come as token ids by part (0: instance, 1: class), as the model family tokenizes them. Every row
    carries its size-and-crop conditions (`size_and_crop`), computed with the crop or kept in the latent cache.

    Items are addressed by `(epoch, index)` keys from `EpochShuffleSampler`: the random crop of an item depends
    only on the run's seed and that key, so a resumed run sees exactly the crops an uninterrupted one would.
    An image whose latents are in `latent_cache` (its path in `cache_keys`) is not read at all; it comes as its
    posterior's mean and std. Otherwise resized images are kept in memory while they fit in `memory_budget` bytes.
    """

    def __init__(self, instance_images, prompt_ids: dict, size, center_crop, seed, class_images=None,
                 latent_cache=None, cache_keys=None, memory_budget=2**31):
        self.instance_images = list(instance_images)
        self.class_images = list(class_images or [])
        self.size = size
        self.center_crop = center_crop
        self.seed = seed
        self.instance_ids = prompt_ids[0]
        self.class_ids = prompt_ids.get(1) if self.class_images else None
        self.latent_cache = latent_cache
        self.cache_keys = dict(cache_keys or {}) if latent_cache is not None else {}
        self._resized = {}
        self._budget = memory_budget

    def __len__(self):
        return max(len(self.instance_images), len(self.class_images))

    def _resize(self, path) -> Image.Image:
        resized = self._resized.get(path)
        if resized is None:
            resized = resize_short_side(load_rgb(path, self.size), self.size)
            if self._budget >= resized.width * resized.height * 3:
                self._budget -= resized.width * resized.height * 3
                self._resized[path] = resized
        return resized

    def _row(self, path, key, prompt_ids) -> dict:
        row = {"key": key, "prompt_ids": prompt_ids, "cache_key": self.cache_keys.get(path)}
        cached = self.latent_cache.load(row["cache_key"]) if row["cache_key"] else None
        if cached is not None:
            *row["latent"], row["time_ids"] = cached
        else:
            row["pixels"], row["time_ids"] = training_example(path, self.size, self.center_crop,
                                                              example_generator(self.seed, key, "crop"),
                                                              self._resize(path))
        return row

    def __getitem__(self, key):
        epoch, index = key
        example = {"instance": self._row(self.instance_images[index % len(self.instance_images)],
                                         (epoch, index, 0), self.instance_ids)}
        if self.class_images:
            example["class"] = self._row(self.class_images[index % len(self.class_images)],
                                         (epoch, index, 1), self.class_ids)
        return example


def collate_fn(examples, with_prior_preservation: bool) -> dict:
    """A batch; with prior preservation the class rows follow the instance rows. Rows come as pixels (to encode)
    or as cached latents; `pixel_rows` and `latent_rows` say which row is which."""
    rows = [e[part] for part in (["instance", "class"] if with_prior_preservation else ["instance"]) for e in examples]
    pixel_rows = [i for i, row in enumerate(rows) if "pixels" in row]
    latent_rows = [i for i, row in enumerate(rows) if "latent" in row]
    return {
        "keys": [row["key"] for row in rows],
        "input_ids": torch.stack([row["prompt_ids"] for row in rows]),
        "time_ids": torch.stack([row["time_ids"] for row in rows]),
        "pixel_rows": pixel_rows,
        "pixel_values": torch.stack([rows[i]["pixels"] for i in pixel_rows]).float() if pixel_rows else None,
        "pixel_cache_keys": [rows[i]["cache_key"] for i in pixel_rows],
        "latent_rows": latent_rows,
        "latent_mean": torch.stack([rows[i]["latent"][0] for i in latent_rows]) if latent_rows else None,
        "latent_std": torch.stack([rows[i]["latent"][1] for i in latent_rows]) if latent_rows else None,
    }


_STREAMS = {"crop": 0, "noise": 1}


def example_generator(seed: int, key: tuple, stream: str) -> torch.Generator:
    """A generator for one example in one epoch: (epoch, index, part) and the run's seed decide its draws.

    Crops, latent samples, noise and timesteps drawn from it are the same whatever the batch size, number of
    processes, data-loader workers or interruption: the basis of exact resume and of 1-vs-N-process equality.
    """
    return torch.Generator().manual_seed(hash((seed, *key, _STREAMS[stream])) % 2**63)


def example_noise(seed: int, keys, latent_shape, draw_timestep):
    """(latent sample noise, diffusion noise, timesteps) for a batch, each row drawn from its example's generator;
    `draw_timestep(generator)` is the model family's timestep draw (utils/families)."""
    latent_eps, noise, timesteps = [], [], []
    for key in keys:
        generator = example_generator(seed, key, "noise")
        latent_eps.append(torch.randn(latent_shape, generator=generator))
        noise.append(torch.randn(latent_shape, generator=generator))
        timesteps.append(draw_timestep(generator))
    return torch.stack(latent_eps), torch.stack(noise), torch.stack(timesteps)


class EpochShuffleSampler(Sampler):
    """Shuffles each epoch with a permutation drawn from (seed, epoch) alone and yields (epoch, index) keys.

    No global random state is read or advanced, so where a run stands in its data is fully described by the
    epoch and the number of batches already taken.
    """

    def __init__(self, num_items: int, seed: int):
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.num_items

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter([(self.epoch, int(i)) for i in torch.randperm(self.num_items, generator=generator)])


DREAMBOOTH_REPOSITORY = "https://github.com/google/dreambooth"
FETCH_TIMEOUT_SECONDS = 900


def is_dreambooth_dataset_folder(instance_dir, data_root) -> bool:
    """True for the default layout data/dreambooth/dataset/{subject}, which this trainer may fetch itself."""
    try:
        Path(instance_dir).resolve().relative_to(Path(data_root, "dreambooth").resolve())
    except ValueError:
        return False
    return True


def fetch_dreambooth_dataset(data_root) -> None:
    """git clone google/dreambooth into data_root/dreambooth, which must not exist yet; a UserError offline."""
    import shutil
    import subprocess
    import tempfile

    target = Path(data_root, "dreambooth")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        clone = Path(tmp, "dreambooth")
        try:
            subprocess.run(
                ["git", "clone", "--depth", "1", DREAMBOOTH_REPOSITORY, str(clone)],
                check=True, capture_output=True, text=True, timeout=FETCH_TIMEOUT_SECONDS,
                env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
            )
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", "") or str(error)
            raise UserError(
                f"could not fetch the DreamBooth dataset ({detail.strip().splitlines()[-1] if detail.strip() else error}). "
                f"Clone {DREAMBOOTH_REPOSITORY} into {target} by hand, or put your photos in the instance folder"
            ) from None
        shutil.move(str(clone), str(target))
