"""The network types and how each is made: for a new network (from `NetworkConfig.algo`) and for a file (from
its keys). One type per file: LoRA / LoCon (`modules.py`), LoHa (`loha.py`), LoKr (`lokr.py`), full
(`full.py`), DyLoRA (`dylora.py`); DoRA (`dora.py`) goes on LoRA, LoHa and LoKr.

A file's type, per module, from its keys (as A1111 and ComfyUI tell them apart): `hada_w1_a` LoHa,
`lokr_w1` / `lokr_w1_a` LoKr, `diff` full, `lora_down.weight` LoRA (DyLoRA files are LoRA files);
`dora_scale` beside any of them is DoRA.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

import torch

from loralab.errors import LoralabError
from loralab.network import full, loha, lokr
from loralab.network.dora import is_output_axis
from loralab.network.dylora import DyLoRAModule
from loralab.network.modules import LoRAModule, NetworkModule

if TYPE_CHECKING:
    from loralab.network.lora import NetworkConfig
    from loralab.network.targets import LoRATarget

ALGOS = ("lora", "locon", "loha", "lokr", "dylora", "full")
LORA_KEYS = ("lora_down.weight", "lora_up.weight")
# every key a module of some type may have in a file, after `<name>.`
FILE_KEYS = {"lora": LORA_KEYS, "loha": loha.KEYS, "lokr": lokr.KEYS, "full": full.KEYS}
COMMON_KEYS = ("alpha", "dora_scale")
# keys of LyCORIS types / options we do not read: what they are, for the error
FOREIGN_KEYS = {"lora_mid.weight": "LoCon with Tucker (use_tucker) convs", "diff_b": "a full bias",
                "w_norm": "trained norms (train_norm)", "b_norm": "trained norms (train_norm)",
                "oft_blocks": "OFT", "oft_diag": "OFT", "a1.weight": "GLoRA", "weight": "IA3", "scalar": "use_scalar"}


def make_module(t: LoRATarget, dim: int, alpha: float | None, multiplier: float, cfg: NetworkConfig) -> NetworkModule:
    """A new module of `cfg.algo` on target `t` (dim/alpha already chosen for its kind: `cfg.dim_alpha`)."""
    drops = {"dropout": cfg.dropout, "rank_dropout": cfg.rank_dropout, "module_dropout": cfg.module_dropout}
    if cfg.algo in ("lora", "locon"):
        m: NetworkModule = LoRAModule(t.lora_name, t.module, dim, alpha, multiplier, **drops)
    elif cfg.algo == "loha":
        m = loha.LoHaModule(t.lora_name, t.module, dim, alpha, multiplier, use_tucker=cfg.use_tucker, **drops)
    elif cfg.algo == "lokr":
        m = lokr.LoKrModule(t.lora_name, t.module, dim, alpha, multiplier, factor=cfg.factor,
                            decompose_both=cfg.decompose_both, use_tucker=cfg.use_tucker,
                            full_matrix=cfg.full_matrix, **drops)
    elif cfg.algo == "dylora":
        return DyLoRAModule(t.lora_name, t.module, dim, alpha, multiplier, unit=cfg.unit,
                            module_dropout=cfg.module_dropout)
    elif cfg.algo == "full":
        return full.FullModule(t.lora_name, t.module, multiplier, **drops)
    else:
        raise LoralabError(f"network_args algo = {cfg.algo!r} is unknown; use one of {', '.join(ALGOS)}")
    if cfg.dora_wd:
        m.enable_dora(on_output=cfg.wd_on_output)
    return m


def file_type(name: str, keys: Mapping[str, torch.Tensor], where: str) -> str:
    """The type of module `name` from its keys (suffixes after `<name>.`): lora, loha, lokr or full."""
    found = [algo for algo, suffixes in FILE_KEYS.items() if any(k in keys for k in suffixes)]
    foreign = sorted({FOREIGN_KEYS[k] for k in keys if k in FOREIGN_KEYS})
    unknown = sorted(k for k in keys if k not in FOREIGN_KEYS and k not in COMMON_KEYS
                     and not any(k in s for s in FILE_KEYS.values()))
    if foreign or unknown or len(found) != 1:
        what = (f"keys of {', '.join(foreign)}, which loralab does not read" if foreign else
                f"unknown keys {', '.join(f'{name}.{k}' for k in unknown)}" if unknown else
                f"keys of {' and '.join(found)} at once" if found else "no weights (only " + ", ".join(keys) + ")")
        raise LoralabError(f"{where}: module {name} has {what}. loralab reads LoRA/LoCon (lora_down/lora_up), LoHa "
                           "(hada_*), LoKr (lokr_*), full (diff) and DoRA (dora_scale) modules; use such a file")
    return found[0]


def module_from_file(t: LoRATarget, keys: Mapping[str, torch.Tensor], multiplier: float, cfg: NetworkConfig,
                     where: str) -> NetworkModule:
    """A module shaped like the file's module `t.lora_name` (`keys`: its tensors by suffix), not yet loaded."""
    algo = file_type(t.lora_name, keys, where)
    alpha = float(keys["alpha"]) if "alpha" in keys else None
    drops = {"dropout": cfg.dropout, "rank_dropout": cfg.rank_dropout, "module_dropout": cfg.module_dropout}
    if algo == "lora":
        for k in LORA_KEYS:
            if k not in keys:
                raise LoralabError(f"{where}: module {t.lora_name} has no {k}; the file is incomplete")
        dim = int(keys["lora_down.weight"].shape[0])
        if cfg.algo == "dylora" and "dora_scale" not in keys and dim % cfg.unit == 0:
            return DyLoRAModule(t.lora_name, t.module, dim, alpha, multiplier, unit=cfg.unit,
                                module_dropout=cfg.module_dropout)
        m: NetworkModule = LoRAModule(t.lora_name, t.module, dim, alpha, multiplier, **drops)
    else:
        cls = {"loha": loha.LoHaModule, "lokr": lokr.LoKrModule, "full": full.FullModule}[algo]
        needed = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "full": ("diff",),
                  "lokr": ()}[algo]
        missing = [k for k in needed if k not in keys]
        if missing:
            raise LoralabError(f"{where}: module {t.lora_name} lacks {', '.join(missing)}; the file is incomplete")
        try:
            m = cls(t.lora_name, t.module, multiplier=multiplier, **drops, **cls.shape_from_file(keys))
        except (KeyError, ZeroDivisionError) as e:
            raise LoralabError(f"{where}: module {t.lora_name}: its {algo} tensors do not fit together or the model "
                               f"({e}); the file is damaged or made for another model") from None
        if alpha is not None:
            m.set_alpha(alpha)
    if "dora_scale" in keys:
        m.enable_dora(on_output=is_output_axis(keys["dora_scale"], m.weight_shape))
    return m


# ---------------------------------------------------------------------------------------- config: network_args

MODULES = ("networks.lora", "lycoris.kohya", "networks.dylora")
_BOOL_ARGS = ("use_tucker", "use_cp", "use_conv_cp", "dora_wd", "wd_on_output", "decompose_both", "full_matrix",
              "bypass_mode", "use_scalar", "rank_dropout_scale", "train_norm", "rs_lora")
_INT_ARGS = ("factor", "unit", "block_size")
_STR_ARGS = ("algo", "preset")
_FLOAT_ARGS = ("dropout",)
TYPE_ARGS = _BOOL_ARGS + _INT_ARGS + _STR_ARGS + _FLOAT_ARGS
# options LyCORIS has that change what is trained and that loralab does not do: refused when on
_REFUSED = {"use_scalar": "a trained scalar per module", "train_norm": "trained norm layers",
            "rank_dropout_scale": "rank dropout rescaled by the kept fraction", "rs_lora": "rank-stabilised scale"}
_LYCORIS_ALGOS = {"lora": "locon", "locon": "locon", "loha": "loha", "lokr": "lokr", "dylora": "dylora", "full": "full"}


def parse_type_arg(key: str, value: str) -> bool | int | float | str:
    """One network_args value of the type options (`TYPE_ARGS`), as kohya_ss writes them (True/False, quoted)."""
    text = value.strip().strip('"').strip("'")
    try:
        if key in _BOOL_ARGS:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if key in _INT_ARGS:
            return int(float(text))
        if key in _FLOAT_ARGS:
            return float(text)
    except ValueError:
        kind = "True or False" if key in _BOOL_ARGS else "a number"
        raise LoralabError(f"network_args: {key}={value!r} needs {kind} after '='") from None
    return text.lower()


def type_config(module: str, opts: Mapping, dim: int, alpha: float | None, args_given: Collection[str] = ()) -> dict:
    """NetworkConfig fields of the network type asked for by `network_module` and the type's network_args.

    networks.lora: LoRA (LoCon with conv_dim). networks.dylora: DyLoRA, `unit` (1). lycoris.kohya, with
    LyCORIS's defaults: algo lora/locon (LoCon), loha, lokr, dylora (`block_size`, 4), full; preset "full"; conv_dim
    = network_dim and conv_alpha = network_alpha when not given (or 0; `args_given`: the keys written in
    network_args, since the top-level conv_alpha has a default of its own); presets without convs set conv_dim 0;
    use_tucker / use_cp / use_conv_cp all mean Tucker convs.
    """
    given = {k: opts[k] for k in TYPE_ARGS if k in opts}
    if module != "lycoris.kohya":
        allowed = ("unit",) if module == "networks.dylora" else ()
        foreign = [k for k in given if k not in allowed]
        if foreign:
            raise LoralabError(f"network_args {', '.join(foreign)}: options of lycoris.kohya, not of {module}; set "
                               "network_module = \"lycoris.kohya\" (with algo=...) or remove them")
        if module == "networks.dylora":
            return {"algo": "dylora", "unit": given.get("unit", 1)}
        return {"algo": "lora"}
    algo = str(given.get("algo", "lora"))
    if algo not in _LYCORIS_ALGOS:
        raise LoralabError(f"network_args algo = {algo!r}: loralab trains LyCORIS's {', '.join(_LYCORIS_ALGOS)} "
                           "(glora, ia3, boft, diag-oft and the others are not supported); pick one of those")
    for key, what in _REFUSED.items():
        if given.get(key):
            raise LoralabError(f"network_args: {key} = True ({what}) is not supported by loralab; set it to False "
                               "or remove it")
    preset = str(given.get("preset", "full"))
    from loralab.network.targets import PRESETS, preset_has_conv

    if preset not in PRESETS:
        raise LoralabError(f"network_args preset = {preset!r} is unknown; use one of {', '.join(PRESETS)} (LyCORIS's "
                           "built-in presets; preset files are not read)")
    conv_dim = int(opts.get("conv_dim") or dim) if preset_has_conv(preset) else None
    own_alpha = "conv_alpha" in args_given or opts.get("conv_alpha") not in (None, 1.0)  # 1.0: the top-level default
    conv_alpha = float((opts.get("conv_alpha") if own_alpha else None) or alpha or dim) if conv_dim else None
    out = {"algo": _LYCORIS_ALGOS[algo], "preset": preset, "conv_dim": conv_dim, "conv_alpha": conv_alpha,
           "use_tucker": any(given.get(k, False) for k in ("use_tucker", "use_cp", "use_conv_cp"))}
    out.update({k: given[k] for k in ("factor", "decompose_both", "full_matrix", "dora_wd", "wd_on_output")
                if k in given})
    if out["algo"] == "dylora":
        out["unit"] = given.get("block_size", given.get("unit", 4))
    if given.get("dropout"):
        out["dropout"] = given["dropout"]
    return out
