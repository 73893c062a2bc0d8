"""Optimizers, learning-rate schedulers and the learning rates to log.

kohya-ss sd-scripts compatible (`train_util.get_optimizer`, `get_scheduler_fix`), with plain arguments:

    kwargs = parse_optimizer_args(cfg.optimizer_args)                  # "k=v k=v" or ["k=v", ...]
    optimizer, desc = create_optimizer(cfg.optimizer_type, param_groups, cfg.learning_rate, kwargs)
    warmup = resolve_warmup_steps(cfg.lr_warmup_steps, total_steps)
    scheduler = create_scheduler(cfg.lr_scheduler, optimizer, warmup_steps=warmup, total_steps=total_steps, ...)
    ...
    logs.update(current_lrs(optimizer, scheduler))                     # lr/unet, lr/textencoder, lr/d*lr/...

`desc` is kohya's `ss_optimizer` metadata string, e.g. "torch.optim.adamw.AdamW(weight_decay=0.01)".

Param groups may carry a "name" key ("unet", "textencoder", "unet_block3", ...); `current_lrs` uses it for
the TensorBoard tag. torch optimizers keep extra keys in their param groups.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from loralab.errors import LoralabError

logger = logging.getLogger(__name__)

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "create_optimizer",
    "create_scheduler",
    "current_lrs",
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


# ------------------------------------------------------------------------------------------- warmup
def resolve_warmup_steps(lr_warmup_steps: int | float | str | None, total_steps: int) -> int:
    """LR warmup length in optimizer steps, from kohya's `lr_warmup_steps` (int_or_float).

    - None → 0.
    - int ≥ 0 → that many steps.
    - float < 1 (e.g. 0.1) or "10%" → that fraction of `total_steps`, int(ratio · total) as kohya.
    - a string is read like the CLI: "10%", "0.1" (ratio) or "100" (steps).
    - float ≥ 1 with no fraction (e.g. 100.0 from a TOML file): kohya treats every TOML float as a
      ratio (100.0 → 100 × total steps); we read it as the step count 100 and log a warning.
    - a fractional float ≥ 1 (1.5), a negative value or a percentage > 100 raise LoralabError.
    A warmup longer than the run is allowed but warned about.
    """
    key = "lr_warmup_steps"
    if lr_warmup_steps is None:
        return 0
    value: int | float
    if isinstance(lr_warmup_steps, bool):
        raise LoralabError(f"{key}={lr_warmup_steps!r}: expected a step count, a ratio < 1 or a percentage like '10%'.")
    if isinstance(lr_warmup_steps, str):
        text = lr_warmup_steps.strip()
        try:
            if text.endswith("%"):
                pct = float(text[:-1])
                if not 0 <= pct <= 100:
                    raise LoralabError(f"{key}={text!r}: a percentage must be between 0% and 100%.")
                value = pct / 100.0
            else:
                f = float(text)
                value = int(f) if f >= 1 and f.is_integer() else f
        except ValueError as exc:
            raise LoralabError(
                f"{key}={text!r} is not a number: use a step count (100), a ratio (0.1) or a percentage ('10%')."
            ) from exc
    else:
        value = lr_warmup_steps
    if value < 0 or (isinstance(value, float) and math.isnan(value)):
        raise LoralabError(f"{key}={lr_warmup_steps!r} is negative; use 0 for no warmup.")

    if isinstance(value, float) and value < 1:
        steps = int(value * total_steps)
    elif isinstance(value, float):
        if not value.is_integer():
            raise LoralabError(
                f"{key}={lr_warmup_steps!r}: a value >= 1 is a step count and must be whole; "
                "for a fraction of the run use a ratio < 1 (0.1) or a percentage ('10%')."
            )
        steps = int(value)
        logger.warning(
            "%s=%s is a float >= 1: loralab reads it as %d steps; kohya sd-scripts would read a TOML float as a "
            "ratio (%d steps). Write %d (an integer) to silence this warning.",
            key, value, steps, int(value * total_steps), steps,
        )
    else:
        steps = int(value)
    if total_steps and steps > total_steps:
        logger.warning("%s=%d is longer than the whole run (%d steps)", key, steps, total_steps)
    return steps


# ----------------------------------------------------------------------------------------- schedulers
SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "cosine_with_min_lr",
    "inverse_sqrt",
    "piecewise_constant",
    "adafactor",
)


def _is_relative_step_adafactor(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__name__ == "Adafactor" and bool(optimizer.defaults.get("relative_step"))


def _no_warmup(what: str, hint: str, warmup_steps: int) -> None:
    if warmup_steps:
        raise LoralabError(
            f"lr_scheduler={what} does not use a warmup, but lr_warmup_steps gives {warmup_steps} steps; "
            f"{hint}"
        )


def _adafactor_schedule(raw: str, key: str, optimizer: torch.optim.Optimizer, warmup_steps: int, initial_lr: float):
    """A relative-step Adafactor's own schedule (kohya forces `adafactor:<lr>`)."""
    from transformers.optimization import AdafactorSchedule

    if not _is_relative_step_adafactor(optimizer):
        raise LoralabError(
            f"lr_scheduler={raw}: this scheduler only works with optimizer_type=Adafactor and relative_step=True."
        )
    if key not in ("adafactor", "constant"):
        logger.warning("Adafactor with relative_step=True: lr_scheduler=%s is replaced by Adafactor's own", raw)
    _no_warmup("adafactor", "set lr_warmup_steps to 0 (use warmup_init=True in optimizer_args for Adafactor).",
               warmup_steps)
    return AdafactorSchedule(optimizer, initial_lr)


def create_scheduler(
    name: str | None,
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    num_cycles: int = 1,
    power: float = 1.0,
    min_lr_ratio: float | None = None,
    timescale: int | None = None,
    scheduler_args: Mapping[str, Any] | None = None,
    initial_lr: float = 0.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The LR scheduler named by kohya's `lr_scheduler` ("" or None → constant), via transformers'
    schedule functions, which kohya uses:

        warmup (all but constant):  lr_t = lr · t / warmup                                  for t < warmup
        linear:                     lr · (1 − p),       p = (t − warmup) / (total − warmup)
        cosine:                     lr · ½(1 + cos(π p))
        cosine_with_restarts:       lr · ½(1 + cos(π ((num_cycles · p) mod 1)))
        polynomial:                 (lr − 1e-7) · (1 − p)^power + 1e-7
        cosine_with_min_lr:         cosine to lr · min_lr_ratio, with num_cycles/2 cycles (kohya)
        inverse_sqrt:               lr / sqrt((t + timescale) / timescale) after warmup

    `total_steps` is kohya's max_train_steps × num_processes (not × gradient accumulation).
    `constant` with warmup > 0 raises LoralabError (kohya: ValueError) — use constant_with_warmup.
    A relative-step Adafactor gets transformers' AdafactorSchedule whatever the name (kohya forces
    `adafactor:<lr>`; `initial_lr` is what it reports before the first step). `scheduler_args`: extra
    keyword arguments (kohya `lr_scheduler_args`, e.g. step_rules for piecewise_constant).
    """
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    raw = (name or "constant").strip()
    key = raw.lower()
    kwargs = dict(scheduler_args or {})
    if key.startswith("adafactor:"):
        initial_lr = float(key.split(":", 1)[1])
        key = "adafactor"

    def no_warmup(what: str, hint: str) -> None:
        _no_warmup(what, hint, warmup_steps)

    if key == "adafactor" or _is_relative_step_adafactor(optimizer):
        return _adafactor_schedule(raw, key, optimizer, warmup_steps, initial_lr)

    if key not in SCHEDULERS:
        raise LoralabError(f"lr_scheduler={raw!r} is unknown; accepted: {', '.join(SCHEDULERS)}.")

    if key == "piecewise_constant":
        from diffusers.optimization import get_scheduler as diffusers_get_scheduler

        if "step_rules" not in kwargs:
            raise LoralabError(
                "lr_scheduler=piecewise_constant needs lr_scheduler_args step_rules='1:10,0.1:20,0.01' "
                "(multiplier:until_step,...,final multiplier)."
            )
        return diffusers_get_scheduler("piecewise_constant", optimizer, **kwargs)

    func = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(key)]
    if key == "constant":
        no_warmup("constant", "use lr_scheduler=constant_with_warmup, or set lr_warmup_steps to 0.")
        return func(optimizer, **kwargs)
    if key == "constant_with_warmup":
        return func(optimizer, num_warmup_steps=warmup_steps, **kwargs)
    if key == "inverse_sqrt":
        return func(optimizer, num_warmup_steps=warmup_steps, timescale=timescale, **kwargs)
    if total_steps <= 0:
        raise LoralabError(f"lr_scheduler={raw} needs the number of training steps (got {total_steps}).")
    common = dict(num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    if key == "cosine_with_restarts":
        return func(optimizer, **common, num_cycles=num_cycles, **kwargs)
    if key == "polynomial":
        return func(optimizer, **common, power=power, **kwargs)
    if key == "cosine_with_min_lr":
        return func(optimizer, **common, num_cycles=num_cycles / 2, min_lr_rate=min_lr_ratio or 0.0, **kwargs)
    return func(optimizer, **common, **kwargs)  # linear, cosine


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
    lrs = list(scheduler.get_last_lr()) if scheduler is not None else [g.get("lr") for g in groups]
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
