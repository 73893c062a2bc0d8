"""The kohya_ss GUI's saved training JSON (bmaltais/kohya_ss, LoRA tab) as sd-scripts / loralab keys.

The GUI saves its fields as JSON (`<output_name>_<time>.json`, presets in `presets/lora/`). To train, it
loads such a file (`common_gui.update_my_data`: types fixed, old names renamed; a missing or null field
keeps the GUI's own default), then `lora_gui.train_model` turns the fields into an sd-scripts TOML plus
command-line flags. `gui_to_kohya` does what those two do, as read at kohya_ss commit 45088f04, and says
so for every conversion that is not a plain copy:

- `keys`: the sd-scripts keys kohya would have received (for `build_config(None, keys)`, which decides
  about each one as it does for a TOML file: loralab key, kohya key without effect, or refused);
- `mapped`: (GUI key, loralab key, value, note) for every conversion that is not one-to-one;
- `dropped`: (GUI key, why) for GUI fields that do not reach sd-scripts (launcher, GUI state, other
  model families, options of other LoRA types, old fields this GUI no longer reads);
- `problems`: what loralab cannot train as the GUI asked, and keys unknown to this GUI version. Nothing
  is raised here: the caller reports them together with build_config's own.

The GUI writes its sample prompts (text) to `<output_dir>/sample/prompt.txt`; the text is returned in
`prompt_text` and `keys["sample_prompts"]` names that file: the caller writes it (nothing here writes).
Paths are kept as written (relative ones were relative to the GUI's working folder).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from loralab.config.fields import TrainConfig
from loralab.config.kohya import parse_command_line
from loralab.errors import LoralabError
from loralab.network.blocks import BLOCK_KEYS


@dataclass
class GuiConversion:
    source: str
    keys: dict[str, Any] = field(default_factory=dict)  # sd-scripts / loralab key -> value
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (GUI key, why)
    mapped: list[tuple[str, str, Any, str]] = field(default_factory=list)  # (GUI key, loralab key, value, note)
    problems: list[str] = field(default_factory=list)
    prompt_text: str = ""  # sample prompts (kohya prompt-file syntax) to write to keys["sample_prompts"]
    expected_family: str = "sd1"  # "sdxl", "sd2" or "sd1", from the GUI's sdxl / v2 checkboxes

    def map(self, gui_key: str, key: str, value: Any, note: str) -> None:
        self.keys[key] = value
        self.mapped.append((gui_key, key, value, note))


def is_gui_config(path: str | Path) -> bool:
    """A kohya_ss GUI config: the GUI saves JSON, sd-scripts configs are TOML."""
    return PurePath(path).suffix.lower() == ".json"


def read_gui_config(path: str | Path) -> GuiConversion:
    """`gui_to_kohya` of a GUI JSON file; only an unreadable file raises (LoralabError)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoralabError(f"config file {p} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoralabError(f"{p}: not valid JSON: {e}") from None
    return gui_to_kohya(doc, str(p))


# ------------------------------------------------------------------------------------------ the GUI's fields
# sd-scripts keys that lora_gui.py train_model writes unchanged into its TOML (config_toml_data); like the GUI,
# a value of "", 0 or false is left out (kohya then uses its default).
PASS = set("""
pretrained_model_name_or_path v2 v_parameterization dataset_config save_model_as save_precision train_data_dir
output_name training_comment logging_dir reg_data_dir output_dir train_batch_size save_every_n_epochs cache_latents
cache_latents_to_disk enable_bucket min_bucket_reso max_bucket_reso max_grad_norm mixed_precision lr_scheduler
lr_scheduler_power lr_scheduler_type gradient_checkpointing fp8_base full_fp16 full_bf16 highvram shuffle_caption
save_state save_state_on_train_end resume prior_loss_weight color_aug flip_aug masked_loss clip_skip
gradient_accumulation_steps mem_eff_attn max_token_length max_data_loader_n_workers keep_tokens
persistent_data_loader_workers bucket_no_upscale random_crop bucket_reso_steps v_pred_like_loss
caption_dropout_every_n_epochs caption_dropout_rate ip_noise_gamma ip_noise_gamma_random_strength loss_type
huber_schedule huber_c huber_scale vae_batch_size min_snr_gamma save_every_n_steps save_last_n_steps
save_last_n_steps_state save_last_n_epochs save_last_n_epochs_state skip_cache_check log_with log_tracker_name
log_tracker_config log_config scale_v_pred_loss_like_noise_pred min_timestep max_timestep vae weighted_captions
debiased_estimation_loss network_dim network_weights dim_from_weights network_alpha scale_weight_norms
network_dropout sample_every_n_steps sample_every_n_epochs sample_sampler huggingface_repo_id huggingface_repo_type
huggingface_repo_visibility huggingface_path_in_repo save_state_to_huggingface resume_from_huggingface async_upload
metadata_author metadata_description metadata_license metadata_tags metadata_title
""".split())

# Fields converted below (not copied).
CONVERTED = set("""
LoRA_type conv_dim conv_alpha rank_dropout module_dropout down_lr_weight mid_lr_weight up_lr_weight
block_lr_zero_threshold block_dims block_alphas conv_block_dims conv_block_alphas loraplus_lr_ratio
loraplus_unet_lr_ratio loraplus_text_encoder_lr_ratio learning_rate text_encoder_lr unet_lr epoch max_train_epochs
max_train_steps lr_warmup lr_warmup_steps stop_text_encoder_training noise_offset_type noise_offset
noise_offset_random_strength adaptive_noise_scale multires_noise_iterations multires_noise_discount sample_prompts
additional_parameters xformers sdxl sdxl_cache_text_encoder_outputs sdxl_no_half_vae seed optimizer optimizer_args
lr_scheduler_args lr_scheduler_num_cycles dynamo_backend train_inpainting max_resolution caption_extension
""".split())

LAUNCHER = {k: "a launcher setting (accelerate launch): start loralab with accelerate launch or torchrun for "
               "several GPUs" for k in """num_cpu_threads_per_process num_processes num_machines multi_gpu gpu_ids
               main_process_port dynamo_mode dynamo_use_fullgraph dynamo_use_dynamic
               extra_accelerate_launch_args""".split()}
GUI_STATE = {"model_list": "GUI state (the model dropdown)", "save_as_bool": "GUI state (the save-as button)",
             "training_preset": "GUI state (the preset dropdown)", "file_path": "GUI state",
             "headless": "GUI state", "print_only": "GUI state",
             "lowvram": "the GUI no longer passes it (sd-scripts removed --lowvram)",
             "wandb_api_key": "a secret for Weights & Biases, which loralab does not use (not copied)",
             "wandb_run_name": "Weights & Biases is not used",
             "huggingface_token": "a secret for Hugging Face uploads, which loralab does not do (not copied)"}
# Options of LoRA types other than Standard / Kohya LoCon (LyCORIS, DyLoRA).
OTHER_TYPES = set("""LyCORIS_preset factor bypass_mode dora_wd use_cp use_tucker use_scalar rank_dropout_scale
constrain rescaled train_norm decompose_both train_on_input unit""".split())
# Model families other than SD 1.x/2.x/SDXL: their checkboxes, and fields the GUI passes only when one is on.
FAMILY_BOXES = {"flux1_checkbox": "FLUX.1", "sd3_checkbox": "SD3", "hunyuan_image_checkbox": "HunyuanImage-2.1",
                "anima_checkbox": "Anima", "lumina_checkbox": "Lumina Image 2.0"}
FAMILY_TYPES = {"Flux1": "FLUX.1", "Flux1 OFT": "FLUX.1", "HunyuanImage-2.1": "HunyuanImage-2.1", "Anima": "Anima",
                "Lumina": "Lumina Image 2.0"}
FAMILY = set("""
fp8_base_unet t5xxl_lr train_lora_ggpo ggpo_sigma ggpo_beta flux1_cache_text_encoder_outputs
flux1_cache_text_encoder_outputs_to_disk model_type ae clip_l t5xxl discrete_flow_shift model_prediction_type
timestep_sampling split_mode train_blocks t5xxl_max_token_length enable_all_linear guidance_scale mem_eff_save
apply_t5_attn_mask split_qkv train_t5xxl cpu_offload_checkpointing blocks_to_swap single_blocks_to_swap
double_blocks_to_swap show_timesteps show_timesteps_resolution img_attn_dim img_mlp_dim img_mod_dim single_dim
txt_attn_dim txt_mlp_dim txt_mod_dim single_mod_dim in_dims train_double_block_indices train_single_block_indices
sd3_cache_text_encoder_outputs sd3_cache_text_encoder_outputs_to_disk sd3_fused_backward_pass clip_g
clip_g_dropout_rate sd3_clip_l sd3_clip_l_dropout_rate sd3_disable_mmap_load_safetensors sd3_enable_scaled_pos_embed
logit_mean logit_std mode_scale pos_emb_random_crop_rate save_clip save_t5xxl sd3_t5_dropout_rate sd3_t5xxl
t5xxl_device t5xxl_dtype sd3_text_encoder_batch_size weighting_scheme hunyuan_image_cache_text_encoder_outputs
hunyuan_image_cache_text_encoder_outputs_to_disk hunyuan_text_encoder hunyuan_byt5 hunyuan_vae
hunyuan_discrete_flow_shift hunyuan_model_prediction_type hunyuan_timestep_sampling hunyuan_sigmoid_scale
hunyuan_attn_mode hunyuan_split_attn hunyuan_fp8_scaled hunyuan_fp8_vl hunyuan_text_encoder_cpu hunyuan_vae_chunk_size
anima_cache_text_encoder_outputs anima_cache_text_encoder_outputs_to_disk anima_qwen3 anima_vae
anima_llm_adapter_path anima_t5_tokenizer_path anima_discrete_flow_shift anima_timestep_sampling anima_sigmoid_scale
anima_qwen3_max_token_length anima_t5_max_token_length anima_attn_mode anima_split_attn anima_vae_chunk_size
anima_vae_disable_cache anima_unsloth_offload_checkpointing anima_qwen_image_vae_2d anima_compile
anima_torch_compile anima_compile_backend anima_compile_mode anima_compile_dynamic anima_compile_fullgraph
anima_compile_cache_size_limit lumina_cache_text_encoder_outputs lumina_cache_text_encoder_outputs_to_disk
lumina_gemma2 lumina_ae lumina_discrete_flow_shift lumina_model_prediction_type lumina_timestep_sampling
lumina_sigmoid_scale lumina_gemma2_max_token_length lumina_system_prompt lumina_use_flash_attn lumina_use_sage_attn
flux1_clip_l flux1_t5xxl flux_fused_backward_pass
""".split()) | set(FAMILY_BOXES)
# Fields of older GUI versions (or of its DreamBooth / fine-tune tabs) that this GUI's LoRA tab does not read.
OLD = {
    "learning_rate_te": "a DreamBooth/fine-tune field: the LoRA tab does not read it (its text-encoder rate is "
                        "text_encoder_lr)",
    "learning_rate_te1": "a DreamBooth/fine-tune field (SDXL text encoder 1): the LoRA tab does not read it (its "
                         "text-encoder rate is text_encoder_lr)",
    "learning_rate_te2": "a DreamBooth/fine-tune field (SDXL text encoder 2): the LoRA tab does not read it (its "
                         "text-encoder rate is text_encoder_lr)",
    "no_token_padding": "a DreamBooth field: the LoRA tab does not read it",
    "conv_dims": "an old field, no longer read (conv_dim is)", "conv_alphas": "an old field, no longer read "
                                                                               "(conv_alpha is)",
    "blockwise_fused_optimizers": "an old field, no longer read",
    "fused_optimizer_groups": "an old field, no longer read",
    "fused_backward_pass": "an old field, no longer read (the GUI now passes it for SD3 only)",
    "disable_mmap_load_safetensors": "an old field, no longer read (the GUI now passes it for SD3 only)",
    "use_8bit_adam": "an old field: only picks the optimizer when the file has none (update_my_data)",
    "use_wandb": "an old field (update_my_data: \"True\" means log_with = \"wandb\")",
    "lora_network_weights": "the old name of network_weights (update_my_data)",
    "stop_text_encoder_training_pct": "the old name of stop_text_encoder_training",
}
KNOWN = PASS | CONVERTED | set(LAUNCHER) | set(GUI_STATE) | OTHER_TYPES | FAMILY | set(OLD)

# What a missing or null field is in a freshly started GUI (the widget defaults; open_configuration keeps the
# widget's value for them). Every other missing field is empty, 0 or false.
GUI_DEFAULTS: dict[str, Any] = {
    "LoRA_type": "Standard", "learning_rate": 0.0001, "text_encoder_lr": 0.0001, "unet_lr": 0.0001,
    "lr_scheduler": "cosine", "lr_warmup": 10, "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1.0, "epoch": 1,
    "max_train_steps": 1600, "save_every_n_epochs": 1, "train_batch_size": 1, "caption_extension": ".txt",
    "cache_latents": True, "enable_bucket": True, "min_bucket_reso": 256, "max_bucket_reso": 2048,
    "max_resolution": "512,512", "max_grad_norm": 1.0, "mixed_precision": "fp16", "save_precision": "fp16",
    "save_model_as": "safetensors", "output_name": "last", "pretrained_model_name_or_path":
    "runwayml/stable-diffusion-v1-5", "network_dim": 8, "network_alpha": 1, "conv_dim": 1, "conv_alpha": 1,
    "bucket_no_upscale": True, "bucket_reso_steps": 64, "clip_skip": 1, "max_token_length": 75, "xformers": "xformers",
    "noise_offset_type": "Original", "multires_noise_discount": 0.3, "huber_c": 0.1, "huber_scale": 1.0,
    "huber_schedule": "snr", "loss_type": "l2", "prior_loss_weight": 1.0, "max_timestep": 1000,
    "sample_sampler": "euler_a", "gradient_accumulation_steps": 1, "dynamo_backend": "no",
}
# common_gui.update_my_data's type fixes: (keys, converter, value when the conversion fails).
_INT_FIXES = (("clip_skip epoch gradient_accumulation_steps keep_tokens lr_warmup max_data_loader_n_workers "
               "max_train_epochs save_every_n_epochs seed max_train_steps caption_dropout_every_n_epochs", 0),
              ("lr_scheduler_num_cycles", 1), ("max_token_length", 75))
_FLOAT_FIXES = (("adaptive_noise_scale noise_offset learning_rate text_encoder_lr unet_lr", 0.0),
                ("lr_scheduler_power", 1.0))

SUPPORTED_TYPES = ("Standard", "Kohya LoCon")
OTHER_TYPE_MODULES = {"LoRA-FA": "networks.lora_fa", "Kohya LoHa": "networks.loha", "Kohya LoKr": "networks.lokr"}
# lora_gui.py train_model: the LyCORIS types loralab trains (network_module lycoris.kohya) and the GUI fields each
# writes into network_args, in the GUI's order (GUI key -> network_args key); "Kohya DyLoRA" is networks.dylora.
LYCORIS_TYPES: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "LyCORIS/LoCon": ("locon", (("LyCORIS_preset", "preset"), ("conv_dim", "conv_dim"), ("conv_alpha", "conv_alpha"),
                                ("use_tucker", "use_tucker"), ("rank_dropout", "rank_dropout"),
                                ("bypass_mode", "bypass_mode"), ("dora_wd", "dora_wd"),
                                ("module_dropout", "module_dropout"), ("use_scalar", "use_scalar"),
                                ("rank_dropout_scale", "rank_dropout_scale"), ("train_norm", "train_norm"))),
    "LyCORIS/LoKr": ("lokr", (("LyCORIS_preset", "preset"), ("conv_dim", "conv_dim"), ("conv_alpha", "conv_alpha"),
                              ("use_tucker", "use_tucker"), ("rank_dropout", "rank_dropout"),
                              ("bypass_mode", "bypass_mode"), ("dora_wd", "dora_wd"),
                              ("module_dropout", "module_dropout"), ("factor", "factor"), ("use_cp", "use_cp"),
                              ("use_scalar", "use_scalar"), ("decompose_both", "decompose_both"),
                              ("rank_dropout_scale", "rank_dropout_scale"), ("train_norm", "train_norm"))),
    "LyCORIS/DyLoRA": ("dylora", (("LyCORIS_preset", "preset"), ("conv_dim", "conv_dim"), ("conv_alpha", "conv_alpha"),
                                  ("use_tucker", "use_tucker"), ("unit", "block_size"),
                                  ("rank_dropout", "rank_dropout"), ("module_dropout", "module_dropout"),
                                  ("train_norm", "train_norm"))),
    "LyCORIS/Native Fine-Tuning": ("full", (("LyCORIS_preset", "preset"), ("rank_dropout", "rank_dropout"),
                                            ("module_dropout", "module_dropout"),
                                            ("rank_dropout_scale", "rank_dropout_scale"), ("train_norm", "train_norm"))),
}
LYCORIS_TYPES["LyCORIS/LoHa"] = ("loha", LYCORIS_TYPES["LyCORIS/LoCon"][1])
# the GUI's widget values of the LyCORIS fields when a config lacks them
LYCORIS_DEFAULTS = {"LyCORIS_preset": "full", "factor": -1, "unit": 1, "conv_dim": 1, "conv_alpha": 1, "rank_dropout": 0,
                    "module_dropout": 0}
DYLORA_ARGS = ("conv_dim", "conv_alpha", "unit")  # lora_gui.py "Kohya DyLoRA": these + BLOCK_ARGS, when set
# lora_gui.py: the block-wise fields passed in network_args for Standard and Kohya LoCon when not empty.
BLOCK_ARGS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
              "block_alphas", "conv_block_dims", "conv_block_alphas", "rank_dropout", "module_dropout")
LORAPLUS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
_ARGS_PATTERN = re.compile(r"^(\S+=\S+)( \S+=\S+)*$|^$")  # common_gui.validate_args_setting


def _off(value: Any) -> bool:
    """lora_gui.py drops these values from its TOML: "", False, None (and so 0 and 0.0, which equal False)."""
    return value in ("", False, None)


def _as_int(value: Any, fallback: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return fallback


def _as_float(value: Any, fallback: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return fallback


# ------------------------------------------------------------------------------------------------ conversion
def gui_to_kohya(doc: dict, source: str) -> GuiConversion:
    """The sd-scripts keys kohya_ss's LoRA tab would run with for this saved GUI config (module docstring)."""
    conv = GuiConversion(source=source)
    if not isinstance(doc, dict):
        conv.problems.append(f"{source}: not a kohya_ss GUI config (a JSON object of fields expected)")
        return conv
    d = _load_like_gui(doc, conv)
    _model_family(d, conv)
    _network(d, conv)
    _learning_rates(d, conv)
    _steps_and_warmup(d, conv)
    _optimizer_and_scheduler(d, conv)
    _noise(d, conv)
    _other_fields(d, conv)
    _additional_parameters(d, conv)
    return conv


def _load_like_gui(doc: dict, conv: GuiConversion) -> dict[str, Any]:
    """The fields as train_model receives them: common_gui.update_my_data's fixes, then the GUI's defaults
    for missing or null fields (lora_gui.py open_configuration)."""
    d = dict(doc)
    for key in d:
        if key not in KNOWN:
            conv.problems.append(f"{key}: unknown kohya_ss GUI key ({conv.source}); it is not a field of the GUI "
                                 "version loralab reads (kohya_ss 45088f04): remove it, or give its sd-scripts "
                                 "equivalent in additional_parameters")
    if d.get("optimizer") is None:
        value = "AdamW8bit" if d.get("use_8bit_adam") else "AdamW"
        conv.mapped.append(("optimizer", "optimizer_type", value, "not in the file: the GUI picks "
                            f"{value} (use_8bit_adam = {bool(d.get('use_8bit_adam'))})"))
        d["optimizer"] = value
    for fixes, convert in ((_INT_FIXES, _as_int), (_FLOAT_FIXES, _as_float)):
        for names, fallback in fixes:
            for key in names.split():
                if d.get(key) is not None:
                    value, d[key] = d[key], convert(d[key], fallback)
                    if value != "" and _as_float(value, None) != d[key]:
                        conv.mapped.append((key, key, d[key], f"{value!r} is read as {d[key]!r} by the GUI"))
    if d.get("LoRA_type") == "LoCon":
        d["LoRA_type"] = "LyCORIS/LoCon"  # update_my_data: the old "LoCon" was LyCORIS's
        conv.mapped.append(("LoRA_type", "LoRA_type", "LyCORIS/LoCon", "the GUI reads the old \"LoCon\" as "
                            "\"LyCORIS/LoCon\""))
    if isinstance(d.get("xformers"), bool):
        d["xformers"] = "xformers" if d["xformers"] else "none"
    if str(d.get("use_wandb")) == "True":
        d["log_with"] = "wandb"
        conv.mapped.append(("use_wandb", "log_with", "wandb", "update_my_data"))
    if d.get("lora_network_weights") is not None:  # replaces network_weights, even when empty
        d["network_weights"] = d["lora_network_weights"]
        if d["network_weights"]:
            conv.mapped.append(("lora_network_weights", "network_weights", d["network_weights"], "the old name"))
        else:
            conv.dropped.append(("lora_network_weights", "empty (the old name of network_weights)"))
    for key in d:
        if key in OLD and key not in ("lora_network_weights", "stop_text_encoder_training_pct"):
            conv.dropped.append((key, OLD[key]))
        elif key in LAUNCHER:
            conv.dropped.append((key, f"{d[key]!r}: {LAUNCHER[key]}"))
        elif key in GUI_STATE:
            conv.dropped.append((key, GUI_STATE[key]))
    loralab = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    quiet = {"xformers", "dynamo_backend", "conv_dim", "conv_alpha", "noise_offset_type", "multires_noise_discount"}
    for key, default in GUI_DEFAULTS.items():
        if d.get(key) is None:
            d[key] = default  # noted where it matters: max_train_steps 1600 means epoch is not used
            same = loralab.get(key, dataclasses.MISSING) == default and key != "max_train_steps"
            if key in PASS | CONVERTED and key not in quiet and not same:
                conv.mapped.append((key, key, default, "missing or null in the file: the GUI keeps its field's "
                                    "value (this is its default)"))
    return d


def _model_family(d: dict, conv: GuiConversion) -> None:
    """sdxl / v2 pick the script (sdxl_train_network.py or train_network.py); loralab reads the family from the
    checkpoint, so the caller compares `expected_family` with it. Other families are refused."""
    asked = [f"{k} = true ({name})" for k, name in FAMILY_BOXES.items() if d.get(k)]
    if d.get("LoRA_type") in FAMILY_TYPES:
        asked.append(f"LoRA_type = {d['LoRA_type']!r} ({FAMILY_TYPES[d['LoRA_type']]})")
    if asked:
        conv.problems.append(f"{', '.join(asked)} ({conv.source}): this config trains another model family; loralab "
                             "trains SD 1.x/2.x and SDXL (LoRA and LoCon)")
    for key in sorted(FAMILY & set(d)):
        conv.dropped.append((key, "an SD3/FLUX/HunyuanImage/Anima/Lumina option: " + (
            "not used by loralab" if asked else "the GUI passes it only when that model family is checked")))
    sdxl = bool(d.get("sdxl"))
    conv.expected_family = "sdxl" if sdxl else "sd2" if d.get("v2") else "sd1"
    conv.mapped.append(("sdxl", "expected_family", conv.expected_family, "the GUI runs sdxl_train_network.py when "
                        "sdxl is checked, else train_network.py; loralab reads the family from the checkpoint"))
    if sdxl and d.get("sdxl_cache_text_encoder_outputs"):
        conv.map("sdxl_cache_text_encoder_outputs", "cache_text_encoder_outputs", True, "SDXL only")
    if sdxl and d.get("sdxl_no_half_vae"):
        conv.map("sdxl_no_half_vae", "no_half_vae", True, "SDXL only")
    for key in ("sdxl_cache_text_encoder_outputs", "sdxl_no_half_vae"):
        if key in d and not (sdxl and d.get(key)):
            conv.dropped.append((key, "off, or sdxl is not checked"))
    if d.get("train_inpainting"):
        conv.problems.append(f"train_inpainting = true ({conv.source}): inpainting models (9-channel UNet) are "
                             "not supported")
    elif "train_inpainting" in d:
        conv.dropped.append(("train_inpainting", "off"))


def _network(d: dict, conv: GuiConversion) -> None:
    """LoRA_type -> network_module and network_args (lora_gui.py train_model, "Kohya LoCon"/"Standard" branch)."""
    lora_type = str(d.get("LoRA_type"))
    used = {g for g, _ in LYCORIS_TYPES[lora_type][1]} if lora_type in LYCORIS_TYPES else (
        set(DYLORA_ARGS) if lora_type == "Kohya DyLoRA" else set())
    for key in sorted((OTHER_TYPES & set(d)) - used):
        conv.dropped.append((key, f"an option of other LyCORIS / DyLoRA types, not of {lora_type!r}"
                             if lora_type in (*SUPPORTED_TYPES, *LYCORIS_TYPES, "Kohya DyLoRA")
                             else f"belongs to LoRA_type {lora_type!r}, which is not converted"))
    if lora_type in FAMILY_TYPES:
        return
    if lora_type in LYCORIS_TYPES or lora_type == "Kohya DyLoRA":
        _lycoris_network(d, conv, lora_type)
        return
    if lora_type not in SUPPORTED_TYPES:
        module = OTHER_TYPE_MODULES.get(lora_type)
        if lora_type.startswith("LyCORIS/"):
            module = f"LyCORIS (lycoris.kohya, {lora_type.removeprefix('LyCORIS/')})"
        if module is None:
            conv.problems.append(f"LoRA_type {lora_type!r} ({conv.source}): unknown to the kohya_ss GUI; use "
                                 "\"Standard\" (LoRA) or \"Kohya LoCon\" (LoCon)")
            return
        conv.problems.append(f"LoRA_type {lora_type!r} is not supported yet ({conv.source}): kohya trains it with "
                             f"{module}. loralab trains Standard, Kohya LoCon, Kohya DyLoRA and LyCORIS/LoCon, LoHa, "
                             "LoKr, DyLoRA and Native Fine-Tuning; pick one of those")
        for key in ("conv_dim", "conv_alpha", *BLOCK_ARGS, *LORAPLUS):
            if key in d:
                conv.dropped.append((key, f"belongs to LoRA_type {lora_type!r}, which is not converted"))
        return
    args: list[str] = []
    if lora_type == "Kohya LoCon":
        args += [f"conv_dim={d.get('conv_dim')}", f"conv_alpha={d.get('conv_alpha')}"]
    else:
        for key in ("conv_dim", "conv_alpha"):
            if key in d:
                conv.dropped.append((key, "LoRA_type \"Standard\": the GUI passes no conv_dim (only \"Kohya LoCon\" "
                                          "trains the 3x3 convs)"))
    args += [f"{k}={d[k]}" for k in BLOCK_ARGS if d.get(k)]
    args += [f"{k}={d[k]}" for k in LORAPLUS if d.get(k)]  # append_loraplus_network_args
    args = " ".join(args).replace('"', "").split()
    conv.map("LoRA_type", "network_module", "networks.lora", f"LoRA_type {lora_type!r}")
    conv.map("LoRA_type", "network_args", args, "conv_dim/conv_alpha (Kohya LoCon), non-empty block-wise fields, "
             "rank/module dropout and LoRA+ ratios, as the GUI writes network_args")


def _lycoris_network(d: dict, conv: GuiConversion, lora_type: str) -> None:
    """LyCORIS types -> network_module "lycoris.kohya" and network_args as lora_gui.py writes them ("k=v" per
    field, then algo); "Kohya DyLoRA" -> networks.dylora with its fields when set. A field the GUI would pass with
    a value loralab refuses (train_norm=True, ...) is reported by the config checks with its key."""
    if lora_type == "Kohya DyLoRA":
        args = [f"{k}={d[k]}" for k in DYLORA_ARGS + BLOCK_ARGS if d.get(k) and k not in BLOCK_KEYS]
        for key in BLOCK_KEYS:  # the GUI passes them, kohya's networks.dylora reads none (loralab would refuse them)
            if d.get(key):
                conv.dropped.append((key, "LoRA_type \"Kohya DyLoRA\": kohya's networks.dylora ignores the "
                                          "block-wise fields (they work with Standard and Kohya LoCon)"))
        module = "networks.dylora"
    else:
        algo, fields_ = LYCORIS_TYPES[lora_type]
        args = [f"{arg}={d.get(g, LYCORIS_DEFAULTS.get(g, False))}" for g, arg in fields_] + [f"algo={algo}"]
        module = "lycoris.kohya"
    args += [f"{k}={d[k]}" for k in LORAPLUS if d.get(k)]  # append_loraplus_network_args
    args = " ".join(args).replace('"', "").split()
    conv.map("LoRA_type", "network_module", module, f"LoRA_type {lora_type!r}")
    conv.map("LoRA_type", "network_args", args, "the type's fields as the GUI writes network_args")


def _learning_rates(d: dict, conv: GuiConversion) -> None:
    """learning_rate, text_encoder_lr, unet_lr and the train-only flags (lora_gui.py train_model,
    resolve_network_train_flags): a rate of 0 is not sent (the group falls back to learning_rate) and one side at
    0 with the other not at 0 trains only that other side."""
    lr, te, unet = (_as_float(d.get(k), 0.0) for k in ("learning_rate", "text_encoder_lr", "unet_lr"))
    t5 = _as_float(d.get("t5xxl_lr"), 0.0)
    if lr == 0 and te == 0 and unet == 0:
        conv.problems.append(f"learning_rate, text_encoder_lr, unet_lr: all 0 ({conv.source}); the GUI refuses "
                             "it (\"Please input learning rate values.\"): give a learning rate")
    if te == 0 and t5 > 0:
        conv.problems.append(f"t5xxl_lr = {t5} with text_encoder_lr = 0 ({conv.source}): the GUI refuses it; "
                             "set text_encoder_lr")
    if lr:
        conv.keys["learning_rate"] = lr  # always sent since kohya_ss PR #3264, unless 0
    else:
        conv.dropped.append(("learning_rate", "0: not sent (each trained part has its own rate)"))
    if te > 0:
        conv.map("text_encoder_lr", "text_encoder_lr", te, "the GUI sends [te, te]; kohya's networks.lora uses the "
                 "first for every text encoder")
    if unet != 0:
        conv.keys["unet_lr"] = unet
    unet_only, te_only = te == 0 and unet != 0, te != 0 and unet == 0
    if unet_only:
        conv.map("text_encoder_lr", "network_train_unet_only", True, "text_encoder_lr 0: the GUI trains the UNet "
                 "only (no text-encoder keys in the file)")
    if te_only:
        conv.map("unet_lr", "network_train_text_encoder_only", True, "unet_lr 0: the GUI trains the text encoder only")
    if not unet_only and te == 0:
        conv.mapped.append(("text_encoder_lr", "text_encoder_lr", lr, "0: not sent, so kohya uses learning_rate"))
    if not te_only and unet == 0:
        conv.mapped.append(("unet_lr", "unet_lr", lr, "0: not sent, so kohya uses learning_rate"))


def _steps_and_warmup(d: dict, conv: GuiConversion) -> None:
    """How long, the warmup and the text encoder's stop (lora_gui.py train_model;
    common_gui.resolve_lr_warmup_steps)."""
    epochs, steps, epoch = d.get("max_train_epochs") or 0, d.get("max_train_steps") or 0, d.get("epoch") or 0
    warmup_pct = _as_float(d.get("lr_warmup"), 0.0)
    warmup_steps = _as_float(d.get("lr_warmup_steps") if d.get("lr_warmup_steps") != "" else 0, 0.0)
    if epochs:  # sd-scripts: max_train_epochs wins over max_train_steps
        conv.keys["max_train_epochs"] = epochs
        conv.dropped.append(("epoch", f"not used: max_train_epochs {epochs} wins"))
    if d.get("dataset_config"):  # the GUI cannot count the images: epoch is not used
        if steps:
            conv.keys["max_train_steps"] = steps
            if warmup_steps <= 0 and warmup_pct != 0:  # the percent as steps of max_train_steps
                warmup_steps, warmup_pct = round(warmup_pct * steps / 100), 0.0
                conv.mapped.append(("lr_warmup", "lr_warmup_steps", warmup_steps, "with a dataset_config the GUI "
                                    f"turns the percent into steps of max_train_steps {steps}"))
        else:
            warmup_steps = 0.0  # train_model sets lr_warmup_steps = 0 (the percent still counts)
            if not epochs:
                conv.map("epoch", "max_train_steps", 1600, "with a dataset_config and max_train_steps 0 the GUI "
                         "sends no length, so sd-scripts trains its default 1600 steps (epoch is not used)")
    elif steps:
        conv.keys["max_train_steps"] = steps
        if not epochs:
            conv.dropped.append(("epoch", f"not used: max_train_steps {steps} is set (the GUI uses epoch only to "
                                          "compute max_train_steps when that is 0)"))
    elif not epochs:
        conv.map("epoch", "max_train_epochs", epoch, "max_train_steps 0: the GUI computes max_train_steps = ceil(sum "
                 "of repeats x images / train_batch_size / gradient_accumulation_steps x epoch x (2 with "
                 "reg_data_dir)); loralab counts the same epochs in its own batches (per-bucket rounding may add "
                 "a few steps)")
    if warmup_steps > 0:  # resolve_lr_warmup_steps: absolute steps win over the percent
        conv.map("lr_warmup_steps", "lr_warmup_steps", int(warmup_steps), "steps (wins over lr_warmup)"
                 if warmup_pct else "steps")
    elif warmup_pct >= 100:
        conv.problems.append(f"lr_warmup = {warmup_pct:g} ({conv.source}): warmup over all steps cannot be given "
                             "as a fraction below 1; set lr_warmup_steps to a step count")
    elif warmup_pct > 0:
        conv.map("lr_warmup", "lr_warmup_steps", warmup_pct / 100, f"{warmup_pct:g}% of all steps")
    for key in ("stop_text_encoder_training", "stop_text_encoder_training_pct"):
        _stop_text_encoder(key, d.get(key), conv)


def _stop_text_encoder(key: str, value: Any, conv: GuiConversion) -> None:
    """A percent of the steps in the GUI, which ignores it for LoRA (train_model: "not yet supported. Ignoring",
    then 0), and sd-scripts' train_network.py gets no such option: kohya trains the text encoder to the end,
    and so does loralab (the field is dropped with that note)."""
    pct = _as_float(value, 0.0)
    if value is None:
        return
    conv.dropped.append((key, "0: the text encoder trains to the end" if pct <= 0 else
                         f"{pct:g}%: the GUI ignores it for LoRA (\"not yet supported\"), so kohya trained the text "
                         "encoder to the end, as loralab does; use stop_text_encoder_training (steps) to stop earlier"))


def _optimizer_and_scheduler(d: dict, conv: GuiConversion) -> None:
    conv.map("optimizer", "optimizer_type", d.get("optimizer"), "renamed")
    for key in ("optimizer_args", "lr_scheduler_args"):
        text = d.get(key) or ""
        text = " ".join(map(str, text)) if isinstance(text, list) else str(text)
        if not _ARGS_PATTERN.match(text):
            conv.problems.append(f"{key} = {text!r} ({conv.source}): the GUI refuses it: give key=value pairs "
                                 "separated by one space, with no space inside a value (betas=0.9,0.99)")
        args = text.replace('"', "").split()
        if args:
            conv.map(key, key, args, "split on spaces after removing double quotes, as the GUI does")
    cycles = d.get("lr_scheduler_num_cycles")  # train_model's "" -> epoch cannot happen: update_my_data made it 1
    if not _off(cycles):
        conv.keys["lr_scheduler_num_cycles"] = cycles
    backend = str(d.get("dynamo_backend") or "no")
    if backend.lower() == "no":
        conv.dropped.append(("dynamo_backend", "no: a launcher setting"))
    else:  # the GUI passes it to `accelerate launch`, which compiles the model: loralab's torch_compile
        conv.map("dynamo_backend", "dynamo_backend", backend, "the launcher's torch.compile backend")
        conv.keys["torch_compile"] = True


def _noise(d: dict, conv: GuiConversion) -> None:
    """noise_offset_type picks one group of noise keys; the other group is not sent (lora_gui.py train_model)."""
    kind = d.get("noise_offset_type")
    groups = {"Original": ("noise_offset", "adaptive_noise_scale", "noise_offset_random_strength"),
              "Multires": ("multires_noise_iterations", "multires_noise_discount")}
    for name, keys in groups.items():
        for key in keys:
            if name != kind:
                if key in d:
                    conv.dropped.append((key, f"noise_offset_type is {kind!r}: the GUI sends only the {name} keys "
                                              f"when it is {name!r}"))
            elif not _off(d.get(key)):
                conv.keys[key] = d[key]
    noise = _as_float(d.get("noise_offset"), 0.0)
    if not 0 <= noise <= 1:  # checked whatever noise_offset_type is
        conv.problems.append(f"noise_offset = {noise} ({conv.source}): the GUI refuses it; give a value from 0 to 1")
    conv.dropped.append(("noise_offset_type", f"{kind!r}: picks the noise keys above"))


def _other_fields(d: dict, conv: GuiConversion) -> None:
    conv.map("max_resolution", "resolution", d.get("max_resolution"), "renamed")
    extension = d.get("caption_extension")
    if extension == "":
        conv.map("caption_extension", "caption_extension", ".caption", "empty: not sent, so sd-scripts uses its "
                 "default .caption")
    elif extension is not None:
        conv.keys["caption_extension"] = extension
    attention = d.get("xformers")
    if attention in ("xformers", "sdpa"):
        conv.map("xformers", attention, True, f"{attention!r}: the attention backend flag")
    else:
        conv.dropped.append(("xformers", f"{attention!r}: no attention flag"))
    seed = d.get("seed") or 0
    if seed:
        conv.keys["seed"] = seed
    else:
        conv.mapped.append(("seed", "seed", 0, "0 or empty: kohya draws a random seed; loralab uses seed 0"))
    text = d.get("sample_prompts")
    if isinstance(text, str) and text.strip():
        conv.prompt_text = text if text.endswith("\n") else text + "\n"
        path = str(PurePath(str(d.get("output_dir") or "")) / "sample" / "prompt.txt")
        conv.map("sample_prompts", "sample_prompts", path, "prompt text: the GUI writes it to <output_dir>/sample/"
                 "prompt.txt; write prompt_text there (or elsewhere and change this key) before training")
    elif "sample_prompts" in d:
        conv.dropped.append(("sample_prompts", "empty: no prompts"))
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key in sorted(PASS & set(d)):
        value = d[key]
        if not _off(value):
            conv.keys[key] = value
            continue
        f = fields.get(key)
        default = None if f is None else f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if key in conv.keys or value is None or not default or isinstance(default, bool):
            continue
        if key not in ("pretrained_model_name_or_path", "train_data_dir", "output_dir"):
            conv.mapped.append((key, key, default, f"{value!r}: the GUI does not send 0, \"\" or false, so kohya "
                                "uses its default"))


def _additional_parameters(d: dict, conv: GuiConversion) -> None:
    """The GUI appends additional_parameters after --config_file, so they win over the file's values."""
    text = str(d.get("additional_parameters") or "").strip()
    if not text:
        return
    try:
        flags = parse_command_line(shlex.split(text))
    except (ValueError, LoralabError) as e:
        conv.problems.append(f"additional_parameters = {text!r} ({conv.source}): {e}")
        return
    for key, value in flags.items():
        conv.map("additional_parameters", key, value, "a command-line flag after the GUI's TOML: wins over it")
