"""DASGD with a staleness policy: what a user may want beside the faithful algorithm (outside the theory).

A receiver measures how stale a remote gradient is from the clock the message carries (the clock of the model
the gradient was computed on): the number of gradients the receiver holds that that model did not,

    s = sum_j max(0, clock_receiver[j] - clock_message[j]) - count        (its own ids excluded)

which is the receiver-side view of the paper's staleness. For a message that sums several coalesced
gradients the clock is the newest one's, so the older ones' staleness is underestimated.

- ``dasgd-cap``: a gradient with s above the bound is applied scaled by ``cap_scale`` (0: not at all);
  either way it is counted in the run summary.
- ``dasgd-damped``: every remote gradient is applied with stepsize eta / (1 + s / bound): full at s = 0,
  halved at s = bound.

Replicas still hold every gradient id, but weight them differently, so their parameters need not agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dasgd.algorithms.dasgd import DASGD
from dasgd.algorithms.effects import Effect, Step

if TYPE_CHECKING:
    from dasgd.core.message import Message

__all__ = ["DampedDASGD", "StalenessCappedDASGD", "receiver_staleness"]


def receiver_staleness(held: np.ndarray, msg: Message) -> int:
    """Gradients ``held`` by the receiver that the model behind ``msg`` lacked (0 without a clock)."""
    if msg.clock is None or len(msg.clock) != len(held):
        return 0
    return max(0, int(np.maximum(0, held - msg.clock).sum()) - msg.count)


class _StalenessAware(DASGD):
    faithful = False
    commutes = False  # each message's own staleness decides its step
    replicas = "ids"
    needs_clocks = True

    @property
    def bound(self) -> int:
        b = self.params.staleness_bound
        return b if b is not None else 2 * self.worker.world_size

    def _count(self, key: str, n: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + n


class StalenessCappedDASGD(_StalenessAware):
    """DASGD that scales (or drops) remote gradients staler than a bound."""

    name = "dasgd-cap"

    def on_gradient(self, msg: Message) -> list[Effect]:
        w = self.worker
        assert msg.payload is not None
        if receiver_staleness(w.clock, msg) <= self.bound:
            return [Step(msg.payload, w.lr)]
        self._count("capped", msg.count)
        if self.params.cap_scale > 0:
            return [Step(msg.payload, w.lr * self.params.cap_scale)]
        self._count("dropped", msg.count)
        return []


class DampedDASGD(_StalenessAware):
    """DASGD whose stepsize for a remote gradient shrinks with its staleness: eta / (1 + s / bound)."""

    name = "dasgd-damped"

    def on_gradient(self, msg: Message) -> list[Effect]:
        w = self.worker
        assert msg.payload is not None
        s = receiver_staleness(w.clock, msg)
        if s > self.bound:
            self._count("damped_below_half", msg.count)
        return [Step(msg.payload, w.lr / (1.0 + s / self.bound))]
