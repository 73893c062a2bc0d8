"""What decoding one image tells the dataset check: whether it decodes completely, transparency,
grayscale, and the hashes that find exact and near duplicates (`inspect_image`, `hamming_pairs`)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from loralab.data.images import READ_ERRORS, warn_if_very_large


@dataclass
class ImageFacts:
    """What decoding one image tells: an error, or its mode facts and hashes."""

    sha256: str = ""
    error: str | None = None
    transparent: bool = False
    grayscale: bool = False
    phash: np.ndarray | None = None  # (64,) bool
    dhash: np.ndarray | None = None  # (64,) bool


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: D @ x is the DCT of a length-n vector x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def phash(gray: Image.Image) -> np.ndarray:
    """Perceptual hash, 64 bits: the 8x8 lowest frequencies of the 2-D DCT of the 32x32 grayscale
    image, each bit = coefficient > their median. Resizing, re-encoding and small edits keep most bits."""
    x = np.asarray(gray.resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    low = (_DCT32 @ x @ _DCT32.T)[:8, :8].ravel()
    return low > np.median(low)


def dhash(gray: Image.Image) -> np.ndarray:
    """Difference hash, 64 bits: on a 9x8 grayscale image, each bit = pixel brighter than its right neighbour."""
    x = np.asarray(gray.resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    return (x[:, 1:] > x[:, :-1]).ravel()


def is_grayscale(img: Image.Image, tolerance: int = 6) -> bool:
    """No colour: a one-channel mode, or RGB whose channels differ by at most `tolerance` everywhere
    (on a 64x64 box-filtered copy, so JPEG chroma noise does not count as colour)."""
    if img.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return True
    small = img.convert("RGB").resize((64, 64), Image.Resampling.BOX)
    arr = np.asarray(small, dtype=np.int16)
    spread = arr.max(axis=2) - arr.min(axis=2)
    return int(spread.max()) <= tolerance


def has_transparency(img: Image.Image) -> bool:
    """Some pixel is not fully opaque (an alpha channel that is all 255 is harmless)."""
    if img.mode in ("RGBA", "LA", "PA"):
        return img.getchannel("A").getextrema()[0] < 255
    if img.mode == "P" and "transparency" in img.info:
        return img.convert("RGBA").getchannel("A").getextrema()[0] < 255
    return False


def inspect_image(path: Path) -> ImageFacts:
    """Decode the whole image (a truncated file fails here, not at its header) and compute its facts."""
    facts = ImageFacts()
    try:
        data = path.read_bytes()
    except OSError as err:
        facts.error = f"cannot read the file ({err})"
        return facts
    facts.sha256 = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            warn_if_very_large(path, img.size)
            img.load()
            facts.transparent = has_transparency(img)
            facts.grayscale = is_grayscale(img)
            if img.mode in ("RGBA", "LA", "PA", "P"):
                rgba = img.convert("RGBA")
                flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                gray = Image.alpha_composite(flat, rgba).convert("L")
            else:
                gray = img.convert("L")
    except UnidentifiedImageError:
        facts.error = "not an image format PIL can read"
        return facts
    except READ_ERRORS as err:
        facts.error = f"{type(err).__name__}: {err}"
        return facts
    facts.phash = phash(gray)
    facts.dhash = dhash(gray)
    return facts


def hamming_pairs(bits: np.ndarray, max_distance: int, block: int = 1024) -> Iterator[tuple[int, int, int]]:
    """(i, j, distance) for every pair i < j of rows of the (n, 64) bool array within `max_distance`."""
    b = bits.astype(np.float32)
    ones = b.sum(axis=1)
    n = len(b)
    for start in range(0, n, block):
        rows = b[start:start + block]
        dist = ones[start:start + block, None] + ones[None, :] - 2 * rows @ b.T
        ii, jj = np.nonzero(dist <= max_distance + 0.5)
        for i, j in zip(ii.tolist(), jj.tolist()):
            if start + i < j:
                yield start + i, j, int(round(dist[i, j]))
