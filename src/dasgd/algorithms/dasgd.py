"""DASGD (Tosi and Theobald, 2023): apply every gradient, own or remote, with the same fixed stepsize.

    x <- x - eta * g      for the own gradient, at once
    x <- x - eta * g_r    for every remote gradient, whenever it arrives (stale)

Updates commute, so a replica is fully described by the set of gradients applied to it, and a coalesced sum
of remote gradients is applied exactly like its parts (``count`` does not change the math).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DASGD"]


@dataclass(frozen=True)
class DASGD:
    """The faithful algorithm: plain fixed-stepsize SGD on every gradient."""

    name: str = "dasgd"
    faithful: bool = True

    def local_update(self, params: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        params.add_(grad, alpha=-lr)

    def remote_update(self, params: torch.Tensor, grad_sum: torch.Tensor, lr: float, count: int) -> None:
        params.add_(grad_sum, alpha=-lr)
