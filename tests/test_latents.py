import torch
from PIL import Image
from safetensors.torch import save_file

from utils.run.latents import LatentCache, crop_is_fixed, file_digest, model_fingerprint, plan_latent_cache


def image(path, size):
    Image.new("RGB", size, "red").save(path)
    return path


def test_only_fixed_crops_are_cacheable(tmp_path):
    square, wide = image(tmp_path / "s.png", (80, 80)), image(tmp_path / "w.png", (120, 80))
    assert crop_is_fixed(square, 64, center_crop=False)
    assert not crop_is_fixed(wide, 64, center_crop=False)
    assert crop_is_fixed(wide, 64, center_crop=True)


def test_plan_caches_when_exact_and_says_why_not(tmp_path):
    square, wide = image(tmp_path / "s.png", (80, 80)), image(tmp_path / "w.png", (120, 80))
    cache, keys, notice = plan_latent_cache([square], 64, False, None, tmp_path / "c", "m")
    assert cache is not None and set(keys) == {square} and "on" in notice
    cache, keys, notice = plan_latent_cache([square, wide], 64, False, None, tmp_path / "c", "m")
    assert cache is None and "not square" in notice
    cache, keys, notice = plan_latent_cache([square, wide], 64, False, True, tmp_path / "c", "m")
    assert set(keys) == {square} and "encoded every step" in notice
    assert plan_latent_cache([square], 64, False, False, tmp_path / "c", "m")[0] is None


def test_keys_change_with_content_model_resolution_and_crop(tmp_path):
    first, second = image(tmp_path / "a.png", (8, 8)), tmp_path / "b.png"
    Image.new("RGB", (8, 8), "blue").save(second)
    cache = LatentCache(tmp_path / "c", "m1", 64, False)
    keys = {cache.key(file_digest(first)), cache.key(file_digest(second)),
            LatentCache(tmp_path / "c", "m2", 64, False).key(file_digest(first)),
            LatentCache(tmp_path / "c", "m1", 32, False).key(file_digest(first)),
            LatentCache(tmp_path / "c", "m1", 64, True).key(file_digest(first))}
    assert len(keys) == 5
    assert model_fingerprint("x", None, {"a": 1}) != model_fingerprint("x", "main", {"a": 1})


def test_round_trip_and_a_torn_file_is_a_miss(tmp_path):
    cache = LatentCache(tmp_path, "m", 64, False)
    mean, std, time_ids = torch.randn(4, 8, 8), torch.rand(4, 8, 8), torch.tensor([96.0, 128, 0, 16, 64, 64])
    cache.save("k", mean, std, time_ids)
    loaded = cache.load("k")
    assert torch.equal(loaded[0], mean) and torch.equal(loaded[1], std) and torch.equal(loaded[2], time_ids)
    (tmp_path / "k.safetensors").write_bytes(b"torn")
    assert cache.load("k") is None and cache.load("missing") is None
    save_file({"mean": mean, "std": std}, tmp_path / "old.safetensors")  # an older version's entry: encode again
    assert cache.load("old") is None
