"""Bad input, secrets and preflight: one clear message (exit 2, no traceback), nothing lost, nothing leaked."""

import numpy as np
import pytest
from PIL import Image

from tests.helpers import assert_clean_error, base_args, run_in_process
from utils.images import check_images, load_rgb, require_images
from utils.errors import UserError
from utils.run.validation import image_filename


def photo_folder(tmp_path, name="photos", count=2):
    folder = tmp_path / name
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (80, 80), (40 * i, 100, 200)).save(folder / f"{i}.jpg")
    return folder


def dry_run(tiny_model, folder, tmp_path, **flags):
    return run_in_process(base_args(tiny_model, folder, tmp_path / "out", dry_run=True, **flags))


@pytest.mark.e2e
def test_files_that_are_not_images_are_skipped_with_one_warning(tiny_model, tmp_path):
    folder = photo_folder(tmp_path)
    for name in (".DS_Store", "caption.txt", "Thumbs.db"):
        (folder / name).write_bytes(b"x")
    (folder / "raw").mkdir()
    result = dry_run(tiny_model, folder, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "not images" in line]
    assert len(warnings) == 1 and all(n in warnings[0] for n in (".DS_Store", "Thumbs.db", "caption.txt", "raw/"))


@pytest.mark.parametrize("name, content", [
    ("truncated.jpg", None),
    ("empty.jpg", b""),
    ("notes.png", b"this is a text file with a png name"),
    ("garbage.webp", b"RIFF\x00\x00\x00\x00WEBPVP8 garbage"),
])
@pytest.mark.e2e
def test_an_unreadable_image_is_named_or_skipped(tiny_model, tmp_path, name, content):
    folder = photo_folder(tmp_path)
    if content is None:
        Image.effect_noise((256, 256), 64).convert("RGB").save(folder / name, quality=90)
        content = (folder / name).read_bytes()[:1500]
    (folder / name).write_bytes(content)
    assert_clean_error(dry_run(tiny_model, folder, tmp_path), name, "cannot be read as images", "--skip_bad_images")
    skipped = dry_run(tiny_model, folder, tmp_path, skip_bad_images=True)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "Skipping 1 unreadable image" in skipped.stderr and "2 image(s)" in skipped.stdout


def test_every_kind_of_photo_is_converted_to_rgb(tmp_path):
    Image.new("L", (20, 20), 128).save(tmp_path / "grey.png")
    Image.new("RGB", (20, 20), (255, 0, 0)).convert("P").save(tmp_path / "palette.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    frames = [Image.new("RGB", (20, 20), c) for c in ((0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    expected = {"grey.png": (128, 128, 128), "palette.png": (255, 0, 0), "deep.png": (255, 255, 255),
                "anim.gif": (0, 0, 255), "anim.webp": (0, 0, 255), "clear.png": (255, 255, 255)}
    for name, pixel in expected.items():
        image = load_rgb(tmp_path / name)
        assert image.mode == "RGB" and image.getpixel((5, 5)) == pixel, name
    cmyk = load_rgb(tmp_path / "cmyk.jpg").getpixel((5, 5))
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # red


def test_small_images_are_upscaled_with_a_warning(tmp_path, caplog):
    Image.new("RGB", (40, 30)).save(tmp_path / "tiny.png")
    assert check_images([tmp_path / "tiny.png"], 64, False, "--instance_data_dir") == [tmp_path / "tiny.png"]
    assert "upscaled" in caplog.text and "tiny.png (40x30)" in caplog.text


def test_a_huge_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    Image.new("RGB", (8000, 8000), (10, 20, 30)).save(tmp_path / "huge.jpg", quality=50)
    image = load_rgb(tmp_path / "huge.jpg", 512)
    assert 512 <= min(image.size) < 1100  # an eighth-scale decode, not 64 million pixels


def test_a_108_megapixel_photo_is_read_without_a_warning_and_a_bomb_is_refused_by_name(tmp_path, recwarn):
    Image.new("1", (12000, 9000)).save(tmp_path / "phone.png")  # a 108 MP phone camera's size
    assert check_images([tmp_path / "phone.png"], 64, False, "--instance_data_dir") == [tmp_path / "phone.png"]
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    Image.new("1", (14000, 14000)).save(tmp_path / "bomb.png")  # 196 MP: over Pillow's limit, a decompression bomb
    with pytest.raises(UserError, match=r"bomb.png \(Image size \(196000000 pixels\) exceeds .*resize it below 178 megapixels"):
        check_images([tmp_path / "bomb.png"], 64, False, "--instance_data_dir")


def test_validation_filenames_cannot_leave_their_folder():
    for prompt in ("../../etc/passwd", "/abs/path", "a\\b", "..", "   "):
        name = image_filename(0, prompt, 0)
        assert "/" not in name and "\\" not in name and not name.startswith(".")


@pytest.mark.e2e
def test_dry_run_prints_the_plan_and_loads_no_weights(tiny_model, subject, tmp_path):
    result = run_in_process(base_args(tiny_model, subject, tmp_path / "out", dry_run=True, with_prior_preservation=True,
                                   class_data_dir=tmp_path / "class", class_prompt="a photo of toy", num_class_images=5,
                                   train_text_encoder=True, max_train_steps=None, num_train_epochs=2))
    assert result.returncode == 0, result.stderr[-3000:]
    for phrase in ("Dry run: every check passed", "3 image(s)", "5 to generate", "UNet: BOFT on",
                   "text encoder: BOFT on", "optimizer steps: 10", "memory per process"):
        assert phrase in result.stdout, (phrase, result.stdout)
    assert "Loading pipeline components" not in result.stderr and not (tmp_path / "class").exists()


@pytest.mark.e2e
def test_an_output_folder_that_cannot_be_written(tiny_model, subject, tmp_path):
    (tmp_path / "file").write_text("")
    result = run_in_process(base_args(tiny_model, subject, tmp_path / "file" / "out"))
    assert_clean_error(result, "cannot be written to")


def test_a_tracker_that_is_not_installed(monkeypatch):
    import importlib.util

    from utils.run import tracking

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real_find_spec(name))
    with pytest.raises(UserError, match="--report_to all needs the wandb package: pip install wandb"):
        tracking.resolve_trackers("all")
    assert tracking.resolve_trackers("tensorboard") == ["tensorboard"]


@pytest.mark.parametrize("extension", [".heic", ".avif", ".tiff", ".tif", ".gif", ".HEIC"])
def test_phone_and_camera_formats_are_read(extension, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (80, 60), (200, 10, 10)).save(folder / f"IMG_0001{extension}")
    images = check_images(require_images(folder, "--instance_data_dir"), 64, False, "--instance_data_dir")
    red, green, blue = load_rgb(images[0]).getpixel((5, 5))
    assert len(images) == 1 and red > 190 and green < 25 and blue < 25  # lossy formats: close, not equal


def test_heic_without_its_plugin_is_named_with_how_to_convert(tmp_path, monkeypatch, caplog):
    from utils import images as dataset

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "IMG_0001.HEIC").write_bytes(b"heic")
    monkeypatch.setattr(dataset, "IMAGE_EXTENSIONS", dataset.IMAGE_EXTENSIONS - {".heic", ".heif"})
    with pytest.raises(UserError, match=r"its HEIC photos need `pip install pillow-heif` or converting to JPEG"):
        require_images(folder, "--instance_data_dir")
    assert "IMG_0001.HEIC" in caplog.text and "not images" not in caplog.text


def test_a_long_instance_prompt_warns_naming_what_is_cut(tiny_model, caplog):
    from transformers import AutoTokenizer

    from utils.families.stable_diffusion import warn_if_truncated

    tokenizer = AutoTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    warn_if_truncated(tokenizer, "a photo of qwe dog", "--instance_prompt")
    assert not caplog.text
    words = " ".join(["red"] * (tokenizer.model_max_length - 2) + ["LASTWORD"])
    warn_if_truncated(tokenizer, words, "--instance_prompt")
    assert f"the text encoder reads {tokenizer.model_max_length}" in caplog.text and "lastword" in caplog.text.lower()


def test_a_read_only_class_folder_is_a_clear_error(tmp_path, monkeypatch):
    from tests.helpers import make_config
    from utils.run import class_images

    class_dir = tmp_path / "class"
    class_dir.mkdir()
    args = make_config(with_prior_preservation=True, class_data_dir=class_dir, class_prompt="a toy", num_class_images=2)
    monkeypatch.setattr("os.access", lambda path, mode: False)  # as on a read-only file system
    with pytest.raises(UserError, match=r"needs 2 more class image\(s\) but .* cannot be written"):
        class_images.generate_class_images(args, family=None, accelerator=None)
    Image.new("RGB", (8, 8)).save(class_dir / "a.jpg")
    Image.new("RGB", (8, 8)).save(class_dir / "b.jpg")
    assert class_images.generate_class_images(args, family=None, accelerator=None) == 0  # complete: never written to


def test_a_photo_folder_that_cannot_be_read_is_a_clear_error(tmp_path, monkeypatch):
    from pathlib import Path

    from utils.images import require_images

    (tmp_path / "photos").mkdir()
    real_iterdir = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if self.name == "photos" else real_iterdir(self))  # chmod 000 (root reads it all the same)
    with pytest.raises(UserError, match=r"--instance_data_dir folder .*photos cannot be read \(permission denied\)"):
        require_images(tmp_path / "photos", "--instance_data_dir")
