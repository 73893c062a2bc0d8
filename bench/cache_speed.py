"""Latent caching throughput: images decoded and resized by a thread pool ahead of the VAE, against one thread.

    python bench/cache_speed.py                          # 64 JPEGs of 768 px into 512 px buckets, no VAE (the data path)
    python bench/cache_speed.py --vae sd15 --batch 8     # on a GPU: an SD 1.5-size random VAE, bf16, vae_batch_size 8

`loralab train` caches latents with `data/latents.py` cache_latents: each bucket's images in batches of
vae_batch_size, the images prepared by `workers` threads (default: one per core, at most 8) a few batches ahead.
Here the same function runs on a generated dataset with workers = 1 and with the default, twice each in turn
after a warm-up, and prints images/s.
`--vae none` encodes nothing (an 8× average pool), so the figure is the image path alone. Not a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import write_result  # noqa: E402


def write_images(folder: Path, n: int, size: int) -> None:
    sub = folder / "1_thing"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    for i in range(n):  # smooth pictures (JPEG-sized like photos), each a little different
        img = Image.fromarray(np.roll(base, i, axis=1)).resize((size, size), Image.BICUBIC)
        img.save(sub / f"{i:04d}.jpg", quality=92)
        (sub / f"{i:04d}.txt").write_text("thing")


def encoder(kind: str, dev: str):
    if kind == "none":
        return lambda x: F.avg_pool2d(x, 8)[:, :1].repeat(1, 4, 1, 1)
    from diffusers import AutoencoderKL

    from train_speed import SD15_VAE

    from loralab.models import tiny

    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    with torch.device(dev):
        vae = AutoencoderKL(**(SD15_VAE if kind == "sd15" else tiny.TINY_VAE)).to(dtype).eval()

    def encode(x):
        return vae.encode(x.to(dev, dtype)).latent_dist.sample() * 0.18215

    return encode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=768, help="pictures of this size, cropped into 512 px buckets")
    ap.add_argument("--vae", choices=("none", "tiny", "sd15"), default="none")
    ap.add_argument("--batch", type=int, default=4, help="vae_batch_size")
    ap.add_argument("--out", default="", help="write the figures as JSON: this .json file, or cache_speed.json in this folder")
    args = ap.parse_args()
    from loralab.data.dataset import FolderDataset, scan_folder_dataset
    from loralab.data.latents import cache_latents

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="loralab_cache_"))
    write_images(work / "data", args.images, args.size)
    dataset = FolderDataset(scan_folder_dataset(work / "data", caption_extension=".txt"), resolution=(512, 512),
                            batch_size=1)
    encode = encoder(args.vae, dev)
    cache_latents(dataset.samples[:8], encode, to_disk=False, flip_aug=False, vae_id="bench", batch_size=args.batch,
                  progress=False)  # warm-up: imports, file cache, first-call costs
    rows = []
    for workers in (1, 0, 1, 0):
        with torch.no_grad():
            encode(torch.zeros(1, 3, 512, 512))  # warm-up (cuDNN, allocator)
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        cache = cache_latents(dataset.samples, encode, to_disk=False, flip_aug=False, vae_id="bench",
                              batch_size=args.batch, progress=False, workers=workers)
        if dev == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rows.append({"workers": workers or "default", "images": len(cache), "seconds": dt, "img_s": len(cache) / dt})
        print(f"workers={workers or 'default'}: {len(cache)} images in {dt:.2f} s, {len(cache) / dt:.1f} img/s", flush=True)
    device = torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({torch.get_num_threads()} torch threads)"
    result = {"device": device, "torch": torch.__version__, "vae": args.vae, "vae_batch_size": args.batch,
              "size": args.size, "rows": rows}
    if args.out:
        write_result(args.out, "cache_speed.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
