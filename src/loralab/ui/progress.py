"""What a job page shows, read from disk each time: the run's `train_log.jsonl` (`train.logs.read_train_log`),
its sample images, the job's output (progress bar, errors) and its review. Nothing is kept in memory, so
a page reload or an app restart loses nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from loralab.train.logs import LOG_FILE_NAME, latest, read_train_log
from loralab.ui.jobs import Job, resume_state

TQDM = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")
SAMPLE = re.compile(r"^_(e?)(\d{6})_\d{2}_")


def log_tail(path: Path, chars: int = 6000) -> str:
    """The end of a job's output as a terminal shows it (a progress bar's \\r rewrites keep the last)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 4 * chars))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [ln.rsplit("\r", 1)[-1] if ln.rstrip("\r") else ln for ln in text.split("\n")]
    return "\n".join(lines)[-chars:]


def bar(text: str) -> dict[str, Any]:
    """Steps done, total and the remaining time of the last tqdm bar in the output."""
    found = TQDM.findall(text)
    if not found:
        return {}
    done, total, elapsed, eta = found[-1]
    return {"done": int(done), "total": int(total), "elapsed": elapsed, "eta": eta}


def chart_data(records: list[dict]) -> dict[str, Any]:
    """uPlot's columns: steps; loss, moving average and validation loss (null where none) per step; the
    learning rates per step."""
    steps = [r for r in latest(records, "step") if "loss/current" in r]
    xs = [r["step"] for r in steps]
    val: dict[int, float] = {}
    for r in records:
        for tag in ("loss/validation/epoch_average", "loss/validation/step_average"):
            if tag in r and r.get("step") is not None:
                val[int(r["step"])] = r[tag]
    lr_keys = sorted({k for r in steps for k in r if k.startswith("lr/")})
    return {
        "loss": [xs, [r["loss/current"] for r in steps], [r["loss/average"] for r in steps],
                 [val.get(x) for x in xs]],
        "lr_names": lr_keys,
        "lr": [xs, *[[r.get(k) for r in steps] for k in lr_keys]],
        "epochs": [[r["epoch"], r.get("loss/epoch_average")] for r in latest(records, "epoch", "epoch")],
    }


def samples(out_dir: Path, name: str) -> list[dict[str, Any]]:
    """Sample images of the run `name` in `<out_dir>/sample/`, grouped by epoch (or step), in order."""
    groups: dict[tuple[str, int], list[str]] = {}
    folder = out_dir / "sample"
    if not folder.is_dir():
        return []
    for p in sorted(folder.glob(f"{name}_*.png")):
        m = SAMPLE.match(p.name[len(name):])
        if not m:
            continue
        groups.setdefault(("epoch" if m.group(1) else "step", int(m.group(2))), []).append(f"sample/{p.name}")
    return [{"label": f"{kind} {n}", "files": files} for (kind, n), files in sorted(groups.items(), key=lambda kv: kv[0][1])]


def doctor_facts(out_dir: Path) -> dict[str, Any] | None:
    """The findings of `loralab doctor` on a run (`doctor/doctor.json`, ranked, most important first), if any."""
    path = out_dir / "doctor" / "doctor.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def review_facts(out_dir: Path) -> dict[str, Any] | None:
    """The review of a run (`loralab review` writes `review/review.json`, `review.md` and PNGs), if any."""
    folder = out_dir / "review"
    if not (folder / "review.json").is_file():
        return None
    try:
        data = json.loads((folder / "review.json").read_text())
    except (OSError, ValueError):
        return None
    return {"data": data, "images": [f"review/{p.name}" for p in sorted(folder.glob("*.png"))],
            "markdown": (folder / "review.md").read_text(encoding="utf-8") if (folder / "review.md").is_file() else ""}


def job_progress(job: Job, job_dir: Path) -> dict[str, Any]:
    """Everything the job page polls, as JSON."""
    out_dir = Path(job.output_dir)
    tail = log_tail(job_dir / "job.log")
    info: dict[str, Any] = {"id": job.id, "status": job.status, "error": job.error, "log": tail, "bar": bar(tail),
                            "kind": job.kind, "name": job.name, "device": job.device}
    records = []
    if job.kind == "train" and (out_dir / LOG_FILE_NAME).is_file():
        records = read_train_log(out_dir)
    steps = [r for r in records if r.get("kind") == "step"]
    info["step"] = steps[-1]["step"] if steps else 0
    info["epoch"] = steps[-1]["epoch"] if steps else 0
    info["loss"] = steps[-1].get("loss/average") if steps else None
    info["chart"] = chart_data(records)
    info["samples"] = samples(out_dir, job.name) if job.kind == "train" else []
    info["images"] = sorted(p.name for p in out_dir.glob("*.png")) if job.kind == "generate" else []
    state = resume_state(job) if job.status in ("cancelled", "failed") else None
    info["resume_state"] = str(state) if state else ""
    info["review"] = review_facts(out_dir) is not None if job.kind == "train" else False
    return info
