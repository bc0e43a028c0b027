"""Asynchronous gossip averaging in the style of AD-PSGD (Lian et al., 2018).

    each step:  x_i <- x_i - eta * g_i                       (own gradient, at once)
                unless an exchange is open: pick a random neighbour j, send it x_i
    on a request from i:  reply with x_j;  x_j <- (x_j + x_i) / 2
    on the reply:         x_i <- (x_i + x_j) / 2

Nobody waits: a worker goes on computing while its exchange is in flight (AD-PSGD's averaging is atomic; here
the requester averages with the partner's model as it was when the partner answered, which is the same pair
average up to the requester's own steps taken meanwhile). At most one exchange per worker is open; it is
given up when the partner announces it has stopped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dasgd.algorithms.base import Algorithm
from dasgd.algorithms.effects import AverageModel, Effect, MergeClock, Reject, ShareModel, Step

if TYPE_CHECKING:
    from dasgd.core.message import Message
    from dasgd.worker.worker import Gradient

__all__ = ["GossipAveraging"]

_REQUEST, _REPLY = 0, 1  # the MODEL message's `lo` field


class GossipAveraging(Algorithm):
    """Pairwise model averaging with one random neighbour at a time, without waiting."""

    not_resumable = "the pending exchange with a partner and its random stream are not saved"

    name = "gossip"
    replicas = "none"
    needs_clocks = True
    takes_gradients = False  # models travel, gradients never do

    def bind(self, worker) -> None:  # noqa: ANN001
        super().bind(worker)
        self._rng = np.random.default_rng([self.params.seed, 11, worker.rank])
        self._neighbours = worker.topology.neighbors(worker.rank)
        self._partner: int | None = None

    def on_own(self, gradient: Gradient, index: int) -> list[Effect]:
        w = self.worker
        step = Step(gradient.grad, w.lr)
        if self._partner is not None and self._partner in w.finals():
            self._partner = None  # it stopped before answering
        if self._partner is not None or not self._neighbours:
            return [step]
        self._partner = int(self._neighbours[int(self._rng.integers(len(self._neighbours)))])
        self.counts["exchanges"] = self.counts.get("exchanges", 0) + 1
        return [step, ShareModel((self._partner,), _REQUEST, _REQUEST)]

    def on_model(self, msg: Message) -> list[Effect]:
        if msg.lo == _REQUEST:
            # The reply is this replica as it was before it averaged with the requester's.
            return [ShareModel((msg.origin,), _REPLY, _REPLY), *self._average(msg)]
        if msg.lo == _REPLY and msg.origin == self._partner:
            self._partner = None
            return self._average(msg)
        return [Reject("unexpected_model")]

    def complete(self) -> bool:
        return self.worker.stopped

    def _average(self, msg: Message) -> list[Effect]:
        assert msg.payload is not None  # checked by the worker
        return [AverageModel(msg.payload), MergeClock(msg.clock)]
