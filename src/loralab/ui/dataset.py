"""The dataset page: `loralab dataset check`, `loralab dataset tags` and `loralab tokens --dataset` on the
form's folders, with the form's resolution and bucket keys, each run as the CLI command (in its own process,
the three at once) and shown as the CLI prints it; and the problems of `dataset check --json` (run alongside),
each with the image it is about (a caption's problem shows its image), served from the dataset's folder."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from loralab.data.images import IMAGE_EXTENSIONS


@dataclass
class Report:
    title: str
    command: list[str]
    output: str
    rc: int
    stdout: str = ""


def commands(values: dict[str, str]) -> list[tuple[str, list[str]]]:
    """The three commands for the form's values (train_data_dir, reg_data_dir, the bucket keys)."""
    folder = values["train_data_dir"]
    reg = ["--reg", values["reg_data_dir"]] if values.get("reg_data_dir") else []
    caption = ["--caption-extension", values.get("caption_extension") or ".txt"]
    buckets = ["--resolution", values.get("resolution") or "512",
               "--min-bucket-reso", values.get("min_bucket_reso") or "256",
               "--max-bucket-reso", values.get("max_bucket_reso") or "1024",
               "--bucket-reso-steps", values.get("bucket_reso_steps") or "64"]
    buckets += [] if values.get("enable_bucket") == "true" else ["--no-bucket"]
    buckets += ["--bucket-no-upscale"] if values.get("bucket_no_upscale") == "true" else []
    check = ["dataset", "check", folder, *reg, *buckets, "--batch-size", values.get("train_batch_size") or "1",
             "--max-token-length", values.get("max_token_length") or "75", *caption]
    return [("dataset check: images, captions, buckets", check),
            (JSON_TITLE, [*check, "--json"]),
            ("dataset tags: tag frequency per concept, pruning candidates", ["dataset", "tags", folder, *reg, *caption]),
            ("tokens: the activation tags' CLIP tokens, shared tokens and repeats", ["tokens", "--dataset", folder, *caption])]


JSON_TITLE = "dataset check --json"


@dataclass
class ShownProblem:
    level: str
    code: str
    message: str
    concept: str
    file: str  # as the report names it
    thumb: str = ""  # "<root index>/<path under that root>" of its image, for the app's dataset file route
    others: list[str] = field(default_factory=list)


def image_of(path: Path) -> Path | None:
    """The image a problem's file is about: the file itself, or the image next to a caption (same stem)."""
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return path if path.is_file() else None
    for ext in IMAGE_EXTENSIONS:
        for candidate in (path.with_suffix(ext), path.with_suffix(ext.upper())):
            if candidate.is_file():
                return candidate
    return None


def thumb_of(file: str | None, roots: list[Path]) -> str:
    """`<index>/<relative path>` of the problem file's image under one of `roots` (resolved), else ""."""
    if not file:
        return ""
    image = image_of(Path(file))
    if image is None:
        return ""
    image = image.resolve()
    for i, root in enumerate(roots):
        if image.is_relative_to(root):
            return f"{i}/{image.relative_to(root).as_posix()}"
    return ""


def shown_problems(report: Report | None, roots: list[Path]) -> list[ShownProblem]:
    """The problems of a `dataset check --json` report (errors first, as the report orders them)."""
    if report is None:
        return []
    try:
        data = json.loads(report.stdout)
    except ValueError:  # the command failed: its text report says why
        return []
    problems = data.get("problems", []) if isinstance(data, dict) else []
    order = {"error": 0, "warning": 1, "info": 2}
    return [ShownProblem(p.get("level", ""), p.get("code", ""), p.get("message", ""), p.get("concept") or "",
                         p.get("file") or "", thumb_of(p.get("file"), roots), list(p.get("files") or []))
            for p in sorted(problems, key=lambda p: order.get(p.get("level"), 3))]


def run(title: str, args: list[str], timeout: float = 600) -> Report:
    try:
        r = subprocess.run([sys.executable, "-m", "loralab.cli", *args], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        return Report(title, args, (r.stdout + ("\n" + r.stderr if r.stderr.strip() else "")).strip(), r.returncode,
                      r.stdout)
    except subprocess.TimeoutExpired:
        return Report(title, args, f"stopped after {timeout:.0f} s", -1)


def dataset_reports(values: dict[str, str]) -> list[Report]:
    todo = commands(values)
    with ThreadPoolExecutor(len(todo)) as pool:
        return list(pool.map(lambda t: run(*t), todo))
