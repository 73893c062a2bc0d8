"""`loralab doctor OUTPUT_DIR`: what is wrong with a training run, most important first, each with the
measurement behind it and the guide's fix.

    d = doctor(DoctorOptions("output"))       # writes output/doctor/doctor.md and doctor.json
    d.findings[0].title, d.findings[0].fix

It reads the run (its log and the config the run logged, else `--config` or a single TOML in the folder;
its dataset; its saved epoch files) and runs the measuring commands on it, each in one place of its own:
`dataset check` (analyze/dataset_check.py), `tokens --dataset` (analyze/tokens.py), `review` (review.py: the
recommended epoch and the overfitting alarm; a `review/review.json` newer than the run's files is reused),
`probe` (probe.py: does the base model know each activation tag?) and `bleed` (bleed.py: when two concepts
share a token piece), and the guide's warnings about settings (train/guide.py). `--no-images` skips the
three that draw images (review, probe, bleed); the review's epoch then comes from the losses alone.

Ranks (the report's order; within a rank, the larger measured problem first):
0 the run is broken: the loss became NaN or infinite, the loss exploded (last epoch's mean loss at least
  EXPLODED (3×) its lowest epoch mean), an epoch file cannot be read; dataset errors (unreadable images).
1 captions: a concept whose activation tag is missing from at least MISSING_TAG_SHARE (10 %) of its captions
  (those images teach the concept without its tag: the tag ends up weak and the concept leaks into every prompt).
2 concepts out of balance: activation tags that share a CLIP piece, with images × repeats differing by
  `bleed.BALANCED_RATIO` (1.5×) or more (the dominant concept bleeds through the shared piece); the bleeding
  `bleed` measured, when it ran.
3 the run trained past its best epoch: the recommended epoch is earlier than the last and the overfitting
  alarm fired, or it is PAST_BEST (2) or more epochs earlier.
4 settings the guide warns about (train/guide.py), more than 5 repeats, an activation tag not first in its
  captions, max-norm capping on most steps, a run that stopped before its last epoch.
5 a tag the base model already knows (probe: training modifies an existing concept).
6 other dataset warnings, counted by kind.
No finding of rank 0-4 is an answer too: "nothing to fix; epoch N".

What could not be checked (no log, no config, no base model, no dataset) is listed in the report, and the
rest is checked anyway.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loralab.errors import LoralabError

log = logging.getLogger(__name__)

EXPLODED = 3.0
MISSING_TAG_SHARE = 0.10
PAST_BEST = 2
NORM_CAPPED_SHARE = 0.5
PROBE_TAGS = 3  # at most this many activation tags are probed


@dataclass
class Finding:
    rank: int
    title: str
    measured: list[str]
    fix: str
    source: str  # the command that measured it
    size: float = 0.0  # orders findings of one rank (larger first)


@dataclass
class DoctorOptions:
    folder: str
    model: str = ""  # base model; default: the run's pretrained_model_name_or_path
    config: str = ""  # a TOML config, when the log has none
    dataset: str = ""  # train_data_dir, instead of the config's
    name: str = ""  # output_name, when the folder holds several runs
    out: str = ""  # default: <folder>/doctor
    images: bool = True  # review, probe and bleed (they draw images with the base model)
    device: str = ""
    seeds: int = 4  # probe and bleed


@dataclass
class Diagnosis:
    folder: Path
    out: Path
    findings: list[Finding]
    unchecked: list[str]
    checked: list[str]
    epoch: int | None = None  # the recommended epoch
    epoch_file: str | None = None
    answer: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def report(self) -> Path:
        return self.out / "doctor.md"


# ------------------------------------------------------------------------------------------- the run
def _config_values(opts: DoctorOptions, run, unchecked: list[str]) -> dict[str, Any]:
    """The run's config: the one it logged, else --config, else the single TOML in the folder."""
    if run is not None and run.config:
        return dict(run.config)
    path = Path(opts.config) if opts.config else None
    if path is None:
        tomls = sorted(Path(opts.folder).glob("*.toml"))
        path = tomls[0] if len(tomls) == 1 else None
    if path is None:
        unchecked.append("the settings: no config (the log has none and the folder holds no single .toml; "
                         "give --config FILE)")
        return {}
    import tomllib

    try:
        from loralab.config.build import _flatten

        return dict(_flatten(tomllib.loads(path.read_text(encoding="utf-8")), str(path)))
    except (OSError, tomllib.TOMLDecodeError) as e:
        unchecked.append(f"the settings: {path} cannot be read ({e})")
        return {}


def log_findings(run) -> list[Finding]:
    """NaN / infinite or exploded loss, unreadable epoch files, max-norm capping, an unfinished run."""
    out = []
    nan = run.events("nan")
    bad = [r for r in run.steps() if not math.isfinite(float(r.get("loss/current", 0.0)))]
    if nan or bad:
        where = nan[0] if nan else bad[0]
        out.append(Finding(0, f"the loss became NaN at step {where.get('step')} (epoch {where.get('epoch')})",
                           [f"{len(nan)} NaN event(s) and {len(bad)} non-finite step loss(es) in the log"],
                           "lower the learning rate (or use an adaptive optimizer at lr 1), train in bf16 or fp32 "
                           "instead of fp16 (mixed_precision), keep max_grad_norm = 1; resume from the last saved "
                           "state", "the training log", 1e9))
    losses = {e: v for e, v in run.epoch_losses().items() if math.isfinite(v)}
    if len(losses) >= 2:
        lo_e = min(losses, key=losses.get)
        last = max(losses)
        if lo_e < last and losses[last] >= EXPLODED * losses[lo_e]:
            out.append(Finding(0, "the loss exploded", [
                f"epoch-mean loss {losses[lo_e]:.4f} at epoch {lo_e}, {losses[last]:.4f} at epoch {last} "
                f"(×{losses[last] / losses[lo_e]:.1f}; exploded at ×{EXPLODED:g})"],
                f"lower the learning rate; use the epoch {lo_e} file", "the training log",
                losses[last] / losses[lo_e]))
    for p in run.problems:
        out.append(Finding(0, "a saved file cannot be used", [p], "retrain or resume to write it again",
                           "the run folder", 1.0))
    stats = run.max_norm_stats()
    if stats and stats["steps_with_keys_scaled"] >= NORM_CAPPED_SHARE * stats["steps"]:
        share = stats["steps_with_keys_scaled"] / stats["steps"]
        out.append(Finding(4, "max-norm capped the LoRA on most steps", [
            f"keys scaled on {stats['steps_with_keys_scaled']} of {stats['steps']} steps ({share:.0%}); largest key "
            f"norm {stats['max_key_norm']:.3f}"],
            "the weights keep growing against scale_weight_norms: lower the learning rate or train fewer steps",
            "the training log", share))
    want = int(run.config.get("max_train_epochs") or 0)
    done = max(run.epoch_losses(), default=0)
    if run.events("stopped") or (want and done and done < want):
        out.append(Finding(4, "the run stopped before its last epoch",
                           [f"{done} of {want or '?'} epochs in the log"],
                           "resume it (resume = the last state folder) or judge it as it is", "the training log", 1.0))
    return out


# ------------------------------------------------------------------------------------------- the dataset
def dataset_findings(report, ds) -> list[Finding]:
    """`dataset check`'s problems: errors, missing activation tags, warnings by kind."""
    out = []
    per_concept: dict[str, list] = defaultdict(list)
    by_code: dict[tuple[str, str], list] = defaultdict(list)
    for p in report.problems:
        if p.code == "activation_missing":
            per_concept[p.concept or "?"].append(p)
        else:
            by_code[(p.level, p.code)].append(p)
    images = {c.name: c for c in report.concepts}
    for concept, probs in per_concept.items():
        n = images[concept].images if concept in images else len(probs)
        share = len(probs) / max(n, 1)
        tag = images[concept].activation_tag if concept in images else "?"
        if share < MISSING_TAG_SHARE:
            by_code[("warning", "activation_missing")].extend(probs)
            continue
        files = ", ".join(Path(p.file).name for p in probs[:6]) + (" ..." if len(probs) > 6 else "")
        out.append(Finding(1, f"captions lack the activation tag {tag!r} on {len(probs)} of {n} images of {concept}",
                           [f"{share:.0%} of the concept's captions ({files}) do not hold {tag!r}: those images teach "
                            "the concept without its tag"],
                           f"fix those captions: `loralab dataset edit {report.train_data_dir} --concept {concept} "
                           f"--add {tag!r} --position 0` adds it first where it is missing", "dataset check", share))
    for (level, code), probs in by_code.items():
        rank = 0 if level == "error" else 4 if code in ("too_many_repeats", "activation_not_first") else 6
        if level == "info":
            continue
        example = probs[0].message
        out.append(Finding(rank, f"{code.replace('_', ' ')}: {len(probs)} finding(s)",
                           [f"{Path(probs[0].file).name if probs[0].file else 'dataset'}: {example}"],
                           "see the message; `loralab dataset check` lists every file", "dataset check",
                           float(len(probs))))
    return out


def balance_findings(tokens, ds) -> list[Finding]:
    """Concepts whose activation tags share CLIP pieces, out of balance by images × repeats."""
    from loralab.review.bleed import BALANCED_RATIO

    out = []
    folders = {s.name: s for s in ds.train_subsets}  # the groups name concepts by their folder
    for g in tokens.groups:
        if g.current_ratio < BALANCED_RATIO or g.suggested_ratio >= g.current_ratio:
            continue
        now = ", ".join(f"{c} {n} images × {r}" for c, n, r in zip(g.concepts, g.images, g.current_repeats))
        renames = [f"{c}/ -> {s}_{folders[c].class_tokens}/"
                   for c, r, s in zip(g.concepts, g.current_repeats, g.suggested_repeats) if r != s]
        values = [n * r for n, r in zip(g.images, g.current_repeats)]
        top = g.concepts[values.index(max(values))]
        others = [c for c in g.concepts if c != top]
        out.append(Finding(2, f"{top} dominates {' and '.join(others)}: their tags share a token piece",
                           [f"shared CLIP pieces {', '.join(repr(t) for t in g.tokens)}; images × repeats: {now} "
                            f"({g.current_ratio:.1f}:1, balanced below {BALANCED_RATIO}:1)"],
                           "balance the repeats: " + ", ".join(
                               f"{c} {r} -> {s}" for c, r, s in zip(g.concepts, g.current_repeats, g.suggested_repeats))
                           + f" (images × repeats {g.suggested_ratio:.1f}:1): rename " + ", ".join(renames)
                           + "; or give each concept a tag that shares no piece", "tokens --dataset",
                           g.current_ratio))
    return out


# ------------------------------------------------------------------------------------------- the epochs
def epoch_finding(run, best: int, reasons: list[str], alarm: bool, evidence: list[str], source: str) -> list[Finding]:
    last = max(e.epoch for e in run.epochs)
    if best >= last or not (alarm or last - best >= PAST_BEST):
        return []
    path = next(e.path for e in run.epochs if e.epoch == best)
    return [Finding(3, f"the run trained past its best epoch: use epoch {best} of {last}",
                    [*reasons, *evidence],
                    f"use epoch {best} ({path.name}); next time train max_train_epochs = {best} (or lower the "
                    "learning rate) and keep save_every_n_epochs = 1 to compare", source, float(last - best))]


def loss_only_pick(run) -> tuple[int, list[str], bool, list[str]]:
    """The review's rule on the losses alone (no images): `recommend.loss_pick` and the validation part of the alarm."""
    from loralab.review.recommend import loss_pick, overfit_alarm
    from loralab.review.review import _add_losses
    from loralab.review.signals import EpochSignals

    signals = {0: EpochSignals(0), **{e.epoch: EpochSignals(e.epoch) for e in run.epochs}}
    _add_losses(run, signals)
    best, reasons = loss_pick(signals)  # one of the signals' epochs: the run's epoch files
    alarm, evidence = overfit_alarm(signals, best)
    return best, reasons, alarm, evidence


def reusable_review(run) -> dict | None:
    """`review/review.json` when it is newer than the log and every epoch file."""
    path = run.folder / "review" / "review.json"
    if not path.is_file():
        return None
    newest = max([(run.folder / "train_log.jsonl").stat().st_mtime] + [e.path.stat().st_mtime for e in run.epochs])
    if path.stat().st_mtime < newest:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------- the doctor
def doctor(opts: DoctorOptions, judge=None, shape_reader: Callable | None = None,
           progress: Callable[[str], None] = lambda s: None) -> Diagnosis:
    """What `loralab doctor` runs (see the module docstring). `judge` (review.Judge) and `shape_reader`
    (images -> what each shows) are the lab evaluator on a lab-model run; they add ground truth to the
    review's and the bleeding's reports and never change a finding's rank."""
    from loralab.review.runlog import read_run

    folder = Path(opts.folder)
    if not folder.is_dir():
        raise LoralabError(f"{folder} is not a folder: give the output_dir of a training run")
    out = Path(opts.out) if opts.out else folder / "doctor"
    findings: list[Finding] = []
    unchecked: list[str] = []
    checked: list[str] = []
    try:
        run = read_run(folder, opts.name)
    except LoralabError as e:
        run = None
        unchecked.append(f"the training (losses, NaN, epochs, overfitting, bleeding): {e}")
    values = _config_values(opts, run, unchecked)
    if run is not None:
        findings += log_findings(run)
        checked.append(f"the training log ({len(run.steps())} steps, {len(run.epochs)} epoch files)")
    cfg = _settings(values, findings, unchecked, checked)
    ds, tokens = _dataset(opts, values, cfg, findings, unchecked, checked, progress)
    model = opts.model or str(values.get("pretrained_model_name_or_path") or "")
    can_draw = opts.images and model and Path(model).exists()
    if opts.images and not can_draw:
        unchecked.append(f"the images (review, probe, bleeding): base model {model or '(none named)'} not found; "
                         "give --model")
    if not opts.images:
        unchecked.append("the images (review, probe, bleeding): --no-images")
    diag = Diagnosis(folder, out, findings, unchecked, checked)
    if run is not None and run.epochs:
        _epochs(diag, run, opts, model if can_draw else "", judge, progress)
    if can_draw and ds is not None:
        from loralab.review.doctor_images import bleed_findings, probe_findings

        findings += probe_findings(model, ds, values, opts, out, checked, progress, diag.extra)
        if run is not None and run.epochs and diag.epoch_file:
            findings += bleed_findings(model, Path(diag.epoch_file), ds, tokens, values, opts, out, checked,
                                       shape_reader, progress, diag.extra)
    findings.sort(key=lambda f: (f.rank, -f.size))
    serious = [f for f in findings if f.rank <= 4]
    epoch_text = f"epoch {diag.epoch} ({Path(diag.epoch_file).name})" if diag.epoch else "no epoch file to recommend"
    diag.answer = (f"{len(serious)} problem(s) to fix; the first: {serious[0].title}" if serious
                   else f"nothing to fix; {epoch_text}")
    from loralab.review.doctor_report import write_diagnosis

    write_diagnosis(diag)
    return diag


def _settings(values: dict, findings: list[Finding], unchecked: list[str], checked: list[str]) -> Any:
    """The guide's warnings on the run's settings; returns the validated TrainConfig (None when it does not validate)."""
    if not values:
        return None
    from loralab.config import build_config
    from loralab.train.guide import guide_warnings

    known = {k: v for k, v in values.items() if k not in ("config_file",)}
    try:
        cfg = build_config(None, known)
    except LoralabError as e:  # e.g. a path that moved since: the warnings still read the values as given
        from loralab.config import TrainConfig
        from loralab.config.build import _fields, config_values

        unchecked.append(f"the config as a whole: it does not validate now ({str(e).splitlines()[0]})")
        kwargs, problems = config_values({k: (v, "config") for k, v in known.items()}, _fields(TrainConfig), None)
        try:
            cfg = TrainConfig(**kwargs)
        except (TypeError, ValueError):
            return None
    for w in guide_warnings(cfg):
        findings.append(Finding(4, w.split(":")[0], [w], w.rsplit(". ", 1)[-1], "the guide's warnings", 1.0))
    checked.append("the settings (the guide's warnings)")
    return cfg


def _dataset(opts: DoctorOptions, values: dict, cfg, findings: list[Finding], unchecked: list[str], checked: list[str],
             progress) -> Any:
    from loralab.analyze.check_report import BucketSettings
    from loralab.analyze.dataset_check import check_scanned
    from loralab.analyze.scan import scan_dataset
    from loralab.analyze.tokens import dataset_tokens

    train_dir = opts.dataset or str(values.get("train_data_dir") or "")
    if not train_dir or not Path(train_dir).is_dir():
        unchecked.append(f"the dataset: {'no train_data_dir in the config' if not train_dir else train_dir + ' not found'}"
                         " (give --dataset DIR)")
        return None, None
    progress("dataset check")
    reg = str(values.get("reg_data_dir") or "") if not opts.dataset else ""
    ext = str(values.get("caption_extension") or ".txt")
    ds = scan_dataset(train_dir, reg if reg and Path(reg).is_dir() else None, caption_extension=ext)
    settings = (BucketSettings(**cfg.bucket_options(), batch_size=cfg.train_batch_size) if cfg is not None
                else BucketSettings())
    report = check_scanned(ds, settings, progress=False)
    findings += dataset_findings(report, ds)
    tokens = dataset_tokens(None, dataset=ds)
    findings += balance_findings(tokens, ds)
    checked.append(f"the dataset {train_dir} ({len(ds.images)} images; dataset check and shared tokens)")
    return ds, tokens


def _epochs(diag: Diagnosis, run, opts: DoctorOptions, model: str, judge, progress) -> None:
    """The recommended epoch: the review's (reused or run), else the losses' alone."""
    review = reusable_review(run) if model else None
    if review is not None:
        best, reasons = review["recommended_epoch"], review["reasons"]
        alarm, evidence = review["overfitting_alarm"], review["evidence"]
        source = "review (review/review.json)"
        diag.extra.setdefault("drew", []).append("review")
        diag.checked.append("the epochs (the review in review/review.json)")
    elif model:
        from loralab.review.review import ReviewOptions, review_run

        progress("review")
        r = review_run(run.folder, ReviewOptions(model=opts.model, name=opts.name, device=opts.device), judge=judge)
        best, reasons, alarm, evidence = r.recommended, r.reasons, r.alarm, r.evidence
        source = "review"
        diag.extra.setdefault("drew", []).append("review")
        diag.checked.append(f"the epochs (review: {r.report})")
    else:
        best, reasons, alarm, evidence = loss_only_pick(run)
        source = "the losses of the log (review's rule without images)"
        diag.checked.append("the epochs (the losses only)")
    diag.epoch = best
    diag.epoch_file = str(next(e.path for e in run.epochs if e.epoch == best))
    diag.findings += epoch_finding(run, best, reasons, alarm, evidence, source)


def diagnosis_json(d: Diagnosis) -> dict[str, Any]:
    return {"folder": str(d.folder), "answer": d.answer, "recommended_epoch": d.epoch, "epoch_file": d.epoch_file,
            "findings": [asdict(f) for f in d.findings], "checked": d.checked, "unchecked": d.unchecked,
            "ranks": dict(Counter(f.rank for f in d.findings)), **d.extra}
