"""The dataset page: `loralab dataset check`, `loralab dataset tags` and `loralab tokens --dataset` on the
form's folders, with the form's resolution and bucket keys, each run as the CLI command (in its own process,
the three at once) and shown as the CLI prints it."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass
class Report:
    title: str
    command: list[str]
    output: str
    rc: int


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
            ("dataset tags: tag frequency per concept, pruning candidates", ["dataset", "tags", folder, *reg, *caption]),
            ("tokens: the activation tags' CLIP tokens, shared tokens and repeats", ["tokens", "--dataset", folder, *caption])]


def run(title: str, args: list[str], timeout: float = 600) -> Report:
    try:
        r = subprocess.run([sys.executable, "-m", "loralab.cli", *args], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        return Report(title, args, (r.stdout + ("\n" + r.stderr if r.stderr.strip() else "")).strip(), r.returncode)
    except subprocess.TimeoutExpired:
        return Report(title, args, f"stopped after {timeout:.0f} s", -1)


def dataset_reports(values: dict[str, str]) -> list[Report]:
    todo = commands(values)
    with ThreadPoolExecutor(len(todo)) as pool:
        return list(pool.map(lambda t: run(*t), todo))
