"""LoRA / LoCon modules, their injection into the UNet and text encoders, and kohya-format files.

The network is kohya-ss sd-scripts' `networks.lora` (research/kohya.md §4, formats.md §1.1), written anew:

* Targets (kohya's rules, matched on the class name): in the UNet every `nn.Linear` and `nn.Conv2d`
  inside a `Transformer2DModel` (proj_in/proj_out, attn1/attn2 to_q/to_k/to_v/to_out.0, ff.net.0.proj,
  ff.net.2); with `conv_dim` ("LoCon") also inside `ResnetBlock2D`, `Downsample2D` and `Upsample2D`, where
  the 3x3 convs get `conv_dim`/`conv_alpha` and the Linear `time_emb_proj` and 1x1 `conv_shortcut` get
  `dim`/`alpha`. In each text encoder `q_proj k_proj v_proj out_proj fc1 fc2` of `CLIPAttention` /
  `CLIPSdpaAttention` / `CLIPMLP`.
* Names: `lora_name = (prefix + "." + module_path).replace(".", "_")`, prefixes `lora_unet`, `lora_te`
  (SD 1.x / 2.x) or `lora_te1` / `lora_te2` (SDXL). Text-encoder paths always start with `text_model.`
  (transformers >= 5.6 flattens `CLIPTextModel`; we add it back). SDXL UNet paths are the LDM/SGM ones
  (`input_blocks.4.1...`, `sdxl_unet_path_to_ldm`); SD 1.x / 2.x keep diffusers' paths.
* File: `<name>.lora_down.weight` [r, in] (conv [r, in, kh, kw]), `<name>.lora_up.weight` [out, r]
  (conv [out, r, 1, 1]), `<name>.alpha` (0-d). Loaded the same way by A1111, ComfyUI, diffusers and kohya.
* SD 2.x proj_in/proj_out: diffusers builds them as `nn.Linear` (use_linear_projection), kohya as 1x1
  convs, so kohya's SD2 files hold 4-D [r, in, 1, 1] weights there. We save the 2-D shape of the module we
  wrap: diffusers' loader rejects the 4-D shape for a Linear (size mismatch, checked in
  tests/test_network.py), while A1111 (`network_lora.create_module` reshapes Linear weights to 2-D) and
  ComfyUI (flattens both factors, reshapes the product to the weight's shape) accept either. On load we
  accept both shapes for Linear and for 1x1 conv targets.

The modules hook the model by replacing the wrapped module's `forward` (the original module stays in the
model, so its weights, state dict and names are unchanged); the LoRA parameters live only in the network.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from loralab.errors import LoralabError
from loralab.io import atomic_write

log = logging.getLogger(__name__)

PREFIX_UNET = "lora_unet"
PREFIX_TEXT_ENCODER = "lora_te"
PREFIX_TEXT_ENCODER_SDXL = ("lora_te1", "lora_te2")
UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
FAMILIES = ("sd1", "sd2", "sdxl")
SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


# ---------------------------------------------------------------------------------------- guide terms


def alpha_scale(alpha: float | None, dim: int) -> float:
    """alpha scale: the LoRA output is multiplied by `scale = alpha / dim`.

    An alpha of None or 0 means alpha = dim (scale 1), as in kohya's `LoRAModule` and in every loader.
    """
    return float(effective_alpha(alpha, dim)) / dim


def effective_alpha(alpha: float | None, dim: int) -> float:
    """The alpha a module stores: `alpha`, or `dim` when alpha is None or 0."""
    return float(dim) if alpha is None or float(alpha) == 0.0 else float(alpha)


def module_dropout(p: float | None, training: bool) -> bool:
    """module_dropout (kohya network_args): in training, skip the whole LoRA module with probability p.

    Returns True when the module is skipped this call: `training and p and rand() < p`. The base output is
    then returned unchanged (no rescaling of the kept calls).
    """
    return bool(p) and training and torch.rand(1).item() < p


def network_dropout(lx: torch.Tensor, p: float | None, training: bool) -> torch.Tensor:
    """network_dropout (`--network_dropout`): standard dropout on the rank activations `lora_down(x)`.

    `lx = F.dropout(lx, p)` in training (kept values scaled by 1/(1-p)); identity in eval.
    """
    if p and training:
        return F.dropout(lx, p=p, training=True)
    return lx


def rank_dropout(lx: torch.Tensor, p: float | None, training: bool, conv: bool) -> tuple[torch.Tensor, float]:
    """rank_dropout (kohya network_args): drop whole ranks per sample, in training.

    mask ~ Bernoulli(1-p) of shape [batch, rank] (`rand(B, r) > p`), broadcast over tokens (Linear, rank on
    the last axis) or over H, W (conv, rank on axis 1); `lx *= mask` and the scale factor is 1/(1-p), as if
    the rank were smaller. Returns (lx, factor); factor is 1.0 when nothing is dropped.
    """
    if not (p and training):
        return lx, 1.0
    rank = lx.shape[1] if conv else lx.shape[-1]
    mask = torch.rand((lx.shape[0], rank), device=lx.device) > p
    if conv:
        mask = mask.view(lx.shape[0], rank, *([1] * (lx.dim() - 2)))
    else:
        mask = mask.view(lx.shape[0], *([1] * (lx.dim() - 2)), rank)
    return lx * mask.to(lx.dtype), 1.0 / (1.0 - p)


# ---------------------------------------------------------------------------------------- one module


class LoRAModule(nn.Module):
    """A LoRA on one `nn.Linear` or `nn.Conv2d`: y = W x + multiplier * scale * up(down(x)).

    Linear: down = Linear(in, r), up = Linear(r, out). Conv2d: down keeps the wrapped conv's kernel,
    stride, padding and dilation, up is 1x1. Init as kohya: kaiming_uniform(a=sqrt(5)) on down, zeros on up,
    so the network starts as the identity.
    """

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        dim: int,
        alpha: float | None = None,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{lora_name}: LoRA wraps nn.Linear or nn.Conv2d, not {type(org_module).__name__}")
        if int(dim) < 1:
            raise ValueError(f"{lora_name}: LoRA dim must be >= 1, got {dim}")
        self.lora_name = lora_name
        self.lora_dim = int(dim)
        self.is_conv = isinstance(org_module, nn.Conv2d)
        if self.is_conv:
            if org_module.groups != 1:
                raise ValueError(f"{lora_name}: grouped convolutions are not supported")
            self.lora_down = nn.Conv2d(org_module.in_channels, self.lora_dim, org_module.kernel_size,
                                       org_module.stride, org_module.padding, org_module.dilation, bias=False)
            self.lora_up = nn.Conv2d(self.lora_dim, org_module.out_channels, 1, 1, bias=False)
        else:
            self.lora_down = nn.Linear(org_module.in_features, self.lora_dim, bias=False)
            self.lora_up = nn.Linear(self.lora_dim, org_module.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(effective_alpha(alpha, self.lora_dim), dtype=torch.float32))
        self.scale = alpha_scale(alpha, self.lora_dim)
        self.multiplier = float(multiplier)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        # The wrapped module is kept outside nn.Module's registry, so that it is neither saved in the
        # network's state dict nor moved / cast with the network.
        object.__setattr__(self, "org_module", org_module)
        self._org_forward: Any = None
        self._had_instance_forward = False

    @property
    def is_conv3x3(self) -> bool:
        """True for a conv whose kernel is not 1x1 (these get conv_dim / conv_alpha)."""
        return self.is_conv and tuple(self.lora_down.kernel_size) != (1, 1)

    def set_alpha(self, alpha: float | None) -> None:
        """Set alpha (None/0 -> dim) and the scale alpha/dim that goes with it."""
        self.alpha.fill_(effective_alpha(alpha, self.lora_dim))
        self.scale = alpha_scale(alpha, self.lora_dim)

    # ------------------------------------------------------------------ hooking
    @property
    def applied(self) -> bool:
        return self._org_forward is not None

    def apply_to(self) -> None:
        """Route the wrapped module's forward through this LoRA (idempotent)."""
        if self.applied:
            return
        org = self.org_module
        self._had_instance_forward = "forward" in org.__dict__
        self._org_forward = org.forward
        org.forward = self.forward

    def restore(self) -> None:
        """Give the wrapped module its own forward back."""
        if not self.applied:
            return
        org = self.org_module
        if org.__dict__.get("forward") != self.forward:
            raise RuntimeError(f"{self.lora_name}: the module's forward was replaced by someone else; not restoring")
        if self._had_instance_forward:
            org.forward = self._org_forward
        else:
            del org.forward
        self._org_forward = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """kohya's LoRAModule.forward (kohya.md §4.3); the dropouts act only in training mode."""
        y = self._org_forward(x, *args, **kwargs)
        if module_dropout(self.module_dropout, self.training):
            return y
        if x.dtype != self.lora_down.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_down.weight.dtype)  # under autocast the Linear casts by itself: no extra kernel
        lx = self.lora_down(x)
        lx = network_dropout(lx, self.dropout, self.training)
        lx, factor = rank_dropout(lx, self.rank_dropout, self.training, conv=self.is_conv)
        lx = self.lora_up(lx)
        return y + (lx * (self.multiplier * self.scale * factor)).to(y.dtype)

    # ------------------------------------------------------------------ merged weight
    def merge_weight(self) -> torch.Tensor:
        """ΔW = scale · up ∘ down in the wrapped weight's shape (without the multiplier).

        Linear: up @ down. 1x1 conv: the squeezed product, unsqueezed back to [out, in, 1, 1].
        kxk conv: conv2d(down.permute(1,0,2,3), up).permute(1,0,2,3) -> [out, in, k, k].
        """
        down, up = self.lora_down.weight, self.lora_up.weight
        if down.dim() == 2:
            w = up @ down
        elif tuple(down.shape[2:]) == (1, 1):
            w = (up.flatten(1) @ down.flatten(1))[:, :, None, None]
        else:
            w = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        return w * self.scale

    def extra_repr(self) -> str:
        return f"{self.lora_name}, dim={self.lora_dim}, alpha={float(self.alpha):g}"


# ---------------------------------------------------------------------------------------- names


def kohya_lora_name(prefix: str, module_path: str) -> str:
    """kohya's lora_name: `(prefix + "." + module_path).replace(".", "_")`."""
    return f"{prefix}.{module_path}".replace(".", "_")


def text_encoder_module_path(path: str) -> str:
    """Text-encoder module path as kohya sees it: always under `text_model.`.

    transformers >= 5.6 flattens `CLIPTextModel` (`encoder.layers.0...`), while `CLIPTextModelWithProjection`
    and the CLIP models kohya loads are nested (`text_model.encoder.layers.0...`); A1111 and ComfyUI only
    match the nested names.
    """
    return path if path.startswith("text_model.") else f"text_model.{path}"


_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_TOP_LDM = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet_inner(rest: list[str]) -> list[str]:
    if rest and rest[0] in _RESNET_LDM:
        return _RESNET_LDM[rest[0]].split(".") + rest[1:]
    return rest


def sdxl_unet_path_to_ldm(path: str, layers_per_block: int | Sequence[int],
                          up_blocks_with_attention: Collection[int]) -> str:
    """A diffusers UNet module path -> the LDM/SGM path that SDXL LoRA names use (formats.md §1.2).

    With n = layers_per_block (n resnets per down block, n+1 per up block; SDXL n = 2):
    down_blocks.i.{resnets|attentions}.j -> input_blocks.(1 + Σ_{k<i}(n_k+1) + j).{0|1};
    down_blocks.i.downsamplers.0.conv -> input_blocks.(Σ_{k<=i}(n_k+1)).0.op;
    mid_block.attentions.0 -> middle_block.1, mid_block.resnets.j -> middle_block.(2j);
    up_blocks.i.{resnets|attentions}.j -> output_blocks.(Σ_{k<i}(m_k+1) + j).{0|1} (m = reversed n);
    up_blocks.i.upsamplers.0.conv -> output_blocks.(Σ_{k<i}(m_k+1) + m_i).{2 if the block has attentions
    else 1}.conv. Inside resnets: norm1, conv1, norm2, conv2, time_emb_proj, conv_shortcut -> in_layers.0,
    in_layers.2, out_layers.0, out_layers.3, emb_layers.1, skip_connection. Inside attentions the names stay.
    Top level: time_embedding, add_embedding, conv_in, conv_norm_out, conv_out -> time_embed, label_emb.0,
    input_blocks.0.0, out.0, out.2.
    """
    for k, v in _TOP_LDM.items():
        if path == k or path.startswith(k + "."):
            return v + path[len(k):]
    parts = path.split(".")

    def per_block(i: int, up: bool) -> int:
        if isinstance(layers_per_block, int):
            return layers_per_block
        seq = list(reversed(layers_per_block)) if up else list(layers_per_block)
        return seq[i]

    if parts[0] == "down_blocks":
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        start = 1 + sum(per_block(k, False) + 1 for k in range(i))
        if kind == "resnets":
            return ".".join(["input_blocks", str(start + j), "0"] + _resnet_inner(rest))
        if kind == "attentions":
            return ".".join(["input_blocks", str(start + j), "1"] + rest)
        if kind == "downsamplers":
            out = ["input_blocks", str(start + per_block(i, False)), "0"]
            return ".".join(out + (["op"] + rest[1:] if rest and rest[0] == "conv" else rest))
    elif parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "attentions":
            return ".".join(["middle_block", "1"] + rest)
        if kind == "resnets":
            return ".".join(["middle_block", str(2 * j)] + _resnet_inner(rest))
    elif parts[0] == "up_blocks":
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        start = sum(per_block(k, True) + 1 for k in range(i))
        if kind == "resnets":
            return ".".join(["output_blocks", str(start + j), "0"] + _resnet_inner(rest))
        if kind == "attentions":
            return ".".join(["output_blocks", str(start + j), "1"] + rest)
        if kind == "upsamplers":
            inner = "2" if i in up_blocks_with_attention else "1"
            return ".".join(["output_blocks", str(start + per_block(i, True)), inner] + rest)
    raise ValueError(f"no LDM name for UNet module {path!r}")


# ---------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class LoRATarget:
    """One module a LoRA can wrap: its kohya name, the module, and the other names files may use for it."""

    lora_name: str
    module: nn.Module
    side: str  # "unet" | "text_encoder"
    conv3x3: bool  # gets conv_dim / conv_alpha
    aliases: tuple[str, ...] = ()


def _children_of_targets(root: nn.Module, classes: Collection[str]) -> Iterable[tuple[str, nn.Module]]:
    """kohya's walk: each module whose class name is in `classes`, then each Linear / Conv2d inside it."""
    seen: set[int] = set()
    for name, module in root.named_modules():
        if module.__class__.__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, (nn.Linear, nn.Conv2d)) and id(child) not in seen:
                seen.add(id(child))
                yield (f"{name}.{child_name}" if name else child_name), child


def _is_conv3x3(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def find_lora_targets(unet: nn.Module | None, text_encoders: Sequence[nn.Module], family: str,
                      include_conv: bool) -> list[LoRATarget]:
    """Every module kohya's networks.lora would wrap, text encoders first, with kohya names.

    `include_conv` adds the ResnetBlock2D / Downsample2D / Upsample2D children (LoCon). Aliases are the
    other spellings found in files: diffusers-style SDXL UNet names, TE names without `text_model_`, and
    `lora_te1_` for single-encoder models (diffusers' `convert_state_dict_to_kohya`).
    """
    if family not in FAMILIES:
        raise LoralabError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    tes = [te for te in text_encoders if te is not None]
    if family == "sdxl":
        if len(tes) not in (0, 2):
            raise LoralabError(f"an SDXL LoRA needs both text encoders, got {len(tes)}")
        prefixes: Sequence[str] = PREFIX_TEXT_ENCODER_SDXL
    else:
        if len(tes) > 1:
            raise LoralabError(f"a {family} model has one text encoder, got {len(tes)}")
        prefixes = (PREFIX_TEXT_ENCODER,)
    targets: list[LoRATarget] = []
    for prefix, te in zip(prefixes, tes):
        for path, module in _children_of_targets(te, TEXT_ENCODER_TARGETS):
            kpath = text_encoder_module_path(path)
            name = kohya_lora_name(prefix, kpath)
            flat = kpath[len("text_model."):]
            alias_prefixes = {prefix} | ({"lora_te1"} if prefix == PREFIX_TEXT_ENCODER else set())
            aliases = {kohya_lora_name(p, x) for p in alias_prefixes for x in (kpath, flat)} - {name}
            targets.append(LoRATarget(name, module, "text_encoder", False, tuple(sorted(aliases))))
    if unet is not None:
        classes = UNET_TARGETS + (UNET_CONV_TARGETS if include_conv else ())
        if family == "sdxl":
            lpb = unet.config.layers_per_block
            with_attn = {i for i, b in enumerate(unet.up_blocks) if getattr(b, "attentions", None)}
        for path, module in _children_of_targets(unet, classes):
            diffusers_name = kohya_lora_name(PREFIX_UNET, path)
            if family == "sdxl":
                name = kohya_lora_name(PREFIX_UNET, sdxl_unet_path_to_ldm(path, lpb, with_attn))
                aliases = (diffusers_name,) if diffusers_name != name else ()
            else:
                name, aliases = diffusers_name, ()
            targets.append(LoRATarget(name, module, "unet", _is_conv3x3(module), aliases))
    return targets


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

    def __post_init__(self) -> None:
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
    `<name>.lora_up.weight` and `<name>.alpha`, text-encoder modules first, as kohya writes them.
    """

    def __init__(self, modules: Sequence[LoRAModule], family: str, sides: Mapping[str, str] | None = None,
                 aliases: Mapping[str, str] | None = None) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise LoralabError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
        self.family = family
        sides = dict(sides or {})
        self.text_encoder_loras: list[LoRAModule] = []
        self.unet_loras: list[LoRAModule] = []
        for m in modules:
            side = sides.get(m.lora_name) or ("unet" if m.lora_name.startswith(PREFIX_UNET) else "text_encoder")
            (self.unet_loras if side == "unet" else self.text_encoder_loras).append(m)
        for m in self.text_encoder_loras + self.unet_loras:
            if m.lora_name in self._modules:
                raise ValueError(f"duplicate LoRA module {m.lora_name}")
            self.add_module(m.lora_name, m)
        self._aliases: dict[str, str] = dict(aliases or {})  # other spelling -> kohya name

    # ------------------------------------------------------------------ building
    @classmethod
    def create(cls, unet: nn.Module | None, text_encoders: Sequence[nn.Module], family: str,
               cfg: NetworkConfig | None = None, multiplier: float = 1.0) -> LoRANetwork:
        """A new network on `unet` and `text_encoders` (one for sd1/sd2, two for sdxl), kohya's targets."""
        cfg = cfg or NetworkConfig()
        targets = find_lora_targets(unet if cfg.train_unet else None,
                                    text_encoders if cfg.train_text_encoder else [], family,
                                    include_conv=cfg.conv_dim is not None)
        modules = []
        for t in targets:
            dim, alpha = cfg.dim_alpha(t)
            if dim:  # 3x3 convs without conv_dim are skipped, like kohya
                modules.append(_make_module(t, dim, alpha, multiplier, cfg))
        net = cls(modules, family, {t.lora_name: t.side for t in targets}, _alias_map(targets))
        log.info("LoRA network: %d text-encoder and %d UNet modules (dim %d, alpha %g%s)",
                 len(net.text_encoder_loras), len(net.unet_loras), cfg.dim, effective_alpha(cfg.alpha, cfg.dim),
                 f", conv_dim {cfg.conv_dim}, conv_alpha {cfg.conv_alpha:g}" if cfg.conv_dim else "")
        return net

    @classmethod
    def from_weights(cls, path_or_sd: str | Path | Mapping[str, torch.Tensor], unet: nn.Module | None,
                     text_encoders: Sequence[nn.Module], family: str, cfg: NetworkConfig | None = None,
                     multiplier: float = 1.0) -> LoRANetwork:
        """A network shaped by a LoRA file (kohya's dim_from_weights) with its weights loaded.

        Each module's dim is its `lora_down.weight.shape[0]` and its alpha the file's `.alpha` (missing:
        alpha = dim). Only modules present in the file are created, LoCon convs included. Dropouts and the
        train_unet / train_text_encoder switches come from `cfg`; the other fields of `cfg` are ignored.
        Diffusers-style SDXL names are converted to the LDM ones.
        """
        cfg = cfg or NetworkConfig()
        where = str(path_or_sd) if not isinstance(path_or_sd, Mapping) else "the given state dict"
        sd = _read_weights(path_or_sd)
        targets = find_lora_targets(unet, text_encoders, family, include_conv=True)
        sd, _ = _canonical_keys(sd, _alias_map(targets), where)
        by_name = {t.lora_name: t for t in targets}
        file_modules = _module_names(sd)
        unknown = sorted(n for n in file_modules if n not in by_name)
        if unknown:
            raise _unknown_keys_error(unknown, where, family)
        modules, dropped = [], []
        for name in file_modules:
            t = by_name[name]
            if (t.side == "unet" and not cfg.train_unet) or (t.side == "text_encoder" and not cfg.train_text_encoder):
                dropped.append(name)
                continue
            down = sd.get(f"{name}.lora_down.weight")
            if down is None:
                raise LoralabError(f"{where}: module {name} has no lora_down.weight; the file is incomplete or "
                                   "not a LoRA (LoHa/LoKr files need LyCORIS)")
            alpha = sd.get(f"{name}.alpha")
            modules.append(_make_module(t, int(down.shape[0]), float(alpha) if alpha is not None else None,
                                        multiplier, cfg))
        if dropped:
            log.warning("%s: %d modules of the %s are not used (that side is not trained)", where, len(dropped),
                        "UNet" if not cfg.train_unet else "text encoder")
            dropped_set = set(dropped)
            sd = {k: v for k, v in sd.items() if k.split(".", 1)[0] not in dropped_set}
        net = cls(modules, family, {t.lora_name: t.side for t in targets}, _alias_map(targets))
        net.load_weights(sd)
        log.info("LoRA network from %s: %d text-encoder and %d UNet modules, dims %s", where,
                 len(net.text_encoder_loras), len(net.unet_loras),
                 sorted({m.lora_dim for m in net.text_encoder_loras + net.unet_loras}))
        return net

    # ------------------------------------------------------------------ use
    @property
    def loras(self) -> list[LoRAModule]:
        return self.text_encoder_loras + self.unet_loras

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

    def param_groups(self, unet_lr: float | None = None, text_encoder_lr: float | None = None,
                     learning_rate: float | None = None) -> list[dict]:
        """Optimizer param groups, kohya's `prepare_optimizer_params`.

        Text encoder group ("textencoder") at `text_encoder_lr`, UNet group ("unet") at `unet_lr`; a None lr
        falls back to `learning_rate`. A group whose lr ends up 0 or None is dropped (kohya: "NO LR
        skipping!") and its parameters get requires_grad False; those modules stay applied and saved (with
        lora_up still 0 if never trained).
        """
        self.requires_grad_(True)
        groups = []
        for name, loras, lr in (("textencoder", self.text_encoder_loras, text_encoder_lr),
                                ("unet", self.unet_loras, unet_lr)):
            if not loras:
                continue
            lr = learning_rate if lr is None else lr
            if not lr:
                for m in loras:
                    m.requires_grad_(False)
                log.info("%s LoRA: learning rate %s, not trained", name, lr)
                continue
            groups.append({"params": [p for m in loras for p in m.parameters()], "lr": float(lr), "name": name})
        return groups

    def max_norm(self, max_norm_value: float) -> tuple[int, float, float]:
        """max-norm (`--scale_weight_norms`), kohya's `apply_max_norm_regularization`, in place.

        For each module: W = scale · up∘down (`merge_weight`); norm = max(‖W‖_F, max_norm/2);
        ratio = min(norm, max_norm) / norm; if ratio != 1, up and down are each multiplied by sqrt(ratio),
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
                    m.lora_up.weight.mul_(ratio.sqrt().to(m.lora_up.weight.dtype))
                    m.lora_down.weight.mul_(ratio.sqrt().to(m.lora_down.weight.dtype))
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
        sd = _read_weights(path_or_sd)
        sd, renamed = _canonical_keys(sd, self._aliases, where)
        unknown = sorted(n for n in _module_names(sd) if n not in self._modules)
        bad_suffix = sorted(k for k in sd if "." in k and k.split(".", 1)[0] in self._modules
                            and "." + k.split(".", 1)[1] not in SUFFIXES)
        if unknown or bad_suffix:
            raise _unknown_keys_error(unknown + bad_suffix, where, self.family)
        loaded, reshaped, missing = 0, 0, []
        with torch.no_grad():
            for m in self.loras:
                down, up = sd.get(f"{m.lora_name}.lora_down.weight"), sd.get(f"{m.lora_name}.lora_up.weight")
                if down is None and up is None:
                    missing.append(m.lora_name)
                    continue
                if down is None or up is None:
                    raise LoralabError(f"{where}: module {m.lora_name} has only one of lora_down / lora_up; the file "
                                       "is incomplete")
                n = 0
                for param, value in ((m.lora_down.weight, down), (m.lora_up.weight, up)):
                    value, changed = _fit_shape(value, param.shape, m.lora_name, where)
                    n += changed
                    param.copy_(value.to(param.dtype))
                reshaped += n > 0
                alpha = sd.get(f"{m.lora_name}.alpha")
                m.set_alpha(float(alpha) if alpha is not None else None)
                loaded += 1
        if missing:
            log.warning("%s: no weights for %d of %d LoRA modules (they keep their current values), e.g. %s",
                        where, len(missing), len(self.loras), missing[0])
        return LoadInfo(loaded=loaded, missing=missing, renamed=renamed, reshaped=reshaped)

    def save(self, path: str | Path, dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None) -> None:
        """Write the kohya-format file atomically (temp file in the same folder, then os.replace).

        `.safetensors`: the metadata (strings only) plus `sshs_model_hash` / `sshs_legacy_hash`, computed as
        kohya's `precalculate_safetensors_hashes`: serialize the tensors with only the `ss_*` metadata; model
        hash = sha256 of the bytes after the 8-byte length and the JSON header; legacy hash = first 8 hex
        digits of sha256 of the 64 KiB at offset 1 MiB of those bytes. Other suffixes (.pt/.ckpt): torch.save
        of the tensors, no metadata. `dtype` (e.g. torch.float16) casts every tensor, alpha included.
        """
        path = Path(path)
        sd = {k: v.detach().clone().to("cpu", dtype or v.dtype).contiguous() for k, v in self.state_dict().items()}
        if path.suffix.lower() == ".safetensors":
            md = dict(metadata or {})
            bad = sorted(k for k, v in md.items() if not isinstance(k, str) or not isinstance(v, str))
            if bad:
                raise TypeError(f"safetensors metadata values must be str; not for: {', '.join(map(str, bad))}")
            md["sshs_model_hash"], md["sshs_legacy_hash"] = precalculate_safetensors_hashes(sd, md)
            atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=md))
        else:
            if metadata:
                log.warning("%s: metadata is only stored in .safetensors files", path)
            atomic_write(path, lambda tmp: torch.save(sd, tmp))


# ---------------------------------------------------------------------------------------- helpers


def _make_module(t: LoRATarget, dim: int, alpha: float | None, multiplier: float, cfg: NetworkConfig) -> LoRAModule:
    return LoRAModule(t.lora_name, t.module, dim, alpha, multiplier, dropout=cfg.dropout,
                      rank_dropout=cfg.rank_dropout, module_dropout=cfg.module_dropout)


def _alias_map(targets: Iterable[LoRATarget]) -> dict[str, str]:
    return {a: t.lora_name for t in targets for a in t.aliases}


def _module_names(sd: Mapping[str, Any]) -> list[str]:
    """Module names of a kohya state dict, in first-seen order (keys without a "." are ignored, as kohya)."""
    return list(dict.fromkeys(k.split(".", 1)[0] for k in sd if "." in k))


def _canonical_keys(sd: Mapping[str, torch.Tensor], aliases: Mapping[str, str], where: str) -> tuple[dict, int]:
    """Rename keys written under another spelling of a module to its kohya name."""
    out: dict[str, torch.Tensor] = {}
    renamed = 0
    for key, value in sd.items():
        module, sep, rest = key.partition(".")
        if module in aliases:
            module = aliases[module]
            renamed += 1
        new = module + sep + rest
        if new in out:
            raise LoralabError(f"{where}: the file holds {new} twice (under two spellings of the same module); "
                               "remove one copy")
        out[new] = value
    if renamed:
        log.info("%s: %d keys read under their kohya names (the file uses another naming style)", where, renamed)
    return out, renamed


def _fit_shape(value: torch.Tensor, shape: torch.Size, name: str, where: str) -> tuple[torch.Tensor, bool]:
    """Accept kohya's 4-D [a, b, 1, 1] weights for Linear targets (SD2 proj_in/out) and 2-D for 1x1 convs."""
    if value.shape == shape:
        return value, False
    if value.numel() == math.prod(shape):
        if len(shape) == 2 and value.dim() == 4 and tuple(value.shape[2:]) == (1, 1):
            return value.reshape(shape), True
        if len(shape) == 4 and tuple(shape[2:]) == (1, 1) and value.dim() == 2:
            return value.reshape(shape), True
    raise LoralabError(
        f"{where}: {name} has shape {tuple(value.shape)} in the file but {tuple(shape)} in the network. The file "
        "was trained with another rank or for another model; load it with dim_from_weights (LoRANetwork.from_weights) "
        "or pick a LoRA made for this base model.")


def _unknown_keys_error(keys: Sequence[str], where: str, family: str) -> LoralabError:
    shown = ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
    return LoralabError(
        f"{where}: {len(keys)} LoRA modules/keys match nothing in this {family} network: {shown}. The file was "
        "made for another model family or architecture, holds LyCORIS types (LoHa/LoKr, lora_mid, dora_scale) "
        "that networks.lora cannot load, or the network was created without some of its modules; use a LoRA "
        "made for this base model.")


def _read_weights(path_or_sd: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(path_or_sd, Mapping):
        return dict(path_or_sd)
    path = Path(path_or_sd)
    if not path.is_file():
        raise LoralabError(f"LoRA file not found: {path}; check network_weights (or the path you gave)")
    try:
        if path.suffix.lower() == ".safetensors":
            return safetensors.torch.load_file(str(path), device="cpu")
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise LoralabError(f"cannot read LoRA file {path}: {e}. The file is damaged or not a LoRA; save or download "
                           "it again") from e


def precalculate_safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya's train_util and sd-webui-additional-networks compute them.

    Serialize `tensors` with only the `ss_*` metadata; model hash = sha256 hex of everything after the
    header (8-byte little-endian length n, then n header bytes); legacy hash = sha256 of the 0x10000 bytes
    at offset 0x100000, first 8 hex digits (of nothing for files under 1 MiB).
    """
    data = safetensors.torch.save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + n:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash
