"""What a training output folder holds, read back for `loralab review`: the log, the config, the epoch files.

    run = read_run(Path("output"))            # RunFolder: losses per step and epoch, files per epoch
    run.epochs                                # [EpochFile(epoch=1, path=..., steps=75), ...]

Rules:
- the log is `train_log.jsonl` (`train/logs.py`); a resumed run appends, so every series keeps the
  last record per step (per epoch for epoch records, `logs.latest`): what the finished run stands on.
- the config is the one the run logged with its `start` / `resumed` event (the last one); a log from
  before that event has none, and `--model` must name the base model. Several output_names in one folder
  share its log: only the segments (from one start/resumed event to the next) of the reviewed run count.
- the epoch files are `<output_name>-NNNNNN.safetensors` and the final `<output_name>.safetensors`, their
  epoch read from the file's own metadata (`ss_epoch`, `ss_steps`), so renamed numbering cannot mislead.
  Step saves (`-stepNNNNNNNN`) are not epochs. A file that cannot be read (truncated, not safetensors) is
  skipped and named in `problems`; an epoch the log finished without a file is named too.
- local minima of a series (`local_minima`): a value below its left neighbour and not above its right
  one (the first value: below the second; the last: below the one before it).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralab.errors import LoralabError
from loralab.train.logs import latest

log = logging.getLogger(__name__)

LOG_NAME = "train_log.jsonl"
_EPOCH_FILE = re.compile(r"(?P<name>.+)-(?P<num>\d{6})\.safetensors")


@dataclass
class EpochFile:
    epoch: int
    path: Path
    steps: int | None
    metadata: dict[str, str]


@dataclass
class RunFolder:
    folder: Path
    records: list[dict[str, Any]]
    config: dict[str, Any]
    output_name: str
    epochs: list[EpochFile]
    problems: list[str] = field(default_factory=list)

    # ---- series from the log (last record per step / epoch)
    def steps(self) -> list[dict[str, Any]]:
        return latest(self.records, "step", "step")

    def epoch_losses(self) -> dict[int, float]:
        return {r["epoch"]: r["loss/epoch_average"] for r in latest(self.records, "epoch", "epoch")
                if "loss/epoch_average" in r}

    def validation_losses(self) -> dict[int, float]:
        """Validation loss per epoch (loss/validation/epoch_average, logged at epoch ends)."""
        out = {}
        for r in latest([r for r in self.records if "loss/validation/epoch_average" in r], "validation", "epoch"):
            out[r["epoch"]] = r["loss/validation/epoch_average"]
        return out

    def epoch_steps(self) -> dict[int, int]:
        return {r["epoch"]: r["step"] for r in latest(self.records, "epoch", "epoch")}

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == "event" and r.get("event") == name]

    @property
    def finished(self) -> bool:
        return bool(self.events("done")) and not self.events("stopped")

    def max_norm_stats(self) -> dict[str, float] | None:
        """Over all steps of a run with scale_weight_norms: steps with keys scaled, the mean and largest
        number of keys scaled per step, the mean key norm and the largest key norm; None without it."""
        rows = [r for r in self.steps() if "max_norm/keys_scaled" in r]
        if not rows:
            return None
        scaled = [r["max_norm/keys_scaled"] for r in rows]
        return {"steps": len(rows), "steps_with_keys_scaled": sum(1 for k in scaled if k > 0),
                "mean_keys_scaled": sum(scaled) / len(rows), "max_keys_scaled": max(scaled),
                "mean_key_norm": sum(r["norm/avg_key_norm"] for r in rows) / len(rows),
                "max_key_norm": max(r["max_norm/max_key_norm"] for r in rows),
                "last_mean_key_norm": rows[-1]["norm/avg_key_norm"]}


def local_minima(values: dict[int, float]) -> list[int]:
    """Keys (e.g. epochs) whose value is a local minimum of the series (see the module docstring)."""
    keys = sorted(values)
    v = [values[k] for k in keys]
    out = []
    for i, k in enumerate(keys):
        if len(v) < 2:
            break
        if i == 0:
            is_min = v[0] < v[1]
        elif i == len(v) - 1:
            is_min = v[i] < v[i - 1]
        else:
            is_min = v[i] < v[i - 1] and v[i] <= v[i + 1]
        if is_min:
            out.append(k)
    return out


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata; LoralabError when the file is not a complete safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            if keys:  # the last tensor's bytes must be there: a truncated file fails here
                f.get_slice(keys[-1])[...]
    except Exception as e:  # safetensors raises several types for a damaged file
        raise LoralabError(f"{path.name} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                           "it is truncated or not a safetensors file") from None
    return dict(meta)


def read_log(folder: Path) -> list[dict[str, Any]]:
    from loralab.train.logs import read_train_log

    path = folder / LOG_NAME
    if not folder.is_dir():
        raise LoralabError(f"{folder} is not a folder: give the output_dir of a training run")
    if not path.is_file():
        raise LoralabError(f"{folder} has no {LOG_NAME}: it is not the output folder of a loralab training run "
                           "(or the run stopped before its first step)")
    records = read_train_log(path)
    if not any(r.get("kind") == "step" for r in records):
        raise LoralabError(f"{path} has no training steps: the run stopped before its first step")
    return records


def read_run(folder: str | Path, output_name: str = "") -> RunFolder:
    """The run in `folder` (see the module docstring); `output_name` picks one when the folder holds
    several runs' files."""
    folder = Path(folder)
    records = read_log(folder)
    segments = log_segments(records)
    named = [n for n, _ in segments if n]
    name = output_name or (named[-1] if named else "") or _only_name(folder)
    if any(n == name for n, _ in segments):
        records = [r for n, seg in segments if n == name for r in seg]
    elif named:
        raise LoralabError(f"{folder / LOG_NAME} holds no run named {name!r} (it has: {', '.join(dict.fromkeys(named))})")
    starts = [r for r in records if r.get("kind") == "event" and r.get("event") in ("start", "resumed")]
    config = dict(starts[-1].get("config") or {}) if starts else {}
    epochs, problems = _epoch_files(folder, name)
    finished = {r["epoch"] for r in records if r.get("kind") == "epoch"}
    removed = removed_epochs(records, name)
    missing = sorted(finished - {e.epoch for e in epochs} - set(removed))
    if removed:
        problems.append(f"epoch{'s' if len(removed) > 1 else ''} {', '.join(map(str, sorted(removed)))} "
                        f"{'were' if len(removed) > 1 else 'was'} removed during training by "
                        f"{', '.join(sorted(set(removed.values())))} (the log records it): not reviewed")
    if missing:
        problems.append(f"epoch{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} "
                        f"finished in the log but {'have' if len(missing) > 1 else 'has'} no readable file "
                        f"`{name}-NNNNNN.safetensors` (not saved: save_every_n_epochs, or deleted)")
    if not epochs:
        raise LoralabError(f"{folder}: no readable LoRA file of run {name!r} ({name}-NNNNNN.safetensors or "
                           f"{name}.safetensors){': ' + '; '.join(problems) if problems else ''}")
    return RunFolder(folder, records, config, name, epochs, problems)


def log_segments(records: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The log cut at each `start` / `resumed` event, with the output_name that event's config names:
    runs of several output_names in one output_dir share one train_log.jsonl, and each reader takes its
    own run's segments. Records before the first such event (a log from before the event existed) form a
    segment named ""."""
    out: list[tuple[str, list[dict[str, Any]]]] = [("", [])]
    for r in records:
        if r.get("kind") == "event" and r.get("event") in ("start", "resumed"):
            out.append((str((r.get("config") or {}).get("output_name") or ""), []))
        out[-1][1].append(r)
    return [(n, seg) for n, seg in out if seg]


def _only_name(folder: Path) -> str:
    names = sorted({m.group("name") for p in folder.glob("*.safetensors") if (m := _EPOCH_FILE.fullmatch(p.name))}
                   | {p.stem for p in folder.glob("*.safetensors") if not _EPOCH_FILE.fullmatch(p.name)
                      and "-step" not in p.stem})
    if len(names) > 1:
        raise LoralabError(f"{folder} holds the files of several runs ({', '.join(names)}) and its log does not "
                           "say which one it belongs to: pass --name")
    if not names:
        raise LoralabError(f"{folder}: no LoRA files (*.safetensors)")
    return names[0]


def _epoch_files(folder: Path, name: str) -> tuple[list[EpochFile], list[str]]:
    """Readable epoch files of run `name`, one per epoch (the one with more steps if two claim it)."""
    paths = [p for p in folder.glob(f"{glob_escape(name)}*.safetensors")
             if p.name == f"{name}.safetensors" or ((m := _EPOCH_FILE.fullmatch(p.name)) and m.group("name") == name)]
    by_epoch: dict[int, EpochFile] = {}
    problems = []
    for p in sorted(paths):
        try:
            meta = read_metadata(p)
        except LoralabError as e:
            problems.append(str(e))
            continue
        m = _EPOCH_FILE.fullmatch(p.name)
        epoch = int(meta.get("ss_epoch") or (m.group("num") if m else 0))
        if epoch <= 0:
            problems.append(f"{p.name} has no epoch (ss_epoch) in its metadata: skipped")
            continue
        steps = int(meta["ss_steps"]) if str(meta.get("ss_steps", "")).isdigit() else None
        ef = EpochFile(epoch, p, steps, meta)
        if epoch not in by_epoch or (steps or 0) > (by_epoch[epoch].steps or 0):
            by_epoch[epoch] = ef
    return [by_epoch[e] for e in sorted(by_epoch)], problems


def removed_epochs(records: list[dict[str, Any]], name: str) -> dict[int, str]:
    """{epoch: rule} of the epoch files of run `name` that training removed (save_last_n_epochs: the log's
    "removed" events name the file and the rule)."""
    out = {}
    for r in records:
        if r.get("kind") == "event" and r.get("event") == "removed":
            m = _EPOCH_FILE.fullmatch(Path(str(r.get("path", ""))).name)
            if m and m.group("name") == name:
                out[int(m.group("num"))] = str(r.get("rule", "save_last_n_epochs"))
    return out


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)
