"""The lab's bleeding experiment for `loralab bleed`: two activation tags that share a token piece, one concept
over-represented, then the repeats `loralab tokens --dataset` advises.

    python tools/bleed_lab.py --out bench/results/bleed_lab_2cpu.json [--seeds 0,1] [--probe-seeds 32]

The lab analogue of `jinxdef` / `jinxarcane`: `vexdef` (20 ring images, the shape the lab model never saw,
10 repeats) and `vexarcane` (4 heart images, 2 repeats): CLIP splits them `vex` + `def</w>` and `vex` + `ar`
+ `cane</w>`, so they share the piece `vex`, and vexdef has 96 % of an epoch. The balanced run uses the
repeats `analyze.tokens.balance_repeats` gives (vexdef 1, vexarcane 5) and as many optimizer steps as the
imbalanced one (312: 31 epochs of 10 steps against 6 of 52). Everything else is the demo's recipe without
reg images (dim 8, lr 1e-3, batch 4, min-SNR 5, UNet only).

Each LoRA goes through `review.bleed.bleed` with the lab evaluator as its judge (`--probe-seeds` seeds per
probe, four colour/background contexts), and, as an independent check, the evaluator reads 40 full prompts
`vexarcane, <colour>, <bg> background, <size>` (the demo's tag prompts): the share drawn as a ring is
vexdef's concept bleeding into vexarcane. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from loralab.analyze.tokens import balance_repeats
from loralab.lab import demo as D
from loralab.lab import world as W
from loralab.lab.judge import shape_reader
from loralab.lab.model import lab_model_path
from loralab.review.bleed import BleedOptions, bleed

A, B = "vexdef", "vexarcane"
N_A, N_B = 20, 4
REPEATS = (10, 2)
CONTEXTS = ["red, blue background, large", "yellow, black background, small", "white, green background, large",
            "purple, gray background, small"]


def train_lora(root: Path, repeats: tuple[int, int], epochs: int, seed: int) -> Path:
    from loralab.recipes.lora import train

    W.write_kohya_dataset(root / "data", shape="ring", tag=A, n=N_A, repeats=repeats[0], seed=seed)
    W.write_kohya_dataset(root / "data", shape="heart", tag=B, n=N_B, repeats=repeats[1], seed=seed + 100)
    recipe = D.DemoRecipe(max_train_epochs=epochs, seed=seed,
                          extra={"output_name": "bleed", "save_every_n_epochs": epochs})
    train(D.train_config(recipe, root / "data", None, root / "out", "cpu"))
    return root / "out" / "bleed.safetensors"


def full_prompt_bleed(lora: Path, read) -> float:
    """Share of 40 `vexarcane, <colour>, <bg> background, <size>` images the evaluator reads as a ring."""
    from loralab.review.generate import SamplingModel
    from loralab.train.sampling import SamplePrompt

    sm = SamplingModel.load(lab_model_path(), device="cpu")
    items = D.tag_prompts(40, set())
    sm.apply(lora, 1.0)
    try:
        images = sm.draw([SamplePrompt(it.caption(tag=B), width=it.width, height=it.height, seed=2000 + i, steps=20,
                                       scale=7.5, sampler="ddim") for i, it in enumerate(items)], seed=0)
    finally:
        sm.remove()
    return sum(s == "ring" for s in read(images)) / len(images)


def one(root: Path, name: str, repeats, epochs: int, seed: int, probe_seeds: int, read) -> dict:
    t = time.perf_counter()
    lora = train_lora(root / name, repeats, epochs, seed)
    train_s = time.perf_counter() - t
    r = bleed(BleedOptions(model=str(lab_model_path()), lora=lora, dataset=str(root / name / "data"),
                           class_word="shape", contexts=CONTEXTS, seeds=probe_seeds, sampler="ddim",
                           out=str(root / name / "bleed"), device="cpu"), judge=read)
    (piece,) = r["shared_pieces"]
    into = {(x["from"], x["into"]): x for x in r["tag_into_tag"]}
    return {"repeats": list(repeats), "epochs": epochs, "train_seconds": round(train_s, 1),
            "concepts": r["concepts"], "piece": piece["piece"], "piece_bleeds": piece["bleeds"],
            "dominant": piece["dominant"], "dominant_because": piece["dominant_because"],
            "piece_shows": {t: v["with"] for t, v in piece["judged"].items()}, "carry": piece["carry"],
            "vexdef_into_vexarcane": into.get((A, B), {}).get("with"),
            "full_prompts_vexarcane_as_ring": full_prompt_bleed(lora, read), "fixes": r["fixes"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="0,1", help="training seeds")
    ap.add_argument("--probe-seeds", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    read = shape_reader("cpu")
    balanced = tuple(balance_repeats([N_A, N_B], list(REPEATS)))
    steps_per_epoch = lambda reps: -(-(N_A * reps[0] + N_B * reps[1]) // 4)  # noqa: E731  (batch 4)
    epochs_imb = 6
    epochs_bal = round(epochs_imb * steps_per_epoch(REPEATS) / steps_per_epoch(balanced))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            for name, reps, epochs in (("imbalanced", REPEATS, epochs_imb), ("balanced", balanced, epochs_bal)):
                res = one(Path(tmp) / f"s{seed}", name, reps, epochs, seed, args.probe_seeds, read)
                runs.append({"seed": seed, "run": name, **res})
                print(json.dumps(runs[-1]), flush=True)
    out = {"machine": f"{platform.machine()}, 1 torch thread, CPU", "balanced_repeats": list(balanced), "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("| seed | repeats vexdef/vexarcane | piece `vex` shows vexdef's / vexarcane's concept | vexarcane probes "
          "drawn as vexdef's ring | 40 full vexarcane prompts drawn as a ring | dominant named |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        shows = r["piece_shows"]
        print(f"| {r['seed']} | {r['repeats'][0]}/{r['repeats'][1]} ({r['run']}) | {shows.get(A, 0):.0%} / "
              f"{shows.get(B, 0):.0%} | {r['vexdef_into_vexarcane'] or 0:.0%} | "
              f"{r['full_prompts_vexarcane_as_ring']:.0%} | {r['dominant']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
