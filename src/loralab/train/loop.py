"""`fit(run, recipe, callbacks)`: the training loop. Read it top to bottom.

Epochs of batches; each batch's loss comes from the recipe, its gradients accumulate over
`gradient_accumulation_steps` batches, then one optimizer step. Saving, sampling and anything else on a
cadence are callbacks (`train/callbacks.py`), never branches here.

Multi-GPU: under `accelerate launch`, each process takes every N-th batch of the epoch (padded by
wrapping around so all processes take the same number of steps) and the gradients are averaged with
one all-reduce per optimizer step (`step.optimizer_step`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loralab.train.callbacks import Callback
from loralab.train.recipe import Recipe
from loralab.train.run import Run
from loralab.train.step import backward, flush_steps, nan_guard, optimizer_step, record_step, step_seed


@dataclass
class TrainResult:
    final_file: Path | None
    saved_files: list[Path]
    sample_files: list[Path]
    global_step: int
    epochs: int
    log_file: Path
    last_loss: float
    stop_reason: str = ""
    interrupted: str = ""


def fit(run: Run, recipe: Recipe, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train `run` with `recipe` until max_steps, the last epoch, or a callback's `run.stop(...)`."""
    cbs = [*recipe.callbacks(run), *callbacks]
    progress = _progress(total=run.max_steps, initial=run.global_step, enabled=run.is_main)
    run.log.before_write = lambda: flush_steps(run)  # other records come after the steps before them
    try:
        run.log.event("resumed" if run.resumed_from is not None else "start", step=run.global_step,
                      epoch=run.epoch + 1, config=run_config(run))
        notify(cbs, "on_train_start", run)
        run.network.train()
        first_epoch = run.epoch
        for epoch in range(first_epoch, run.num_epochs):
            run.epoch = epoch
            mine = shard(recipe.batches(run, epoch), run.rank, run.world, run.batches_per_proc)
            run.batch_in_epoch = run.skip_batches if epoch == first_epoch else 0
            micro_losses: list[torch.Tensor] = []
            for bi in range(run.batch_in_epoch, len(mine)):
                if run.global_step >= run.max_steps:
                    break
                micro = bi % run.accum
                seed = step_seed(run.cfg.seed, run.global_step, micro, run.rank)
                torch.manual_seed(seed)  # LoRA dropouts and VAE sampling draw from the global generator
                loss = recipe.loss(run, mine[bi], random.Random(seed), torch.Generator(run.device).manual_seed(seed))
                nan_guard(run, loss)
                backward(run, loss)
                micro_losses.append(loss)
                if micro < run.accum - 1 and bi < len(mine) - 1:
                    continue
                norms = optimizer_step(run)
                run.global_step += 1
                run.batch_in_epoch = bi + 1
                record_step(run, micro_losses, norms)  # the loss stays on the device until the next flush
                micro_losses = []
                progress.update(1)
                shown = {"loss": f"{run.last_loss:.4f}"} if run.losses else {}  # the last loss read from the device
                progress.set_postfix({**shown, "epoch": epoch + 1, **{k: f"{v:.4f}" for k, v in run.metrics.items()}},
                                     refresh=False)
                notify(cbs, "on_step_end", run)
                if run.global_step >= run.max_steps or run.stop_reason:
                    break
            run.skip_batches = 0
            if run.stop_reason and run.batch_in_epoch < len(mine) and run.global_step < run.max_steps:
                break  # stopped inside the epoch: it did not end
            if run.batch_in_epoch > 0:  # also an epoch whose last step came before a resume from a step state
                run.log.epoch(epoch + 1, step=run.global_step)
            notify(cbs, "on_epoch_end", run)
            if run.finished():
                break
        if run.interrupted and run.global_step >= run.max_steps:
            run.interrupted = run.stop_reason = ""  # the signal came during the last step: the run is complete
        if run.stop_reason:
            run.log.event("stopped", step=run.global_step, epoch=run.epoch + 1, reason=run.stop_reason)
        notify(cbs, "on_train_end", run)
        run.log.event("done", step=run.global_step, epoch=run.epoch + 1, seconds=round(time.time() - run.started_at, 2))
        if run.world > 1:
            run.accelerator.wait_for_everyone()
    finally:
        flush_steps(run, check=False)  # a failing run still logs the steps it did
        progress.close()
        notify(cbs, "teardown", run)
        run.log.close()
        run.network.restore()
    return TrainResult(final_file=run.final_file if run.is_main else None, saved_files=run.saved,
                       sample_files=run.samples, global_step=run.global_step, epochs=run.epoch + 1,
                       log_file=run.log.jsonl_path, last_loss=run.last_loss, stop_reason=run.stop_reason,
                       interrupted=run.interrupted)


def run_config(run: Run) -> dict:
    """The run's config as JSON values, logged with the start event (what `loralab review` reads back)."""
    import dataclasses

    return {k: v if isinstance(v, (str, int, float, bool, type(None))) else
            ([str(x) for x in v] if isinstance(v, (list, tuple)) else str(v))
            for k, v in dataclasses.asdict(run.cfg).items()}


def shard(batches: list, rank: int, world: int, per_proc: int) -> list:
    """This process's batches: every `world`-th from `rank`, wrapping around so all processes get `per_proc`."""
    return [batches[(i * world + rank) % len(batches)] for i in range(per_proc)]


def notify(callbacks: Sequence[Callback], hook: str, run: Run) -> None:
    for cb in callbacks:
        getattr(cb, hook)(run)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="steps", unit="step", dynamic_ncols=True)
