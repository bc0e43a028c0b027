"""Local SGD: each worker takes H local SGD steps, then all workers average their models.

    repeat:  H times  x_i <- x_i - eta * g_i        (no communication)
             x_i <- (1/n) sum_j x_j                  (every worker sends its model to all, waits for theirs)

The averaging round is a barrier (the method is synchronous every H steps). Models travel as MODEL messages
whose id range names the round, so a fast worker's model for the next round can arrive early and wait.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dasgd.algorithms.base import Algorithm, AlgorithmError, KeyedSums
from dasgd.algorithms.effects import Effect, MergeClock, Reject, SetModel, ShareModel, Step

if TYPE_CHECKING:
    from dasgd.core.message import Message
    from dasgd.core.topology import Topology
    from dasgd.worker.worker import Gradient

__all__ = ["LocalSGD"]


class LocalSGD(Algorithm):
    """Periodic model averaging over all workers every ``local_steps`` (H) own steps."""

    not_resumable = "the sums of models received for the current averaging round are not saved"

    name = "local-sgd"
    replicas = "none"
    synchronous = True
    needs_clocks = True
    takes_gradients = False  # models travel, gradients never do

    def bind(self, worker) -> None:  # noqa: ANN001
        super().bind(worker)
        self._models = KeyedSums()  # round -> sum of the models received for it
        self._rounds = 0  # averaging rounds completed

    def check(self, world_size: int, topology: Topology, grads_per_message: int) -> None:
        super().check(world_size, topology, grads_per_message)
        if self.params.local_steps < 1:
            raise AlgorithmError(f"local steps H must be at least 1, got {self.params.local_steps}")
        self.require_complete(world_size, topology, "averages over every worker")

    @property
    def local_steps(self) -> int:
        return self.params.local_steps

    def ready(self) -> bool:
        return self._rounds >= self.worker.computed // self.local_steps

    def on_own(self, gradient: Gradient, index: int) -> list[Effect]:
        w = self.worker
        step = Step(gradient.grad, w.lr)
        if w.computed % self.local_steps:
            return [step]
        rnd = w.computed // self.local_steps - 1
        # The model after this step goes to every peer; on_model_shared counts the same copy for this worker.
        return [step, ShareModel(w.topology.neighbors(w.rank), rnd, rnd + 1)]

    def on_model_shared(self, msg: Message) -> list[Effect]:
        assert msg.payload is not None
        self._models.add(msg.lo, msg.payload, self.worker.rank)
        return self._advance()

    def on_model(self, msg: Message) -> list[Effect]:
        assert msg.payload is not None  # checked by the worker
        if msg.lo < self._rounds or not self._models.add(msg.lo, msg.payload, msg.origin):
            # A round already averaged, or a second model from one origin for a round: refused and counted.
            return [Reject("late_round" if msg.lo < self._rounds else "duplicate_round")]
        return [MergeClock(msg.clock), *self._advance()]

    def complete(self) -> bool:
        return self.worker.stopped

    def on_peer_dead(self, origin: int) -> list[Effect]:
        return self._advance()  # the step may now hold every live worker's part

    def _advance(self) -> list[Effect]:
        """The average of every round now complete, in round order."""
        w = self.worker
        live = set(range(w.world_size)) - w.dead
        averages: list[Effect] = []
        while self._models.holds_all(self._rounds, live):
            # Divide by the models actually summed: a dead worker's model for this round may have arrived
            # before it died (then there are live + 1 of them).
            total, count = self._models.pop(self._rounds)
            averages.append(SetModel(total.div_(count)))
            self._rounds += 1
        return averages
