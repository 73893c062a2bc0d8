"""`loralab review OUTPUT_DIR`: judge a training run's epochs with numbers and pictures, for any base model.

    result = review_run(Path("output"), ReviewOptions())     # writes output/review/review.md + PNGs
    result.recommended, result.alarm

What it does, in order (each figure is defined in `measure.py`, the rule in `recommend.py`):
1. reads the run folder (`runlog.read_run`): the log, the config the run logged, one file per epoch;
2. loads the base model (the run's `pretrained_model_name_or_path`, or `--model`) and checks each epoch
   file fits it, with a message naming what does not match;
3. draws the prompts (`prompts.review_prompts`) and their controls (trigger words removed, plus prompts
   without a trigger) with the base model and with every epoch at weight 1.0, fixed seeds;
4. measures per epoch: change of the prompts' images from the base model's, drift of the controls',
   likeness of the prompts' images to their nearest training image (memorisation), losses from the log;
5. recommends an epoch and decides the overfitting alarm (`recommend.py`); draws the LoRA-weight sweep
   (0, 0.5, 1, 1.5, 2 by default) for the candidate epochs and measures saturation against the base image;
6. writes `review/review.md`, `loss.png`, `grid.png`, `sweep.png`, `signals.png` and `review.json`
   (nothing else in the run folder changes).

A `judge` (the lab's evaluator, passed by `loralab review` on a lab-model run and by `loralab demo`)
adds ground-truth scores per epoch to the report, so the recommendation, which never looks at them,
can be checked against them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loralab.errors import LoralabError

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0)


@dataclass
class ReviewOptions:
    model: str = ""  # base model; default: the run's pretrained_model_name_or_path
    prompts: str = ""  # kohya prompt file; default: the run's sample_prompts, else training captions
    out: str = ""  # default: <run>/review
    name: str = ""  # output_name, when the folder holds several runs
    weights: Sequence[float] = DEFAULT_WEIGHTS
    device: str = ""
    precision: str = "fp32"
    batch_size: int = 8
    seed: int = 0
    max_prompts: int = 8
    sweep_prompts: int = 4


@dataclass
class Judge:
    """Ground truth for the report: `score(files)` -> {epoch (0 = base): {"score": .., other figures}}."""

    name: str
    score: Callable[[dict[int, Path]], dict[int, dict[str, float]]]
    columns: Sequence[tuple[str, str]] = ()  # (key, column title) shown in the table


@dataclass
class ReviewResult:
    folder: Path
    out: Path
    report: Path
    recommended: int
    reasons: list[str]
    alarm: bool
    evidence: list[str]
    signals: dict[int, Any]
    judged: dict[int, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    attention: Any = None  # (prompt, review.attention.WordMaps) of the activation tags at the recommended epoch


def review_run(folder: str | Path, opts: ReviewOptions | None = None, *, prompts: Sequence | None = None,
               judge: Judge | None = None) -> ReviewResult:
    """Review the run in `folder` (see the module docstring). `prompts` (SamplePrompts) replace the
    prompt lookup (the demo passes its own)."""
    from loralab.review.runlog import read_run

    import torch

    from loralab.review.generate import choose_threads

    t0 = time.perf_counter()
    opts = opts or ReviewOptions()
    run = read_run(folder, opts.name)
    old_threads = torch.get_num_threads()
    threads = choose_threads(None, opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if threads:
        torch.set_num_threads(threads)
    try:
        return _review(run, opts, prompts, judge, t0)
    finally:
        torch.set_num_threads(old_threads)


def _review(run, opts: ReviewOptions, prompts, judge, t0: float) -> ReviewResult:
    from loralab.review import measure as M
    from loralab.review.draw import draw_rows, draw_sweep
    from loralab.review.generate import SamplingModel
    from loralab.review.prompts import review_prompts, trigger_words, without_triggers
    from loralab.review.recommend import overfit_alarm, recommend, sweep_epochs
    from loralab.review.report import write_review
    from loralab.review.signals import image_signals, sweep_signals

    model_path = _model_path(run, opts)
    meta = run.epochs[-1].metadata
    seed = opts.seed or int(run.config.get("seed") or 0)
    source = "its caller (`loralab demo`: the grid's tag and base prompts)"
    if prompts is None:
        prompts, source = review_prompts(opts.prompts, run.config, meta, opts.max_prompts, seed)
    triggers = trigger_words(meta)
    with_trigger = [p for p in prompts if without_triggers(p.prompt, triggers) is not None]
    controls = _controls(prompts, triggers)
    shown = with_trigger or list(prompts)  # a run without trigger words: every prompt is a prompt
    if not with_trigger:
        controls = []
    out = Path(opts.out) if opts.out else run.folder / "review"
    _check_out(out, run.folder)
    sm = SamplingModel.load(model_path, device=opts.device, precision=opts.precision,
                            v_parameterization=bool(run.config.get("v_parameterization")),
                            clip_skip=int(run.config.get("clip_skip") or 0),
                            max_token_length=int(run.config.get("max_token_length") or 75))
    files = {e.epoch: e.path for e in run.epochs}
    _check_fit(sm, files, meta)
    bar = _progress(len(files) + 3 + (judge is not None))
    try:
        drawn = draw_rows(sm, shown, controls, files, seed=seed, batch_size=opts.batch_size,
                          progress=lambda s: _tick(bar, s))
        train_dirs = [Path(run.config["train_data_dir"])] if run.config.get("train_data_dir") else []
        train_paths, train_thumbs = M.training_images(train_dirs)
        signals = image_signals(drawn, train_thumbs)
        _add_losses(run, signals)
        draw_sweep(sm, drawn, shown[:opts.sweep_prompts], files, sweep_epochs(signals), opts.weights, seed=seed,
                   batch_size=opts.batch_size, progress=lambda s: _tick(bar, s))
        sweep_signals(drawn, signals)
        best, reasons = recommend(signals)
        alarm, evidence = overfit_alarm(signals, best)
        maps = _trigger_maps(sm, shown, triggers, files[best], seed)
        judged = {}
        if judge is not None:
            _tick(bar, f"scoring with {judge.name}")
            judged = judge.score({0: None, **files})
    finally:
        sm.remove()
        bar.close()
    result = ReviewResult(run.folder, out, out / "review.md", best, reasons, alarm, evidence, signals, judged,
                          attention=maps)
    result.seconds = time.perf_counter() - t0
    write_review(result, run, drawn, shown, controls, prompts_source=source, triggers=triggers,
                 model_path=model_path, train_paths=train_paths, judge=judge, weights=opts.weights)
    log.info("review: %s (epoch %d recommended%s) in %.0f s", result.report, best,
             ", overfitting alarm" if alarm else "", result.seconds)
    return result


def _trigger_maps(sm, prompts: Sequence, triggers: list[str], path: Path, seed: int):
    """The DAAM maps (`review.attention`) of the trigger words in the first prompt that has one, drawn with the
    recommended epoch's file; None when no prompt has a trigger word or the prompt is too long to map."""
    from loralab.analyze.attention import prompt_tags
    from loralab.review.attention import draw_with_maps

    for p in prompts:
        words = [t for t in triggers if t in prompt_tags(p.prompt)]
        if words:
            sm.apply(path, 1.0)
            try:
                return p, draw_with_maps(sm, p, words, seed=seed)
            except LoralabError as e:
                log.warning("review: no attention maps: %s", e)
                return None
            finally:
                sm.remove()
    return None


def _controls(prompts: Sequence, triggers: list[str]) -> list:
    """Each prompt with its trigger words removed, and each prompt that has none (see `prompts.py`)."""
    from dataclasses import replace

    from loralab.review.prompts import without_triggers

    out = []
    for p in prompts:
        text = without_triggers(p.prompt, triggers)
        out.append(p if text is None else replace(p, prompt=text))
    return out


def _model_path(run, opts: ReviewOptions) -> str:
    path = opts.model or run.config.get("pretrained_model_name_or_path") or ""
    if not path:
        raise LoralabError(f"{run.folder}: the log does not name the base model (a run from before loralab "
                           "logged its config): pass --model with the model it was trained on")
    if not Path(path).exists():
        raise LoralabError(f"base model {path} not found{'' if opts.model else ' (the path the run was trained with)'}"
                           ": pass --model with its current location")
    return str(path)


def _check_fit(sm, files: dict[int, Path], meta: dict[str, str]) -> None:
    """Every epoch file must load onto the base model; a mismatch names the file's and the model's kind."""
    family = sm.model.family
    version = meta.get("ss_base_model_version", "")
    path = files[min(files)]  # all epochs of a run share their modules: the first file is the check
    try:
        sm.apply(path, 0.0)
    except LoralabError as err:
        trained = f" (its metadata says it was trained on {version}, {meta.get('ss_sd_model_name', '?')})" if version else ""
        raise LoralabError(f"{path.name}{trained} does not fit the base model {sm.model_path} ({family}): "
                           f"pass --model with the model it was trained on. Details: {err}") from None
    finally:
        sm.remove()
    want = meta.get("ss_new_sd_model_hash")
    if want and sm.model.model_hash and want != sm.model.model_hash:
        log.warning("the run was trained on %s (hash %s); this base model's hash is %s: images may differ from "
                    "what the run saw", meta.get("ss_sd_model_name", "?"), want[:10], sm.model.model_hash[:10])


def _check_out(out: Path, folder: Path) -> None:
    """Refuse an output path that cannot hold the review before any work; the folder is made when writing."""
    import os

    if out.exists() and not out.is_dir():
        raise LoralabError(f"--out {out} is a file: give a folder for the review")
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK):
        raise LoralabError(f"cannot write the review to {out}: {parent} is not writable")


def _add_losses(run, signals: dict) -> None:
    losses, val, steps = run.epoch_losses(), run.validation_losses(), run.epoch_steps()
    ef = {e.epoch: e for e in run.epochs}
    for e, s in signals.items():
        s.train_loss, s.val_loss = losses.get(e), val.get(e)
        s.steps = ef[e].steps if e in ef and ef[e].steps is not None else steps.get(e, 0 if e == 0 else None)


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="review", unit="row", dynamic_ncols=True)


def _tick(bar, text: str, n: int = 1) -> None:
    bar.set_postfix_str(text)
    bar.update(n)


def result_json(result: ReviewResult) -> dict[str, Any]:
    return {"folder": str(result.folder), "recommended_epoch": result.recommended, "reasons": result.reasons,
            "overfitting_alarm": result.alarm, "evidence": result.evidence,
            "epochs": {str(e): asdict(s) for e, s in sorted(result.signals.items())},
            "judged": {str(e): v for e, v in sorted(result.judged.items())}, "seconds": round(result.seconds, 2)}


def write_json(result: ReviewResult) -> Path:
    from loralab.io import atomic_write

    path = result.out / "review.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result_json(result), indent=1), encoding="utf-8"))
    return path
