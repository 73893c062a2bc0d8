"""Masked loss on the lab model (issue 11): does masking the background out of the loss keep the base model's
background prior better than plain training, at the same concept rate?

    OMP_NUM_THREADS=1 python tools/masked_loss_experiment.py --out /tmp/masked_loss   # ~6 min on 2 CPU cores
    python tools/masked_loss_experiment.py --one-background gray                    # every image on gray
    python tools/masked_loss_experiment.py --quick                                  # a 2-epoch smoke run

What it does:
1. the demo's dataset (`loralab demo`: 15 rings tagged `olis`, kohya layout; with `--one-background`, the
   same but every image on one background colour, as character datasets often are), and a mask per image
   made from the lab world itself: the ring's silhouette (the ring with its hole filled, so the hole stays part of the
   concept) drawn with the image's own seed, so it lies exactly on the ring; the background is 0;
2. two trainings with the demo's settings and no reg images, through a dataset_config that differs only in
   `conditioning_data_dir` (and `masked_loss = true`): `unmasked` and `masked`;
3. every epoch scored by the lab evaluator as the demo scores it: concept rate (tag prompts drawn as a
   ring), tag background (tag prompts, all on backgrounds the dataset does not pair with their colour, whose
   sample has the prompt's background), and retention on held-out base prompts without the tag (accuracy with the LoRA over the base
   model's, per attribute: shape, colour, background; `min` = the smallest);
4. a markdown table per epoch, and the comparison at matched concept rates, on stdout and in
   `<out>/results.md` / `results.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from loralab.lab import demo as D
from loralab.lab import world as W
from loralab.lab.evaluator import Evaluator
from loralab.lab.model import LabModel, evaluator_path

log = logging.getLogger("masked_loss_experiment")


def demo_items(recipe: D.DemoRecipe) -> list[W.WorldItem]:
    """The items `world.write_kohya_dataset` draws for the demo's dataset (its draws replayed; the images
    are compared with the written files, so a change of that function fails here, not silently)."""
    rng = np.random.default_rng(recipe.seed)
    pairs = [(c, b) for c in W.COLOURS for b in W.BACKGROUNDS if c != b]
    order = list(rng.permutation(len(pairs)))
    while len(order) < recipe.n_images:
        order += list(rng.permutation(len(pairs)))
    sizes, names = W.DEFAULT_IMAGE_SIZES, list(W.SIZES)
    items = []
    for i in range(recipe.n_images):
        c, b = pairs[order[i]]
        w, h = sizes[i % len(sizes)]
        items.append(W.WorldItem(W.HELD_OUT_SHAPE, c, b, names[i % 2], w, h, int(rng.integers(0, 2**63 - 1))))
    return items


def one_background_items(recipe: D.DemoRecipe, background: str) -> list[W.WorldItem]:
    """The demo's dataset drawn on one background: colours cycle over the others, sizes and image sizes
    alternate as in `world.write_kohya_dataset`, seeds from `recipe.seed`."""
    rng = np.random.default_rng(recipe.seed)
    colours = [c for c in W.COLOURS if c != background]
    names = list(W.SIZES)
    return [W.WorldItem(W.HELD_OUT_SHAPE, colours[i % len(colours)], background, names[i % 2],
                        *W.DEFAULT_IMAGE_SIZES[i % len(W.DEFAULT_IMAGE_SIZES)], int(rng.integers(0, 2**63 - 1)))
            for i in range(recipe.n_images)]


def silhouette(item: W.WorldItem) -> np.ndarray:
    """The shape's filled outline (a ring: its disc) as uint8 (H, W), 255 inside, antialiased at the edge:
    the same draws as the image (`world.render` with the item's seed), white on black, scaled to 0..255."""
    shape = "circle" if item.shape == W.HELD_OUT_SHAPE else item.shape
    r = W.render(shape, "white", "black", item.size, item.width, item.height,
                 np.random.default_rng(item.seed))[..., 0].astype(np.float64)
    return np.clip(np.rint((r - r.min()) / max(r.max() - r.min(), 1.0) * 255), 0, 255).astype(np.uint8)


def write_data(root: Path, recipe: D.DemoRecipe, background: str | None, caption_background: bool = True
               ) -> tuple[Path, Path]:
    """The images and captions (kohya layout), and their masks in `root/masks` (same file names). Without
    `caption_background` (one background only), captions leave the background out: "olis, red, small"."""
    if background is None:
        folder, items = D.write_dataset(root / "dataset", recipe), demo_items(recipe)
    else:
        folder, items = root / "dataset" / f"{recipe.repeats}_{D.TAG}", one_background_items(recipe, background)
        folder.mkdir(parents=True, exist_ok=True)
        for i, item in enumerate(items):
            Image.fromarray(item.render()).save(folder / f"{i:04d}.png")
            text = item.caption(tag=D.TAG) if caption_background else f"{D.TAG}, {item.colour}, {item.size}"
            (folder / f"{i:04d}.txt").write_text(text + "\n", encoding="utf-8")
    masks = root / "masks"
    masks.mkdir(parents=True, exist_ok=True)
    for i, item in enumerate(items):
        written = np.asarray(Image.open(folder / f"{i:04d}.png").convert("RGB"))
        if not np.array_equal(written, item.render()):
            raise SystemExit(f"{folder / f'{i:04d}.png'} is not the replayed item {item}: update demo_items")
        Image.fromarray(silhouette(item), "L").save(masks / f"{i:04d}.png")
    return folder, masks


def dataset_toml(path: Path, folder: Path, repeats: int, masks: Path | None) -> Path:
    cond = f'  conditioning_data_dir = "{masks}"\n' if masks else ""
    path.write_text(f'[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{folder}"\n  num_repeats = {repeats}\n'
                    f'{cond}')
    return path


def row(s: D.EpochScore, tag_preds: list[dict], tag_items: list[W.WorldItem]) -> dict:
    tag_bg = sum(p.get("background") == it.background for p, it in zip(tag_preds, tag_items)) / len(tag_items)
    return {"epoch": s.epoch, "concept": s.concept, "tag_background": tag_bg, "background": s.retention["background"],
            "shape": s.retention["shape"], "colour": s.retention["colour"], "min": s.retention["min"],
            "leak": s.base_as_concept, "loss": s.loss}


def matched(a: list[dict], b: list[dict]) -> list[tuple[dict, dict]]:
    """For each epoch of `b` (epoch >= 1), the epoch of `a` with the nearest concept rate (ties: earlier)."""
    out = []
    for rb in b[1:]:
        ra = min(a[1:], key=lambda r: (abs(r["concept"] - rb["concept"]), r["epoch"]))
        out.append((ra, rb))
    return out


def report(results: dict, background: str | None, recipe: D.DemoRecipe, ev: D.DemoEval, seconds: dict) -> str:
    """The markdown: the table per epoch, the epochs matched by concept rate, the means and the settings."""
    u, m = results["unmasked"], results["masked"]

    def pct(x: float) -> str:
        return f"{100 * x:.0f}"

    cols = ("concept", "tag_background", "background", "shape", "colour", "min")
    short = ("concept", "tag_background", "background", "min")
    head = " | ".join(f"{run}: {c}" if c == "concept" else c for run in ("unmasked", "masked") for c in cols)
    lines = [f"| epoch | {head} |", "|---" * (1 + 2 * len(cols)) + "|"]
    for ru, rm in zip(u, m):
        lines.append(f"| {ru['epoch']} | " + " | ".join(pct(r[c]) for r in (ru, rm) for c in cols) + " |")
    lines += ["", "At matched concept rates (each masked epoch against the unmasked epoch nearest in concept rate):",
              "", "| masked epoch | " + " | ".join(short) + " | unmasked epoch | " + " | ".join(short) + " |",
              "|---" * (2 + 2 * len(short)) + "|"]
    for ru, rm in matched(u, m):
        lines.append(f"| {rm['epoch']} | " + " | ".join(pct(rm[c]) for c in short) + f" | {ru['epoch']} | "
                     + " | ".join(pct(ru[c]) for c in short) + " |")
    mean = {(k, n): pct(float(np.mean([r[k] for r in results[n][1:]])))
            for k in ("background", "tag_background") for n in ("unmasked", "masked")}
    demo_bgs = "the demo's (all six, spread evenly)"
    lines += ["", f"Means over epochs 1-{len(u) - 1}: background retention unmasked {mean['background', 'unmasked']} "
              f"%, masked {mean['background', 'masked']} %; tag background unmasked "
              f"{mean['tag_background', 'unmasked']} %, masked {mean['tag_background', 'masked']} %.",
              f"Dataset backgrounds: {background or demo_bgs}.",
              f"Settings: the demo's ({recipe.n_images} images x {recipe.repeats} repeats, {recipe.max_train_epochs} "
              f"epochs, batch {recipe.train_batch_size}, dim {recipe.network_dim}, unet_lr {recipe.unet_lr}, "
              f"min_snr_gamma {recipe.min_snr_gamma}, seed {recipe.seed}), no reg images; {ev.n_tag_prompts} tag "
              f"prompts, {ev.n_base_prompts} base prompts, DDIM {ev.ddim_steps} steps, CFG {ev.cfg}.",
              "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + "."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("masked_loss_experiment"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 epochs, 8 + 8 prompts: checks that it runs")
    ap.add_argument("--one-background", default=None, choices=W.BACKGROUNDS,
                    help="every dataset image on this background (default: the demo's dataset)")
    ap.add_argument("--uncaptioned-background", action="store_true",
                    help="with --one-background: captions without the background (\"olis, red, small\")")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    recipe = replace(D.QUICK_RECIPE if args.quick else D.DemoRecipe(), seed=args.seed)
    ev = D.QUICK_EVAL if args.quick else D.DemoEval()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    folder, masks = write_data(out, recipe, args.one_background, not args.uncaptioned_background)
    model = LabModel.load(args.device)
    evaluator = Evaluator.load(evaluator_path(), device=args.device)
    pairs = D.dataset_pairs(folder) or {(c, args.one_background) for c in W.COLOURS}  # uncaptioned: from the data
    tag_items = D.tag_prompts(ev.n_tag_prompts, pairs)
    base_items = D.base_prompts(ev.n_base_prompts)
    base_result = D.score_base_model(model, evaluator, tag_items, base_items, ev)
    seconds["data and base scores"] = time.perf_counter() - t
    results = {}
    for name, mask_dir in (("unmasked", None), ("masked", masks)):
        toml = dataset_toml(out / f"{name}.toml", folder, recipe.repeats, mask_dir)
        extra = {"dataset_config": str(toml), "masked_loss": mask_dir is not None}
        run = D.train_and_score(name, replace(recipe, extra=extra), ev, folder.parent, None, out / f"train_{name}",
                                args.device, model, evaluator, tag_items, base_items, base_result)
        results[name] = [row(s, run.preds[s.epoch][0], tag_items) for s in run.scores]
        seconds[f"train {name}"] = run.train_seconds
        seconds[f"score {name}"] = run.eval_seconds
    what = args.one_background and args.one_background + (", not in the captions" if args.uncaptioned_background
                                                          else ", in the captions")
    text = report(results, what, recipe, ev, seconds)
    (out / "results.md").write_text(text + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"recipe": asdict(recipe), "eval": asdict(ev), "results": results,
                                                  "background": args.one_background, "seconds": seconds}, indent=1),
                                      encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
