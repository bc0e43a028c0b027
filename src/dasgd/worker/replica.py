"""A model replica whose parameters live in one flat vector.

DASGD adds gradient vectors to the model many times per step (one per arrived message), so the parameters
are re-pointed into a single contiguous tensor: one ``add_`` updates the whole model, a message payload is
that vector's size, and a replica checksum is one pass over one buffer. The module keeps its own Parameter
objects (an optimizer built on them still works); only their storage moves.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from dasgd.errors import DasgdError

__all__ = ["ReplicaError", "all_finite", "flatten_parameters", "flat_grad", "checksum"]


def all_finite(vector: torch.Tensor) -> bool:
    """Whether every value of ``vector`` is finite (no NaN, no infinity).

    Checked on every gradient and message, so the common case is one reduction: a finite sum means every
    value is finite. Only a sum that is not (a NaN or infinity in the vector, or finite values whose sum
    overflows) takes the exact element-wise check, about ten times slower.
    """
    if math.isfinite(float(vector.sum())):
        return True
    return bool(torch.isfinite(vector).all())


class ReplicaError(DasgdError, ValueError):
    """The model cannot be used as a DASGD replica."""


def flatten_parameters(module: nn.Module) -> torch.Tensor:
    """Move every trainable parameter of ``module`` into one flat tensor and return it.

    Parameters become views into the returned vector, so in-place updates of the vector update the model.
    All trainable parameters must share one dtype and device.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ReplicaError("the model has no trainable parameters: nothing to train")
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ReplicaError(
            f"all trainable parameters must share one dtype and device, found {sorted(map(str, dtypes))} "
            f"on {sorted(map(str, devices))}; convert the model with .to(dtype, device) first"
        )
    flat = torch.cat([p.detach().reshape(-1) for p in params]).contiguous()
    offset = 0
    for p in params:
        n = p.numel()
        p.data = flat[offset : offset + n].view_as(p)
        offset += n
    return flat


def flat_grad(module: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """A fresh flat copy of the gradients of ``module``'s trainable parameters (zeros where grad is None).

    Always a new tensor: queued messages may hold it, so it must never be changed afterwards.
    """
    parts = []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        parts.append(
            torch.zeros(p.numel(), dtype=like.dtype, device=like.device)
            if p.grad is None
            else p.grad.reshape(-1)
        )
    return torch.cat(parts)


def checksum(flat: torch.Tensor) -> str:
    """SHA-256 of the parameter bytes: equal checksums mean bitwise-equal replicas."""
    data = flat.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()
