"""Per-step pixel augmentations, kohya's `color_aug` and `random_crop`: what each training step draws for
an image (`draw_pixel_augment`) and what it does to the pixels (`apply_color_aug`; the crop box is
`buckets.random_crop_box`).

Facts from kohya-ss sd-scripts (read at 48d368fa): `library/train_util.py` `AugHelper.color_aug`,
`trim_and_resize_if_required`, `BaseDataset.__getitem__`, `is_latent_cacheable`; the code is ours.
Order in kohya's step, followed by `images.prepare_image`: resize, crop (centred or random), colour
augmentation of the cropped pixels, then the flip.

Both change the pixels at every step, so they cannot be used with a latent cache (kohya refuses that; so
do the config checks). All random draws come from the caller's `random.Random` (the training step's
seeded one), so a resumed run draws the same values as the straight one. No torch here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from loralab.data.buckets import BucketChoice, random_crop_box

COLOR_AUG_P = 0.33  # kohya: applied when random() <= 0.33
HUE_SHIFT_LIMIT = 8.0  # OpenCV 8-bit hue units: 0..180 is 0..360 degrees, so ±8 is ±16 degrees
GAMMA_RANGE = (0.95, 1.05)


def cache_conflict(key: str) -> str:
    """Why `key` (color_aug or random_crop) cannot be used with the latent cache (kohya asserts
    `is_latent_cacheable`: no subset may use either when latents are cached)."""
    return (f"{key}: changes the training pixels at every step, but cache_latents encodes each image once, so "
            f"every step would train on one frozen latent (kohya refuses this too); set {key} = false, or "
            "cache_latents = false (and cache_latents_to_disk = false)")


@dataclass(frozen=True)
class ColorAug:
    """One colour augmentation: a hue shift (OpenCV 8-bit hue units) or a gamma, never both."""

    hue_shift: float | None = None
    gamma: float | None = None


@dataclass(frozen=True)
class PixelAugment:
    """What one step does to one image's pixels beyond the bucket's resize.

    crop_ltrb: the random crop box in the resized image (`random_crop_box`); None: the bucket's centred one.
    color: the colour augmentation drawn for this step (`draw_color_aug`); None: the colours unchanged.
    """

    crop_ltrb: tuple[int, int, int, int] | None = None
    color: ColorAug | None = None


def draw_color_aug(rng: random.Random) -> ColorAug | None:
    """kohya's `color_aug` draw (its replacement of albumentations' OneOf(HueSaturationValue(8, 0, 0),
    RandomGamma((95, 105))), p=0.33):

        if random() <= 0.33:
            if random() > 0.5: hue shift by uniform(-8, 8)       (OpenCV 8-bit hue units)
            else:              gamma uniform(0.95, 1.05)
        else: nothing (one draw only)

    So 16.5% of the steps shift the hue, 16.5% change the gamma, 67% leave the colours alone."""
    if rng.random() > COLOR_AUG_P:
        return None
    if rng.random() > 0.5:
        return ColorAug(hue_shift=rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT))
    return ColorAug(gamma=rng.uniform(*GAMMA_RANGE))


def draw_pixel_augment(choice: BucketChoice, *, color_aug: bool, random_crop: bool,
                       rng: random.Random) -> PixelAugment | None:
    """The random crop box (with `random_crop`), then the colour augmentation (with `color_aug`) of one
    image for one step, in kohya's order of draws. None, without drawing anything, when both are off."""
    if not (color_aug or random_crop):
        return None
    box = random_crop_box(choice.resized, choice.bucket, rng) if random_crop else None
    color = draw_color_aug(rng) if color_aug else None
    return PixelAugment(crop_ltrb=box, color=color)


def hue_shift(pixels: np.ndarray, shift: float) -> np.ndarray:
    """kohya's hue shift of uint8 pixels (H, W, 3), through OpenCV's 8-bit HSV (H in 0..179):

        H' = floor((H + s) mod 180),  s = shift if shift >= 0 else 180 + shift

    then back to 8-bit colour (S and V unchanged in HSV). As in kohya, the RGB array is handed to OpenCV
    as if it were BGR (`COLOR_BGR2HSV` / `COLOR_HSV2BGR`): the round trip is the same, and a shift of +s
    turns the true hue by about -2s degrees (the draw is symmetric, so only the sign of each draw differs
    from a true-RGB hue shift); the same draw gives kohya's pixels. OpenCV is a dependency of loralab
    (opencv-contrib-python-headless)."""
    import cv2

    hsv = cv2.cvtColor(np.ascontiguousarray(pixels, dtype=np.uint8), cv2.COLOR_BGR2HSV)
    s = shift if shift >= 0 else 180 + shift
    hsv[:, :, 0] = np.floor((hsv[:, :, 0] + s) % 180)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def random_gamma(pixels: np.ndarray, gamma: float) -> np.ndarray:
    """kohya's random gamma of uint8 pixels: out = uint8(clip(v ** gamma, 0, 255)) (truncated), on the raw
    0..255 values. Note: on raw values, not on v/255 as albumentations' RandomGamma does, so gamma 1.05 maps
    v >= 196 to white and gamma 0.95 maps 255 to 193: a much stronger brightness change than the range
    suggests. This is what kohya trains with, kept for the same results."""
    return np.clip(pixels.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)


def apply_color_aug(pixels: np.ndarray, aug: ColorAug | None) -> np.ndarray:
    """The colour augmentation `aug` applied to uint8 RGB pixels (H, W, 3); None returns them unchanged."""
    if aug is None:
        return pixels
    if aug.hue_shift is not None:
        return hue_shift(pixels, aug.hue_shift)
    if aug.gamma is not None:
        return random_gamma(pixels, aug.gamma)
    return pixels
