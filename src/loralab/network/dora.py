"""DoRA (`dora_wd=True`, LyCORIS's weight decomposition): the magnitude `dora_scale` and the decomposed weight.

Written anew (the `lycoris-lora` package computes the same, but its forward keeps ΔW at multiplier 0, while
A1111 and ComfyUI give W there; see README "Network types"). Formulas as LyCORIS, A1111 (`network.py
apply_weight_decompose`) and ComfyUI (`weight_adapter/base.py weight_decompose`) apply a file:

* W' = dora_scale · (W + ΔW) / ‖W + ΔW‖, the norm taken per input channel (over the output rows and the
  kernel: `dora_scale` is [1, in] or [1, in, 1, 1]), or, with `wd_on_output`, per output channel
  (`dora_scale` [out, 1] or [out, 1, 1, 1]);
* at multiplier m the model uses W + m · (W' − W).

Which axis: A1111 only reads the per-input layout (a per-output [out, 1] magnitude broadcasts against its
[1, in] norm into garbage, silently); ComfyUI reads both (it picks the axis by shape); diffusers / PEFT only
the per-output one (PEFT's `lora_magnitude_vector`). So we write per-input by default, which is the layout
A1111 and ComfyUI apply alike; `wd_on_output=True` writes per-output for diffusers. LyCORIS 4 defaults to
per-output. Files of either layout load (the axis is read from the shape).
"""

from __future__ import annotations

import torch

EPS = torch.finfo(torch.float32).eps


def dora_magnitude(weight: torch.Tensor, on_output: bool = False) -> torch.Tensor:
    """‖W‖ per input channel: [1, in, 1..] (default), or per output channel: [out, 1, 1..] (`on_output`), fp32."""
    w = weight.float()
    if on_output:
        return w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, w.shape[1], *[1] * (w.dim() - 2))


def is_output_axis(dora_scale: torch.Tensor, weight_shape: tuple[int, ...]) -> bool:
    """Whether a magnitude is per output channel: its shape is [out, 1, ..] rather than [1, in, ..]."""
    return dora_scale.dim() >= 2 and dora_scale.shape[1] == 1 and weight_shape[1] != 1


def weight_decompose(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """W' = dora_scale · (W + ΔW) / (‖W + ΔW‖ + eps), the norm on the axis of `dora_scale`'s shape.

    The norm is not detached (LyCORIS trains through it); eps = float32 eps, as LyCORIS and ComfyUI."""
    merged = weight + delta.reshape(weight.shape)
    if is_output_axis(dora_scale, tuple(weight.shape)):
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], *[1] * (merged.dim() - 1))
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, merged.shape[1], *[1] * (merged.dim() - 2))
    return merged * (dora_scale.to(merged.dtype).reshape(norm.shape) / (norm + EPS))
