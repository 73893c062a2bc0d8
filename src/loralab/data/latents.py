"""The latent cache: encode each training image once with the VAE, in memory and optionally on disk.

Disk files follow kohya's name and keys (`library/strategy_sd.py`): `<stem>_<W:04d>x<H:04d>_sd.npz`
next to the image (W x H = the original image size) holding `latents`, `original_size`, `crop_ltrb`
and, with flip_aug, `latents_flipped`. We add `ll_*` keys that say what the latents were made from
(the image file, the bucket and crop, the VAE), and a file is rebuilt when any of them changed.
kohya's legacy `<stem>.npz` is not read.

Loss masks (`data/masks.py`) are cached with the latents: in memory as uint8 at the bucket's pixel size
(flipped on use), on disk as `ll_loss_mask` with `ll_mask_id` (the mask file's name and sha256, or
"alpha"), so a changed mask file, or a switch between mask sources, rebuilds the file. (kohya keeps
alpha masks as float32 `alpha_mask`; 8 bits hold the same values in a quarter of the space.)

Like kohya, caching freezes one VAE sample (`latent_dist.sample()`) per image; it is incompatible
with per-step pixel augmentations (color_aug, random_crop), which the caller must refuse.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from loralab.data.buckets import kohya_crop_ltrb
from loralab.data.dataset import Sample
from loralab.data.images import prepare_image
from loralab.data.masks import mask_id, mask_pixels, mask_source
from loralab.errors import LoralabError
from loralab.io import atomic_save_npz

log = logging.getLogger(__name__)

SD_NPZ_SUFFIX = "_sd.npz"
CACHE_FORMAT = 1  # bump when the meaning of a cached latent changes (e.g. the resize rule)

EncodeFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class CachedLatents:
    latents: torch.Tensor  # (C, h, w) float32, already scaled by the caller's encode_fn
    latents_flipped: torch.Tensor | None
    original_size: tuple[int, int]
    crop_ltrb: tuple[int, int, int, int]  # kohya's value (see buckets.kohya_crop_ltrb), for SDXL conditioning
    mask: torch.Tensor | None = None  # the loss mask, uint8 (H, W) at the bucket size, not flipped; None: no mask


def latent_key(sample: Sample) -> tuple:
    """Samples with the same key share one latent: same file, same bucket, same resize and crop, same mask."""
    c = sample.choice
    return (str(sample.entry.path), c.bucket, c.resized, c.crop_ltrb, str(mask_source(sample.entry)))


def latents_npz_path(image_path: Path, image_size: tuple[int, int], suffix: str = SD_NPZ_SUFFIX) -> Path:
    """kohya's cache file name: `<stem>_<W:04d>x<H:04d><suffix>` next to the image."""
    w, h = image_size
    return image_path.with_name(f"{image_path.stem}_{w:04d}x{h:04d}{suffix}")


class LatentCache:
    """Latents by sample; `get(sample, flipped)` is what the training step stacks into a batch."""

    def __init__(self) -> None:
        self._items: dict[tuple, CachedLatents] = {}
        self.num_encoded = 0  # images encoded by the VAE in this run
        self.num_loaded = 0  # images read back from valid disk files

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, sample: Sample) -> bool:
        return latent_key(sample) in self._items

    def put(self, sample: Sample, item: CachedLatents) -> None:
        self._items[latent_key(sample)] = item

    def entry(self, sample: Sample) -> CachedLatents:
        try:
            return self._items[latent_key(sample)]
        except KeyError:
            raise KeyError(f"no cached latents for {sample.entry.path} in bucket {sample.choice.bucket}") from None

    def get(self, sample: Sample, flipped: bool = False) -> torch.Tensor:
        item = self.entry(sample)
        if not flipped:
            return item.latents
        if item.latents_flipped is None:
            raise KeyError(f"no flipped latents for {sample.entry.path}: cache_latents was called without flip_aug")
        return item.latents_flipped

    def get_mask(self, sample: Sample, flipped: bool = False) -> torch.Tensor:
        """The sample's loss mask, float32 (H, W) in [0, 1] at its bucket size, mirrored when `flipped`;
        all ones for an image without a mask."""
        item = self.entry(sample)
        if item.mask is None:
            w, h = sample.choice.bucket
            return torch.ones(h, w)
        mask = item.mask.float() / 255.0
        return torch.flip(mask, dims=[1]) if flipped else mask


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _image_fingerprint(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _cache_keys(sample: Sample, vae_id: str) -> dict[str, np.ndarray]:
    c = sample.choice
    return {
        "ll_format": np.array(CACHE_FORMAT),
        "ll_vae_id": np.array(vae_id),
        "ll_bucket": np.array(c.bucket),
        "ll_resized": np.array(c.resized),
        "ll_crop_box": np.array(c.crop_ltrb),
    }


def _load_valid(npz_path: Path, sample: Sample, flip_aug: bool, vae_id: str) -> CachedLatents | None:
    """The cached latents of `npz_path` when they were made from this image, bucket, crop and VAE.

    The image counts as unchanged when its byte size matches and either its mtime matches or (after
    a copy or touch) its sha256 does.
    """
    if not npz_path.is_file():
        return None
    try:
        with np.load(npz_path) as npz:
            data = {k: npz[k] for k in npz.files}
    except Exception as err:  # a half-written or foreign file is rebuilt, never trusted
        log.info("%s: unreadable latent cache, rebuilding (%s)", npz_path, err)
        return None
    for key, want in _cache_keys(sample, vae_id).items():
        if key not in data or not np.array_equal(data[key], want):
            log.debug("%s: %s changed, rebuilding", npz_path, key)
            return None
    if "latents" not in data or (flip_aug and "latents_flipped" not in data):
        return None
    want_mask = mask_id(sample.entry)
    if want_mask and (str(data.get("ll_mask_id", "")) != want_mask or "ll_loss_mask" not in data):
        log.debug("%s: the loss mask changed, rebuilding", npz_path)
        return None
    size, mtime = _image_fingerprint(sample.entry.path)
    if "ll_image_bytes" not in data or int(data["ll_image_bytes"]) != size:
        return None
    if int(data.get("ll_image_mtime_ns", -1)) != mtime:
        if str(data.get("ll_image_sha256", "")) != file_sha256(sample.entry.path):
            return None
    flipped = data.get("latents_flipped")
    return CachedLatents(
        latents=torch.from_numpy(data["latents"]).float(),
        latents_flipped=torch.from_numpy(flipped).float() if flipped is not None else None,
        original_size=tuple(int(x) for x in data["original_size"]),
        crop_ltrb=tuple(int(x) for x in data["crop_ltrb"]),
        mask=torch.from_numpy(data["ll_loss_mask"]) if want_mask else None,
    )


def _save(npz_path: Path, sample: Sample, item: CachedLatents, vae_id: str) -> None:
    """Write the cache file atomically (`loralab.io.atomic_save_npz`: temp file, then os.replace)."""
    size, mtime = _image_fingerprint(sample.entry.path)
    arrays = {
        "latents": item.latents.numpy(),
        "original_size": np.array(item.original_size),
        "crop_ltrb": np.array(item.crop_ltrb),
        **_cache_keys(sample, vae_id),
        "ll_image_bytes": np.array(size),
        "ll_image_mtime_ns": np.array(mtime),
        "ll_image_sha256": np.array(file_sha256(sample.entry.path)),
    }
    if item.latents_flipped is not None:
        arrays["latents_flipped"] = item.latents_flipped.numpy()
    if item.mask is not None:
        arrays["ll_loss_mask"] = item.mask.numpy()
        arrays["ll_mask_id"] = np.array(mask_id(sample.entry))
    try:
        atomic_save_npz(npz_path, arrays)
    except OSError as err:
        raise LoralabError(
            f"{npz_path}: cannot write the latent cache next to the image ({err}); make the folder writable "
            f"or set cache_latents_to_disk = false"
        ) from err


def _check_finite(latents: torch.Tensor, sample: Sample) -> None:
    if not torch.isfinite(latents).all():
        raise LoralabError(
            f"{sample.entry.path}: NaN latents: the VAE overflowed while encoding this image. Use no_half_vae "
            f"(an fp32 VAE) or a VAE fixed for fp16"
        )


def prepared_chunks(chunks: Sequence[Sequence[Sample]], workers: int = 0):
    """(chunk, its images stacked) for each chunk, in order, the images prepared by a pool of threads (PIL
    decodes and resizes without holding the GIL) at most 2 × workers chunks ahead, so the memory stays small."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    from itertools import islice

    def load(chunk):
        return torch.stack([prepare_image(s.entry.path, s.choice) for s in chunk])

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        todo = iter(chunks)
        pending = deque((chunk, pool.submit(load, chunk)) for chunk in islice(todo, 2 * workers))
        while pending:
            chunk, future = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(load, nxt)))
            yield chunk, future.result()


def cache_latents(
    samples: Sequence[Sample],
    encode_fn: EncodeFn,
    *,
    to_disk: bool,
    flip_aug: bool,
    vae_id: str,
    batch_size: int = 1,
    progress: bool = True,
    npz_suffix: str = SD_NPZ_SUFFIX,
    workers: int = 0,
) -> LatentCache:
    """Encode every distinct (image, bucket) of `samples` once and return the cache.

    `encode_fn(images)` takes a float32 CPU batch (B, 3, H, W) in [-1, 1] of one bucket and returns
    the scaled latents (B, C, h, w), e.g. `vae.encode(x.to(dev, dt)).latent_dist.sample() * scale`;
    it owns device and dtype. With `flip_aug` the mirrored images are encoded too.
    With `to_disk`, valid files from an earlier run are loaded instead of encoding, and new latents
    are written next to the images (kohya's file name). `vae_id` names the VAE (and anything else that
    changes latents, such as its dtype): a file made with another id is rebuilt.
    All latents are kept in memory (float32, CPU) for the run, with each image's loss mask (`data/masks.py`).
    A non-finite latent raises LoralabError naming the image. The images are decoded and resized by `workers`
    threads (0: one per CPU core, at most 8) a few batches ahead of the encoder.
    """
    if batch_size < 1:
        raise LoralabError(f"vae_batch_size: {batch_size} must be at least 1")
    cache = LatentCache()
    todo: dict[tuple[int, int], list[Sample]] = {}
    seen: set[tuple] = set()
    for sample in samples:
        key = latent_key(sample)
        if key in seen:
            continue
        seen.add(key)
        if to_disk:
            npz_path = latents_npz_path(sample.entry.path, sample.entry.size, npz_suffix)
            item = _load_valid(npz_path, sample, flip_aug, vae_id)
            if item is not None:
                cache.put(sample, item)
                cache.num_loaded += 1
                continue
        todo.setdefault(sample.choice.bucket, []).append(sample)

    total = sum(len(v) for v in todo.values())
    chunks = [samples_[start:start + batch_size] for samples_ in todo.values()
              for start in range(0, len(samples_), batch_size)]
    with tqdm(total=total, desc="caching latents", unit="img", disable=not progress or total == 0) as bar:
        for chunk, images in prepared_chunks(chunks, workers):
            with torch.no_grad():
                latents = encode_fn(images).detach().float().cpu()
                flipped = encode_fn(torch.flip(images, dims=[3])).detach().float().cpu() if flip_aug else None
            for i, sample in enumerate(chunk):
                _check_finite(latents[i], sample)
                if flipped is not None:
                    _check_finite(flipped[i], sample)
                item = CachedLatents(
                    latents=latents[i].clone(),
                    latents_flipped=flipped[i].clone() if flipped is not None else None,
                    original_size=sample.entry.size,
                    crop_ltrb=kohya_crop_ltrb(sample.choice.bucket, sample.entry.size),
                    mask=(torch.from_numpy(mask_pixels(sample.entry, sample.choice))
                          if mask_source(sample.entry) is not None else None),
                )
                cache.put(sample, item)
                cache.num_encoded += 1
                if to_disk:
                    _save(latents_npz_path(sample.entry.path, sample.entry.size, npz_suffix), sample, item, vae_id)
            bar.update(len(chunk))
    log.info("latents: %d cached (%d encoded, %d read from disk)", len(cache), cache.num_encoded, cache.num_loaded)
    return cache
