"""The base of every network module (`NetworkModule`), the LoRA / LoCon module (`LoRAModule`) and its rules:
alpha scale, module / network / rank dropout. The other types (LoHa, LoKr, full, DyLoRA) live in their own files.

One module is kohya-ss sd-scripts' `networks.lora.LoRAModule` (research/kohya.md §4.3), written anew:
y = W x + multiplier * scale * up(down(x)), with `scale = alpha / dim`; on a Linear, down is [r, in] and
up [out, r]; on a Conv2d, down keeps the wrapped conv's kernel and up is 1x1 (LoCon).

The module hooks the model by replacing the wrapped module's `forward` (the original module stays in the
model, so its weights, state dict and names are unchanged); the LoRA parameters live only in the network.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


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


class NetworkModule(nn.Module):
    """What every module type shares: its kohya name, the wrapped Linear / Conv2d, the multiplier, the
    dropouts, DoRA, the hook into the wrapped module, and the ΔW path of `forward`.

    A type defines `merge_weight()` (ΔW · scale in the wrapped weight's shape, without the multiplier) and
    `scale_delta_(ratio)` (multiply ΔW by `ratio` in place, for max-norm); the base forward is then
    y = W x + multiplier · ΔW' x, where ΔW' is ΔW, or with DoRA `dora.weight_decompose(W, ΔW) − W`.
    """

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None) -> None:
        super().__init__()
        if not isinstance(org_module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{lora_name}: a network module wraps nn.Linear or nn.Conv2d, not {type(org_module).__name__}")
        if isinstance(org_module, nn.Conv2d) and org_module.groups != 1:
            raise ValueError(f"{lora_name}: grouped convolutions are not supported")
        self.lora_name = lora_name
        self.is_conv = isinstance(org_module, nn.Conv2d)
        self.multiplier = float(multiplier)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.dora_scale: nn.Parameter | None = None
        # The wrapped module is kept outside nn.Module's registry, so that it is neither saved in the
        # network's state dict nor moved / cast with the network.
        object.__setattr__(self, "org_module", org_module)
        self._org_forward: Any = None
        self._had_instance_forward = False

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The wrapped module's weight shape: [out, in] or [out, in, kh, kw]."""
        return tuple(self.org_module.weight.shape)

    @property
    def is_conv3x3(self) -> bool:
        """True for a conv whose kernel is not 1x1 (these get conv_dim / conv_alpha)."""
        return self.is_conv and tuple(self.org_module.kernel_size) != (1, 1)

    # ------------------------------------------------------------------ DoRA
    def enable_dora(self, on_output: bool = False) -> None:
        """DoRA (`dora_wd`): add the trainable magnitude `dora_scale`, initialised to ‖W‖ of the wrapped weight
        (`dora.dora_magnitude`: per input channel, or per output channel with `on_output`)."""
        from loralab.network.dora import dora_magnitude

        self.dora_scale = nn.Parameter(dora_magnitude(self.org_module.weight.detach(), on_output))

    # ------------------------------------------------------------------ hooking
    @property
    def applied(self) -> bool:
        return self._org_forward is not None

    def apply_to(self) -> None:
        """Route the wrapped module's forward through this module (idempotent)."""
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

    # ------------------------------------------------------------------ the ΔW path
    def merge_weight(self) -> torch.Tensor:
        """ΔW · scale in the wrapped weight's shape, without the multiplier (each type's formula)."""
        raise NotImplementedError

    def scale_delta_(self, ratio: torch.Tensor) -> None:
        """Multiply ΔW by `ratio` in place (max-norm)."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """ΔW' that the forward adds (times the multiplier): `merge_weight()`, its output rows dropped with
        probability rank_dropout in training (LyCORIS's rank dropout for LoHa / LoKr: no rescaling), and with
        DoRA `weight_decompose(W, ΔW) − W`."""
        dw = self.merge_weight()
        if self.rank_dropout and self.training:
            keep = torch.rand(dw.shape[0], device=dw.device) > self.rank_dropout
            dw = dw * keep.to(dw.dtype).view(-1, *([1] * (dw.dim() - 1)))
        if self.dora_scale is not None:
            from loralab.network.dora import weight_decompose

            w = self.org_module.weight.detach().float()
            dw = weight_decompose(w, dw.float(), self.dora_scale) - w
        return dw

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """y = W x + multiplier · ΔW' x (`delta_weight`); network_dropout drops elements of ΔW' x in training."""
        y = self._org_forward(x, *args, **kwargs)
        if module_dropout(self.module_dropout, self.training):
            return y
        dw = self.delta_weight()
        if x.dtype != dw.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(dw.dtype)  # under autocast the op casts by itself
        if self.is_conv:
            org = self.org_module
            out = F.conv2d(x, dw, None, org.stride, org.padding, org.dilation, org.groups)
        else:
            out = F.linear(x, dw)
        if self.dropout and self.training:
            out = F.dropout(out, p=self.dropout, training=True)
        return y + (out * self.multiplier).to(y.dtype)


class LoRAModule(NetworkModule):
    """A LoRA on one `nn.Linear` or `nn.Conv2d`: y = W x + multiplier * scale * up(down(x)).

    Linear: down = Linear(in, r), up = Linear(r, out). Conv2d: down keeps the wrapped conv's kernel,
    stride, padding and dilation, up is 1x1. Init as kohya: kaiming_uniform(a=sqrt(5)) on down, zeros on up,
    so the network starts as the identity. With DoRA (`enable_dora`) the forward takes the ΔW path of
    `NetworkModule` (W' = dora_scale · (W + ΔW) / ‖W + ΔW‖), as LyCORIS and the loaders compute it.
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
        super().__init__(lora_name, org_module, multiplier, dropout, rank_dropout, module_dropout)
        if int(dim) < 1:
            raise ValueError(f"{lora_name}: LoRA dim must be >= 1, got {dim}")
        self.lora_dim = int(dim)
        if self.is_conv:
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

    def set_alpha(self, alpha: float | None) -> None:
        """Set alpha (None/0 -> dim) and the scale alpha/dim that goes with it."""
        self.alpha.fill_(effective_alpha(alpha, self.lora_dim))
        self.scale = alpha_scale(alpha, self.lora_dim)

    def scale_delta_(self, ratio: torch.Tensor) -> None:
        """max-norm: up and down each times sqrt(ratio)."""
        for p in (self.lora_up.weight, self.lora_down.weight):
            p.mul_(ratio.sqrt().to(p.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """kohya's LoRAModule.forward (kohya.md §4.3); the dropouts act only in training mode."""
        if self.dora_scale is not None:
            return super().forward(x, *args, **kwargs)
        y = self._org_forward(x, *args, **kwargs)
        down, up = self.lora_down.weight, self.lora_up.weight
        if x.dtype != down.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(down.dtype)  # under autocast the Linear casts by itself: no extra kernel
        if self.training and (self.dropout or self.rank_dropout or self.module_dropout):
            if module_dropout(self.module_dropout, self.training):
                return y
            lx = network_dropout(self.lora_down(x), self.dropout, self.training)
            lx, factor = rank_dropout(lx, self.rank_dropout, self.training, conv=self.is_conv)
            return y + (self.lora_up(lx) * (self.multiplier * self.scale * factor)).to(y.dtype)
        # the common case in few kernels and Python calls (this runs for every wrapped layer of every step)
        lx = self.lora_up(self.lora_down(x)) if self.is_conv else F.linear(F.linear(x, down), up)
        return y + (lx * (self.multiplier * self.scale)).to(y.dtype)

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
