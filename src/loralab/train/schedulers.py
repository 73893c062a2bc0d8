"""Learning-rate schedules: kohya's `lr_scheduler` names, `lr_scheduler_type` classes, and the warmup and
decay lengths (kohya-ss sd-scripts `train_util.get_scheduler_fix`, with plain arguments):

    warmup = resolve_warmup_steps(cfg.lr_warmup_steps, total_steps)
    decay = resolve_warmup_steps(cfg.lr_decay_steps, total_steps, key="lr_decay_steps")
    scheduler = create_scheduler(cfg.lr_scheduler, optimizer, warmup_steps=warmup, total_steps=total_steps,
                                 decay_steps=decay, scheduler_args=parse_optimizer_args(cfg.lr_scheduler_args),
                                 scheduler_type=cfg.lr_scheduler_type, ...)

The schedules themselves are transformers' (and diffusers' piecewise_constant), which kohya uses; every
bad setting is a `LoralabError` naming the key, raised when the schedule is built (`train/run.py`
builds it once on a dummy parameter before the model loads).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from loralab.errors import LoralabError

# a child of optim's logger, so that run.check_optimizer's dry run on a dummy parameter silences both
logger = logging.getLogger("loralab.train.optim.schedulers")

__all__ = ["SCHEDULERS", "create_scheduler", "resolve_warmup_steps"]


# ------------------------------------------------------------------------------------ warmup / decay
def resolve_warmup_steps(lr_warmup_steps: int | float | str | None, total_steps: int,
                         key: str = "lr_warmup_steps") -> int:
    """LR warmup length in optimizer steps, from kohya's `lr_warmup_steps` (int_or_float); with
    key="lr_decay_steps" the same rule gives warmup_stable_decay's decay length (kohya's `lr_decay_steps`).

    - None → 0.
    - int ≥ 0 → that many steps.
    - float < 1 (e.g. 0.1) or "10%" → that fraction of `total_steps`, int(ratio · total) as kohya.
    - a string is read like the CLI: "10%", "0.1" (ratio) or "100" (steps).
    - float ≥ 1 with no fraction (e.g. 100.0 from a TOML file): kohya treats every TOML float as a
      ratio (100.0 → 100 × total steps); we read it as the step count 100 and log a warning.
    - a fractional float ≥ 1 (1.5), a negative value or a percentage > 100 raise LoralabError.
    A length longer than the run is allowed but warned about.
    """
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
        raise LoralabError(f"{key}={lr_warmup_steps!r} is negative; use 0 for none.")

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
    "warmup_stable_decay",
    "piecewise_constant",
    "adafactor",
)


def _is_relative_step_adafactor(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__name__ == "Adafactor" and bool(optimizer.defaults.get("relative_step"))


def _no_warmup(what: str, hint: str, warmup_steps: int) -> None:
    if warmup_steps:
        raise LoralabError(
            f"{what} does not use a warmup, but lr_warmup_steps gives {warmup_steps} steps; {hint}"
        )


def _construct(what: str, kwargs: Mapping[str, Any], factory: Callable, *args: Any, **kw: Any):
    """Build a schedule; a constructor that refuses its arguments is a LoralabError about lr_scheduler_args."""
    try:
        return factory(*args, **kw, **kwargs)
    except (TypeError, ValueError) as exc:
        given = f" (lr_scheduler_args {dict(kwargs)})" if kwargs else ""
        raise LoralabError(
            f"{what} refused its arguments{given}: {exc}. Fix lr_scheduler_args (key=value entries passed to the "
            "scheduler, e.g. step_rules='1:10,0.1:20,0.01') or the scheduler settings."
        ) from exc


def _adafactor_schedule(raw: str, key: str, optimizer: torch.optim.Optimizer, warmup_steps: int, initial_lr: float):
    """A relative-step Adafactor's own schedule (kohya forces `adafactor:<lr>`)."""
    from transformers.optimization import AdafactorSchedule

    if not _is_relative_step_adafactor(optimizer):
        raise LoralabError(
            f"lr_scheduler={raw}: this scheduler only works with optimizer_type=Adafactor and relative_step=True."
        )
    if key not in ("adafactor", "constant"):
        logger.warning("Adafactor with relative_step=True: lr_scheduler=%s is replaced by Adafactor's own", raw)
    _no_warmup("lr_scheduler=adafactor", "set lr_warmup_steps to 0 (use warmup_init=True in optimizer_args for "
               "Adafactor).", warmup_steps)
    return AdafactorSchedule(optimizer, initial_lr)


def _scheduler_class(path: str, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any], warmup_steps: int):
    """kohya's `lr_scheduler_type`: a class name in torch.optim.lr_scheduler, or a dotted path module.Class,
    built as Class(optimizer, **lr_scheduler_args); lr_warmup_steps must be 0 (kohya: ValueError)."""
    what = f"lr_scheduler_type={path}"
    _no_warmup(what, "set lr_warmup_steps to 0 (give the class its own warmup through lr_scheduler_args).",
               warmup_steps)
    module_name, _, attr = path.strip().rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim.lr_scheduler
    except ImportError as exc:
        raise LoralabError(f"{what}: cannot import module {module_name!r} ({exc}); check the path or install its "
                           "package.") from exc
    cls = getattr(module, attr, None)
    if not callable(cls):
        raise LoralabError(f"{what}: {module.__name__} has no class {attr!r}; give a class name of "
                           "torch.optim.lr_scheduler (e.g. CosineAnnealingLR) or a dotted path module.Class.")
    scheduler = _construct(what, kwargs, cls, optimizer)
    missing = [name for name in ("step", "state_dict", "load_state_dict")
               if not callable(getattr(scheduler, name, None))]
    if missing:
        raise LoralabError(f"{what}: the object has no {', '.join(missing)}; it is not a learning-rate scheduler.")
    needs = [p.name for p in inspect.signature(scheduler.step).parameters.values()
             if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if needs:
        raise LoralabError(f"{what}: its step() needs {', '.join(needs)} (e.g. ReduceLROnPlateau's metrics), but the "
                           "schedule is stepped once per optimizer step without arguments; choose another scheduler.")
    return scheduler


def _named_schedule(key: str, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any], *, warmup_steps: int,
                    total_steps: int, num_cycles: int, power: float, min_lr_ratio: float, timescale: int | None,
                    decay_steps: int):
    """One of SCHEDULERS (but adafactor), with kohya's arguments for it (`get_scheduler_fix`)."""
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    what = f"lr_scheduler={key}"
    if key == "piecewise_constant":
        from diffusers.optimization import get_piecewise_constant_schedule

        if "step_rules" not in kwargs:
            raise LoralabError(
                "lr_scheduler=piecewise_constant needs lr_scheduler_args step_rules='1:10,0.1:20,0.01' "
                "(multiplier:until_step,...,final multiplier)."
            )
        if warmup_steps:
            logger.warning("lr_scheduler=piecewise_constant has no warmup: lr_warmup_steps (%d) is ignored, as in "
                           "kohya; put a low first multiplier in step_rules instead", warmup_steps)
        return _construct(what, kwargs, get_piecewise_constant_schedule, optimizer)

    func = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(key)]
    if key == "constant":
        _no_warmup(what, "use lr_scheduler=constant_with_warmup, or set lr_warmup_steps to 0.", warmup_steps)
        return _construct(what, kwargs, func, optimizer)
    if key == "constant_with_warmup":
        return _construct(what, kwargs, func, optimizer, num_warmup_steps=warmup_steps)
    if key == "inverse_sqrt":
        return _construct(what, kwargs, func, optimizer, num_warmup_steps=warmup_steps, timescale=timescale)
    if total_steps <= 0:
        raise LoralabError(f"{what} needs the number of training steps (got {total_steps}).")
    common = dict(num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    if key == "cosine_with_restarts":
        return _construct(what, kwargs, func, optimizer, **common, num_cycles=num_cycles)
    if key == "polynomial":
        return _construct(what, kwargs, func, optimizer, **common, power=power)
    if key == "cosine_with_min_lr":
        return _construct(what, kwargs, func, optimizer, **common, num_cycles=num_cycles / 2, min_lr_rate=min_lr_ratio)
    if key == "warmup_stable_decay":
        stable = total_steps - warmup_steps - decay_steps
        if stable < 0:
            raise LoralabError(f"{what}: lr_warmup_steps ({warmup_steps}) + lr_decay_steps ({decay_steps}) exceed the "
                               f"{total_steps} training steps; shorten them (a ratio such as 0.1 follows the run).")
        return _construct(what, kwargs, func, optimizer, num_warmup_steps=warmup_steps, num_stable_steps=stable,
                          num_decay_steps=decay_steps, num_cycles=num_cycles / 2, min_lr_ratio=min_lr_ratio)
    return _construct(what, kwargs, func, optimizer, **common)  # linear, cosine


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
    decay_steps: int = 0,
    scheduler_args: Mapping[str, Any] | None = None,
    scheduler_type: str = "",
    initial_lr: float = 0.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The LR scheduler named by kohya's `lr_scheduler` ("" or None → constant), via transformers'
    schedule functions, which kohya uses (t = step, w = warmup_steps, T = total_steps, p = (t − w)/(T − w)):

        warmup (all but constant):  lr · t / w                                              for t < w
        linear:                     lr · (1 − p)
        cosine:                     lr · ½(1 + cos(π p))
        cosine_with_restarts:       lr · ½(1 + cos(π ((num_cycles · p) mod 1)))
        polynomial:                 (lr − 1e-7) · (1 − p)^power + 1e-7
        cosine_with_min_lr:         lr · (m + (1 − m) · ½(1 + cos(π · num_cycles · p))),  m = min_lr_ratio
                                    (kohya passes num_cycles/2 as transformers' cycles: 1 = one half-cosine)
        inverse_sqrt:               lr / sqrt((t − w + s) / s) after warmup, s = timescale
                                    (None: w, or 10000 without warmup; kohya's default)
        warmup_stable_decay:        warmup from lr·m, lr for T − w − d steps, then over d = decay_steps
                                    lr · (m + (1 − m) · ½(1 + cos(π · num_cycles · q))), q = decay progress;
                                    lr · m after the run
        piecewise_constant:         lr · the multiplier of lr_scheduler_args step_rules='1:10,0.1:20,0.01'
                                    (×1 before step 10, ×0.1 before step 20, then ×0.01); no warmup

    `total_steps` is kohya's max_train_steps × num_processes (not × gradient accumulation).
    `constant` with warmup > 0 raises LoralabError (kohya: ValueError) — use constant_with_warmup.
    A relative-step Adafactor gets transformers' AdafactorSchedule whatever the name (kohya forces
    `adafactor:<lr>`; `initial_lr` is what it reports before the first step). `scheduler_args`: extra
    keyword arguments (kohya `lr_scheduler_args`), passed to every schedule but adafactor's.
    `scheduler_type` (kohya `lr_scheduler_type`): a class of torch.optim.lr_scheduler or a dotted path,
    built as Class(optimizer, **scheduler_args); it replaces `name` and needs warmup 0, as in kohya.
    Arguments a schedule refuses raise LoralabError naming lr_scheduler_args.
    """
    raw = (name or "constant").strip()
    key = raw.lower()
    kwargs = dict(scheduler_args or {})
    if scheduler_type:
        return _scheduler_class(scheduler_type, optimizer, kwargs, warmup_steps)
    if key.startswith("adafactor:"):
        initial_lr = float(key.split(":", 1)[1])
        key = "adafactor"
    if key == "adafactor" or _is_relative_step_adafactor(optimizer):
        if kwargs:
            logger.warning("lr_scheduler_args %s are not used by Adafactor's own schedule", kwargs)
        return _adafactor_schedule(raw, key, optimizer, warmup_steps, initial_lr)
    if key not in SCHEDULERS:
        raise LoralabError(f"lr_scheduler={raw!r} is unknown; accepted: {', '.join(SCHEDULERS)}.")
    return _named_schedule(key, optimizer, kwargs, warmup_steps=warmup_steps, total_steps=total_steps,
                           num_cycles=num_cycles, power=power, min_lr_ratio=min_lr_ratio or 0.0,
                           timescale=timescale or None, decay_steps=decay_steps)
