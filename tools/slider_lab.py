"""Sliders and LECO on the lab model, scored by the lab evaluator (CPU, a few minutes a run).

    OMP_NUM_THREADS=1 python tools/slider_lab.py --out /tmp/slider_lab            # both runs
    OMP_NUM_THREADS=1 python tools/slider_lab.py --out /tmp/slider_lab --only erase --erase-steps 225

(a) a size slider trained from prompt pairs only: for training triples "<colour> <shape>, <bg> background",
    positive "…, large", negative "…, small", action enhance, bidirectional. Scored on the held-out
    triples (never in the base model's training nor in the slider's prompts), prompted without a size,
    at LoRA weights +1, 0, −1: the share read "large" / "small", and shape, colour, background accuracy.
(b) a LECO erase of one colour: erase entries "red <shape>, <bg> background" (positive = target, neutral =
    negative = the prompt without the colour) and anchor entries of the other colours (guidance 0: kept as
    the base model has them; `--anchor-colours` weights orange, red's neighbour, three times). Scored on (shape, background) pairs of the erased colour that no entry
    used, and on held-out triples of the other colours: the share read as the erased colour, and the
    other colours' colour accuracy.
    Anchors are held to their own prompt's base prediction (`neutral` = the prompt; `--anchor-target empty`:
    LECO's default neutral "", as the figures before 2026-11-30 were measured). `--uce`: the erase written in
    closed form (prompt file `method = "uce"`, η = 2 unless `--erase-guidance`), every training triple of
    the other colours an anchor (`--uce-keep`: preserve_weight).

    OMP_NUM_THREADS=1 python tools/slider_lab.py --out /tmp/leco --only erase --uce --seed 1
Every run goes through `loralab train`'s own path (`recipes.recipe_for` → the slider recipe).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from loralab.config import build_config
from loralab.lab import world as W
from loralab.lab.evaluator import Evaluator, accuracy
from loralab.lab.model import LabModel, evaluator_path, lab_model_path
from loralab.network.lora import LoRANetwork
from loralab.recipes import train_any

WEIGHTS = (1.0, 0.0, -1.0)
# the erase run's anchor colours: orange, the colour the evaluator loses first when red is erased, weighted 3x
ERASE_ANCHORS = "orange,orange,orange,yellow,purple,green,blue,white,black"


def base_caption(shape: str, colour: str, bg: str) -> str:
    return f"{colour} {shape}, {bg} background"


def toml_entry(**keys) -> str:
    lines = ["[[prompts]]"]
    for k, v in keys.items():
        lines.append(f"{k} = {json.dumps(v)}" if not isinstance(v, bool) else f"{k} = {str(v).lower()}")
    return "\n".join(lines) + "\n"


def size_slider_prompts(n: int, guidance: float, seed: int = 0) -> tuple[str, list[W.Triple]]:
    triples = W.training_triples()
    random.Random(seed).shuffle(triples)
    used = triples[:n]
    text = "\n".join(toml_entry(target=base_caption(*t), positive=base_caption(*t) + ", large",
                                negative=base_caption(*t) + ", small", neutral=base_caption(*t), action="enhance",
                                guidance_scale=guidance, bidirectional=True) for t in used)
    return text, used


def erase_prompts(colour: str, n_erase: int, n_anchor: int, guidance: float, seed: int = 0,
                  anchor_colours: list[str] | None = None, anchor_target: str = "own"):
    """Erase entries of `colour` on n_erase (shape, bg) pairs, anchors of other colours on the same pairs; the
    unused pairs and the anchor triples. `anchor_colours` (repeats weight a colour) is the anchors' colour
    cycle; None: every other colour once."""
    rng = random.Random(seed)
    pairs = [(s, b) for s in W.TRAIN_SHAPES for b in W.BACKGROUNDS if b != colour]
    rng.shuffle(pairs)
    erase_pairs = pairs[:n_erase]
    kept = [c for c in (anchor_colours or W.COLOURS) if c != colour]
    # anchors: the erase entries' own (shape, background) pairs in the other colours, in turn, so that the
    # LoRA tells the colour word apart rather than the shapes and backgrounds around it
    anchors, i = [], 0
    while len(anchors) < n_anchor:
        s, b = erase_pairs[i % len(erase_pairs)]
        c = kept[i % len(kept)]
        if c != b and (s, c, b) not in W.HELD_OUT_TRIPLES:  # those are the scored prompts
            anchors.append((s, c, b))
        i += 1
    text = "".join(toml_entry(target=base_caption(s, colour, b), positive=base_caption(s, colour, b),
                              negative=f"{s}, {b} background", neutral=f"{s}, {b} background", action="erase",
                              guidance_scale=guidance) + "\n" for s, b in erase_pairs)
    # an anchor (η = 0) is pulled to ε(neutral): its own prompt as the frozen base model predicts it ("own"), or
    # LECO's default neutral, the empty prompt ("empty", the figures before 2026-11-30 06:00)
    text += "".join(toml_entry(target=base_caption(*t), **({} if anchor_target == "empty" else
                                                           {"neutral": base_caption(*t)}),
                               action="enhance", guidance_scale=0.0) + "\n" for t in anchors)
    return text, pairs[n_erase:], anchors


def train(out: Path, name: str, prompt_text: str, args) -> tuple[Path, float]:
    out.mkdir(parents=True, exist_ok=True)
    pf = out / f"{name}_prompts.toml"
    pf.write_text(prompt_text, encoding="utf-8")
    cfg = build_config(None, {
        "pretrained_model_name_or_path": str(lab_model_path()), "prompts_file": str(pf), "output_dir": str(out),
        "output_name": name, "overwrite": True, "resolution": "32", "network_dim": args.dim,
        "network_alpha": args.dim, "learning_rate": args.lr,
        "max_train_steps": args.erase_steps if not name.startswith("size") else args.steps,
        "max_denoising_steps": args.denoise_steps, "leco_denoise_guidance_scale": args.denoise_cfg,
        "leco_training_method": args.method if not name.startswith("size") else args.slider_method,
        "optimizer_type": "AdamW", "save_precision": "fp16", "seed": args.seed, "device": args.device})
    t0 = time.perf_counter()
    result = train_any(cfg)
    return result.final_file, time.perf_counter() - t0


def images_at(model: LabModel, lora: Path | None, weight: float, items, prompts, steps: int):
    net = None
    if lora is not None:
        net = LoRANetwork.from_weights(str(lora), model.unet, [model.te], "sd1", multiplier=weight)
        net.to(model.device, dtype=torch.float32).eval()
        net.apply_to()
    try:
        return model.generate(items, prompts, steps=steps, cfg=7.5, seed=0)
    finally:
        if net is not None:
            net.restore()


def score_slider(model, ev, lora: Path, triples, steps: int) -> dict:
    items = [W.WorldItem(*t, "small", 32, 32, seed=104_729 * j) for j, t in enumerate(triples)]
    prompts = [base_caption(*t) for t in triples]
    expected = [{"shape": t[0], "colour": t[1], "background": t[2]} for t in triples]
    base = ev.predict(images_at(model, None, 0.0, items, prompts, steps))
    rows = {}
    for w in WEIGHTS:
        preds = ev.predict(images_at(model, lora, w, items, prompts, steps))
        acc = accuracy(preds, expected)
        rows[w] = {"large": sum(p["size"] == "large" for p in preds) / len(preds),
                   "small": sum(p["size"] == "small" for p in preds) / len(preds),
                   "same_size_as_base": sum(p["size"] == b["size"] for p, b in zip(preds, base)) / len(preds),
                   **{k: acc[k] for k in ("shape", "colour", "background")}}
    base_acc = accuracy(base, expected)
    rows["base"] = {"large": sum(p["size"] == "large" for p in base) / len(base),
                    "small": sum(p["size"] == "small" for p in base) / len(base), "same_size_as_base": 1.0,
                    **{k: base_acc[k] for k in ("shape", "colour", "background")}}
    return rows


def score_erase(model, ev, lora: Path, colour: str, held_pairs, other_triples, steps: int) -> dict:
    target_items = [W.WorldItem(s, colour, b, "small", 32, 32, seed=7919 * j) for j, (s, b) in enumerate(held_pairs)]
    other_items = [W.WorldItem(*t, "small", 32, 32, seed=104_729 * j) for j, t in enumerate(other_triples)]
    rows = {}
    for w, lora_ in (("base", None), *((w, lora) for w in WEIGHTS)):
        weight = 0.0 if w == "base" else w
        tp = ev.predict(images_at(model, lora_, weight, target_items, [it.caption().rsplit(",", 1)[0]
                                                                        for it in target_items], steps))
        op = ev.predict(images_at(model, lora_, weight, other_items, [it.caption().rsplit(",", 1)[0]
                                                                       for it in other_items], steps))
        oacc = accuracy(op, [{k: it.attributes[k] for k in ("shape", "colour", "background")} for it in other_items])
        rows[w] = {f"{colour}_read": sum(p["colour"] == colour for p in tp) / len(tp),
                   f"{colour}_prompts_shape": sum(p["shape"] == it.shape for p, it in zip(tp, target_items)) / len(tp),
                   **{f"others_{k}": oacc[k] for k in ("shape", "colour", "background")}}
    return rows


def table(title: str, rows: dict) -> str:
    keys = list(next(iter(rows.values())))
    lines = [title, "weight".ljust(8) + "".join(k.rjust(max(10, len(k) + 2)) for k in keys)]
    for w, r in rows.items():
        label = w if isinstance(w, str) else f"{w:+.0f}"
        lines.append(label.ljust(8) + "".join(f"{100 * r[k]:.0f}%".rjust(max(10, len(k) + 2)) for k in keys))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/slider_lab")
    ap.add_argument("--only", choices=("slider", "erase"), default=None)
    ap.add_argument("--steps", type=int, default=200, help="steps of the slider run")
    ap.add_argument("--erase-steps", type=int, default=225, help="steps of the erase run")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=1.0, help="η of the slider entries")
    ap.add_argument("--erase-guidance", type=float, default=None, help="η of the erase entries (1; --uce: 2)")
    ap.add_argument("--denoise-steps", type=int, default=20, help="max_denoising_steps")
    ap.add_argument("--denoise-cfg", type=float, default=3.0, help="leco_denoise_guidance_scale")
    ap.add_argument("--method", default="xattn_kv", help="leco_training_method of the erase run")
    ap.add_argument("--slider-method", default="full", help="leco_training_method of the slider run")
    ap.add_argument("--n-prompts", type=int, default=24)
    ap.add_argument("--n-anchors", type=int, default=12, help="anchor entries of the erase run (other colours)")
    ap.add_argument("--anchor-colours", default=ERASE_ANCHORS,
                    help="comma-separated colour cycle of the erase run's anchors, repeats weight a colour (red's "
                         "neighbour orange thrice); '' : each other colour once")
    ap.add_argument("--anchor-target", choices=("own", "empty"), default="own",
                    help="what an anchor is held to: its own prompt's base prediction, or LECO's default neutral ''")
    ap.add_argument("--uce", action="store_true", help="erase in closed form (method = uce) instead of training; "
                                                        "every other-colour training triple an anchor")
    ap.add_argument("--uce-keep", type=float, default=1.0, help="--uce: preserve_weight (λ) of the kept texts")
    ap.add_argument("--colour", default="red")
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model = LabModel.load(args.device)
    ev = Evaluator.load(evaluator_path(), device=args.device)
    report = {"args": vars(args)}
    if args.only in (None, "slider"):
        text, _ = size_slider_prompts(args.n_prompts, args.guidance, args.seed)
        lora, secs = train(out, "size_slider", text, args)
        t0 = time.perf_counter()
        rows = score_slider(model, ev, lora, list(W.HELD_OUT_TRIPLES)[:24], args.eval_steps)
        print(table(f"(a) size slider: {args.n_prompts} prompt pairs, {args.steps} steps, trained in {secs:.0f} s, "
                    f"scored on 24 held-out triples without a size in {time.perf_counter() - t0:.0f} s", rows))
        report["slider"] = {"train_seconds": secs, "rows": {str(k): v for k, v in rows.items()}}
    if args.only in (None, "erase"):
        n_erase = args.n_prompts // 2
        cycle = args.anchor_colours.split(",") if args.anchor_colours else None
        eta = args.erase_guidance if args.erase_guidance is not None else 2.0 if args.uce else 1.0
        text, held_pairs, anchors = erase_prompts(args.colour, n_erase, args.n_anchors, eta, args.seed,
                                                  cycle, args.anchor_target)
        if args.uce:  # closed form: anchors cost nothing, so every training triple of the other colours is one
            more = [t for t in W.training_triples() if t[1] != args.colour and t not in anchors]
            text = (f'method = "uce"\npreserve_weight = {args.uce_keep}\n\n' + text
                    + "".join(toml_entry(target=base_caption(*t), neutral=base_caption(*t), action="enhance",
                                         guidance_scale=0.0) + "\n" for t in more))
            anchors = anchors + more
        lora, secs = train(out, f"{'uce' if args.uce else 'erase'}_{args.colour}", text, args)
        others = [t for t in W.HELD_OUT_TRIPLES if t[1] != args.colour][:24]
        t0 = time.perf_counter()
        rows = score_erase(model, ev, lora, args.colour, held_pairs, others, args.eval_steps)
        print(table(f"(b) LECO erase of {args.colour}: {n_erase} erase + {len(anchors)} anchor entries, "
                    f"{'closed form (method = uce, η = %g)' % eta if args.uce else '%d steps' % args.erase_steps}, "
                    f"{'written' if args.uce else 'trained'} in {secs:.0f} s; {len(held_pairs)} unused {args.colour} prompts, {len(others)} "
                    f"held-out prompts of other colours, scored in {time.perf_counter() - t0:.0f} s", rows))
        report["erase"] = {"train_seconds": secs, "rows": {str(k): v for k, v in rows.items()}}
    (out / "slider_lab.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
