"""The files of `loralab demo`: the per-epoch grids, the tables, `report.md` and `results.json`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

from loralab.lab.demo import (CLASS_NAME, CONCEPT_BAR, RETENTION_BAR, TAG, DemoEval, DemoRecipe, RunResult,
                              epoch_files)


def _to_pil(img: torch.Tensor, scale: int = 3) -> Image.Image:
    arr = img.round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(arr)
    return pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)


def write_grid(path: Path, run: RunResult, tag_items, base_items, ev: DemoEval) -> Path:
    """Rows = epochs (row 0 = the base model), columns = the first tag prompts then the first base prompts;
    each cell is labelled with its epoch and what the evaluator read (shape, colour)."""
    from loralab.io import atomic_write
    from loralab.train.sampling import image_grid

    cols_t = min(ev.grid_tag_columns, len(tag_items))
    cols_b = min(ev.grid_base_columns, len(base_items))
    headers = [it.caption(tag=TAG) for it in tag_items[:cols_t]] + [it.caption() for it in base_items[:cols_b]]
    cells, labels = [], []
    for e in sorted(run.images):
        tag_imgs, base_imgs = run.images[e]
        tp, bp = run.preds[e]
        row = [(tag_imgs[j], tp[j]) for j in range(cols_t)] + [(base_imgs[j], bp[j]) for j in range(cols_b)]
        for img, p in row:
            cells.append(_to_pil(img))
            labels.append(f"{'base' if e == 0 else f'e{e}'}: {p.get('colour') or '-'} {p.get('shape') or 'nothing'}")
    body = image_grid(cells, rows=len(run.images), cols=cols_t + cols_b, labels=labels)
    head = image_grid([Image.new("RGB", (cells[0].width if cells else 144, 1), (255, 255, 255))] * len(headers),
                      rows=1, cols=len(headers), labels=headers)
    grid = Image.new("RGB", (body.width, head.height + body.height), (255, 255, 255))
    grid.paste(head, (0, 0))
    grid.paste(body, (0, head.height))
    atomic_write(path, lambda tmp: grid.save(tmp, format="png"))
    return path


def _processes(workers: int, threads: int) -> str:
    t = f"{threads} torch thread{'s' if threads != 1 else ''}"
    return f"{workers} processes, {t} each" if workers > 1 else t


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def run_table(run: RunResult, recommended: int | None) -> str:
    lines = ["| epoch | steps | loss (epoch avg) | concept: `olis` → ring | `olis` colour follows prompt | "
             "base shape | base colour | base background | retention (min) | base prompts drawn as ring |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in run.scores:
        ep = "base model" if s.epoch == 0 else (f"**{s.epoch}** ⭐" if s.epoch == recommended else str(s.epoch))
        loss = "–" if s.loss is None else f"{s.loss:.4f}"
        lines.append(f"| {ep} | {s.steps if s.steps is not None else 0} | {loss} | {_pct(s.concept)} | "
                     f"{_pct(s.tag_colour)} | {_pct(s.base['shape'])} | {_pct(s.base['colour'])} | "
                     f"{_pct(s.base['background'])} | {_pct(s.retention['min'])} | {_pct(s.base_as_concept)} |")
    return "\n".join(lines)


def review_share(run: RunResult) -> tuple[int, float, int]:
    """(review's epoch, its concept × retention over the best epoch's, the best epoch)."""
    score = {s.epoch: s.concept * s.retention["min"] for s in run.scores if s.epoch > 0}
    best = max(score, key=lambda e: (score[e], -e))
    pick = run.review.recommended
    return pick, (score[pick] / score[best] if score[best] > 0 else 1.0), best


def review_section(runs: Sequence[RunResult]) -> list[str]:
    L = ["## What `loralab review` recommends, without the evaluator", "",
         "`loralab review` judges a run from its log and its images only (losses, sample grid, weight sweep, "
         "memorisation), as it would for any base model; here the evaluator's concept × retention checks it.", "",
         "| run | review's epoch | why | overfitting alarm | its concept × retention | best epoch (evaluator) | share of best |",
         "|---|---|---|---|---|---|---|"]
    for r in runs:
        if r.review is None:
            continue
        pick, share, best = review_share(r)
        s = next(x for x in r.scores if x.epoch == pick)
        L.append(f"| {r.name} ([review](train_{r.name}/review/review.md)) | {pick} | {r.review.reasons[0]} | "
                 f"{'yes' if r.review.alarm else 'no'} | {_pct(s.concept * s.retention['min'])} | {best} | {share:.0%} |")
    return L + [""]


def _lora_file(run: RunResult, epoch: int) -> Path:
    return epoch_files(run.out, TAG, len(run.scores) - 1)[epoch - 1]


def method_lines(recipe: DemoRecipe, ev: DemoEval, tag_items, base_items) -> list[str]:
    """The report's "How it was done" section."""
    return ["## How it was done", "",
            f"1. Dataset `dataset/{recipe.repeats}_{TAG}/`: {recipe.n_images} rings, colours, backgrounds and sizes "
          f"spread evenly, image sizes 32×32, 48×32 and 32×48, captions such as "
          f"`{TAG}, red, blue background, small` (activation tag first; the shape word never appears), "
          f"{recipe.repeats} repeats.",
          f"2. Regularization images `reg/1_{CLASS_NAME}/`: {recipe.n_reg} images drawn by the base model itself "
          f"(same model, same image sizes, DDIM {ev.ddim_steps} steps, CFG {ev.cfg}, fixed seeds). The class of a "
          "ring is \"a shape\", and what this model knows of shapes is its six trained ones, so the class prompts "
          "are its own captions of those shapes (`red circle, blue background, small`, ...) over the "
          "combinations it was trained on, with their prompts as captions. The held-out combinations used "
          "below to measure prior preservation are never among them. (Tried as well: class prompts without "
          "the tag and without a shape word, `red, blue background, small`: they protected the base prompts "
          "less than no reg images at all.)",
          f"3. Training through `loralab train`'s code path (`loralab.recipes.lora.train`): LoRA rank "
          f"{recipe.network_dim}, alpha {recipe.network_alpha:g}, "
          f"{'UNet only' if recipe.text_encoder_lr == 0 else f'text encoder LR {recipe.text_encoder_lr:g}'}, "
          f"AdamW LR {recipe.unet_lr:g} ({recipe.lr_scheduler}), batch {recipe.train_batch_size}, min-SNR γ "
          f"{recipe.min_snr_gamma:g}, prior_loss_weight {recipe.prior_loss_weight:g}, {recipe.max_train_epochs} epochs, "
          "a LoRA file every epoch, aspect-ratio buckets (resolution 40, bucket_reso_steps 16). The same "
          "settings without reg images for the comparison.",
          f"4. Scoring every saved epoch (the file loaded back, as a user would): DDIM {ev.ddim_steps} steps, CFG "
          f"{ev.cfg}, fixed seeds; {len(tag_items)} prompts with `{TAG}` on colour/background pairs not in the "
          f"dataset, and {len(base_items)} base prompts on the shape/colour/background combinations held out of "
          "the base model's training, scored by the lab evaluator (analytic colour/background/size, a small "
          "CNN for the shape). Retention = accuracy with the LoRA / the base model's accuracy on the same "
          "prompts and seeds, for shape, colour and background; the table shows the smallest.", ""]


def review_record(r: RunResult) -> dict | None:
    """What `loralab review` said of run `r`, for results.json."""
    if r.review is None:
        return None
    epoch, share, best = review_share(r)
    return {"epoch": epoch, "share_of_best": round(share, 4), "best_epoch": best, "alarm": r.review.alarm,
            "reasons": r.review.reasons, "seconds": round(r.review_seconds, 2)}


def write_report(out_dir: Path, runs: Sequence[RunResult], picks: dict, recipe: DemoRecipe, ev: DemoEval,
                 timings: dict[str, float], files: dict[str, str], *, quick: bool, threads: int, device: str,
                 tag_items, base_items, workers: int = 1) -> Path:
    """``report.md`` (for people) and ``results.json`` (for programs)."""
    from loralab.io import atomic_write

    reg, noreg = runs[0], runs[1]
    best, why = picks[reg.name]
    best_n, why_n = picks[noreg.name]
    base = reg.scores[0]
    met = best.concept >= CONCEPT_BAR and best.retention["min"] >= RETENTION_BAR
    met_n = best_n.concept >= CONCEPT_BAR and best_n.retention["min"] >= RETENTION_BAR
    rel = lambda p: Path(p).relative_to(out_dir).as_posix()  # noqa: E731
    L: list[str] = []
    L += [f"# loralab demo: teaching the lab model a new shape{' (quick)' if quick else ''}", ""]
    L += [f"The lab model never saw a **ring**. From {recipe.n_images} ring images tagged `{TAG}`, a LoRA learned "
          f"to draw rings when a prompt starts with `{TAG}`, while prompts without the tag kept drawing what "
          f"they drew before. Everything below ran in {timings['total'] / 60:.1f} min on {device} "
          f"({_processes(workers, threads)}).", ""]
    L += ["## Recommended epoch", ""]
    L += [f"**Epoch {best.epoch} of the run with regularization images**: `{rel(_lora_file(reg, best.epoch))}`. "
          f"Why: {why}.", ""]
    L += [f"* concept: {_pct(best.concept)} of the {len(tag_items)} prompts with `{TAG}` come out as a ring "
          f"(base model: {_pct(base.concept)}); {_pct(best.tag_colour)} of them in the prompt's colour.",
          f"* prior preservation: on {len(base_items)} held-out prompts without the tag, shape "
          f"{_pct(best.base['shape'])} (base model {_pct(base.base['shape'])}), colour {_pct(best.base['colour'])} "
          f"({_pct(base.base['colour'])}), background {_pct(best.base['background'])} "
          f"({_pct(base.base['background'])}): retention {_pct(best.retention['min'])} of the base model's accuracy "
          f"(the smallest of the three ratios); {_pct(best.base_as_concept)} of them drawn as a ring.",
          f"* bars: concept ≥ {CONCEPT_BAR:.0%} and retention ≥ {RETENTION_BAR:.0%}: "
          f"**{'met' if met else 'not met'}**.", ""]
    L += [f"What the reg images buy: without them, the pick would be epoch {best_n.epoch} "
          f"(concept {_pct(best_n.concept)}, retention {_pct(best_n.retention['min'])}, bars "
          f"{'met' if met_n else 'not met'}: {why_n}). Without reg images the LoRA also changes the shapes of "
          f"prompts that never mention `{TAG}`; the reg images (the base model's own drawings of its shapes) "
          "keep them in place. The price: each epoch has twice the steps (reg samples are balanced to the "
          f"training samples), {reg.train_seconds:.0f} s of training instead of {noreg.train_seconds:.0f} s.", ""]
    L += review_section(runs)
    L += ["Rule: the earliest epoch whose concept rate is at least 80 % and whose base-prompt retention is at "
          "least 90 %; if no epoch meets both, the epoch with the largest min(concept / 80 %, retention / 90 %), "
          "i.e. the one closest to meeting both bars.", ""]
    L += [f"![samples per epoch, with reg images]({files['grid_reg']})", "",
          f"Rows: the base model, then each epoch; columns: {min(ev.grid_tag_columns, len(tag_items))} prompts with "
          f"`{TAG}`, then {min(ev.grid_base_columns, len(base_items))} base prompts; under each sample, what the "
          f"evaluator read. Without reg images: [{files['grid_noreg']}]({files['grid_noreg']}).", ""]
    for r in runs:
        L += [f"## Per epoch, {'with' if r.with_reg else 'without'} regularization images", ""]
        L += [run_table(r, (best if r is reg else best_n).epoch), ""]
        L += [f"![loss]({files[f'loss_{r.name}']})", ""]
    L += method_lines(recipe, ev, tag_items, base_items)
    L += ["## Time", "", "| stage | seconds |", "|---|---|"]
    L += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    if workers > 1:
        L += ["", "The base model's scores and the run without reg images ran in a second process, alongside the "
              "reg images and the run with them: the stages overlap, so they add up to more than the total."]
    L += ["", "## Files", "",
          "* `dataset/`, `reg/`: the training and regularization images (kohya layout)",
          f"* `train_reg/`, `train_noreg/`: LoRA files per epoch (`{TAG}-NNNNNN.safetensors`, the last epoch "
          f"`{TAG}.safetensors`), `train_log.jsonl`",
          f"* `{files['grid_reg']}`, `{files['grid_noreg']}`, `{files['loss_reg']}`, `{files['loss_noreg']}`, "
          "`results.json`", ""]
    report = out_dir / "report.md"
    atomic_write(report, lambda tmp: Path(tmp).write_text("\n".join(L), encoding="utf-8"))

    data = {"quick": quick, "device": device, "threads": threads, "workers": workers, "recipe": asdict(recipe),
            "eval": asdict(ev),
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "bars": {"concept": CONCEPT_BAR, "retention": RETENTION_BAR},
            "runs": {r.name: {"with_reg": r.with_reg, "recommended_epoch": picks[r.name][0].epoch,
                              "why": picks[r.name][1], "steps_per_epoch": r.steps_per_epoch,
                              "train_seconds": round(r.train_seconds, 2), "eval_seconds": round(r.eval_seconds, 2),
                              "review": review_record(r),
                              "epochs": [asdict(s) for s in r.scores]} for r in runs},
            "recommended": {"run": reg.name, "epoch": best.epoch, "file": rel(_lora_file(reg, best.epoch)),
                            "bars_met": met}}
    atomic_write(out_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1), encoding="utf-8"))
    return report
