"""`loralab dataset clean`: remove anti-AI-filter perturbations (Glaze, Mist, ...) from training images.

The method is lllyasviel's AdverseCleaner, the base of the community's cleaning scripts:

    y = image (float32, 0..255)
    64 times: y = bilateral filter(y, diameter 5, sigma colour 8, sigma space 8)
    4 times:  y = guided filter(guide = the ORIGINAL image, src = y, radius 4, eps 16)

The bilateral passes flatten small high-frequency perturbations but keep strong edges; the guided passes,
steered by the original image, put its edges and structure back. OpenCV's `cv2.bilateralFilter` and
`cv2.ximgproc.guidedFilter` (opencv-contrib) do the work when installed; otherwise a numpy version of both
filters (the same formulas, much slower) is used.

Cleaned copies go to a new folder with the same layout: images are cleaned and written at their size and in
their file format (an alpha channel is kept as it was); caption and other small text files are copied;
latent caches (*.npz) and hidden entries are left out. The originals are never written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from loralab.data.images import READ_ERRORS, is_image_file, warn_if_very_large
from loralab.errors import LoralabError
from loralab.io import atomic_write, atomic_write_bytes

log = logging.getLogger(__name__)

BILATERAL_PASSES = 64
BILATERAL_D = 5
BILATERAL_SIGMA_COLOR = 8.0
BILATERAL_SIGMA_SPACE = 8.0
GUIDED_PASSES = 4
GUIDED_RADIUS = 4
GUIDED_EPS = 16.0
SKIP_SUFFIXES = (".npz",)
REPORT_NAME = "clean_report.json"


def _cv2():
    """cv2 with the contrib guided filter, or None."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2 if hasattr(cv2, "ximgproc") else None


# ----------------------------------------------------------------------------------------- numpy filters
# Our own versions, used when opencv-contrib is missing: the same formulas as OpenCV's (bilateral: disc
# window, L1 colour distance, reflect-101 borders; guided: He et al.'s colour guided filter with box means
# over mirrored borders). They match OpenCV to float rounding (tests/test_clean_vae.py).


def bilateral_numpy(img: np.ndarray, d: int, sigma_color: float, sigma_space: float) -> np.ndarray:
    """OpenCV's bilateral filter on a float (H, W, C) array: the window is the disc of radius d // 2; a
    neighbour weighs exp(-r^2 / (2 sigma_space^2)) * exp(-(sum over channels |diff|)^2 / (2 sigma_color^2))."""
    radius = d // 2
    x = img.astype(np.float32)
    h, w = x.shape[:2]
    pad = np.pad(x, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    num = np.zeros_like(x)
    den = np.zeros(x.shape[:2], np.float32)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            r2 = dx * dx + dy * dy
            if r2 > radius * radius:
                continue
            shifted = pad[radius + dy:radius + dy + h, radius + dx:radius + dx + w]
            dist = np.abs(shifted - x).sum(axis=2)
            weight = math.exp(-r2 / (2 * sigma_space ** 2)) * np.exp(-(dist ** 2) / (2 * sigma_color ** 2))
            num += weight[..., None] * shifted
            den += weight
    return num / den[..., None]


def box_mean(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over the (2r+1) x (2r+1) window around each pixel (mirrored borders, edge pixel repeated, as
    OpenCV's guided filter does), any trailing dims."""
    pad = [(r, r), (r, r)] + [(0, 0)] * (x.ndim - 2)
    p = np.pad(x.astype(np.float64), pad, mode="symmetric")
    k = 2 * r + 1
    c = np.cumsum(p, axis=0)
    c = np.concatenate([np.zeros_like(c[:1]), c], axis=0)
    p = c[k:] - c[:-k]
    c = np.cumsum(p, axis=1)
    c = np.concatenate([np.zeros_like(c[:, :1]), c], axis=1)
    return (c[:, k:] - c[:, :-k]) / (k * k)


def guided_numpy(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s guided filter with a colour (H, W, 3) or gray (H, W, 1) guide: per window, src ~ a . guide + b
    by ridge regression (eps on the guide's covariance), then a and b are averaged and applied."""
    guide = guide.astype(np.float64)
    c = guide.shape[2]
    mean_i = box_mean(guide, radius)
    cov_ii = box_mean(guide[..., :, None] * guide[..., None, :], radius) - mean_i[..., :, None] * mean_i[..., None, :]
    cov_ii += eps * np.eye(c)
    out = np.empty(src.shape, np.float64)
    for ch in range(src.shape[2]):
        p = src[..., ch].astype(np.float64)
        mean_p = box_mean(p, radius)
        cov_ip = box_mean(guide * p[..., None], radius) - mean_i * mean_p[..., None]
        a = np.linalg.solve(cov_ii, cov_ip[..., None])[..., 0]
        b = mean_p - (a * mean_i).sum(axis=2)
        out[..., ch] = (box_mean(a, radius) * guide).sum(axis=2) + box_mean(b, radius)
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------- the method


def adverse_clean(
    img: np.ndarray,
    *,
    bilateral_passes: int = BILATERAL_PASSES,
    guided_passes: int = GUIDED_PASSES,
    use_opencv: bool | None = None,
) -> np.ndarray:
    """Clean one (H, W, C) image, C = 1 or 3, values 0..255 (any dtype): the AdverseCleaner method (see the
    module docstring). Returns float32 0..255, not rounded. `use_opencv=None`: OpenCV when it is installed."""
    cv2 = _cv2() if use_opencv in (None, True) else None
    if use_opencv and cv2 is None:
        raise LoralabError("dataset clean: opencv-contrib is not installed; pip install opencv-contrib-python-headless")
    x = np.ascontiguousarray(img, dtype=np.float32)
    if x.ndim == 2:
        x = x[..., None]
    y = x.copy()
    if cv2 is not None:
        squeeze = y.shape[2] == 1
        y2 = y[..., 0] if squeeze else y
        for _ in range(bilateral_passes):
            y2 = cv2.bilateralFilter(y2, BILATERAL_D, BILATERAL_SIGMA_COLOR, BILATERAL_SIGMA_SPACE)
        guide = x[..., 0] if squeeze else x
        gf = cv2.ximgproc.createGuidedFilter(guide, GUIDED_RADIUS, GUIDED_EPS)
        for _ in range(guided_passes):
            y2 = gf.filter(y2)
        y = y2[..., None] if squeeze else y2
    else:
        for _ in range(bilateral_passes):
            y = bilateral_numpy(y, BILATERAL_D, BILATERAL_SIGMA_COLOR, BILATERAL_SIGMA_SPACE)
        for _ in range(guided_passes):
            y = guided_numpy(x, y, GUIDED_RADIUS, GUIDED_EPS)
    return y.reshape(img.shape).astype(np.float32)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical arrays)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


# ----------------------------------------------------------------------------------------- folders


@dataclass
class CleanedImage:
    source: str
    output: str
    size: tuple[int, int]
    format: str
    mean_abs_diff: float  # mean |cleaned - original| over pixels and channels, 0..255
    psnr: float  # dB, cleaned vs original


@dataclass
class CleanReport:
    source: str
    output: str
    backend: str  # "opencv" | "numpy"
    images: list[CleanedImage]
    copied: int  # other files copied
    failed: list[tuple[str, str]]  # (file, why)

    def to_json(self) -> str:
        d = asdict(self)
        for im in d["images"]:
            im["psnr"] = None if math.isinf(im["psnr"]) else im["psnr"]
        return json.dumps(d, indent=2, ensure_ascii=False)


def check_output_folder(src: Path, out: Path, overwrite: bool) -> None:
    """OUT must not be DIR or inside it (cleaning would feed on its own output and the copies would
    train as a second dataset), and must be empty unless `overwrite`."""
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or out_r.is_relative_to(src_r):
        raise LoralabError(f"dataset clean: --out {out} is inside the dataset {src}; choose a folder outside it, "
                           f"e.g. {src_r.parent / (src_r.name + '_clean')}")
    if out.exists() and not out.is_dir():
        raise LoralabError(f"dataset clean: --out {out} is a file; give a new folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LoralabError(f"dataset clean: --out {out} is not empty; give a new folder, or pass --overwrite to "
                           f"write into it")


def _save_image(img: Image.Image, path: Path, fmt: str, params: dict) -> None:
    atomic_write(path, lambda tmp: img.save(tmp, format=fmt, **params))


def _copy_file(src: Path, dst: Path) -> None:
    def write(tmp: str) -> None:
        shutil.copyfile(src, tmp)
        shutil.copymode(src, tmp)

    atomic_write(dst, write)


def _save_params(img: Image.Image, fmt: str) -> dict:
    """Keep what the file had: ICC profile and EXIF; high quality for lossy formats."""
    params: dict = {}
    if img.info.get("icc_profile"):
        params["icc_profile"] = img.info["icc_profile"]
    if img.info.get("exif"):
        params["exif"] = img.info["exif"]
    if fmt == "JPEG":
        params.update(quality=95, subsampling=0)
    elif fmt == "WEBP":
        params.update(lossless=bool(img.info.get("lossless")), quality=95)
    return params


class UnreadableImage(Exception):
    """The source image cannot be decoded (it is reported and skipped, not copied)."""


def clean_image_file(src: Path, dst: Path, *, use_opencv: bool | None = None) -> CleanedImage:
    """Clean one image file into `dst`, same size and format; transparency kept unchanged."""
    try:
        with Image.open(src) as img:
            warn_if_very_large(src, img.size)
            img.load()
            fmt = img.format or src.suffix.lstrip(".").upper()
            params = _save_params(img, fmt)
            if img.mode in ("L", "I;16", "I"):
                color, alpha, mode = img.convert("L"), None, "L"
            else:
                rgba = img.convert("RGBA") if img.mode in ("RGBA", "LA", "PA", "P") else None
                transparent = rgba is not None and rgba.getchannel("A").getextrema()[0] < 255
                alpha = rgba.getchannel("A") if transparent else None
                color, mode = img.convert("RGB"), "RGB"
    except READ_ERRORS as err:
        raise UnreadableImage(f"{type(err).__name__}: {err}") from err
    original = np.asarray(color, dtype=np.float32)
    cleaned = adverse_clean(original, use_opencv=use_opencv)
    out_arr = np.clip(np.rint(cleaned), 0, 255).astype(np.uint8)
    out = Image.fromarray(out_arr, mode)
    if alpha is not None:
        out = out.convert("RGBA")
        out.putalpha(alpha)
    _save_image(out, dst, fmt, params)
    diff = np.abs(out_arr.astype(np.float32) - original)
    return CleanedImage(str(src), str(dst), color.size, fmt, float(diff.mean()), psnr(out_arr, original))


def clean_dataset(
    src: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    use_opencv: bool | None = None,
    progress: bool = True,
) -> CleanReport:
    """Write cleaned copies of every image under `src` to `out` (same relative paths), copy the other files
    (captions), and write `out/clean_report.json`. Hidden files and folders and *.npz caches are skipped.
    An image that cannot be read is listed in `failed` and not copied."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise LoralabError(f"dataset clean: {src} is not a folder; give the dataset folder (train_data_dir)")
    check_output_folder(src, out, overwrite)
    images: list[Path] = []
    others: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() in SKIP_SUFFIXES:
                continue
            (images if is_image_file(path) else others).append(path)
    if not images:
        raise LoralabError(f"dataset clean: no images (.png .jpg .jpeg .webp .bmp) under {src}")
    backend = "opencv" if (use_opencv is not False and _cv2() is not None) else "numpy"
    if backend == "numpy":
        log.warning("opencv-contrib is not installed: cleaning with the numpy filters (much slower); "
                    "pip install opencv-contrib-python-headless to speed it up")
    out.mkdir(parents=True, exist_ok=True)
    results: list[CleanedImage] = []
    failed: list[tuple[str, str]] = []
    for path in tqdm(images, desc="cleaning", unit="img", disable=None if progress else True):
        try:
            results.append(clean_image_file(path, out / path.relative_to(src),
                                            use_opencv=(backend == "opencv")))
        except UnreadableImage as err:
            failed.append((str(path), str(err)))
            log.warning("%s: cannot be read (%s); not copied", path, err)
    for path in others:
        _copy_file(path, out / path.relative_to(src))
    report = CleanReport(str(src), str(out), backend, results, len(others), failed)
    atomic_write_bytes(out / REPORT_NAME, report.to_json().encode("utf-8"))
    return report


def render_clean(report: CleanReport, top: int = 20) -> str:
    from loralab.analyze.dataset_check import format_table

    src = Path(report.source)
    ranked = sorted(report.images, key=lambda r: -r.mean_abs_diff)
    rows = [(str(Path(r.source).relative_to(src)), f"{r.size[0]}x{r.size[1]}", r.format, f"{r.mean_abs_diff:.2f}",
             "inf" if math.isinf(r.psnr) else f"{r.psnr:.1f}") for r in ranked[:top]]
    out = [f"cleaned {len(report.images)} images from {report.source} into {report.output} ({report.backend}); "
           f"{report.copied} other files copied", "most changed first:",
           format_table(["image", "size", "format", "mean |diff|", "PSNR dB"], rows, right=(3, 4))]
    if len(ranked) > top:
        out.append(f"... {len(ranked) - top} more in {Path(report.output) / REPORT_NAME}")
    if report.images:
        mean = sum(r.mean_abs_diff for r in report.images) / len(report.images)
        out.append(f"mean |diff| over all images: {mean:.2f} of 255")
    for file, why in report.failed:
        out.append(f"failed: {file}: {why}")
    return "\n".join(out)
