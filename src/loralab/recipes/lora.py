"""The LoRA recipe: kohya's `train_network.py` behaviour (LoRA and LoCon on SD 1.x/2.x and SDXL).

Nothing here but the loss: the image dataset, the network, the optimizer, the caches and the save and
sample cadence are the defaults of `Recipe` and `train/run.py`, and the loss of a batch is the
weighted diffusion loss of `train/step.py`.

How the next methods plug in, each as its own file in recipes/:
- pivotal tuning (`recipes/pivotal.py`): a config subclass adds its keys (the new tokens, their init
  words, the embedding learning rate); `prepare` calls the standard `prepare`, then adds the new tokens
  to the tokenizers and text encoders; `param_groups` returns the LoRA groups plus one group of the new
  token embeddings with its own learning rate; `extra_tensors` returns the embeddings under
  `bundle_emb.<token>.string_to_param.*` so A1111 loads them with the LoRA; the loss is this file's.
- sliders / LECO (`recipes/slider.py`): no image dataset. Its `prepare` builds the model, network and
  optimizer with the same functions (`load_model`, `setup_network`, `setup_optimizer`, `count_steps`,
  `setup_outputs`) and reads prompt pairs instead of a dataset; `batches` returns the prompt pairs of an
  epoch; `loss` denoises with the network off and on (`network.set_multiplier`) and pulls the LoRA's
  prediction towards the frozen model's `neutral ± guidance · (positive − negative)`. The loop,
  accumulation, multi-process averaging, NaN guard, logs, saving and sampling are unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from loralab.config import TrainConfig
from loralab.train.callbacks import Callback
from loralab.train.loop import TrainResult, fit
from loralab.train.recipe import Recipe
from loralab.train.run import Run
from loralab.train.step import diffusion_loss


class LoRARecipe(Recipe):
    name = "lora"

    def loss(self, run: Run, batch: list, rng: random.Random, generator: torch.Generator) -> torch.Tensor:
        return diffusion_loss(run, batch, rng, generator)


def train(cfg: TrainConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """`loralab train`: prepare a LoRA run from the config and fit it."""
    recipe = LoRARecipe()
    return fit(recipe.prepare(cfg), recipe, callbacks)
