"""`loralab review` checked against the lab's ground truth, and timed. Not a test: it takes ~30 min on 2 cores.

    python bench/review_lab.py --out /tmp/review_lab                 # all three parts
    python bench/review_lab.py --out /tmp/review_lab --parts time    # one part: seeds | overfit | time

seeds:   `loralab demo` with DemoRecipe(seed=s) for s = 0, 1, 2 (with and without reg images each; the demo
         reviews every run with `loralab review`, which never sees the evaluator). Per run: the epoch review
         recommends, its evaluator score (concept rate × retention) over the best epoch's. Acceptance: at
         least 90 % of the best in at least 5 of the 6 runs.
overfit: a run built to overfit (no reg images, learning rate 5e-3, rank 16, 12 epochs, validation_split
         0.2), reviewed with the evaluator's scores: where the validation loss is lowest, whether the alarm
         fires, which epoch is recommended.
time:    a 6-epoch lab run (the demo's recipe, no reg images), then `review_run` with the evaluator's scores,
         timed (the bench figure: under 3 minutes on 2 CPU cores).
Writes <out>/review_lab.json and prints a markdown summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path


def part_seeds(out: Path, device: str) -> dict:
    from loralab.lab.demo import DemoRecipe, run_demo

    rows = []
    for seed in (0, 1, 2):
        run_demo(out / f"seed{seed}", device=device, recipe=DemoRecipe(seed=seed))
        data = json.loads((out / f"seed{seed}" / "results.json").read_text())
        for name, r in data["runs"].items():
            score = {e["epoch"]: e["concept"] * e["retention"]["min"] for e in r["epochs"] if e["epoch"] > 0}
            rows.append({"seed": seed, "run": name, "review_epoch": r["review"]["epoch"],
                         "review_score": score[r["review"]["epoch"]], "best_epoch": r["review"]["best_epoch"],
                         "best_score": score[r["review"]["best_epoch"]], "share": r["review"]["share_of_best"],
                         "alarm": r["review"]["alarm"], "review_s": r["review"]["seconds"],
                         "scores": {str(k): round(v, 4) for k, v in score.items()}})
    ok = sum(r["share"] >= 0.9 for r in rows)
    return {"rows": rows, "runs_at_90pct": ok, "accepted": ok >= 5}


def _train(out: Path, data_seed: int, device: str, **keys) -> Path:
    from loralab.lab import world as W
    from loralab.lab.demo import TAG, DemoRecipe, train_config
    from loralab.recipes.lora import train

    W.write_kohya_dataset(out / "data", tag=TAG, n=15, repeats=10, seed=data_seed)
    recipe = DemoRecipe(seed=data_seed, **{k: v for k, v in keys.items() if k in DemoRecipe.__dataclass_fields__},
                        extra={k: v for k, v in keys.items() if k not in DemoRecipe.__dataclass_fields__})
    train(train_config(recipe, out / "data", None, out / "run", device))
    return out / "run"


def part_overfit(out: Path, device: str) -> dict:
    from loralab.lab.judge import lab_judge
    from loralab.review.review import ReviewOptions, review_run

    run = _train(out / "overfit", 0, device, unet_lr=5e-3, max_train_epochs=12, network_dim=16, network_alpha=16.0,
                 validation_split=0.2)
    res = review_run(run, ReviewOptions(device=device), judge=lab_judge(run, device=device))
    val = {e: s.val_loss for e, s in res.signals.items() if s.val_loss is not None}
    val_min = min(val, key=lambda e: (val[e], e))
    last = max(val)
    scores = {e: v["score"] for e, v in res.judged.items() if e > 0}
    best = max(scores, key=lambda e: (scores[e], -e))
    return {"val_min_epoch": val_min, "last_epoch": last, "alarm": res.alarm, "evidence": res.evidence,
            "recommended": res.recommended, "reasons": res.reasons, "val_loss": val,
            "scores": scores, "best_epoch": best, "share": scores[res.recommended] / scores[best],
            "accepted": val_min < last and res.alarm and res.recommended != last, "report": str(res.report)}


def part_time(out: Path, device: str) -> dict:
    import torch

    from loralab.lab.judge import lab_judge
    from loralab.review.review import ReviewOptions, review_run

    run = _train(out / "timed", 4, device, max_train_epochs=6)
    t = time.perf_counter()
    res = review_run(run, ReviewOptions(device=device), judge=lab_judge(run, device=device))
    seconds = time.perf_counter() - t
    return {"seconds": round(seconds, 1), "epochs": 6, "torch_threads": torch.get_num_threads(),
            "recommended": res.recommended, "accepted": seconds < 180}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--parts", nargs="+", default=["time", "overfit", "seeds"], choices=("seeds", "overfit", "time"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "review_lab.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for part in args.parts:
        t = time.perf_counter()
        results[part] = {"seeds": part_seeds, "overfit": part_overfit, "time": part_time}[part](args.out, args.device)
        results[part]["part_seconds"] = round(time.perf_counter() - t, 1)
        path.write_text(json.dumps(results, indent=1, default=str))
    print(summary(results))


def summary(results: dict) -> str:
    L = []
    if "seeds" in results:
        L += ["| seed | run | review's epoch | its concept × retention | best epoch | best | share | alarm |",
              "|---|---|---|---|---|---|---|---|"]
        for r in results["seeds"]["rows"]:
            L.append(f"| {r['seed']} | {r['run']} | {r['review_epoch']} | {r['review_score']:.2f} | {r['best_epoch']} | "
                     f"{r['best_score']:.2f} | {r['share']:.0%} | {'yes' if r['alarm'] else 'no'} |")
        L.append(f"runs at >= 90 % of the best: {results['seeds']['runs_at_90pct']} of {len(results['seeds']['rows'])}")
    if "overfit" in results:
        o = results["overfit"]
        L.append(f"overfit run: validation minimum at epoch {o['val_min_epoch']} of {o['last_epoch']}, alarm "
                 f"{'fires' if o['alarm'] else 'silent'}, recommended epoch {o['recommended']} (evaluator: best epoch "
                 f"{o['best_epoch']}, the recommendation reaches {o['share']:.0%} of it)")
    if "time" in results:
        t = results["time"]
        L.append(f"review of a 6-epoch lab run with the evaluator's scores: {t['seconds']} s "
                 f"({t['torch_threads']} torch threads)")
    return "\n".join(L)


if __name__ == "__main__":
    main()
