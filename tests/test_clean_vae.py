"""`loralab dataset clean` (AdverseCleaner) and `loralab vae-check` (VAE round trip on the tiny checkpoint)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loralab.analyze.clean import REPORT_NAME, adverse_clean, clean_dataset
from loralab.analyze.dataset_check import BucketSettings
from loralab.analyze.vae_check import vae_check
from loralab.data.buckets import make_bucket_resolutions, select_bucket
from loralab.errors import LoralabError

N = 96


def smooth_content(seed: int = 0) -> np.ndarray:
    """A smooth picture with one sharp-edged rectangle, uint8 (N, N, 3)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(60, 200, (3, 3, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse, "RGB").resize((N, N), Image.Resampling.BICUBIC)).copy()
    img[30:70, 20:60] = (200, 60, 40)
    return img


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture
def protected(tmp_path) -> Path:
    """train/5_art: content.png (smooth), protected.png (the same + a planted +-3 high-frequency pattern),
    photo.jpg (JPEG), alpha.png (transparent top rows), with captions."""
    d = tmp_path / "train" / "5_art"
    d.mkdir(parents=True)
    content = smooth_content()
    pattern = np.random.default_rng(1).choice([-3, 3], size=content.shape)
    Image.fromarray(content).save(d / "content.png")
    Image.fromarray(np.clip(content.astype(int) + pattern, 0, 255).astype(np.uint8)).save(d / "protected.png")
    Image.fromarray(smooth_content(2)).resize((80, 64)).save(d / "photo.jpg", quality=90)
    rgba = Image.fromarray(smooth_content(3)).convert("RGBA")
    alpha = np.full((N, N), 255, np.uint8)
    alpha[:10] = 0
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(d / "alpha.png")
    for name in ("content", "protected", "photo", "alpha"):
        (d / f"{name}.txt").write_text(f"art, {name}", encoding="utf-8")
    (d / "content_0096x0096_sd.npz").write_bytes(b"stale latent cache")
    return tmp_path / "train"


def test_clean_keeps_layout_size_format_and_originals(protected, tmp_path):
    before = hashes(protected)
    out = tmp_path / "clean"
    report = clean_dataset(protected, out, progress=False)
    assert hashes(protected) == before  # originals untouched
    d = out / "5_art"
    for name, fmt, size in (("content.png", "PNG", (N, N)), ("photo.jpg", "JPEG", (80, 64)),
                            ("alpha.png", "PNG", (N, N))):
        with Image.open(d / name) as img:
            assert (img.format, img.size) == (fmt, size)
    for name in ("content", "protected", "photo", "alpha"):
        assert (d / f"{name}.txt").read_bytes() == (protected / "5_art" / f"{name}.txt").read_bytes()
    assert not (d / "content_0096x0096_sd.npz").exists()  # caches of the old pixels are not copied
    with Image.open(d / "alpha.png") as img, Image.open(protected / "5_art" / "alpha.png") as orig:
        assert img.mode == "RGBA"
        assert np.array_equal(np.asarray(img.getchannel("A")), np.asarray(orig.getchannel("A")))
    assert len(report.images) == 4 and report.copied == 4
    assert all(r.mean_abs_diff > 0 and r.psnr > 25 for r in report.images)
    saved = json.loads((out / REPORT_NAME).read_text())
    assert len(saved["images"]) == 4


def test_clean_removes_more_pattern_than_content(protected, tmp_path):
    out = tmp_path / "clean"
    clean_dataset(protected, out, progress=False)
    load = lambda p: np.asarray(Image.open(p).convert("RGB"), dtype=np.float64)  # noqa: E731
    s, x = load(protected / "5_art" / "content.png"), load(protected / "5_art" / "protected.png")
    cs, cx = load(out / "5_art" / "content.png"), load(out / "5_art" / "protected.png")
    pattern_before = np.sum((x - s) ** 2)  # energy of the planted pattern
    pattern_after = np.sum((cx - cs) ** 2)  # what of it survives cleaning
    pattern_removed = 1 - pattern_after / pattern_before
    content_changed = np.sum((cs - s) ** 2) / np.sum((s - s.mean()) ** 2)  # relative change of the picture
    assert pattern_removed > 0.7, pattern_removed
    assert content_changed < 0.02, content_changed
    assert pattern_removed > 20 * content_changed


def test_numpy_filters_match_opencv():
    pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    img = smooth_content()[:20, :24].astype(np.float32) + rng.normal(0, 3, (20, 24, 3)).astype(np.float32)
    a = adverse_clean(img, use_opencv=True, bilateral_passes=8)
    b = adverse_clean(img, use_opencv=False, bilateral_passes=8)
    assert np.abs(a - b).max() < 0.05
    gray = img[..., 0]
    assert adverse_clean(gray, use_opencv=False, bilateral_passes=4).shape == gray.shape
    assert np.abs(adverse_clean(gray, use_opencv=True, bilateral_passes=4)
                  - adverse_clean(gray, use_opencv=False, bilateral_passes=4)).max() < 0.05


def test_clean_refuses_unsafe_output(protected, tmp_path):
    with pytest.raises(LoralabError, match="inside the dataset"):
        clean_dataset(protected, protected / "cleaned", progress=False)
    with pytest.raises(LoralabError, match="inside the dataset"):
        clean_dataset(protected, protected, progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(LoralabError, match="not empty"):
        clean_dataset(protected, busy, progress=False)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cli = subprocess.run([sys.executable, "-m", "loralab.cli", "dataset", "clean", str(protected), "--out",
                          str(protected / "5_art" / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert cli.returncode == 2 and "inside the dataset" in cli.stderr
    assert not (protected / "5_art" / "out").exists()


def test_vae_check_on_the_tiny_checkpoint(tiny_sd1_checkpoint, tmp_path):
    d = tmp_path / "train" / "2_thing"
    d.mkdir(parents=True)
    Image.fromarray(smooth_content()).resize((64, 64)).save(d / "smooth.png")
    noisy = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(d / "noisy.png")
    (d / "broken.png").write_bytes(b"not an image")
    settings = BucketSettings(resolution=(64, 64), min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)
    out = tmp_path / "vae"
    report = vae_check(tmp_path / "train", model=tiny_sd1_checkpoint, out=out, settings=settings, progress=False)
    assert [Path(f).name for f, _ in report.failed] == ["broken.png"]
    assert len(report.results) == 2
    psnrs = [r.psnr for r in report.results]
    assert psnrs == sorted(psnrs) and all(math.isfinite(p) for p in psnrs)
    for r in report.results:
        with Image.open(r.output) as img:
            assert img.size == (3 * r.bucket[0], r.bucket[1]) and img.mode == "RGB"
    assert {Path(r.output).name for r in report.results} == {"smooth_vae.png", "noisy_vae.png"}
    assert (out / "2_thing" / "noisy_vae.png").is_file()
    noisy_result = next(r for r in report.results if Path(r.image).name == "noisy.png")
    buckets = make_bucket_resolutions((64, 64), 32, 128, 32)
    expected = select_bucket((80, 48), resolution=(64, 64), buckets=buckets, bucket_reso_steps=32, no_upscale=False)
    assert noisy_result.bucket == expected.bucket == (64, 64)  # the training bucket, cropped from 80x48
    saved = json.loads((out / "vae_report.json").read_text())
    assert [r["psnr"] for r in saved["results"]] == pytest.approx(psnrs)
    # --vae alone: the checkpoint file read as a VAE file
    again = vae_check(tmp_path / "train", vae=tiny_sd1_checkpoint, out=tmp_path / "vae2", settings=settings,
                      progress=False)
    assert [r.psnr for r in again.results] == pytest.approx(psnrs)


def test_clean_lists_unreadable_images(tmp_path):
    d = tmp_path / "train" / "1_x"
    d.mkdir(parents=True)
    Image.fromarray(smooth_content()).save(d / "ok.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    report = clean_dataset(tmp_path / "train", tmp_path / "out", progress=False)
    assert [Path(f).name for f, _ in report.failed] == ["broken.png"]
    assert (tmp_path / "out" / "1_x" / "ok.png").is_file() and not (tmp_path / "out" / "1_x" / "broken.png").exists()
