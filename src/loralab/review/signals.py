"""Per-epoch figures of a review, from its images and its log (`measure.py` says what each one is)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from loralab.review import measure as M
from loralab.review.draw import Drawn

COPY_LIKENESS = 0.95  # a sample this like a training image is counted as a copy


@dataclass
class EpochSignals:
    epoch: int  # 0 = the base model
    steps: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    change: float = 0.0  # mean change of the prompts' images from the base model's
    drift: float | None = None  # mean change of the controls' images (None: no controls)
    likeness: float = 0.0  # mean likeness of the prompts' images to their nearest training image
    copies: int = 0  # prompt images with likeness >= COPY_LIKENESS
    nearest: list[int] = field(default_factory=list)  # index of each prompt image's nearest training image
    nearest_likeness: list[float] = field(default_factory=list)  # and its likeness
    saturation: float = 1.0  # saturation of the prompts' images at weight 1.0 over the base model's (measure.burned)
    burned: bool = False  # the prompts' images burn at weight 1.0
    sweep: dict[float, dict[str, float]] = field(default_factory=dict)  # weight -> saturation, clipped, burned


def image_signals(drawn: Drawn, train_thumbs: np.ndarray) -> dict[int, EpochSignals]:
    out: dict[int, EpochSignals] = {}
    base_p, base_c = drawn.rows[0]
    for key, (imgs_p, imgs_c) in drawn.rows.items():
        s = EpochSignals(key)
        s.change = float(np.mean([M.change(a, b) for a, b in zip(imgs_p, base_p)])) if imgs_p else 0.0
        s.drift = float(np.mean([M.change(a, b) for a, b in zip(imgs_c, base_c)])) if imgs_c else None
        idx, sims = M.nearest(M.thumbnails(imgs_p), train_thumbs)
        if len(train_thumbs):
            s.likeness = float(sims.mean()) if len(sims) else 0.0
            s.copies = int((sims >= COPY_LIKENESS).sum())
            s.nearest = [int(i) for i in idx]
            s.nearest_likeness = [round(float(x), 4) for x in sims]
        if key and imgs_p:
            s.saturation, _, s.burned = M.burned(imgs_p, base_p)
        out[key] = s
    return out


def sweep_signals(drawn: Drawn, signals: dict[int, EpochSignals]) -> None:
    base = drawn.rows[0][0]
    for (e, w), imgs in drawn.sweep.items():
        ratio, extra, burned = M.burned(imgs, base[:len(imgs)])
        signals[e].sweep[w] = {"saturation": ratio, "clipped": extra, "burned": burned}
