"""Drawing the review's images: the base model, every epoch, and a LoRA-weight sweep, through one sampler.

Every image of a prompt uses the same seed, so an epoch's image and the base model's image differ only
by what the LoRA does. Images are drawn `batch_size` prompts per UNet call (`train.sampling.draw_images`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)


@dataclass
class Drawn:
    """Images per row: `rows[key]` = (prompt images, control images); key 0 = the base model, e an epoch.
    `sweep[(epoch, weight)]` = images of the sweep prompts at that LoRA weight."""

    rows: dict[int, tuple[list[Image.Image], list[Image.Image]]] = field(default_factory=dict)
    sweep: dict[tuple[int, float], list[Image.Image]] = field(default_factory=dict)


def draw_rows(sm, prompts: Sequence, controls: Sequence, files: dict[int, Path], *, seed: int, batch_size: int,
              progress: Callable[[str], None] = lambda s: None) -> Drawn:
    """The base model's images (key 0) and each epoch file's at weight 1.0, prompts then controls."""
    drawn = Drawn()
    both = list(prompts) + list(controls)
    for key in [0, *sorted(files)]:
        progress("base model" if key == 0 else f"epoch {key}")
        if key:
            sm.apply(files[key], 1.0)
        try:
            images = sm.draw(both, seed=seed, batch_size=batch_size)
        finally:
            sm.remove()
        drawn.rows[key] = (images[:len(prompts)], images[len(prompts):])
    return drawn


def draw_sweep(sm, drawn: Drawn, prompts: Sequence, files: dict[int, Path], epochs: Sequence[int],
               weights: Sequence[float], *, seed: int, batch_size: int,
               progress: Callable[[str], None] = lambda s: None) -> None:
    """The sweep prompts at each weight for each epoch in `epochs`; weight 0 and 1 are taken from the rows."""
    for e in epochs:
        progress(f"weight sweep, epoch {e}")
        net = sm.apply(files[e], 1.0)
        try:
            for w in weights:
                if w == 0:
                    drawn.sweep[(e, w)] = drawn.rows[0][0][:len(prompts)]
                elif w == 1:
                    drawn.sweep[(e, w)] = drawn.rows[e][0][:len(prompts)]
                else:
                    net.set_multiplier(w)
                    drawn.sweep[(e, w)] = sm.draw(prompts, seed=seed, batch_size=batch_size)
        finally:
            sm.remove()
