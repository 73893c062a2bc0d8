"""Reading training images: sizes from headers, pixels as RGB, and the bucket resize + crop.

torch is imported only inside `prepare_image`, so scanning a dataset does not load it.
"""

from __future__ import annotations

import errno
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from loralab.data.augment import PixelAugment, apply_color_aug
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


SKIPPED_LINK = "it is skipped; point the link at the real file (or folder) or delete it"


def symlink_problem(path: Path) -> tuple[str, str] | None:
    """Why a symlink cannot be followed, as (code, words), or None (not a symlink, or its target is there).

    - ("symlink_loop", "a symlink loop ..."): following it leads back to itself, directly (`a -> a`) or
      through other links (`a -> b`, `b -> a`); the system gives up with ELOOP.
    - ("broken_symlink", "a broken symlink, target missing ..."): what it points to does not exist.
    Training skips such a path (`SKIPPED_LINK`); it is named, not dropped without a word.
    """
    try:
        if not path.is_symlink():
            return None
    except OSError:  # cannot even look at the entry: not a link problem, the read that follows names it
        return None
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink_loop", "a symlink loop (following it leads back to itself)"
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return "broken_symlink", f"a broken symlink, target missing ({target})"
        return "broken_symlink", f"a symlink whose target {target} cannot be read ({err.strerror})"
    return None


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


# The size rules of a degenerate image (`degenerate_image`); `loralab dataset check` reports the same.
TOO_SMALL_AREA_SHARE = 0.5  # below this share of the training area an image counts as too small
EXTREME_ASPECT = 3.0


def degenerate_image(size: tuple[int, int], choice: BucketChoice, resolution: tuple[int, int]) -> list[tuple[str, str]]:
    """What is wrong with an image by its size alone, as [(code, words)]; [] for a usable size.

    - too_small: w x h < TOO_SMALL_AREA_SHARE x the training area (resolution W x H): it is upscaled to its
      bucket (a 1x1 image x512 at 512x512) and trains blurry.
    - extreme_aspect: max(w/h, h/w) >= EXTREME_ASPECT (3:1): most of it is cropped away or squeezed into
      a thin bucket.
    Only the header size is needed, so `FolderDataset` (training) warns with these words without decoding
    the image; `loralab dataset check` reports them too, next to the rules that need the pixels (alpha,
    grayscale) or the bucket settings (heavy_crop), which training does not check.
    """
    w, h = size
    out: list[tuple[str, str]] = []
    if w * h < TOO_SMALL_AREA_SHARE * (resolution[0] * resolution[1]):
        scale = choice.resized[0] / w
        how = (f"it is upscaled x{scale:.1f} to its {choice.bucket[0]}x{choice.bucket[1]} bucket and trains blurry"
               if scale > 1 else f"it trains in a small {choice.bucket[0]}x{choice.bucket[1]} bucket")
        words = f"{w}x{h} is less than half the training area {resolution[0]}x{resolution[1]}: {how}; use a larger image"
        out.append(("too_small", words))
    aspect = max(w / h, h / w)
    if aspect >= EXTREME_ASPECT:
        out.append(("extreme_aspect",
                    f"aspect ratio {aspect:.1f}:1 ({w}x{h}); crop it into parts closer to the bucket shapes"))
    return out


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
    """Convert to RGB, compositing any transparency onto a white background.

    16-bit and 32-bit grayscale (PIL modes I;16*, I, F) are scaled to 8 bits first: PIL's own
    convert("RGB") clips them at 255, so a 16-bit scan would train as a white picture (as it does in
    kohya). I;16 spans 0..65535; I and F are scaled by their own maximum (0..1 for F images within it)."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0 if img.mode == "F" else 255.0)
        img = Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")
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


def resize_and_crop(img: Image.Image, choice: BucketChoice,
                    crop_ltrb: tuple[int, int, int, int] | None = None) -> Image.Image:
    """Resize to `choice.resized` (kohya's default interpolation), then crop `crop_ltrb` (a random_crop
    box), else `choice.crop_ltrb` (the centred one)."""
    if img.size != choice.resized:
        img = img.resize(choice.resized, resize_interpolation(img.size, choice.resized))
    if img.size != choice.bucket:
        img = img.crop(crop_ltrb or choice.crop_ltrb)
    return img


def prepare_image(path_or_img: str | Path | Image.Image, choice: BucketChoice, flip: bool = False,
                  augment: PixelAugment | None = None) -> "torch.Tensor":
    """The training pixels of one image: float32 tensor (3, H, W) in [-1, 1] at the bucket size.

    Load as RGB, resize to `choice.resized`, crop (`augment.crop_ltrb` when random_crop drew one, else
    `choice.crop_ltrb`), change the colours of the cropped pixels (`augment.color`, kohya's color_aug),
    then mirror horizontally when `flip`: kohya's order. The image must still have the size the bucket was
    chosen for.
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
    img = resize_and_crop(img, choice, augment.crop_ltrb if augment is not None else None)
    if augment is not None and augment.color is not None:
        img = Image.fromarray(apply_color_aug(np.asarray(img), augment.color), "RGB")
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    return tensor / 127.5 - 1.0
