"""`loralab vae-check`: what the VAE loses of each training image.

A LoRA learns in latent space: whatever the VAE cannot encode and decode (fine lines, small text, small
faces, grain, filter patterns) the LoRA cannot learn either. This round-trips every image through the
model's VAE exactly as training sees it (its bucket: `bucket_candidates`, `select_bucket`; resize and crop
as `prepare_image` does; fp32), and writes for each image a side-by-side PNG: original | reconstruction |
difference heatmap (|original - reconstruction|, amplified x4, black = equal). PSNR per image is reported,
worst first: below about 25 dB the VAE visibly loses detail; crop closer, upscale, or try another VAE.

The round trip: z = encode(x).latent_dist.mode(); x' = decode(z).clamp(-1, 1). The latent scaling factor
cancels out, so it is not applied.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from loralab.analyze.check_report import BucketSettings, format_table
from loralab.analyze.scan import scan_dataset
from loralab.data.dataset import list_images, repeats_from_folder_name
from loralab.errors import LoralabError
from loralab.io import atomic_write, atomic_write_bytes

log = logging.getLogger(__name__)

HEATMAP_GAIN = 4.0  # an error of 1/4 of the value range shows at full heat
REPORT_NAME = "vae_report.json"
LOW_PSNR = 25.0


@dataclass
class VaeResult:
    image: str
    output: str  # the side-by-side PNG
    size: tuple[int, int]
    bucket: tuple[int, int]
    psnr: float  # dB on 0..1 values, at the bucket size
    mean_abs_diff: float  # 0..1


@dataclass
class VaeReport:
    source: str
    vae: str
    output: str
    device: str
    results: list[VaeResult]  # worst (lowest PSNR) first
    failed: list[tuple[str, str]]

    def to_json(self) -> str:
        d = asdict(self)
        for r in d["results"]:
            r["psnr"] = None if math.isinf(r["psnr"]) else r["psnr"]
        return json.dumps(d, indent=2, ensure_ascii=False)


def load_check_vae(model: str | Path | None, vae: str | Path | None):
    """The VAE to check, fp32: `vae` (a VAE file or folder) when given, else the model's own VAE (read from
    the checkpoint or the diffusers folder alone; the UNet and text encoders are not built)."""
    import torch

    from loralab.models.loader import load_vae

    source = vae or model
    if source is None:
        raise LoralabError("vae-check: give --model CKPT (its VAE is used) or --vae FILE")
    try:
        # the family only sets the latent scaling factor, which a round trip does not use
        return load_vae(source, "sd1", torch.float32), str(source)
    except LoralabError as err:
        if vae is None:
            raise LoralabError(f"vae-check: cannot read a VAE from {model} ({err}); pass --vae FILE") from err
        raise


def _images(root: Path, caption_extension: str) -> list[tuple[Path, tuple[int, int] | None, str | None]]:
    """(image, size, error) for the kohya layout (`<repeats>_<name>/` folders) or a plain image folder."""
    from loralab.data.images import read_image_size

    plain = list_images(root) if root.is_dir() else []
    has_concepts = root.is_dir() and any(p.is_dir() and repeats_from_folder_name(p.name) for p in root.iterdir())
    if plain and not has_concepts:
        out = []
        for p in plain:
            try:
                out.append((p, read_image_size(p), None))
            except LoralabError as err:
                out.append((p, None, str(err).removeprefix(f"{p}: ")))
        return out
    ds = scan_dataset(root, caption_extension=caption_extension)
    return [(im.path, im.size, im.header_error) for im in ds.images]


def heatmap(err: np.ndarray, gain: float = HEATMAP_GAIN) -> np.ndarray:
    """(H, W) errors in 0..1 -> (H, W, 3) uint8 'inferno' colours (black = no error)."""
    from matplotlib import colormaps

    rgba = colormaps["inferno"](np.clip(err * gain, 0.0, 1.0))
    return (rgba[..., :3] * 255 + 0.5).astype(np.uint8)


def side_by_side(original: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """original | reconstruction | heatmap of the mean absolute channel error, (H, 3W, 3) uint8 from 0..1 floats."""
    err = np.abs(original - reconstruction).mean(axis=2)
    return np.concatenate([_to_uint8(original), _to_uint8(reconstruction), heatmap(err)], axis=1)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def _save_png(arr: np.ndarray, path: Path) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(arr, "RGB").save(tmp, format="PNG"))


def default_output(data_dir: Path) -> Path:
    r = data_dir.resolve()
    return r.parent / f"{r.name}_vae_check"


def vae_check(
    data_dir: str | Path,
    *,
    model: str | Path | None = None,
    vae: str | Path | None = None,
    out: str | Path | None = None,
    settings: BucketSettings | None = None,
    caption_extension: str = ".txt",
    device: str = "auto",
    progress: bool = True,
    images: list[tuple[Path, tuple[int, int] | None, str | None]] | None = None,
) -> VaeReport:
    """Round-trip every image of `data_dir` through the VAE at its bucket size; write the side-by-side PNGs
    (`out/<same relative path>_vae.png`) and `out/vae_report.json`; return the results, worst PSNR first.
    `images`: (path, size, error) already listed (a dataset_config's folders) instead of scanning `data_dir`."""
    import torch

    from loralab.data.images import prepare_image

    data_dir = Path(data_dir)
    settings = settings or BucketSettings()
    out = Path(out) if out else default_output(data_dir)
    if out.resolve() == data_dir.resolve() or out.resolve().is_relative_to(data_dir.resolve()):
        raise LoralabError(f"vae-check: --out {out} is inside the dataset {data_dir}; choose a folder outside it")
    images = _images(data_dir, caption_extension) if images is None else images
    if not images:
        raise LoralabError(f"vae-check: no images in {data_dir}")
    candidates = settings.candidates()
    vae_model, vae_source = load_check_vae(model, vae)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    vae_model = vae_model.to(device).eval()  # loaded in fp32
    results: list[VaeResult] = []
    failed: list[tuple[str, str]] = []
    for path, size, error in tqdm(images, desc="vae round trip", unit="img", disable=None if progress else True):
        if size is None:
            failed.append((str(path), error or "unreadable"))
            continue
        try:
            choice = candidates.choose(size)
            x = prepare_image(path, choice)
        except LoralabError as err:
            failed.append((str(path), str(err)))
            continue
        with torch.no_grad():
            z = vae_model.encode(x[None].to(device)).latent_dist.mode()
            rec = vae_model.decode(z).sample.clamp(-1, 1)[0].float().cpu()
        if not torch.isfinite(rec).all():
            failed.append((str(path), "the VAE returned NaN/inf for this image"))
            continue
        orig01 = ((x + 1) / 2).permute(1, 2, 0).numpy()
        rec01 = ((rec + 1) / 2).permute(1, 2, 0).numpy()
        mse = float(np.mean((orig01.astype(np.float64) - rec01) ** 2))
        value = math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
        rel = path.relative_to(data_dir) if path.is_relative_to(data_dir) else Path(path.name)
        target = out / rel.parent / f"{rel.stem}_vae.png"
        _save_png(side_by_side(orig01, rec01), target)
        results.append(VaeResult(str(path), str(target), size, choice.bucket, value,
                                 float(np.abs(orig01 - rec01).mean())))
    results.sort(key=lambda r: r.psnr)
    report = VaeReport(str(data_dir), vae_source, str(out), device, results, failed)
    atomic_write_bytes(out / REPORT_NAME, report.to_json().encode("utf-8"))
    return report


def render_vae(report: VaeReport, top: int = 20) -> str:
    src = Path(report.source)
    rows = []
    for r in report.results[:top]:
        p = Path(r.image)
        rows.append((str(p.relative_to(src)) if p.is_relative_to(src) else p.name, f"{r.bucket[0]}x{r.bucket[1]}",
                     "inf" if math.isinf(r.psnr) else f"{r.psnr:.1f}", f"{r.mean_abs_diff * 255:.1f}"))
    out = [f"VAE {report.vae} ({report.device}), {len(report.results)} images, worst first:",
           format_table(["image", "bucket", "PSNR dB", "mean |diff| /255"], rows, right=(2, 3))]
    if len(report.results) > top:
        out.append(f"... {len(report.results) - top} more in {Path(report.output) / REPORT_NAME}")
    low = [r for r in report.results if r.psnr < LOW_PSNR]
    if low:
        out.append(f"{len(low)} images below {LOW_PSNR:.0f} dB: the VAE loses detail there that the LoRA cannot learn "
                   f"(fine lines, text, small faces, grain); crop closer, upscale, or try another VAE (--vae)")
    out.append(f"side-by-side PNGs (original | reconstruction | difference x{HEATMAP_GAIN:.0f}) in {report.output}")
    for file, why in report.failed:
        out.append(f"failed: {file}: {why}")
    return "\n".join(out)


def vae_check_dataset_config(path: str | Path, *, out: str | Path | None = None, defaults: dict | None = None,
                             **kw) -> list[VaeReport]:
    """`vae-check --dataset-config`: each [[datasets]] at its own resolution and buckets, into
    `out/datasets_<n>/` (`vae_check` for the rest)."""
    from loralab.analyze.scan import scan_subsets
    from loralab.data.dataset_config import dataset_config_subsets

    path = Path(path)
    out = Path(out) if out else path.parent / f"{path.stem}_vae_check"
    reports = []
    for spec, folders in dataset_config_subsets(path, defaults):
        if not folders:
            continue
        ds = scan_subsets(folders, path.parent)
        b = spec.bucket_options()
        settings = BucketSettings(resolution=tuple(b["resolution"]), batch_size=b["batch_size"],
                                  enable_bucket=b["enable_bucket"], min_bucket_reso=b["min_bucket_reso"],
                                  max_bucket_reso=b["max_bucket_reso"], bucket_reso_steps=b["bucket_reso_steps"],
                                  bucket_no_upscale=b["bucket_no_upscale"])
        images = [(im.path, im.size, im.header_error) for im in ds.images]
        root = Path(os.path.commonpath([str(s.dir.resolve()) for s, _ in folders]))  # the folders' common parent
        reports.append(vae_check(root, out=out / f"datasets_{spec.index}", settings=settings, images=images, **kw))
    return reports

