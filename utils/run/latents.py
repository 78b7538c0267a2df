"""The latent cache: each training image's VAE posterior (mean and std), computed once and kept on disk.

Training samples latents from the posterior every step (mean + std * noise), exactly as without the cache; only
the encoding is saved. An entry is keyed by the model, the image's content, the resolution and the crop mode, so a
resumed run, or another subject trained into the same output folder with the same class images, encodes nothing
again. Only images whose crop is the same every epoch can be cached: with --center_crop, or when the image is
square. A random crop of a non-square image changes every epoch and is encoded every step.

Every image is encoded alone (a batch of one), before training for cached ones and row by row during it for the
others: a batched convolution can round differently with the batch's other rows, and which rows would share a
batch depends on how far the data-loader workers have read ahead, so batching would make runs, and a resumed run
against an uninterrupted one, differ in their last bits.
"""

import hashlib
import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from utils.atomic import atomic_file
from utils.run.dataset import training_example


def file_digest(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(name_or_path: str, revision, vae_config: dict) -> str:
    """Which VAE encodes: its source, revision and configuration."""
    text = json.dumps([str(Path(name_or_path).resolve()) if Path(name_or_path).exists() else name_or_path,
                       revision, {k: v for k, v in vae_config.items() if not k.startswith("_")}],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def crop_is_fixed(path, resolution: int, center_crop: bool) -> bool:
    """True when every epoch crops the same square out of this image (reads the header only)."""
    if center_crop:
        return True
    with Image.open(path) as image:
        width, height = image.size
    scale = resolution / min(width, height)
    return round(width * scale) <= resolution and round(height * scale) <= resolution


# The posterior, and the size-and-crop conditions of the same crop (SDXL reads them; see utils/run/dataset.py).
CACHED_TENSORS = ("mean", "std", "time_ids")


class LatentCache:
    def __init__(self, folder, fingerprint: str, resolution: int, center_crop: bool):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._salt = f"{fingerprint}:{resolution}:{'center' if center_crop else 'random'}"

    def key(self, image_digest: str) -> str:
        return hashlib.sha256(f"{self._salt}:{image_digest}".encode()).hexdigest()[:40]

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def load(self, key: str):
        """(mean, std, size-and-crop conditions) of a cached image, or None."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(path)
        except Exception:  # a torn or foreign file: encode the image again and overwrite it
            return None
        if set(tensors) != set(CACHED_TENSORS):  # written by an older version: encode again
            return None
        return tuple(tensors[name] for name in CACHED_TENSORS)

    def save(self, key: str, mean: torch.Tensor, std: torch.Tensor, time_ids: torch.Tensor) -> None:
        tensors = dict(zip(CACHED_TENSORS, (mean, std, time_ids)))
        with atomic_file(self._path(key)) as partial:
            save_file({name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}, partial)


def plan_latent_cache(images, resolution: int, center_crop: bool, requested, folder, fingerprint: str):
    """(cache or None, {image path: cache key}, notice) for --cache_latents (None: on when it is exact for all)."""
    varying = {path for path in images if not crop_is_fixed(path, resolution, center_crop)}
    why = (f"{len(varying)} image(s) are not square and --center_crop is off: their random crops change every "
           "epoch, so they are encoded every step")
    if requested is False or (requested is None and varying):
        return None, {}, "Latent cache off: " + ("--no_cache_latents" if requested is False else why)
    cache = LatentCache(folder, fingerprint, resolution, center_crop)
    keys = {path: cache.key(file_digest(path)) for path in images if path not in varying}
    notice = f"Latent cache on ({folder}): each image is encoded once" + (f"; but {why}" if varying else "")
    return cache, keys, notice


@torch.no_grad()
def encode_one(vae, pixels: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of one image's posterior, encoded as a batch of one (see the module's docstring)."""
    posterior = vae.encode(pixels.unsqueeze(0).to(vae.device, dtype)).latent_dist
    return posterior.mean[0], posterior.std[0]


def fill_latent_cache(cache, cache_keys: dict, vae, resolution: int, center_crop: bool) -> int:
    """Encode every cacheable image that is not cached yet (in the VAE's dtype); return how many were encoded."""
    encoded = 0
    for path, key in cache_keys.items():
        if cache.load(key) is not None:
            continue
        # The crop of a cacheable image is fixed, so the generator that would place a random one is never used.
        pixels, time_ids = training_example(path, resolution, center_crop, torch.Generator())
        cache.save(key, *encode_one(vae, pixels, vae.dtype), time_ids)
        encoded += 1
    return encoded
