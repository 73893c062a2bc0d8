"""Captions: the per-step caption pipeline (kohya `BaseDataset.process_caption`) and tag counting.

Option names and defaults are kohya's. Every random draw comes from the `random.Random` the caller
passes, in kohya's order (caption dropout, wildcard choices, shuffle, tag dropout), so a step is
reproducible from its seed.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass


@dataclass
class CaptionOptions:
    """kohya's caption arguments (same names and defaults)."""

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0

    def reformats_tags(self) -> bool:
        """Whether step 4 of the pipeline (split, keep, shuffle, drop, re-join) runs at all (kohya rule)."""
        return self.shuffle_caption or self.token_warmup_step > 0 or self.caption_tag_dropout_rate > 0


def process_caption(
    caption: str,
    opts: CaptionOptions,
    *,
    epoch: int,
    rng: random.Random,
    step: int = 0,
    max_train_steps: int = 0,
) -> str:
    """The caption one image trains with at this step (kohya `process_caption`, same order).

    1. Add `caption_prefix + " "` before and `" " + caption_suffix` after.
    2. `caption_dropout`: the whole caption becomes "" (and nothing else happens).
    3. With `enable_wildcard`: a random line of a multi-line caption, then each `{a|b}` becomes one
       option (`{{`/`}}` are literal braces). Without it: the first line only.
    4. Only when shuffle_caption, token_warmup_step or caption_tag_dropout_rate is active:
       split into kept and flexible tags (`keep_tokens`), `token_warmup`, `shuffle_caption` of the
       flexible tags, `caption_tag_dropout` of the flexible tags, re-join with ", ".
       Otherwise the caption is left as is (a literal `keep_tokens_separator` then stays in it).
    5. Replace `secondary_separator` with `caption_separator`.
    `epoch` is 1-based like kohya's (the first epoch is 1); `step`/`max_train_steps` only matter to
    token warmup.
    """
    if opts.caption_prefix:
        caption = opts.caption_prefix + " " + caption
    if opts.caption_suffix:
        caption = caption + " " + opts.caption_suffix

    if caption_dropout(opts, epoch=epoch, rng=rng):
        return ""

    if opts.enable_wildcard:
        caption = expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    if opts.reformats_tags():
        fixed, flex, fixed_suffix = keep_tokens(caption, opts)
        flex = token_warmup(flex, opts, step=step, max_train_steps=max_train_steps)
        if opts.shuffle_caption:
            flex = shuffle_caption(flex, rng)
        flex = caption_tag_dropout(flex, opts.caption_tag_dropout_rate, rng)
        caption = ", ".join(fixed + flex + fixed_suffix)

    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.caption_separator)
    return caption


def caption_dropout(opts: CaptionOptions, *, epoch: int, rng: random.Random) -> bool:
    """Whether this caption is dropped (trained as ""): kohya's rule.

    drop = (caption_dropout_rate > 0 and rng.random() < caption_dropout_rate)
           or (caption_dropout_every_n_epochs > 0 and epoch % caption_dropout_every_n_epochs == 0)
    The random number is drawn only when the rate is > 0. `epoch` is 1-based.
    """
    dropped = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    every_n = opts.caption_dropout_every_n_epochs
    return dropped or (every_n > 0 and epoch % every_n == 0)


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """kohya's wildcards: a random line of a multi-line caption, then `{a|b|c}` -> one of a, b, c.

    `{{` and `}}` stand for literal braces.
    """
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    open_mark, close_mark = "\u2985", "\u2986"
    while open_mark in caption or close_mark in caption:
        open_mark += "\u2985"
        close_mark += "\u2986"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def keep_tokens(caption: str, opts: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """Split a caption into (kept tags, flexible tags, kept suffix tags) (kohya rule).

    With `keep_tokens_separator` (e.g. "|||") present: the part before its first occurrence is kept
    in front, and a second occurrence starts a part kept at the end ("a, b ||| c, d ||| e" keeps a, b
    first and e last; c, d are flexible). Tags are split on `caption_separator`, stripped, and empty
    ones dropped.
    Otherwise: tags are split on `caption_separator` and stripped (empty ones kept, as kohya does),
    and the first `keep_tokens` are kept in front.
    Only the flexible tags are shuffled, dropped or warmed up.
    """
    sep = opts.caption_separator
    kts = opts.keep_tokens_separator
    if kts and kts in caption:
        fixed_part, flex_part = caption.split(kts, 1)
        fixed_suffix: list[str] = []
        if kts in flex_part:
            flex_part, suffix_part = flex_part.split(kts, 1)
            fixed_suffix = [t.strip() for t in suffix_part.split(sep) if t.strip()]
        fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
        flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
        return fixed, flex, fixed_suffix
    tokens = [t.strip() for t in caption.strip().split(sep)]
    if opts.keep_tokens > 0:
        return tokens[: opts.keep_tokens], tokens[opts.keep_tokens :], []
    return [], tokens, []


def token_warmup(flex: list[str], opts: CaptionOptions, *, step: int, max_train_steps: int) -> list[str]:
    """kohya's token warmup: early steps train with only the first few flexible tags.

    A `token_warmup_step` below 1 is a fraction of `max_train_steps` (floor(x * max_train_steps)).
    While step < that: keep floor(step * (len(flex) - token_warmup_min) / token_warmup_step)
    + token_warmup_min tags.
    """
    warmup = opts.token_warmup_step
    if warmup < 1:
        warmup = math.floor(warmup * max_train_steps)
    if warmup and step < warmup:
        n = math.floor(step * ((len(flex) - opts.token_warmup_min) / warmup)) + opts.token_warmup_min
        return flex[:n]
    return flex


def shuffle_caption(tags: list[str], rng: random.Random) -> list[str]:
    """Shuffle the flexible tags (a new order every step); kept tags are not passed here."""
    tags = list(tags)
    rng.shuffle(tags)
    return tags


def caption_tag_dropout(tags: list[str], rate: float, rng: random.Random) -> list[str]:
    """Drop each flexible tag independently with probability `rate` (kohya: keep if rng.random() >= rate).

    No random number is drawn when rate <= 0. Kept tags are never passed here, so at rate 1.0 only
    the kept tags remain.
    """
    if rate <= 0:
        return list(tags)
    return [t for t in tags if rng.random() >= rate]


def split_tags(caption: str) -> list[str]:
    """The tags of a caption as `ss_tag_frequency` counts them (kohya `set_tag_frequency`).

    Rule: split on "," (always a comma, whatever `caption_separator` is), strip, drop empty ones,
    lowercase. A tag written twice in one caption is counted twice.
    """
    return [t.strip().lower() for t in caption.split(",") if t.strip()]
