"""kohya `ss_*` and `modelspec.*` metadata for saved LoRA files (every value a string).

The key names and value shapes follow kohya's train_network.py (research/kohya.md §4.7), so A1111's
and ComfyUI's LoRA browsers, civitai and kohya's own tools read them: `ss_tag_frequency`,
`ss_dataset_dirs`, `ss_network_*`, `ss_base_model_version` and the rest. `modelspec.*` follows
Stability's ModelSpec 1.0.1 as kohya writes it.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import dataclass
from typing import Any

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sd2_v": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                  "sd2_v": "stable-diffusion-v2-768-v/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")


def base_model_version(family: str, v_parameterization: bool) -> str:
    """kohya's version string: sd_v1, sd_v2, sd_v2_v (768-v) or sdxl_base_v1-0."""
    key = "sd2_v" if family == "sd2" and v_parameterization else family
    return BASE_MODEL_VERSION[key]


@dataclass
class RunInfo:
    """What the metadata needs to know about the run beyond the config."""
    session_id: int
    started_at: float
    family: str
    v_parameterization: bool
    model_name: str
    model_hash: str
    vae_name: str
    num_train_images: int
    num_reg_images: int
    num_batches_per_epoch: int
    num_epochs: int
    max_train_steps: int
    optimizer_desc: str
    tag_frequency: dict
    dataset_dirs: dict
    reg_dataset_dirs: dict
    bucket_info: dict | None
    network_args: dict
    datasets: list | None = None  # ss_datasets of a dataset_config run (data/dataset_group.py datasets_metadata)


def build_metadata(cfg: Any, run: RunInfo, *, epoch: int, step: int, final: bool) -> dict[str, str]:
    """All `ss_*` and `modelspec.*` keys for a file saved at `epoch`/`step`."""
    version = base_model_version(run.family, run.v_parameterization)
    net_args = {k: str(v) for k, v in run.network_args.items() if v not in (None, 0, 0.0, "")}
    md: dict[str, Any] = {
        "ss_v2": run.family == "sd2",
        "ss_base_model_version": version,
        "ss_network_module": cfg.network_module,
        "ss_network_dim": cfg.network_dim,
        "ss_network_alpha": cfg.network_alpha,
        # kohya writes ss_network_args only when network_args were given
        "ss_network_args": json.dumps(net_args) if net_args else None,
        # the prediction type, read by UIs to route a v-prediction LoRA of any family (sd_v2_v says it for SD 2.x only)
        "ss_v_parameterization": True if run.v_parameterization else None,
    }
    if not cfg.no_metadata:
        md.update(training_keys(cfg, run))
        md.update(dataset_keys(cfg, run))
        md.update({"ss_epoch": epoch, "ss_steps": step})
        if final:
            md["ss_training_finished_at"] = time.time()
    md.update(modelspec(cfg, run, version))
    return {k: str(v) for k, v in md.items() if v is not None}


def text_encoder_lr_value(cfg: Any) -> Any:
    """ss_text_encoder_lr: the text encoders' learning rate (learning_rate when unset); with one value per
    text encoder, that value when they are equal, else the list, e.g. "[1e-05, 2e-05]" (kohya writes its
    list form the same way); 0 for a UNet-only run (network_train_unet_only)."""
    if cfg.network_train_unet_only:
        return 0  # no text-encoder LoRA is trained: recorded as 0, as kohya_ss records UNet-only runs
    lr = cfg.text_encoder_lr
    if isinstance(lr, list):
        return lr[0] if len(set(lr)) == 1 else lr
    return lr if lr >= 0 else cfg.learning_rate


def training_keys(cfg: Any, run: RunInfo) -> dict[str, Any]:
    """The `ss_*` keys of the model, network, optimizer, noise and loss settings."""
    md = {
        "ss_session_id": run.session_id,
        "ss_training_started_at": run.started_at,
        "ss_output_name": cfg.output_name,
        "ss_learning_rate": cfg.learning_rate,
        "ss_text_encoder_lr": text_encoder_lr_value(cfg),
        "ss_unet_lr": cfg.unet_lr if cfg.unet_lr >= 0 else cfg.learning_rate,
        "ss_num_train_images": run.num_train_images,
        "ss_num_reg_images": run.num_reg_images,
        "ss_num_batches_per_epoch": run.num_batches_per_epoch,
        "ss_num_epochs": run.num_epochs,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_max_train_steps": run.max_train_steps,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_network_dropout": cfg.network_dropout or None,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_full_fp16": bool(cfg.full_fp16),
        "ss_fp8_base": cfg.fp8_base,
        "ss_fp8_base_unet": cfg.fp8_base,
        "ss_seed": cfg.seed,
        "ss_lowram": False,
        "ss_noise_offset": cfg.noise_offset or None,
        "ss_noise_offset_random_strength": cfg.noise_offset_random_strength,
        "ss_adaptive_noise_scale": cfg.adaptive_noise_scale or None,
        "ss_multires_noise_iterations": cfg.multires_noise_iterations or None,
        "ss_multires_noise_discount": cfg.multires_noise_discount,
        "ss_training_comment": cfg.training_comment or None,
        "ss_sd_scripts_commit_hash": "loralab",
        "ss_optimizer": run.optimizer_desc,
        "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_caption_dropout_rate": cfg.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": cfg.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": cfg.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": None,
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_min_snr_gamma": cfg.min_snr_gamma or None,
        "ss_scale_weight_norms": cfg.scale_weight_norms or None,
        "ss_ip_noise_gamma": cfg.ip_noise_gamma or None,
        # the loss keys as kohya writes them: the huber ones whatever the loss_type, none for v_pred_like_loss
        # or scale_v_pred_loss_like_noise_pred
        "ss_debiased_estimation": bool(cfg.debiased_estimation_loss),
        "ss_loss_type": cfg.loss_type,
        "ss_huber_schedule": cfg.huber_schedule,
        "ss_huber_scale": cfg.huber_scale,
        "ss_huber_c": cfg.huber_c,
        "ss_zero_terminal_snr": bool(cfg.zero_terminal_snr),
        "ss_clip_skip": cfg.clip_skip or None,
        "ss_max_token_length": cfg.max_token_length,
        "ss_sd_model_name": run.model_name,
        "ss_new_sd_model_hash": run.model_hash,
        "ss_vae_name": run.vae_name or None,
    }
    if cfg.ip_noise_gamma:
        md["ss_ip_noise_gamma_random_strength"] = cfg.ip_noise_gamma_random_strength
    return md


def dataset_keys(cfg: Any, run: RunInfo) -> dict[str, Any]:
    """The `ss_*` keys of the dataset: sizes, buckets, caption options, tag frequency, folders. With a
    dataset_config, as kohya: `ss_datasets` (each dataset's settings and subsets) and the merged tag frequency
    and folders instead of the keys of one dataset (batch size, resolution, buckets, caption options)."""
    if run.datasets is not None:
        md = {"ss_cache_latents": cfg.cache_latents, "ss_datasets": json.dumps(run.datasets),
              "ss_tag_frequency": json.dumps(run.tag_frequency), "ss_dataset_dirs": json.dumps(run.dataset_dirs)}
    else:
        md = folder_dataset_keys(cfg, run)
    if cfg.validation_split or cfg.validation_data_dir:
        md.update({"ss_validation_split": cfg.validation_split, "ss_validation_seed": cfg.validation_seed or cfg.seed})
    if cfg.token_warmup_step:
        md.update({"ss_token_warmup_min": cfg.token_warmup_min, "ss_token_warmup_step": cfg.token_warmup_step})
    return md


def folder_dataset_keys(cfg: Any, run: RunInfo) -> dict[str, Any]:
    """The dataset keys of a train_data_dir run (one dataset)."""
    w, h = cfg.resolution_wh()
    md = {
        "ss_cache_latents": cfg.cache_latents,
        "ss_batch_size_per_device": cfg.train_batch_size,
        "ss_total_batch_size": cfg.train_batch_size * cfg.gradient_accumulation_steps,
        "ss_resolution": f"({w}, {h})",
        "ss_color_aug": cfg.color_aug,
        "ss_flip_aug": cfg.flip_aug,
        "ss_random_crop": cfg.random_crop,
        "ss_shuffle_caption": cfg.shuffle_caption,
        "ss_enable_bucket": cfg.enable_bucket,
        "ss_bucket_no_upscale": cfg.bucket_no_upscale,
        "ss_min_bucket_reso": cfg.min_bucket_reso,
        "ss_max_bucket_reso": cfg.max_bucket_reso,
        "ss_keep_tokens": cfg.keep_tokens,
        "ss_bucket_info": json.dumps(run.bucket_info) if run.bucket_info else None,
        "ss_tag_frequency": json.dumps(run.tag_frequency),
        "ss_dataset_dirs": json.dumps(run.dataset_dirs),
        "ss_reg_dataset_dirs": json.dumps(run.reg_dataset_dirs),
    }
    return md


def modelspec(cfg: Any, run: RunInfo, version: str) -> dict[str, str]:
    """ModelSpec 1.0.1 keys as kohya writes them for a LoRA."""
    w, h = cfg.resolution_wh()
    key = "sd2_v" if run.family == "sd2" and run.v_parameterization else run.family
    md = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": MODELSPEC_ARCH[key],
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if run.family == "sdxl" else "diffusers",
        "modelspec.title": cfg.metadata_title or cfg.output_name,
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.date": _dt.datetime.fromtimestamp(run.started_at).isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if run.v_parameterization else "epsilon",
        "modelspec.timestep_range": f"{cfg.min_timestep},{cfg.max_timestep}",
    }
    if cfg.clip_skip:
        md["modelspec.encoder_layer"] = str(cfg.clip_skip)
    for name in ("author", "description", "license", "tags"):
        value = getattr(cfg, f"metadata_{name}")
        if value:
            md[f"modelspec.{name}"] = value
    return md
