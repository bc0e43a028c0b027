"""Parameter-server ASGD: one server holds the model; workers pull it, compute, push, pull again.

    worker i:  g <- gradient at the model it last pulled;  push g to the server;  wait for the reply
    server:    for each gradient as it arrives:  x <- x - eta * g;  reply with x to the gradient's sender

Built from the same parts as DASGD: rank 0 plays the server (it computes no gradients and evaluates the
model); gradients are the same GRADIENT messages, so the server's bookkeeping is exactly-once per id, and the
reply is a MODEL message carrying the server's clock, so the staleness ledger measures a worker's gradient
against the server model it was computed on, in the same units as DASGD.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dasgd.algorithms.base import Algorithm, AlgorithmError

if TYPE_CHECKING:
    from dasgd.core.message import Message
    from dasgd.core.topology import Topology
    from dasgd.worker.worker import Gradient, Outgoing

__all__ = ["ParameterServerASGD"]

SERVER = 0
"""The server's rank."""


class ParameterServerASGD(Algorithm):
    """Asynchronous SGD through a central server (rank 0); workers 1..n-1 compute."""

    name = "ps-asgd"
    replicas = "server"
    single_gradient_messages = True
    needs_clocks = True

    def bind(self, worker) -> None:  # noqa: ANN001
        super().bind(worker)
        self._awaiting = False

    def check(self, world_size: int, topology: Topology, grads_per_message: int) -> None:
        super().check(world_size, topology, grads_per_message)
        if world_size < 2:
            raise AlgorithmError("ps-asgd needs a server and at least one worker: use --workers 2 or more")
        self.require_complete(world_size, topology, "connects every worker to the server")

    @property
    def is_server(self) -> bool:
        return self.worker.rank == SERVER

    def computes(self) -> bool:
        return not self.is_server

    def ready(self) -> bool:
        return not self.is_server and not self._awaiting

    def on_own(self, gradient: Gradient, index: int) -> list[Outgoing]:
        self._awaiting = True  # the own gradient is applied by the server; its reply brings it back
        return self.worker.push_gradient(index, gradient, peers=(SERVER,))

    def on_gradient(self, msg: Message) -> list[Outgoing]:
        w = self.worker
        if not self.is_server:
            w.rejected["not_server"] += 1
            return []
        assert msg.payload is not None  # checked by the worker
        w.apply_step(msg.payload, w.lr)
        return [(msg.origin, self.model_message(msg.hi, msg.hi))]

    def on_model(self, msg: Message) -> list[Outgoing]:
        w = self.worker
        if self.is_server or msg.origin != SERVER:
            w.rejected["unexpected_model"] += 1
            return []
        assert msg.payload is not None
        w.apply_model(msg.payload)
        # The pulled model's gradient set is the server's; it holds every gradient this worker pushed.
        w.adopt_clock(msg.clock)
        self._awaiting = False
        return []

    def complete(self) -> bool:
        # Only the server must hold every gradient; a worker is done once it stopped.
        return self.worker.holds_every_final() if self.is_server else self.worker.stopped
