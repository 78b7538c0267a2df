import pytest
import torch
from PIL import Image

from utils.errors import UserError
from utils.images import list_images, load_rgb, require_images
from utils.run.dataset import (
    DreamBoothDataset,
    EpochShuffleSampler,
    collate_fn,
    crop_to_tensor,
    is_dreambooth_dataset_folder,
)


def test_only_image_files_count_sorted_by_name(tmp_path):
    for name in ["b.JPG", "a.png", "c.webp", "d.jpeg", "e.bmp", ".DS_Store", "caption.txt", "Thumbs.db"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.jpg").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG", "c.webp", "d.jpeg", "e.bmp"]


def test_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        require_images(tmp_path / "nope", "--instance_data_dir")
    with pytest.raises(UserError, match="holds no images"):
        require_images(tmp_path, "--instance_data_dir")


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), "red")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(tmp_path / "r.jpg").size == (20, 40)


def test_transparency_is_composited_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert load_rgb(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_mpo_jpeg_is_read(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "m.mpo", save_all=True, append_images=frames[1:], format="MPO")
    (tmp_path / "m.mpo").rename(tmp_path / "m.jpg")
    assert list_images(tmp_path)[0].name == "m.jpg"
    assert load_rgb(tmp_path / "m.jpg").mode == "RGB"


def test_training_tensor_shape_range_and_crops():
    image = Image.linear_gradient("L").rotate(90).convert("RGB").resize((120, 64))
    generator = torch.Generator().manual_seed(0)
    image = image.resize((60, 32))  # the short side at the training size
    center, corner = crop_to_tensor(image, 32, True, generator)
    assert center.shape == (3, 32, 32) and center.min() >= -1 and center.max() <= 1 and corner == (0, 14)
    crops = {crop_to_tensor(image, 32, False, torch.Generator().manual_seed(s))[0].sum().item() for s in range(6)}
    assert len(crops) > 1


PROMPT_IDS = {0: torch.tensor([1, 2, 3]), 1: torch.tensor([1, 4, 3])}


def test_items_depend_only_on_seed_and_key(subject):
    images = list_images(subject)
    dataset = DreamBoothDataset(images, PROMPT_IDS, 32, False, seed=3, class_images=images[:2])
    assert len(dataset) == 3
    first, again = dataset[(1, 2)], dataset[(1, 2)]
    assert torch.equal(first["instance"]["pixels"], again["instance"]["pixels"])
    batch = collate_fn([dataset[(0, 0)], dataset[(0, 1)]], with_prior_preservation=True)
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_rows"] == [0, 1, 2, 3]
    assert batch["keys"] == [(0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)]
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    assert not torch.equal(batch["input_ids"][0], batch["input_ids"][2])
    assert batch["latent_mean"] is None


def test_cached_images_are_not_read(subject, tmp_path):
    from utils.run.latents import LatentCache

    images = list_images(subject)
    cache = LatentCache(tmp_path, "model", 32, False)
    cache.save("k0", torch.ones(4, 4, 4), torch.full((4, 4, 4), 0.5), torch.tensor([9.0, 9, 0, 0, 32, 32]))
    dataset = DreamBoothDataset(images[:1], PROMPT_IDS, 32, False, seed=0, latent_cache=cache,
                                cache_keys={images[0]: "k0"})
    images[0].rename(images[0].with_suffix(".moved"))  # the file is not opened when its latents are cached
    try:
        batch = collate_fn([dataset[(0, 0)]], with_prior_preservation=False)
    finally:
        images[0].with_suffix(".moved").rename(images[0])
    assert batch["pixel_values"] is None and batch["latent_rows"] == [0]
    assert torch.equal(batch["latent_std"][0], torch.full((4, 4, 4), 0.5))
    assert batch["time_ids"][0].tolist() == [9, 9, 0, 0, 32, 32]  # the size and crop kept with the latents


def test_sampler_order_is_a_function_of_seed_and_epoch():
    sampler = EpochShuffleSampler(10, seed=1)
    first = list(sampler)
    assert sorted(i for _, i in first) == list(range(10)) and list(sampler) == first
    sampler.set_epoch(1)
    assert [i for _, i in sampler] != [i for _, i in first]
    assert all(epoch == 1 for epoch, _ in sampler)


def test_only_the_default_dataset_folder_may_be_fetched(tmp_path):
    assert is_dreambooth_dataset_folder(tmp_path / "dreambooth" / "dataset" / "dog", tmp_path)
    assert not is_dreambooth_dataset_folder(tmp_path / "mine" / "dog", tmp_path)


def test_without_the_cache_resized_images_stay_in_memory_within_the_budget(subject):
    images = list_images(subject)
    dataset = DreamBoothDataset(images, PROMPT_IDS, 32, False, seed=0, memory_budget=2 * 32 * 32 * 3)
    for index in range(3):
        dataset[(0, index)]
    assert len(dataset._resized) == 2  # the third would not fit
