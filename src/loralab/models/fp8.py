"""`fp8_base`: keep a frozen model's Linear and Conv2d weights in float8 and compute in bf16/fp16.

kohya's `--fp8_base` casts the whole frozen UNet to `torch.float8_e4m3fn` and relies on autocast to up-cast
each weight when it is used (train_network.py; research/perf.md §3: a memory tool, not a speed one). We do
the up-cast explicitly, one layer at a time, so it works the same with or without autocast and on any
device whose torch can store float8: each `nn.Linear` / `nn.Conv2d` keeps its weight in float8 (half the
bytes of bf16) and its forward casts that weight (and input) to the compute dtype just for the call. A
small autograd Function keeps the float8 weight (not a bf16 copy) for the backward pass, which computes
only the input gradient (the weight is frozen), so training without gradient checkpointing saves memory too. Norms,
embeddings and biases stay in the compute dtype (they are a few MB). The LoRA modules, which wrap these
layers' forward (`network/lora.py`), stay in fp32 and see an ordinary layer.

Call `store_fp8` before the LoRA hooks are applied: the hook then wraps the float8 forward.
Written here because no library offers weight-only float8 storage for arbitrary diffusers modules
without extra packages (torchao is not a dependency).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from loralab.errors import LoralabError

log = logging.getLogger(__name__)

FP8_DTYPE_NAME = "float8_e4m3fn"


def check_fp8_supported(device: torch.device, compute_dtype: torch.dtype) -> None:
    """Raise LoralabError unless this torch can store float8_e4m3fn on `device` and cast it to `compute_dtype`."""
    dtype = getattr(torch, FP8_DTYPE_NAME, None)
    if dtype is None:
        raise LoralabError(
            f"fp8_base: this torch ({torch.__version__}) has no {FP8_DTYPE_NAME} type (it needs torch >= 2.1); "
            "upgrade torch or set fp8_base = false")
    if compute_dtype not in (torch.bfloat16, torch.float16):
        raise LoralabError('fp8_base computes in bf16 or fp16: set mixed_precision = "bf16" (or "fp16")')
    try:
        probe = torch.ones(2, 2, device=device).to(dtype)
        F.linear(torch.ones(1, 2, device=device, dtype=compute_dtype), probe.to(compute_dtype))
    except (RuntimeError, TypeError) as err:
        raise LoralabError(
            f"fp8_base: torch {torch.__version__} cannot store {FP8_DTYPE_NAME} weights on {device} ({err}); "
            "set fp8_base = false") from err


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T + b with W stored in float8. Backward gives only dL/dx (W and b are frozen) and keeps the
    float8 W, not a bf16 copy, so the saved tensors cost 1 byte per weight instead of 2 and not the input."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(weight)
        ctx.dtype = dtype
        return F.linear(x, weight.to(dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        return grad_out.to(ctx.dtype) @ weight.to(ctx.dtype), None, None, None


class _Fp8Conv2d(torch.autograd.Function):
    """conv2d with a float8 weight; backward as `_Fp8Linear` (dL/dx only, via conv2d_input)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.conf = (x.shape, dtype, stride, padding, dilation, groups)
        return F.conv2d(x, weight.to(dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        shape, dtype, stride, padding, dilation, groups = ctx.conf
        grad_x = torch.nn.grad.conv2d_input(shape, weight.to(dtype), grad_out.to(dtype), stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None, None, None


def _fp8_linear_forward(module: nn.Linear, compute_dtype: torch.dtype):
    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = module.bias.to(compute_dtype) if module.bias is not None else None
        return _Fp8Linear.apply(x.to(compute_dtype), module.weight, bias, compute_dtype)
    return forward


def _fp8_conv_forward(module: nn.Conv2d, compute_dtype: torch.dtype):
    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = module.bias.to(compute_dtype) if module.bias is not None else None
        if module.padding_mode != "zeros" or isinstance(module.padding, str):  # rare: plain up-cast
            return module._conv_forward(x.to(compute_dtype), module.weight.to(compute_dtype), bias)
        return _Fp8Conv2d.apply(x.to(compute_dtype), module.weight, bias, compute_dtype, module.stride,
                                module.padding, module.dilation, module.groups)
    return forward


def store_fp8(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Store every Linear / Conv2d weight of a frozen `model` in float8_e4m3fn and route each such layer's
    forward through an up-cast to `compute_dtype` (weight, bias and input; the output is `compute_dtype`).
    Returns the number of layers converted. The model must already be on its device; the rest of its
    parameters keep their dtype. Do not call `.to(dtype)` on the model afterwards: it would cast the float8
    weights too."""
    fp8 = getattr(torch, FP8_DTYPE_NAME)
    count = 0
    saved = 0
    for module in model.modules():
        if type(module) not in (nn.Linear, nn.Conv2d) or "forward" in module.__dict__:
            continue
        if module.weight.requires_grad:
            raise ValueError("store_fp8 is for frozen weights; this layer's weight requires grad")
        saved += module.weight.numel() * (module.weight.element_size() - 1)
        module.weight.data = module.weight.data.to(fp8)
        if isinstance(module, nn.Linear):
            module.forward = _fp8_linear_forward(module, compute_dtype)
        else:
            module.forward = _fp8_conv_forward(module, compute_dtype)
        count += 1
    log.info("fp8_base: %d layers stored in %s (%.1f MB saved), computed in %s", count, FP8_DTYPE_NAME,
             saved / 2**20, str(compute_dtype).removeprefix("torch."))
    return count
