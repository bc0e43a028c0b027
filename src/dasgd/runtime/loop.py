"""The real-time driver of the worker protocol: wall clock, blocking transport waits, straggler emulation.

The protocol (worker/protocol.py) decides everything a worker does: when it stops, when it computes or
waits, how it drains. This loop only carries its actions out in real (or any injected) time, evaluates the
replica when the protocol says it is due (on a snapshot, in the background, when given ``evaluate_model``:
runtime/evaluation.py), emulates a straggler, and reports progress.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dasgd.core.ledger import StalenessLedger
from dasgd.runtime.clock import Clock
from dasgd.runtime.evaluation import BackgroundEvaluator, EvaluationCost
from dasgd.transport.base import Transport
from dasgd.worker.checkpoint import CheckpointError, WorkerState
from dasgd.worker.protocol import Compute, Finished, Phase, StopPolicy, WorkerProtocol
from dasgd.worker.worker import Outgoing, Worker

__all__ = ["LoopResult", "WorkerLoop", "send_all"]


@dataclass
class LoopResult:
    """What one worker's loop did."""

    stop_reason: str
    train_end: float
    """Clock time at which this worker stopped computing."""
    drained: bool
    """Every final count was received and applied, and everything queued was sent, before the deadline."""
    drain_end: float
    evals: list[dict] = field(default_factory=list)
    eval_cost: dict = field(default_factory=dict)
    """What evaluating cost this worker (:meth:`~dasgd.runtime.evaluation.EvaluationCost.to_dict`), {} if it
    evaluated nothing during training."""


def send_all(transport: Transport, outgoing: list[Outgoing]) -> None:
    """Hand each (peer, message) pair to the transport."""
    for peer, msg in outgoing:
        transport.send(peer, msg)


class WorkerLoop:
    """Runs one worker's protocol in real (or any injected) time.

    Args:
        worker: the worker to drive.
        transport: its endpoint.
        clock: time source (``now`` and ``sleep``).
        ledger: where each own gradient's record (clock at start, completion time) goes.
        policy: the stop rules, evaluation cadence and drain timeout.
        evaluator: ``evaluator() -> metrics`` on this worker's replica, or None (never evaluates). Every
            worker may be given one: only the lowest live rank this worker knows of evaluates, so when
            worker 0 dies the next takes over evaluation and the target-accuracy stop (``evaluates``).
        on_progress: called with a small dict every ``progress_every`` seconds.
        slowdown: a straggler's factor: after each gradient computation, wait (slowdown - 1) times its
            duration (slower hardware: the gradient is complete, and leaves, only after that).
        on_evaluation: called with each evaluation's record as it is taken (to stream it to disk).
        evaluate_model: ``evaluate_model(model) -> metrics``: evaluations run on a snapshot of the replica
            (flat parameters and buffers, copied when one is due), on a background thread, while training
            goes on; the record (snapshot time, gradients held then, metrics) is taken when the metrics come
            back, one evaluation at a time, so records stay in order and the target-accuracy stop fires from
            them a little later. Takes precedence over ``evaluator`` (which runs on the training thread).
        checkpoint_every: seconds between checkpoints (0: none). The lowest live rank this worker knows of
            starts checkpoint ``floor(t / checkpoint_every)`` at clock time ``t`` (the clocks share an origin,
            so ids increase over the run whoever starts them); markers do the rest (docs/design.md).
        on_checkpoint: called with this worker's part of a checkpoint once complete (a
            :class:`~dasgd.worker.checkpoint.WorkerState`), on the training thread: hand it to a writer that
            works in the background.
        extra_state: the driver's state saved with each part (the batch sampler's, JSON-able).
        resume_from: this worker's part of the checkpoint to continue from (the worker is built, not loaded:
            the protocol loads it; ``extra_state``'s owner restores its own part).
    """

    def __init__(
        self,
        worker: Worker,
        transport: Transport,
        clock: Clock,
        ledger: StalenessLedger,
        policy: StopPolicy,
        evaluator: Callable[[], dict[str, float]] | None = None,
        on_progress: Callable[[dict], None] | None = None,
        slowdown: float = 1.0,
        progress_every: float = 0.25,
        on_evaluation: Callable[[dict], None] | None = None,
        evaluate_model: Callable[[Any], Mapping[str, float]] | None = None,
        checkpoint_every: float = 0.0,
        on_checkpoint: Callable[[WorkerState], None] | None = None,
        extra_state: Callable[[], dict] | None = None,
        resume_from: WorkerState | None = None,
    ) -> None:
        self.worker = worker
        self.transport = transport
        self.clock = clock
        self.ledger = ledger
        self.policy = policy
        self.evaluator = evaluator
        self.on_progress = on_progress
        self.slowdown = slowdown
        self.progress_every = progress_every
        self.on_evaluation = on_evaluation
        self.evaluate_model = evaluate_model
        self.background: BackgroundEvaluator | None = None
        """The background evaluator, once this worker took its first evaluation with ``evaluate_model``."""
        self.inline_cost = EvaluationCost(background=False)
        """What the evaluations on the training thread (``evaluator``) cost: all of it pauses training."""
        self.checkpoint_every = checkpoint_every
        self.on_checkpoint = on_checkpoint
        self.extra_state = extra_state
        self.resume_from = resume_from
        self.checkpoint_errors: list[str] = []
        """Why checkpoints this worker started were refused (a worker died, the run is stopping, ...)."""
        self.protocol: WorkerProtocol | None = None

    @property
    def evaluates(self) -> bool:
        """Whether this worker evaluates now: it has an evaluator and no lower rank is alive as far as it knows."""
        if self.evaluator is None and self.evaluate_model is None:
            return False
        w = self.worker
        return w.rank == 0 or w.dead.issuperset(range(w.rank))

    def run(self) -> LoopResult:
        """Train until a stop rule fires here or a peer asks to stop, then drain. Returns what happened."""
        w, clock, transport = self.worker, self.clock, self.transport
        if self.resume_from is None:
            p = WorkerProtocol(w, self.policy, self.ledger, start=clock.now(), extra_state=self.extra_state)
        else:
            p = WorkerProtocol.resume(
                w, self.policy, self.resume_from, self.ledger, redeliver=True, extra_state=self.extra_state
            )
        self.protocol = p
        if self.resume_from is not None:
            self._last_started = self.resume_from.checkpoint  # ids go on above the one resumed from
        next_progress = clock.now()
        while True:
            now = clock.now()
            if self.evaluates:
                self._evaluate(p, now)
            self._maybe_begin_checkpoint(p, now)
            dead = transport.stats().dead_peers  # before polling: see the drain below
            out, action = p.step(clock.now(), transport.poll(), dead)
            send_all(transport, out)
            self._hand_over(p)
            if isinstance(action, Compute):
                t0 = clock.now()
                gradient = w.compute()
                t1 = clock.now()
                if self.slowdown > 1.0:
                    # Only the computation is scaled, not message handling.
                    clock.sleep((self.slowdown - 1.0) * (t1 - t0))
                    t1 = clock.now()
                send_all(transport, p.gradient_done(gradient, t0, t1))
                self._hand_over(p)
                if self.on_progress is not None and t1 >= next_progress:
                    self.on_progress(self._progress(t1))
                    next_progress = t1 + self.progress_every
            elif p.phase is Phase.WAITING:
                # The algorithm waits on peers (a synchronous step, a server's reply; a server never
                # computes). Messages, evaluations and stop rules go on meanwhile.
                transport.wait(self._wait_bound(p, now))
            else:
                break
        while True:
            # Read the dead peers before polling: a receiver marks its peer dead only after putting what the
            # peer sent in the inbox, so this poll holds all of it and the drain cannot end short of it.
            dead = set(transport.stats().dead_peers)
            out, action = p.drain(clock.now(), transport.poll(), dead)
            send_all(transport, out)
            self._hand_over(p)  # a cut every worker joined before stopping may complete during the drain
            self._collect(p, block=False)
            if isinstance(action, Finished):
                break
            remaining = p.drain_deadline - clock.now()
            if remaining <= 0:
                p.give_up(clock.now())
                break
            transport.wait(min(0.05, remaining))
        flushed = p.drained and transport.flush(max(0.0, p.drain_deadline - clock.now()))
        drain_end = clock.now()
        # The evaluation still in flight is recorded (in order, before the caller's final one).
        self._collect(p, block=True)
        if self.on_progress is not None:
            self.on_progress(self._progress(drain_end))
        if self.background is not None:
            self.background.close()
            cost = self.background.cost.to_dict()
        else:
            cost = self.inline_cost.to_dict() if self.inline_cost.evaluations else {}
        return LoopResult(p.stop_reason, p.train_end, flushed, drain_end, p.evals, cost)

    @property
    def initiates_checkpoints(self) -> bool:
        """Whether this worker starts the checkpoints: the lowest live rank it knows of."""
        w = self.worker
        return self.checkpoint_every > 0 and (w.rank == 0 or w.dead.issuperset(range(w.rank)))

    def _maybe_begin_checkpoint(self, p: WorkerProtocol, now: float) -> None:
        if not self.initiates_checkpoints or p.checkpointing is not None:
            return
        cid = int(now // self.checkpoint_every)
        if self.checkpoint_requested:
            # One now (the launcher was interrupted): an id above any taken, and the periodic ones go on above.
            self.checkpoint_requested = False
            cid = max(cid, self._last_started + 1)
        elif cid <= self._last_started:
            return
        self._last_started = cid
        if cid <= 0:
            return  # none at the very start
        try:
            send_all(self.transport, p.begin_checkpoint(cid, now))
        except CheckpointError as e:
            self.checkpoint_errors.append(str(e))
        self._hand_over(p)  # a worker without incoming links completes its part at once

    _last_started = 0
    checkpoint_requested = False
    """Set (from a signal handler, say) to start a checkpoint at the next step, whatever the interval."""

    def _hand_over(self, p: WorkerProtocol) -> None:
        if p.checkpoint_ready:
            state = p.checkpoint_state()
            if self.on_checkpoint is not None:
                self.on_checkpoint(state)

    def _evaluate(self, p: WorkerProtocol, now: float) -> None:
        """Collect a finished background evaluation; start the next one (or evaluate inline) when due."""
        if self.evaluate_model is None:
            if p.evaluation_due(now):
                assert self.evaluator is not None
                w0, c0 = time.perf_counter(), time.thread_time()
                metrics = self.evaluator()
                spent = time.perf_counter() - w0
                c = self.inline_cost
                c.evaluations += 1
                c.eval_s += spent
                c.eval_pause_s += spent
                c.eval_cpu_s += time.thread_time() - c0
                self._record(p.evaluated(now, metrics, finished=self.clock.now()))
            return
        if self.background is None:
            self.background = BackgroundEvaluator(self.evaluate_model, self.worker.model, self.clock.now)
        self._collect(p, block=False)
        if not self.background.busy and p.evaluation_due(now):
            self.background.submit(self.worker.params, now, self.worker.applied)

    def _collect(self, p: WorkerProtocol, block: bool) -> None:
        bg = self.background
        if bg is None:
            return
        done = bg.wait() if block else bg.poll()
        if done is not None:
            snapshot, metrics, finished = done
            self._record(p.evaluated(snapshot.time, metrics, finished=finished, gradients=snapshot.gradients))

    def _record(self, record: dict) -> None:
        if self.on_evaluation is not None:
            self.on_evaluation(record)

    def _wait_bound(self, p: WorkerProtocol, now: float) -> float:
        """How long a waiting worker may block on its transport: until the next evaluation is due, and not
        long while one runs in the background (its result is picked up at the next step)."""
        if not self.evaluates:
            return 0.05
        if self.background is not None and self.background.busy:
            return 0.01
        return min(0.05, max(0.0, p.next_eval - now))

    def _progress(self, now: float) -> dict:
        p = self.protocol
        assert p is not None
        if p.phase is Phase.DONE:
            phase = "drained" if p.drained else "drain_timeout"
        else:
            phase = "training"  # waiting on peers is part of training, as a person watching sees it
        return {
            "rank": self.worker.rank,
            "time": now,
            "phase": phase,
            "computed": self.worker.computed,
            "applied": self.worker.applied,
            **{k: v for k, v in p.last_metrics.items() if isinstance(v, float)},
        }
