"""The training recipe: load, prepare, loop, save. Read it top to bottom.

Randomness: every random draw of a step (caption shuffle and dropout, flips, noise, timesteps, LoRA
dropouts, VAE sampling) comes from generators seeded by (seed, global step, micro-batch, process), and
the epoch's batch order from (seed, epoch). So a run resumed from a state folder continues exactly as the
straight run would have, and two runs with the same config give the same weights.

Model families: SD 1.x / 2.x and SDXL go through the same steps. SDXL differs only where the model does:
two text encoders (both trained with text_encoder_lr, as kohya), their joined hidden states plus a pooled
embedding (`models/text.py`), and each image's size/crop micro-conditioning (`models/sdxl.py`), handed to
the UNet as `added_cond_kwargs`.

Multi-GPU: under `accelerate launch`, each process takes every N-th batch of the epoch (padded by
wrapping around so all processes take the same number of steps) and the LoRA gradients are averaged
with one all-reduce per optimizer step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from loralab.config import TrainConfig
from loralab.errors import LoralabError

log = logging.getLogger(__name__)


@dataclass
class TrainHooks:
    """Extension points for variants (validation, sliders, pivotal tuning) without copying the loop."""
    on_train_start: Callable[["TrainContext"], None] | None = None  # models ready, just before the first step
    on_step_end: Callable[["TrainContext"], None] | None = None
    on_epoch_end: Callable[["TrainContext"], None] | None = None


@dataclass
class TrainResult:
    final_file: Path | None
    saved_files: list[Path]
    sample_files: list[Path]
    global_step: int
    epochs: int
    log_file: Path
    last_loss: float


@dataclass
class TrainContext:
    """What hooks (and the helpers below) can see of a running training."""
    cfg: TrainConfig
    model: Any
    network: Any
    epoch: int = 0
    global_step: int = 0
    losses: list[float] = field(default_factory=list)


def step_seed(seed: int, global_step: int, micro: int, rank: int) -> int:
    """Seed of one micro-batch's random draws: a function of the counters only (so resume is exact)."""
    return (seed * 1_000_003 + global_step * 9_973 + micro * 101 + rank * 7 + 12_345) % (2**63 - 1)


def pick_device(name: str) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(cfg: TrainConfig, hooks: TrainHooks | None = None) -> TrainResult:
    from accelerate import Accelerator

    from loralab.data.captions import CaptionOptions, process_caption
    from loralab.data.dataset import FolderDataset, dataset_dirs, scan_folder_dataset, tag_frequency
    from loralab.data.images import prepare_image
    from loralab.data.latents import cache_latents
    from loralab.data.text_encoder_cache import cache_text_encoder_outputs, encoders_id, output_names
    from loralab.models.fp8 import check_fp8_supported, store_fp8
    from loralab.models.loader import load_base_model, peek_family
    from loralab.models.sdxl import batch_time_ids
    from loralab.models.text import encode_captions, unet_text_conditioning
    from loralab.network.lora import LoRANetwork, NetworkConfig
    from loralab.train import noise as N
    from loralab.train.logs import TrainLog
    from loralab.train.metadata import RunInfo, build_metadata
    from loralab.train.optim import create_optimizer, create_scheduler, current_lrs, parse_optimizer_args, resolve_warmup_steps
    from loralab.train.sampling import generate_samples, parse_prompt_file
    from loralab.train.state import TrainCounters, load_counters, load_state, save_state

    hooks = hooks or TrainHooks()
    t_start = time.time()
    device = pick_device(cfg.device)
    acc = Accelerator(cpu=device.type == "cpu")
    if acc.num_processes > 1:
        device = acc.device
    rank, world = acc.process_index, acc.num_processes
    main = acc.is_main_process
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    # ------------------------------------------------------------------ 1. data (before any model loads)
    family_hint = peek_family(cfg.pretrained_model_name_or_path)  # from the key names, for the bucket-step check
    subsets = scan_folder_dataset(cfg.train_data_dir, cfg.reg_data_dir or None, caption_extension=cfg.caption_extension,
                                  enable_wildcard=cfg.enable_wildcard)
    dataset = FolderDataset(
        subsets, resolution=cfg.resolution_wh(), enable_bucket=cfg.enable_bucket, min_bucket_reso=cfg.min_bucket_reso,
        max_bucket_reso=cfg.max_bucket_reso, bucket_reso_steps=cfg.bucket_reso_steps,
        bucket_no_upscale=cfg.bucket_no_upscale, batch_size=cfg.train_batch_size,
        required_reso_steps=32 if family_hint == "sdxl" else 64)
    caption_opts = CaptionOptions(
        shuffle_caption=cfg.shuffle_caption, caption_separator=cfg.caption_separator, keep_tokens=cfg.keep_tokens,
        keep_tokens_separator=cfg.keep_tokens_separator, secondary_separator=cfg.secondary_separator or None,
        enable_wildcard=cfg.enable_wildcard, caption_prefix=cfg.caption_prefix or None,
        caption_suffix=cfg.caption_suffix or None, caption_dropout_rate=cfg.caption_dropout_rate,
        caption_dropout_every_n_epochs=cfg.caption_dropout_every_n_epochs,
        caption_tag_dropout_rate=cfg.caption_tag_dropout_rate)
    prompts = parse_prompt_file(cfg.sample_prompts) if cfg.sample_prompts else []

    # steps: each process takes ceil(batches / processes) batches an epoch; an optimizer step every `accum`
    accum = cfg.gradient_accumulation_steps
    batches_per_proc = math.ceil(dataset.num_batches_per_epoch / world)
    steps_per_epoch = math.ceil(batches_per_proc / accum)
    if cfg.max_train_epochs > 0:
        num_epochs = cfg.max_train_epochs
        max_steps = num_epochs * steps_per_epoch
    else:
        max_steps = cfg.max_train_steps
        num_epochs = math.ceil(max_steps / steps_per_epoch)
    if main:
        log.info("dataset: %d train images (x repeats), %d reg images, %d batches/epoch, %d steps/epoch, %d epochs, %d steps",
                 dataset.num_train_images, dataset.num_reg_images, dataset.num_batches_per_epoch, steps_per_epoch,
                 num_epochs, max_steps)

    # ------------------------------------------------------------------ 2. model and network
    model = load_base_model(cfg.pretrained_model_name_or_path, vae=cfg.vae or None,
                            v_parameterization=cfg.v_parameterization or None)
    sdxl = model.family == "sdxl"
    if sdxl and cfg.clip_skip > 1:
        log.warning("clip_skip = %d is ignored for SDXL (it always uses the penultimate layers, as kohya)", cfg.clip_skip)
    scheduler_noise = model.noise_scheduler()
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    unet, vae = model.unet, model.vae
    text_encoders, tokenizers = model.text_encoders, model.tokenizers  # SDXL: [CLIP-L, bigG]
    for m in (unet, vae, *text_encoders):
        m.requires_grad_(False)
        m.eval()
    _to(vae, device, torch.float32)  # the VAE stays fp32 (fp16 VAEs overflow: kohya's no_half_vae)

    opts = cfg.network_options()
    train_unet = not cfg.network_train_text_encoder_only
    train_te = not cfg.network_train_unet_only and cfg.text_encoder_lr != 0
    _to(unet, device, weight_dtype)
    if cfg.fp8_base:  # before the LoRA hooks wrap the layers' forward
        check_fp8_supported(device, weight_dtype)
        store_fp8(unet, compute_dtype=weight_dtype)
    for te in text_encoders:
        _to(te, device, weight_dtype if not train_te else torch.float32)
    net_cfg = NetworkConfig(dim=cfg.network_dim, alpha=cfg.network_alpha, conv_dim=opts["conv_dim"] or None,
                            conv_alpha=opts["conv_alpha"], dropout=cfg.network_dropout or None,
                            rank_dropout=opts["rank_dropout"] or None, module_dropout=opts["module_dropout"] or None,
                            train_unet=train_unet, train_text_encoder=not cfg.network_train_unet_only)
    if cfg.network_weights:
        network = LoRANetwork.from_weights(cfg.network_weights, unet, text_encoders, model.family, cfg=net_cfg)
    else:
        network = LoRANetwork.create(unet, text_encoders, model.family, net_cfg)
    network.apply_to()
    network.to(device, dtype=torch.float32)
    if not train_te:
        log.warning("the text-encoder LoRA is not trained (%s)",
                    "network_train_unet_only" if cfg.network_train_unet_only else "text_encoder_lr = 0")
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
        for te in text_encoders if train_te else []:
            if hasattr(te, "gradient_checkpointing_enable"):
                te.gradient_checkpointing_enable()
                te.train()

    unet_lr = cfg.unet_lr if cfg.unet_lr >= 0 else None
    te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr >= 0 else None
    groups = network.param_groups(unet_lr=unet_lr if train_unet else 0, text_encoder_lr=te_lr if train_te else 0,
                                  learning_rate=cfg.learning_rate)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise LoralabError("nothing to train: both the UNet and the text-encoder LoRA are switched off")
    optimizer, optimizer_desc = create_optimizer(cfg.optimizer_type, groups, cfg.learning_rate,
                                                 parse_optimizer_args(cfg.optimizer_args))
    lr_scheduler = create_scheduler(cfg.lr_scheduler, optimizer,
                                    warmup_steps=resolve_warmup_steps(cfg.lr_warmup_steps, max_steps),
                                    total_steps=max_steps, num_cycles=cfg.lr_scheduler_num_cycles,
                                    power=cfg.lr_scheduler_power, initial_lr=cfg.learning_rate)
    scaler = torch.amp.GradScaler(device.type) if cfg.mixed_precision == "fp16" else None

    # ------------------------------------------------------------------ 3. latents and text-encoder outputs
    def encode_images(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            dist = vae.encode(images.to(device, torch.float32)).latent_dist
            return dist.sample() * model.vae_scaling_factor

    vae_id = f"{Path(cfg.vae or cfg.pretrained_model_name_or_path).name}:{model.model_hash[:16]}"
    latent_cache = None
    if cfg.cache_latents:
        latent_cache = cache_latents(dataset.samples, encode_images, to_disk=cfg.cache_latents_to_disk,
                                     flip_aug=cfg.flip_aug, vae_id=vae_id, batch_size=cfg.vae_batch_size, progress=main,
                                     npz_suffix="_sdxl.npz" if sdxl else "_sd.npz")

    def batch_latents(batch: list, flips: list[bool]) -> torch.Tensor:
        if latent_cache is not None:
            return torch.stack([latent_cache.get(s, flipped=f) for s, f in zip(batch, flips)]).to(device)
        images = torch.stack([prepare_image(s.entry.path, s.choice, flip=f) for s, f in zip(batch, flips)])
        return encode_images(images)

    def encode_prompts(texts: list[str]) -> tuple[torch.Tensor, ...]:
        """The text encoders' outputs: (hidden,) for SD 1.x/2.x, (hidden1, hidden2, pool2) for SDXL."""
        return encode_captions(model.family, text_encoders, tokenizers, texts, max_token_length=cfg.max_token_length,
                               clip_skip=cfg.clip_skip or None)

    # text-encoder outputs, once per caption (config.validate allows this only for frozen encoders and
    # captions that do not change per step; a dropped caption uses the cached "")
    te_cache = None
    if cfg.cache_text_encoder_outputs:
        no_dropout = dataclasses.replace(caption_opts, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0)
        items = [(s.entry.path, process_caption(s.entry.caption, no_dropout, epoch=1, rng=random.Random(0)))
                 for s in dataset.samples]
        dropout = cfg.caption_dropout_rate > 0 or cfg.caption_dropout_every_n_epochs > 0
        te_id = encoders_id(model_source=cfg.pretrained_model_name_or_path, model_hash=model.model_hash,
                            network_weights=cfg.network_weights or None, max_token_length=cfg.max_token_length,
                            dtype=weight_dtype, clip_skip=None if sdxl else cfg.clip_skip or None)
        with autocast_for(device, weight_dtype):
            te_cache = cache_text_encoder_outputs(items, encode_prompts, names=output_names(model.family),
                                                  to_disk=cfg.cache_text_encoder_outputs_to_disk, encoders=te_id,
                                                  extra_captions=[""] if dropout else [],
                                                  batch_size=cfg.train_batch_size, progress=main)
        if device.type != "cpu" and not network.text_encoder_loras:  # needed again only for sample prompts
            for te in text_encoders:
                te.to("cpu", dtype=torch.float32)

    def text_conditioning(captions: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The UNet's encoder_hidden_states and added_cond_kwargs (SDXL: text_embeds) for captions."""
        outputs = te_cache.get(captions, device) if te_cache is not None else encode_prompts(captions)
        hidden, added = unet_text_conditioning(model.family, outputs)
        return hidden.to(device), {k: v.to(device) for k, v in added.items()}

    # ------------------------------------------------------------------ 4. resume
    epoch0, global_step, skip_batches = 0, 0, 0
    if cfg.resume:
        counters = load_counters(cfg.resume)
        sd = load_state(cfg.resume, optimizer=optimizer, scheduler=lr_scheduler, scaler=scaler)
        network.load_weights(sd)
        epoch0, global_step, skip_batches = counters.epoch, counters.global_step, counters.batch_in_epoch
        log.info("resumed from %s: epoch %d, step %d", cfg.resume, epoch0, global_step)

    # ------------------------------------------------------------------ 5. outputs
    run = RunInfo(session_id=random.Random(cfg.seed).randint(0, 2**32), started_at=t_start, family=model.family,
                  v_parameterization=model.v_parameterization, model_name=Path(cfg.pretrained_model_name_or_path).name,
                  model_hash=model.model_hash, vae_name=Path(cfg.vae).name if cfg.vae else "",
                  num_train_images=dataset.num_train_images, num_reg_images=dataset.num_reg_images,
                  num_batches_per_epoch=dataset.num_batches_per_epoch, num_epochs=num_epochs, max_train_steps=max_steps,
                  optimizer_desc=optimizer_desc, tag_frequency=tag_frequency(subsets),
                  dataset_dirs=dataset_dirs(subsets, reg=False), reg_dataset_dirs=dataset_dirs(subsets, reg=True),
                  bucket_info=dataset.bucket_info() if cfg.enable_bucket else None, network_args=opts)
    save_dtype = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.save_precision]
    train_log = TrainLog(out_dir, logging_dir=cfg.logging_dir or None, log_prefix=cfg.log_prefix, enabled=main)
    if cfg.resume and counters.log_state:
        train_log.load_state_dict(counters.log_state)
    saved: list[Path] = []
    samples: list[Path] = []
    ctx = TrainContext(cfg=cfg, model=model, network=network, epoch=epoch0, global_step=global_step)

    def save_network(path: Path, epoch: int) -> None:
        if not main:
            return
        md = build_metadata(cfg, run, epoch=epoch, step=ctx.global_step, final=path.stem == cfg.output_name)
        network.save(path, save_dtype, md)
        saved.append(path)
        log.info("saved %s", path)

    def save_training_state(name: str, epoch: int, batch_in_epoch: int) -> None:
        if main:
            save_state(out_dir / name, network_sd=network.state_dict(), optimizer=optimizer, scheduler=lr_scheduler,
                       scaler=scaler, counters=TrainCounters(epoch=epoch, global_step=ctx.global_step,
                                                             batch_in_epoch=batch_in_epoch, seed=cfg.seed,
                                                             max_train_steps=max_steps,
                                                             log_state=train_log.state_dict()))

    def sample_conditioning(texts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden, added = unet_text_conditioning(model.family, encode_prompts(texts))
        return hidden.to(weight_dtype), added

    def sample(stem: str) -> None:
        if not (main and prompts):
            return
        files = generate_samples(unet=unet, vae=vae, vae_scaling_factor=model.vae_scaling_factor,
                                 encode_prompt=sample_conditioning,
                                 scheduler_config=dict(scheduler_noise.config), prompts=prompts,
                                 out_dir=out_dir / "sample", file_stem=stem, device=device, dtype=weight_dtype,
                                 default_seed=cfg.seed, v_parameterization=model.v_parameterization,
                                 sampler=cfg.sample_sampler or ("euler_a" if sdxl else "ddim"), eval_modules=[network])
        samples.extend(files)

    if cfg.sample_at_first and not cfg.resume:
        sample(f"{cfg.output_name}_e{0:06d}")

    # ------------------------------------------------------------------ 6. the loop
    if hooks.on_train_start:
        hooks.on_train_start(ctx)
    network.train()
    autocast = autocast_for(device, weight_dtype)
    last_good = None
    progress = _progress(total=max_steps, initial=global_step, enabled=main)
    loss_value = float("nan")
    for epoch in range(epoch0, num_epochs):
        ctx.epoch = epoch
        batches = dataset.batches_for_epoch(epoch, seed=cfg.seed)
        mine = [batches[(i * world + rank) % len(batches)] for i in range(batches_per_proc)]
        epoch_losses: list[float] = []
        for bi in range(skip_batches if epoch == epoch0 else 0, len(mine)):
            batch = mine[bi]
            micro = bi % accum
            seed = step_seed(cfg.seed, ctx.global_step, micro, rank)
            rng = random.Random(seed)
            torch.manual_seed(seed)  # LoRA dropouts and VAE sampling draw from the global generator
            gen = torch.Generator(device).manual_seed(seed)

            # one training step, as a recipe
            captions = [process_caption(s.entry.caption, caption_opts, epoch=epoch + 1, rng=rng) for s in batch]
            flips = [cfg.flip_aug and rng.random() < 0.5 for _ in batch]
            latents = batch_latents(batch, flips)
            te_grad = train_te and (cfg.stop_text_encoder_training == 0 or ctx.global_step < cfg.stop_text_encoder_training)
            with torch.set_grad_enabled(te_grad), autocast:
                cond, added = text_conditioning(captions)
            if sdxl:  # each image's original size, crop and target size (kohya's micro-conditioning)
                added["time_ids"] = batch_time_ids([s.entry.size for s in batch], [s.choice.bucket for s in batch],
                                                   flips, device)
            noise, noisy, timesteps = N.make_noisy_latents(
                latents, scheduler_noise, noise_offset=cfg.noise_offset,
                noise_offset_random_strength=cfg.noise_offset_random_strength,
                adaptive_noise_scale=cfg.adaptive_noise_scale or None,
                multires_noise_iterations=cfg.multires_noise_iterations,
                multires_noise_discount=cfg.multires_noise_discount, min_timestep=cfg.min_timestep,
                max_timestep=cfg.max_timestep, generator=gen)
            with autocast:
                pred = unet(noisy.to(weight_dtype), timesteps, cond.to(weight_dtype),
                            added_cond_kwargs=added or None).sample
            target = N.training_target(scheduler_noise, latents, noise, timesteps, model.v_parameterization)
            weights = N.prior_loss_weight([s.is_reg for s in batch], cfg.prior_loss_weight).to(device)
            loss = N.loss_per_sample(pred.float(), target.float(), loss_weights=weights, timesteps=timesteps,
                                     scheduler=scheduler_noise, min_snr_gamma=cfg.min_snr_gamma or None,
                                     v_parameterization=model.v_parameterization).mean()
            if not torch.isfinite(loss):
                train_log.event("nan", step=ctx.global_step, epoch=epoch + 1)
                train_log.close()
                kept = f" The last good file is {last_good}." if last_good else " No LoRA file was saved before it."
                raise LoralabError(
                    f"the loss became NaN at step {ctx.global_step + 1} (epoch {epoch + 1}); training stopped.{kept} "
                    "Try a lower learning_rate (or unet_lr/text_encoder_lr), mixed_precision = \"bf16\" instead of "
                    "\"fp16\", max_grad_norm = 1.0, or check the images for broken files.")
            (scaler.scale(loss / accum) if scaler else loss / accum).backward()

            if micro == accum - 1 or bi == len(mine) - 1:
                if world > 1:
                    _all_reduce_grads(params, world)
                if scaler:
                    scaler.unscale_(optimizer)
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                norms = network.max_norm(cfg.scale_weight_norms) if cfg.scale_weight_norms > 0 else None
                ctx.global_step += 1
                loss_value = float(loss.detach())
                epoch_losses.append(loss_value)
                ctx.losses.append(loss_value)
                lrs = current_lrs(optimizer, lr_scheduler)
                train_log.step(ctx.global_step, epoch + 1, loss_value, lrs, max_norm=norms)
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}", epoch=epoch + 1)
                if hooks.on_step_end:
                    hooks.on_step_end(ctx)
                if cfg.save_every_n_steps and ctx.global_step % cfg.save_every_n_steps == 0 and ctx.global_step < max_steps:
                    last_good = out_dir / f"{cfg.output_name}-step{ctx.global_step:08d}.safetensors"
                    save_network(last_good, epoch + 1)
                    if cfg.save_state:
                        save_training_state(f"{cfg.output_name}-step{ctx.global_step:08d}-state", epoch, bi + 1)
                if cfg.sample_every_n_steps and ctx.global_step % cfg.sample_every_n_steps == 0 and not cfg.sample_every_n_epochs:
                    sample(f"{cfg.output_name}_{ctx.global_step:06d}")
                if ctx.global_step >= max_steps:
                    break
        skip_batches = 0
        ep = epoch + 1
        if epoch_losses:
            train_log.epoch(ep, step=ctx.global_step)
        finished = ctx.global_step >= max_steps or ep == num_epochs
        if cfg.save_every_n_epochs and ep % cfg.save_every_n_epochs == 0 and not finished:
            last_good = out_dir / f"{cfg.output_name}-{ep:06d}.safetensors"
            save_network(last_good, ep)
            if cfg.save_state:
                save_training_state(f"{cfg.output_name}-{ep:06d}-state", ep, 0)
        if cfg.sample_every_n_epochs and ep % cfg.sample_every_n_epochs == 0:
            sample(f"{cfg.output_name}_e{ep:06d}")
        if hooks.on_epoch_end:
            hooks.on_epoch_end(ctx)  # after this epoch's saves, so a hook may stop the run like an interruption
        if finished:
            break
    progress.close()

    # ------------------------------------------------------------------ 7. final save
    final = out_dir / f"{cfg.output_name}.safetensors"
    save_network(final, ctx.epoch + 1)
    if cfg.save_state or cfg.save_state_on_train_end:
        save_training_state(f"{cfg.output_name}-state", ctx.epoch + 1, 0)
    train_log.event("done", step=ctx.global_step, epoch=ctx.epoch + 1, seconds=round(time.time() - t_start, 2))
    train_log.close()
    if world > 1:
        acc.wait_for_everyone()
    network.restore()
    return TrainResult(final_file=final if main else None, saved_files=saved, sample_files=samples,
                       global_step=ctx.global_step, epochs=ctx.epoch + 1, log_file=train_log.jsonl_path,
                       last_loss=loss_value)


def autocast_for(device: torch.device, dtype: torch.dtype):
    """torch.autocast for mixed precision (fp16/bf16); a no-op context for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def _to(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a frozen model; cast only when the dtype changes (diffusers warns on every cast)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)


def _all_reduce_grads(params: list[torch.Tensor], world: int) -> None:
    """Average the LoRA gradients over processes (one flat all-reduce)."""
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


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="steps", unit="step", dynamic_ncols=True)
