"""The guide's warnings about settings, read from the config before any model loads.

`guide_warnings(cfg)` is the one list: `loralab train` (and `--dry-run`) logs each before the model loads,
and `loralab doctor` reports them for a finished run. The rules:
- Prodigy with `safeguard_warmup=True` and no LR warmup (`optim.safeguard_warmup_warning`);
- LoCon / LoHa dims above 32 (`MAX_LOCON_DIM`): LoCon's conv layers and LoHa's Hadamard product (rank dim²)
  need far less than LoRA; the guide keeps them at 32 or below, larger dims only slow training and overfit;
- an adaptive optimizer (D-Adaptation, Prodigy) with a learning rate of 0.1 or less: they estimate the step
  size d and use the learning rate as its multiplier, so it should be about 1 (the optimizer says it again
  when it is built).
"""

from __future__ import annotations

from typing import Any

MAX_LOCON_DIM = 32
ADAPTIVE = ("prodigy", "dadaptation", "dadaptadam", "dadaptlion", "dadaptsgd", "dadaptadagrad", "dadaptadan")


def network_dim_warning(cfg: Any) -> str | None:
    """LoCon (conv_dim > 0 or algo=locon) or LoHa (algo=loha) with a dim or conv_dim above 32."""
    opts = cfg.network_options()
    algo = str(opts.get("algo") or ("locon" if opts.get("conv_dim") else "lora")).lower()
    if algo not in ("locon", "loha"):
        return None
    big = [f"{k} = {v}" for k, v in (("network_dim", cfg.network_dim), ("conv_dim", opts.get("conv_dim") or 0))
           if v > MAX_LOCON_DIM]
    if not big:
        return None
    name = "LoHa" if algo == "loha" else "LoCon"
    return (f"{name} with {' and '.join(big)}: the guide keeps {name} dims at {MAX_LOCON_DIM} or below "
            f"({'the Hadamard product already has rank dim²' if algo == 'loha' else 'the conv layers need few ranks'}"
            "); larger dims train slower and overfit sooner. Use network_dim / conv_dim <= 32.")


def adaptive_lr_warning(cfg: Any) -> str | None:
    """D-Adaptation / Prodigy with learning_rate (or unet_lr) of 0.1 or less."""
    if (cfg.optimizer_type or "").lower() not in ADAPTIVE:
        return None
    lr = cfg.unet_lr if cfg.unet_lr is not None and cfg.unet_lr > 0 else cfg.learning_rate
    if lr is None or float(lr) > 0.1:
        return None
    return (f"{cfg.optimizer_type} with learning rate {lr}: adaptive optimizers estimate the step size themselves "
            "and use the learning rate as its multiplier; set learning_rate (and unet_lr / text_encoder_lr) around 1.0.")


def guide_warnings(cfg: Any) -> list[str]:
    """Every warning of the module docstring that applies to `cfg`, in that order."""
    from loralab.train.optim import safeguard_warmup_warning

    found = [safeguard_warmup_warning(cfg.optimizer_type, cfg.optimizer_args, cfg.lr_warmup_steps),
             network_dim_warning(cfg), adaptive_lr_warning(cfg)]
    return [w for w in found if w]
