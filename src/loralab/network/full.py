"""Full (LyCORIS `algo=full`, "native fine-tuning"): the whole ΔW is trained; written anew from the key layout
A1111 (`network_full.py`) and ComfyUI (`weight_adapter`, "diff") read.

ΔW = diff (no rank, no alpha, no scale). Key: `<name>.diff`, the wrapped weight's shape; starts at 0. The
bias is not trained (LyCORIS's `diff_b` is optional for both loaders). A file holds as many numbers as the
weights it adapts: on SD 1.x about 1.6 GB in fp16 with the default targets.
"""

from __future__ import annotations

import torch
from torch import nn

from loralab.network.modules import NetworkModule

KEYS = ("diff",)


class FullModule(NetworkModule):
    """ΔW = diff on one Linear or Conv2d."""

    def __init__(self, lora_name: str, org_module: nn.Module, multiplier: float = 1.0, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None) -> None:
        super().__init__(lora_name, org_module, multiplier, dropout, rank_dropout, module_dropout)
        self.diff = nn.Parameter(torch.zeros(self.weight_shape))
        self.lora_dim = 0

    @classmethod
    def shape_from_file(cls, tensors: dict[str, torch.Tensor]) -> dict:
        return {}

    def set_alpha(self, alpha: float | None) -> None:
        """A full ΔW has no alpha (a file's alpha, if any, is ignored, as by the loaders)."""

    def merge_weight(self) -> torch.Tensor:
        """ΔW = diff."""
        return self.diff

    def scale_delta_(self, ratio: torch.Tensor) -> None:
        self.diff.mul_(ratio.to(self.diff.dtype))

    def extra_repr(self) -> str:
        return f"{self.lora_name}, full ΔW {tuple(self.diff.shape)}"
