"""Aspect-ratio buckets: which resolution each image trains at, how it is resized and cropped.

The rules are kohya-ss sd-scripts' (`library/model_util.py make_bucket_resolutions`,
`library/train_util.py BucketManager`, `trim_and_resize_if_required`), so the same folder gives the
same buckets, the same `ss_bucket_info` and the same crops as in kohya. No torch here: the dataset
diagnostics use this module without loading a model.

Sizes are always (width, height).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from loralab.errors import LoralabError

log = logging.getLogger(__name__)

Size = tuple[int, int]


@dataclass(frozen=True)
class BucketChoice:
    """Where one image goes: its bucket, the size it is resized to, and the crop back to the bucket.

    bucket: (w, h) the training resolution of the batch this image is in.
    resized: (w, h) the image is first resized to this (it covers the bucket: each side >= the bucket's).
    crop_ltrb: (left, top, right, bottom) the centered crop box in the *resized* image;
        right - left == bucket width and bottom - top == bucket height (random_crop draws another box
        of the same size each step: `random_crop_box`).
    ar_error: bucket aspect ratio minus image aspect ratio (kohya's signed value).
    image_size: (w, h) the original image size this choice was made for.
    """

    bucket: Size
    resized: Size
    crop_ltrb: tuple[int, int, int, int]
    ar_error: float
    image_size: Size


def adjust_bucket_reso_range(
    resolution: Size, min_size: int, max_size: int, divisible: int
) -> tuple[int, int]:
    """Floor `min_bucket_reso` and ceil `max_bucket_reso` to multiples of `bucket_reso_steps` (kohya).

    Rule: min -= min % steps; max += steps - max % steps when not already a multiple. Then the range
    must hold the resolution: min <= min(W, H) and max >= max(W, H) (kohya asserts; we raise).
    """
    if min_size % divisible:
        adjusted = min_size - min_size % divisible
        log.warning("min_bucket_reso %d is not a multiple of bucket_reso_steps %d: using %d",
                    min_size, divisible, adjusted)
        min_size = adjusted
    if max_size % divisible:
        adjusted = max_size + divisible - max_size % divisible
        log.warning("max_bucket_reso %d is not a multiple of bucket_reso_steps %d: using %d",
                    max_size, divisible, adjusted)
        max_size = adjusted
    if min(resolution) < min_size:
        raise LoralabError(
            f"min_bucket_reso: {min_size} is larger than the smaller side of resolution "
            f"{resolution[0]},{resolution[1]}; "
            f"lower min_bucket_reso or raise resolution"
        )
    if max(resolution) > max_size:
        raise LoralabError(
            f"max_bucket_reso: {max_size} is smaller than the larger side of resolution "
            f"{resolution[0]},{resolution[1]}; "
            f"raise max_bucket_reso or lower resolution"
        )
    return min_size, max_size


def make_bucket_resolutions(resolution: Size, min_size: int, max_size: int, divisible: int) -> list[Size]:
    """The predefined buckets for `resolution` (kohya `make_bucket_resolutions`, exact).

    After flooring min and ceiling max to multiples of `divisible` (`adjust_bucket_reso_range`):
        A = W*H; add (s, s) with s = floor(sqrt(A) / div) * div
        for w in min, min+div, ..., <= max:
            h = min(max, floor((A // w) / div) * div)
            if h >= min: add (w, h) and (h, w)
    Returned sorted. 512x512, 256..1024 step 64 gives 17 buckets.
    """
    check_resolution(resolution)
    if divisible <= 0:
        raise LoralabError(f"bucket_reso_steps: {divisible} must be a positive number of pixels such as 64")
    min_size, max_size = adjust_bucket_reso_range(resolution, min_size, max_size, divisible)
    area = resolution[0] * resolution[1]
    resos: set[Size] = set()
    side = int(math.sqrt(area) // divisible) * divisible
    resos.add((side, side))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def check_resolution(resolution: Size) -> None:
    """The training resolution must be positive multiples of 8 (the VAE works in 8-pixel blocks)."""
    w, h = resolution
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise LoralabError(f"resolution: {w},{h} must be positive multiples of 8, e.g. 512 or 768,512")


def check_bucket_reso_steps(bucket_reso_steps: int, required_multiple: int = 64) -> None:
    """Warn when `bucket_reso_steps` is not a multiple of `required_multiple`; fail below 8-pixel steps.

    kohya requires multiples of 64 for SD 1.x/2.x (32 for SDXL): the UNet halves the latent three
    times. The tiny lab models have fewer levels, so smaller steps work there and this only warns.
    Steps must still be a multiple of 8 so every bucket maps onto whole latent pixels.
    """
    if bucket_reso_steps <= 0 or bucket_reso_steps % 8:
        raise LoralabError(
            f"bucket_reso_steps: {bucket_reso_steps} must be a positive multiple of 8 (64 for SD 1.x/2.x)"
        )
    if bucket_reso_steps % required_multiple:
        log.warning("bucket_reso_steps %d is not a multiple of %d: full-size SD models may fail on such buckets; "
                    "it is fine for small lab models", bucket_reso_steps, required_multiple)


def round_to_steps(x: float, steps: int) -> int:
    """kohya `round_to_steps`: round to the nearest integer, then floor to a multiple of `steps`."""
    x = int(x + 0.5)
    return x - x % steps


def center_crop_box(resized: Size, bucket: Size) -> tuple[int, int, int, int]:
    """The centered crop of a resized image back to its bucket (kohya `trim_and_resize_if_required`).

    Rule: the excess of each side is trimmed, `excess // 2` from the left/top, the rest from the
    right/bottom. Returns (left, top, right, bottom) in resized-image pixels.
    """
    rw, rh = resized
    bw, bh = bucket
    if rw < bw or rh < bh:
        raise ValueError(f"resized size {resized} does not cover bucket {bucket}")
    left = (rw - bw) // 2
    top = (rh - bh) // 2
    return left, top, left + bw, top + bh


def random_crop_box(resized: Size, bucket: Size, rng: random.Random) -> tuple[int, int, int, int]:
    """kohya's `random_crop`: the crop of a resized image back to its bucket at a random place instead of
    the centre (kohya `trim_and_resize_if_required` with random_crop).

    Rule: for each side longer than the bucket's, width first then height, the offset is
    `rng.randint(0, excess)` (both ends included: flush left/top up to flush right/bottom); a side with no
    excess gets 0 and draws nothing. Returns (left, top, right, bottom) in resized-image pixels, the same
    size as the bucket (`center_crop_box` is the same box with `excess // 2`).
    """
    rw, rh = resized
    bw, bh = bucket
    if rw < bw or rh < bh:
        raise ValueError(f"resized size {resized} does not cover bucket {bucket}")
    left = rng.randint(0, rw - bw) if rw > bw else 0
    top = rng.randint(0, rh - bh) if rh > bh else 0
    return left, top, left + bw, top + bh


def kohya_crop_ltrb(bucket: Size, image_size: Size) -> tuple[int, int, int, int]:
    """kohya's `crop_ltrb` value (`BucketManager.get_crop_ltrb`): what its latent cache stores under
    `crop_ltrb` and what SDXL's crop conditioning reads.

    Rule (kohya): fit the image *inside* the bucket (match height if the bucket is wider than the
    image, else width), then left = (bw - fitted_w) // 2, top = (bh - fitted_h) // 2,
    right = left + fitted_w, bottom = top + fitted_h (truncated to int). Note this is a letterbox
    position, not the crop that was actually applied (`BucketChoice.crop_ltrb`); we keep kohya's value
    for file and SDXL-conditioning compatibility.
    """
    bw, bh = bucket
    image_ar = image_size[0] / image_size[1]
    if bw / bh > image_ar:
        fw, fh = bh * image_ar, float(bh)
    else:
        fw, fh = float(bw), bw / image_ar
    left = (bw - fw) // 2
    top = (bh - fh) // 2
    return int(left), int(top), int(left + fw), int(top + fh)


def select_bucket(
    image_size: Size,
    *,
    resolution: Size,
    buckets: Sequence[Size] | None,
    bucket_reso_steps: int | None,
    no_upscale: bool,
) -> BucketChoice:
    """Choose the bucket, resized size and centered crop of one image (kohya `BucketManager.select_bucket`).

    Default mode (`no_upscale=False`, `buckets` = the predefined list):
      an exact size match wins; otherwise the bucket with the smallest |AR_bucket - AR_image| (the
      first one on ties). The image is scaled to cover it: match the height when AR_image > AR_bucket,
      else the width; resized = (int(w*s + .5), int(h*s + .5)). Small images are upscaled.
    `bucket_no_upscale` (`no_upscale=True`, `buckets` ignored):
      if w*h > W*H the image is shrunk to area W*H keeping its aspect ratio: either round the width to
      steps (`round_to_steps`) and derive the height, or round the height and derive the width,
      whichever gives the smaller AR error; otherwise it keeps its size. The bucket is each resized
      side floored to a multiple of `bucket_reso_steps`.
    `enable_bucket=False` is the default mode with `buckets=[resolution]`: resize to cover, then
    center-crop.
    Then the excess is cropped, centered (`center_crop_box`); with random_crop each step cuts its own box
    instead (`random_crop_box`).
    """
    iw, ih = image_size
    if iw <= 0 or ih <= 0:
        raise LoralabError(f"image size {iw}x{ih} is empty")
    aspect = iw / ih
    if not no_upscale:
        if not buckets:
            raise ValueError("select_bucket needs the predefined buckets unless no_upscale is set")
        if (iw, ih) in {tuple(b) for b in buckets}:
            bucket = (iw, ih)
        else:
            errors = [abs(b[0] / b[1] - aspect) for b in buckets]
            bucket = tuple(buckets[errors.index(min(errors))])
        if aspect > bucket[0] / bucket[1]:
            scale = bucket[1] / ih
        else:
            scale = bucket[0] / iw
        resized = (int(iw * scale + 0.5), int(ih * scale + 0.5))
    else:
        if not bucket_reso_steps:
            raise ValueError("bucket_no_upscale needs bucket_reso_steps")
        steps = bucket_reso_steps
        max_area = resolution[0] * resolution[1]
        if iw * ih > max_area:
            rw = math.sqrt(max_area * aspect)
            rh = max_area / rw
            w_rounded = round_to_steps(rw, steps)
            h_in_wr = round_to_steps(w_rounded / aspect, steps)
            h_rounded = round_to_steps(rh, steps)
            w_in_hr = round_to_steps(h_rounded * aspect, steps)
            ar_w_rounded = w_rounded / h_in_wr if h_in_wr else math.inf
            ar_h_rounded = w_in_hr / h_rounded if h_rounded else math.inf
            if abs(ar_w_rounded - aspect) < abs(ar_h_rounded - aspect):
                resized = (w_rounded, int(w_rounded / aspect + 0.5))
            else:
                resized = (int(h_rounded * aspect + 0.5), h_rounded)
        else:
            resized = (iw, ih)
        bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
        if bucket[0] <= 0 or bucket[1] <= 0:
            raise LoralabError(
                f"image of {iw}x{ih} is smaller than bucket_reso_steps {steps} on one side, so bucket_no_upscale "
                f"gives it an empty bucket; remove the image, upscale it, or turn off bucket_no_upscale"
            )
    bucket = (int(bucket[0]), int(bucket[1]))
    return BucketChoice(
        bucket=bucket,
        resized=resized,
        crop_ltrb=center_crop_box(resized, bucket),
        ar_error=bucket[0] / bucket[1] - aspect,
        image_size=(iw, ih),
    )


@dataclass(frozen=True)
class BucketCandidates:
    """The buckets one set of kohya bucket arguments allows, ready to pick each image's bucket.

    resolution: (W, H) the training resolution; W*H is the max bucket area.
    buckets: the predefined resolutions an image may land in; None with bucket_no_upscale, where each
        image's bucket is derived from its own size.
    bucket_reso_steps: the step that no-upscale buckets are floored to; None when buckets are off.
    no_upscale: kohya's `bucket_no_upscale` in effect (only with buckets on).
    Build it with `bucket_candidates`; `choose` is `select_bucket` with these arguments.
    """

    resolution: Size
    buckets: tuple[Size, ...] | None
    bucket_reso_steps: int | None
    no_upscale: bool

    def choose(self, image_size: Size) -> BucketChoice:
        """The bucket, resize and crop of one image among these candidates (`select_bucket`)."""
        return select_bucket(image_size, resolution=self.resolution, buckets=self.buckets,
                             bucket_reso_steps=self.bucket_reso_steps, no_upscale=self.no_upscale)


def bucket_candidates(
    resolution: Size,
    *,
    enable_bucket: bool,
    min_bucket_reso: int,
    max_bucket_reso: int,
    bucket_reso_steps: int,
    bucket_no_upscale: bool,
) -> BucketCandidates:
    """The candidate buckets for kohya's bucket arguments (kohya `BucketManager` setup), by mode:

    - buckets on (`enable_bucket`): the predefined resolutions `make_bucket_resolutions(resolution,
      min_bucket_reso, max_bucket_reso, bucket_reso_steps)`: for the max area W*H and the step, the
      sides from min to max bucket reso; an image takes the one closest in aspect ratio.
    - buckets on with `bucket_no_upscale`: no list (min/max_bucket_reso are ignored); each image's
      bucket is its own size, shrunk to the area W*H if larger, floored to `bucket_reso_steps`.
    - buckets off: the one bucket `resolution` (every image resized to cover it, then center-cropped);
      `bucket_reso_steps` and `bucket_no_upscale` are ignored.
    The step is not validated here (`check_bucket_reso_steps`); the range is (`adjust_bucket_reso_range`).
    """
    if not enable_bucket:
        return BucketCandidates(resolution, (resolution,), None, False)
    if bucket_no_upscale:
        return BucketCandidates(resolution, None, bucket_reso_steps, True)
    buckets = make_bucket_resolutions(resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps)
    return BucketCandidates(resolution, tuple(buckets), bucket_reso_steps, False)


def bucket_info(choices: Iterable[tuple[BucketChoice, int]]) -> dict:
    """kohya's `ss_bucket_info`: {"buckets": {i: {"resolution": (w, h), "count": n}}, "mean_img_ar_error": x}.

    `choices` holds one (BucketChoice, repeats) per registered image (train images and the reg images
    in use, with their balanced repeats). Buckets are the used ones, sorted by resolution; `count`
    includes repeats; `mean_img_ar_error` is the mean |ar_error| over images, without repeats.
    """
    counts: dict[Size, int] = {}
    ar_errors: list[float] = []
    for choice, repeats in choices:
        counts[choice.bucket] = counts.get(choice.bucket, 0) + repeats
        ar_errors.append(abs(choice.ar_error))
    return {
        "buckets": {i: {"resolution": reso, "count": counts[reso]} for i, reso in enumerate(sorted(counts))},
        "mean_img_ar_error": sum(ar_errors) / len(ar_errors) if ar_errors else 0.0,
    }
