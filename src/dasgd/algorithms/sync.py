"""Synchronous mini-batch SGD: every step, each worker's gradient is averaged over all workers (as DDP does).

    for step k:  g_i <- gradient at x on worker i's next mini-batch
                 x <- x - eta * (1/n) sum_i g_i          (the same on every replica)

Built from the same parts as DASGD: each worker pushes its step-k gradient (gradient id k) to every peer and
waits until it holds step k of every live worker; then it applies the mean of the parts it holds. Waiting is the barrier that
makes this the baseline: a straggler stalls everyone. The transports must not sum two steps of one origin
into one message here (``coalesce_gradients = False``), so every message is exactly one step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dasgd.algorithms.base import Algorithm, KeyedSums
from dasgd.algorithms.effects import Effect, PushGradient, Reject, Step

if TYPE_CHECKING:
    from dasgd.core.message import Message
    from dasgd.core.topology import Topology
    from dasgd.worker.worker import Gradient

__all__ = ["SynchronousSGD"]


class SynchronousSGD(Algorithm):
    """Mini-batch SGD with an all-gather of gradients each step: every replica takes the same steps."""

    not_resumable = "the per-step sums of gradients received ahead of the barrier are not saved"

    name = "sync"
    synchronous = True
    coalesce_gradients = False
    single_gradient_messages = True

    def bind(self, worker) -> None:  # noqa: ANN001 (the Worker type lives above this layer)
        super().bind(worker)
        self._steps = KeyedSums()  # step -> sum of its gradients received so far
        self._applied_steps = 0

    def check(self, world_size: int, topology: Topology, grads_per_message: int) -> None:
        super().check(world_size, topology, grads_per_message)
        self.require_complete(world_size, topology, "averages over every worker each step")

    def ready(self) -> bool:
        # The next step starts only when every step computed so far has been averaged in.
        return self._applied_steps >= self.worker.computed

    def on_own(self, gradient: Gradient, index: int) -> list[Effect]:
        self._steps.add(index, gradient.grad, self.worker.rank)
        return [PushGradient(index, gradient), *self._advance()]

    def on_gradient(self, msg: Message) -> list[Effect]:
        assert msg.payload is not None  # checked by the worker
        if msg.count != 1:
            # Peers never merge steps here; a merged message can only come from a misconfigured peer.
            self.counts["merged_steps"] = self.counts.get("merged_steps", 0) + msg.count
        if msg.lo < self._applied_steps or not self._steps.add(msg.lo, msg.payload, msg.origin):
            # A step already averaged (every live worker's part was in), or a second part from one origin:
            # adding it would change no replica consistently, so it is refused and counted.
            return [Reject("late_step" if msg.lo < self._applied_steps else "duplicate_step")]
        return self._advance()

    def on_complete(self) -> list[Effect]:
        # Steps left incomplete when the run stopped (some workers computed one more step than others): every
        # replica holds the same gradients now, so each applies their mean and the replicas still agree.
        steps: list[Effect] = []
        for step in self._steps.keys():
            total, count = self._steps.pop(step)
            steps.append(Step(total, self.worker.lr / count))
        return steps

    def on_peer_dead(self, origin: int) -> list[Effect]:
        return self._advance()  # the step may now hold every live worker's part

    def _advance(self) -> list[Effect]:
        """The mean of every step now complete, in step order."""
        w = self.worker
        live = set(range(w.world_size)) - w.dead
        steps: list[Effect] = []
        while self._steps.holds_all(self._applied_steps, live):
            total, count = self._steps.pop(self._applied_steps)
            # Average, as DDP does: divide the summed step by the number of contributions (the live workers',
            # plus a dead worker's if its gradient for this step arrived before it died).
            steps.append(Step(total, w.lr / count))
            self._applied_steps += 1
        return steps
