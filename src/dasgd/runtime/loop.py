"""The one real-time training loop: drives a Worker over a Transport until a stop rule fires, then drains.

Policy lives here, mechanism in the Worker (STYLE.md, 4): when to stop, when to evaluate, how a straggler
is emulated, when progress is reported. Every algorithm runs through this loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from dasgd.core.ledger import StalenessLedger
from dasgd.runtime.clock import Clock
from dasgd.transport.base import Transport
from dasgd.worker.rules import stop_reason
from dasgd.worker.worker import Outgoing, Worker

__all__ = ["LoopConfig", "LoopResult", "WorkerLoop", "send_all"]


@dataclass(frozen=True)
class LoopConfig:
    """The loop's policy, in plain values."""

    max_gradients: int | None = None
    """Stop once the replica holds this many gradients (its view of the run's total T)."""
    max_seconds: float | None = None
    target_accuracy: float | None = None
    accuracy_metric: str | None = "test_accuracy"
    eval_every: float = 0.5
    """Seconds between evaluations (only when an evaluator is given)."""
    slowdown: float = 1.0
    """A straggler's factor: after each gradient computation, wait (slowdown - 1) times its duration."""
    drain_timeout: float = 120.0
    progress_every: float = 0.25


@dataclass
class LoopResult:
    """What one worker's loop did."""

    stop_reason: str
    train_end: float
    """Clock time at which this worker stopped computing."""
    drained: bool
    """Every final count was received and applied before the drain timeout."""
    drain_end: float
    evals: list[dict] = field(default_factory=list)


def send_all(transport: Transport, outgoing: list[Outgoing]) -> None:
    """Hand each (peer, message) pair to the transport."""
    for peer, msg in outgoing:
        transport.send(peer, msg)


class WorkerLoop:
    """Runs one worker in real (or any injected) time.

    Args:
        worker: the worker to drive.
        transport: its endpoint.
        clock: time source.
        ledger: where each own gradient's record (clock at start, completion time) goes.
        config: stop rules, evaluation and straggler policy.
        evaluator: ``evaluator() -> metrics`` on this worker's replica, or None (only one worker evaluates).
        on_progress: called with a small dict every ``config.progress_every`` seconds.
    """

    def __init__(
        self,
        worker: Worker,
        transport: Transport,
        clock: Clock,
        ledger: StalenessLedger,
        config: LoopConfig,
        evaluator: Callable[[], dict[str, float]] | None = None,
        on_progress: Callable[[dict], None] | None = None,
    ) -> None:
        self.worker = worker
        self.transport = transport
        self.clock = clock
        self.ledger = ledger
        self.config = config
        self.evaluator = evaluator
        self.on_progress = on_progress
        self.evals: list[dict] = []
        self._last_metrics: dict[str, float] = {}

    def run(self) -> LoopResult:
        """Train until a stop rule fires here or a peer asks to stop, then drain. Returns what happened."""
        w, cfg, clock = self.worker, self.config, self.clock
        start = clock.now()
        next_eval = start
        next_progress = start
        reason = ""
        while True:
            send_all(self.transport, w.receive(self.transport.poll()))
            now = clock.now()
            if self.evaluator is not None and now >= next_eval:
                self._evaluate(now)
                next_eval = clock.now() + cfg.eval_every
            reason = self._stop_reason(now - start)
            if reason:
                break
            if not w.ready:
                # The algorithm waits on peers (a synchronous step, a server's reply; a server never computes).
                # Messages, evaluations and stop rules go on meanwhile.
                self.transport.wait(min(0.05, max(0.0, next_eval - now)) if self.evaluator else 0.05)
                continue
            t0 = clock.now()
            gradient = w.compute()
            t1 = clock.now()
            if cfg.slowdown > 1.0:
                # A straggler computes `slowdown` times slower (slower hardware): its gradient is complete, and
                # leaves, only after that. Only the computation is scaled, not message handling.
                clock.sleep((cfg.slowdown - 1.0) * (t1 - t0))
                t1 = clock.now()
            self.ledger.record(w.rank, w.computed, t0, t1, gradient.clock)
            send_all(self.transport, w.commit(gradient))
            if self.on_progress is not None and t1 >= next_progress:
                self.on_progress(self._progress(t1, "training"))
                next_progress = t1 + cfg.progress_every
        if reason != "stop_requested":
            send_all(self.transport, w.request_stop())
        send_all(self.transport, w.finish())
        train_end = clock.now()
        drained = self._drain(train_end + cfg.drain_timeout)
        drain_end = clock.now()
        if self.on_progress is not None:
            self.on_progress(self._progress(drain_end, "drained" if drained else "drain_timeout"))
        return LoopResult(reason, train_end, drained, drain_end, self.evals)

    def _drain(self, deadline: float) -> bool:
        """Apply and forward until every worker's final count is in; then flush what is still queued."""
        w = self.worker
        while not w.complete:
            remaining = deadline - self.clock.now()
            if remaining <= 0:
                return False
            self.transport.wait(min(0.05, remaining))
            # Read the dead peers before polling: a receiver marks its peer dead only after putting what the
            # peer sent in the inbox, so this poll holds all of it and the drain cannot end short of it.
            dead = set(self.transport.stats().dead_peers)
            send_all(self.transport, w.receive(self.transport.poll()))
            for peer in dead:
                w.declare_dead(peer)
        return self.transport.flush(max(0.0, deadline - self.clock.now()))

    def _stop_reason(self, elapsed: float) -> str:
        cfg = self.config
        return stop_reason(
            self.worker,
            elapsed,
            self._last_metrics,
            cfg.max_gradients,
            cfg.max_seconds,
            cfg.target_accuracy,
            cfg.accuracy_metric,
        )

    def _evaluate(self, now: float) -> None:
        assert self.evaluator is not None
        metrics = self.evaluator()
        self._last_metrics = metrics
        self.evals.append(
            {"worker": self.worker.rank, "time": now, "gradients": self.worker.applied, **metrics}
        )

    def _progress(self, now: float, phase: str) -> dict:
        return {
            "rank": self.worker.rank,
            "time": now,
            "phase": phase,
            "computed": self.worker.computed,
            "applied": self.worker.applied,
            **{k: v for k, v in self._last_metrics.items() if isinstance(v, float)},
        }
