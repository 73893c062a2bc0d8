"""The prompts `loralab review` draws, and the trigger words it takes out of them for the controls.

Prompts, first that applies: `--prompts FILE` (kohya line syntax, .txt/.toml/.json), the run's own
`sample_prompts`, else the first `max_prompts` distinct captions of its training folders at the most
common training bucket size (`ss_bucket_info`). Seeds: a prompt's `--d`, else the review seed + its index.

Trigger words (`trigger_words`): in every non-reg training folder, the tags found in all of its captions
(`ss_tag_frequency` count = the folder's `img_count` in `ss_dataset_dirs`), e.g. the activation tag of a
kohya dataset. A control prompt is a prompt with its trigger words removed (same seed, size, sampler):
what a user's other prompts do with the LoRA loaded. A prompt without trigger words has no control.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from loralab.errors import LoralabError

DEFAULT_STEPS = 20


def trigger_words(metadata: dict[str, str]) -> list[str]:
    try:
        freq = json.loads(metadata.get("ss_tag_frequency") or "{}")
        dirs = json.loads(metadata.get("ss_dataset_dirs") or "{}")
    except json.JSONDecodeError:
        return []
    out: list[str] = []
    for folder, info in dirs.items():
        n = int(info.get("img_count") or 0)
        for tag, count in (freq.get(folder) or {}).items():
            if n > 0 and count >= n and tag not in out:
                out.append(tag)
    return out


def without_triggers(prompt: str, triggers: list[str]) -> str | None:
    """The prompt with its trigger tags (comma-separated parts equal to a trigger, any case) removed;
    None when it has none."""
    parts = [p.strip() for p in prompt.split(",")]
    low = {t.lower() for t in triggers}
    kept = [p for p in parts if p.lower() not in low]
    return ", ".join(p for p in kept if p) if len(kept) < len(parts) else None


def common_bucket(metadata: dict[str, str], fallback: tuple[int, int]) -> tuple[int, int]:
    try:
        info = json.loads(metadata.get("ss_bucket_info") or "null")
    except json.JSONDecodeError:
        info = None
    if isinstance(info, dict) and info.get("buckets"):
        best = max(info["buckets"].values(), key=lambda b: b.get("count", 0))
        w, h = best["resolution"]
        return int(w), int(h)
    return fallback


def caption_prompts(config: dict[str, Any], metadata: dict[str, str], limit: int, seed: int):
    """The first `limit` distinct training captions as prompts (see the module docstring)."""
    from loralab.config import parse_resolution
    from loralab.data.dataset import caption_path
    from loralab.data.images import is_image_file
    from loralab.train.sampling import SamplePrompt

    root = Path(config.get("train_data_dir") or "")
    ext = config.get("caption_extension") or ".txt"
    try:
        fallback = parse_resolution(config.get("resolution") or "512")
    except LoralabError:
        fallback = (512, 512)
    w, h = common_bucket(metadata, fallback)
    texts: list[str] = []
    if root.is_dir():
        for folder in sorted(d for d in root.iterdir() if d.is_dir()):
            for img in sorted(p for p in folder.iterdir() if is_image_file(p)):
                cap = caption_path(img, ext)
                text = cap.read_text(encoding="utf-8").strip() if cap.is_file() else ""
                if text and text not in texts:
                    texts.append(text)
                if len(texts) >= limit:
                    break
            if len(texts) >= limit:
                break
    return [SamplePrompt(t, width=w, height=h, seed=seed + i, steps=DEFAULT_STEPS) for i, t in enumerate(texts)]


def review_prompts(prompt_file: str, config: dict[str, Any], metadata: dict[str, str], limit: int, seed: int):
    """(prompts, where they came from) — see the module docstring. Every prompt gets a fixed seed."""
    from loralab.train.sampling import parse_prompt_file

    if prompt_file:
        prompts, source = parse_prompt_file(prompt_file), f"--prompts {prompt_file}"
    elif config.get("sample_prompts") and Path(config["sample_prompts"]).is_file():
        prompts, source = parse_prompt_file(config["sample_prompts"]), f"the run's sample_prompts ({config['sample_prompts']})"
    else:
        prompts = caption_prompts(config, metadata, limit, seed)
        source = "the run's training captions (no sample_prompts in the run; pass --prompts FILE for your own)"
    if not prompts:
        raise LoralabError("no prompts to draw: the run has no sample_prompts and its training captions were not "
                           "found; pass --prompts FILE (kohya prompt lines)")
    prompts = [p if p.seed is not None else replace(p, seed=seed + i) for i, p in enumerate(prompts[:limit])]
    return prompts, source
