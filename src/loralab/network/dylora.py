"""DyLoRA (kohya's `networks.dylora`, `unit`; LyCORIS `algo=dylora`, `block_size`): a LoRA trained so that its
first k·unit ranks work on their own, written anew from sd-scripts' `networks/dylora.py`.

Each training forward picks b uniformly from {0, unit, 2·unit, ...} < dim; only ranks b .. b+unit-1 get
gradients (the others are held, as kohya's requires_grad switches), and the output is scaled by
sqrt(dim / (b + unit)): y = W x + multiplier · (alpha/dim) · sqrt(dim / (b + unit)) · up(down(x)).
In eval (and in every loader) it is a plain LoRA: y = W x + multiplier · (alpha/dim) · up(down(x)).

The file is a plain LoRA file (`lora_down.weight`, `lora_up.weight`, `alpha`), as kohya's; cut it to a lower
rank with sd-scripts' extract_lora_from_dylora.py. Difference from kohya: the held ranks get zero gradients
rather than none, so an optimizer with momentum (AdamW) still moves them by their momentum.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
from torch import nn

from loralab.network.modules import LoRAModule, module_dropout


def hold_outside(weight: torch.Tensor, start: int, stop: int, dim: int) -> torch.Tensor:
    """`weight` whose gradient flows only through indices start..stop-1 of axis `dim` (the rank axis)."""
    idx = torch.arange(weight.shape[dim], device=weight.device)
    mask = ((idx >= start) & (idx < stop)).to(weight.dtype)
    mask = mask.view(*[-1 if i == dim else 1 for i in range(weight.dim())])
    return weight * mask + weight.detach() * (1 - mask)


class DyLoRAModule(LoRAModule):
    """A LoRA whose ranks train in units (see the module docstring)."""

    def __init__(self, lora_name: str, org_module: nn.Module, dim: int, alpha: float | None = None,
                 multiplier: float = 1.0, unit: int = 1, module_dropout: float | None = None) -> None:
        super().__init__(lora_name, org_module, dim, alpha, multiplier, module_dropout=module_dropout)
        if int(unit) < 1 or self.lora_dim % int(unit):
            raise ValueError(f"{lora_name}: DyLoRA unit {unit} must divide the rank {self.lora_dim}")
        self.unit = int(unit)

    def trainable_rank(self) -> int:
        """kohya's pick: b = randint(0, dim-1) rounded down to a multiple of unit."""
        b = random.randint(0, self.lora_dim - 1)
        return b - b % self.unit

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.training or self.dora_scale is not None:
            return super().forward(x, *args, **kwargs)
        y = self._org_forward(x, *args, **kwargs)
        if module_dropout(self.module_dropout, self.training):
            return y
        b = self.trainable_rank()
        down = hold_outside(self.lora_down.weight, b, b + self.unit, 0)
        up = hold_outside(self.lora_up.weight, b, b + self.unit, 1)
        if x.dtype != down.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(down.dtype)
        if self.is_conv:
            org = self.org_module
            lx = nn.functional.conv2d(x, down, None, org.stride, org.padding, org.dilation)
            lx = nn.functional.conv2d(lx, up)
        else:
            lx = nn.functional.linear(nn.functional.linear(x, down), up)
        factor = self.multiplier * self.scale * math.sqrt(self.lora_dim / (b + self.unit))
        return y + (lx * factor).to(y.dtype)
