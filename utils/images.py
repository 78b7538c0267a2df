"""Image files: which ones count, how they are read upright in RGB (phones' HEIC, EXIF rotation, transparency,
16-bit), and checking a folder of them before any model loads. Shared by the trainer and the tools."""

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from utils.errors import UserError

logger = logging.getLogger(__name__)

try:  # HEIC/HEIF, the iPhone's default format, through the pillow-heif plugin (in requirements.txt)
    from pillow_heif import register_heif_opener

    register_heif_opener()
    HEIF_EXTENSIONS = {".heic", ".heif"}
except ImportError:
    HEIF_EXTENSIONS = set()
# Still images Pillow reads (AVIF since Pillow 11.2); animations give their first frame.
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif"} | HEIF_EXTENSIONS


def list_images(folder) -> list[Path]:
    """Image files directly in `folder`, sorted by name (extension case ignored, everything else skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def require_images(folder, what: str) -> list[Path]:
    """The images of a folder that must have some; other entries are skipped with one warning naming them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} folder {folder} does not exist; put the photos there or pass another folder")
    try:
        images = list_images(folder)
    except PermissionError:
        raise UserError(f"{what} folder {folder} cannot be read (permission denied); make it readable "
                        f"(chmod u+rx {folder}) or pass another folder") from None
    image_set = set(images)
    others = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p not in image_set)
    unread_heif = [name for name in others if Path(name).suffix.lower() in {".heic", ".heif"}]
    if unread_heif:
        logger.warning("Skipping %d HEIC photo(s) of %s because pillow-heif is not installed (pip install pillow-heif, "
                       "or convert them to JPEG): %s", len(unread_heif), folder, ", ".join(unread_heif))
        others = [name for name in others if name not in unread_heif]
    if others:
        logger.warning("Skipping %d entries of %s that are not images: %s", len(others), folder, ", ".join(others))
    if not images:
        kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
        hint = "; its HEIC photos need `pip install pillow-heif` or converting to JPEG" if unread_heif else ""
        raise UserError(f"{what} folder {folder} holds no images ({kinds}){hint}; add photos or pass another folder")
    return images


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale PNG: scale, do not clip
        levels = np.asarray(image, dtype=np.float64) * (255 / 65535)
        return Image.fromarray(np.clip(levels, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


@contextmanager
def _open(path):
    """Image.open without Pillow's DecompressionBombWarning: between its 89 and 179 megapixel limits are real photos
    (108 MP phone cameras), read here at a reduced scale; above 179 MP Pillow's error still stops the read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            yield image


def load_rgb(path, resolution=None) -> Image.Image:
    """Read an image upright (EXIF orientation applied), in RGB; transparency is composited on white, 16-bit
    levels are scaled, animations give their first frame. With `resolution`, a large JPEG is decoded at the
    smallest DCT scale that keeps both sides at least that large (Pillow's draft), so 8000 px photos stay cheap."""
    with _open(path) as image:
        if resolution and image.format in ("JPEG", "MPO"):
            image.draft("RGB", (resolution, resolution))
        image.seek(0)
        return _to_rgb(ImageOps.exif_transpose(image))


EXIF_ORIENTATION = 0x0112
TURNED_ORIENTATIONS = (5, 6, 7, 8)  # stored turned by 90 degrees: width and height swap when shown upright


def upright_size(path) -> tuple[int, int]:
    """(width, height) of a photo as load_rgb shows it, at full size, from its header alone."""
    with _open(path) as image:
        width, height = image.size
        if image.getexif().get(EXIF_ORIENTATION) in TURNED_ORIENTATIONS:
            return height, width
    return width, height


def check_images(paths, resolution: int, skip_bad: bool, what: str) -> list[Path]:
    """Decode every image once, before any model loads: the readable ones are returned; unreadable ones stop the
    run with their names (or are skipped with a warning when `skip_bad`); small ones are reported as upscaled."""
    good, bad, small = [], [], []
    for path in paths:
        try:
            image = load_rgb(path, resolution)
        except Image.DecompressionBombError as error:
            bad.append(f"{path} ({error}; resize it below {2 * Image.MAX_IMAGE_PIXELS // 10**6} megapixels)")
            continue
        except (OSError, ValueError, SyntaxError) as error:
            bad.append(f"{path} ({type(error).__name__}: {error})" if str(error) else f"{path} ({type(error).__name__})")
            continue
        good.append(path)
        if min(image.size) < resolution:
            small.append(f"{Path(path).name} ({image.width}x{image.height})")
    if bad and not skip_bad:
        raise UserError(f"{what}: {len(bad)} file(s) cannot be read as images: " + "; ".join(bad[:5])
                        + ". Replace or remove them, or pass --skip_bad_images to train without them")
    if bad:
        logger.warning("Skipping %d unreadable image(s) (--skip_bad_images): %s", len(bad), "; ".join(bad))
    if small:
        logger.warning("%d image(s) are smaller than --resolution %d and will be upscaled: %s", len(small), resolution,
                       ", ".join(small))
    if not good:
        raise UserError(f"{what}: no readable image left")
    return good
