"""Optimizers, the config's optimizer and schedule, precision helpers and the learning rates to log.

kohya-ss sd-scripts compatible (`train_util.get_optimizer`, `get_scheduler_fix`), with plain arguments:

    kwargs = parse_optimizer_args(cfg.optimizer_args)                  # "k=v k=v" or ["k=v", ...]
    optimizer, desc = create_optimizer(cfg.optimizer_type, param_groups, cfg.learning_rate, kwargs)
    warmup = resolve_warmup_steps(cfg.lr_warmup_steps, total_steps)
    scheduler = create_scheduler(cfg.lr_scheduler, optimizer, warmup_steps=warmup, total_steps=total_steps, ...)
    ...
    logs.update(current_lrs(optimizer, scheduler))                     # lr/unet, lr/textencoder, lr/d*lr/...

or all of it from a config: `build_optimizer(cfg, param_groups, total_steps)`. The schedules live in
`train/schedulers.py` (re-exported here).

`desc` is kohya's `ss_optimizer` metadata string, e.g. "torch.optim.adamw.AdamW(weight_decay=0.01)".

Param groups may carry a "name" key ("unet", "textencoder", "unet_block3", ...); `current_lrs` uses it for
the TensorBoard tag. torch optimizers keep extra keys in their param groups.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from loralab.errors import LoralabError
from loralab.train.schedulers import SCHEDULERS, create_scheduler, resolve_warmup_steps

logger = logging.getLogger(__name__)

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "Fp16GradScaler",
    "build_optimizer",
    "create_optimizer",
    "create_scheduler",
    "current_lrs",
    "half_precision",
    "loss_scaler",
    "parse_optimizer_args",
    "resolve_warmup_steps",
]


# ------------------------------------------------------------------------------------ optimizer_args
_BARE_WORD = re.compile(r"^[A-Za-z_][\w.\-]*$")
_KEY = re.compile(r"^[A-Za-z_]\w*$")
_WORDS = {"true": True, "false": False, "none": None}


def _split_gui_string(text: str) -> list[str]:
    """Split a GUI-style "k=v k=v" string on whitespace; a piece without "=" continues the previous one.

    So `betas=0.9, 0.99` stays one entry ("betas=0.9, 0.99"), which the kohya_ss GUI breaks (GUI#3052).
    """
    entries: list[str] = []
    for piece in text.split():
        if "=" not in piece and entries:
            entries[-1] = f"{entries[-1]} {piece}"
        else:
            entries.append(piece)
    return entries


def _parse_value(key: str, raw: str, entry: str, key_name: str) -> Any:
    raw = raw.strip()
    if not raw:
        raise LoralabError(
            f"{key_name}: entry {entry!r} has no value after '='; write it as {key}=<value> (e.g. {key}=0.01)."
        )
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if raw.lower() in _WORDS:
        return _WORDS[raw.lower()]
    if _BARE_WORD.match(raw):
        return raw  # an unquoted string such as decay_type=cosine: kept as the string "cosine"
    raise LoralabError(
        f"{key_name}: cannot read the value of entry {entry!r}. Values are Python literals: numbers (0.01), "
        "True/False, tuples (betas=0.9,0.99) or strings (name=cosine or name='a b')."
    )


def parse_optimizer_args(
    args: list[str] | tuple[str, ...] | str | Mapping[str, Any] | None, *, key_name: str = "optimizer_args"
) -> dict[str, Any]:
    """Parse kohya's `--optimizer_args` (also used for `--lr_scheduler_args`) into keyword arguments.

    Each entry is `key=value`; the value goes through `ast.literal_eval` as in kohya, so `True` is a
    bool, `0.01` a float and `betas=0.9,0.99` the tuple (0.9, 0.99). Differences from kohya, all of which
    only accept what kohya rejects:
    - a single string (kohya_ss GUI form) is split on whitespace, and a piece without "=" is glued to
      the entry before it, so `betas=0.9, 0.99` works;
    - an entry is split on its first "=" only;
    - unquoted words are kept as strings (`decay_type=cosine` → "cosine"); `true`/`false`/`none` in
      any case become True/False/None;
    - a mapping (already parsed, e.g. from a TOML table) is returned as a dict.
    A malformed entry raises `LoralabError` naming the entry and `key_name`.
    """
    if args is None:
        return {}
    if isinstance(args, Mapping):
        return dict(args)
    entries = _split_gui_string(args) if isinstance(args, str) else [str(a) for a in args]
    result: dict[str, Any] = {}
    for entry in entries:
        entry = entry.strip()
        if not entry:
            continue
        key, sep, raw = entry.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise LoralabError(
                f"{key_name}: entry {entry!r} is not of the form key=value (e.g. weight_decay=0.01); "
                "separate entries with spaces and do not put spaces around '='."
            )
        result[key] = _parse_value(key, raw, entry, key_name)
    return result


# -------------------------------------------------------------------------------------- optimizers
@dataclass(frozen=True)
class OptimizerSpec:
    """One `optimizer_type` name: where its class lives and what kohya adds to its arguments."""

    name: str  # kohya's spelling; matching is case-insensitive
    module: str
    attr: str
    package: str  # pip package to install if the import fails
    fixed: dict[str, Any] = field(default_factory=dict)  # always passed, not shown in the description
    defaults: dict[str, Any] = field(default_factory=dict)  # passed unless given; shown in the description
    adaptive: bool = False  # D-Adaptation / Prodigy: lr multiplies the estimated step size d


_D = "dadaptation"
OPTIMIZERS: dict[str, OptimizerSpec] = {
    s.name.lower(): s
    for s in (
        OptimizerSpec("AdamW", "torch.optim", "AdamW", "torch"),
        OptimizerSpec("AdamW8bit", "bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
        OptimizerSpec(
            "SGDNesterov8bit", "bitsandbytes.optim", "SGD8bit", "bitsandbytes", {"nesterov": True}, {"momentum": 0.9}
        ),
        OptimizerSpec("Lion8bit", "bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
        OptimizerSpec("PagedAdamW8bit", "bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes"),
        OptimizerSpec("PagedLion8bit", "bitsandbytes.optim", "PagedLion8bit", "bitsandbytes"),
        OptimizerSpec("PagedAdamW", "bitsandbytes.optim", "PagedAdamW", "bitsandbytes"),
        OptimizerSpec("PagedAdamW32bit", "bitsandbytes.optim", "PagedAdamW32bit", "bitsandbytes"),
        OptimizerSpec("Lion", "lion_pytorch", "Lion", "lion-pytorch"),
        OptimizerSpec("SGDNesterov", "torch.optim", "SGD", "torch", {"nesterov": True}, {"momentum": 0.9}),
        OptimizerSpec("DAdaptation", "dadaptation.experimental", "DAdaptAdamPreprint", _D, adaptive=True),
        OptimizerSpec("DAdaptAdamPreprint", "dadaptation.experimental", "DAdaptAdamPreprint", _D, adaptive=True),
        OptimizerSpec("DAdaptAdaGrad", "dadaptation", "DAdaptAdaGrad", _D, adaptive=True),
        OptimizerSpec("DAdaptAdam", "dadaptation", "DAdaptAdam", _D, adaptive=True),
        OptimizerSpec("DAdaptAdan", "dadaptation", "DAdaptAdan", _D, adaptive=True),
        OptimizerSpec("DAdaptAdanIP", "dadaptation.experimental", "DAdaptAdanIP", _D, adaptive=True),
        OptimizerSpec("DAdaptLion", "dadaptation", "DAdaptLion", _D, adaptive=True),
        OptimizerSpec("DAdaptSGD", "dadaptation", "DAdaptSGD", _D, adaptive=True),
        OptimizerSpec("Prodigy", "prodigyopt", "Prodigy", "prodigyopt", adaptive=True),
        OptimizerSpec("Adafactor", "transformers.optimization", "Adafactor", "transformers"),
    )
}


def _accepted_names() -> str:
    return ", ".join(s.name for s in OPTIMIZERS.values())


def _import_class(module: str, attr: str, package: str, where: str) -> type:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise LoralabError(
            f"optimizer_type {where!r} needs the Python package {package!r}, which could not be imported ({exc}); "
            f"install it (pip install {package}) or choose another optimizer_type."
        ) from exc
    try:
        return getattr(mod, attr)
    except AttributeError as exc:
        raise LoralabError(
            f"optimizer_type {where!r}: module {module!r} has no class {attr!r}; check the spelling "
            f"(or update {package})."
        ) from exc


def _resolve_optimizer(optimizer_type: str | None) -> tuple[OptimizerSpec, type]:
    name = (optimizer_type or "").strip() or "AdamW"
    spec = OPTIMIZERS.get(name.lower())
    if spec is not None:
        return spec, _import_class(spec.module, spec.attr, spec.package, name)
    if "." in name:  # dotted path: module.Class (kohya: e.g. bitsandbytes.optim.AdEMAMix8bit)
        module, _, attr = name.rpartition(".")
        cls = _import_class(module, attr, module.split(".")[0], name)
        return OptimizerSpec(name, module, attr, module.split(".")[0]), cls
    for attr in dir(torch.optim):  # any torch.optim class by name (kohya: case-sensitive; here not)
        obj = getattr(torch.optim, attr)
        if attr.lower() == name.lower() and isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer):
            return OptimizerSpec(attr, "torch.optim", attr, "torch"), obj
    raise LoralabError(
        f"optimizer_type {name!r} is unknown. Accepted (any case): {_accepted_names()}; any torch.optim class "
        "name (e.g. RAdam); or a dotted path module.Class (e.g. bitsandbytes.optim.AdEMAMix8bit)."
    )


def _check_kwargs(cls: type, kwargs: Mapping[str, Any], name: str) -> None:
    """Refuse keyword arguments the optimizer's constructor does not take (unless it takes **kwargs)."""
    if "lr" in kwargs:
        raise LoralabError(
            f"optimizer_args: do not set lr there (optimizer {name}); use learning_rate / unet_lr / text_encoder_lr."
        )
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p not in ("self", "params", "lr")]
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        raise LoralabError(
            f"optimizer_args: {', '.join(unknown)} is not an argument of {name} "
            f"({cls.__module__}.{cls.__name__}); it accepts: {', '.join(accepted)}."
        )


def _as_groups(param_groups: Iterable) -> list:
    groups = list(param_groups)
    if not groups:
        raise LoralabError("Nothing to train: the optimizer got no parameters (check unet_lr / text_encoder_lr).")
    return groups


def _all_on_cuda(groups: list) -> bool:
    tensors: list[torch.Tensor] = []
    for g in groups:
        if isinstance(g, dict):
            ps = g["params"]
            tensors.extend([ps] if isinstance(ps, torch.Tensor) else list(ps))
        else:
            tensors.append(g)
    return bool(tensors) and all(t.is_cuda and t.is_floating_point() for t in tensors)


def _warn_adaptive_lr(groups: list, learning_rate: float) -> None:
    lrs = {g.get("lr", learning_rate) for g in groups if isinstance(g, dict)} or {learning_rate}
    first = next(iter(g.get("lr", learning_rate) for g in groups if isinstance(g, dict)), learning_rate)
    if first is not None and first <= 0.1:
        logger.warning(
            "learning rate %s is too low for D-Adaptation / Prodigy: these estimate the step size d themselves "
            "and use lr as a multiplier of d; set learning_rate (and unet_lr / text_encoder_lr) around 1.0.",
            first,
        )
    if len(lrs) > 1:
        logger.warning(
            "D-Adaptation / Prodigy with several learning rates %s: each group's lr multiplies the shared d "
            "estimate (kohya's message says only the first one takes effect; it is really a multiplier).",
            sorted(lrs),
        )


def _prepare_adafactor(groups: list, learning_rate: float, kwargs: dict[str, Any]) -> float | None:
    """kohya's Adafactor handling: relative_step defaults to True; then lr and group lrs are dropped."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("Adafactor: warmup_init=True needs relative_step=True; setting relative_step=True")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        return learning_rate
    logger.info(
        "Adafactor with relative_step=True computes its own learning rate (learning_rate %s is only reported "
        "before the first step); the lr scheduler will be Adafactor's own.",
        learning_rate,
    )
    dropped = [g.pop("lr") for g in groups if isinstance(g, dict) and "lr" in g]
    if dropped:
        logger.warning("Adafactor with relative_step=True ignores unet_lr / text_encoder_lr (%s)", dropped)
    return None


def create_optimizer(
    optimizer_type: str | None,
    param_groups: Iterable,
    learning_rate: float,
    optimizer_args: Mapping[str, Any] | None = None,
) -> tuple[torch.optim.Optimizer, str]:
    """Build the optimizer named by kohya's `optimizer_type` (case-insensitive; "" or None → AdamW).

    `param_groups`: tensors or dicts `{"params": [...], "lr": ..., "name": ...}`; groups without "lr"
    use `learning_rate`. `optimizer_args`: keyword arguments (see `parse_optimizer_args`); an argument the
    optimizer does not take raises `LoralabError` listing the ones it does.

    Names: see `OPTIMIZERS` (AdamW, AdamW8bit, Lion, SGDNesterov, Prodigy, DAdapt*, Adafactor, ...), any
    torch.optim class, or a dotted path `module.Class`. Kohya's rules: SGDNesterov(8bit) force nesterov
    and default momentum=0.9; Adafactor defaults relative_step=True, and then drops the learning rates
    (`create_scheduler` gives it Adafactor's schedule); D-Adaptation / Prodigy warn when lr <= 0.1.
    Ours: AdamW uses the fused kernel when every parameter is on CUDA (unless fused/foreach is given).

    Returns `(optimizer, description)`, description = "<module>.<Class>(k=v,k=v)" as kohya's ss_optimizer.
    """
    spec, cls = _resolve_optimizer(optimizer_type)
    kwargs: dict[str, Any] = dict(optimizer_args or {})
    for k, v in spec.defaults.items():
        kwargs.setdefault(k, v)
    groups = _as_groups(param_groups)
    groups = [dict(g) if isinstance(g, dict) else g for g in groups]  # do not mutate the caller's dicts

    lr: float | None = learning_rate
    if spec.adaptive:
        _warn_adaptive_lr(groups, learning_rate)
    if spec.name == "Adafactor":
        lr = _prepare_adafactor(groups, learning_rate, kwargs)

    _check_kwargs(cls, {**kwargs, **spec.fixed}, spec.name)
    extra = dict(spec.fixed)
    if spec.name == "AdamW" and "fused" not in kwargs and "foreach" not in kwargs and _all_on_cuda(groups):
        extra["fused"] = True

    logger.info("optimizer %s | %s", spec.name, kwargs)
    try:
        optimizer = cls(groups, lr=lr, **extra, **kwargs)
    except (TypeError, ValueError) as exc:
        raise LoralabError(
            f"optimizer {spec.name} refused its arguments (optimizer_args {kwargs}, learning_rate {learning_rate}): "
            f"{exc}. Fix optimizer_args or the learning rates."
        ) from exc
    if hasattr(optimizer, "train") and callable(optimizer.train):
        optimizer.train()  # schedule-free optimizers start in train mode (kohya)

    description = f"{cls.__module__}.{cls.__name__}"
    if kwargs:
        description += "(" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + ")"
    return optimizer, description


# ----------------------------------------------------------------------------------- from the config
def _whole(value: float | int | str) -> float | int | str:
    """A config value such as lr_warmup_steps = 100 arrives as 100.0 (the config keeps one number type):
    an integral value >= 1 is the step count it was written as, not kohya's "TOML float" ratio case."""
    if isinstance(value, float) and value >= 1 and value.is_integer():
        return int(value)
    return value


def build_optimizer(cfg: Any, param_groups: Iterable, total_steps: int) -> tuple[torch.optim.Optimizer, str, Any]:
    """(optimizer, its ss_optimizer description, LR schedule over `total_steps`) from a TrainConfig:
    optimizer_type / optimizer_args / learning_rate, then lr_scheduler (or lr_scheduler_type) with
    lr_scheduler_args, lr_warmup_steps, lr_decay_steps, lr_scheduler_num_cycles, lr_scheduler_power,
    lr_scheduler_timescale (0 = kohya's default) and lr_scheduler_min_lr_ratio (kohya's get_scheduler_fix)."""
    optimizer, desc = create_optimizer(cfg.optimizer_type, param_groups, cfg.learning_rate,
                                       parse_optimizer_args(cfg.optimizer_args))
    if cfg.full_fp16:
        _warn_fp16_states(optimizer)
    scheduler = create_scheduler(
        cfg.lr_scheduler, optimizer, total_steps=total_steps,
        warmup_steps=resolve_warmup_steps(_whole(cfg.lr_warmup_steps), total_steps),
        decay_steps=resolve_warmup_steps(_whole(cfg.lr_decay_steps), total_steps, key="lr_decay_steps"),
        num_cycles=cfg.lr_scheduler_num_cycles, power=cfg.lr_scheduler_power,
        min_lr_ratio=cfg.lr_scheduler_min_lr_ratio, timescale=cfg.lr_scheduler_timescale or None,
        scheduler_args=parse_optimizer_args(cfg.lr_scheduler_args, key_name="lr_scheduler_args"),
        scheduler_type=cfg.lr_scheduler_type, initial_lr=cfg.learning_rate)
    return optimizer, desc, scheduler


def _warn_fp16_states(optimizer: torch.optim.Optimizer) -> None:
    """full_fp16 keeps an optimizer's states in fp16 too: an eps below fp16's smallest number (6e-8), such
    as Adam's, Prodigy's and D-Adaptation's 1e-8, turns to 0 there, and squared gradients below it too, so
    entries with tiny gradients divide by 0 (NaN or inf at the first steps). bitsandbytes keeps fp32 math."""
    eps = optimizer.defaults.get("eps")
    if isinstance(eps, float) and eps < 6e-8 and not type(optimizer).__module__.startswith("bitsandbytes"):
        logger.warning(
            "full_fp16 with %s: its states are fp16 like the weights, where eps=%g and small squared gradients "
            "become 0 (NaN or inf updates); use optimizer_type AdamW8bit (kohya's usual pairing), an optimizer "
            "without eps (Lion, SGDNesterov), full_bf16, or optimizer_args eps=1e-4", type(optimizer).__name__, eps)


def half_precision(params: Iterable[torch.Tensor], dtype: torch.dtype) -> None:
    """full_fp16 / full_bf16 (kohya: `network.to(weight_dtype)`): the trained LoRA weights in `dtype`, so
    their gradients and optimizer states are too. In place: the tensors stay the optimizer's."""
    with torch.no_grad():
        for p in params:
            p.data = p.data.to(dtype)


class Fp16GradScaler(torch.amp.GradScaler):
    """full_fp16's loss scaler: unscales fp16 gradients, which torch's GradScaler refuses ("Attempting to
    unscale FP16 gradients"); kohya's `patch_accelerator_for_fp16_training` replaces the same method."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)


def loss_scaler(mixed_precision: str, full_fp16: bool, device_type: str) -> torch.amp.GradScaler | None:
    """The fp16 loss scaler (None for bf16 or fp32): torch's, or `Fp16GradScaler` with full_fp16."""
    if mixed_precision != "fp16":
        return None
    return (Fp16GradScaler if full_fp16 else torch.amp.GradScaler)(device_type)


# ------------------------------------------------------------------------------------------ logging
def current_lrs(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    names: list[str] | None = None,
) -> dict[str, float]:
    """The learning rates to log, with kohya's TensorBoard tags.

    `lr/<name>` per param group (name from `names`, else the group's "name" key, else `group<i>`) from
    `scheduler.get_last_lr()` (or the group's lr without a scheduler); for D-Adaptation / Prodigy groups
    (which carry the step-size estimate "d") also `lr/d*lr/<name>` = d · lr, the step size really used.
    Groups named "unet" and "textencoder" give kohya's `lr/unet` and `lr/textencoder`.
    """
    groups = optimizer.param_groups
    has_last = scheduler is not None and callable(getattr(scheduler, "get_last_lr", None))
    lrs = list(scheduler.get_last_lr()) if has_last else [g.get("lr") for g in groups]
    out: dict[str, float] = {}
    for i, group in enumerate(groups):
        name = names[i] if names is not None and i < len(names) else group.get("name") or f"group{i}"
        lr = lrs[i] if i < len(lrs) else group.get("lr")
        if lr is None:
            continue
        lr = float(lr)
        out[f"lr/{name}"] = lr
        if "d" in group and group.get("lr") is not None:
            out[f"lr/d*lr/{name}"] = float(group["d"]) * float(group["lr"])
    return out


def safeguard_warmup_warning(optimizer_type: str | None, optimizer_args: Any, lr_warmup_steps: Any) -> str | None:
    """The guide's rule: Prodigy's `safeguard_warmup=True` is for runs with an LR warmup (it keeps the warmup's
    small steps from shrinking Prodigy's estimate d); without warmup it only slows the estimate down. Returns
    the warning, or None when it does not apply. Read before the model loads (`loralab train`)."""
    if (optimizer_type or "").lower() != "prodigy":
        return None
    if parse_optimizer_args(optimizer_args).get("safeguard_warmup") is not True:
        return None
    if resolve_warmup_steps(lr_warmup_steps, 10**9) > 0:
        return None
    return ("optimizer_args safeguard_warmup=True with no warmup (lr_warmup_steps = 0): Prodigy's safeguard is "
            "for runs with an LR warmup. Set lr_warmup_steps (e.g. \"5%\" with lr_scheduler = "
            "\"constant_with_warmup\" or \"cosine\"), or drop safeguard_warmup=True.")
