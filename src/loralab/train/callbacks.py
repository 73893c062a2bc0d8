"""Callbacks: what happens around the training steps without being part of them.

`fit` calls each callback's hooks in order: the recipe's callbacks first (by default the config's save
and sample cadence below), then the caller's. A callback receives the `Run`: it may read anything,
log a figure (`run.log.validation(...)`, `run.log.event(...)`), or end the run cleanly with
`run.stop("why")` (the final file is then saved as at a normal end).
Under `accelerate launch` every process runs the callbacks; a stop must be decided alike on every
process (from values all of them have), or the others wait forever at the next gradient all-reduce.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from loralab.io import DiskFullError
from loralab.train.run import Run, encode_prompts

log = logging.getLogger(__name__)


class Callback:
    def on_train_start(self, run: Run) -> None:
        """Models ready, just before the first step."""

    def on_step_end(self, run: Run) -> None:
        """After each optimizer step (run.global_step already counts it)."""

    def on_epoch_end(self, run: Run) -> None:
        """After each epoch (run.epoch is the 0-based epoch just finished)."""

    def on_train_end(self, run: Run) -> None:
        """After the last step, or after a stop."""

    def teardown(self, run: Run) -> None:
        """Always last, also when the run failed with an exception: give back what was taken (handlers)."""


def save_network(run: Run, path: Path, epoch: int) -> None:
    """Write the LoRA file (kohya format, `ss_*` metadata, the recipe's extra tensors) on the main process."""
    from loralab.train.metadata import build_metadata
    from loralab.train.step import flush_steps

    flush_steps(run)  # a step with a NaN loss since the last flush stops the run here, before the file
    if not run.is_main:
        run.last_good = path if path.stem != run.cfg.output_name else run.last_good
        return
    md = build_metadata(run.cfg, run.info, epoch=epoch, step=run.global_step, final=path.stem == run.cfg.output_name)
    md.update(run.recipe.extra_metadata(run))
    with how_to_continue(run):
        run.network.save(path, run.save_dtype, md, extra=run.recipe.extra_tensors(run))
        if hasattr(run.recipe, "save_files"):  # files a recipe writes beside each LoRA file (pivotal: embeddings)
            run.recipe.save_files(run, path)
    run.saved.append(path)
    if path.stem != run.cfg.output_name:
        run.last_good = path
    log.info("saved %s", path)


def save_training_state(run: Run, name: str, epoch: int, batch_in_epoch: int) -> None:
    """Write a state folder that `resume` continues exactly (epoch = epochs finished)."""
    from loralab.train.state import TrainCounters, save_state

    if not run.is_main:
        return
    counters = TrainCounters(epoch=epoch, global_step=run.global_step, batch_in_epoch=batch_in_epoch,
                             seed=run.cfg.seed, max_train_steps=run.max_steps, log_state=run.log.state_dict(),
                             world=run.world, batches_per_epoch=run.batches_per_proc,
                             train_batch_size=run.cfg.train_batch_size, gradient_accumulation_steps=run.accum)
    with how_to_continue(run):
        save_state(run.out_dir / name, network_sd=run.network.state_dict(), optimizer=run.optimizer,
                   scheduler=run.lr_scheduler, scaler=run.scaler, counters=counters)
    run.last_state = run.out_dir / name


@contextmanager
def how_to_continue(run: Run):
    """A full disk while saving: add to the message which files are intact and how to continue."""
    try:
        yield
    except DiskFullError as e:
        state = run.last_state or (Path(run.cfg.resume) if run.cfg.resume else None)
        if state is not None:
            hint = f'The last complete state is {state}; to continue from it, add to the config: resume = "{state.as_posix()}".'
        elif run.last_good is not None:
            hint = f"The last complete LoRA file is {run.last_good} (no state was saved: set save_state to resume next time)."
        else:
            hint = "No file of this run was complete yet."
        raise DiskFullError(f"{e} {hint}", e.path) from e.__cause__


def epoch_to_remove(epoch: int, save_every_n_epochs: int, keep: int) -> int | None:
    """save_last_n_epochs (kohya `get_remove_epoch_no`): right after the save of epoch `epoch`, the epoch
    save to delete is `epoch − save_every_n_epochs · keep`, so the last `keep` epoch saves remain (every 2,
    keep 2: at epoch 6 epoch 2 goes; 4 and 6 stay). None when keep is 0 (keep all) or no such epoch."""
    if keep <= 0 or save_every_n_epochs <= 0:
        return None
    old = epoch - save_every_n_epochs * keep
    return old if old > 0 else None


def step_to_remove(step: int, save_every_n_steps: int, keep_steps: int) -> int | None:
    """save_last_n_steps (kohya `get_remove_step_no`): `keep_steps` counts steps, not files. Right after the
    save of step `step`, the step save to delete is the multiple of save_every_n_steps at or below
    `step − keep_steps − 1`, so the saves of the last `keep_steps` steps remain (every 10, keep 30: at step
    50 step 10 goes; 20 to 50 stay). None when keep_steps is 0 (keep all) or no such step."""
    if keep_steps <= 0 or save_every_n_steps <= 0:
        return None
    old = step - keep_steps - 1
    old -= old % save_every_n_steps
    return old if old > 0 else None


def state_keep(state_value: int, files_value: int, key: str) -> tuple[int, str]:
    """How many state saves to keep, and the key that says so: save_last_n_*_state, or when it is 0 the
    files' save_last_n_* (kohya: the _state key overrides)."""
    return (state_value, f"{key}_state") if state_value else (files_value, key)


def remove_old_save(run: Run, name: str, rule: str) -> None:
    """Delete an older save (a LoRA file or a state folder) of this run, if it is there; logged, and recorded
    in train_log.jsonl as a "removed" event. Main process only; a file that cannot be deleted is a warning."""
    import shutil

    from loralab.network.files import embeddings_folder

    path = run.out_dir / name
    if not run.is_main or not path.exists():
        return
    try:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    except OSError as e:
        log.warning("%s: could not remove %s: %s", rule, path, e)
        return
    emb = embeddings_folder(path)  # a pivotal run's separate embeddings of that file
    if emb.is_dir():
        shutil.rmtree(emb, ignore_errors=True)
    if path in run.saved:
        run.saved.remove(path)
    log.info("removed %s (%s)", path, rule)
    run.log.event("removed", step=run.global_step, epoch=run.epoch + 1, path=path, rule=rule)


class SaveCheckpoints(Callback):
    """kohya's save cadence: `<name>-stepNNNNNNNN` every save_every_n_steps, `<name>-NNNNNN` every
    save_every_n_epochs (not for the last epoch: that is the final `<name>.<save_model_as>`), each with a
    `-state` folder when save_state; the final file (and state with save_state(_on_train_end)) at the end.

    After each step or epoch save, kohya's save_last_n_* rule deletes one older save (`step_to_remove`,
    `epoch_to_remove`): the files with save_last_n_steps / save_last_n_epochs, the state folders with
    save_last_n_steps_state / save_last_n_epochs_state (0: the files' value). The final file and state and
    the interrupted state are never deleted."""

    def on_train_start(self, run: Run) -> None:
        if run.cfg.save_model_as != "safetensors" and run.is_main:
            log.info("save_model_as = %s: the LoRA files hold the tensors only (torch.save, as kohya): no ss_* "
                     "metadata, and `loralab review` reads .safetensors files only", run.cfg.save_model_as)

    def on_step_end(self, run: Run) -> None:
        cfg, step = run.cfg, run.global_step
        if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step < run.max_steps:
            stem = f"{cfg.output_name}-step{step:08d}"
            save_network(run, run.out_dir / f"{stem}.{cfg.save_model_as}", run.epoch + 1)
            if cfg.save_state:
                save_training_state(run, f"{stem}-state", run.epoch, run.batch_in_epoch)
                keep, rule = state_keep(cfg.save_last_n_steps_state, cfg.save_last_n_steps, "save_last_n_steps")
                old = step_to_remove(step, cfg.save_every_n_steps, keep)
                if old is not None:
                    remove_old_save(run, f"{cfg.output_name}-step{old:08d}-state", rule)
            old = step_to_remove(step, cfg.save_every_n_steps, cfg.save_last_n_steps)
            if old is not None:
                remove_old_save(run, f"{cfg.output_name}-step{old:08d}.{cfg.save_model_as}", "save_last_n_steps")

    def on_epoch_end(self, run: Run) -> None:
        cfg, ep = run.cfg, run.epoch + 1
        if cfg.save_every_n_epochs and ep % cfg.save_every_n_epochs == 0 and not run.reached_end():
            save_network(run, run.out_dir / f"{cfg.output_name}-{ep:06d}.{cfg.save_model_as}", ep)
            old = epoch_to_remove(ep, cfg.save_every_n_epochs, cfg.save_last_n_epochs)
            if old is not None:
                remove_old_save(run, f"{cfg.output_name}-{old:06d}.{cfg.save_model_as}", "save_last_n_epochs")
            if cfg.save_state:
                save_training_state(run, f"{cfg.output_name}-{ep:06d}-state", ep, 0)
                keep, rule = state_keep(cfg.save_last_n_epochs_state, cfg.save_last_n_epochs, "save_last_n_epochs")
                old = epoch_to_remove(ep, cfg.save_every_n_epochs, keep)
                if old is not None:
                    remove_old_save(run, f"{cfg.output_name}-{old:06d}-state", rule)

    def on_train_end(self, run: Run) -> None:
        cfg = run.cfg
        if run.interrupted:
            return  # not a finished run: StopOnSignal writes the state to continue it
        run.final_file = run.out_dir / f"{cfg.output_name}.{cfg.save_model_as}"
        save_network(run, run.final_file, run.epoch + 1)
        if cfg.save_state or cfg.save_state_on_train_end:
            save_training_state(run, f"{cfg.output_name}-state", run.epoch + 1, 0)


class SampleImages(Callback):
    """kohya's sample cadence: before training (sample_at_first), every sample_every_n_steps (unless
    sample_every_n_epochs is set), every sample_every_n_epochs; images in `<output_dir>/sample/`."""

    def on_train_start(self, run: Run) -> None:
        if run.cfg.sample_at_first and not run.cfg.resume:
            sample(run, f"{run.cfg.output_name}_e{0:06d}")

    def on_step_end(self, run: Run) -> None:
        cfg = run.cfg
        if cfg.sample_every_n_steps and run.global_step % cfg.sample_every_n_steps == 0 and not cfg.sample_every_n_epochs:
            sample(run, f"{cfg.output_name}_{run.global_step:06d}")

    def on_epoch_end(self, run: Run) -> None:
        ep = run.epoch + 1
        if run.cfg.sample_every_n_epochs and ep % run.cfg.sample_every_n_epochs == 0:
            sample(run, f"{run.cfg.output_name}_e{ep:06d}")


def sample(run: Run, stem: str) -> None:
    """Draw the sample prompts with the network applied (main process only); RNG state is kept."""
    from loralab.models.text import unet_text_conditioning
    from loralab.train.sampling import generate_samples

    if not (run.is_main and run.prompts):
        return
    model, dtype = run.model, run.weight_dtype

    def conditioning(texts: list[str]):
        hidden, added = unet_text_conditioning(model.family, encode_prompts(run, texts))
        return hidden.to(dtype), added

    files = generate_samples(unet=model.unet, vae=model.vae, vae_scaling_factor=model.vae_scaling_factor,
                             encode_prompt=conditioning, scheduler_config=dict(run.noise_scheduler.config),
                             prompts=run.prompts, out_dir=run.out_dir / "sample", file_stem=stem, device=run.device,
                             dtype=dtype, default_seed=run.cfg.seed, v_parameterization=model.v_parameterization,
                             sampler=run.cfg.sample_sampler or ("euler_a" if run.sdxl else "ddim"),
                             eval_modules=[run.network], clip_sample=getattr(model, "sample_clip", True))
    run.samples.extend(files)


class StopOnSignal(Callback):
    """Ctrl-C (SIGINT) or SIGTERM: the current step finishes, a state folder `<output_name>-interrupted-state`
    is written (even without save_state), and the exact `resume = "…"` line that continues the run is
    printed; no final file is written. A second signal stops at once. Single process only: under
    accelerate launch the processes could stop at different steps and wait for each other forever."""

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}

    def on_train_start(self, run: Run) -> None:
        if run.world > 1 or threading.current_thread() is not threading.main_thread():
            return

        def handle(signum, frame):
            if run.interrupted:  # the second signal: at once
                self.restore()
                raise KeyboardInterrupt
            run.interrupted = signal.Signals(signum).name
            run.stop(f"interrupted ({run.interrupted})")
            log.warning("%s: finishing this step, then saving the state to continue from (again to stop at once)",
                        run.interrupted)

        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def teardown(self, run: Run) -> None:
        self.restore()

    def on_train_end(self, run: Run) -> None:
        if not (run.interrupted and run.is_main):
            return
        epoch, batch = run.epoch, run.batch_in_epoch
        if batch >= run.batches_per_proc:  # interrupted on an epoch's last step: continue with the next epoch
            epoch, batch = epoch + 1, 0
        name = f"{run.cfg.output_name}-interrupted-state"
        save_training_state(run, name, epoch, batch)
        log.warning("interrupted at step %d; to continue, add to the config: resume = \"%s\"", run.global_step,
                    (run.out_dir / name).as_posix())
