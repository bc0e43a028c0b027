"""DASGD (Tosi and Theobald, 2023): apply every gradient, own or remote, with the same fixed stepsize.

    x <- x - eta * g      for the own gradient, at once; then push g to the peers
    x <- x - eta * g_r    for every remote gradient, whenever it arrives (stale)

Updates commute, so a replica is fully described by the set of gradients applied to it, and a coalesced sum
of remote gradients is applied exactly like its parts (``count`` does not change the math).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dasgd.algorithms.base import Algorithm
from dasgd.algorithms.effects import Effect, PushGradient, Step

if TYPE_CHECKING:
    from dasgd.core.message import Message
    from dasgd.worker.worker import Gradient

__all__ = ["DASGD"]


class DASGD(Algorithm):
    """The faithful algorithm: plain fixed-stepsize SGD on every gradient, no waiting."""

    name = "dasgd"
    faithful = True
    commutes = True
    not_resumable = ""  # stateless beyond the worker (its replica, clock and counts)

    def on_own(self, gradient: Gradient, index: int) -> list[Effect]:
        return [Step(gradient.grad, self.worker.lr), PushGradient(index, gradient)]

    def on_gradient(self, msg: Message) -> list[Effect]:
        assert msg.payload is not None  # checked by the worker
        return [Step(msg.payload, self.worker.lr)]
