"""The algorithm interface: the update math, as small functions over explicit tensors.

An algorithm decides how a gradient changes a replica; the worker decides which messages carry it and the
runtime decides when things happen. Algorithms hold no sockets, clocks or threads (STYLE.md, 1).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["Algorithm"]


@runtime_checkable
class Algorithm(Protocol):
    """How gradients update a replica."""

    name: str
    """Registry name, e.g. "dasgd"."""
    faithful: bool
    """True when the update is the paper's fixed-stepsize SGD (inside the convergence theory)."""

    def local_update(self, params: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        """Apply this worker's own fresh gradient to ``params`` in place."""
        ...

    def remote_update(self, params: torch.Tensor, grad_sum: torch.Tensor, lr: float, count: int) -> None:
        """Apply the sum of ``count`` gradients received from a peer to ``params`` in place."""
        ...
