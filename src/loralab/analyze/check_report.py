"""The report of `loralab dataset check`: its problems and summaries (`CheckReport`, `--json`), the bucket
settings it was made with, and its text for the terminal (`render_report`)."""

from __future__ import annotations

import contextlib
import json
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loralab.data.buckets import BucketCandidates, bucket_candidates

LEVELS = ("error", "warning", "info")


@dataclass
class Problem:
    level: str  # "error" | "warning" | "info"
    code: str
    file: str | None  # the file (or folder) it is about; None for the whole dataset
    message: str
    concept: str | None = None
    files: list[str] = field(default_factory=list)  # other files involved (duplicates, a bucket's images)


@dataclass
class ConceptInfo:
    name: str
    kind: str  # "train" | "reg"
    dir: str
    images: int
    repeats: int
    samples_per_epoch: int  # images x repeats (train) or the balanced reg samples in use (reg)
    epoch_share: float  # share of the train samples of an epoch (reg: share of the reg samples)
    activation_tag: str | None
    activation_source: str


@dataclass
class BucketInfo:
    resolution: tuple[int, int]
    images: int
    samples: int
    batches: int
    last_batch: int  # size of the short last batch, 0 when every batch is full


@dataclass
class ImageInfo:
    file: str
    concept: str
    size: tuple[int, int] | None
    bucket: tuple[int, int] | None
    tokens: int | None


def problem(level: str, code: str, file: Path | None, message: str, concept: str | None = None,
            files: Sequence[Path] = ()) -> Problem:
    """A `Problem` about `file` (None: the whole dataset), paths stored as strings."""
    return Problem(level, code, str(file) if file is not None else None, message, concept, [str(f) for f in files])


@dataclass
class BucketSettings:
    """kohya's bucket arguments (same names); `enable_bucket` defaults on here, as in the kohya GUI."""

    resolution: tuple[int, int] = (512, 512)
    batch_size: int = 1
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    def candidates(self) -> BucketCandidates:
        """The buckets an image may land in with these settings (`bucket_candidates`)."""
        return bucket_candidates(self.resolution, enable_bucket=self.enable_bucket,
                                 min_bucket_reso=self.min_bucket_reso, max_bucket_reso=self.max_bucket_reso,
                                 bucket_reso_steps=self.bucket_reso_steps, bucket_no_upscale=self.bucket_no_upscale)


@dataclass
class CheckReport:
    train_data_dir: str
    reg_data_dir: str | None
    settings: BucketSettings
    concepts: list[ConceptInfo]
    buckets: list[BucketInfo]
    images: list[ImageInfo]
    problems: list[Problem]
    steps_per_epoch: int
    num_train_samples: int
    num_reg_samples: int
    suggested_batch_size: int | None

    @property
    def has_errors(self) -> bool:
        return any(p.level == "error" for p in self.problems)

    def counts(self) -> dict[str, int]:
        return {level: sum(p.level == level for p in self.problems) for level in LEVELS}

    def by_code(self, code: str) -> list[Problem]:
        return [p for p in self.problems if p.code == code]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["counts"] = self.counts()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)


# ----------------------------------------------------------------------------------------- terminal


def shell_path(path: Path) -> str:
    """`path` quoted for a POSIX shell: in double quotes, or by `shlex.quote` when it holds a character that
    double quotes do not protect ($ ` \\ " !)."""
    text = str(path)
    return shlex.quote(text) if any(c in text for c in '$`\\"!') else f'"{text}"'


def rel_path(path: Path, roots: Sequence[Path | None]) -> str:
    """`path` relative to the first of `roots` that holds it (None roots skipped), else as given."""
    for root in roots:
        if root is not None:
            with contextlib.suppress(ValueError):
                return str(path.relative_to(root))
    return str(path)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> str:
    """A plain fixed-width table; columns listed in `right` are right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(widths[k]) if k in right else c.ljust(widths[k]) for k, c in enumerate(r)).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def render_report(report: CheckReport, max_per_code: int = 20) -> str:
    """The report as text for the terminal: concepts, buckets, then problems (errors first)."""
    roots = [Path(report.train_data_dir)] + ([Path(report.reg_data_dir)] if report.reg_data_dir else [])
    s = report.settings
    if not s.enable_bucket:
        buckets = "off"
    elif s.bucket_no_upscale:
        buckets = "no upscale"
    else:
        buckets = f"{s.min_bucket_reso}-{s.max_bucket_reso} step {s.bucket_reso_steps}"
    out = [f"dataset {report.train_data_dir}" + (f" (reg {report.reg_data_dir})" if report.reg_data_dir else ""),
           f"resolution {s.resolution[0]}x{s.resolution[1]}, batch size {s.batch_size}, buckets {buckets}", ""]
    rows = [(c.name, c.kind, c.images, c.repeats, c.samples_per_epoch, f"{c.epoch_share:.0%}",
             f"{c.activation_tag} ({c.activation_source})" if c.activation_tag else "-")
            for c in report.concepts]
    out.append(format_table(["concept", "kind", "images", "repeats", "samples/epoch", "share", "activation tag"],
                            rows, right=(2, 3, 4, 5)))
    out.append("")
    brow = [(f"{b.resolution[0]}x{b.resolution[1]}", b.images, b.samples, b.batches,
             f"short batch of {b.last_batch}" if b.last_batch else "") for b in report.buckets]
    out.append(format_table(["bucket", "images", "samples", "batches", ""], brow, right=(1, 2, 3)))
    out.append(f"\nsteps per epoch: {report.steps_per_epoch} (batch size {s.batch_size}, {report.num_train_samples} "
               f"train + {report.num_reg_samples} reg samples)")
    if report.suggested_batch_size:
        out.append(f"batch size {report.suggested_batch_size} would fill every batch")
    counts = report.counts()
    out.append(f"\n{counts['error']} errors, {counts['warning']} warnings, {counts['info']} notes")
    groups: dict[tuple[str, str], list[Problem]] = {}
    for p in report.problems:  # already sorted by level; codes in order of first appearance
        groups.setdefault((p.level, p.code), []).append(p)
    for (level, code), items in groups.items():
        out.append(f"\n{level} {code} ({len(items)})")
        for p in items[:max_per_code]:
            where = rel_path(Path(p.file), roots) if p.file else "dataset"
            if p.code == "partial_batches" and len(p.files) > 1:
                where += f" (+{len(p.files) - 1} more)"
            out.append(f"  {where}: {p.message}")
        if len(items) > max_per_code:
            out.append(f"  ... and {len(items) - max_per_code} more (see --json)")
    return "\n".join(out)
