"""Figures `loralab review` measures on images. Each is a plain pixel statistic, the same on any model.

- change: mean |a − b| over pixels and channels, 0..255 scale divided by 255 (0 = the same picture,
  1 = black against white), between an image with the LoRA and the base model's image of the same
  prompt and seed. On prompts with the trigger it is what the LoRA does; on the same prompts with the
  trigger removed ("controls") it is the LoRA's collateral change (prior drift).
- likeness: Pearson correlation of two thumbnails (each image resized to 32×32 RGB, pixels as one
  vector): 1 = the same picture up to brightness and contrast, about 0 = unrelated. The nearest training
  image of a sample is the one with the highest likeness; a LoRA that copies its dataset shows its
  samples' nearest likeness rising towards 1 epoch after epoch (memorisation).
- saturation: mean HSV saturation (0..1) of an image; for a set of images (an epoch's prompts at one
  weight) it is given as a ratio to the base model's images of the same prompts and seeds (×1.00 = as
  saturated as the base). An overcooked LoRA "burns" at weight 1.2–2 (colours pushed to their extremes):
  the set counts as burned when its saturation ratio is >= 1.5. clipped (share of pixels with a channel
  at 0 or 255, the set's mean minus the base's) is reported beside it; it does not decide, since a white
  or black background is clipped by nature.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

THUMB = 32
BURN_SATURATION = 1.5  # saturation ratio to the base image from which a sweep cell counts as burned


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def change(a: Image.Image, b: Image.Image) -> float:
    x, y = as_array(a), as_array(b)
    if x.shape != y.shape:
        y = as_array(b.resize(a.size, Image.Resampling.BILINEAR))
    return float(np.abs(x - y).mean() / 255.0)


def thumbnail(image: Image.Image) -> np.ndarray:
    """The likeness vector of an image: 32×32 RGB, mean-centred, unit length."""
    v = as_array(image.convert("RGB").resize((THUMB, THUMB), Image.Resampling.BILINEAR)).ravel()
    v = v - v.mean()
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def thumbnails(images: Sequence[Image.Image]) -> np.ndarray:
    return np.stack([thumbnail(im) for im in images]) if images else np.zeros((0, THUMB * THUMB * 3), np.float32)


def nearest(samples: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each sample thumbnail: (the index of its nearest training thumbnail, that likeness)."""
    if len(train) == 0 or len(samples) == 0:
        return np.zeros(len(samples), int), np.zeros(len(samples))
    sims = samples @ train.T
    idx = sims.argmax(1)
    return idx, sims[np.arange(len(samples)), idx]


def saturation(image: Image.Image) -> float:
    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float32)
    return float(hsv[..., 1].mean() / 255.0)


def clipped(image: Image.Image) -> float:
    x = as_array(image)
    return float(((x <= 0) | (x >= 255)).any(-1).mean())


def burned(cells: Sequence[Image.Image], bases: Sequence[Image.Image]) -> tuple[float, float, bool]:
    """(saturation ratio, extra clipped share, burned?) of a set of images against the base model's images
    of the same prompts and seeds: the ratio of their mean saturations, the difference of their mean
    clipped shares. Measured over the set, not per image: one prompt drawn in another colour is not a burn."""
    s0 = float(np.mean([saturation(b) for b in bases]))
    ratio = float(np.mean([saturation(c) for c in cells])) / s0 if s0 > 1e-3 else 1.0
    extra = float(np.mean([clipped(c) for c in cells]) - np.mean([clipped(b) for b in bases]))
    return ratio, extra, ratio >= BURN_SATURATION


def training_images(folders: Sequence[Path], limit: int = 2000) -> tuple[list[Path], np.ndarray]:
    """Thumbnails of the images in the training folders (kohya layout: `N_name/` subfolders or the
    folder itself), at most `limit` of them, in name order."""
    from loralab.data.images import IMAGE_EXTENSIONS

    paths: list[Path] = []
    for root in folders:
        root = Path(root)
        if not root.is_dir():
            continue
        subs = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")] or [root]
        for d in subs:
            paths += [p for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
    paths = paths[:limit]
    thumbs = []
    kept = []
    for p in paths:
        try:
            with Image.open(p) as im:
                thumbs.append(thumbnail(im))
            kept.append(p)
        except OSError:
            continue
    return kept, (np.stack(thumbs) if thumbs else np.zeros((0, THUMB * THUMB * 3), np.float32))
