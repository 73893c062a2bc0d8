"""Building a config: a TOML file, then command-line overrides (CLI > TOML > default), each value converted
to its key's type, then the checks that need no model."""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from loralab.config.fields import LORAPLUS_KEYS, TrainConfig, parse_resolution
from loralab.config.kohya import ALIASES, FOREIGN, alias, foreign_key, suggest
from loralab.errors import LoralabError

log = logging.getLogger(__name__)


def _fields(config_class: type) -> dict[str, Any]:
    return {f.name: f for f in fields(config_class)}


def _coerce(name: str, value: Any, source: str, known: dict[str, Any]) -> Any:
    """Convert a TOML or command-line value to the type of the field `name`."""
    f = known[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    where = f"{name} ({source})"
    try:
        if name == "resolution":
            w, h = parse_resolution(value)
            return f"{w},{h}"
        if name in ("lr_warmup_steps", "lr_decay_steps"):  # both kohya int_or_float: steps, a ratio < 1 or 'N%'
            return _parse_warmup(value)
        if name == "text_encoder_lr":
            return _parse_text_encoder_lr(value)
        if name == "unet_lr" and isinstance(value, list):
            value = value[0] if value else -1.0
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError("expected true or false")
        if isinstance(default, int):
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("expected an integer")
            return int(value) if not isinstance(value, str) else int(float(value))
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if isinstance(default, list):
            if isinstance(value, str):
                return value.split() if value.strip() else []
            if isinstance(value, (list, tuple)):
                return [str(v) for v in value]
            raise ValueError("expected a list of 'key=value' strings")
        if isinstance(default, str):
            if isinstance(value, (dict, list)) or value is True:
                raise ValueError("expected a string")
            return "" if value is None or value is False else str(value)  # kohya TOMLs write `resume = false` for unset
    except (ValueError, TypeError) as e:
        raise LoralabError(f"{where}: bad value {value!r}: {e}") from None
    return value


def _parse_text_encoder_lr(value: Any) -> float | list[float]:
    """text_encoder_lr: one number (-1 = learning_rate), or kohya's list form, one value per text encoder
    (TOML [1e-5, 2e-5], command line `--text_encoder_lr 1e-5 2e-5`, or "1e-5,2e-5"). An empty list is
    unset (-1), one value is that number, two values stay a list (each >= 0)."""
    if isinstance(value, str):
        value = value.replace(",", " ").split() if value.strip() else []
        value = value[0] if len(value) == 1 else value
    if not isinstance(value, (list, tuple)):
        if isinstance(value, bool):
            raise ValueError("expected a number")
        return float(value)
    if any(isinstance(v, bool) for v in value):
        raise ValueError("expected numbers")
    lrs = [float(v) for v in value]
    if len(lrs) > 2:
        raise ValueError("expected one value, or two: one per SDXL text encoder [TE1, TE2]")
    if any(v < 0 for v in lrs):
        raise ValueError("each value of the list must be 0 or more (0 = that text encoder is not trained)")
    return lrs[0] if len(lrs) == 1 else -1.0 if not lrs else lrs


def _parse_warmup(value: Any) -> float:
    """lr_warmup_steps: an integer step count, a fraction < 1 of all steps, or 'N%'."""
    if isinstance(value, str):
        v = value.strip()
        if v.endswith("%"):
            return float(v[:-1]) / 100.0
        value = float(v)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError("expected a step count, a fraction below 1, or 'N%'")
    return float(value)


def _flatten(doc: dict, path: str) -> dict[str, Any]:
    """kohya flattens one level of [sections]."""
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            for k2, v2 in value.items():
                if isinstance(v2, dict):
                    raise LoralabError(f"{path}: [{key}.{k2}] nests too deep; use one level of [section]")
                flat[k2] = v2
        else:
            flat[key] = value
    return flat


def build_config(toml_path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                 config_class: type[TrainConfig] = TrainConfig, sources: dict[str, str] | None = None) -> TrainConfig:
    """TOML file (or a kohya_ss GUI JSON: `config/gui.py`), then command-line overrides (CLI > file >
    default); validated.

    `sources`, when given, receives where each value that is not a default came from (the file's path or
    "command line"), for `--dry-run`.

    `config_class`: a recipe's own config (a TrainConfig subclass whose extra fields are that method's
    keys, still flat kohya-style keys for the user; its `validate()` method, if any, checks them)."""
    known = _fields(config_class)
    values: dict[str, Any] = {}
    problems: list[str] = []
    conversion = None
    if toml_path and Path(toml_path).suffix.lower() == ".json":  # a kohya_ss GUI config (config/gui.py)
        from loralab.config.gui import read_gui_config

        conversion = read_gui_config(toml_path)
        problems += conversion.problems
        values = {key: (value, str(toml_path)) for key, value in conversion.keys.items()}
        if conversion.prompt_text:  # the GUI keeps prompt text, not a file: a file of it (outside the user's folders)
            values["sample_prompts"] = (str(gui_prompt_file(conversion.prompt_text)), f"{toml_path}, its sample prompts")
    elif toml_path:
        p = Path(toml_path)
        try:
            doc = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LoralabError(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise LoralabError(f"{p}: not valid TOML: {e}") from None
        for key, value in _flatten(doc, str(p)).items():
            values[key] = (value, str(p))
    for key, value in (overrides or {}).items():
        values[key] = (value, "command line")
    kwargs, key_problems = config_values(values, known, sources)
    problems += key_problems
    cfg = config_class(**kwargs)
    reported = {m.split(" ", 1)[0].rstrip(":") for m in problems}
    problems += [m for m in config_problems(cfg) if m.split(":", 1)[0] not in reported]
    if conversion is not None:
        problems += family_problems(cfg, conversion.expected_family, str(toml_path))
    raise_problems(problems)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def gui_prompt_file(text: str) -> Path:
    """A GUI config's sample prompt text as a file in the temp folder (named by its content), so the run
    reads it as a prompt file without writing into the user's folders (`--dry-run` writes nothing there)."""
    import hashlib
    import tempfile

    from loralab.io import atomic_write_bytes

    path = Path(tempfile.gettempdir()) / "loralab_gui_prompts" / f"{hashlib.sha1(text.encode()).hexdigest()[:16]}.txt"
    if not path.is_file():
        atomic_write_bytes(path, text.encode("utf-8"))
    return path


def family_problems(cfg: TrainConfig, expected: str, source: str) -> list[str]:
    """A GUI config's sdxl / v2 checkboxes against the family read from the model's key names."""
    from loralab.models.loader import peek_family

    names = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
    found = peek_family(cfg.pretrained_model_name_or_path) if Path(cfg.pretrained_model_name_or_path).exists() else None
    if found is None or found == expected:
        return []
    return [f"sdxl / v2 ({source}): the GUI config is for {names[expected]}, but {cfg.pretrained_model_name_or_path} "
            f"is {names[found]}; fix the checkboxes or pick the model the config was made for"]


def config_values(values: dict[str, tuple[Any, str]], known: dict[str, Any], sources: dict[str, str] | None = None,
                  notes: list[tuple[str, str, str]] | None = None) -> tuple[dict[str, Any], list[str]]:
    """{key: (value, source)} -> (the loralab keys' converted values, the problems): aliases resolved, kohya
    keys without effect noted (`config/kohya.py`), unknown keys and bad values collected, none raised.
    `notes` (when given) receives (key, source, what happened) for each alias and key without effect;
    without it they are logged."""
    kwargs: dict[str, Any] = {}
    problems: list[str] = []

    def note(key: str, source: str, text: str) -> None:
        if notes is None:
            log.info("%s (%s): %s", key, source, text)
        else:
            notes.append((key, source, text))

    for key, (value, source) in values.items():
        if key in ALIASES:
            resolved = alias(key, value)
            if resolved is None:
                continue
            note(key, source, f"read as {resolved[0]} = {resolved[1]!r}")
            key, value = resolved
        if key in FOREIGN and key not in known:
            kind, text = foreign_key(key, value)
            if kind == "problem":
                problems.append(f"{text} ({source})")
            else:
                note(key, source, f"no effect in loralab: {text}")
            continue
        if key not in known:
            hint = suggest(key, list(known)) or " `loralab train --help` lists every key."
            problems.append(f"{key}: unknown key ({source}).{hint}")
            continue
        try:
            kwargs[key] = _coerce(key, value, source, known)
        except LoralabError as e:
            problems.append(str(e))
            continue
        if sources is not None:
            sources[key] = source
    return kwargs, problems


def validate(cfg: TrainConfig) -> None:
    """Checks that need no model: choices, ranges, paths, combinations. Every problem is reported at once
    (`config_problems`)."""
    raise_problems(config_problems(cfg))


def raise_problems(problems: list[str]) -> None:
    """One error for every problem found: the message itself when there is one, else a list."""
    if len(problems) == 1:
        raise LoralabError(problems[0])
    if problems:
        raise LoralabError(f"{len(problems)} problems in the config:\n" + "\n".join(f"  - {m}" for m in problems))


DYNAMO_BACKENDS = ("no", "inductor", "aot_eager", "eager", "cudagraphs")  # torch's own; "no": do not compile


def config_problems(cfg: TrainConfig) -> list[str]:
    """The problems of a config, in key order, as messages that name the key."""
    problems: list[str] = []
    bad = problems.append
    _choice_and_path_problems(cfg, bad)
    opts = _range_problems(cfg, bad)
    _combination_problems(cfg, bad)
    _kohya_option_problems(cfg, opts, bad)
    return problems


def _choice_and_path_problems(cfg: TrainConfig, bad) -> None:
    """Values outside a key's choices; missing model, dataset and other paths."""
    for f in fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            bad(f"{f.name}: {getattr(cfg, f.name)!r} is not accepted; use one of {', '.join(map(str, choices))}")
    if not cfg.pretrained_model_name_or_path:
        bad("pretrained_model_name_or_path: missing; give the base model file or folder")
    if not Path(cfg.pretrained_model_name_or_path).exists():
        bad(f"pretrained_model_name_or_path: {cfg.pretrained_model_name_or_path} does not exist")
    if not cfg.train_data_dir and not cfg.dataset_config and not cfg.prompts_file:  # prompts_file: a slider / LECO
        bad("train_data_dir: missing; give the folder that holds <repeats>_<name>/ image folders" + (
            "" if cfg.max_denoising_steps == 40 and cfg.leco_denoise_guidance_scale == 3.0 else  # slider keys given
            " (a slider / LECO run, as max_denoising_steps or leco_denoise_guidance_scale say: give prompts_file, "
            "the file of its target / positive / negative prompts)"))
    if cfg.prompts_file and (cfg.max_denoising_steps < 1 or cfg.leco_denoise_guidance_scale < 0):
        bad("max_denoising_steps / leco_denoise_guidance_scale: need at least 1 step and a scale of 0 or more")
    for key in ("train_data_dir", "reg_data_dir", "validation_data_dir", "vae", "network_weights", "sample_prompts", "resume",
                "prompts_file"):
        value = getattr(cfg, key)
        if value and not Path(value).exists():
            bad(f"{key}: {value} does not exist")


def _range_problems(cfg: TrainConfig, bad) -> dict[str, Any]:
    """Numbers outside their range; returns the network options (network_args over top-level keys)."""
    w, h = cfg.resolution_wh()
    if w % 8 or h % 8 or w <= 0 or h <= 0:
        bad(f"resolution: {w},{h} must be positive multiples of 8")
    positive = ("network_dim", "train_batch_size", "gradient_accumulation_steps", "vae_batch_size", "bucket_reso_steps",
                "log_every_n_steps")
    for key in positive:
        if getattr(cfg, key) < 1:
            bad(f"{key}: must be at least 1, got {getattr(cfg, key)}")
    for key in ("network_dropout", "rank_dropout", "module_dropout", "caption_dropout_rate", "caption_tag_dropout_rate"):
        v = getattr(cfg, key)
        if not 0.0 <= v < 1.0:
            bad(f"{key}: must be in [0, 1), got {v}")
    try:
        opts = cfg.network_options()
    except LoralabError as e:
        bad(str(e))
        opts = {}
    for key in ("rank_dropout", "module_dropout"):
        if key in opts and not 0.0 <= opts[key] < 1.0:
            bad(f"network_args {key}: must be in [0, 1), got {opts[key]}")
    if opts and cfg.network_dim >= 1:  # the network type and its options (network/types.py), before any model loads
        _network_type_problems(cfg, opts, bad)
    if cfg.max_train_epochs < 0 or cfg.max_train_steps < 1 and cfg.max_train_epochs == 0:
        bad("max_train_steps / max_train_epochs: give a positive number of steps or epochs")
    if not 0 <= cfg.min_timestep < cfg.max_timestep <= 1000:
        bad(f"min_timestep/max_timestep: need 0 <= min < max <= 1000, got {cfg.min_timestep}, {cfg.max_timestep}")
    if cfg.network_train_unet_only and cfg.network_train_text_encoder_only:
        bad("network_train_unet_only and network_train_text_encoder_only: choose at most one")
    if cfg.lr_scheduler == "constant" and cfg.lr_warmup_steps > 0:
        bad("lr_warmup_steps: the constant scheduler has no warmup; use lr_scheduler = \"constant_with_warmup\"")
    if not 0.0 <= cfg.validation_split < 1.0:
        bad(f"validation_split: must be in [0, 1), got {cfg.validation_split}")
    for key in ("validate_every_n_epochs", "validate_every_n_steps", "max_validation_steps"):
        if getattr(cfg, key) < 0:
            bad(f"{key}: must be 0 or more, got {getattr(cfg, key)}")
    if cfg.ip_noise_gamma < 0 or cfg.token_warmup_step < 0 or cfg.token_warmup_min < 0:
        bad("ip_noise_gamma, token_warmup_step, token_warmup_min: must be 0 or more")
    if cfg.clip_skip < 0:
        bad(f"clip_skip: must be 0 or more, got {cfg.clip_skip}")
    if cfg.dynamo_backend.lower() not in DYNAMO_BACKENDS:
        bad(f"dynamo_backend: {cfg.dynamo_backend!r} is not a torch.compile backend loralab runs; use one of "
            f"{', '.join(DYNAMO_BACKENDS)}")
    return opts


def _combination_problems(cfg: TrainConfig, bad) -> None:
    """Keys that do not go together (kohya's rules); the caches' implied keys are set here."""
    if cfg.cache_latents_to_disk and not cfg.cache_latents:
        cfg.cache_latents = True  # kohya: to_disk implies cache_latents
    if cfg.cache_text_encoder_outputs_to_disk and not cfg.cache_text_encoder_outputs:
        cfg.cache_text_encoder_outputs = True  # kohya: to_disk implies cache_text_encoder_outputs
    if cfg.cache_text_encoder_outputs:
        try:
            _check_text_encoder_cache(cfg)
        except LoralabError as e:
            bad(str(e))
    if cfg.fp8_base and cfg.mixed_precision == "no":
        bad('fp8_base: the float8 weights are computed in bf16 or fp16; set mixed_precision = "bf16" '
                           '(or "fp16"), or fp8_base = false')
    if cfg.max_bucket_reso < cfg.min_bucket_reso:
        bad("min_bucket_reso/max_bucket_reso: min must not exceed max")
    if cfg.save_every_n_epochs < 0 or cfg.save_every_n_steps < 0:
        bad("save_every_n_epochs/save_every_n_steps: must be 0 or more")


def _kohya_option_problems(cfg: TrainConfig, opts: dict[str, Any], bad) -> None:
    """The later kohya options: loss types, v-prediction losses, full half precision, schedulers, save_last_n,
    dataset_config, augmentations against the latent cache, LoRA+."""
    for key in ("huber_c", "huber_scale"):
        if getattr(cfg, key) <= 0:
            bad(f"{key}: must be more than 0, got {getattr(cfg, key)}")
    if cfg.v_pred_like_loss < 0:
        bad(f"v_pred_like_loss: must be 0 or more, got {cfg.v_pred_like_loss}")
    if cfg.v_pred_like_loss and cfg.v_parameterization:
        bad("v_pred_like_loss: adds a v-prediction-like term to an epsilon-prediction loss, so it cannot be used "
            "with v_parameterization = true (kohya refuses it too); remove one of them")
    if cfg.scale_v_pred_loss_like_noise_pred and not cfg.v_parameterization:
        bad("scale_v_pred_loss_like_noise_pred: scales a v-prediction loss, so it needs v_parameterization = true "
            "(kohya's rule); set it, or remove scale_v_pred_loss_like_noise_pred")
    if cfg.full_fp16 and cfg.full_bf16:
        bad("full_fp16/full_bf16: choose at most one")
    for key, dtype in (("full_fp16", "fp16"), ("full_bf16", "bf16")):
        if getattr(cfg, key) and cfg.mixed_precision != dtype:
            bad(f"{key}: keeps the LoRA weights and their gradients in {dtype}, so it needs mixed_precision = "
                f'"{dtype}" (kohya\'s rule); set it, or {key} = false')
    if cfg.lr_scheduler_type and cfg.lr_warmup_steps > 0:
        bad("lr_scheduler_type: a scheduler class gets no warmup (kohya refuses one); set lr_warmup_steps = 0, and "
            "give the class its own warmup through lr_scheduler_args if it has one")
    for key in ("lr_decay_steps", "lr_scheduler_timescale", "save_last_n_epochs", "save_last_n_epochs_state",
                "save_last_n_steps", "save_last_n_steps_state"):
        if getattr(cfg, key) < 0:
            bad(f"{key}: must be 0 or more, got {getattr(cfg, key)}")
    if not 0.0 <= cfg.lr_scheduler_min_lr_ratio <= 1.0:
        bad(f"lr_scheduler_min_lr_ratio: must be in [0, 1] (a share of the initial learning rate), got "
            f"{cfg.lr_scheduler_min_lr_ratio}")
    if cfg.dataset_config:  # every problem of the dataset TOML, each "dataset_config: <file>: <place>: ..."
        from loralab.data.dataset_config import dataset_config_problems

        for message in dataset_config_problems(cfg.dataset_config, dataclasses.asdict(cfg)):
            bad(message)
    if cfg.cache_latents and not cfg.dataset_config:  # with a dataset_config, each subset is checked above
        from loralab.data.augment import cache_conflict

        for key in ("color_aug", "random_crop"):
            if getattr(cfg, key):
                bad(cache_conflict(key))
    if cfg.masked_loss and not cfg.alpha_mask and not cfg.dataset_config:  # a dataset_config is checked above
        from loralab.data.masks import NO_MASKS

        bad(f"masked_loss: {NO_MASKS}")
    for key in LORAPLUS_KEYS:  # LoRA+: top-level key, or network_args (which wins, as in network_options)
        where = "network_args " if any(str(a).partition("=")[0].strip() == key for a in cfg.network_args) else ""
        value = opts.get(key, 0.0 if where else getattr(cfg, key))
        if not value >= 0:  # also refuses nan
            bad(f"{where}{key}: the lora_up learning rate is lr x this ratio, so it must be 0 (off) or more "
                f"(kohya's LoRA+ uses 16), got {value}")


def _network_type_problems(cfg: TrainConfig, opts: dict[str, Any], bad) -> None:
    """network_module / network_args of the network type: unknown algo or preset, a bad factor or unit, options
    of another module, LoRA+ on a type without lora_up weights, block-wise keys (network/blocks.py)."""
    try:
        net_cfg = cfg.network_config()
    except LoralabError as e:
        bad(str(e))
        return
    if net_cfg.algo in ("loha", "lokr", "full") and any(opts.get(k) for k in LORAPLUS_KEYS):
        bad(f"loraplus_lr_ratio: LoRA+ trains the lora_up (B) weights faster; algo = {net_cfg.algo} has none. "
            "Remove the LoRA+ ratios, or use algo=locon / networks.lora")
    if net_cfg.blocks:  # block-wise keys: numbers, presets, and lengths for the model's family (read from its keys)
        from loralab.models.loader import peek_family
        from loralab.network.blocks import block_problems

        path = cfg.pretrained_model_name_or_path
        for message in block_problems(net_cfg.blocks, peek_family(path) if path and Path(path).exists() else None):
            bad(message)


def text_encoder_cache_allowed(cfg: TrainConfig) -> bool:
    """The text encoders' outputs cannot change during the run (frozen encoders, one caption per image), so
    `loralab train` caches them in memory even without cache_text_encoder_outputs."""
    try:
        _check_text_encoder_cache(cfg)
    except LoralabError:
        return False
    return True


def _check_text_encoder_cache(cfg: TrainConfig) -> None:
    """cache_text_encoder_outputs needs frozen text encoders and one caption per image (kohya's rule);
    caption dropout is fine (the empty caption is cached too)."""
    if cfg.trains_text_encoder():
        raise LoralabError(
            "cache_text_encoder_outputs: the text encoders would be trained, so their outputs change every step; "
            "set network_train_unet_only = true (or text_encoder_lr = 0), or cache_text_encoder_outputs = false")
    if cfg.token_string:
        raise LoralabError(
            "cache_text_encoder_outputs: pivotal tuning (token_string) trains the new tokens' embeddings, so the "
            "text encoders' outputs change every step; set cache_text_encoder_outputs = false")
    varying = [name for name, on in (("shuffle_caption", cfg.shuffle_caption),
                                     ("caption_tag_dropout_rate", cfg.caption_tag_dropout_rate > 0),
                                     ("enable_wildcard", cfg.enable_wildcard),
                                     ("token_warmup_step", cfg.token_warmup_step > 0)) if on]
    if varying:
        raise LoralabError(
            f"cache_text_encoder_outputs: {', '.join(varying)} change{'s' if len(varying) == 1 else ''} the caption "
            "every step, so one cached output per image would be wrong; turn "
            f"{'it' if len(varying) == 1 else 'them'} off or set cache_text_encoder_outputs = false")


def config_help(config_class: type[TrainConfig] = TrainConfig) -> str:
    """Every key, its default and meaning, grouped, then the block numbering of block-wise training; used by
    `loralab train --help`."""
    lines: list[str] = []
    group = None
    for f in fields(config_class):
        g = f.metadata.get("group", "")
        if g != group:
            group = g
            lines.append(f"\n[{g}]")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        choices = f.metadata.get("choices")
        extra = f" (one of: {', '.join(map(str, choices))})" if choices else ""
        lines.append(f"  {f.name} = {default!r}\n      {f.metadata.get('help', '')}{extra}")
    from loralab.network.blocks import NUMBERING_HELP

    return "\n".join(lines + ["", NUMBERING_HELP])


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
