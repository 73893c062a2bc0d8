"""`torch_compile`: the UNet's training forward compiled with torch.compile, one graph per batch shape.

    torch_compile = true          # kohya's key; dynamo_backend = "inductor" (default), "aot_eager", ...

The compiled UNet is the same module (same weights, the same LoRA hooks); only `loss_of_prediction` calls it,
so sampling, validation and the recipes that run the UNet themselves (sliders) stay eager. Each bucket
shape (batch size, latent height and width) compiles once, the first time it is seen; `CompileWarmUp` does
that for every shape of the first epoch before training starts, with a progress bar, so the step times
after it are steady. Shapes are static (`dynamic=False`): a graph per shape runs fastest, and a dataset has
few buckets. The warm-up runs a batch of each shape through the recipe's loss and backward, then clears the
gradients: the weights, the optimizer and the random draws of the training steps do not change (each step
seeds its own generators), so a compiled run trains the same steps as an eager one, within float rounding.
"""

from __future__ import annotations

import logging
import random
import time

import torch

from loralab.train.callbacks import Callback
from loralab.train.run import Run

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64  # graphs kept per compiled function (torch's default, 8, is below many datasets' bucket count)


def compiles(run: Run) -> bool:
    return run.cfg.torch_compile and run.cfg.dynamo_backend.lower() != "no"


def compile_unet(run: Run) -> None:
    """Set `run.unet_forward` to the compiled UNet (when torch_compile); the UNet module itself stays eager."""
    if not compiles(run):
        return
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
    run.unet_forward = torch.compile(run.model.unet, backend=run.cfg.dynamo_backend.lower(), dynamic=False)


def batch_shape(batch: list) -> tuple:
    """What a compiled graph depends on: the batch size and each sample's bucket."""
    return (len(batch), *sorted({tuple(s.choice.bucket) for s in batch}))


class CompileWarmUp(Callback):
    """Compile the UNet for every batch shape of the first epoch before the first step (a progress bar)."""

    def on_train_start(self, run: Run) -> None:
        if not compiles(run) or run.dataset is None:
            return
        from tqdm.auto import tqdm

        shapes: dict[tuple, list] = {}
        for batch in run.recipe.batches(run, run.epoch):
            shapes.setdefault(batch_shape(batch), batch)
        started = time.perf_counter()
        run.network.train()  # the mode the steps run in (a graph is specialised to it)
        for batch in tqdm(list(shapes.values()), desc=f"compiling the UNet ({run.cfg.dynamo_backend})",
                          unit="shape", disable=not run.is_main):
            loss = run.recipe.loss(run, batch, random.Random(0), torch.Generator(run.device).manual_seed(0))
            loss.backward()
            run.optimizer.zero_grad(set_to_none=True)
        log.info("torch.compile: %d batch shape%s compiled in %.1f s", len(shapes), "" if len(shapes) == 1 else "s",
                 time.perf_counter() - started)
