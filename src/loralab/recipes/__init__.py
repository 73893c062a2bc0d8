"""Training methods, one file each: what differs from the plain loop (`train/recipe.py` says what a recipe is).

`recipe_for(cfg)` is the one place that says which method a config asks for; `loralab train` calls it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loralab.config import TrainConfig
    from loralab.train.callbacks import Callback
    from loralab.train.loop import TrainResult
    from loralab.train.recipe import Recipe


def recipe_for(cfg: TrainConfig) -> Recipe:
    """The recipe of a config: the first rule that matches, else plain LoRA / LoCon (`recipes/lora.py`)."""
    from loralab.recipes.lora import LoRARecipe

    # recipe rules (one `if` per method, most specific first)
    if cfg.prompts_file:  # sliders / LECO: trained from prompts alone (`recipes/slider.py`)
        from loralab.recipes.slider import SliderRecipe

        if cfg.train_data_dir or cfg.dataset_config:
            logging.getLogger(__name__).warning(
                "prompts_file is set: this is a slider / LECO run, trained from prompts alone; the images of "
                "train_data_dir / dataset_config are not used (remove prompts_file to train on them)")

        return SliderRecipe()
    if cfg.token_string:  # pivotal tuning: new tokens trained as embeddings with the LoRA (`recipes/pivotal.py`)
        from loralab.recipes.pivotal import PivotalRecipe

        return PivotalRecipe()
    return LoRARecipe()


def dry_run_data(cfg: TrainConfig) -> tuple[list[str], int] | None:
    """For `--dry-run`: what a recipe without an image dataset trains on (its lines, batches per epoch);
    None when the run trains on the image dataset."""
    if not cfg.prompts_file:
        return None
    from loralab.recipes.prompts import read_prompts

    entries = read_prompts(cfg.prompts_file)
    lines = [f"  {cfg.prompts_file}: {len(entries)} prompt entries (slider / LECO: no images; "
             "train_data_dir is not read)"]
    lines += [f"    {e.action} target {e.target!r}: positive {e.positive!r}, negative {e.negative!r}, "
              f"guidance {e.guidance_scale:g}{', both directions' if e.bidirectional else ''}" for e in entries[:10]]
    if len(entries) > 10:
        lines.append(f"    ... {len(entries) - 10} more")
    return lines, len(entries)


def train_any(cfg: TrainConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """`loralab train`: prepare the run of the config's recipe and fit it."""
    from loralab.train.loop import fit

    recipe = recipe_for(cfg)
    return fit(recipe.prepare(cfg), recipe, callbacks)
