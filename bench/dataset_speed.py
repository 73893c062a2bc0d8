"""Dataset-diagnostics benchmark: `loralab dataset check` and `loralab dataset tags` on a generated dataset.

    python bench/dataset_speed.py                 # 1,000 images (64-512 px) in 4 concept folders
    python bench/dataset_speed.py --images 200    # smaller

It writes a kohya-layout dataset to a temp folder (PNG and JPEG pictures of 64 to 512 px, WD14-style captions
of 10 to 40 tags, a few planted problems), then times, in this process:
  baseline   `scan_folder_dataset` + `FolderDataset`: the header-only scan `loralab train` does
  check      `check_dataset`: every image decoded and hashed, captions tokenized, buckets and batches
  tags       `analyze_tags`: kohya tag frequency, pruning candidates, singletons
and the same two commands end to end through the CLI (`python -m loralab.cli ...`, imports included).
Target (issue 4): check and tags under 30 s each for 1,000 images on 2 CPU cores. Not a test.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

VOCAB = [
    "1girl", "solo", "long hair", "short hair", "blue hair", "red eyes", "smile", "open mouth", "looking at viewer",
    "simple background", "white background", "outdoors", "indoors", "sky", "cloud", "tree", "dress", "shirt",
    "skirt", "jacket", "hat", "gloves", "boots", "holding", "sitting", "standing", "upper body", "full body",
    "cowboy shot", "from side", "from behind", "blush", "closed eyes", "hair ornament", "ribbon", "bow", "navel",
    "midriff", "tattoo", "braid", "twin braids", "bangs", "earrings", "necklace", "belt", "shorts", "pants",
    "night", "day", "city", "water", "flower", "weapon", "gun", "sword", "scarf", "cape", "glasses",
]
CONCEPTS = [("10_jinxdef", "jinxdef"), ("5_jinxarcane", "jinxarcane"), ("3_vi", "vi"), ("1_style", "artstyle")]


def make_dataset(root: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    train = root / "train"
    for k in range(n):
        folder, tag = CONCEPTS[k % len(CONCEPTS)]
        d = train / folder
        d.mkdir(parents=True, exist_ok=True)
        w, h = (int(x) for x in rng.integers(64, 513, 2))
        coarse = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
        img = Image.fromarray(coarse, "RGB").resize((w, h), Image.Resampling.BICUBIC)
        name = f"{k:05d}"
        if k % 3:
            img.save(d / f"{name}.png")
        else:
            img.save(d / f"{name}.jpg", quality=90)
        tags = list(rng.choice(VOCAB, size=int(rng.integers(10, 41)), replace=False))
        if k % 97 == 0:
            tags.insert(2, tag)  # activation tag not first
        else:
            tags.insert(0, tag)
        (d / f"{name}.txt").write_text(", ".join(tags), encoding="utf-8")
    return train


def timed(fn):
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--keep", help="write the dataset here and keep it (default: a temp folder)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from loralab.analyze.dataset_check import BucketSettings, check_dataset
    from loralab.analyze.tags import analyze_tags
    from loralab.data.dataset import FolderDataset, scan_folder_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        t_gen, train = timed(lambda: make_dataset(root, args.images))
        settings = BucketSettings(batch_size=args.batch_size)

        def baseline():
            subsets = scan_folder_dataset(train, caption_extension=".txt")
            return FolderDataset(subsets, resolution=(512, 512), batch_size=args.batch_size, enable_bucket=True)

        t_base, _ = timed(baseline)
        t_check, report = timed(lambda: check_dataset(train, settings=settings, progress=False))
        t_tags, tags = timed(lambda: analyze_tags(train))
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        cli = [sys.executable, "-m", "loralab.cli", "dataset"]
        t_cli_check, proc = timed(lambda: subprocess.run(cli + ["check", str(train), "--json", "--batch-size",
                                                                str(args.batch_size)], capture_output=True, env=env))
        t_cli_tags, proc2 = timed(lambda: subprocess.run(cli + ["tags", str(train), "--json"], capture_output=True,
                                                         env=env))
        if proc.returncode not in (0, 1) or proc2.returncode != 0:
            print(proc.stderr.decode()[-2000:], proc2.stderr.decode()[-2000:])
            return 1

    n = args.images
    rows = [
        ("generate dataset", t_gen, ""),
        ("baseline: train's scan + buckets", t_base, "header-only, what loralab train does"),
        ("dataset check (library)", t_check, f"{len(report.problems)} problems, {report.steps_per_epoch} steps/epoch"),
        ("dataset tags (library)", t_tags, f"{len(tags.overall)} distinct tags"),
        ("dataset check (CLI, --json)", t_cli_check, f"exit {proc.returncode}"),
        ("dataset tags (CLI, --json)", t_cli_tags, f"exit {proc2.returncode}"),
    ]
    print(f"{n} images, {os.cpu_count()} CPUs, batch size {args.batch_size}")
    print(f"{'stage':<34} {'seconds':>8} {'images/s':>9}  note")
    for name, sec, note in rows:
        print(f"{name:<34} {sec:>8.2f} {n / sec:>9.0f}  {note}")
    worst = max(t_cli_check, t_cli_tags)
    print(f"target: under 30 s each: {'met' if worst < 30 else 'NOT met'} (slowest {worst:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
