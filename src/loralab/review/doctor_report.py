"""`doctor.md` and `doctor.json`: the diagnosis of `loralab doctor`, most important first."""

from __future__ import annotations

import json
from pathlib import Path

from loralab.io import atomic_write

RANK_NAMES = {0: "broken", 1: "captions", 2: "balance / bleeding", 3: "epoch", 4: "settings", 5: "known tag",
              6: "dataset notes"}


def render(d) -> str:
    lines = [f"# loralab doctor: {d.folder}", "", f"**{d.answer}**", ""]
    if d.findings:
        lines += ["## Findings, most important first", ""]
        for i, f in enumerate(d.findings, 1):
            lines += [f"### {i}. {f.title}", "", f"- kind: {RANK_NAMES.get(f.rank, f.rank)} (rank {f.rank}); "
                      f"measured by `{f.source}`"]
            lines += [f"- measured: {m}" for m in f.measured]
            lines += [f"- fix: {f.fix}", ""]
    else:
        lines += ["No problem found.", ""]
    if d.epoch:
        lines += [f"Recommended epoch: {d.epoch} (`{Path(d.epoch_file).name}`).", ""]
    pictures = figures(d)
    if pictures:
        lines += ["## Pictures", ""] + [f"![{title}]({rel})" for title, rel in pictures] + [""]
    lines += ["## Checked", ""] + [f"- {c}" for c in d.checked] + [""]
    if d.unchecked:
        lines += ["## Could not check", ""] + [f"- {c}" for c in d.unchecked] + [""]
    return "\n".join(lines)


def figures(d) -> list[tuple[str, str]]:
    """(title, path relative to doctor.md) of the pictures the checks drew: the review's loss graph and grid, the
    bleeding grid and maps, each probe's images."""
    import os

    drew = set(d.extra.get("drew", []))  # only what this diagnosis used, never a picture left by an earlier one
    wanted = []
    if "review" in drew:
        wanted += [("loss graph (review)", d.folder / "review" / "loss.png"),
                   ("base model and every epoch (review)", d.folder / "review" / "grid.png")]
    if "bleed" in drew:
        wanted += [("bleeding probes: without / with the LoRA (bleed)", d.out / "bleed" / "grid.png"),
                   ("where each probe's words act (bleed)", d.out / "bleed" / "maps.png")]
    wanted += [(f"probe of {name}", d.out / "probe" / name / "probe.png") for name in d.extra.get("probed", [])]
    return [(t, Path(os.path.relpath(p, d.out)).as_posix()) for t, p in wanted if p.is_file()]


def write_diagnosis(d) -> None:
    from loralab.review.doctor import diagnosis_json

    d.out.mkdir(parents=True, exist_ok=True)
    text = render(d)
    atomic_write(d.out / "doctor.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    data = json.dumps(diagnosis_json(d), indent=1)
    atomic_write(d.out / "doctor.json", lambda tmp: Path(tmp).write_text(data, encoding="utf-8"))
