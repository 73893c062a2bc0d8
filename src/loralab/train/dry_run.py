"""`loralab train --dry-run`: everything a run checks before the model loads, and what it would do.

The config is resolved (each key's value and where it came from: default, the file, the command line),
the output folders and the resume folder are checked, the dataset is scanned and bucketed, the steps are
counted and the optimizer and schedule are built on a dummy parameter, the model family is read from
the checkpoint's key names; then a report is printed and nothing else happens: no weights load, no
file or folder is written.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from loralab.config import TrainConfig
from loralab.train.run import Run, check_optimizer, check_outputs, check_resume_folder, count_steps, pick_device, \
    setup_dataset

log = logging.getLogger(__name__)

FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def dry_run(cfg: TrainConfig, sources: dict[str, str], data: tuple[list[str], int] | None = None) -> str:
    """The report of a run that is checked but not started (see the module docstring). `data`: a recipe
    that trains without images (sliders / LECO) says what it trains on instead: (its lines, batches per epoch)."""
    from loralab.models.loader import peek_family

    check_outputs(cfg)
    check_resume_folder(cfg)
    run = Run(cfg=cfg, device=pick_device(cfg.device), out_dir=Path(cfg.output_dir))
    if data is None:
        setup_dataset(run)
    count_steps(run, run.dataset.num_batches_per_epoch if data is None else data[1])
    check_optimizer(run)
    family = peek_family(cfg.pretrained_model_name_or_path)
    lines = ["config (every key; the source of each value in brackets):"]
    lines += config_lines(cfg, sources)
    lines += ["", "dataset:"] + (dataset_lines(run) if data is None else
                                 [*data[0], f"  {data[1]} batches per epoch, {run.steps_per_epoch} steps per epoch, "
                                            f"{run.num_epochs} epochs, {run.max_steps} steps"])
    lines += ["", f"model: {cfg.pretrained_model_name_or_path}: "
                  f"{FAMILY_NAMES.get(family, 'family not recognised from its key names')} (weights not loaded)"]
    lines += block_lines(cfg, family)
    lines += ["", "dry run: the config and the dataset are valid; nothing was loaded or written."]
    return "\n".join(lines)


def block_lines(cfg: TrainConfig, family: str | None) -> list[str]:
    """With block-wise network_args: each UNet block's dims and lr weight (network/blocks.py)."""
    from loralab.network.blocks import block_plan

    net = cfg.network_config()
    plan = block_plan(net.blocks, family, net.dim, net.alpha, net.conv_dim, net.conv_alpha) if net.blocks and family \
        else None
    if plan is None:
        return []
    return ["", "UNet blocks (kohya's numbering; dim 0 or lr x 0: no modules; the text encoders keep network_dim):"] \
        + [f"  {line}" for line in plan.describe()]


def config_lines(cfg: TrainConfig, sources: dict[str, str]) -> list[str]:
    """`key = value  [source]`, grouped as `loralab train --help` groups them; keys left at their
    default are listed too, marked [default]."""
    out: list[str] = []
    group = None
    width = max(len(f.name) for f in dataclasses.fields(cfg))
    for f in dataclasses.fields(cfg):
        if f.metadata.get("group", "") != group:
            group = f.metadata.get("group", "")
            out.append(f"  [{group}]")
        out.append(f"    {f.name:<{width}} = {getattr(cfg, f.name)!r}  [{sources.get(f.name, 'default')}]")
    return out


def dataset_lines(run: Run) -> list[str]:
    cfg, ds = run.cfg, run.dataset
    out = []
    for s in run.subsets:
        kind = "reg" if s.is_reg else "train"
        out.append(f"  {s.dir}: {s.img_count} images x {s.num_repeats} repeats ({kind}, class tokens {s.class_tokens!r})")
    for b in ds.buckets:
        out.append(f"  bucket {b.resolution[0]}x{b.resolution[1]}: {b.images} images, {b.count} samples per epoch")
    if run.val_dataset is not None:
        out.append(f"  validation: {sum(1 for _ in run.val_dataset.samples)} images held out")
    size = "" if cfg.dataset_config else f"batch size {cfg.train_batch_size}, "  # else each [[datasets]] has its own
    out.append(f"  {size}{ds.num_batches_per_epoch} batches per epoch, "
               f"{run.steps_per_epoch} steps per epoch, {run.num_epochs} epochs, {run.max_steps} steps")
    if run.prompts:
        out.append(f"  sample prompts: {len(run.prompts)} (from {cfg.sample_prompts})")
    return out
