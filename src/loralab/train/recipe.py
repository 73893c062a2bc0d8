"""The `Recipe` interface: what a training method says about itself; `fit` does the rest.

A recipe answers four questions, each a method with a default:
- how to prepare a run (`prepare`: by default the image dataset, model, LoRA network, optimizer, caches),
- which batches an epoch has (`batches`: by default the dataset's, in its seeded order),
- the loss of one batch (`loss`: no default, the heart of the method),
- what is trained and what is saved (`param_groups`, `extra_tensors`, `extra_metadata`),
and may add callbacks of its own (`callbacks`: by default the save and sample cadence of the config).
`recipes/` holds the methods; `recipes/lora.py` is the plain LoRA / LoCon training.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from loralab.config import TrainConfig
    from loralab.train.callbacks import Callback
    from loralab.train.run import Run


class Recipe:
    name = "recipe"

    def prepare(self, cfg: TrainConfig) -> Run:
        """The run this recipe trains (the standard one: see `train/run.py`)."""
        from loralab.train.run import prepare

        return prepare(cfg, self)

    def batches(self, run: Run, epoch: int) -> list:
        """The batches of `epoch` (0-based), before they are shared out among processes."""
        return run.dataset.batches_for_epoch(epoch, seed=run.cfg.seed)

    def loss(self, run: Run, batch: list, rng: random.Random, generator: torch.Generator) -> torch.Tensor:
        """The scalar loss of one batch. Draw every random number from `rng` (Python) and `generator`
        (torch, on the run's device) or the global torch RNG, which `fit` seeds per step."""
        raise NotImplementedError

    def param_groups(self, run: Run) -> list[dict]:
        """The optimizer's parameter groups (called once by `prepare`, after the network exists)."""
        from loralab.train.run import lora_param_groups

        return lora_param_groups(run)

    def extra_tensors(self, run: Run) -> dict[str, torch.Tensor]:
        """Tensors saved into the LoRA file beside the network's (e.g. pivotal tuning's embeddings)."""
        return {}

    def extra_metadata(self, run: Run) -> dict[str, str]:
        """Metadata keys added to every saved file (e.g. the recipe's own settings)."""
        return {}

    def callbacks(self, run: Run) -> list[Callback]:
        """The recipe's callbacks, run before the caller's: by default Ctrl-C handling (a state to resume
        from), the config's save cadence, the validation loss (when the run has validation images), samples; with
        torch_compile first the compile warm-up (`train/compile.py`)."""
        from loralab.train.callbacks import SampleImages, SaveCheckpoints, StopOnSignal
        from loralab.train.compile import CompileWarmUp, compiles
        from loralab.train.validation import ValidationLoss

        validation = [ValidationLoss()] if run.val_dataset is not None else []
        warm_up = [CompileWarmUp()] if compiles(run) else []
        return [*warm_up, StopOnSignal(), SaveCheckpoints(), *validation, SampleImages()]
