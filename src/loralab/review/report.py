"""The files of a review: `review.md`, `loss.png`, `grid.png`, `sweep.png`, `signals.png`, `review.json`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from loralab.io import atomic_write

GRID_CELL = 128  # images smaller than this are scaled up (nearest) in the grids


def _cell(im: Image.Image) -> Image.Image:
    f = max(1, GRID_CELL // max(im.width, im.height))
    return im if f == 1 else im.resize((im.width * f, im.height * f), Image.Resampling.NEAREST)


def _save(img: Image.Image, path: Path) -> str:
    atomic_write(path, lambda tmp: img.save(tmp, format="png"))
    return path.name


def _with_header(body: Image.Image, headers: Sequence[str], cell_w: int) -> Image.Image:
    from loralab.train.sampling import image_grid

    head = image_grid([Image.new("RGB", (cell_w, 1), (255, 255, 255))] * len(headers), rows=1, cols=len(headers),
                      labels=list(headers))
    out = Image.new("RGB", (max(body.width, head.width), head.height + body.height), (255, 255, 255))
    out.paste(head, (0, 0))
    out.paste(body, (0, head.height))
    return out


def write_grid(path: Path, drawn, signals, prompts, controls, max_controls: int = 4) -> str:
    """Rows: the base model, then each epoch; columns: the prompts, then up to `max_controls` controls.
    Under each prompt image: its likeness to the nearest training image."""
    from loralab.train.sampling import image_grid

    n_c = min(max_controls, len(controls))
    cells, labels = [], []
    for e in sorted(drawn.rows):
        ip, ic = drawn.rows[e]
        s = signals[e]
        for j, im in enumerate(ip):
            cells.append(_cell(im))
            like = f", like {s.nearest_likeness[j]:.2f}" if getattr(s, "nearest_likeness", None) else ""
            labels.append(f"{'base' if e == 0 else f'epoch {e}'}{like}")
        for im in ic[:n_c]:
            cells.append(_cell(im))
            labels.append(f"{'base' if e == 0 else f'epoch {e}'} (control)")
    cols = len(drawn.rows[0][0]) + n_c
    body = image_grid(cells, rows=len(drawn.rows), cols=cols, labels=labels)
    headers = [p.prompt for p in prompts] + [f"control: {c.prompt}" for c in controls[:n_c]]
    return _save(_with_header(body, headers, body.width // max(1, cols)), path)


def write_sweep(path: Path, drawn, signals, prompts) -> str | None:
    """Rows: (epoch, weight); columns: the sweep prompts; each cell labelled with its saturation against the
    base model's image of its prompt, and whether its row (the set) burns."""
    from loralab.review import measure as M
    from loralab.train.sampling import image_grid

    if not drawn.sweep:
        return None
    base = drawn.rows[0][0]
    keys = sorted(drawn.sweep)
    cols = len(drawn.sweep[keys[0]])
    cells, labels = [], []
    for e, w in keys:
        _, _, burned = M.burned(drawn.sweep[(e, w)], base[:cols])  # the row's verdict, over its images
        for j, im in enumerate(drawn.sweep[(e, w)]):
            cell, _, _ = M.burned([im], [base[j]])  # this cell's saturation against its base image
            cells.append(_cell(im))
            labels.append(f"epoch {e} @ {w:g}: saturation x{cell:.2f}{' (row BURNED)' if burned else ''}")
    body = image_grid(cells, rows=len(keys), cols=cols, labels=labels)
    return _save(_with_header(body, [p.prompt for p in prompts[:cols]], body.width // max(1, cols)), path)


def plot_loss(path: Path, run, minima: dict[str, list[int]]) -> str:
    """Per-step loss (raw and an exponential moving average), kohya's moving average, the epoch averages,
    the validation loss per epoch, the learning rate (right axis); local minima of the epoch series marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = run.steps()
    fig = Figure(figsize=(9, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if steps:
        x = [r["step"] for r in steps]
        raw = [r["loss/current"] for r in steps]
        ax.plot(x, raw, color="tab:blue", alpha=0.2, linewidth=0.7, label="loss (raw)")
        ax.plot(x, ema(raw), color="tab:blue", linewidth=1.6, label="loss (EMA 0.9)")
    end = run.epoch_steps()
    for key, series, colour, marker in (("train", run.epoch_losses(), "tab:orange", "o"),
                                        ("validation", run.validation_losses(), "tab:green", "s")):
        if not series:
            continue
        es = sorted(series)
        ax.plot([end.get(e, 0) for e in es], [series[e] for e in es], marker=marker, color=colour,
                label=f"{key} loss per epoch")
        for e in minima.get(key, []):
            ax.annotate(f"min e{e}", (end.get(e, 0), series[e]), textcoords="offset points", xytext=(0, -14),
                        ha="center", fontsize=8, color=colour)
            ax.plot([end.get(e, 0)], [series[e]], marker="v", color="red", markersize=9, linestyle="none")
    lrs = [(r["step"], v) for r in steps for k, v in r.items() if k.startswith("lr/") and isinstance(v, float)]
    if lrs:
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in lrs], [v for _, v in lrs], ".", color="tab:gray", markersize=1.5, alpha=0.6)
        ax2.set_ylabel("learning rate", color="tab:gray")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss (red triangles: local minima of the per-epoch losses)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path.name


def plot_signals(path: Path, signals: dict, recommended: int) -> str:
    """Change, drift and likeness per epoch (epoch 0 = the base model), the recommended epoch marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    es = sorted(signals)
    fig = Figure(figsize=(8, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(es, [signals[e].change for e in es], "o-", label="change of the prompts' images")
    if any(signals[e].drift is not None for e in es):
        ax.plot(es, [signals[e].drift or 0 for e in es], "s-", label="drift of the controls' images")
    ax.set_ylabel("mean pixel change (0..1)")
    ax2 = ax.twinx()
    ax2.plot(es, [signals[e].likeness for e in es], "^--", color="tab:purple", label="likeness to nearest training image")
    ax2.set_ylabel("likeness", color="tab:purple")
    ax.axvline(recommended, color="red", alpha=0.4, linewidth=6)
    ax.set_xlabel("epoch (0 = base model)")
    ax.set_title(f"what each epoch does (red band: recommended epoch {recommended})")
    ax.grid(True, alpha=0.3)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path.name


def ema(values: Sequence[float], alpha: float = 0.9) -> list[float]:
    """TensorBoard's smoothing: s_t = alpha · s_(t−1) + (1 − alpha) · x_t, debiased at the start."""
    out, s = [], 0.0
    for t, v in enumerate(values, start=1):
        if not math.isfinite(v):
            out.append(out[-1] if out else float("nan"))
            continue
        s = alpha * s + (1 - alpha) * v
        out.append(s / (1 - alpha ** t))
    return out


def _f(x, fmt: str = "{:.4f}") -> str:
    return "–" if x is None else fmt.format(x)


def epoch_table(result, run, judge) -> list[str]:
    sig = result.signals
    n = len(sig[0].nearest) if sig.get(0) is not None else 0
    jcols = list(judge.columns) if judge is not None and result.judged else []
    head = ("| epoch | file | steps | train loss | validation loss | change of prompts | drift of controls | "
            "likeness to nearest training image | copies | saturation at 1.0 |"
            + "".join(f" {t} |" for _, t in jcols))
    lines = [head, "|" + "---|" * (10 + len(jcols))]
    files = {e.epoch: e.path.name for e in run.epochs}
    for e in sorted(sig):
        s = sig[e]
        label = "base model" if e == 0 else (f"**{e}** ⭐" if e == result.recommended else str(e))
        row = (f"| {label} | {('`' + files[e] + '`') if e in files else '–'} | {s.steps if s.steps is not None else '–'} | "
               f"{_f(s.train_loss)} | {_f(s.val_loss)} | {_f(s.change, '{:.3f}')} | {_f(s.drift, '{:.3f}')} | "
               f"{_f(s.likeness, '{:.3f}')} | {s.copies} of {n} | {'–' if e == 0 else (f'×{s.saturation:.2f}' + (' BURNED' if s.burned else ''))} |")
        for key, _ in jcols:
            v = result.judged.get(e, {}).get(key)
            row += f" {_f(v, '{:.0%}')} |"
        lines.append(row)
    return lines


def write_review(result, run, drawn, prompts, controls, *, prompts_source: str, triggers: list[str], model_path: str,
                 train_paths, judge, weights) -> Path:
    """All files of the review into `result.out`; returns review.md."""
    from loralab.review.review import write_json
    from loralab.review.runlog import local_minima

    out = result.out
    out.mkdir(parents=True, exist_ok=True)
    sig = result.signals
    minima = {"train": local_minima(run.epoch_losses()), "validation": local_minima(run.validation_losses())}
    files = {"loss": plot_loss(out / "loss.png", run, minima),
             "grid": write_grid(out / "grid.png", drawn, sig, prompts, controls),
             "sweep": write_sweep(out / "sweep.png", drawn, sig, prompts),
             "signals": plot_signals(out / "signals.png", sig, result.recommended)}
    rec = next(e for e in run.epochs if e.epoch == result.recommended)
    status = ("finished" if run.finished else
              "stopped early (" + run.events("stopped")[-1].get("reason", "") + ")" if run.events("stopped") else
              "not finished (interrupted or still running): the epochs saved so far are reviewed")
    L = [f"# Review of `{run.folder}` (run `{run.output_name}`)", ""]
    L += [f"Base model `{model_path}`; {len(run.epochs)} epoch file(s); the run {status}. Review took "
          f"{result.seconds:.0f} s.", ""]
    L += ["## Recommended epoch", "", f"**Epoch {result.recommended}**: `{rec.path.name}`. Why:", ""]
    L += [f"* {r}" for r in result.reasons] + [""]
    if result.alarm:
        L += ["## ⚠ Overfitting alarm", ""] + [f"* {x}" for x in result.evidence] + [""]
    else:
        L += ["No overfitting alarm: the validation loss did not rise 10 % above its minimum while the training loss fell, and "
              "the last epoch neither burns at weight 1.0 nor copies training images.", ""]
    if result.judged:
        L += judged_lines(result, judge)
    L += attention_lines(result, out)
    if run.problems:
        L += ["## Problems found in the run folder", ""] + [f"* {p}" for p in run.problems] + [""]
    L += ["## Loss", "", f"![loss]({files['loss']})", ""]
    L += [f"Local minima of the per-epoch training loss: {', '.join(map(str, minima['train'])) or 'none'}"
          + (f"; of the validation loss: {', '.join(map(str, minima['validation'])) or 'none'}"
             if run.validation_losses() else "; no validation loss in this run (set validation_split to get one)")
          + ".", ""]
    mn = run.max_norm_stats()
    if mn:
        L += ["## Max-norm (scale_weight_norms)", "",
              f"{mn['steps_with_keys_scaled']} of {mn['steps']} steps scaled keys (mean {mn['mean_keys_scaled']:.1f}, "
              f"most {mn['max_keys_scaled']:.0f} keys in one step); mean key norm {mn['mean_key_norm']:.3f} "
              f"(last step {mn['last_mean_key_norm']:.3f}), largest key norm {mn['max_key_norm']:.3f}.", ""]
    L += ["## Per epoch", ""] + epoch_table(result, run, judge) + [""]
    L += [f"![what each epoch does]({files['signals']})", ""]
    L += ["## Samples per epoch", "", f"![grid]({files['grid']})", "",
          f"Rows: the base model, then each epoch at weight 1.0; columns: {len(prompts)} prompt(s) from "
          f"{prompts_source}, then controls (the prompts without their trigger words "
          f"{', '.join(f'`{t}`' for t in triggers) or '(none found)'}, and prompts that have none). Same seed in "
          "every row: a difference is the LoRA's doing.", ""]
    if files["sweep"]:
        L += ["## LoRA weight sweep", "", f"![sweep]({files['sweep']})", "", sweep_lines(result, weights), ""]
    L += memorisation_lines(result, train_paths)
    L += ["## How each figure is measured", "",
          "* change: mean |pixel difference| (0..1) of an image from the base model's image of the same prompt "
          "and seed; drift: the same for the controls (what the LoRA does to prompts without its trigger).",
          "* likeness: correlation of 32×32 thumbnails with the nearest training image (1 = the same picture); "
          "copies: images with likeness >= 0.95.",
          "* burns: the mean saturation (HSV) of an epoch's images at least 1.5× the base model's images'.", "* the rule: `loralab/review/recommend.py` (module docstring).", "",
          "Files: `review.md`, `review.json`, " + ", ".join(f"`{v}`" for v in files.values() if v) + "."]
    report = out / "review.md"
    atomic_write(report, lambda tmp: Path(tmp).write_text("\n".join(L) + "\n", encoding="utf-8"))
    write_json(result)
    return report


def attention_lines(result, out: Path) -> list[str]:
    """The DAAM maps of the activation tags at the recommended epoch (`attention.png`), with each tag's region."""
    if result.attention is None:
        return []
    from loralab.review.attention import sheet

    prompt, wm = result.attention
    atomic_write(out / "attention.png", lambda tmp: sheet([(f"epoch {result.recommended}", wm)]).save(tmp, format="PNG"))
    fig = wm.figures()
    shares = ", ".join(f"`{w}` {v['region_share']:.0%} of the image" for w, v in fig["words"].items())
    return [f"## Where the activation tags act (epoch {result.recommended})", "",
            f"DAAM cross-attention maps (`loralab attention`) of the activation tags in `{prompt.prompt}`, drawn with "
            f"the recommended epoch: {shares} (region: the map at 0.4 or more of its range).", "",
            "![attention](attention.png)", ""]


def judged_lines(result, judge) -> list[str]:
    scores = {e: v["score"] for e, v in result.judged.items() if e > 0 and "score" in v}
    if not scores:
        return []
    best = max(scores, key=lambda e: (scores[e], -e))
    got = scores.get(result.recommended, 0.0)
    share = got / scores[best] if scores[best] > 0 else 1.0
    return [f"## Ground truth: {judge.name}", "",
            f"The recommendation above never looks at these scores. {judge.name} scores the recommended epoch "
            f"{result.recommended} at {got:.0%}; its best epoch is {best} at {scores[best]:.0%}: the recommendation "
            f"reaches **{share:.0%}** of the best.", ""]


def sweep_lines(result, weights) -> str:
    parts = []
    for e in sorted(e for e, s in result.signals.items() if s.sweep):
        s = result.signals[e]
        burn = [w for w in sorted(s.sweep) if s.sweep[w]["burned"]]
        cells = ", ".join(f"{w:g}: ×{s.sweep[w]['saturation']:.2f}" for w in sorted(s.sweep))
        parts.append(f"Epoch {e}: saturation against the base image {cells}; "
                     + (f"burns from weight {burn[0]:g}." if burn else "does not burn up to weight "
                        f"{max(s.sweep):g}."))
    return ("Rows: epoch @ weight (0 = the base model). The guide: an overcooked LoRA burns at weight 1.2–2. "
            + " ".join(parts))


def memorisation_lines(result, train_paths) -> list[str]:
    sig = result.signals
    es = sorted(sig)
    if not train_paths:
        return ["## Memorisation", "", "The training images were not found (train_data_dir moved?): not measured.", ""]
    rows = " → ".join(f"{'base' if e == 0 else e}: {sig[e].likeness:.2f}" for e in es)
    last = sig[es[-1]]
    near = {}
    for i in last.nearest:
        near[i] = near.get(i, 0) + 1
    top = max(near, key=near.get) if near else None
    lines = ["## Memorisation", "",
             f"Mean likeness of the prompts' images to their nearest training image ({len(train_paths)} training "
             f"images), per epoch: {rows}."]
    if top is not None and near[top] > 1:
        lines.append(f"In the last epoch {near[top]} images share the nearest training image "
                     f"`{train_paths[top].name}`.")
    return lines + [""]
