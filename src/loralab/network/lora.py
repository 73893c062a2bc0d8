"""The LoRA network: its config, building it on a model, training helpers, loading and saving its file.

The network is kohya-ss sd-scripts' `networks.lora` (research/kohya.md §4, formats.md §1.1), written anew,
in four parts:

* `modules.py`: one LoRA / LoCon module (`LoRAModule`) and its rules (alpha scale, the three dropouts), on
  the base every type shares (`NetworkModule`); the other types in `loha.py`, `lokr.py`, `full.py`,
  `dylora.py`, DoRA in `dora.py`, and which type a config or a file asks for in `types.py`;
* `targets.py`: which modules kohya wraps and the names files give them (`find_lora_targets`);
* `files.py`: the kohya file layout: reading, key spellings, shapes, unknown keys, writing, hashes;
* this file: `NetworkConfig`, and `LoRANetwork`, which creates the modules on the targets, hooks them
  into the model, hands out optimizer groups, applies max-norm and loads / saves the file.

The modules hook the model by replacing the wrapped module's `forward` (the original module stays in the
model, so its weights, state dict and names are unchanged); the LoRA parameters live only in the network.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from loralab.errors import LoralabError
from loralab.network.blocks import BLOCK_KEYS, BlockPlan, block_index, block_plan
from loralab.network.files import (
    canonical_keys,
    check_keys,
    fit_shape,
    module_names,
    read_weights,
    save_weights,
    unknown_keys_error,
)
from loralab.network.modules import NetworkModule, effective_alpha
from loralab.network.targets import (
    FAMILIES,
    PREFIX_TEXT_ENCODER_SDXL,
    PREFIX_UNET,
    PRESETS,
    LoRATarget,
    alias_map,
    find_lora_targets,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- config


@dataclass
class NetworkConfig:
    """Shape and regularization of a new network (kohya's --network_dim/alpha/dropout and network_args).

    `conv_dim` switches LoCon on (3x3 convs of ResnetBlock2D / Downsample2D / Upsample2D); `conv_alpha`
    defaults to 1 then, like kohya. `train_unet` / `train_text_encoder` False leave that side's modules out
    entirely (kohya's --network_train_text_encoder_only / --network_train_unet_only).
    """

    dim: int = 4
    alpha: float | None = 1.0
    conv_dim: int | None = None
    conv_alpha: float | None = None
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    train_unet: bool = True
    train_text_encoder: bool = True
    # network type (network/types.py): kohya's networks.lora is "lora"; LyCORIS's algo; DyLoRA's unit
    algo: str = "lora"
    preset: str | None = None  # LyCORIS preset (targets.PRESETS); None: kohya's networks.lora targets
    factor: int = -1  # LoKr
    decompose_both: bool = False  # LoKr
    full_matrix: bool = False  # LoKr
    use_tucker: bool = False  # LoHa / LoKr on 3x3 convs
    dora_wd: bool = False  # DoRA on LoRA / LoHa / LoKr
    wd_on_output: bool = False  # DoRA magnitude per output channel (diffusers) instead of per input (A1111)
    unit: int = 1  # DyLoRA
    # kohya's block-wise network_args as given (blocks.BLOCK_KEYS: down/mid/up_lr_weight, block_dims, ...);
    # resolved for the model family by `LoRANetwork.create` (blocks.block_plan)
    blocks: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_type()
        self._check_blocks()
        if self.dim is None or int(self.dim) < 1:
            raise LoralabError(f"network_dim = {self.dim} is invalid: the LoRA rank must be a whole number >= 1 "
                               "(e.g. 4, 16, 32)")
        self.dim = int(self.dim)
        if self.conv_dim is not None:
            if int(self.conv_dim) < 0:
                raise LoralabError(f"network_args conv_dim = {self.conv_dim} is invalid: use a whole number >= 1, "
                                   "or leave it out")
            self.conv_dim = int(self.conv_dim) or None
        if self.conv_dim is not None and self.conv_alpha is None:
            self.conv_alpha = 1.0
        for key, value in (("network_dropout", self.dropout), ("rank_dropout", self.rank_dropout),
                           ("module_dropout", self.module_dropout)):
            if value is None:
                continue
            if value < 0 or value > 1 or (key == "rank_dropout" and value >= 1.0):  # rank_dropout divides by 1-p
                limit = "0 <= p < 1" if key == "rank_dropout" else "0 <= p <= 1"
                raise LoralabError(f"{key} = {value} is out of range: it is a probability ({limit}); "
                                   "typical values are 0.1-0.3")

    def _check_type(self) -> None:
        """The type's own options: each error names the network_args key."""
        from loralab.network.types import ALGOS

        if self.algo not in ALGOS:
            raise LoralabError(f"network_args algo = {self.algo!r} is unknown; use one of {', '.join(ALGOS)}")
        if self.preset is not None and self.preset not in PRESETS:
            raise LoralabError(f"network_args preset = {self.preset!r} is unknown; use one of {', '.join(PRESETS)} "
                               "(LyCORIS's built-in presets; preset files are not read)")
        if self.factor == 0 or self.factor < -1:
            raise LoralabError(f"network_args factor = {self.factor} is invalid: LoKr's factor is -1 (automatic) or a "
                               "whole number >= 1 that splits the layer widths (e.g. 4, 8, 16)")
        if self.dora_wd and self.algo in ("full", "dylora"):
            raise LoralabError(f"network_args dora_wd = True does not go with algo = {self.algo}: DoRA is for lora, "
                               "locon, loha and lokr (as LyCORIS)")
        if self.algo == "dylora":
            if self.unit < 1 or self.dim % self.unit or (self.conv_dim and self.conv_dim % self.unit):
                raise LoralabError(f"network_args unit = {self.unit} must be >= 1 and divide network_dim = {self.dim}"
                                   f"{f' and conv_dim = {self.conv_dim}' if self.conv_dim else ''} (DyLoRA trains "
                                   "the rank in units)")
            if self.dropout or self.rank_dropout:
                raise LoralabError("network_dropout / rank_dropout: DyLoRA has no dropouts but module_dropout (kohya's "
                                   "networks.dylora neither); remove them")
        if self.algo in ("loha", "locon") and max(self.dim, self.conv_dim or 0) > 32:
            log.warning("%s with dim %d: dims above 32 for LoHa/LoCon are refused by some tools (LoHa's effective "
                        "rank is dim², so it grows fast) and rarely help; the guide advises 32 or less",
                        self.algo, max(self.dim, self.conv_dim or 0))

    def _check_blocks(self) -> None:
        """Block keys belong to kohya's networks.lora (its networks.dylora and LyCORIS ignore them)."""
        unknown = sorted(set(self.blocks) - set(BLOCK_KEYS))
        if unknown:
            raise LoralabError(f"network_args {', '.join(unknown)}: not a block-wise key; those are "
                               f"{', '.join(BLOCK_KEYS)}")
        if self.blocks and (self.algo != "lora" or self.preset is not None):
            raise LoralabError(f"network_args {', '.join(self.blocks)}: block-wise dims and learning rates are "
                               "kohya's networks.lora options (LoRA, LoCon with conv_dim); kohya's networks.dylora "
                               "and LyCORIS ignore them. Use network_module = \"networks.lora\", or remove them")

    def dim_alpha(self, target: LoRATarget) -> tuple[int | None, float | None]:
        """(dim, alpha) kohya gives a target: 3x3 convs conv_dim/conv_alpha (None: skipped), else dim/alpha."""
        if target.conv3x3:
            return self.conv_dim, self.conv_alpha
        return self.dim, self.alpha


@dataclass
class LoadInfo:
    """What `LoRANetwork.load_weights` did."""

    loaded: int  # modules whose weights came from the file
    missing: list[str] = field(default_factory=list)  # network modules the file has no weights for
    renamed: int = 0  # keys read under another spelling (diffusers-style SDXL, TE without text_model_, ...)
    reshaped: int = 0  # 4-D [.., 1, 1] weights squeezed for Linear targets or the reverse


# ---------------------------------------------------------------------------------------- the network


class LoRANetwork(nn.Module):
    """All LoRA modules of one model; its state dict is the kohya file layout.

    Modules are registered under their kohya names, so `state_dict()` keys are `<name>.lora_down.weight`,
    `<name>.lora_up.weight` and `<name>.alpha` (LoHa: `<name>.hada_*`, LoKr: `<name>.lokr_*`, full:
    `<name>.diff`, DoRA: `+ <name>.dora_scale`), text-encoder modules first, as kohya writes them.
    """

    def __init__(self, modules: Sequence[NetworkModule], family: str, sides: Mapping[str, str] | None = None,
                 aliases: Mapping[str, str] | None = None) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise LoralabError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
        self.family = family
        sides = dict(sides or {})
        self.text_encoder_loras: list[NetworkModule] = []
        self.unet_loras: list[NetworkModule] = []
        for m in modules:
            side = sides.get(m.lora_name) or ("unet" if m.lora_name.startswith(PREFIX_UNET) else "text_encoder")
            (self.unet_loras if side == "unet" else self.text_encoder_loras).append(m)
        for m in self.text_encoder_loras + self.unet_loras:
            if m.lora_name in self._modules:
                raise ValueError(f"duplicate LoRA module {m.lora_name}")
            self.add_module(m.lora_name, m)
        self._aliases: dict[str, str] = dict(aliases or {})  # other spelling -> kohya name
        self.block_plan: BlockPlan | None = None  # block-wise dims / lr weights (network/blocks.py)

    # ------------------------------------------------------------------ building
    @classmethod
    def create(cls, unet: nn.Module | None, text_encoders: Sequence[nn.Module], family: str,
               cfg: NetworkConfig | None = None, multiplier: float = 1.0) -> LoRANetwork:
        """A new network on `unet` and `text_encoders` (one for sd1/sd2, two for sdxl), kohya's targets."""
        from loralab.network.types import make_module

        cfg = cfg or NetworkConfig()
        plan = block_plan(cfg.blocks, family, cfg.dim, cfg.alpha, cfg.conv_dim, cfg.conv_alpha) if cfg.blocks else None
        targets = find_lora_targets(unet if cfg.train_unet else None,
                                    text_encoders if cfg.train_text_encoder else [], family,
                                    include_conv=cfg.conv_dim is not None or bool(plan and plan.conv_dims),
                                    preset=cfg.preset)
        modules, skipped = [], 0
        for t in targets:
            dim, alpha = plan.dim_alpha(t.lora_name, t.conv3x3) if plan and t.side == "unet" else cfg.dim_alpha(t)
            if dim or (cfg.algo == "full" and (not t.conv3x3 or cfg.conv_dim is not None)):
                # 3x3 convs without conv_dim are skipped, like kohya and LyCORIS
                modules.append(make_module(t, dim or 1, alpha, multiplier, cfg))
            else:
                skipped += plan is not None and (not t.conv3x3 or plan.conv_dims is not None)
        net = cls(modules, family, {t.lora_name: t.side for t in targets}, alias_map(targets))
        net.block_plan = plan
        if plan is not None:
            log.info("block-wise network: %d UNet modules left out (their block's dim or lr weight is 0); blocks:\n  %s",
                     skipped, "\n  ".join(plan.describe()))
        log.info("%s network: %d text-encoder and %d UNet modules (dim %d, alpha %g%s)",
                 cfg.algo + (" + DoRA" if cfg.dora_wd else ""),
                 len(net.text_encoder_loras), len(net.unet_loras), cfg.dim, effective_alpha(cfg.alpha, cfg.dim),
                 f", conv_dim {cfg.conv_dim}, conv_alpha {cfg.conv_alpha:g}" if cfg.conv_dim else "")
        return net

    @classmethod
    def from_weights(cls, path_or_sd: str | Path | Mapping[str, torch.Tensor], unet: nn.Module | None,
                     text_encoders: Sequence[nn.Module], family: str, cfg: NetworkConfig | None = None,
                     multiplier: float = 1.0) -> LoRANetwork:
        """A network shaped by a file (kohya's dim_from_weights) with its weights loaded.

        Each module's type comes from its keys (`types.file_type`: LoRA, LoHa, LoKr, full, + DoRA), its dim from
        its tensors (LoRA: `lora_down.weight.shape[0]`) and its alpha from the file's `.alpha` (missing:
        alpha = dim). Only modules present in the file are created, LoCon convs and LyCORIS's conv_in /
        conv_out / time embedding included. Dropouts, DyLoRA's unit (LoRA modules of an `algo = "dylora"` cfg
        continue as DyLoRA) and the train_unet / train_text_encoder switches come from `cfg`; its other fields
        are ignored. Diffusers-style SDXL names are converted to the LDM ones.
        """
        from loralab.network.types import module_from_file

        cfg = cfg or NetworkConfig()
        where = str(path_or_sd) if not isinstance(path_or_sd, Mapping) else "the given state dict"
        sd = read_weights(path_or_sd)
        targets = find_lora_targets(unet, text_encoders, family, include_conv=True, preset="full", all_names=True)
        targets += [t for t in find_lora_targets(unet, text_encoders, family, False, preset="attn-only")
                    if t.lora_name not in {u.lora_name for u in targets}]
        sd, _ = canonical_keys(sd, alias_map(targets), where)
        by_name = {t.lora_name: t for t in targets}
        file_modules = module_names(sd)
        unknown = sorted(n for n in file_modules if n not in by_name)
        if unknown:
            raise unknown_keys_error(unknown, where, family)
        modules, dropped = [], []
        for name in file_modules:
            t = by_name[name]
            if (t.side == "unet" and not cfg.train_unet) or (t.side == "text_encoder" and not cfg.train_text_encoder):
                dropped.append(name)
                continue
            keys = {k.split(".", 1)[1]: v for k, v in sd.items() if k.split(".", 1)[0] == name}
            modules.append(module_from_file(t, keys, multiplier, cfg, where))
        if dropped:
            log.warning("%s: %d modules of the %s are not used (that side is not trained)", where, len(dropped),
                        "UNet" if not cfg.train_unet else "text encoder")
            dropped_set = set(dropped)
            sd = {k: v for k, v in sd.items() if k.split(".", 1)[0] not in dropped_set}
        net = cls(modules, family, {t.lora_name: t.side for t in targets}, alias_map(targets))
        net.load_weights(sd)
        if cfg.blocks:  # block lr weights apply to the file's modules (kohya's create_network_from_weights)
            net.block_plan = block_plan(cfg.blocks, family, cfg.dim, cfg.alpha, cfg.conv_dim, cfg.conv_alpha)
        log.info("network from %s: %d text-encoder and %d UNet modules, types %s, dims %s", where,
                 len(net.text_encoder_loras), len(net.unet_loras), net.types(),
                 sorted({m.lora_dim for m in net.text_encoder_loras + net.unet_loras}))
        return net

    # ------------------------------------------------------------------ use
    @property
    def loras(self) -> list[NetworkModule]:
        return self.text_encoder_loras + self.unet_loras

    def types(self) -> list[str]:
        """The module types in this network, e.g. ["LoHaModule", "LoRAModule+DoRA"]."""
        return sorted({type(m).__name__ + ("+DoRA" if m.dora_scale is not None else "") for m in self.loras})

    def apply_to(self) -> None:
        """Hook every module into its model (the model's own modules, names and weights stay as they were)."""
        for m in self.loras:
            m.apply_to()

    def restore(self) -> None:
        """Unhook every module; the model computes exactly its base output again."""
        for m in self.loras:
            m.restore()

    def set_multiplier(self, multiplier: float) -> None:
        """The LoRA strength: every module adds multiplier * scale * up(down(x))."""
        for m in self.loras:
            m.multiplier = float(multiplier)

    def param_groups(self, unet_lr: float | None = None, text_encoder_lr: float | Sequence[float] | None = None,
                     learning_rate: float | None = None, loraplus_unet_ratio: float | None = None,
                     loraplus_text_encoder_ratio: float | None = None) -> list[dict]:
        """Optimizer param groups, kohya's `prepare_optimizer_params`.

        Text encoder group ("textencoder") at `text_encoder_lr`, UNet group ("unet") at `unet_lr`; a None lr
        falls back to `learning_rate`. A group whose lr ends up 0 or None is dropped (kohya: "NO LR
        skipping!") and its parameters get requires_grad False; those modules stay applied and saved (with
        lora_up still 0 if never trained).

        `text_encoder_lr` may be a list, one value per text encoder (kohya's `--text_encoder_lr` nargs, as its
        `prepare_optimizer_params_with_multiple_te_lrs`: one value serves both): on SDXL two different values
        give groups "textencoder1" (lora_te1) and "textencoder2" (lora_te2) in that order, each dropped at 0;
        equal values, or a model with one text encoder (which takes the first value), give the one group.

        LoRA+ (kohya's `assemble_params`): with a ratio for that side (None or 0: off), each part splits in
        two groups, "<name>" (lora_down, and whatever else is not lora_up) at lr and "<name> plus" (every
        lora_up weight, LoCon convs included) at lr x ratio, in that order; kohya's log names are then
        `lr/unet plus`, `lr/textencoder plus`. Without ratios the groups are exactly the ones above.

        Block lr weights (`block_plan`, kohya's down/mid/up_lr_weight): the UNet group splits into one group per
        block, "unet_block<k>" at lr x the block's weight, in module order (then LoRA+ splits each of them).
        """
        self.requires_grad_(True)
        groups = []
        parts = [(*part, loraplus_text_encoder_ratio) for part in self._text_encoder_parts(text_encoder_lr)]
        parts += [(*part, loraplus_unet_ratio) for part in self._unet_parts(learning_rate if unet_lr is None else unet_lr)]
        for name, loras, lr, ratio in parts:
            if not loras:
                continue
            lr = learning_rate if lr is None else lr
            if not lr:
                for m in loras:
                    m.requires_grad_(False)
                log.info("%s LoRA: learning rate %s, not trained", name, lr)
                continue
            if not ratio:
                groups.append({"params": [p for m in loras for p in m.parameters()], "lr": float(lr), "name": name})
                continue
            named = [(n, p) for m in loras for n, p in m.named_parameters()]
            groups.append({"params": [p for n, p in named if "lora_up" not in n], "lr": float(lr), "name": name})
            groups.append({"params": [p for n, p in named if "lora_up" in n], "lr": float(lr) * float(ratio),
                           "name": f"{name} plus"})
            (log.debug if name.startswith("unet_block") else log.info)("%s LoRA+: lora_up at learning rate %s x %s",
                                                                      name, lr, ratio)
        return [g for g in groups if g["params"]]

    def _unet_parts(self, lr: float | None) -> list[tuple[str, list, float | None]]:
        """(group name, modules, lr) of the UNet for `param_groups`: one part, or one per block with block lr."""
        if self.block_plan is None or self.block_plan.lr_weight is None:
            return [("unet", self.unet_loras, lr)]
        by_block: dict[int, list[NetworkModule]] = {}
        for m in self.unet_loras:
            by_block.setdefault(block_index(m.lora_name, self.family), []).append(m)
        return [(f"unet_block{k}", loras, None if lr is None else lr * self.block_plan.weight(k))
                for k, loras in by_block.items()]

    def _text_encoder_parts(self, lr: float | Sequence[float] | None) -> list[tuple[str, list, float | None]]:
        """(group name, modules, lr) of the text encoders for `param_groups`."""
        if lr is None or isinstance(lr, (int, float)):
            return [("textencoder", self.text_encoder_loras, lr)]
        lrs = [float(v) for v in lr] or [None]
        per_encoder = [[m for m in self.text_encoder_loras if m.lora_name.startswith(prefix + "_")]
                       for prefix in PREFIX_TEXT_ENCODER_SDXL]
        if len(set(lrs)) == 1:
            return [("textencoder", self.text_encoder_loras, lrs[0])]
        if self.family != "sdxl":
            log.warning("text_encoder_lr %s: this model has one text encoder; it uses the first value %s", lrs, lrs[0])
            return [("textencoder", self.text_encoder_loras, lrs[0])]
        return [("textencoder1", per_encoder[0], lrs[0]), ("textencoder2", per_encoder[1], lrs[1])]

    def max_norm(self, max_norm_value: float) -> tuple[int, float, float]:
        """max-norm (`--scale_weight_norms`), kohya's `apply_max_norm_regularization`, in place.

        For each module: W = ΔW · scale (`merge_weight`, LoRA: scale · up∘down); norm = max(‖W‖_F, max_norm/2);
        ratio = min(norm, max_norm) / norm; if ratio != 1, ΔW's factors are scaled (`scale_delta_`: LoRA's up and
        down, LoHa's w1_a and w2_a, LoKr's w1 and w2 each by sqrt(ratio); full's diff by ratio),
        so ‖W‖_F becomes exactly max_norm. Only modules with ‖W‖_F > max_norm change; nothing enters the
        loss; the multiplier is not part of W. Returns (keys_scaled, mean, max) of the norms ‖W‖_F·ratio.
        """
        keys_scaled, norms = 0, []
        with torch.no_grad():
            for m in self.loras:
                w = m.merge_weight().float()
                w_norm = w.norm()
                norm = w_norm.clamp(min=max_norm_value / 2)
                desired = norm.clamp(max=max_norm_value)
                ratio = desired / norm
                if ratio != 1:
                    keys_scaled += 1
                    m.scale_delta_(ratio)
                norms.append(float(w_norm * ratio))
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)

    # ------------------------------------------------------------------ files
    def load_weights(self, path_or_sd: str | Path | Mapping[str, torch.Tensor]) -> LoadInfo:
        """Load kohya-format weights into the existing modules (also our training-state dicts).

        Every key must belong to a module of this network (other spellings of the same module are
        converted); unknown keys raise a LoralabError that lists them. Shapes must match (a different rank:
        use `from_weights`). Alphas are taken from the file and the scales recomputed (kohya keeps the
        CLI alpha's scale here, its "FIXME"); a module without `.alpha` gets alpha = dim.
        """
        where = str(path_or_sd) if not isinstance(path_or_sd, Mapping) else "the given state dict"
        sd = read_weights(path_or_sd)
        sd, renamed = canonical_keys(sd, self._aliases, where)
        suffixes = {m.lora_name: {"." + k for k in m.state_dict()} | {".alpha"} for m in self.loras}
        check_keys(sd, self._modules, where, self.family, suffixes)
        loaded, reshaped, missing = 0, 0, []
        with torch.no_grad():
            for m in self.loras:
                params = {k: v for k, v in m.state_dict(keep_vars=True).items() if k != "alpha"}
                found = {k: sd[f"{m.lora_name}.{k}"] for k in params if f"{m.lora_name}.{k}" in sd}
                if not found:
                    missing.append(m.lora_name)
                    continue
                if len(found) != len(params):
                    lacking = ", ".join(sorted(set(params) - set(found)))
                    raise LoralabError(f"{where}: module {m.lora_name} lacks {lacking}; the file is incomplete or of "
                                       "another layout (load it with LoRANetwork.from_weights)")
                n = 0
                for key, value in found.items():
                    value, changed = fit_shape(value, params[key].shape, f"{m.lora_name}.{key}", where)
                    n += changed
                    params[key].copy_(value.to(params[key].dtype))
                reshaped += n > 0
                alpha = sd.get(f"{m.lora_name}.alpha")
                m.set_alpha(float(alpha) if alpha is not None else None)
                loaded += 1
        if missing:
            log.warning("%s: no weights for %d of %d LoRA modules (they keep their current values), e.g. %s",
                        where, len(missing), len(self.loras), missing[0])
        return LoadInfo(loaded=loaded, missing=missing, renamed=renamed, reshaped=reshaped)

    def save(self, path: str | Path, dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None,
             extra: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write the kohya-format file atomically, with `metadata` and kohya's hashes (`files.save_weights`).

        `.safetensors`: the metadata (strings only) plus `sshs_model_hash` / `sshs_legacy_hash`; other
        suffixes (.pt/.ckpt): the tensors only. `dtype` (e.g. torch.float16) casts every tensor, alpha included.
        `extra`: more tensors stored beside the network's (a recipe's, e.g. pivotal tuning's embeddings);
        a name that clashes with a network key is an error.
        """
        sd = self.state_dict()
        clash = sorted(set(sd) & set(extra or {}))
        if clash:
            raise ValueError(f"extra tensors would overwrite network keys: {', '.join(clash[:5])}")
        save_weights(path, {**sd, **(extra or {})}, dtype, metadata)
