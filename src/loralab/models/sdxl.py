"""SDXL's size and crop micro-conditioning (`time_ids`), as kohya's sdxl_train_network computes it.

SDXL was trained with six extra numbers per image, embedded like timesteps and added to the time
embedding: original_size (h, w), crop_top_left (top, left) and target_size (h, w). diffusers' UNet takes
them as `added_cond_kwargs["time_ids"]`, shape (B, 6), in that order (kohya `get_size_embeddings` embeds
the same three pairs in the same order). The text half of SDXL's conditioning (two encoders, pooled
embedding) is in `models/text.py`.

Facts from kohya-ss sd-scripts (read at 48d368fa): `library/train_util.py` `BaseDataset.__getitem__`,
`BucketManager.get_crop_ltrb`, `trim_and_resize_if_required`, `library/sdxl_train_util.py`
`get_size_embeddings`, `library/sdxl_lpw_stable_diffusion.py` (samples); the code is ours.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Size = tuple[int, int]


def sdxl_time_ids(image_size: Size, bucket: Size, flipped: bool = False,
                  crop_top_left: tuple[int, int] | None = None) -> tuple[int, int, int, int, int, int]:
    """The six SDXL micro-conditioning numbers of one training image, kohya's rule matched exactly:
    (original_h, original_w, crop_top, crop_left, target_h, target_w).

    - original_size: the image file's own size (before any resize); `image_size` is (w, h).
    - target_size: the bucket, i.e. the trained pixel size; `bucket` is (w, h).
    - crop_top_left: from kohya's `BucketManager.get_crop_ltrb(bucket, image_size)`, computed in floats:
          image_ar = w / h; if bw / bh > image_ar: fitted = (bh * image_ar, bh) else (bw, bw / image_ar)
          left = (bw - fitted_w) // 2; top = (bh - fitted_h) // 2; right = left + fitted_w
      (the image *fitted inside* the bucket: a letterbox offset, not the crop that was actually cut,
      `BucketChoice.crop_ltrb`; `buckets.kohya_crop_ltrb` is the same box truncated to ints).
      Not flipped: (top, left). Flipped (kohya mirrors it): (top, bw - right), where `right` is still the
      float, so e.g. bw 64, right 40.5 gives left int(23.5) = 23.
    - Every number is truncated with int() at the end, as kohya builds its LongTensors.
    kohya uses this box in all its bucketed paths (images and cached latents) and in the cached-latent path
    without buckets. Its uncached path without buckets uses the box (0, 0, 0, 0), which mirrors to a left
    of target_w (a kohya quirk); we use the rule above there too, which gives (0, 0) for such images.
    `crop_top_left` (a random_crop image: `random_crop_top_left`) replaces the rule above; kohya keeps the
    letterbox value there too (its code says it has no idea what to put for a random crop)."""
    iw, ih = image_size
    bw, bh = bucket
    bucket_ar = bw / bh
    image_ar = iw / ih
    if bucket_ar > image_ar:
        fitted_w, fitted_h = bh * image_ar, bh
    else:
        fitted_w, fitted_h = bw, bw / image_ar
    left = (bw - fitted_w) // 2
    top = (bh - fitted_h) // 2
    right = left + fitted_w
    crop_left = bw - right if flipped else left
    if crop_top_left is not None:
        top, crop_left = crop_top_left
    return int(ih), int(iw), int(top), int(crop_left), int(bh), int(bw)


def random_crop_top_left(crop_ltrb: tuple[int, int, int, int], resized: Size, flipped: bool = False) -> tuple[int, int]:
    """crop_top_left of an image cut at a random place (random_crop): what SDXL's conditioning means, the
    pixels cut away above and to the left of the crop in the resized image, (top, left) of `crop_ltrb`.
    Flipped (mirrored after the crop): the pixels cut to the right become the left ones, left = resized_w - right.
    So the model is told where each random crop was taken (kohya passes its fixed letterbox value instead)."""
    left, top, right, _ = crop_ltrb
    return int(top), int(resized[0] - right if flipped else left)


def batch_time_ids(image_sizes: Sequence[Size], buckets: Sequence[Size], flips: Sequence[bool],
                   device: torch.device | str | None = None,
                   crops: Sequence[tuple[int, int] | None] | None = None) -> torch.Tensor:
    """`time_ids` (B, 6) int64 of a training batch (`sdxl_time_ids` per image; `crops`: each image's
    crop_top_left of a random crop, or None for the rule). Kept integer like kohya's LongTensors: the UNet
    embeds them in float32, so large sizes are not rounded by fp16/bf16."""
    crops = crops if crops is not None else [None] * len(image_sizes)
    rows = [sdxl_time_ids(s, b, f, c) for s, b, f, c in zip(image_sizes, buckets, flips, crops)]
    return torch.tensor(rows, dtype=torch.long, device=device)


def sample_time_ids(width: int, height: int, batch: int = 1) -> torch.Tensor:
    """`time_ids` for a sample image, as kohya's SDXL sample pipeline: original = target = (h, w), crop (0, 0)."""
    return torch.tensor([[height, width, 0, 0, height, width]] * batch, dtype=torch.long)
