"""Loss masks, sd-scripts' `masked_loss` and `alpha_mask`: which pixels of an image the loss counts.

Facts from kohya-ss sd-scripts (read at 48d368fa): `library/train_util.py` `ControlNetDataset` (mask files),
`load_image` / `cache_batch_latents` (alpha), `library/custom_train_functions.py` `apply_masked_loss`,
`train_network.py` `process_batch`; the code is ours.

Two sources, chosen per subset:

- mask images: `conditioning_data_dir` of a dataset_config `[[datasets.subsets]]` (with masked_loss = true).
  The mask of `image_dir/0001.png` is the image file of the same stem in conditioning_data_dir (any of
  .png .jpg .jpeg .webp .bmp, e.g. `masks/0001.png`) and must have the same size. Its red channel after
  conversion to RGB (a grayscale mask: its gray value) / 255 weighs each pixel: white = trained,
  black = ignored. sd-scripts' `train_network.py` reads no mask folder for `train_data_dir` folders
  (its `--conditioning_data_dir` serves only the ControlNet scripts), so neither does loralab.
- `alpha_mask`: the image's own alpha channel / 255 (opaque = trained). An image without alpha counts
  whole (all ones, sd-scripts' rule), with one warning giving how many.

A mask goes through its image's resize (kohya's interpolation), crop (centred, or the step's random crop)
and flip (`prepare_mask`), at the bucket's pixel size in 8 bits, and is cached with the latents
(`data/latents.py`). The loss (`train/noise.py` apply_loss_mask) multiplies the element-wise loss by the
mask area-resized to the latent size, before the mean over all latent pixels.

Differences from sd-scripts: a missing mask or one of another size is an error naming the file before any
model loads (sd-scripts asserts at dataset creation, or when the batch is loaded); a mask folder's
files without an image only warn (sd-scripts refuses them); the random crop applies to the mask too
(sd-scripts crops masks only at the centre); subsets without masks may be mixed with masked ones (their
images count whole), so a reg subset needs no masks.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from loralab.data.buckets import BucketChoice
from loralab.data.dataset import ImageEntry, Subset, _names, list_images
from loralab.data.images import READ_ERRORS, _broken, read_image_size, resize_and_crop, to_rgb
from loralab.errors import LoralabError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ALPHA = "alpha"  # `mask_source` of an image whose alpha channel is its mask
NO_MASKS = ("there are no masks to apply. A train_data_dir folder dataset has no mask images (sd-scripts reads "
            "them only per dataset_config subset): set alpha_mask = true to use the images' alpha channel, or give "
            "a dataset_config whose [[datasets.subsets]] set conditioning_data_dir (a folder of masks named like "
            "the images), or set masked_loss = false")
NO_SUBSET_MASKS = ("no [[datasets.subsets]] gives masks: set conditioning_data_dir (a folder of masks named like the "
                   "images) or alpha_mask = true in a subset (or alpha_mask = true in the training config), or set "
                   "masked_loss = false")


def mask_source(entry: ImageEntry) -> Path | str | None:
    """Where an image's loss mask comes from: its mask file, `ALPHA` (its alpha channel), or None (no mask:
    every pixel counts)."""
    if entry.mask_path is not None:
        return entry.mask_path
    return ALPHA if entry.subset.alpha_mask else None


def has_alpha(path: Path) -> bool:
    """The image file has an alpha channel (or a transparent palette colour), from its header only."""
    try:
        with Image.open(path) as img:
            return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    except READ_ERRORS as err:
        raise _broken(path, err) from err


# ----------------------------------------------------------------------------------------- finding masks


def find_mask_files(subset: Subset) -> None:
    """Set each image's `mask_path`: the file of the same stem in `subset.conditioning_data_dir`
    (sd-scripts: `glob_images(conditioning_data_dir, stem)`, the first one in sorted order).

    Errors (LoralabError, naming the folder and files): the folder is missing; an image has no mask; a
    mask's size is not its image's. Mask files without an image are named in a warning."""
    folder = Path(subset.conditioning_data_dir)
    key = "conditioning_data_dir"
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise LoralabError(f"{key}: {folder} {what}; give the folder of the mask images of {subset.dir}")
    by_stem: dict[str, Path] = {}
    for p in list_images(folder):
        by_stem.setdefault(p.stem, p)
    missing: list[Path] = []
    wrong: list[str] = []
    for entry in subset.images:
        mask = by_stem.get(entry.path.stem)
        if mask is None:
            missing.append(entry.path)
            continue
        size = read_image_size(mask)
        if size != entry.size:
            wrong.append(f"{mask} is {size[0]}x{size[1]} but its image {entry.path.name} is "
                         f"{entry.size[0]}x{entry.size[1]}")
        entry.mask_path = mask
    if missing:
        raise LoralabError(
            f"{key}: {folder}: no mask for {len(missing)} of the {len(subset.images)} images of {subset.dir} "
            f"({_names(missing)}); each image needs a mask image of the same name in {folder}, e.g. "
            f"{folder / (missing[0].stem + '.png')} (white = trained, black = ignored)")
    if wrong:
        more = f" ... and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise LoralabError(f"{key}: a mask must have the size of its image: {'; '.join(wrong[:3])}{more}. "
                           f"Resize the masks (not the images) to match")
    stems = {e.path.stem for e in subset.images}
    extra = sorted(p for s, p in by_stem.items() if s not in stems)
    if extra:
        log.warning("%s: %s: %d mask images have no image in %s (%s); they are not used",
                    key, folder, len(extra), subset.dir, _names(extra))


def attach_masks(subsets: Sequence[Subset]) -> int:
    """Give the images of scanned subsets their masks: `find_mask_files` for a subset with a
    conditioning_data_dir; for alpha_mask subsets, one warning counting the images without alpha (they
    count whole, as in sd-scripts). Returns how many images have a mask."""
    no_alpha: list[Path] = []
    total = 0
    for subset in subsets:
        if subset.conditioning_data_dir is not None:
            find_mask_files(subset)
            total += len(subset.images)
        elif subset.alpha_mask:
            no_alpha += [e.path for e in subset.images if not has_alpha(e.path)]
            total += len(subset.images)
    if total:
        files = sum(len(s.images) for s in subsets if s.conditioning_data_dir is not None)
        log.info("loss masks: %d of %d images (%d from mask files, %d from alpha channels)", total,
                 sum(len(s.images) for s in subsets), files, total - files)
    if no_alpha:
        log.warning("alpha_mask: %d of the images have no alpha channel (%s); each counts whole, every pixel "
                    "trained (sd-scripts' rule)", len(no_alpha), _names(no_alpha))
    return total


# ----------------------------------------------------------------------------------------- mask pixels


def load_mask(entry: ImageEntry) -> Image.Image:
    """The image's loss mask as an 8-bit grayscale ("L") PIL image of the image's size: the red channel of
    its mask file (converted to RGB as sd-scripts does: transparency dropped), its alpha channel (255 where
    it has none), or all 255 for an image without a mask."""
    source = mask_source(entry)
    if source is None:
        return Image.new("L", entry.size, 255)
    path = entry.path if source == ALPHA else Path(source)
    try:
        with Image.open(path) as img:
            img.load()
            if source == ALPHA:
                alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
                mask = img.convert("RGBA").getchannel("A") if alpha else Image.new("L", img.size, 255)
            else:
                rgb = img.convert("RGB") if "A" in img.mode or "transparency" in img.info else to_rgb(img)
                mask = rgb.getchannel("R")
    except READ_ERRORS as err:
        raise _broken(path, err) from err
    if mask.size != entry.size:
        raise LoralabError(f"{path}: the mask is {mask.size[0]}x{mask.size[1]} but its image {entry.path} is "
                           f"{entry.size[0]}x{entry.size[1]}; it changed during the run. Start the run again")
    return mask


def mask_pixels(entry: ImageEntry, choice: BucketChoice, flip: bool = False,
                crop_ltrb: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The mask as trained: uint8 (H, W) at the bucket size, through the image's own steps
    (`images.prepare_image`): resize to `choice.resized` with kohya's interpolation, crop (`crop_ltrb`, a
    random crop box, else the centred one), then mirror when `flip`."""
    mask = resize_and_crop(load_mask(entry), choice, crop_ltrb)
    if flip:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(mask, dtype=np.uint8).copy()


def prepare_mask(entry: ImageEntry, choice: BucketChoice, flip: bool = False,
                 crop_ltrb: tuple[int, int, int, int] | None = None) -> "torch.Tensor":
    """`mask_pixels` as a float32 tensor (H, W) in [0, 1]."""
    import torch

    return torch.from_numpy(mask_pixels(entry, choice, flip, crop_ltrb)).float() / 255.0


def mask_id(entry: ImageEntry) -> str:
    """What the cached mask of an image was made from, for the latent cache's validity check: "" (no mask),
    "alpha" (the image's own alpha; the image is fingerprinted already), or the mask file's name and sha256."""
    source = mask_source(entry)
    if source is None:
        return ""
    if source == ALPHA:
        return ALPHA
    try:
        digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    except OSError as err:
        raise LoralabError(f"{source}: the mask image cannot be read ({err}); check its permissions") from err
    return f"file:{Path(source).name}:{digest}"
