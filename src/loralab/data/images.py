"""Reading training images: sizes from headers, pixels as RGB, and the bucket resize + crop.

torch is imported only inside `prepare_image`, so scanning a dataset does not load it.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from loralab.data.buckets import BucketChoice
from loralab.errors import LoralabError

READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# kohya's list (compared case-insensitively here; kohya globs both lower and upper case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def is_image_file(path: Path) -> bool:
    """An image kohya would train on: a known extension and not a hidden file (kohya globs `*`)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def _broken(path: Path, err: Exception) -> LoralabError:
    if isinstance(err, Image.DecompressionBombError):
        return LoralabError(f"{path}: the image is too large to load safely ({err}); downscale it or remove it")
    return LoralabError(
        f"{path}: the image cannot be read ({type(err).__name__}: {err}); it is corrupt, truncated or not an image. "
        f"Remove it from the folder or re-save it with an image editor"
    )


# PIL warns (DecompressionBombWarning, with its own source line) for images over Image.MAX_IMAGE_PIXELS;
# `warn_if_very_large` says it instead, naming the file. A process-wide filter, because catch_warnings is
# not thread-safe and dataset checks decode images on several threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def warn_if_very_large(path: Path, size: tuple[int, int]) -> None:
    """Our warning for an image over PIL's limit (Image.MAX_IMAGE_PIXELS, 89 MP by default); twice the
    limit is refused by PIL (DecompressionBombError, reported as an unreadable image)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > limit:
        log.warning("%s: a very large image (%dx%d, over %d pixels); it loads, but slowly and with much memory: "
                    "downscale it (training uses at most the bucket size)", path, size[0], size[1], limit)


def read_image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels.

    EXIF orientation is ignored, as in kohya (the pixels are also loaded unrotated).
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
            warn_if_very_large(path, img.size)
    except READ_ERRORS as err:
        raise _broken(path, err) from err
    if w <= 0 or h <= 0:
        raise LoralabError(f"{path}: the image header says {w}x{h}; re-save the image or remove it")
    return w, h


def load_image(path: str | Path) -> Image.Image:
    """The image as an RGB PIL image, fully decoded.

    Transparency is composited onto white. (kohya's `convert("RGB")` drops the alpha channel, so
    transparent areas train as whatever colour the hidden pixels hold, usually black.)
    A corrupt, truncated or unreadable file raises LoralabError naming it.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            warn_if_very_large(path, img.size)
            img.load()
            return to_rgb(img)
    except READ_ERRORS as err:
        raise _broken(path, err) from err


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert to RGB, compositing any transparency onto a white background."""
    if img.mode == "RGB":
        return img.copy()
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def resize_interpolation(image_size: tuple[int, int], resized: tuple[int, int]) -> Image.Resampling:
    """kohya's default interpolation: area when shrinking (both sides not larger), else lanczos.

    Area is PIL's BOX filter: each output pixel is the area-weighted mean of the input pixels it
    covers, the same as OpenCV's INTER_AREA for downscaling.
    """
    if image_size[0] >= resized[0] and image_size[1] >= resized[1]:
        return Image.Resampling.BOX
    return Image.Resampling.LANCZOS


def resize_and_crop(img: Image.Image, choice: BucketChoice) -> Image.Image:
    """Resize to `choice.resized` (kohya's default interpolation), then crop `choice.crop_ltrb`."""
    if img.size != choice.resized:
        img = img.resize(choice.resized, resize_interpolation(img.size, choice.resized))
    if img.size != choice.bucket:
        img = img.crop(choice.crop_ltrb)
    return img


def prepare_image(path_or_img: str | Path | Image.Image, choice: BucketChoice, flip: bool = False) -> "torch.Tensor":
    """The training pixels of one image: float32 tensor (3, H, W) in [-1, 1] at the bucket size.

    Load as RGB, resize to `choice.resized`, crop `choice.crop_ltrb`, then mirror horizontally when
    `flip` (kohya flips after the crop). The image must still have the size the bucket was chosen for.
    """
    import torch

    if isinstance(path_or_img, Image.Image):
        img, where = to_rgb(path_or_img), "image"
    else:
        img, where = load_image(path_or_img), str(path_or_img)
    if img.size != choice.image_size:
        raise LoralabError(
            f"{where}: the image is {img.size[0]}x{img.size[1]} but was {choice.image_size[0]}x{choice.image_size[1]} "
            f"when the dataset was scanned; it changed during the run. Start the run again"
        )
    img = resize_and_crop(img, choice)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    return tensor / 127.5 - 1.0
