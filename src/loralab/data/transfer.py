"""Moving a step's inputs to the training device without making the host wait.

A copy from ordinary (pageable) CPU memory to a CUDA device waits until the GPU has finished the work queued
before it: one such copy per step (latents, text-encoder outputs, loss weights) keeps the host from preparing
the next step while the GPU computes this one. Through pinned memory the copy is queued like a kernel and the
host goes on (`non_blocking=True`; torch keeps the pinned buffer until the copy is done).
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`: CPU → CUDA through pinned memory, queued without a host wait; else `.to(device)`."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
