"""The per-worker protocol: one state machine for a worker's life, driven by the real loop, the simulator and
the wrapper alike.

It does no I/O and reads no clock: a driver hands it what happened (messages arrived, a gradient computed,
the time now, an evaluation's metrics) and it answers with what to send and what to do next, as an action:

- :class:`Compute`: start the next gradient now (then report it with :meth:`WorkerProtocol.gradient_done`);
- :class:`Wait`: nothing to do until a message arrives or until ``until`` (the time budget, the drain
  deadline), whichever comes first; then call :meth:`~WorkerProtocol.step` again (or
  :meth:`~WorkerProtocol.drain` while draining);
- :class:`Finished`: the worker's part of the run is over (``drained`` says whether every gradient it is
  owed arrived before the drain deadline).

The phases (:class:`Phase`): TRAINING (computing), WAITING (the algorithm waits on peers: a synchronous
step, a server's reply), DRAINING (stopped: it announced its final count and applies what it is still owed,
declaring dead the peers its driver saw die), DONE. The stop rules are one frozen :class:`StopPolicy`.
A call that does not fit the phase raises :class:`ProtocolError` naming the phase.

Checkpoints (worker/checkpoint.py) run through here too, alongside training: :meth:`WorkerProtocol.
begin_checkpoint` starts one, MARKER messages in what arrived are taken out before the worker sees them (each
splits the arrivals of its link into before and after the cut), and :meth:`WorkerProtocol.checkpoint_state`
hands over the worker's part once every incoming link delivered its marker. :meth:`WorkerProtocol.resume`
builds a protocol from a saved part.

Later states (join, sync from a peer, leave) belong here too, so that each is written once.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from dasgd.core.ledger import StalenessLedger
from dasgd.core.message import MAX_GRADIENT_ID, Kind, Message
from dasgd.worker.checkpoint import CheckpointError, WorkerState
from dasgd.worker.replica import all_finite
from dasgd.worker.rules import stop_reason
from dasgd.worker.worker import Gradient, Outgoing, Worker

__all__ = [
    "Action",
    "Compute",
    "Finished",
    "Phase",
    "ProtocolError",
    "StopPolicy",
    "Wait",
    "WorkerProtocol",
]


@dataclass(frozen=True)
class StopPolicy:
    """Stop rules, evaluation cadence and drain patience of a run, in the driver's seconds (wall or virtual)."""

    max_gradients: int | None = None
    """Stop once the replica holds this many gradients (its view of the run's total T)."""
    max_seconds: float | None = None
    """Stop once this many seconds have passed since the start."""
    target_accuracy: float | None = None
    """Stop once the last evaluation of this replica reached it."""
    accuracy_metric: str | None = "test_accuracy"
    """The evaluation key the target is compared with (None: the task has no accuracy)."""
    eval_every: float = 0.5
    """Seconds between evaluations (of the worker that evaluates)."""
    drain_timeout: float = 120.0
    """Seconds the end-of-run drain may take."""
    diverge_factor: float | None = None
    """Stop as "diverged" once the evaluated loss exceeds this many times the first evaluation's (None or 0:
    only a non-finite loss or gradient counts; worker/rules.py, ``exploded``)."""


class Phase(enum.Enum):
    """Where a worker is in its life."""

    TRAINING = "training"
    WAITING = "waiting"
    DRAINING = "draining"
    DONE = "done"


@dataclass(frozen=True)
class Compute:
    """Start the next gradient now."""


@dataclass(frozen=True)
class Wait:
    """Wait for a message, or until ``until`` (seconds on the driver's clock), whichever is first."""

    until: float = math.inf


@dataclass(frozen=True)
class Finished:
    """The worker's part of the run is over."""

    drained: bool


Action = Compute | Wait | Finished


class ProtocolError(RuntimeError):
    """A call that does not fit the protocol's phase (a driver bug)."""


@dataclass
class WorkerProtocol:
    """One worker's protocol.

    Args:
        worker: the worker whose steps it takes.
        policy: the stop rules.
        ledger: where each own gradient's record goes (None: not recorded).
        start: the time training started (the time budget counts from it).
    """

    worker: Worker
    policy: StopPolicy
    ledger: StalenessLedger | None = None
    start: float = 0.0
    phase: Phase = Phase.TRAINING
    stop_reason: str = ""
    """Why the worker stopped ("" while training; see worker/rules.py)."""
    train_end: float = math.nan
    drain_end: float = math.nan
    drained: bool = False
    evals: list[dict] = field(default_factory=list)
    """The evaluations reported with :meth:`evaluated`, as the run's event log stores them."""
    last_metrics: dict[str, float] = field(default_factory=dict)
    next_eval: float = math.nan
    """When the next evaluation is due (the start, then every ``policy.eval_every``)."""
    extra_state: Callable[[], dict] | None = None
    """Called at this worker's local snapshot of a checkpoint: the driver's state to save with it (JSON-able:
    the batch sampler's position and random state, ...), taken at the same instant as the worker's."""
    checkpoint_refused: str = ""
    """Why the last checkpoint this worker was asked to join was refused ("" if none was)."""
    _cut: _Cut | None = field(default=None, repr=False)
    _last_cid: int = field(default=-1, repr=False)
    _redeliver: list[Message] = field(default_factory=list, repr=False)
    _now: float = field(default=math.nan, repr=False)

    def __post_init__(self) -> None:
        if math.isnan(self.next_eval):
            self.next_eval = self.start

    # -- training -----------------------------------------------------------------------------------------
    def step(
        self, now: float, arrived: list[Message], dead_peers: Iterable[int] = ()
    ) -> tuple[list[Outgoing], Action]:
        """The top of a training step: note the peers seen dead (read before ``arrived``, as in
        :meth:`drain`), apply what arrived, check the stop rules, then compute or wait.

        When a rule fires the worker stops here: its STOP and FINAL go out with the returned messages, the
        phase is DRAINING and the action waits for the drain deadline; the driver goes on with :meth:`drain`.
        """
        self._require(Phase.TRAINING, Phase.WAITING)
        w = self.worker
        self._now = now
        out = self._note_dead(dead_peers)
        out += self._take_in(arrived)
        reason = stop_reason(
            w,
            now - self.start,
            self.last_metrics,
            self.policy.max_gradients,
            self.policy.max_seconds,
            self.policy.target_accuracy,
            self.policy.accuracy_metric,
            self.evals[0] if self.evals else None,
            self.policy.diverge_factor,
        )
        if reason:
            # A peer's request needs no echo; a rule that fired here is announced to everyone.
            out += self._stop(reason, now, tell_peers=reason != "stop_requested")
            return out, Wait(self.drain_deadline)
        if not w.ready:
            # The algorithm waits on peers; the time budget still runs out while it does.
            self.phase = Phase.WAITING
            budget = self.policy.max_seconds
            return out, Wait(self.start + budget if budget is not None else math.inf)
        self.phase = Phase.TRAINING
        return out, Compute()

    def gradient_done(self, gradient: Gradient, started: float, finished: float) -> list[Outgoing]:
        """The gradient started at ``started`` is complete at ``finished``: record it, commit it, and return
        what must be sent. Call :meth:`step` next."""
        self._require(Phase.TRAINING)
        if not all_finite(gradient.grad):
            # The replica diverged (a NaN or infinity in its own gradient): the gradient is neither applied
            # nor sent, and the next step stops the worker with reason "diverged" and tells every peer.
            self.worker.diverged = True
            return []
        if self.ledger is not None:
            self.ledger.record(self.worker.rank, self.worker.computed, started, finished, gradient.clock)
        return self.worker.commit(gradient)

    # -- evaluation ---------------------------------------------------------------------------------------
    def evaluation_due(self, now: float) -> bool:
        """Whether an evaluation is due (for the worker that evaluates)."""
        return now >= self.next_eval

    def evaluated(
        self,
        now: float,
        metrics: Mapping[str, float],
        finished: float | None = None,
        gradients: int | None = None,
    ) -> dict:
        """Record an evaluation of this replica taken at ``now`` (and over at ``finished``, default ``now``);
        the next is due ``eval_every`` after it is over. Returns the record.

        ``gradients``: how many gradients the evaluated model held (default: what the replica holds now). A
        driver that evaluates a snapshot in the background passes the count at the snapshot, taken at ``now``.
        """
        self.last_metrics = dict(metrics)
        held = self.worker.applied if gradients is None else int(gradients)
        record = {"worker": self.worker.rank, "time": now, "gradients": held, **metrics}
        self.evals.append(record)
        self.next_eval = (now if finished is None else finished) + self.policy.eval_every
        return record

    # -- stop and drain -----------------------------------------------------------------------------------
    def receive(self, arrived: list[Message], dead_peers: Iterable[int] = ()) -> list[Outgoing]:
        """Apply what arrived without checking the stop rules: for a driver whose user decides when to stop
        (the wrapper); a peer's request to stop shows in ``worker.stop_requested``."""
        self._require(Phase.TRAINING, Phase.WAITING)
        out = self._note_dead(dead_peers)
        return out + self._take_in(arrived)

    def stop(self, now: float, reason: str, tell_peers: bool = True) -> list[Outgoing]:
        """Stop now for ``reason`` (the driver's own: a user's loop that ends): announce the final count, and
        with ``tell_peers`` ask every worker to stop too. The driver goes on with :meth:`drain`."""
        self._require(Phase.TRAINING, Phase.WAITING)
        return self._stop(reason, now, tell_peers)

    @property
    def drain_deadline(self) -> float:
        """When the drain gives up (the stop time plus the policy's drain timeout)."""
        return self.train_end + self.policy.drain_timeout

    def drain(
        self, now: float, arrived: list[Message], dead_peers: Iterable[int]
    ) -> tuple[list[Outgoing], Action]:
        """A drain step: apply what arrived, stop waiting for the peers seen dead, and say whether it is over.

        Drivers read the dead peers *before* taking the arrived messages (a transport marks a peer dead only
        after queuing what it sent), so nothing a dead peer sent is left behind.
        """
        self._require(Phase.DRAINING)
        self._now = now
        out = self._take_in(arrived)
        return out, self._drain_check(now, dead_peers, out)

    def give_up(self, now: float) -> Finished:
        """The drain deadline passed (or the driver ended it): the worker is done, not drained."""
        self._require(Phase.DRAINING)
        self.phase = Phase.DONE
        self.drain_end = now
        return Finished(False)

    # -- checkpoints --------------------------------------------------------------------------------------
    def begin_checkpoint(self, cid: int, now: float) -> list[Outgoing]:
        """Start checkpoint ``cid`` here (ids increase over a run): record this worker's state now, between
        steps, and return the MARKER(cid) for every outgoing link (send them as usual, after anything returned
        earlier). Raises :class:`CheckpointError` when it cannot be taken (the worker stopped, a worker died,
        an algorithm that cannot be resumed, a checkpoint in progress); training goes on either way."""
        if not 0 <= cid <= MAX_GRADIENT_ID:
            raise CheckpointError(f"a checkpoint id is in [0, 2**62], got {cid}")
        latest = max(self._last_cid, self._cut.cid if self._cut is not None else -1)
        if cid <= latest:
            raise CheckpointError(f"checkpoint ids increase over a run: {cid} follows {latest}")
        self._now = now
        why = self._snapshot_refusal()
        if why:
            self.checkpoint_refused = why
            raise CheckpointError(f"worker {self.worker.rank} cannot take checkpoint {cid}: {why}")
        return self._snapshot(cid)

    @property
    def checkpointing(self) -> int | None:
        """The id of the checkpoint this worker is taking (its part not handed over yet), or None."""
        return None if self._cut is None else self._cut.cid

    @property
    def checkpoint_ready(self) -> bool:
        """Whether this worker's part of the current checkpoint is complete (every incoming link delivered its
        marker): :meth:`checkpoint_state` hands it over."""
        return self._cut is not None and not self._cut.open

    def checkpoint_state(self) -> WorkerState:
        """This worker's part of the current checkpoint (once :attr:`checkpoint_ready`); the protocol forgets it."""
        cut = self._cut
        if cut is None or cut.open:
            waiting = "no checkpoint is in progress" if cut is None else f"links from {sorted(cut.open)} have not delivered their marker"
            raise ProtocolError(f"worker {self.worker.rank}'s part of the checkpoint is not complete: {waiting}")
        self._cut = None
        self._last_cid = cut.cid
        return WorkerState(
            checkpoint=cut.cid,
            rank=self.worker.rank,
            world_size=self.worker.world_size,
            time=cut.time,
            worker=cut.worker,
            protocol=cut.protocol,
            extra=cut.extra,
            channel=cut.channel,
        )

    @classmethod
    def resume(
        cls,
        worker: Worker,
        policy: StopPolicy,
        state: WorkerState,
        ledger: StalenessLedger | None = None,
        redeliver: bool = True,
        extra_state: Callable[[], dict] | None = None,
    ) -> WorkerProtocol:
        """A protocol that goes on from ``state`` with ``worker`` (freshly built, exactly as for the saved run:
        its state is loaded here). The driver restores its own part (``state.extra``).

        ``redeliver``: the messages of the channel state are handed to the worker at its first step, before
        anything that arrives after the resume (each link is FIFO, so this is where they belong); False leaves
        that to the driver (a replay that delivers them at the moments of the original run)."""
        if state.rank != worker.rank or state.world_size != worker.world_size:
            raise CheckpointError(
                f"the part of worker {state.rank} of {state.world_size} cannot resume worker {worker.rank} of {worker.world_size}"
            )
        try:
            worker.load(state.worker)
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(f"worker {worker.rank} cannot resume from this checkpoint: {e}") from None
        p = state.protocol
        proto = cls(
            worker,
            policy,
            ledger,
            start=float(p["start"]),
            next_eval=float(p["next_eval"]),
            evals=[dict(e) for e in p["evals"]],
            last_metrics=dict(p["last_metrics"]),
            extra_state=extra_state,
        )
        proto._last_cid = state.checkpoint
        if redeliver:
            proto._redeliver = list(state.channel)
        return proto

    def _snapshot_refusal(self) -> str:
        w = self.worker
        if self.phase not in (Phase.TRAINING, Phase.WAITING) or w.stopped:
            return f"it is {self.phase.value}; a checkpoint is taken while every worker trains"
        if w.dead:
            return f"workers {sorted(w.dead)} died; a checkpoint needs every worker"
        if w.algorithm.not_resumable:
            return f"{w.algorithm.name} cannot be checkpointed: {w.algorithm.not_resumable}"
        if self._cut is not None:
            return f"checkpoint {self._cut.cid} is in progress"
        return ""

    def _snapshot(self, cid: int) -> list[Outgoing]:
        """The local snapshot: record the state, open every incoming link, send the markers."""
        w = self.worker
        links = [int(p) for p in w.topology.neighbors(w.rank)]
        self._cut = _Cut(
            cid=cid,
            time=self._now,
            worker=w.capture(),
            protocol={
                "start": self.start,
                "next_eval": self.next_eval,
                "evals": [dict(e) for e in self.evals],
                "last_metrics": dict(self.last_metrics),
            },
            extra=self.extra_state() if self.extra_state is not None else {},
            open=set(links),
        )
        self.checkpoint_refused = ""
        marker = Message(Kind.MARKER, w.rank, w.rank, cid, cid)
        return [(peer, marker) for peer in links]

    def _marker(self, msg: Message) -> list[Outgoing]:
        cid = msg.lo
        cut = self._cut
        if cut is not None and cut.cid == cid:
            cut.open.discard(msg.sender)
            return []
        if cid <= self._last_cid or (cut is not None and cid < cut.cid):
            return []  # a marker of a checkpoint this worker already handed over, or abandoned
        # The first marker of a new checkpoint: the local snapshot, taken before anything after the marker.
        # A checkpoint still open here is abandoned (its initiator moved on to a newer one).
        self._cut = None
        why = self._snapshot_refusal()
        if why:
            self.checkpoint_refused = why
            self._last_cid = cid  # never completed here, so never complete: its manifest is never written
            return []
        out = self._snapshot(cid)
        assert self._cut is not None
        self._cut.open.discard(msg.sender)  # this link's channel state is empty: the marker came first
        return out

    def _take_in(self, arrived: list[Message]) -> list[Outgoing]:
        """Hand what arrived to the worker, taking out the checkpoint markers (each where it arrived: what came
        before it on any link was applied before a snapshot it triggers) and recording the channel state."""
        if self._redeliver:
            arrived = [*self._redeliver, *arrived]
            self._redeliver = []
        if self._cut is None and not any(isinstance(m, Message) and m.kind == Kind.MARKER for m in arrived):
            return self.worker.receive(arrived)
        out: list[Outgoing] = []
        part: list[Message] = []
        for m in arrived:
            if not isinstance(m, Message):
                if self._cut is not None and self._cut.open:
                    raise ProtocolError("bundled arrivals cannot be recorded for a checkpoint; poll one message at a time")
                part.append(m)
                continue
            if m.kind == Kind.MARKER:
                if part:
                    out += self.worker.receive(part)
                    part = []
                out += self._marker(m)
                continue
            cut = self._cut
            if cut is not None and m.sender in cut.open:
                # In flight across the cut: applied now (training goes on) and saved, to be delivered again on
                # resume. The message object itself: a delivered message's payload is never changed afterwards
                # (queues clone before they sum into an entry), and a driver may recognise it (the simulator
                # notes when each one arrived).
                cut.channel.append(m)
            part.append(m)
        if part:
            out += self.worker.receive(part)
        return out

    # -- helpers ------------------------------------------------------------------------------------------
    def _stop(self, reason: str, now: float, tell_peers: bool) -> list[Outgoing]:
        w = self.worker
        out = w.request_stop() if tell_peers else []
        out += w.finish()
        self.phase = Phase.DRAINING
        self.stop_reason = reason
        self.train_end = now
        return out

    def _note_dead(self, dead_peers: Iterable[int]) -> list[Outgoing]:
        """Declare the peers the driver saw die (the first time each is seen), during training too: on a
        sparse graph the broadcast trees then route around them at once, not only in the drain."""
        out: list[Outgoing] = []
        for peer in dead_peers:
            out += self.worker.declare_dead(peer)  # returns at once for a peer already declared
        return out

    def _drain_check(self, now: float, dead_peers: Iterable[int], out: list[Outgoing]) -> Action:
        out += self._note_dead(dead_peers)
        if self.worker.complete:
            self.phase = Phase.DONE
            self.drained = True
            self.drain_end = now
            return Finished(True)
        return Wait(self.drain_deadline)

    def _require(self, *phases: Phase) -> None:
        if self.phase not in phases:
            allowed = " or ".join(p.value for p in phases)
            raise ProtocolError(f"worker {self.worker.rank} is {self.phase.value}; this step needs {allowed}")


@dataclass
class _Cut:
    """A checkpoint being taken at this worker: the local snapshot and the channel state recorded so far."""

    cid: int
    time: float
    worker: dict
    protocol: dict
    extra: dict
    open: set[int]
    """Incoming links whose marker has not arrived: what arrives on them is recorded."""
    channel: list[Message] = field(default_factory=list)
