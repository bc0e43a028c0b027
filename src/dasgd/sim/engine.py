"""The discrete-event engine: drives the same Worker objects as real runs, in virtual time.

Each worker runs the same protocol as in a real run (worker/protocol.py), and the engine only turns its
actions into events: at the start of a step the protocol applies what has arrived, checks the stop rules and
says compute, wait or stop; when the compute-time model says the gradient is done, the protocol records and
commits it (applies it and sends it) and the next step starts. A worker's replica changes only at its own events, so the gradient it
computes at the start of a step is the gradient of the replica it will commit from; that is what lets the
engine compute the gradients of many in-flight workers in one batched call without changing any result.

Events tie-break by scheduling order (events.py): the same workers, models and seed give the same run.

Checkpoints run the same marker protocol as real runs (worker/protocol.py, worker/checkpoint.py):
``checkpoint_at=T`` has worker 0 start one at its first step at or after virtual time T; every worker's part
is collected in :attr:`Simulation.checkpoint` as it completes, while the run goes on. ``resume=`` builds the
run from such parts: each worker's state, sampler and compute-time generator are restored, each worker takes
its first step at the virtual time of its local snapshot, and each message of the channel state arrives when
it arrived in the run that took the checkpoint (the simulator notes it beside the part, ``channel_arrivals``;
without it the channel state is delivered first). So on a network without per-link state (unlimited
bandwidth, no loss: links never queue), a resumed run replays the rest of the original run exactly: every
worker sees the same messages in the same order at the same virtual times and draws the same batches and
compute times, hence the same gradients, the same records and bit-identical replicas (up to ties between
events at exactly the same virtual time, which a continuous compute-time model makes improbable).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dasgd.core.ledger import CLOCK_DTYPE, StalenessLedger
from dasgd.sim.batched import BatchedGradients
from dasgd.sim.events import EventKind, EventQueue, VirtualClock
from dasgd.sim.models import ComputeModel, FailurePlan, NetworkModel
from dasgd.sim.network import SimNetwork
from dasgd.tasks import BatchSampler, Task
from dasgd.worker.checkpoint import CheckpointError, WorkerState
from dasgd.worker.protocol import Compute, Finished, Phase, StopPolicy, WorkerProtocol
from dasgd.worker.worker import Gradient, Outgoing, Worker

__all__ = ["Simulation", "SimOutcome", "StopPolicy"]  # StopPolicy: re-exported from worker.protocol

_COMPUTING, _DRAINING, _DONE, _DEAD, _WAITING = range(5)
_TRAINING = (_COMPUTING, _WAITING)
_BEFORE_THE_CUT = 1 << 62  # channel-state messages sort before what is sent after a resume  # before the worker's stop: computing, or waiting on peers to go on


@dataclass
class SimOutcome:
    """What happened to each worker, plus network counters."""

    records: StalenessLedger
    """Every gradient's record (all workers), in the order the gradients completed."""
    stop_reason: list[str]
    train_end: list[float]
    drain_end: list[float]
    drained: list[bool]
    crashed: list[bool]
    evals: list[dict] = field(default_factory=list)
    events_processed: int = 0
    end_time: float = 0.0
    lost_messages: int = 0
    lost_gradients: int = 0
    retransmissions: int = 0


class Simulation:
    """One simulated run.

    Args:
        workers: the workers (built exactly as for a real run), rank i at index i.
        samplers: each worker's batch stream (the same objects its loss function draws from).
        task: the workload (evaluation, batched gradients).
        compute: compute-time model.
        network: network model.
        failures: crashes and link outages.
        policy: stop rules and evaluation cadence.
        seed: the run seed (compute-time and network draws).
        batched: compute in-flight gradients in vectorised calls, and hand each worker what arrived since its
            last poll as one summed bundle when the algorithm's updates commute (results equal one-by-one up to
            rounding).
        on_progress: called every ``progress_every`` events with a small dict.
        checkpoint_at: take a checkpoint (id ``checkpoint_id``) started by worker 0 at its first step at or
            after this virtual time (None: none). Arrivals are then handed over one message at a time.
        resume: go on from these parts of a checkpoint (rank order), on workers and samplers built exactly as
            for the run that took it.
    """

    def __init__(
        self,
        workers: list[Worker],
        samplers: list[BatchSampler],
        task: Task,
        compute: ComputeModel,
        network: NetworkModel,
        failures: FailurePlan,
        policy: StopPolicy,
        seed: int,
        batched: bool = False,
        on_progress: Callable[[dict], None] | None = None,
        progress_every: int = 5000,
        checkpoint_at: float | None = None,
        checkpoint_id: int = 1,
        resume: list[WorkerState] | None = None,
    ) -> None:
        n = len(workers)
        self.checkpoint_at = checkpoint_at
        self.checkpoint_id = checkpoint_id
        self.checkpoint: list[WorkerState | None] = [None] * n
        """Each worker's part of the checkpoint, as it completes (all set: the checkpoint is complete)."""
        self._checkpoint_due = False
        self.workers = workers
        self.samplers = samplers
        self.task = task
        self.compute_model = compute
        self.failures = failures
        self.policy = policy
        self.clock = VirtualClock()
        self.events = EventQueue()
        self.net = SimNetwork(
            n,
            network,
            self.events,
            self.clock.now,
            self._on_arrival,
            seed,
            on_broadcast=self._on_broadcast,
            coalesce=workers[0].algorithm.coalesce_gradients,
            # A bundle hides which link each message came on, which the checkpoint's channel state needs.
            bundle=batched and workers[0].algorithm.commutes and checkpoint_at is None,
        )
        self._draining: set[int] = set()
        self._waiting: set[int] = set()  # workers whose algorithm waits on peers (woken by arrivals)
        self.transports = [self.net.endpoint(r) for r in range(n)]
        self._rngs = [np.random.default_rng([seed, 3, r]) for r in range(n)]
        self._failure_rng = np.random.default_rng([seed, 5])
        self._batched = BatchedGradients(task, workers[0].model) if batched else None
        self._pending: dict[int, Gradient] = {}
        self._inflight: dict[int, None] = {}  # ordered set: workers computing without a gradient yet
        self._snapshot: list[np.ndarray | None] = [None] * n
        self._started = [0.0] * n
        self._state = [_COMPUTING] * n
        self._wake_at = [math.inf] * n
        self.on_progress = on_progress
        self.progress_every = progress_every
        self.outcome = SimOutcome(
            records=StalenessLedger(n),  # one for all: per-worker ledgers would each hold a block
            stop_reason=[""] * n,
            train_end=[math.nan] * n,
            drain_end=[math.nan] * n,
            drained=[False] * n,
            crashed=[False] * n,
        )
        self.protocols = [
            WorkerProtocol(w, policy, self.outcome.records, start=0.0, extra_state=self._extra_state(w.rank))
            for w in workers
        ]
        self._t0 = 0.0
        self._resume_at: list[float] | None = None
        self._first_eval = 0.0
        self._arrival_of: list[dict[int, tuple[float, int]]] | None = None
        if checkpoint_at is not None:
            self.net.track_arrivals()
            self._arrival_of = [{} for _ in range(n)]
        # The lowest live rank's replica is the one evaluated (worker 0's until it dies, as in a real run): its
        # protocol sees the evaluation (the stop rule on accuracy), and the outcome keeps every record in order.
        self._evaluator = 0
        self._drain_deadline = math.inf
        # Lazy drain: with bundled arrivals and nothing that can fail, a draining worker completes exactly when
        # the last message addressed to it arrives, and no message is sent after the last worker stops. So a
        # draining worker is woken once, when the last worker stops, at its last arrival, instead of at every
        # arrival (with n workers that is n FINALs each, n^2 wake-ups).
        self._lazy_drain = (
            self.net.bundles
            and self.net.simple
            and len(workers[0].topology.edges) == n * (n - 1) // 2
            and not failures.crashes
            and failures.crash_rate == 0
            and not failures.link_down
        )
        if resume is not None:
            self._resume(resume)

    # -- checkpoints ------------------------------------------------------------------------------------
    def _extra_state(self, w: int) -> Callable[[], dict]:
        def extra() -> dict:
            return {"sampler": self.samplers[w].state(), "compute_rng": self._rngs[w].bit_generator.state}

        return extra

    def _resume(self, states: list[WorkerState]) -> None:
        n = len(self.workers)
        if len(states) != n or [s.rank for s in states] != list(range(n)):
            raise CheckpointError(f"a resume needs the parts of all {n} workers in rank order")
        for w, state in enumerate(states):
            arrivals = state.extra.get("channel_arrivals")
            timed = arrivals is not None and len(arrivals) == len(state.channel)
            self.protocols[w] = WorkerProtocol.resume(
                self.workers[w],
                self.policy,
                state,
                self.outcome.records,
                redeliver=not timed,  # timed: each arrives when it arrived in the original run instead
                extra_state=self._extra_state(w),
            )
            self.samplers[w].set_state(state.extra["sampler"])
            self._rngs[w].bit_generator.state = state.extra["compute_rng"]
            if timed:
                for msg, (arrival, order) in zip(state.channel, arrivals):
                    self.net.inject(w, msg, float(arrival), int(order) - _BEFORE_THE_CUT)
        self._resume_at = [s.time for s in states]
        self._t0 = min(self._resume_at)
        self._first_eval = max(self._t0, self.protocols[self._evaluator].next_eval)

    def _poll(self, w: int) -> list:
        msgs = self.transports[w].poll()
        seen = self._arrival_of
        if seen is not None and self.checkpoint[w] is None and self.clock.now() >= (self.checkpoint_at or 0.0):
            note = seen[w]
            for msg, arrival in zip(msgs, self.net.arrivals[w]):  # type: ignore[index]
                note[id(msg)] = arrival
        return msgs

    def _collect(self, w: int) -> None:
        p = self.protocols[w]
        if p.checkpoint_ready:
            state = p.checkpoint_state()
            if self._arrival_of is not None:
                note = self._arrival_of[w]
                state.extra = {**state.extra, "channel_arrivals": [list(note[id(m)]) for m in state.channel]}
                self._arrival_of[w] = {}
            self.checkpoint[w] = state

    @property
    def checkpoint_complete(self) -> bool:
        """Every worker's part of the checkpoint was collected."""
        return all(s is not None for s in self.checkpoint)

    # -- driving ----------------------------------------------------------------------------------------
    def run(self) -> SimOutcome:
        """Run to the end (every live worker drained, or the drain timeout). Returns the outcome."""
        n = len(self.workers)
        horizon = self.policy.max_seconds if self.policy.max_seconds is not None else math.inf
        for w, t in sorted(self.failures.crash_times(n, self._failure_rng, horizon).items()):
            self.events.push(t, EventKind.CRASH, w)
        for a, b, start, end in self.failures.link_down:
            self.net.add_outage(a, b, start, end)
        self.clock.advance_to(self._t0)
        self.events.push(self._first_eval, EventKind.EVALUATE)
        self._eval_pending = 1
        if self.checkpoint_at is not None:
            self.events.push(max(self.checkpoint_at, self._t0), EventKind.CHECKPOINT, 0)
            self._eval_pending += 1  # counted with the evaluations: it never stalls a run by itself
        if self._resume_at is None:
            for w in range(n):
                self._start(w)
        else:
            for w, t in enumerate(self._resume_at):
                self.events.push(t, EventKind.RESUME, w)
        while self.events:
            t, kind, a, b = self.events.pop()
            if t > self._drain_deadline:
                break
            self.clock.advance_to(t)
            if kind == EventKind.GRADIENT_DONE:
                self._done(a)
            elif kind == EventKind.LINK_FREE:
                self.net.link_free(a, b)
            elif kind == EventKind.WAKE:
                self._wake(a)
            elif kind == EventKind.EVALUATE:
                self._evaluate()
            elif kind == EventKind.CRASH:
                self._crash(a)
            elif kind == EventKind.PEER_DEAD:
                self._peer_dead(a, b)
            elif kind == EventKind.RESUME:
                self._start(a)
            elif kind == EventKind.CHECKPOINT:
                self._eval_pending -= 1
                self._checkpoint_due = True
                if self._state[a] == _WAITING:
                    self._start(a)
            if self.on_progress is not None and self.events.processed % self.progress_every == 0:
                self.on_progress(self._progress())
            if all(s in (_DONE, _DEAD) for s in self._state):
                break
            if len(self.events) == self._eval_pending and any(s in _TRAINING for s in self._state):
                self._stalled()
        out = self.outcome
        out.events_processed = self.events.processed
        out.end_time = self.clock.now()
        out.lost_messages, out.lost_gradients = self.net.lost_messages, self.net.lost_gradients
        out.retransmissions = self.net.retransmissions
        for w in range(n):
            if self._state[w] == _DRAINING:
                out.drain_end[w] = self.clock.now()
        return out

    def _send(self, w: int, outgoing: list[Outgoing]) -> None:
        transport = self.transports[w]
        everyone = len(self.workers) - 1
        i = 0
        while i < len(outgoing):
            msg = outgoing[i][1]
            # One message object to all peers (a complete graph's push): one broadcast-log entry instead of
            # n - 1 inbox entries, where the network allows it. Same arrivals, same order.
            if (
                everyone > 1
                and i + everyone <= len(outgoing)
                and outgoing[i + everyone - 1][1] is msg
                and self.net.broadcast(w, msg)
            ):
                i += everyone
                continue
            transport.send(outgoing[i][0], msg)
            i += 1

    def _start(self, w: int) -> None:
        """The top of a step: the protocol applies arrivals, checks the stop rules, says compute or wait."""
        worker = self.workers[w]
        t = self.clock.now()
        if self._checkpoint_due and w == 0:
            self._checkpoint_due = False
            try:
                self._send(w, self.protocols[w].begin_checkpoint(self.checkpoint_id, t))
            except CheckpointError:
                pass  # refused (the reason is in protocols[0].checkpoint_refused); the run goes on
        out, action = self.protocols[w].step(t, self._poll(w), self.net.stats[w].dead_peers)
        self._send(w, out)
        self._collect(w)
        if self.protocols[w].phase is Phase.DRAINING:
            self._stop(w)
            return
        if not isinstance(action, Compute):
            # The algorithm waits on peers (a synchronous step, a server's reply, or a server that never
            # computes): the next arrival wakes the worker, and so does the time budget running out.
            if self._state[w] != _WAITING:
                self._state[w] = _WAITING
                self._waiting.add(w)
                if action.until < math.inf and action.until > t:
                    self.events.push(action.until, EventKind.WAKE, w)
            nxt = self.net.next_arrival(w)
            if nxt is not None and nxt < self._wake_at[w]:
                self._wake_at[w] = nxt
                self.events.push(nxt, EventKind.WAKE, w)
            return
        if self._state[w] == _WAITING:
            self._state[w] = _COMPUTING
            self._waiting.discard(w)
            # A wake-up still scheduled is stale now (the worker went on without it, e.g. it heard of a death):
            # forget it, so the next wait schedules its own.
            self._wake_at[w] = math.inf
        # The clock as the ledger stores it (int32): n of these are alive, 10^8 entries at 10,000 workers.
        self._snapshot[w] = worker.clock.astype(CLOCK_DTYPE)
        self._started[w] = t
        if self._batched is None:
            self._pending[w] = worker.compute()
        else:
            self._inflight[w] = None
        duration = self.compute_model.duration(w, worker.computed, self._rngs[w])
        self.events.push(t + duration, EventKind.GRADIENT_DONE, w)

    def _done(self, w: int) -> None:
        if self._state[w] != _COMPUTING:
            return  # crashed while computing
        if w not in self._pending:
            self._compute_inflight()
        gradient = self._pending.pop(w)
        self._send(w, self.protocols[w].gradient_done(gradient, self._started[w], self.clock.now()))
        self._start(w)

    def _compute_inflight(self) -> None:
        """Gradients of every in-flight worker in vectorised calls (their replicas cannot change before)."""
        assert self._batched is not None
        ranks = list(self._inflight)
        self._inflight.clear()
        batches = [self.samplers[r].next() for r in ranks]
        grads, losses = self._batched.compute([self.workers[r].params for r in ranks], batches)
        for r, g, loss in zip(ranks, grads, losses):
            snapshot = self._snapshot[r]
            assert snapshot is not None
            self._pending[r] = Gradient(g, snapshot, loss)

    def _stop(self, w: int) -> None:
        """The protocol stopped worker ``w`` (its STOP and FINAL are sent): schedule its drain."""
        p = self.protocols[w]
        self._waiting.discard(w)
        self._state[w] = _DRAINING
        self._draining.add(w)
        self.outcome.stop_reason[w] = p.stop_reason
        self.outcome.train_end[w] = p.train_end
        if all(s not in _TRAINING for s in self._state):
            self._drain_deadline = self.clock.now() + self.policy.drain_timeout
            if self._lazy_drain:
                for d in sorted(self._draining):
                    last = self.net.last_arrival(d)
                    if last is not None and last < self._wake_at[d]:
                        self._wake_at[d] = last
                        self.events.push(last, EventKind.WAKE, d)
        self._check_drained(w)

    def _check_drained(self, w: int, arrived: list | None = None) -> None:
        out, action = self.protocols[w].drain(self.clock.now(), arrived or [], self.net.stats[w].dead_peers)
        self._send(w, out)
        self._collect(w)
        if isinstance(action, Finished):
            self._state[w] = _DONE
            self._draining.discard(w)
            self.net.retire(w)
            self.outcome.drained[w] = True
            self.outcome.drain_end[w] = self.clock.now()
            return
        if self._lazy_drain and any(s in _TRAINING for s in self._state):
            return  # woken once the last worker stops (see _lazy_drain)
        nxt = self.net.next_arrival(w)
        if nxt is not None and nxt < self._wake_at[w]:
            self._wake_at[w] = nxt
            self.events.push(nxt, EventKind.WAKE, w)

    def _on_broadcast(self, src: int, time: float) -> None:
        for dst in self._waiting if self._lazy_drain else (*self._draining, *self._waiting):
            if dst != src:
                self._on_arrival(dst, time)

    def _on_arrival(self, dst: int, time: float) -> None:
        if self._lazy_drain and self._state[dst] == _DRAINING:
            return
        if self._state[dst] in (_DRAINING, _WAITING) and time < self._wake_at[dst]:
            self._wake_at[dst] = time
            self.events.push(time, EventKind.WAKE, dst)

    def _wake(self, w: int) -> None:
        state = self._state[w]
        if state == _WAITING:
            if self.clock.now() >= self._wake_at[w]:
                self._wake_at[w] = math.inf
            self._start(w)  # a stale wake-up is harmless here: it only re-checks
            return
        if state != _DRAINING or self.clock.now() < self._wake_at[w]:
            return  # a stale wake-up: an earlier one was scheduled after it
        self._wake_at[w] = math.inf
        self._check_drained(w, self._poll(w))

    def _crash(self, w: int) -> None:
        if self._state[w] in (_DONE, _DEAD):
            return
        if self._state[w] in _TRAINING and math.isnan(self.outcome.train_end[w]):
            self.outcome.train_end[w] = self.clock.now()
        self._state[w] = _DEAD
        self._draining.discard(w)
        self._waiting.discard(w)
        self.outcome.crashed[w] = True
        self.outcome.stop_reason[w] = "crashed"
        self._pending.pop(w, None)
        self._inflight.pop(w, None)
        self.net.crash(w)
        # A real process's links close when it dies, and each neighbour sees its connection drop one latency
        # later; without this a survivor that never sends to the dead worker again (a barrier waiting for its
        # step, a client waiting for the server's reply) would wait for it forever.
        now = self.clock.now()
        for peer in self.workers[w].topology.neighbors(w):
            if self._state[peer] not in (_DONE, _DEAD):
                self.events.push(now + self.net.model.link(w, peer).latency, EventKind.PEER_DEAD, peer, w)
        if all(s not in _TRAINING for s in self._state):
            self._drain_deadline = min(self._drain_deadline, now + self.policy.drain_timeout)

    def _peer_dead(self, w: int, dead: int) -> None:
        """Worker ``w`` notices that its neighbour ``dead`` died: the protocol hears it at its next step, and a
        worker waiting on peers (or draining) looks again now."""
        if self._state[w] in (_DONE, _DEAD):
            return
        self.net.stats[w].dead_peers.add(dead)
        if self._state[w] == _WAITING:
            self._start(w)
        elif self._state[w] == _DRAINING:
            self._check_drained(w, self._poll(w))

    def _stalled(self) -> None:
        """Nothing is left to happen but evaluations: every worker still training waits on peers that will never
        send (an algorithm waiting on a worker that stopped, say). A real run would wait for its time budget;
        in virtual time that is forever, so each such worker stops now with reason "stalled" (reported)."""
        now = self.clock.now()
        for w in range(len(self.workers)):
            if self._state[w] in _TRAINING:
                self._send(w, self.protocols[w].stop(now, "stalled"))
                self._stop(w)

    def _evaluate(self) -> None:
        self._eval_pending = 0
        live = [r for r, s in enumerate(self._state) if s != _DEAD]
        if not live:
            return
        e = self._evaluator = live[0]
        t = self.clock.now()
        self.outcome.evals.append(
            self.protocols[e].evaluated(t, self.task.evaluate(self.workers[e].model, full=False))
        )
        if self._state[e] in _TRAINING:
            self.events.push(t + self.policy.eval_every, EventKind.EVALUATE)
            self._eval_pending = 1

    def _progress(self) -> dict:
        return {
            "time": self.clock.now(),
            "computed": sum(w.computed for w in self.workers),
            "applied": self.workers[self._evaluator].applied,
            "training": sum(s in _TRAINING for s in self._state),
            **{k: v for k, v in self.protocols[self._evaluator].last_metrics.items() if isinstance(v, float)},
        }
