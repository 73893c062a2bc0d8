"""LoKr (LyCORIS `algo=lokr`): a Kronecker product, written anew from LyCORIS's rules and the key layout A1111
(`network_lokr.py`) and ComfyUI (`weight_adapter/lokr.py`) read.

ΔW = kron(w1, w2) · scale, reshaped to the wrapped weight.

With out = a·b and in = c·d split by `factorization(n, factor)` (a ≤ b, c ≤ d): w1 is [a, c] and w2 is
[b, d] ([b, d, kh, kw] on a conv). Keys (`<name>.` + ...):

* `lokr_w1` [a, c], full; or, with `decompose_both` and dim < max(a, c)/2, `lokr_w1_a` [a, r] @ `lokr_w1_b` [r, c];
* `lokr_w2` [b, d(, kh, kw)], full when dim ≥ max(b, d)/2 (LyCORIS's "full matrix mode") or `full_matrix`;
  else `lokr_w2_a` [b, r] @ `lokr_w2_b` [r, d·kh·kw]; on a kxk conv with `use_tucker`: `lokr_w2_a` [r, b],
  `lokr_w2_b` [r, d], `lokr_t2` [r, r, kh, kw];
* `alpha`: scale = alpha / dim when a factor is decomposed (the loaders take dim from `lokr_w2_b` / `lokr_w1_b`),
  1 when both are full (LyCORIS then stores alpha = dim).

Init as LyCORIS: w1 (or w1_a, w1_b), w2_a and t2 kaiming_uniform(a=√5); w2 (full) or w2_b zeros: ΔW starts at 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from loralab.network.loha import tucker_rebuild
from loralab.network.modules import NetworkModule, alpha_scale, effective_alpha

KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of `dimension` into m · n with m ≤ n.

    `factor` > 0 dividing the dimension: (factor, dimension / factor), ordered. Otherwise (factor -1 = no limit)
    m grows through the divisors of the dimension while m + n keeps shrinking and m ≤ factor: e.g. 128 -> (8, 16);
    with factor 4: 512 -> (4, 128); a prime p -> (1, p).
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


class LoKrModule(NetworkModule):
    """ΔW = kron(w1, w2) · scale on one Linear or Conv2d."""

    def __init__(self, lora_name: str, org_module: nn.Module, dim: int, alpha: float | None = None,
                 multiplier: float = 1.0, dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None, factor: int = -1, decompose_both: bool = False,
                 use_tucker: bool = False, full_matrix: bool = False, layout: dict | None = None) -> None:
        super().__init__(lora_name, org_module, multiplier, dropout, rank_dropout, module_dropout)
        if int(dim) < 1:
            raise ValueError(f"{lora_name}: LoKr dim must be >= 1, got {dim}")
        self.lora_dim = r = int(dim)
        out_dim, in_dim, *kernel = self.weight_shape
        (a, b), (c, d) = factorization(out_dim, int(factor)), factorization(in_dim, int(factor))
        if layout:  # a file's own layout (`layout_from_file`)
            (a, c) = layout["w1_shape"]
            b, d = out_dim // a, in_dim // c
            w1_split, w2_split = layout["w1_decomposed"], layout["w2_decomposed"]
        else:
            w1_split = decompose_both and not full_matrix and r < max(a, c) / 2
            w2_split = not full_matrix and r < max(b, d) / 2
        self.factors = ((a, b), (c, d))
        self.tucker = False
        shapes: dict[str, tuple[int, ...]] = {}
        if w1_split:
            shapes.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
        else:
            shapes["lokr_w1"] = (a, c)
        if not w2_split:
            shapes["lokr_w2"] = (b, d, *kernel)
        elif use_tucker and self.is_conv3x3:
            self.tucker = True
            shapes.update(lokr_w2_a=(r, b), lokr_w2_b=(r, d), lokr_t2=(r, r, *kernel))
        else:
            shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * math.prod(kernel)))
        for key in KEYS:
            if key in shapes:
                self.register_parameter(key, nn.Parameter(torch.empty(shapes[key])))
        with torch.no_grad():
            for key in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_t2"):
                if key in shapes:
                    nn.init.kaiming_uniform_(getattr(self, key), a=math.sqrt(5))
            nn.init.zeros_(self.lokr_w2 if "lokr_w2" in shapes else self.lokr_w2_b)
        self.both_full = "lokr_w1" in shapes and "lokr_w2" in shapes
        self.register_buffer("alpha", torch.tensor(0.0))
        self.set_alpha(alpha)

    @classmethod
    def shape_from_file(cls, tensors: dict[str, torch.Tensor]) -> dict:
        """Constructor arguments that rebuild a file's layout: w1's shape (so the split of out and in), which
        factors are decomposed, dim from `lokr_w2_b` / `lokr_w1_b` (as the loaders take it)."""
        w1 = tensors.get("lokr_w1")
        w1_shape = tuple(w1.shape[:2]) if w1 is not None else (tensors["lokr_w1_a"].shape[0],
                                                                 tensors["lokr_w1_b"].shape[1])
        dim = next((int(tensors[k].shape[0]) for k in ("lokr_w2_b", "lokr_w1_b") if k in tensors), 1)
        layout = {"w1_shape": tuple(int(n) for n in w1_shape), "w1_decomposed": w1 is None,
                  "w2_decomposed": "lokr_w2" not in tensors}
        return {"dim": dim, "use_tucker": "lokr_t2" in tensors, "layout": layout}

    def set_alpha(self, alpha: float | None) -> None:
        """alpha / dim, or scale 1 (and alpha = dim stored) when w1 and w2 are both full, as LyCORIS."""
        alpha = None if self.both_full else alpha
        self.alpha.fill_(effective_alpha(alpha, self.lora_dim))
        self.scale = alpha_scale(alpha, self.lora_dim)

    def factor_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1, w2), each rebuilt from its decomposition when it has one."""
        w1 = self.lokr_w1 if hasattr(self, "lokr_w1") else self.lokr_w1_a @ self.lokr_w1_b
        if hasattr(self, "lokr_w2"):
            w2 = self.lokr_w2
        elif self.tucker:
            w2 = tucker_rebuild(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def merge_weight(self) -> torch.Tensor:
        """ΔW = kron(w1, w2) · scale (w1 gets two trailing 1-dims when w2 is 4-D), reshaped to the weight."""
        w1, w2 = self.factor_weights()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1.contiguous(), w2.contiguous()).reshape(self.weight_shape) * self.scale

    def scale_delta_(self, ratio: torch.Tensor) -> None:
        """max-norm: one w1 tensor and one w2 tensor each times sqrt(ratio), so ΔW is times ratio."""
        for key in (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")):
            p = getattr(self, key[0]) if hasattr(self, key[0]) else getattr(self, key[1])
            p.mul_(ratio.sqrt().to(p.dtype))

    def extra_repr(self) -> str:
        return (f"{self.lora_name}, LoKr dim={self.lora_dim}, alpha={float(self.alpha):g}, "
                f"factors {self.factors}{', tucker' if self.tucker else ''}")
