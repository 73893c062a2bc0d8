"""`prepare(cfg, recipe) -> Run`: everything a training run needs, built by small named functions.

The order is part of the behaviour: the global torch seed is set once at the start, and the LoRA
initialisation and the VAE's latent sampling draw from it, so `prepare` always runs the same steps in
the same order: device, data (before any model loads, so data errors come first), steps, model,
network, optimizer, caches, resume, outputs. A recipe that needs other parts (a slider has no image
dataset) writes its own `prepare` from the same functions.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loralab.config import TrainConfig
from loralab.errors import LoralabError

if TYPE_CHECKING:
    from loralab.train.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class Run:
    """What a training run holds. Built by `prepare`; `fit` advances the counters at the bottom."""
    cfg: TrainConfig
    recipe: Any = None
    accelerator: Any = None
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world: int = 1
    out_dir: Path = Path(".")
    started_at: float = 0.0
    # data
    subsets: list = field(default_factory=list)
    dataset: Any = None
    val_dataset: Any = None  # held-out images for the validation loss (validation_split / validation_data_dir)
    caption_opts: Any = None
    prompts: list = field(default_factory=list)  # sample prompts
    # step counts
    accum: int = 1
    batches_per_proc: int = 0
    steps_per_epoch: int = 0
    num_epochs: int = 0
    max_steps: int = 0
    # model and network
    model: Any = None
    weight_dtype: torch.dtype = torch.float32
    noise_scheduler: Any = None
    network: Any = None
    unet_forward: Any = None  # the compiled UNet with torch_compile (`train/compile.py`); else the UNet is called
    train_unet: bool = True
    train_te: bool = True
    # optimisation
    optimizer: Any = None
    optimizer_desc: str = ""
    lr_scheduler: Any = None
    scaler: Any = None
    params: list = field(default_factory=list)
    # caches
    latent_cache: Any = None
    te_cache: Any = None
    # outputs
    info: Any = None  # metadata.RunInfo
    save_dtype: torch.dtype = torch.float16
    log: Any = None  # logs.TrainLog
    resumed_from: Any = None  # state.TrainCounters
    saved: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    final_file: Path | None = None
    last_good: Path | None = None
    last_state: Path | None = None  # the last state folder written completely
    # counters
    epoch: int = 0
    global_step: int = 0
    skip_batches: int = 0  # batches of the first epoch already done (resume inside an epoch)
    batch_in_epoch: int = 0  # batches of this epoch consumed by this process
    losses: list[float] = field(default_factory=list)
    last_loss: float = float("nan")
    pending: list = field(default_factory=list)  # steps whose loss is still on the device (`step.flush_steps`)
    metrics: dict[str, float] = field(default_factory=dict)  # latest figures of callbacks (e.g. "val"), shown in the progress bar
    stop_reason: str = ""
    interrupted: str = ""  # the signal that interrupted the run (SIGINT, SIGTERM): no final file, a state to resume

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sdxl(self) -> bool:
        return self.model is not None and self.model.family == "sdxl"

    def stop(self, reason: str) -> None:
        """Ask `fit` to end the run cleanly after the current step (or epoch): the final file is saved."""
        self.stop_reason = reason

    def reached_end(self) -> bool:
        """At an epoch's end: all steps are done, or this was the last epoch."""
        return self.global_step >= self.max_steps or self.epoch + 1 >= self.num_epochs

    def finished(self) -> bool:
        """The training is over: all steps done, the last epoch done, or a stop was asked for."""
        return self.reached_end() or bool(self.stop_reason)

    def autocast(self):
        return autocast_for(self.device, self.weight_dtype)


def prepare(cfg: TrainConfig, recipe: Recipe, data: Callable[[Run], int] | None = None) -> Run:
    """Build a run for `recipe` from the config (see the module docstring for the order). `data(run)`, when
    given, replaces the image dataset: it sets up the recipe's own data (a slider's prompts, the sample
    prompts) and returns the batches per epoch; the run then has no dataset and no caches."""
    from loralab.train.compile import compile_unet

    check_outputs(cfg)
    check_resume_folder(cfg)
    run = Run(cfg=cfg, recipe=recipe, started_at=time.time())
    setup_device(run)
    torch.manual_seed(cfg.seed)
    if data is None:
        setup_dataset(run)
    count_steps(run, run.dataset.num_batches_per_epoch if data is None else data(run))
    check_optimizer(run)
    load_model(run)
    setup_network(run)
    setup_optimizer(run, recipe.param_groups(run))
    compile_unet(run)
    cache_latents(run)
    cache_text_encoder_outputs(run)
    resume(run)
    clear_earlier_run(run)
    setup_outputs(run)
    return run


def earlier_run_files(out_dir: Path, name: str) -> list[Path]:
    """The files an earlier run with output_name `name` left in `out_dir`: `<name>.safetensors` (or .ckpt/.pt),
    `<name>-NNNNNN.safetensors`, `<name>-stepNNNNNNNN.safetensors`, their `-state` folders and
    `<name>-interrupted-state`, and a pivotal run's separate embeddings, `<name>[-NNNNNN|-stepNNNNNNNN]_emb`."""
    pattern = re.compile(rf"{re.escape(name)}(-(\d{{6}}|step\d{{8}}|interrupted))?"
                         r"(\.(safetensors|ckpt|pt)|-state|_emb)")
    return sorted(p for p in out_dir.iterdir() if pattern.fullmatch(p.name)) if out_dir.is_dir() else []


def check_outputs(cfg: TrainConfig) -> None:
    """Before anything loads: output_dir and logging_dir are folders (or can be made), and a new run does
    not silently replace an earlier run's files (`resume` continues them; `overwrite` starts over)."""
    for key in ("output_dir", "logging_dir"):
        value = getattr(cfg, key)
        if value and Path(value).exists() and not Path(value).is_dir():
            raise LoralabError(f"{key}: {value} is a file, not a folder; give a folder path")
        parent = Path(value).resolve() if value else None
        while parent is not None and not parent.exists():
            parent = parent.parent
        if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
            raise LoralabError(f"{key}: {parent} is not writable; give a folder you can write to")
    earlier = earlier_run_files(Path(cfg.output_dir), cfg.output_name)
    if not earlier or cfg.resume:
        return
    names = ", ".join(p.name for p in earlier[:6]) + (f" and {len(earlier) - 6} more" if len(earlier) > 6 else "")
    if not cfg.overwrite:
        raise LoralabError(
            f"output_dir {cfg.output_dir} already holds files of a run named {cfg.output_name!r} ({names}); this run "
            "would replace them. Choose another output_name or output_dir, continue that run with resume = "
            "\"<its -state folder>\", or set overwrite = true to start over.")
    log.info("overwrite: %s in %s will be replaced once the run is ready to start", names, cfg.output_dir)


def check_resume_folder(cfg: TrainConfig) -> None:
    """Before anything loads: `resume` names a complete state folder (its counters readable, its files there)."""
    from loralab.train.state import STATE_PARTS, load_counters

    if not cfg.resume:
        return
    load_counters(cfg.resume)
    missing = [name for name in STATE_PARTS if not (Path(cfg.resume) / name).is_file()]
    if missing:
        raise LoralabError(f"resume: the state folder {cfg.resume} lacks {', '.join(missing)}; it is incomplete "
                           "(copied in part?). Pick another state folder")


def clear_earlier_run(run: Run) -> None:
    """`overwrite`: delete the earlier run's files of this output_name and keep its log aside, once
    everything else is ready (a bad setting found later must not cost the old files); main process only."""
    cfg = run.cfg
    earlier = earlier_run_files(run.out_dir, cfg.output_name)
    if run.is_main and earlier and cfg.overwrite and not cfg.resume:
        log.warning("overwrite: deleting %s in %s", ", ".join(p.name for p in earlier), run.out_dir)
        try:
            for p in earlier:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            old_log = run.out_dir / "train_log.jsonl"
            if old_log.exists():
                old_log.rename(old_log.with_name(f"train_log-before-{time.strftime('%Y%m%d%H%M%S')}.jsonl"))
        except OSError as e:
            raise LoralabError(f"overwrite: cannot delete the earlier run's files in {run.out_dir}: {e}") from None
    if run.world > 1:
        run.accelerator.wait_for_everyone()


def pick_device(name: str) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_device(run: Run) -> None:
    """The device, and the process's place under `accelerate launch` (rank, world size)."""
    from accelerate import Accelerator

    run.device = pick_device(run.cfg.device)
    run.accelerator = Accelerator(cpu=run.device.type == "cpu")
    if run.accelerator.num_processes > 1:
        run.device = run.accelerator.device
    run.rank, run.world = run.accelerator.process_index, run.accelerator.num_processes
    run.out_dir = Path(run.cfg.output_dir)
    run.out_dir.mkdir(parents=True, exist_ok=True)


def setup_dataset(run: Run) -> None:
    """The dataset: kohya's folder layout (`setup_folder_dataset`) or a dataset_config
    (`setup_configured_dataset`); then the caption options and the sample prompts."""
    from loralab.models.loader import peek_family
    from loralab.train.sampling import parse_prompt_file

    cfg = run.cfg
    family_hint = peek_family(cfg.pretrained_model_name_or_path)  # from the key names, for the bucket-step check
    steps = 32 if family_hint == "sdxl" else 64
    if cfg.dataset_config:
        setup_configured_dataset(run, steps)
    else:
        setup_folder_dataset(run, steps)
    run.caption_opts = cfg.caption_options()
    run.prompts = parse_prompt_file(cfg.sample_prompts) if cfg.sample_prompts else []


def setup_folder_dataset(run: Run, steps: int) -> None:
    """train_data_dir / reg_data_dir: the kohya folder dataset (repeats, reg images, buckets), and the
    validation images (validation_split, validation_data_dir)."""
    from loralab.data.dataset import FolderDataset, scan_folder_dataset, split_validation

    cfg = run.cfg
    scanned = scan_folder_dataset(cfg.train_data_dir, cfg.reg_data_dir or None, caption_extension=cfg.caption_extension,
                                  enable_wildcard=cfg.enable_wildcard, alpha_mask=cfg.alpha_mask)
    run.subsets, val_subsets = split_validation(scanned, cfg.validation_split, cfg.validation_seed or cfg.seed)
    if cfg.validation_data_dir:
        val_subsets += scan_folder_dataset(cfg.validation_data_dir, caption_extension=cfg.caption_extension,
                                           enable_wildcard=cfg.enable_wildcard, key="validation_data_dir")
    run.dataset = FolderDataset(run.subsets, batch_size=cfg.train_batch_size, required_reso_steps=steps,
                                **cfg.bucket_options())
    if val_subsets:
        run.val_dataset = FolderDataset(val_subsets, batch_size=cfg.train_batch_size, required_reso_steps=steps,
                                        **cfg.bucket_options())
        log.info("validation: %d images held out of training", sum(s.img_count for s in val_subsets))


def setup_configured_dataset(run: Run, required_reso_steps: int) -> None:
    """`dataset_config`: one dataset per [[datasets]] (its resolution, batch size, buckets, validation split;
    each subset with its own caption options and flip_aug), trained as one `DatasetGroup` (kohya: the
    datasets' batches, interleaved). train_data_dir and reg_data_dir are ignored, as in kohya;
    validation_data_dir adds a validation dataset with the training config's resolution and buckets."""
    from loralab.data.dataset import FolderDataset, scan_folder_dataset
    from loralab.data.dataset_config import read_dataset_config
    from loralab.data.dataset_group import DatasetGroup, configured_datasets

    cfg = run.cfg
    ignored = [key for key in ("train_data_dir", "reg_data_dir") if getattr(cfg, key)]
    if ignored:
        log.warning("%s ignored: the dataset comes from dataset_config %s", " and ".join(ignored), cfg.dataset_config)
    dc = read_dataset_config(cfg.dataset_config, dataclasses.asdict(cfg))
    run.dataset, val = configured_datasets(dc, seed=cfg.seed, required_reso_steps=required_reso_steps)
    run.subsets = run.dataset.subsets
    if cfg.validation_data_dir:
        extra = scan_folder_dataset(cfg.validation_data_dir, caption_extension=cfg.caption_extension,
                                    enable_wildcard=cfg.enable_wildcard, key="validation_data_dir")
        val.append(FolderDataset(extra, batch_size=cfg.train_batch_size, required_reso_steps=required_reso_steps,
                                 **cfg.bucket_options()))
    if val:
        run.val_dataset = DatasetGroup(val)
        log.info("validation: %d images held out of training", sum(s.img_count for s in run.val_dataset.subsets))
    for i, d in enumerate(run.dataset.datasets, 1):
        log.info("dataset %d: resolution %dx%d, batch size %d, %d train images (x repeats), %d batches/epoch", i,
                 *d.resolution, d.batch_size, d.num_train_images, d.num_batches_per_epoch)


def count_steps(run: Run, batches_per_epoch: int) -> None:
    """Steps per epoch, epochs and total steps: each process takes ceil(batches / processes) batches an
    epoch and makes an optimizer step every `gradient_accumulation_steps` of them; max_train_epochs
    overrides max_train_steps (kohya)."""
    cfg = run.cfg
    run.accum = cfg.gradient_accumulation_steps
    run.batches_per_proc = math.ceil(batches_per_epoch / run.world)
    run.steps_per_epoch = math.ceil(run.batches_per_proc / run.accum)
    if cfg.max_train_epochs > 0:
        run.num_epochs = cfg.max_train_epochs
        run.max_steps = run.num_epochs * run.steps_per_epoch
    else:
        run.max_steps = cfg.max_train_steps
        run.num_epochs = math.ceil(run.max_steps / run.steps_per_epoch)
    if run.is_main and run.dataset is not None:
        d = run.dataset
        log.info("dataset: %d train images (x repeats), %d reg images, %d batches/epoch, %d steps/epoch, %d epochs, "
                 "%d steps%s", d.num_train_images, d.num_reg_images, batches_per_epoch, run.steps_per_epoch,
                 run.num_epochs, run.max_steps, f", {run.world} processes" if run.world > 1 else "")


def check_optimizer(run: Run) -> None:
    """Build the optimizer and LR schedule once on a dummy parameter, before the model loads: a bad
    optimizer_type, optimizer_args or scheduler setting fails in a second, not after the load."""
    optim_log = logging.getLogger("loralab.train.optim")
    level = optim_log.level
    optim_log.setLevel(logging.ERROR)  # its advice is logged once, when the real optimizer is built
    try:
        build_optimizer(run.cfg, [{"params": [torch.nn.Parameter(torch.zeros(1))]}], run.max_steps)
    finally:
        optim_log.setLevel(level)


def load_model(run: Run) -> None:
    """The frozen base model on the device: UNet in the compute dtype (float8 storage with fp8_base), the
    VAE in fp32 (kohya's no_half_vae), the text encoders in fp32 when their LoRA trains."""
    from loralab.models.fp8 import check_fp8_supported, store_fp8
    from loralab.models.loader import load_base_model

    cfg = run.cfg
    model = load_base_model(cfg.pretrained_model_name_or_path, vae=cfg.vae or None,
                            v_parameterization=cfg.v_parameterization or None)
    run.model = model
    if run.sdxl and cfg.clip_skip > 1:
        log.warning("clip_skip = %d is ignored for SDXL (it always uses the penultimate layers, as kohya)", cfg.clip_skip)
    run.noise_scheduler = model.noise_scheduler(zero_terminal_snr=cfg.zero_terminal_snr)
    run.weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    for m in (model.unet, model.vae, *model.text_encoders):
        m.requires_grad_(False)
        m.eval()
    move_frozen(model.vae, run.device, torch.float32)
    run.train_unet = not cfg.network_train_text_encoder_only
    run.train_te = cfg.trains_text_encoder()
    move_frozen(model.unet, run.device, run.weight_dtype)
    if cfg.fp8_base:  # before the LoRA hooks wrap the layers' forward
        check_fp8_supported(run.device, run.weight_dtype)
        store_fp8(model.unet, compute_dtype=run.weight_dtype)
    for te in model.text_encoders:
        move_frozen(te, run.device, run.weight_dtype if not run.train_te else torch.float32)


def setup_network(run: Run) -> None:
    """The LoRA network (new, or continued from network_weights), hooked into the models, in fp32."""
    from loralab.network.lora import LoRANetwork

    cfg, model = run.cfg, run.model
    net_cfg = cfg.network_config(train_unet=run.train_unet)
    if cfg.network_weights:
        from loralab.network.files import read_weights, split_bundle

        weights, bundled = split_bundle(read_weights(cfg.network_weights))  # embeddings: a pivotal recipe's
        if bundled and not cfg.token_string:
            log.warning("network_weights: its embeddings (%s) are not trained on: set token_string to continue "
                        "them (pivotal tuning)", ", ".join(bundled))
        network = LoRANetwork.from_weights(weights if bundled else cfg.network_weights, model.unet,
                                           model.text_encoders, model.family, cfg=net_cfg)
    else:
        network = LoRANetwork.create(model.unet, model.text_encoders, model.family, net_cfg)
    network.apply_to()
    network.to(run.device, dtype=torch.float32)
    run.network = network
    if not run.train_te:
        log.warning("the text-encoder LoRA is not trained (%s)",
                    "network_train_unet_only" if cfg.network_train_unet_only else "text_encoder_lr = 0")
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        model.unet.train()
        for te in model.text_encoders if run.train_te else []:
            if hasattr(te, "gradient_checkpointing_enable"):
                te.gradient_checkpointing_enable()
                te.train()


def lora_param_groups(run: Run) -> list[dict]:
    """The network's parameter groups with kohya's learning rates: unet_lr / text_encoder_lr, falling back
    to learning_rate; a side that is not trained gets none; LoRA+ ratios split off the lora_up groups."""
    cfg = run.cfg
    unet_lr = cfg.unet_lr if cfg.unet_lr >= 0 else None
    te_lr = cfg.text_encoder_lr  # a list: one value per text encoder (SDXL), each >= 0
    te_lr = te_lr if isinstance(te_lr, list) or te_lr >= 0 else None
    unet_ratio, te_ratio = cfg.loraplus_ratios()  # LoRA+: lora_up groups at lr x ratio (None: off)
    return run.network.param_groups(unet_lr=unet_lr if run.train_unet else 0,
                                    text_encoder_lr=te_lr if run.train_te else 0, learning_rate=cfg.learning_rate,
                                    loraplus_unet_ratio=unet_ratio, loraplus_text_encoder_ratio=te_ratio)


def build_optimizer(cfg: TrainConfig, groups: list[dict], max_steps: int) -> tuple[Any, str, Any]:
    """(optimizer, its ss_optimizer description, LR schedule over max_steps) from the config's keys."""
    from loralab.train.optim import build_optimizer as from_config

    return from_config(cfg, groups, max_steps)


def setup_optimizer(run: Run, groups: list[dict]) -> None:
    """Optimizer, LR schedule (over max_steps) and, for fp16, the loss scaler; with full_fp16 / full_bf16
    the trained LoRA weights are first cast to the mixed-precision dtype (kohya)."""
    from loralab.train.optim import half_precision, loss_scaler

    cfg = run.cfg
    run.params = [p for g in groups for p in g["params"]]
    if not run.params:
        raise LoralabError("nothing to train: both the UNet and the text-encoder LoRA are switched off")
    if cfg.full_fp16 or cfg.full_bf16:
        half_precision(run.params, run.weight_dtype)
    run.optimizer, run.optimizer_desc, run.lr_scheduler = build_optimizer(cfg, groups, run.max_steps)
    run.scaler = loss_scaler(cfg.mixed_precision, cfg.full_fp16, run.device.type)


def encode_images(run: Run, images: torch.Tensor) -> torch.Tensor:
    """VAE latents of images in [-1, 1], sampled from the posterior and scaled (the global RNG draws)."""
    with torch.no_grad():
        dist = run.model.vae.encode(images.to(run.device, torch.float32)).latent_dist
        return dist.sample() * run.model.vae_scaling_factor


def cache_latents(run: Run) -> None:
    """cache_latents(_to_disk): every image (and its flip) encoded once, in memory or next to the image.
    Refused when a subset uses color_aug or random_crop (kohya's rule; config_problems reports it first)."""
    from loralab.data.augment import cache_conflict
    from loralab.data.dataset import subset_flag
    from loralab.data.latents import cache_latents as build_cache

    cfg = run.cfg
    if not cfg.cache_latents or run.dataset is None:
        return
    for key in ("color_aug", "random_crop"):  # kohya `is_latent_cacheable`
        if any(subset_flag(s, key, getattr(cfg, key)) for s in run.subsets):
            raise LoralabError(cache_conflict(key))
    vae_id = f"{Path(cfg.vae or cfg.pretrained_model_name_or_path).name}:{run.model.model_hash[:16]}"
    flip_aug = any(s.flip_aug for s in run.subsets) if cfg.dataset_config else cfg.flip_aug  # per subset there
    run.latent_cache = build_cache(run.dataset.samples, lambda x: encode_images(run, x),
                                   to_disk=cfg.cache_latents_to_disk, flip_aug=flip_aug, vae_id=vae_id,
                                   batch_size=cfg.vae_batch_size, progress=run.is_main,
                                   npz_suffix="_sdxl.npz" if run.sdxl else "_sd.npz")


def encode_prompts(run: Run, texts: list[str]) -> tuple[torch.Tensor, ...]:
    """The text encoders' outputs: (hidden,) for SD 1.x/2.x, (hidden1, hidden2, pool2) for SDXL; with
    weighted_captions, `(tag:1.2)` scales those tokens' hidden states (`models/text.py` apply_token_weights)."""
    from loralab.models.text import encode_captions

    m = run.model
    return encode_captions(m.family, m.text_encoders, m.tokenizers, texts, max_token_length=run.cfg.max_token_length,
                           clip_skip=run.cfg.clip_skip or None, weighted=run.cfg.weighted_captions)


TE_CACHE_BATCH = 32  # captions encoded at once while caching (CLIP encodes each caption independently of its batch)


def cache_text_encoder_outputs(run: Run) -> None:
    """cache_text_encoder_outputs(_to_disk): each caption encoded once (config.validate allows it only for
    frozen encoders and captions that do not change per step; a dropped caption uses the cached ""). Without the
    key the same holds in memory whenever it is allowed (`text_encoder_cache_allowed`)."""
    from loralab.data.captions import process_caption
    from loralab.data.text_encoder_cache import cache_text_encoder_outputs as build_cache
    from loralab.data.text_encoder_cache import encoders_id, output_names

    from loralab.config import text_encoder_cache_allowed

    cfg, model = run.cfg, run.model
    if run.dataset is None or not (cfg.cache_text_encoder_outputs or text_encoder_cache_allowed(cfg)):
        return
    options = {id(s.entry.subset): s.entry.subset.caption_options or run.caption_opts for s in run.dataset.samples}
    no_dropout = {k: dataclasses.replace(o, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0)
                  for k, o in options.items()}  # per subset: a dataset_config subset has its own options
    items = [(s.entry.path, process_caption(s.entry.caption, no_dropout[id(s.entry.subset)], epoch=1,
                                            rng=random.Random(0))) for s in run.dataset.samples]
    dropout = any(o.caption_dropout_rate > 0 or o.caption_dropout_every_n_epochs > 0 for o in options.values())
    te_id = encoders_id(model_source=cfg.pretrained_model_name_or_path, model_hash=model.model_hash,
                        network_weights=cfg.network_weights or None, max_token_length=cfg.max_token_length,
                        dtype=run.weight_dtype, clip_skip=None if run.sdxl else cfg.clip_skip or None,
                        weighted_captions=cfg.weighted_captions)
    with run.autocast():
        run.te_cache = build_cache(items, lambda texts: encode_prompts(run, texts), names=output_names(model.family),
                                   to_disk=cfg.cache_text_encoder_outputs_to_disk, encoders=te_id,
                                   extra_captions=[""] if dropout else [], batch_size=TE_CACHE_BATCH,
                                   progress=run.is_main)
    if cfg.cache_text_encoder_outputs and run.device.type != "cpu" and not run.network.text_encoder_loras:
        # needed again only for sample prompts and validation (the automatic cache leaves them where they are)
        for te in model.text_encoders:
            te.to("cpu", dtype=torch.float32)


def resume(run: Run) -> None:
    """`resume`: network, optimizer, scheduler and scaler from a state folder; the counters continue."""
    from loralab.train.state import load_counters, load_state

    cfg = run.cfg
    if not cfg.resume:
        return
    counters = load_counters(cfg.resume)
    sd = load_state(cfg.resume, optimizer=run.optimizer, scheduler=run.lr_scheduler, scaler=run.scaler)
    run.network.load_weights(sd)
    run.epoch, run.global_step, run.skip_batches = counters.epoch, counters.global_step, counters.batch_in_epoch
    run.resumed_from = counters
    log.info("resumed from %s: epoch %d, step %d", cfg.resume, run.epoch, run.global_step)
    check_resume_matches(run, counters)


def check_resume_matches(run: Run, counters) -> list[str]:
    """A resumed run continues a straight run exactly only with the same seed and the same batch layout.
    Each difference from the state's record is a warning naming both values (a deliberate change, e.g. a
    new batch size, is allowed: the run continues from the saved step, but its batches are not the ones
    the straight run would have taken). Returns the warnings."""
    now = {"seed": run.cfg.seed, "world": run.world, "batches_per_epoch": run.batches_per_proc,
           "train_batch_size": run.cfg.train_batch_size, "gradient_accumulation_steps": run.accum}
    labels = {"world": "processes", "batches_per_epoch": "batches per epoch (dataset, repeats or batch size changed)"}
    out = []
    for key, value in now.items():
        saved = getattr(counters, key, 0)
        if saved and saved != value:
            out.append(f"resume: the state was saved with {labels.get(key, key)} = {saved}, this run has {value}: "
                       f"training continues from step {counters.global_step}, but not as the interrupted run would have")
            log.warning(out[-1])
    return out


def setup_outputs(run: Run) -> None:
    """What the saved files' metadata needs (RunInfo), their dtype, and the train log."""
    from loralab.data.dataset import dataset_dirs, tag_frequency
    from loralab.data.dataset_group import DatasetGroup, datasets_metadata
    from loralab.train.logs import TrainLog
    from loralab.train.metadata import RunInfo

    cfg, model, d = run.cfg, run.model, run.dataset
    datasets_md = datasets_metadata(d) if isinstance(d, DatasetGroup) else None  # dataset_config: kohya's keys
    run.info = RunInfo(
        session_id=random.Random(cfg.seed).randint(0, 2**32), started_at=run.started_at, family=model.family,
        v_parameterization=model.v_parameterization, model_name=Path(cfg.pretrained_model_name_or_path).name,
        model_hash=model.model_hash, vae_name=Path(cfg.vae).name if cfg.vae else "",
        num_train_images=d.num_train_images if d else 0, num_reg_images=d.num_reg_images if d else 0,
        num_batches_per_epoch=d.num_batches_per_epoch if d else run.batches_per_proc, num_epochs=run.num_epochs,
        max_train_steps=run.max_steps, optimizer_desc=run.optimizer_desc,
        tag_frequency=datasets_md[1] if datasets_md else tag_frequency(run.subsets),
        dataset_dirs=datasets_md[2] if datasets_md else dataset_dirs(run.subsets, reg=False),
        reg_dataset_dirs={} if datasets_md else dataset_dirs(run.subsets, reg=True),
        bucket_info=d.bucket_info() if d is not None and cfg.enable_bucket else None,
        network_args=cfg.network_options(), datasets=datasets_md[0] if datasets_md else None)
    run.save_dtype = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16,
                      "bf16": torch.bfloat16}[cfg.save_precision]
    run.log = TrainLog(run.out_dir, logging_dir=cfg.logging_dir or None, log_prefix=cfg.log_prefix, enabled=run.is_main)
    if run.resumed_from is not None and run.resumed_from.log_state:
        run.log.load_state_dict(run.resumed_from.log_state)


def autocast_for(device: torch.device, dtype: torch.dtype):
    """torch.autocast for mixed precision (fp16/bf16); a no-op context for fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def move_frozen(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a frozen model; cast only when the dtype changes (diffusers warns on every cast)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
