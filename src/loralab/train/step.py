"""One training step: the diffusion loss of a batch, then the optimizer step.

Randomness: every random draw of a step (caption shuffle and dropout, flips, random crops and colour
changes, noise, timesteps, LoRA dropouts, VAE sampling) comes from generators seeded by `step_seed(seed,
global step, micro-batch, process)`, so a run resumed from a state folder continues exactly as the
straight run would have, and two runs with the same config give the same weights.

Model families: SD 1.x / 2.x and SDXL go through the same step. SDXL differs only where the model does:
two text encoders, their joined hidden states plus a pooled embedding (`models/text.py`), and each
image's size/crop micro-conditioning (`models/sdxl.py`), handed to the UNet as `added_cond_kwargs`.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, fields

import torch

from loralab.config import TrainConfig
from loralab.data.transfer import to_device
from loralab.errors import LoralabError
from loralab.train.noise import LossOptions
from loralab.train.run import Run, encode_images, encode_prompts


def step_seed(seed: int, global_step: int, micro: int, rank: int) -> int:
    """Seed of one micro-batch's random draws: a function of the counters only (so resume is exact)."""
    return (seed * 1_000_003 + global_step * 9_973 + micro * 101 + rank * 7 + 12_345) % (2**63 - 1)


def batch_latents(run: Run, batch: list, flips: list[bool], augments: list | None = None) -> torch.Tensor:
    """The batch's latents: from the latent cache, or the images encoded now, each with its flip and its
    `augments` entry (`data/augment.py` PixelAugment: random crop box, colour change; None: neither)."""
    from loralab.data.images import prepare_image

    augments = augments or [None] * len(batch)
    if run.latent_cache is not None:
        if any(a is not None for a in augments):  # config_problems refuses this combination
            raise LoralabError("color_aug / random_crop cannot be used with cached latents")
        return to_device(torch.stack([run.latent_cache.get(s, flipped=f) for s, f in zip(batch, flips)]), run.device)
    images = torch.stack([prepare_image(s.entry.path, s.choice, flip=f, augment=a)
                          for s, f, a in zip(batch, flips, augments)])
    return encode_images(run, images)


def batch_masks(run: Run, batch: list, flips: list[bool], augments: list) -> torch.Tensor | None:
    """The batch's loss masks (`data/masks.py`), (B, 1, H, W) in [0, 1], each through its image's crop and
    flip: from the latent cache, or made now. None when no image of the batch has a mask; an image without
    one gets all ones next to those that have one (sd-scripts' rule)."""
    from loralab.data.masks import mask_source, prepare_mask

    if all(mask_source(s.entry) is None for s in batch):
        return None
    if run.latent_cache is not None:
        masks = [run.latent_cache.get_mask(s, flipped=f) for s, f in zip(batch, flips)]
    else:
        masks = [prepare_mask(s.entry, s.choice, flip=f, crop_ltrb=a.crop_ltrb if a is not None else None)
                 for s, f, a in zip(batch, flips, augments)]
    return to_device(torch.stack(masks).unsqueeze(1), run.device)


def pixel_augments(run: Run, batch: list, rng: random.Random) -> list:
    """Each sample's random crop and colour change for this step (`data/augment.py` draw_pixel_augment), with
    its subset's color_aug / random_crop (a dataset_config subset's own, else the config's), drawn from the
    step's seeded `rng`; None for a sample with both off, which draws nothing."""
    from loralab.data.augment import draw_pixel_augment
    from loralab.data.dataset import subset_flag

    cfg = run.cfg
    return [draw_pixel_augment(s.choice, color_aug=subset_flag(s.entry.subset, "color_aug", cfg.color_aug),
                               random_crop=subset_flag(s.entry.subset, "random_crop", cfg.random_crop), rng=rng)
            for s in batch]


def sdxl_time_ids(run: Run, batch: list, flips: list[bool], augments: list) -> torch.Tensor:
    """SDXL's size and crop micro-conditioning of the batch (`models/sdxl.py`): kohya's rule, except that a
    random crop's crop_top_left is where that crop was cut (`random_crop_top_left`)."""
    from loralab.models.sdxl import batch_time_ids, random_crop_top_left

    crops = [None if a is None or a.crop_ltrb is None else random_crop_top_left(a.crop_ltrb, s.choice.resized, f)
             for s, f, a in zip(batch, flips, augments)]
    return to_device(batch_time_ids([s.entry.size for s in batch], [s.choice.bucket for s in batch], flips,
                                    crops=crops), run.device)


def text_conditioning(run: Run, captions: list[str], cached: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The UNet's encoder_hidden_states and added_cond_kwargs (SDXL: text_embeds) for captions: from the
    text-encoder cache when the run has one (and `cached`), else encoded now (`encode_prompts`). With
    weighted_captions both are weighted: `(tag:1.2)` scales that tag's hidden states (`models/text.py`)."""
    from loralab.models.text import unet_text_conditioning

    use_cache = cached and run.te_cache is not None
    outputs = run.te_cache.get(captions, run.device) if use_cache else encode_prompts(run, captions)
    hidden, added = unet_text_conditioning(run.model.family, outputs)
    return hidden.to(run.device), {k: v.to(run.device) for k, v in added.items()}


def trains_text_encoder_now(run: Run) -> bool:
    """The text-encoder LoRA gets gradients this step: it is trained and stop_text_encoder_training has
    not been reached (kohya: 0 = never stop)."""
    stop = run.cfg.stop_text_encoder_training
    return run.train_te and (stop == 0 or run.global_step < stop)


def diffusion_loss(run: Run, batch: list, rng: random.Random, generator: torch.Generator) -> torch.Tensor:
    """The weighted diffusion loss of one batch of dataset samples (a scalar):

        captions (kohya's pipeline), flips, crops and colours → latents → text conditioning (+ SDXL size/crop ids)
        → noise, timesteps, noisy latents → UNet → target (ε or v) → per-sample loss (loss_type, × the
        loss masks, reg images × prior_loss_weight, SNR weights: min-SNR, v-pred scales, debiased) → mean.
    """
    from loralab.data.captions import process_caption
    from loralab.data.dataset import subset_flag
    from loralab.train import noise as N

    cfg = run.cfg
    captions = [process_caption(s.entry.caption, s.entry.subset.caption_options or run.caption_opts,  # a subset's own
                                epoch=run.epoch + 1, rng=rng, step=run.global_step, max_train_steps=run.max_steps)
                for s in batch]
    flips = [subset_flag(s.entry.subset, "flip_aug", cfg.flip_aug) and rng.random() < 0.5
             for s in batch]  # a dataset_config subset's own flip_aug
    augments = pixel_augments(run, batch, rng)  # color_aug / random_crop: no draw when both are off
    latents = batch_latents(run, batch, flips, augments)
    with torch.set_grad_enabled(trains_text_encoder_now(run)), run.autocast():
        cond, added = text_conditioning(run, captions)
    if run.sdxl:  # each image's original size, crop and target size (kohya's micro-conditioning)
        added["time_ids"] = sdxl_time_ids(run, batch, flips, augments)
    noise, noisy, timesteps = N.make_noisy_latents(latents, run.noise_scheduler, **cfg.noise_options(),
                                                   generator=generator)
    weights = to_device(N.prior_loss_weight([s.is_reg for s in batch], cfg.prior_loss_weight), run.device)
    masks = batch_masks(run, batch, flips, augments)
    return loss_of_prediction(run, latents, noise, noisy, timesteps, cond, added, weights, masks).mean()


def loss_of_prediction(run: Run, latents: torch.Tensor, noise: torch.Tensor, noisy: torch.Tensor,
                       timesteps: torch.Tensor, cond: torch.Tensor, added: dict[str, torch.Tensor],
                       weights: torch.Tensor | None = None, masks: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet's prediction for the noisy latents against its target (ε or v), as a per-sample loss
    (loss_type, × the loss `masks`, × `weights`, × the SNR weights of the config): `train/noise.py`
    loss_per_sample."""
    from loralab.train import noise as N

    model, dtype = run.model, run.weight_dtype
    with run.autocast():
        unet = model.unet if run.unet_forward is None else run.unet_forward  # compiled with torch_compile
        pred = unet(noisy.to(dtype), timesteps, cond.to(dtype), added_cond_kwargs=added or None).sample
    target = N.training_target(run.noise_scheduler, latents, noise, timesteps, model.v_parameterization)
    return N.loss_per_sample(pred.float(), target.float(), loss_weights=weights, timesteps=timesteps,
                             scheduler=run.noise_scheduler, options=loss_options(run.cfg),
                             v_parameterization=model.v_parameterization, mask=masks)


def loss_options(cfg: TrainConfig) -> LossOptions:
    """The config's loss settings (`train/noise.py` LossOptions: its fields are config keys of the same names)."""
    return LossOptions(**{f.name: getattr(cfg, f.name) for f in fields(LossOptions)})


def nan_guard(run: Run, loss: torch.Tensor) -> None:
    """Under several processes: stop every process with advice when any of them has a non-finite loss (one
    all-reduce of a flag per micro-batch), so none is left waiting in the gradient all-reduce. A single
    process checks its losses without waiting for the GPU, when `flush_steps` reads them."""
    if run.world == 1:
        return
    import torch.distributed as dist

    bad = ~torch.isfinite(loss.detach()).reshape(1)
    flags = bad.float()
    dist.all_reduce(flags)
    if flags.item() > 0:
        stop_on_nan(run, run.global_step + 1, run.epoch + 1, "" if bad.item() else " in another process")


def stop_on_nan(run: Run, step: int, epoch: int, where: str = "") -> None:
    """The loss of optimizer step `step` (1-based) was not finite: log it and stop with advice; the files saved
    so far stay (every save reads the pending losses first, so none was saved after the bad step)."""
    run.log.event("nan", step=step, epoch=epoch)
    run.log.close()
    kept = f" The last good file is {run.last_good}." if run.last_good else " No LoRA file was saved before it."
    raise LoralabError(
        f"the loss became NaN{where} at step {step} (epoch {epoch}); training stopped.{kept} "
        "Try a lower learning_rate (or unet_lr/text_encoder_lr), mixed_precision = \"bf16\" instead of "
        "\"fp16\", max_grad_norm = 1.0, or check the images for broken files.")


@dataclass
class PendingStep:
    """An optimizer step whose loss is still on the device: logged by `flush_steps`."""
    step: int
    epoch: int
    loss: torch.Tensor  # the last micro-batch's loss, as logged
    check: torch.Tensor  # the sum of the step's micro-batch losses: not finite when any of them was not
    lrs: dict
    max_norm: tuple | None
    time: float


def record_step(run: Run, losses: list[torch.Tensor], max_norm: tuple | None) -> None:
    """Keep the step's losses on the device (no host synchronisation); every `log_every_n_steps` steps, and
    under several processes every step, `flush_steps` reads them."""
    from loralab.train.optim import current_lrs

    detached = [x.detach() for x in losses]
    check = detached[0] if len(detached) == 1 else torch.stack(detached).sum()  # no extra kernel without accumulation
    run.pending.append(PendingStep(run.global_step, run.epoch + 1, detached[-1], check,
                                   current_lrs(run.optimizer, run.lr_scheduler), max_norm, time.time()))
    if run.world > 1 or run.global_step % max(1, run.cfg.log_every_n_steps) == 0:
        flush_steps(run)


def flush_steps(run: Run, check: bool = True) -> None:
    """Read the pending steps' losses with one host synchronisation, stop on the first non-finite one
    (`stop_on_nan`; not with `check=False`, for a run that is failing anyway), log the others in order and set
    `run.last_loss` / `run.losses`. Called by `record_step`, before every save and before any other log record
    (`TrainLog.before_write`), so the log stays in step order and no file is saved after a bad step."""
    pending, run.pending = run.pending, []
    if not pending:
        return
    values = torch.stack([torch.stack([p.loss.float(), p.check.float()]) for p in pending]).tolist()
    for p, (value, total) in zip(pending, values):
        if check and not (math.isfinite(value) and math.isfinite(total)):
            stop_on_nan(run, p.step, p.epoch)
        run.log.step(p.step, p.epoch, value, p.lrs, max_norm=p.max_norm, at=p.time)
        run.last_loss = value
        run.losses.append(value)


def backward(run: Run, loss: torch.Tensor) -> None:
    """Accumulate this micro-batch's gradients (loss / accumulation steps; scaled for fp16)."""
    scaled = loss / run.accum
    (run.scaler.scale(scaled) if run.scaler else scaled).backward()


def optimizer_step(run: Run) -> tuple[int, float, float] | None:
    """Average gradients over processes, unscale, clip (max_grad_norm), step the optimizer and the LR
    schedule, clear the gradients, then apply max-norm (scale_weight_norms). Returns the max-norm
    statistics (keys scaled, mean norm, max norm) or None."""
    cfg, opt = run.cfg, run.optimizer
    if run.world > 1:
        all_reduce_grads(run.params, run.world)
    if run.scaler:
        run.scaler.unscale_(opt)
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)
    if run.scaler:
        run.scaler.step(opt)
        run.scaler.update()
    else:
        opt.step()
    run.lr_scheduler.step()
    opt.zero_grad(set_to_none=True)
    return run.network.max_norm(cfg.scale_weight_norms) if cfg.scale_weight_norms > 0 else None


def all_reduce_grads(params: list[torch.Tensor], world: int) -> None:
    """Average the trained parameters' gradients over processes (one flat all-reduce)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
