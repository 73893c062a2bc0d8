"""The validation loss (kohya's semantics): the diffusion loss of held-out images with fixed noise.

Images: a seeded share of each training folder (`validation_split`, `data.dataset.split_validation`)
and/or a separate folder in the kohya layout (`validation_data_dir`), each image once (repeats do not
count), never in a training batch.

    validation loss = mean over images i and timesteps t in VALIDATION_TIMESTEPS of
                      the training loss of image i noised to t with noise ε_i,t

Everything random is fixed by `validation_seed` (0 = seed): the VAE latent of each image (encoded once,
at the first validation), the noise ε_i,t; captions are used as written (no shuffle or dropout), the
network runs in eval mode (no dropouts). So successive values differ only because the weights changed, and validating the same
weights twice gives the same number. The training's random state is left as it was.
Logged as kohya does: loss/validation/step_current and step_average every validate_every_n_steps,
loss/validation/epoch_average and epoch_divergence (validation − training epoch average) every
validate_every_n_epochs.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch

from loralab.train.callbacks import Callback
from loralab.train.run import Run, encode_images
from loralab.train.step import loss_of_prediction, text_conditioning

VALIDATION_TIMESTEPS = (10, 350, 500, 650, 990)  # kohya's fixed set (train_network.py)


def validation_batches(run: Run) -> list[list]:
    """Each validation image once, grouped by bucket in dataset order, in batches of train_batch_size;
    at most max_validation_steps batches."""
    by_bucket: dict[tuple[int, int], list] = {}
    for s in run.val_dataset.samples:
        by_bucket.setdefault(s.choice.bucket, []).append(s)
    bs = run.cfg.train_batch_size
    batches = [group[i:i + bs] for _, group in sorted(by_bucket.items()) for i in range(0, len(group), bs)]
    return batches[:run.cfg.max_validation_steps] if run.cfg.max_validation_steps else batches


@dataclass
class ValidationBatch:
    """What does not change between validations: the latents, captions and SDXL ids of one batch."""
    latents: torch.Tensor
    captions: list[str]
    time_ids: torch.Tensor | None
    masks: torch.Tensor | None = None  # loss masks (masked_loss / alpha_mask), as in training


@torch.no_grad()
def validation_inputs(run: Run) -> list[ValidationBatch]:
    """Each validation batch encoded once: its images' VAE latents (posterior sampled with a fixed seed),
    its captions as written, its SDXL size/crop ids. The training's random state is left as it was."""
    from loralab.data.captions import process_caption
    from loralab.data.images import prepare_image
    from loralab.data.masks import mask_source, prepare_mask
    from loralab.models.sdxl import batch_time_ids

    seed = run.cfg.validation_seed or run.cfg.seed

    def opts(sample):  # its subset's caption options (a dataset_config sets them per subset), fixed
        return dataclasses.replace(sample.entry.subset.caption_options or run.caption_opts, shuffle_caption=False,
                                   caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
                                   caption_tag_dropout_rate=0.0, token_warmup_step=0)

    inputs = []
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        for bi, batch in enumerate(validation_batches(run)):
            torch.manual_seed(seed * 7919 + bi)  # the VAE's posterior sample
            images = torch.stack([prepare_image(s.entry.path, s.choice, flip=False) for s in batch])
            time_ids = (batch_time_ids([s.entry.size for s in batch], [s.choice.bucket for s in batch],
                                       [False] * len(batch), run.device) if run.sdxl else None)
            masks = (torch.stack([prepare_mask(s.entry, s.choice) for s in batch]).unsqueeze(1).to(run.device)
                     if any(mask_source(s.entry) is not None for s in batch) else None)
            inputs.append(ValidationBatch(
                latents=encode_images(run, images),
                captions=[process_caption(s.entry.caption, opts(s), epoch=1, rng=random.Random(0)) for s in batch],
                time_ids=time_ids, masks=masks))
    return inputs


@torch.no_grad()
def validation_loss(run: Run, inputs: list[ValidationBatch] | None = None) -> float:
    """The validation loss of the current weights (see the module docstring); `inputs` from
    `validation_inputs` (computed here when not given)."""
    seed = run.cfg.validation_seed or run.cfg.seed
    modes = [(m, m.training) for m in run.network.modules()]
    run.network.eval()
    total, count = 0.0, 0
    try:
        for bi, vb in enumerate(inputs if inputs is not None else validation_inputs(run)):
            with run.autocast():  # encoded now: a trained text-encoder LoRA changes it
                cond, added = text_conditioning(run, vb.captions, cached=False)
            if vb.time_ids is not None:
                added["time_ids"] = vb.time_ids
            for t in VALIDATION_TIMESTEPS:
                gen = torch.Generator("cpu").manual_seed(seed * 1_000_003 + bi * 1009 + t)
                noise = torch.randn(vb.latents.shape, generator=gen).to(run.device, vb.latents.dtype)
                timesteps = torch.full((len(vb.captions),), t, dtype=torch.long, device=run.device)
                noisy = run.noise_scheduler.add_noise(vb.latents, noise, timesteps)
                loss = loss_of_prediction(run, vb.latents, noise, noisy, timesteps, cond, added, masks=vb.masks)
                total += float(loss.sum())
                count += len(vb.captions)
    finally:
        for m, mode in modes:
            m.training = mode
    return total / max(count, 1)


class ValidationLoss(Callback):
    """kohya's validate_every_n_steps / validate_every_n_epochs cadence; the value also shows in the
    progress bar (`run.metrics["val"]`)."""

    def __init__(self) -> None:
        self.step_values: list[float] = []
        self.inputs: list[ValidationBatch] | None = None  # encoded at the first validation, kept

    def loss(self, run: Run) -> float:
        if self.inputs is None:
            self.inputs = validation_inputs(run)
        return validation_loss(run, self.inputs)

    def on_step_end(self, run: Run) -> None:
        n = run.cfg.validate_every_n_steps
        if n and run.global_step % n == 0 and run.is_main:
            value = self.loss(run)
            self.step_values.append(value)
            run.metrics["val"] = value
            run.log.validation(run.global_step, run.epoch + 1, {
                "loss/validation/step_current": value,
                "loss/validation/step_average": sum(self.step_values) / len(self.step_values)})

    def on_epoch_end(self, run: Run) -> None:
        n = run.cfg.validate_every_n_epochs
        if n and (run.epoch + 1) % n == 0 and run.is_main:
            value = self.loss(run)
            run.metrics["val"] = value
            train_average = run.log.recorder.moving_average
            run.log.validation(run.global_step, run.epoch + 1, {
                "loss/validation/epoch_average": value,
                "loss/validation/epoch_divergence": value - train_average}, tb_step=run.epoch + 1)
