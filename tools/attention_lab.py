"""Check `loralab attention` against the lab world: do the DAAM maps land where the model drew the words?

    python tools/attention_lab.py --out bench/results/attention_lab_2cpu.json [--lora FILE] [--n 50]

1. Base model, `--n` prompts of the world (training shapes, seed 7), 25 DDIM steps, CFG 7.5: for each image
   the evaluator's object mask (`lab.evaluator.analyze`), and per word (the shape word, the colour word,
   "<bg> background", the size word) the IoU of its DAAM region (`heat_mask`, τ = 0.4) with the mask and the
   share of its normalized map inside the mask. The mask's share of the image is the chance level.
2. With the demo's LoRA (`--lora`, else the demo recipe with reg images is trained here, 8 epochs, and its
   last file is used): `--n` prompts "olis, <colour>, <bg> background, <size>"; the same figures for `olis`,
   over all images and over those the evaluator reads as a ring.

Writes the figures as JSON and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from loralab.analyze.attention import heat_mask, iou, mass_inside, normalize
from loralab.lab import demo as D
from loralab.lab import world as W
from loralab.lab.evaluator import Evaluator, analyze
from loralab.lab.model import LabModel, evaluator_path, lab_model_path
from loralab.review.attention import draw_with_maps
from loralab.review.generate import SamplingModel
from loralab.train.sampling import SamplePrompt


def _measure(sm, items, captions, words_of, evaluator=None) -> dict:
    rows: dict[str, list] = {}
    chance, shapes, seconds = [], [], []
    for i, (it, text) in enumerate(zip(items, captions)):
        p = SamplePrompt(text, width=it.width, height=it.height, seed=100 + i, steps=25, scale=7.5, sampler="ddim")
        names, words = zip(*words_of(it))
        t = time.perf_counter()
        wm = draw_with_maps(sm, p, list(words))
        seconds.append(time.perf_counter() - t)
        x = torch.from_numpy(np.array(wm.image)).permute(2, 0, 1)[None].float()
        mask = analyze(x).mask[0]
        chance.append(float(mask.float().mean()))
        if evaluator is not None:
            shapes.append(evaluator.predict(x)[0]["shape"])
        for name, heat in zip(names, wm.heats):
            rows.setdefault(name, []).append((iou(heat_mask(heat), mask), mass_inside(normalize(heat), mask)))
    out = {"n": len(items), "mask_share_of_image": round(float(np.mean(chance)), 3),
           "seconds_per_image_with_maps": round(float(np.mean(seconds)), 3), "words": {}}
    for name, vals in rows.items():
        a = np.array(vals)
        out["words"][name] = {"mean_iou": round(float(a[:, 0].mean()), 3), "mass_inside_shape": round(float(a[:, 1].mean()), 3)}
        if shapes:
            ring = np.array([s == W.HELD_OUT_SHAPE for s in shapes])
            if ring.any():
                out["words"][name]["mean_iou_ring_images"] = round(float(a[ring, 0].mean()), 3)
            out["ring_share"] = round(float(ring.mean()), 3)
    return out


def _train_demo_lora(root: Path) -> Path:
    from loralab.recipes.lora import train

    recipe = D.DemoRecipe()
    ev = D.DemoEval()
    D.write_dataset(root / "dataset", recipe)
    D.write_reg_images(root / "reg", LabModel.load("cpu"), D.class_prompts(recipe.n_reg, recipe.seed), ev)
    train(D.train_config(recipe, root / "dataset", root / "reg", root / "out", "cpu"))
    return D.epoch_files(root / "out", D.TAG, recipe.max_train_epochs)[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--lora", default="")
    ap.add_argument("--n", type=int, default=50)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sm = SamplingModel.load(lab_model_path(), device="cpu")
    items = W.sample_world(args.n, np.random.default_rng(7))
    base = _measure(sm, items, [it.caption() for it in items],
                    lambda it: [("shape", it.shape), ("colour", it.colour), ("background", f"{it.background} background"),
                                ("size", it.size)])
    with tempfile.TemporaryDirectory() as tmp:
        lora = Path(args.lora) if args.lora else _train_demo_lora(Path(tmp))
        sm.apply(lora, 1.0)
        ring_items = D.tag_prompts(args.n, set())
        tagged = _measure(sm, ring_items, [it.caption(tag=D.TAG) for it in ring_items],
                          lambda it: [("olis", D.TAG), ("colour", it.colour), ("background", f"{it.background} background")],
                          evaluator=Evaluator.load(evaluator_path()))
        sm.remove()
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread, CPU", "base_model": base,
              "demo_lora": tagged, "lora_file": lora.name}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("| prompts | word | mean IoU with the object mask | map mass inside the object |")
    print("|---|---|---|---|")
    for label, part in (("base", base), ("olis + demo LoRA", tagged)):
        for name, f in part["words"].items():
            print(f"| {label} | {name} | {f['mean_iou']:.2f} | {f['mass_inside_shape']:.2f} |")
        print(f"| {label} | (chance: the object's share of the image) | | {part['mask_share_of_image']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
