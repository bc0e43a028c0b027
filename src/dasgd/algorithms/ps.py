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
from dasgd.algorithms.effects import AdoptClock, Effect, PushGradient, Reject, SetModel, ShareModel, Step

if TYPE_CHECKING:
    from dasgd.core.message import Message
    from dasgd.core.topology import Topology
    from dasgd.worker.worker import Gradient

__all__ = ["ParameterServerASGD"]

SERVER = 0
"""The server's rank."""


class ParameterServerASGD(Algorithm):
    """Asynchronous SGD through a central server (rank 0); workers 1..n-1 compute."""

    not_resumable = "a client waiting for the server's reply (a MODEL message) is not saved"

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

    def stranded(self) -> str:
        dead = self.worker.dead
        if self.is_server:
            # Every client died: no gradient will ever come, and the server computes none itself.
            return "no_clients" if len(dead) == self.worker.world_size - 1 else ""
        # The model lives on the server alone: without it a client has nothing to pull or push to.
        return "server_died" if SERVER in dead else ""

    def on_own(self, gradient: Gradient, index: int) -> list[Effect]:
        self._awaiting = True  # the own gradient is applied by the server; its reply brings it back
        return [PushGradient(index, gradient, peers=(SERVER,))]

    def on_gradient(self, msg: Message) -> list[Effect]:
        if not self.is_server:
            return [Reject("not_server")]
        assert msg.payload is not None  # checked by the worker
        # The reply is the model after this gradient, tagged with the count it answers.
        return [Step(msg.payload, self.worker.lr), ShareModel((msg.origin,), msg.hi, msg.hi)]

    def on_model(self, msg: Message) -> list[Effect]:
        if self.is_server or msg.origin != SERVER:
            return [Reject("unexpected_model")]
        assert msg.payload is not None
        self._awaiting = False
        # The pulled model's gradient set is the server's; it holds every gradient this worker pushed.
        return [SetModel(msg.payload), AdoptClock(msg.clock)]

    def complete(self) -> bool:
        # Only the server must hold every gradient; a worker is done once it stopped.
        return self.worker.holds_every_final() if self.is_server else self.worker.stopped
