"""LoHa (LyCORIS `algo=loha`): a low-rank Hadamard product, written anew from LyCORIS's formulas and the key
layout A1111 (`network_hada.py`) and ComfyUI (`weight_adapter/loha.py`) read.

ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · scale, scale = alpha / dim.

Keys (`<name>.` + ...): `hada_w1_a` [out, r], `hada_w1_b` [r, in·kh·kw], `hada_w2_a`, `hada_w2_b` (same shapes),
`alpha`; on a kxk conv with `use_tucker`: `hada_w1_a` [r, out], `hada_w1_b` [r, in], `hada_t1` [r, r, kh, kw]
(and the same for 2), each factor rebuilt as einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a).
Init as LyCORIS: w1_b, w2_b ~ N(0, 1), w1_a ~ N(0, 0.1), t ~ N(0, 0.1), w2_a = 0, so ΔW starts at 0.
The rank of a LoHa is effectively dim², hence the guide's advice to keep dim ≤ 32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loralab.network.modules import NetworkModule, alpha_scale, effective_alpha

KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def tucker_rebuild(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A Tucker (CP) conv factor: einsum("i j k l, j r, i p -> p r k l", t, wb, wa) -> [out, in, kh, kw]."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


class LoHaModule(NetworkModule):
    """ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha / dim on one Linear or Conv2d."""

    def __init__(self, lora_name: str, org_module: nn.Module, dim: int, alpha: float | None = None,
                 multiplier: float = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, use_tucker: bool = False) -> None:
        super().__init__(lora_name, org_module, multiplier, dropout, rank_dropout, module_dropout)
        if int(dim) < 1:
            raise ValueError(f"{lora_name}: LoHa dim must be >= 1, got {dim}")
        self.lora_dim = r = int(dim)
        out_dim, in_dim, *kernel = self.weight_shape
        self.tucker = bool(use_tucker) and self.is_conv3x3
        if self.tucker:
            shapes = {"hada_w1_a": (r, out_dim), "hada_w1_b": (r, in_dim), "hada_t1": (r, r, *kernel)}
        else:
            shapes = {"hada_w1_a": (out_dim, r), "hada_w1_b": (r, in_dim * math.prod(kernel))}
        for key, shape in list(shapes.items()):
            shapes[key.replace("1", "2")] = shape
        for key in KEYS:
            if key in shapes:
                self.register_parameter(key, nn.Parameter(torch.empty(shapes[key])))
        with torch.no_grad():
            nn.init.normal_(self.hada_w1_b, std=1.0)
            nn.init.normal_(self.hada_w2_b, std=1.0)
            nn.init.normal_(self.hada_w1_a, std=0.1)
            nn.init.zeros_(self.hada_w2_a)
            if self.tucker:
                nn.init.normal_(self.hada_t1, std=0.1)
                nn.init.normal_(self.hada_t2, std=0.1)
        self.register_buffer("alpha", torch.tensor(effective_alpha(alpha, r), dtype=torch.float32))
        self.scale = alpha_scale(alpha, r)

    @classmethod
    def shape_from_file(cls, tensors: dict[str, torch.Tensor]) -> dict:
        """Constructor arguments read from a file's tensors of one module: dim = hada_w1_b.shape[0]."""
        return {"dim": int(tensors["hada_w1_b"].shape[0]), "use_tucker": "hada_t1" in tensors}

    def set_alpha(self, alpha: float | None) -> None:
        self.alpha.fill_(effective_alpha(alpha, self.lora_dim))
        self.scale = alpha_scale(alpha, self.lora_dim)

    def merge_weight(self) -> torch.Tensor:
        """ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · scale, reshaped to the wrapped weight (Tucker factors on kxk convs)."""
        if self.tucker:
            m1 = tucker_rebuild(self.hada_t1, self.hada_w1_a, self.hada_w1_b)
            m2 = tucker_rebuild(self.hada_t2, self.hada_w2_a, self.hada_w2_b)
        else:
            m1 = self.hada_w1_a @ self.hada_w1_b
            m2 = self.hada_w2_a @ self.hada_w2_b
        return (m1 * m2).reshape(self.weight_shape) * self.scale

    def scale_delta_(self, ratio: torch.Tensor) -> None:
        """max-norm: w1_a and w2_a each times sqrt(ratio), so ΔW is times ratio."""
        for p in (self.hada_w1_a, self.hada_w2_a):
            p.mul_(ratio.sqrt().to(p.dtype))

    def extra_repr(self) -> str:
        return f"{self.lora_name}, LoHa dim={self.lora_dim}, alpha={float(self.alpha):g}{', tucker' if self.tucker else ''}"
