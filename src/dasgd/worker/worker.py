"""One worker: a replica, its vector clock, and the step-level operations on them.

The worker is pure mechanism: no threads, no sockets, no clocks, no loop. The real-time runtime,
the simulator and the PyTorch wrapper all drive it through the same operations:

- ``receive(messages)``: hand arrived gradients (each exactly once) and models to the algorithm, note control
  signals, and return what must be sent: copies to forward along the broadcast trees of a sparse topology,
  and the algorithm's replies;
- ``ready``: whether the algorithm lets the worker start a gradient now (always, for DASGD);
- ``compute()``: a stochastic gradient at the current replica, with the vector clock at its start;
- ``commit(gradient)``: hand the own gradient to the algorithm (DASGD applies it at once) and return the
  messages that push it;
- ``finish()``: stop computing and announce the final gradient count (the start of the end-of-run drain);
- ``complete``: whether the drain is over for this worker.

What happens to a gradient or a model is the algorithm's business (dasgd.algorithms); the worker keeps what
every algorithm shares.

The vector clock ``clock[j]`` is how many of worker ``j``'s gradients the replica holds (a contiguous prefix
of ``j``'s ids, since links are FIFO and each origin's messages follow one tree path). It is what the
staleness ledger needs, recorded at the start of each gradient computation.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from dasgd.algorithms.base import Algorithm
from dasgd.algorithms.effects import (
    AdoptClock,
    AverageModel,
    Effect,
    MergeClock,
    PushGradient,
    Reject,
    SetModel,
    ShareModel,
    Step,
)
from dasgd.core.gradset import GradientSet
from dasgd.core.message import MAX_GRADIENT_ID, MAX_GRADIENTS_PER_MESSAGE, Kind, Message
from dasgd.core.topology import SurvivorRoutes, Topology
from dasgd.errors import DasgdError
from dasgd.worker.audit import AuditTrail
from dasgd.worker.replica import all_finite, flat_grad, flatten_parameters

__all__ = ["AlgorithmEffectError", "Gradient", "Outgoing", "Worker"]

Outgoing = tuple[int, Message]
"""A message and the peer it must be sent to."""


class AlgorithmEffectError(DasgdError, RuntimeError):
    """An algorithm asked for something the worker must not do (a bug in the plug-in, not in the run)."""


class ArrivalBundle(Protocol):
    """Messages of several origins handed over at once, gradients summed (the simulator's GradientBundle,
    sim/bundles.py): what :meth:`Worker.receive` reads of one. It never crosses a process boundary."""

    origin: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    payload: torch.Tensor | None
    final_origin: np.ndarray
    final_count: np.ndarray
    stop: bool
    expand: Callable[[], list[Message]]


@dataclass(frozen=True)
class Gradient:
    """One computed stochastic gradient, not yet applied."""

    grad: torch.Tensor
    """Flat gradient vector (a fresh tensor, never modified later)."""
    clock: np.ndarray
    """The worker's vector clock when the computation started."""
    loss: float
    """Mini-batch loss at the replica the gradient was computed on."""


class Worker:
    """One replica and the bookkeeping that makes every gradient land exactly once on it.

    Args:
        rank: this worker's id in ``[0, world_size)``.
        world_size: number of workers.
        model: the replica; its parameters are moved into one flat vector (see replica.py).
        topology: the communication graph; messages follow each origin's broadcast tree.
        algorithm: the update rule.
        lr: the fixed stepsize eta.
        loss_fn: ``loss_fn(model) -> scalar`` computing the mini-batch loss on the next batch; None when the
            gradients come from outside (the PyTorch wrapper calls ``commit_external``).
        grads_per_message: TensAIR's B: own gradients summed into one message (1 is the theory's setting).
        send_clock: attach the vector clock to outgoing messages (costs world_size * 8 bytes each).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        model: nn.Module,
        topology: Topology,
        algorithm: Algorithm,
        lr: float,
        loss_fn=None,
        grads_per_message: int = 1,
        send_clock: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        if topology.n != world_size:
            raise ValueError(f"topology has {topology.n} nodes but the run has {world_size} workers")
        if grads_per_message < 1:
            raise ValueError(f"grads_per_message must be at least 1, got {grads_per_message}")
        self.rank = rank
        self.world_size = world_size
        self.model = model
        self.params = flatten_parameters(model)
        self.topology = topology
        self.algorithm = algorithm
        self.lr = lr
        self.loss_fn = loss_fn
        self.grads_per_message = grads_per_message
        self.send_clock = send_clock or algorithm.needs_clocks
        self.clock = np.zeros(world_size, dtype=np.int64)
        # Per-origin state is kept compact (a few ints per origin) because the simulator runs thousands of
        # workers: the clock is the contiguous prefix of each origin's ids held; only an origin whose ids
        # arrived with a gap (a fault or a reordering path) gets a full GradientSet until the gap closes.
        self._gaps: dict[int, GradientSet] = {}
        self._finals = np.full(world_size, -1, dtype=np.int64)
        self._dead = np.zeros(world_size, dtype=bool)
        # On a complete graph: every other worker, as a view (a tuple would hold world_size ints per worker).
        self._own_children: Sequence[int] = (
            _AllBut(world_size, rank)
            if len(topology.edges) == world_size * (world_size - 1) // 2
            else topology.children(rank, rank)
        )
        self._complete = len(topology.edges) == world_size * (world_size - 1) // 2
        # The broadcast trees in use: the topology's, until a worker dies on a sparse graph; then the trees
        # of the survivors (declare_dead), so gradients still reach every survivor it can reach.
        self._routes: Topology | SurvivorRoutes = topology
        self._unreachable = np.zeros(world_size, dtype=bool)
        self._pending: torch.Tensor | None = None  # own gradients not yet sent (B > 1)
        self._pending_lo = 0
        self.computed = 0
        self.stopped = False
        self.stop_requested = False
        self.rejected: Counter[str] = Counter()
        self.non_finite_origins: Counter[int] = Counter()
        """Origins whose messages carried a NaN or infinity (refused), with how many such messages."""
        self.diverged = False
        """This worker computed a non-finite gradient (its replica diverged): it stops, reason "diverged"."""
        self._completed = False
        self.audit: AuditTrail | None = None
        """The replica's audit trail, when :meth:`start_audit` was called (tests and ``--audit`` runs)."""
        algorithm.bind(_ReadOnlyWorker(self))

    def start_audit(self, folder: Path) -> AuditTrail:
        """Record this replica's history from now on for an independent check (see worker/audit.py)."""
        if self.computed or self.applied:
            raise RuntimeError("start the audit before the first gradient, so it sees the whole history")
        self.audit = AuditTrail(folder, self.rank, self.params)
        return self.audit

    def save_audit(self) -> None:
        """Write the audit trail with the final replica and what a checker needs to know of the setup."""
        if self.audit is None:
            raise RuntimeError("no audit was started on this worker; call start_audit() first")
        settings = dataclasses.asdict(self.algorithm.params)
        self.audit.save(
            self.params,
            {
                "algorithm": self.algorithm.name,
                "world_size": self.world_size,
                "lr": self.lr,
                "grads_per_message": self.grads_per_message,
                "dead": sorted(self.dead),
                **settings,
            },
        )

    # -- state ---------------------------------------------------------------------------------------
    @property
    def applied(self) -> int:
        """Gradients the replica holds (own ones included), those beyond a gap too."""
        total = int(self.clock.sum())
        for origin, ids in self._gaps.items():
            total += len(ids) - int(self.clock[origin])
        return total

    @property
    def has_gaps(self) -> bool:
        """Some origin's ids are held past a gap (the clock then undercounts what the replica holds)."""
        return bool(self._gaps)

    def held(self) -> np.ndarray:
        """How many gradients of each origin the replica holds: the clock, except where ids arrived past a
        gap (a reordering, or gradients lost through a dead forwarder), where it counts every id held."""
        counts = self.clock.copy()
        for origin, ids in self._gaps.items():
            counts[origin] = len(ids)
        return counts

    @property
    def computes(self) -> bool:
        """Whether this worker computes gradients at all (a parameter server does not)."""
        return self.algorithm.computes()

    @property
    def ready(self) -> bool:
        """Whether a gradient may be started now (the algorithm may be waiting on peers)."""
        return not self.stopped and self.algorithm.ready()

    @property
    def stranded(self) -> str:
        """Why this worker can never make progress again (the algorithm's answer), or "" while it can."""
        return self.algorithm.stranded()

    @property
    def complete(self) -> bool:
        """The end-of-run drain is over for this worker (the algorithm's rule; by default
        :meth:`holds_every_final`). The first time it holds, the algorithm's ``on_complete`` runs."""
        if self._completed:
            return True
        if not self.algorithm.complete():
            return False
        self._completed = True
        if self._carry_out(self.algorithm.on_complete()):
            raise AlgorithmEffectError(
                f"{self.algorithm.name}.on_complete asked to send messages after the drain; it may only change "
                "the replica (Step, SetModel, AverageModel)"
            )
        return True

    def holds_every_final(self) -> bool:
        """Every live worker's final count is known and every one of their gradients is held."""
        live = ~self._dead & ~self._unreachable
        if not (self._finals[live] >= 0).all():
            return False
        if self._routes is not self.topology:
            # Routed around a dead forwarder: what a live origin sent through it before the trees changed
            # never arrives, and links are FIFO, so its FINAL (sent last, on the new tree) means the rest
            # is in. The ids that fell into the gap are reported as lost by the summary.
            return True
        if not (self.clock[live] == self._finals[live]).all():
            return False
        return not any(live[o] for o in self._gaps)

    def declare_dead(self, origin: int) -> list[Outgoing]:
        """Stop waiting for ``origin`` (its process died) and, on a sparse topology, route around it.

        What this replica holds of the dead worker's gradients stays applied; gradients that reached some
        replicas and not others are reported as lost by the run summary. On a sparse graph the broadcast
        trees are recomputed without the dead (:class:`SurvivorRoutes`), and the death is announced to the
        live neighbours (returned DEAD messages), so survivors that never had a link to the dead worker learn
        it too. Survivors the dead cut off from this one are not waited for either (``unreachable``).
        """
        if not 0 <= origin < self.world_size or origin == self.rank or self._dead[origin]:
            return []
        self._dead[origin] = True
        # A barrier waiting on the dead worker's step may be complete over the live workers now.
        out = self._carry_out(self.algorithm.on_peer_dead(origin))
        if self._complete:
            return out  # every survivor has a direct link to every other: nothing to route around
        routes = SurvivorRoutes(self.topology, frozenset(self.dead))
        self._routes = routes
        self._own_children = routes.children(self.rank, self.rank)
        self._unreachable[:] = True
        self._unreachable[list(routes.reachable(self.rank))] = False
        self._unreachable[self._dead] = False
        notice = Message(Kind.DEAD, self.rank, origin, 0, 0)
        return out + [(peer, notice) for peer in self.topology.neighbors(self.rank) if not self._dead[peer]]

    @property
    def unreachable(self) -> set[int]:
        """Live workers this one can no longer reach: the dead cut the topology between them."""
        return {int(o) for o in np.flatnonzero(self._unreachable)}

    @property
    def dead(self) -> set[int]:
        """Origins declared dead."""
        return {int(o) for o in np.flatnonzero(self._dead)}

    def finals(self) -> dict[int, int]:
        """Final gradient counts announced so far, by origin."""
        return {int(o): int(self._finals[o]) for o in np.flatnonzero(self._finals >= 0)}

    # -- the four operations -------------------------------------------------------------------------
    def receive(self, messages: Sequence[Message | ArrivalBundle]) -> list[Outgoing]:
        """Apply arrived messages; return what must be forwarded. Invalid or duplicate ones are counted."""
        forward: list[Outgoing] = []
        for raw in messages:
            if not isinstance(raw, Message):
                forward.extend(self._receive_bundle(raw))
                continue
            if raw.kind == Kind.MARKER:
                continue  # a checkpoint marker is the protocol's (worker/protocol.py), never the replica's
            msg = self._accept(raw)
            if msg is None:
                continue
            audit = self.audit
            if msg.kind == Kind.GRADIENT:
                if audit is not None:
                    audit.gradient(msg, self.clock)
                self._hold(msg.origin, msg.lo, msg.hi)
                out = self._carry_out(self.algorithm.on_gradient(msg))
                if audit is not None:
                    audit.sent(out)
                forward.extend(out)
            elif msg.kind == Kind.MODEL:
                rejected = sum(self.rejected.values())
                out = self._carry_out(self.algorithm.on_model(msg))
                if audit is not None:
                    # A reply is built from the replica before the model is merged: record it first.
                    audit.sent(out)
                    audit.model(msg, used=sum(self.rejected.values()) == rejected)
                forward.extend(out)
                continue  # models go point to point, never along a broadcast tree
            elif msg.kind == Kind.FINAL:
                if self._finals[msg.origin] >= 0:
                    self.rejected[
                        "duplicate" if self._finals[msg.origin] == msg.hi else "conflicting_final"
                    ] += 1
                    continue
                self._finals[msg.origin] = msg.hi
            elif msg.kind == Kind.STOP:
                self.stop_requested = True
            elif msg.kind == Kind.DEAD:
                # Flooded: each survivor announces it once, to every live neighbour but the one that told it.
                forward.extend((p, m) for p, m in self.declare_dead(msg.origin) if p != msg.sender)
                continue
            else:
                continue  # SHUTDOWN is for the transport
            if self._complete:
                continue  # on a complete graph every origin reaches everyone directly: nothing to forward
            children = self._routes.children(msg.origin, self.rank)
            if children:
                fwd = msg.forwarded_by(self.rank)
                forward.extend((c, fwd) for c in children)
        return forward

    def compute(self) -> Gradient:
        """A stochastic gradient on the next mini-batch at the current replica (not applied)."""
        if self.loss_fn is None:
            raise RuntimeError(
                "this worker has no loss function; use commit_external() with your own gradients"
            )
        if self.stopped:
            raise RuntimeError("the worker has finished; it computes no more gradients")
        if not self.computes:
            raise RuntimeError(f"worker {self.rank} computes no gradients under {self.algorithm.name}")
        clock = self.clock.copy()
        self.model.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model)
        loss.backward()
        return Gradient(flat_grad(self.model, self.params), clock, float(loss.detach()))

    def commit(self, gradient: Gradient) -> list[Outgoing]:
        """Hand the own gradient to the algorithm (DASGD applies it at once); return the messages to send."""
        if self.stopped:
            raise RuntimeError("the worker has finished; it accepts no more gradients")
        index = self.computed
        self.computed += 1
        self.clock[self.rank] = self.computed
        if self.audit is None:
            return self._carry_out(self.algorithm.on_own(gradient, index))
        self.audit.own(index, gradient.grad)
        out = self._carry_out(self.algorithm.on_own(gradient, index))
        self.audit.sent(out)
        return out

    def push_gradient(
        self, index: int, gradient: Gradient, peers: tuple[int, ...] | None = None
    ) -> list[Outgoing]:
        """The messages that push own gradient ``index`` (summed B at a time when grads_per_message > 1).

        ``peers`` defaults to this worker's children in its own broadcast tree (every worker, on a complete
        graph). The message carries the clock of the model the gradient was computed on, so a receiver can
        tell how stale it is.
        """
        if self.grads_per_message == 1:
            return self._push(Kind.GRADIENT, index, index + 1, gradient.grad, gradient.clock, peers)
        if self._pending is None:
            self._pending = gradient.grad.clone()
            self._pending_lo = index
        else:
            self._pending.add_(gradient.grad)
        if self.computed - self._pending_lo >= self.grads_per_message:
            return self._flush_pending()
        return []

    def request_stop(self) -> list[Outgoing]:
        """Ask every worker to stop computing (a stop rule fired here)."""
        self.stop_requested = True
        return self._push(Kind.STOP, 0, 0, None)

    def finish(self) -> list[Outgoing]:
        """Stop computing: send what is pending and announce the final count to everyone."""
        if self.stopped:
            return []
        out = self._flush_pending()
        self.stopped = True
        self._finals[self.rank] = self.computed
        return out + self._push(Kind.FINAL, self.computed, self.computed, None)

    # -- checkpoints (worker/checkpoint.py) -----------------------------------------------------------
    def capture(self) -> dict:
        """This worker's state for a checkpoint, as copies: replica (parameters and buffers), vector clock,
        own count, final counts, ids held past a gap, the own gradients not yet sent (B > 1), the flags and
        counters, and the algorithm's state (which raises for an algorithm that cannot be resumed).

        Refused (RuntimeError) once the worker stopped or after a death: a resumed run starts training."""
        if self.stopped:
            raise RuntimeError(f"worker {self.rank} has stopped; a checkpoint is taken while training")
        if self._dead.any():
            raise RuntimeError(f"worker {self.rank} saw workers {sorted(self.dead)} die; a checkpoint needs every worker")
        return {
            "algorithm": self.algorithm.name,
            "algorithm_state": self.algorithm.checkpoint_state(),
            "params": self.params.detach().clone(),
            "buffers": {name: b.detach().clone() for name, b in self.model.named_buffers()},
            "clock": self.clock.copy(),
            "computed": int(self.computed),
            "finals": self._finals.copy(),
            "gaps": {int(o): [list(r) for r in ids.ranges()] for o, ids in self._gaps.items()},
            "pending": None if self._pending is None else self._pending.detach().clone(),
            "pending_lo": int(self._pending_lo),
            "stop_requested": bool(self.stop_requested),
            "diverged": bool(self.diverged),
            "rejected": dict(self.rejected),
            "non_finite_origins": {int(k): int(v) for k, v in self.non_finite_origins.items()},
        }

    def load(self, state: dict) -> None:
        """Take back what :meth:`capture` returned (on a freshly built worker of the same run)."""
        if self.computed or self.applied:
            raise RuntimeError("load a checkpoint into a freshly built worker, before its first gradient")
        if state["algorithm"] != self.algorithm.name:
            raise ValueError(f"the checkpoint is of algorithm {state['algorithm']!r}, this worker runs {self.algorithm.name!r}")
        params = state["params"]
        if params.numel() != self.params.numel():
            raise ValueError(f"the checkpoint's replica has {params.numel()} values, this model has {self.params.numel()}")
        clock = np.asarray(state["clock"], dtype=np.int64)
        if clock.shape != self.clock.shape:
            raise ValueError(f"the checkpoint's clock has {clock.size} entries, the run has {self.world_size} workers")
        with torch.no_grad():
            self.params.copy_(params.reshape(-1).to(self.params.device, self.params.dtype))
            buffers = dict(self.model.named_buffers())
            if set(buffers) != set(state["buffers"]):
                raise ValueError(f"the checkpoint's buffers {sorted(state['buffers'])} are not the model's {sorted(buffers)}")
            for name, value in state["buffers"].items():
                buffers[name].copy_(value)
        self.clock[:] = clock
        self.computed = int(state["computed"])
        self._finals[:] = np.asarray(state["finals"], dtype=np.int64)
        self._gaps = {}
        for origin, ranges in state["gaps"].items():
            ids = self._gaps[int(origin)] = GradientSet()
            for lo, hi in ranges:
                ids.add(int(lo), int(hi))
        pending = state["pending"]
        self._pending = None if pending is None else pending.to(self.params.device, self.params.dtype).clone()
        self._pending_lo = int(state["pending_lo"])
        self.stop_requested = bool(state["stop_requested"])
        self.diverged = bool(state["diverged"])
        self.rejected = Counter({str(k): int(v) for k, v in state["rejected"].items()})
        self.non_finite_origins = Counter({int(k): int(v) for k, v in state["non_finite_origins"].items()})
        self.algorithm.restore_state(state["algorithm_state"])

    # -- the effects an algorithm asks for: the only writes to the replica and its clock --------------
    def _carry_out(self, effects: list[Effect]) -> list[Outgoing]:
        """Carry out an algorithm hook's effects in order; return the messages they send."""
        if not isinstance(effects, list | tuple):
            # A hook that forgot its return would otherwise drop its update without a word.
            raise AlgorithmEffectError(
                f"an algorithm hook of {self.algorithm.name} returned {type(effects).__name__}; hooks return a list "
                "of effects (dasgd.algorithms.effects), [] for none"
            )
        out: list[Outgoing] = []
        for effect in effects:
            if isinstance(effect, Step):
                self._step(self._vector(effect.vector, "Step"), float(effect.scale))
            elif isinstance(effect, PushGradient):
                if effect.index != self.computed - 1:
                    raise AlgorithmEffectError(
                        f"{self.algorithm.name} pushed own gradient {effect.index}, but the one being committed "
                        f"is {self.computed - 1}; a worker pushes each own gradient once, when it is committed"
                    )
                out.extend(self.push_gradient(effect.index, effect.gradient, effect.peers))
            elif isinstance(effect, ShareModel):
                msg = Message(
                    Kind.MODEL, self.rank, self.rank, effect.lo, effect.hi, self.params.detach().clone(),
                    self.clock.copy(),
                )
                out.extend((int(peer), msg) for peer in effect.peers)
                out.extend(self._carry_out(self.algorithm.on_model_shared(msg)))
            elif isinstance(effect, SetModel):
                self.params.copy_(self._vector(effect.model, "SetModel"))
            elif isinstance(effect, AverageModel):
                self.params.add_(self._vector(effect.model, "AverageModel")).mul_(0.5)
            elif isinstance(effect, MergeClock):
                if effect.clock is not None and len(effect.clock) == len(self.clock):
                    np.maximum(self.clock, effect.clock, out=self.clock)
            elif isinstance(effect, AdoptClock):
                if effect.clock is not None and len(effect.clock) == len(self.clock):
                    own = self.clock[self.rank]
                    self.clock[:] = effect.clock
                    self.clock[self.rank] = max(own, int(effect.clock[self.rank]))
            elif isinstance(effect, Reject):
                self.rejected[str(effect.reason)] += 1
            else:
                raise AlgorithmEffectError(
                    f"{self.algorithm.name} returned {effect!r}, which is not an effect; hooks return a list of "
                    "dasgd.algorithms.effects (Step, PushGradient, ShareModel, SetModel, ...)"
                )
        return out

    def _step(self, vector: torch.Tensor, scale: float) -> None:
        """``x -= scale * vector``: every gradient step of the replica goes through here."""
        self.params.add_(vector, alpha=-scale)

    def _vector(self, vector: torch.Tensor, effect: str) -> torch.Tensor:
        """``vector`` checked against the replica's size and moved to its dtype and device."""
        if not isinstance(vector, torch.Tensor) or vector.numel() != self.params.numel():
            size = vector.numel() if isinstance(vector, torch.Tensor) else type(vector).__name__
            raise AlgorithmEffectError(
                f"{self.algorithm.name} asked for {effect} with a vector of {size} values; the replica has "
                f"{self.params.numel()}"
            )
        if vector.dtype != self.params.dtype or vector.device != self.params.device:
            vector = vector.to(self.params.device, self.params.dtype)
        return vector.reshape(-1)

    # -- helpers -------------------------------------------------------------------------------------
    def _receive_bundle(self, bundle: ArrivalBundle) -> list[Outgoing]:
        """Apply a bundle as one update when every part passes the checks ``receive`` makes one by one.

        The checks are vectorised: a complete graph (each origin sends directly), an algorithm whose updates
        commute, known origins other than this worker, no gaps, for each origin the gradients continue its
        held prefix contiguously and stop at its final count, and each FINAL is new and covers what its
        origin sent. Anything else (faults, reordering, duplicates) goes through the one-by-one path, which
        counts each rejection by reason.
        """
        origin, lo, hi = bundle.origin, bundle.lo, bundle.hi
        f_origin, f_count = bundle.final_origin, bundle.final_count
        n = self.world_size
        every = np.concatenate([origin, f_origin])
        if (
            not self._complete
            or not self.algorithm.commutes
            or self._gaps
            or (bundle.payload is not None and bundle.payload.numel() != self.params.numel())
            or (bundle.payload is not None and not all_finite(bundle.payload))
            or (len(origin) and int((hi - lo).max()) > MAX_GRADIENTS_PER_MESSAGE)
            or (len(hi) and int(hi.max()) > MAX_GRADIENT_ID)
            or (len(f_count) and (int(f_count.min()) < 0 or int(f_count.max()) > MAX_GRADIENT_ID))
            or (len(every) and (every.min() < 0 or every.max() >= n or (every == self.rank).any()))
            or (hi <= lo).any()
            or (self._finals[f_origin] >= 0).any()
            or len(np.unique(f_origin)) != len(f_origin)
        ):
            return self.receive(bundle.expand())
        if len(origin):
            order = np.argsort(origin, kind="stable")
            o, lo_s, hi_s = origin[order], lo[order], hi[order]
            first = np.ones(len(o), dtype=bool)
            first[1:] = o[1:] != o[:-1]
            last = np.ones(len(o), dtype=bool)
            last[:-1] = first[1:]
            expected = np.empty_like(lo_s)
            expected[first] = self.clock[o[first]]
            expected[~first] = hi_s[:-1][~first[1:]]
            finals = self._finals.copy()
            finals[f_origin] = f_count
            finals = finals[o[last]]
            if (lo_s != expected).any() or ((finals >= 0) & (hi_s[last] > finals)).any():
                return self.receive(bundle.expand())
        if len(f_origin) and (f_count < self.clock[f_origin]).any():
            return self.receive(bundle.expand())  # a FINAL below what is held: refused one by one
        if len(origin):
            if self.audit is not None:
                for part in range(len(origin)):
                    self.audit.bundle_part(int(origin[part]), int(lo[part]), int(hi[part]), self.clock)
            self.clock[o[last]] = hi_s[last]
            payload = bundle.payload
            assert payload is not None
            if payload.dtype != self.params.dtype or payload.device != self.params.device:
                payload = payload.to(self.params.device, self.params.dtype)
            # The algorithm commutes (checked above): by its contract every remote gradient is applied as
            # x -= eta * g whatever else arrived, so the sum is applied here as one step.
            self._step(payload, self.lr)
        self._finals[f_origin] = f_count
        if bundle.stop:
            self.stop_requested = True
        return []

    def _flush_pending(self) -> list[Outgoing]:
        if self._pending is None:
            return []
        grad, lo = self._pending, self._pending_lo
        self._pending = None
        return self._push(Kind.GRADIENT, lo, self.computed, grad)

    def _push(
        self,
        kind: Kind,
        lo: int,
        hi: int,
        payload: torch.Tensor | None,
        clock: np.ndarray | None = None,
        peers: tuple[int, ...] | None = None,
    ) -> list[Outgoing]:
        if not self.send_clock:
            clock = None
        elif clock is None:
            clock = self.clock.copy()
        msg = Message(kind, self.rank, self.rank, lo, hi, payload, clock)
        return [(peer, msg) for peer in (self._own_children if peers is None else peers)]

    def _holds_any(self, origin: int, lo: int, hi: int) -> bool:
        gaps = self._gaps.get(origin)
        if gaps is not None:
            return gaps.overlaps(lo, hi)
        return lo < self.clock[origin]

    def _hold(self, origin: int, lo: int, hi: int) -> None:
        """Record ids [lo, hi) of ``origin`` as applied (known not to overlap what is held)."""
        gaps = self._gaps.get(origin)
        if gaps is None:
            if lo == self.clock[origin]:  # the in-order fast path
                self.clock[origin] = hi
                return
            gaps = self._gaps[origin] = GradientSet()
            if self.clock[origin] > 0:
                gaps.add(0, int(self.clock[origin]))
        gaps.add(lo, hi)
        self.clock[origin] = gaps.prefix
        if len(gaps) == gaps.prefix:  # the gap closed
            del self._gaps[origin]

    def _accept(self, msg: Message) -> Message | None:
        """Checks the wire codec cannot make: routing, duplicates, shape against this replica."""
        if not (0 <= msg.origin < self.world_size and 0 <= msg.sender < self.world_size):
            self.rejected["unknown_sender"] += 1
            return None
        if msg.origin == self.rank:
            self.rejected["own_message"] += 1  # a route loop or a forged origin; never re-apply own work
            return None
        # On a complete graph every origin sends directly (the common case; skips a tree lookup per message).
        if msg.kind == Kind.DEAD:
            # Any live neighbour may announce a death; it travels one hop at a time.
            if msg.sender not in self.topology.neighbors(self.rank) or msg.payload is not None:
                self.rejected["wrong_route"] += 1
                return None
            return msg
        parent = msg.origin if self._complete else self._routes.parent(msg.origin, self.rank)
        if parent != msg.sender and not (
            # While survivors switch to the new trees, a neighbour may forward by the old tree or the new one
            # (and a dead one's last messages still arrive): accept any neighbour's, since the exactly-once
            # check refuses anything already held.
            self._routes is not self.topology and msg.sender in self.topology.neighbors(self.rank)
        ):
            self.rejected["wrong_route"] += 1
            return None
        if msg.kind == Kind.MODEL:
            if msg.sender != msg.origin or msg.sender not in self.topology.neighbors(self.rank):
                self.rejected["wrong_route"] += 1  # models travel one hop, between neighbours
                return None
            if msg.payload is None or msg.payload.numel() != self.params.numel():
                self.rejected["shape"] += 1
                return None
            if not self._finite(msg):
                return None
            return self._as_local(msg)
        if msg.kind == Kind.GRADIENT:
            if not self.algorithm.takes_gradients:
                self.rejected["unexpected_gradient"] += 1
                return None
            if msg.payload is None or msg.payload.numel() != self.params.numel():
                self.rejected["shape"] += 1
                return None
            if msg.lo < 0 or msg.hi <= msg.lo or msg.hi > MAX_GRADIENT_ID:
                self.rejected["bad_range"] += 1
                return None
            if msg.hi - msg.lo > MAX_GRADIENTS_PER_MESSAGE:
                self.rejected["range_too_wide"] += 1
                return None
            if self._holds_any(msg.origin, msg.lo, msg.hi):
                self.rejected["duplicate"] += 1
                return None
            final = self._finals[msg.origin]
            if final >= 0 and msg.hi > final:
                self.rejected["after_final"] += 1
                return None
            if not self._finite(msg):
                return None
            return self._as_local(msg)
        if msg.kind == Kind.FINAL:
            if not 0 <= msg.hi <= MAX_GRADIENT_ID:
                self.rejected["bad_range"] += 1
                return None
            if msg.hi < self._held_bound(msg.origin) and self._finals[msg.origin] < 0:
                # Fewer gradients than this replica already holds of the origin: the count is false, and
                # taking it would refuse the origin's later gradients as "after the final count".
                self.rejected["final_below_held"] += 1
                return None
        return msg

    def _finite(self, msg: Message) -> bool:
        """Whether a payload is finite; a NaN or infinity is refused and its origin flagged, so a diverging
        peer shows in the summary instead of silently poisoning this replica."""
        assert msg.payload is not None
        if all_finite(msg.payload):
            return True
        self.rejected["non_finite"] += 1
        self.non_finite_origins[msg.origin] += 1
        return False

    def _held_bound(self, origin: int) -> int:
        """One past the highest id of ``origin`` held (the clock, or the top of a gap set)."""
        gaps = self._gaps.get(origin)
        if gaps is None:
            return int(self.clock[origin])
        ranges = gaps.ranges()
        return max(int(self.clock[origin]), ranges[-1][1] if ranges else 0)

    def _as_local(self, msg: Message) -> Message:
        assert msg.payload is not None
        if msg.payload.dtype != self.params.dtype or msg.payload.device != self.params.device:
            # A different dtype/device is a configuration mismatch between peers, not corruption: convert.
            payload = msg.payload.to(self.params.device, self.params.dtype)
            msg = Message(msg.kind, msg.sender, msg.origin, msg.lo, msg.hi, payload, msg.clock)
        return msg


class _AllBut(Sequence[int]):
    """The ranks ``0 .. n-1`` except ``skip``, in order, without storing them."""

    __slots__ = ("_n", "_skip")

    def __init__(self, n: int, skip: int) -> None:
        self._n = n
        self._skip = skip

    def __len__(self) -> int:
        return self._n - 1

    def __getitem__(self, i):  # noqa: ANN001, ANN204 (int or slice, as Sequence)
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return i if i < self._skip else i + 1

    def __iter__(self):  # noqa: ANN204
        yield from range(self._skip)
        yield from range(self._skip + 1, self._n)


class _ReadOnlyWorker:
    """What an algorithm sees of its worker (dasgd.algorithms.base.WorkerView): reads only.

    The clock is a read-only view of the worker's own array (no copy per message, and it follows the worker's
    in-place updates); writing it raises.
    """

    __slots__ = ("_worker", "_clock")

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._clock = worker.clock.view()
        self._clock.flags.writeable = False

    rank = property(lambda self: self._worker.rank)
    world_size = property(lambda self: self._worker.world_size)
    topology = property(lambda self: self._worker.topology)
    lr = property(lambda self: self._worker.lr)
    grads_per_message = property(lambda self: self._worker.grads_per_message)
    computed = property(lambda self: self._worker.computed)
    stopped = property(lambda self: self._worker.stopped)
    dead = property(lambda self: self._worker.dead)
    clock = property(lambda self: self._clock)

    def finals(self) -> dict[int, int]:
        return self._worker.finals()

    def holds_every_final(self) -> bool:
        return self._worker.holds_every_final()
