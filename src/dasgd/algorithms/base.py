"""The algorithm interface: what a worker does with its own gradients and with what arrives.

An algorithm is per-worker state plus a handful of hooks the Worker calls (``bind`` gives it a read-only view
of its worker). The worker keeps the mechanism every algorithm shares: message validation, exactly-once
bookkeeping of gradient ids, the vector clock, broadcast-tree forwarding, the end-of-run FINAL/STOP
handshake. The algorithm decides the math and the messaging pattern: apply at once and push (DASGD), wait for
a step's gradients and average (mini-batch SGD), push to a server and pull its model (parameter-server ASGD),
average models (Local SGD, gossip). It does so by returning effects (dasgd.algorithms.effects): the hooks
return what should happen, and the Worker carries it out. The runtime decides when things happen.
Algorithms hold no sockets, clocks or threads, so each one runs unchanged in real processes and in the
simulator.

Adding an algorithm is one file with a subclass of :class:`Algorithm` and one line in the registry
(``dasgd.algorithms``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import torch

from dasgd.algorithms.effects import Effect, Reject
from dasgd.errors import DasgdError

if TYPE_CHECKING:
    from dasgd.core.message import Message
    from dasgd.core.topology import Topology
    from dasgd.worker.worker import Gradient

__all__ = ["Algorithm", "AlgorithmError", "AlgorithmParams", "KeyedSums", "WorkerView"]


class WorkerView(Protocol):
    """What an algorithm may read of the worker it is bound to. Nothing here writes: changes go through the
    effects a hook returns. ``clock`` is a read-only array (writing it raises)."""

    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def topology(self) -> Topology: ...
    @property
    def lr(self) -> float: ...
    @property
    def grads_per_message(self) -> int: ...
    @property
    def computed(self) -> int:
        """Own gradients committed so far (the one being handed to ``on_own`` included)."""
        ...
    @property
    def stopped(self) -> bool:
        """The worker has finished computing (the end-of-run drain has begun)."""
        ...
    @property
    def clock(self) -> np.ndarray:
        """The replica's vector clock: ``clock[j]`` gradients of worker ``j`` are held (read-only)."""
        ...
    @property
    def dead(self) -> set[int]:
        """Origins declared dead."""
        ...
    def finals(self) -> dict[int, int]:
        """Final gradient counts announced so far, by origin."""
        ...
    def holds_every_final(self) -> bool:
        """Every live worker's final count is known and all their gradients are held."""
        ...


class AlgorithmError(DasgdError, ValueError):
    """The run's setup does not suit the algorithm (e.g. a topology it cannot use)."""


@dataclass(frozen=True)
class AlgorithmParams:
    """Settings some algorithms read (from the run spec); each algorithm ignores the others."""

    seed: int = 0
    """Seeds an algorithm's own choices (gossip's choice of partner); per worker it is mixed with the rank."""
    local_steps: int = 8
    """Local SGD: local steps between model averages (H)."""
    staleness_bound: int | None = None
    """dasgd-cap: the largest staleness applied in full; dasgd-damped: the staleness at which the stepsize is
    halved. None: twice the number of workers."""
    cap_scale: float = 0.0
    """dasgd-cap: the factor applied to a gradient staler than the bound (0: it is dropped)."""


class Algorithm:
    """Base of every algorithm: per-worker state and the hooks the worker calls.

    Class attributes describe the algorithm to the rest of the system (summaries, reports, the theory):
    ``faithful`` (inside the paper's theory), ``replicas`` (what the replicas hold at the end of a run:
    "all": every gradient, and equal parameters; "ids": every gradient id, weighted differently; "server":
    only the server holds every gradient; "none": models are averaged, no replica holds a gradient set),
    ``synchronous`` (it has a barrier).
    """

    name: ClassVar[str] = "base"
    faithful: ClassVar[bool] = False
    replicas: ClassVar[str] = "all"
    synchronous: ClassVar[bool] = False
    commutes: ClassVar[bool] = False
    """Remote gradients are applied as ``x -= eta * g`` whatever else arrived: a sum of several origins'
    gradients may be applied at once by the Worker (the simulator's bundles), with the same result up to rounding."""
    needs_clocks: ClassVar[bool] = False
    """Messages must carry vector clocks (the algorithm reads them)."""
    coalesce_gradients: ClassVar[bool] = True
    """Transports may sum queued contiguous gradients of one origin (False: every message stays separate)."""
    takes_gradients: ClassVar[bool] = True
    """Remote GRADIENT messages are part of the algorithm (False: the worker refuses them as
    ``unexpected_gradient`` before recording their ids, so a stray or forged one changes nothing)."""
    single_gradient_messages: ClassVar[bool] = False
    """The algorithm needs one gradient per message (it rejects grads_per_message > 1)."""

    def __init__(self, params: AlgorithmParams | None = None) -> None:
        self.params = params if params is not None else AlgorithmParams()
        self._worker: WorkerView | None = None
        self.counts: dict[str, int] = {}
        """Algorithm-specific counters reported in the run summary (e.g. gradients capped)."""

    # -- wiring -----------------------------------------------------------------------------------------
    @property
    def worker(self) -> WorkerView:
        """The bound worker, read-only."""
        if self._worker is None:
            raise RuntimeError(f"algorithm {self.name!r} is not bound to a worker")
        return self._worker

    def bind(self, worker: WorkerView) -> None:
        """Attach to ``worker`` (called once, by the worker's constructor, with a read-only view)."""
        if self._worker is not None:
            raise RuntimeError(f"algorithm {self.name!r} is bound already; make one instance per worker")
        self.check(worker.world_size, worker.topology, worker.grads_per_message)
        self._worker = worker

    def check(self, world_size: int, topology: Topology, grads_per_message: int) -> None:
        """Raise AlgorithmError when the setup does not suit the algorithm."""
        if self.single_gradient_messages and grads_per_message != 1:
            raise AlgorithmError(
                f"{self.name} sends one gradient per message; drop --grads-per-message (got {grads_per_message})"
            )

    def require_complete(self, world_size: int, topology: Topology, why: str) -> None:
        """Raise AlgorithmError unless ``topology`` connects every pair of workers (``why``: the reason)."""
        if len(topology.edges) != world_size * (world_size - 1) // 2:
            raise AlgorithmError(f"{self.name} {why}; use --topology complete")

    # -- the hooks --------------------------------------------------------------------------------------
    def computes(self) -> bool:
        """Whether this worker computes gradients at all (a parameter server does not)."""
        return True

    def ready(self) -> bool:
        """Whether the worker may start its next gradient now (False while it waits on a peer)."""
        return True

    def on_peer_dead(self, origin: int) -> list[Effect]:
        """Worker ``origin`` was declared dead (it is in ``worker.dead`` now): an algorithm that waits on every
        live worker looks again, since what it waited for may be complete without the dead one."""
        return []

    def stranded(self) -> str:
        """Why this worker can never make progress again (a peer it depends on died), or "" while it can.

        A non-empty answer stops the worker with that stop reason, instead of leaving it waiting for the time
        budget (or forever, in virtual time). The default: an algorithm that depends on no one peer.
        """
        return ""

    def on_own(self, gradient: Gradient, index: int) -> list[Effect]:
        """The worker's own gradient number ``index`` is complete: apply it and/or send it."""
        raise NotImplementedError

    def on_gradient(self, msg: Message) -> list[Effect]:
        """A remote gradient message was accepted (its ids are already recorded as held). Only called when
        ``takes_gradients`` is true."""
        raise NotImplementedError(f"{self.name} takes gradients but does not define on_gradient")

    def on_model(self, msg: Message) -> list[Effect]:
        """A MODEL message was accepted (sender and shape checked)."""
        return [Reject("unexpected_model")]

    def on_model_shared(self, msg: Message) -> list[Effect]:
        """The worker sent ``msg``, a copy of its replica, as a :class:`ShareModel` effect asked."""
        return []

    def complete(self) -> bool:
        """Whether the end-of-run drain is complete for this worker (after it finished)."""
        return self.worker.holds_every_final()

    def on_complete(self) -> list[Effect]:
        """Called once when the drain is complete (e.g. to apply a last partial synchronous step)."""
        return []

    # -- checkpoints ------------------------------------------------------------------------------------
    not_resumable: ClassVar[str] = (
        "its state between messages (partial sums, rounds, pending replies) is not saved by a checkpoint"
    )
    """Why a checkpoint of this algorithm is refused ("" for an algorithm whose state it saves)."""

    def checkpoint_state(self) -> dict:
        """The algorithm's state beyond the worker's, as JSON-able data, for a checkpoint (worker/checkpoint.py).

        Raises AlgorithmError for an algorithm that cannot be resumed (``not_resumable`` says why)."""
        if self.not_resumable:
            raise AlgorithmError(f"{self.name} cannot be checkpointed: {self.not_resumable}")
        return {"counts": dict(self.counts)}

    def restore_state(self, state: dict) -> None:
        """Take back what :meth:`checkpoint_state` returned."""
        if self.not_resumable:
            raise AlgorithmError(f"{self.name} cannot be resumed: {self.not_resumable}")
        self.counts = {str(k): int(v) for k, v in state.get("counts", {}).items()}


class KeyedSums:
    """Running sums of vectors by key (a step or a round), each with the origins that contributed.

    What the synchronous baselines collect until every live worker's contribution to a step is in. A step is
    complete when it holds the part of every live worker, never merely as many parts as there are live
    workers: a dead worker's part that arrived before its death must not stand in for a live worker's.
    """

    def __init__(self) -> None:
        self._sums: dict[int, torch.Tensor] = {}
        self._origins: dict[int, set[int]] = {}

    def add(self, key: int, vector: torch.Tensor, origin: int) -> bool:
        """Add ``origin``'s ``vector`` to the sum of ``key`` (copied: callers' tensors are never changed).
        False, and nothing added, if ``origin`` already contributed to ``key``."""
        origins = self._origins.setdefault(key, set())
        if origin in origins:
            return False
        origins.add(origin)
        if key in self._sums:
            self._sums[key].add_(vector)
        else:
            self._sums[key] = vector.detach().clone()
        return True

    def count(self, key: int) -> int:
        """How many vectors the sum of ``key`` holds (0 if none)."""
        return len(self._origins.get(key, ()))

    def holds_all(self, key: int, origins: set[int]) -> bool:
        """Whether every one of ``origins`` contributed to ``key``."""
        return origins <= self._origins.get(key, set())

    def pop(self, key: int) -> tuple[torch.Tensor, int]:
        """Remove and return the sum of ``key`` and its count."""
        return self._sums.pop(key), len(self._origins.pop(key))

    def keys(self) -> list[int]:
        """The keys held, in increasing order."""
        return sorted(self._sums)
