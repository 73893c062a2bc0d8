"""The latent cache: memory and kohya-named disk files, reuse and rebuild rules, flipped latents."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from loralab.data.dataset import FolderDataset, scan_folder_dataset
from loralab.data.latents import cache_latents, latents_npz_path
from loralab.errors import LoralabError


class CountingEncoder:
    """Stand-in VAE: 8x average pooling plus a 4th channel; counts the images it encodes."""

    def __init__(self, nan=False):
        self.images = 0
        self.nan = nan

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        pooled = F.avg_pool2d(x, 8)
        out = torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1) * 0.18215
        return out * float("nan") if self.nan else out


def save_image(path, size, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "train"
    for i in range(3):
        save_image(root / "2_x" / f"i{i}.png", (64, 64), i)
    save_image(root / "2_x" / "wide.png", (96, 64), 9)

    def make():
        subsets = scan_folder_dataset(root)
        return FolderDataset(subsets, resolution=(64, 64), batch_size=2, enable_bucket=True, min_bucket_reso=32,
                             max_bucket_reso=128, bucket_reso_steps=16)
    return root, make


def run(ds, enc, **kw):
    args = dict(to_disk=True, flip_aug=True, vae_id="vae-a", batch_size=2, progress=False)
    args.update(kw)
    return cache_latents(ds.samples, enc, **args)


def test_memory_cache_and_flipped(dataset):
    _, make = dataset
    ds = make()
    enc = CountingEncoder()
    cache = run(ds, enc, to_disk=False)
    assert enc.images == 2 * 4 and cache.num_encoded == 4 and len(cache) == 4  # each image + its mirror
    for s in ds.samples:
        lat = cache.get(s)
        w, h = s.choice.bucket
        assert tuple(lat.shape) == (4, h // 8, w // 8) and lat.dtype == torch.float32
        assert torch.allclose(cache.get(s, flipped=True), lat.flip(2), atol=1e-6)
    assert not list(dataset[0].rglob("*.npz"))


def test_disk_cache_kohya_name_keys_and_reuse(dataset):
    root, make = dataset
    ds = make()
    first = run(ds, CountingEncoder())
    npz = root / "2_x" / "wide_0096x0064_sd.npz"
    assert npz == latents_npz_path(root / "2_x" / "wide.png", (96, 64))
    with np.load(npz) as f:
        assert {"latents", "original_size", "crop_ltrb", "latents_flipped"} <= set(f.files)
        assert f["original_size"].tolist() == [96, 64]
        assert f["latents"].shape == (4, 6, 10)  # bucket 80x48
    assert not list(root.rglob("*.tmp"))

    enc = CountingEncoder()
    second = run(make(), enc)
    assert enc.images == 0 and second.num_loaded == 4 and second.num_encoded == 0
    for a, b in zip(ds.samples, make().samples):
        assert torch.equal(first.get(a), second.get(b))
        assert torch.equal(first.get(a, flipped=True), second.get(b, flipped=True))


def test_rebuilt_when_image_changes(dataset):
    root, make = dataset
    run(make(), CountingEncoder())
    save_image(root / "2_x" / "i1.png", (64, 64), 123)  # new pixels, same size
    enc = CountingEncoder()
    cache = run(make(), enc)
    assert cache.num_encoded == 1 and cache.num_loaded == 3

    os.utime(root / "2_x" / "i2.png", ns=(1, 1))  # touched, same bytes: reused through the sha256
    enc = CountingEncoder()
    run(make(), enc)
    assert enc.images == 0


def test_rebuilt_when_vae_changes_or_flip_needed(dataset):
    _, make = dataset
    run(make(), CountingEncoder(), flip_aug=False)
    enc = CountingEncoder()
    run(make(), enc, flip_aug=True)  # files lack latents_flipped
    assert enc.images == 2 * 4
    enc = CountingEncoder()
    cache = run(make(), enc, vae_id="vae-b")
    assert cache.num_encoded == 4 and cache.num_loaded == 0


def test_rebuilt_when_bucket_changes(dataset):
    _, make = dataset
    run(make(), CountingEncoder())
    ds = make()
    other = FolderDataset(ds.subsets, resolution=(64, 64), batch_size=2, enable_bucket=False)
    enc = CountingEncoder()
    cache = cache_latents(other.samples, enc, to_disk=True, flip_aug=True, vae_id="vae-a", progress=False)
    assert cache.num_encoded == 1 and cache.num_loaded == 3  # only wide.png changes bucket (80x48 -> 64x64)


def test_nan_latents_name_the_image(dataset):
    _, make = dataset
    with pytest.raises(LoralabError, match=r"i0\.png.*NaN latents.*no_half_vae"):
        run(make(), CountingEncoder(nan=True), to_disk=False)
