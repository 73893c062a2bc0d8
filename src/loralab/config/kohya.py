"""kohya's keys that are not loralab keys: what each one means here, in one table.

A kohya config (sd-scripts TOML, the kohya_ss GUI's files) carries keys for things loralab does another
way (attention backends, data-loader workers, DDP options), for services it does not run (Weights &
Biases, Hugging Face uploads), and for methods it does not have. Each such key is one of:

- an alias (`ALIASES`): another name for a loralab key, e.g. sd-scripts' misspelt `caption_extention`;
- no effect (`Foreign(why)`): accepted whatever its value, with one INFO line saying why;
- off only (`Foreign(why, refuse=...)`): accepted when its value is off (None, "", false, 0, [], "no",
  or the listed `off` values: kohya's default), and refused with `refuse` when it asks for something
  loralab cannot do.

Any other key is unknown: reported with the close loralab key names (`suggest`), or with the name a
kohya user means (`SUGGEST`: GUI names in a TOML file, `config_file` for `--config`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from loralab.errors import LoralabError


@dataclass(frozen=True)
class Foreign:
    why: str  # what loralab does instead, or why the key has no effect
    refuse: str = ""  # when set: a value that is not off is refused with this message
    off: tuple = ()  # values besides the usual off values that mean "not used" (kohya's defaults)


ATTENTION = "attention uses torch SDPA"
NOT_HUB = "loralab does not upload or download: upload the files yourself"
NO_DEEPSPEED = "DeepSpeed is not supported; use accelerate launch / torchrun (DDP)"

FOREIGN: dict[str, Foreign] = {
    # things loralab does its own way
    "xformers": Foreign(ATTENTION), "sdpa": Foreign(ATTENTION), "mem_eff_attn": Foreign(ATTENTION),
    "max_data_loader_n_workers": Foreign("images load in the main process"),
    "persistent_data_loader_workers": Foreign("no loader workers"),
    "lowram": Foreign("not needed"), "highvram": Foreign("not needed"),
    "no_half_vae": Foreign("the VAE runs in fp32"), "mixed_precision_vae": Foreign("the VAE runs in fp32"),
    "log_tracker_name": Foreign("not used"), "log_tracker_config": Foreign("not used"), "log_config": Foreign("not used"),
    "wandb_run_name": Foreign("Weights & Biases is not used"), "wandb_api_key": Foreign("Weights & Biases is not used"),
    "tokenizer_cache_dir": Foreign("the CLIP tokenizer ships with loralab"),
    "disable_mmap_load_safetensors": Foreign("not needed"),
    "text_encoder_batch_size": Foreign("captions are encoded with the training batch"),
    "cache_info": Foreign("the dataset scan reads image headers only"),
    "skip_cache_check": Foreign("cached latents are checked by image size and VAE"),
    "ddp_timeout": Foreign("no DDP wrapper: LoRA gradients are averaged with one all-reduce"),
    "ddp_gradient_as_bucket_view": Foreign("no DDP wrapper"), "ddp_static_graph": Foreign("no DDP wrapper"),
    "sample_sampler_args": Foreign("not used"),
    "dataset_repeats": Foreign("repeats come from folder names (or num_repeats in a dataset_config)"),
    "use_safetensors": Foreign("LoRA files are written as save_model_as says (safetensors by default)"),
    "dim_from_weights": Foreign("network_weights always keeps the file's own dims"),
    "support_dreambooth": Foreign("not used"), "support_finetuning": Foreign("not used"),
    "support_controlnet": Foreign("not used"), "support_dropout": Foreign("not used"),
    "mem_eff_save": Foreign("LoRA files are small"),
    "weighting_scheme": Foreign("SD3/FLUX only"), "logit_mean": Foreign("SD3/FLUX only"),
    "logit_std": Foreign("SD3/FLUX only"), "mode_scale": Foreign("SD3/FLUX only"),
    # off only: a value that asks for something loralab does not do is refused
    "log_with": Foreign("TensorBoard logs go to logging_dir", off=("tensorboard",),
                        refuse="Weights & Biases logging is not supported; TensorBoard logs go to logging_dir "
                               "(remove log_with or set it to \"tensorboard\")"),
    "huggingface_repo_id": Foreign(NOT_HUB, refuse=NOT_HUB), "huggingface_repo_type": Foreign(NOT_HUB),
    "huggingface_path_in_repo": Foreign(NOT_HUB), "huggingface_token": Foreign(NOT_HUB),
    "huggingface_repo_visibility": Foreign(NOT_HUB),
    "save_state_to_huggingface": Foreign(NOT_HUB, refuse=NOT_HUB),
    "resume_from_huggingface": Foreign(NOT_HUB, refuse=NOT_HUB), "async_upload": Foreign(NOT_HUB),
    "fused_backward_pass": Foreign("not used", refuse="fused_backward_pass is not supported; use AdamW8bit or "
                                                      "gradient_checkpointing to save memory"),
    "fused_optimizer_groups": Foreign("not used", refuse="fused_optimizer_groups is not supported"),
    "blocks_to_swap": Foreign("not used", refuse="blocks_to_swap (SD3/FLUX block swapping) is not supported"),
    "cpu_offload_checkpointing": Foreign("not used", refuse="cpu_offload_checkpointing is not supported; use "
                                                            "gradient_checkpointing"),
    "fp8_base_unet": Foreign("not used", refuse="fp8_base_unet: use fp8_base"),
    "conditioning_data_dir": Foreign("not used", refuse="conditioning_data_dir: sd-scripts' train_network.py does not "
                                     "read it on the command line (only its ControlNet scripts do); give mask images "
                                     "per subset: conditioning_data_dir in a dataset_config [[datasets.subsets]], with "
                                     "masked_loss = true"),
    "in_json": Foreign("not used", refuse="in_json: fine-tuning metadata is not supported; put each caption in a .txt "
                                          "file next to its image (<repeats>_<name>/ folders, or a dataset_config)"),
    "dataset_class": Foreign("not used", refuse="dataset_class: custom dataset classes are not supported"),
    "face_crop_aug_range": Foreign("not used", refuse="face_crop_aug_range is not supported"),
    "resize_interpolation": Foreign("kohya's default: area when shrinking, lanczos when enlarging",
                                    refuse="resize_interpolation: only kohya's default (area down, lanczos up) is "
                                           "supported; remove the key"),
    "debug_dataset": Foreign("not used", refuse="debug_dataset: use `loralab dataset check` (and --dry-run)"),
    "output_config": Foreign("not used", refuse="output_config: use `loralab config import` or --dry-run"),
    "base_weights": Foreign("not used", refuse="base_weights (merging LoRAs into the model before training) is not "
                                               "supported"),
    "base_weights_multiplier": Foreign("not used"),
    "initial_epoch": Foreign("not used", refuse="initial_epoch / initial_step: resume from a state folder instead"),
    "initial_step": Foreign("not used", refuse="initial_epoch / initial_step: resume from a state folder instead"),
    "skip_until_initial_step": Foreign("not used", refuse="skip_until_initial_step: resume from a state folder "
                                                          "instead"),
    "save_n_epoch_ratio": Foreign("not used", refuse="save_n_epoch_ratio: use save_every_n_epochs"),
    "deepspeed": Foreign(NO_DEEPSPEED, refuse=NO_DEEPSPEED), "zero_stage": Foreign(NO_DEEPSPEED),
    "offload_optimizer_device": Foreign(NO_DEEPSPEED), "offload_optimizer_nvme_path": Foreign(NO_DEEPSPEED),
    "offload_param_device": Foreign(NO_DEEPSPEED), "offload_param_nvme_path": Foreign(NO_DEEPSPEED),
    "zero3_init_flag": Foreign(NO_DEEPSPEED), "zero3_save_16bit_model": Foreign(NO_DEEPSPEED),
    "fp16_master_weights_and_gradients": Foreign(NO_DEEPSPEED),
}

# Other names of loralab keys: (loralab key, how the value converts; None = unchanged).
ALIASES: dict[str, tuple[str, Any]] = {
    "caption_extention": ("caption_extension", None),  # sd-scripts' old spelling, still accepted there
    "use_8bit_adam": ("optimizer_type", lambda v: "AdamW8bit" if _truthy(v) else None),
    "use_lion_optimizer": ("optimizer_type", lambda v: "Lion" if _truthy(v) else None),
}

# What a kohya user means by a key that is not one (suggested instead of the closest spelling).
SUGGEST = {
    "epoch": "max_train_epochs", "config_file": "--config FILE on the command line",
    "optimizer": "optimizer_type", "max_resolution": "resolution", "lr_warmup": "lr_warmup_steps (a step count, or "
    "a fraction of all steps such as 0.1)", "learning_rate_te": "text_encoder_lr", "learning_rate_te1": "text_encoder_lr",
    "learning_rate_te2": "text_encoder_lr", "LoRA_type": "network_module / network_args",
}

OFF_VALUES = (None, "", False, 0, 0.0, "no", "none", "None", "false", "False", "0")


def _truthy(value: Any) -> bool:
    return value not in OFF_VALUES and value != [] and value != {}


def is_off(key: str, value: Any) -> bool:
    """The value leaves the kohya feature off: an off value, or one of the key's own `off` values."""
    rule = FOREIGN.get(key)
    return not _truthy(value) or (rule is not None and value in rule.off)


def foreign_key(key: str, value: Any) -> tuple[str, str]:
    """("note", why) when the key is accepted without effect, ("problem", message) when it is refused."""
    rule = FOREIGN[key]
    if rule.refuse and not is_off(key, value):
        return "problem", f"{key} = {value!r}: {rule.refuse}"
    return "note", rule.why


def alias(key: str, value: Any) -> tuple[str, Any] | None:
    """(loralab key, value) for an alias; None when the alias's value leaves the target unset."""
    target, convert = ALIASES[key]
    value = convert(value) if convert else value
    return None if value is None else (target, value)


def suggest(key: str, known: list[str]) -> str:
    """The hint for an unknown key: what a kohya user means by it, else the close loralab key names."""
    if key in SUGGEST:
        return f" Did you mean {SUGGEST[key]}?"
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.75)
    return f" Did you mean {', '.join(close)}?" if close else ""


def parse_command_line(tokens: list[str]) -> dict[str, Any]:
    """`--key value` pairs (also `--key=value`, kohya's documented form); `--flag` alone means true; several
    values after one key make a list. Dashes in key names become underscores (never in values)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) == 2:
            hint = " (a config file? give it as --config FILE)" if tok.lower().endswith((".toml", ".json")) else ""
            raise LoralabError(f"command line: expected --key value, got {tok!r}{hint}")
        key, eq, value = tok[2:].partition("=")
        key = key.replace("-", "_")
        i += 1
        if eq:
            out[key] = value
            continue
        values: list[str] = []
        while i < len(tokens) and not (tokens[i].startswith("--") and len(tokens[i]) > 2 and not _is_number(tokens[i])):
            values.append(tokens[i])
            i += 1
        out[key] = "true" if not values else values[0] if len(values) == 1 else values
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
