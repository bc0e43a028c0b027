"""Evaluation off the training path: snapshots of the replica evaluated on a background thread.

Evaluating the replica in the training thread made the evaluating worker a straggler nobody was told about:
on the Fashion-MNIST CNN an evaluation (2,000 test samples and a gradient over the training subset) takes
about 0.6 s against 10 ms per gradient, so with an evaluation every 0.25 s worker 0 computed 392 gradients
while the others computed 1,353 each. Now the training thread only copies the replica (its flat parameter
vector and its buffers: a :class:`Snapshot`, microseconds) and goes on; one evaluation thread per process
evaluates the copy on its own model and hands the metrics back, which the training thread records at its
next step. The replica keeps changing meanwhile: the record carries the snapshot's time and the gradients
the replica held at the snapshot, so it describes the model that was evaluated.

What it still costs is counted (:class:`EvaluationCost`) and reported per worker in the run's summary:
the seconds the evaluations took, the CPU seconds the evaluation thread used (taken from the same cores the
training threads run on: a 5th busy thread among 4 workers on 2 cores slows all of them a little, not one of
them a lot), the seconds the training thread itself spent on evaluation (taking snapshots), and the seconds
the worker waited after its drain for the evaluation still in flight.

One evaluation at a time: the next snapshot is taken only after the last one's metrics came back (and
``eval_every`` later, as before), so records stay in order and the evaluation thread is never queued up.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["BackgroundEvaluator", "EvaluationCost", "Snapshot"]


@dataclass(frozen=True)
class Snapshot:
    """A copy of a replica at one moment: its flat parameters and its buffers, and what it held then."""

    time: float
    """The driver's clock when it was taken (the evaluation record's time)."""
    gradients: int
    """Gradients the replica held then (the evaluation record's ``gradients``)."""
    params: torch.Tensor
    """A copy of the flat parameter vector (never changed afterwards)."""
    buffers: tuple[torch.Tensor, ...]
    """Copies of the model's buffers (e.g. batch-norm statistics), in ``model.buffers()`` order."""

    @classmethod
    def take(cls, params: torch.Tensor, model: nn.Module, now: float, gradients: int) -> Snapshot:
        """Copy ``params`` (the replica's flat vector) and ``model``'s buffers as they are now."""
        with torch.no_grad():
            return cls(
                now,
                int(gradients),
                params.detach().clone(),
                tuple(b.detach().clone() for b in model.buffers()),
            )


@dataclass
class EvaluationCost:
    """What the evaluations of one worker cost (seconds), as its summary entry reports them."""

    background: bool = True
    """Whether the evaluations ran on a background thread (else on the training thread: all of ``eval_s``
    paused training)."""
    evaluations: int = 0
    """Evaluations taken during the run (the final one, after the drain, is not counted)."""
    eval_s: float = 0.0
    """Wall seconds the evaluations ran (on the evaluation thread, while training went on)."""
    eval_cpu_s: float = 0.0
    """CPU seconds the evaluation thread used: what evaluation took from the cores training shares."""
    eval_pause_s: float = 0.0
    """Seconds the training thread itself spent on evaluation during training (taking the snapshots; all of
    ``eval_s`` on the training thread)."""
    eval_wait_s: float = 0.0
    """Seconds the worker waited, after its drain, for the evaluation still in flight (no gradient lost: it
    delays the final evaluation and the end of the run)."""

    def to_dict(self) -> dict[str, float | int | bool]:
        """The counts as the summary stores them."""
        return {
            "background": self.background,
            "evaluations": self.evaluations,
            "eval_s": self.eval_s,
            "eval_cpu_s": self.eval_cpu_s,
            "eval_pause_s": self.eval_pause_s,
            "eval_wait_s": self.eval_wait_s,
        }


@dataclass
class _Done:
    snapshot: Snapshot
    metrics: Mapping[str, float] | None
    error: BaseException | None
    wall_s: float
    cpu_s: float
    finished: float = field(default=0.0)


class BackgroundEvaluator:
    """Evaluates snapshots of a replica on one daemon thread, one at a time.

    Args:
        evaluate: ``evaluate(model) -> metrics``, called on the evaluation thread with a private copy of the
            model that holds the snapshot's parameters and buffers.
        model: the replica's module (copied once, at the first snapshot: the copy is what gets evaluated).
        clock: ``() -> float``, the driver's clock (for the time an evaluation is over).
        threads: torch intra-op threads of the evaluation thread (default 1: an evaluation never takes more
            than one core). With PyTorch's OpenMP backend the count is per calling thread, so this leaves the
            training thread's own count alone; other backends keep one count per process, which is then left
            as it is (the evaluation thread uses the training's).

    The training thread calls :meth:`submit` (returns at once) and :meth:`poll` (the finished evaluation, if
    any); :meth:`wait` blocks for the one in flight. An exception in ``evaluate`` is raised again by the
    :meth:`poll` or :meth:`wait` that collects it.
    """

    def __init__(
        self,
        evaluate: Callable[[nn.Module], Mapping[str, float]],
        model: nn.Module,
        clock: Callable[[], float],
        threads: int = 1,
    ) -> None:
        self._evaluate = evaluate
        self._threads = threads
        self._source = model
        self._clock = clock
        self._model: nn.Module | None = None
        self._params: list[nn.Parameter] = []
        self._buffers: list[torch.Tensor] = []
        self._jobs: queue.SimpleQueue[Snapshot | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[_Done] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.pending: Snapshot | None = None
        """The snapshot being evaluated (None: the evaluation thread is idle)."""
        self.cost = EvaluationCost()

    @property
    def busy(self) -> bool:
        """Whether an evaluation is in flight."""
        return self.pending is not None

    def submit(self, params: torch.Tensor, now: float, gradients: int) -> Snapshot:
        """Snapshot the replica (``params``, its flat vector, and the model's buffers) and evaluate the copy
        in the background. Only one evaluation may be in flight."""
        if self.pending is not None:
            raise RuntimeError("an evaluation is already in flight: collect it with poll() or wait() first")
        t0 = time.perf_counter()
        snapshot = Snapshot.take(params, self._source, now, gradients)
        if self._thread is None:
            self._start()
        self.pending = snapshot
        self._jobs.put(snapshot)
        self.cost.eval_pause_s += time.perf_counter() - t0
        return snapshot

    def poll(self) -> tuple[Snapshot, Mapping[str, float], float] | None:
        """The finished evaluation as (snapshot, metrics, the clock when it was over), or None if none is."""
        try:
            done = self._done.get_nowait()
        except queue.Empty:
            return None
        return self._collect(done)

    def wait(self, timeout: float | None = None) -> tuple[Snapshot, Mapping[str, float], float] | None:
        """Block until the evaluation in flight is over (None if none is, or ``timeout`` passed first)."""
        if self.pending is None:
            return None
        t0 = time.perf_counter()
        try:
            done = self._done.get(timeout=timeout)
        except queue.Empty:
            return None
        finally:
            self.cost.eval_wait_s += time.perf_counter() - t0
        return self._collect(done)

    def close(self) -> None:
        """Let the evaluation thread end once it is idle (it is a daemon: it never holds a process up)."""
        if self._thread is not None:
            self._jobs.put(None)

    # -- helpers ------------------------------------------------------------------------------------------
    def _collect(self, done: _Done) -> tuple[Snapshot, Mapping[str, float], float]:
        self.pending = None
        if done.error is not None:
            raise done.error
        assert done.metrics is not None
        self.cost.evaluations += 1
        self.cost.eval_s += done.wall_s
        self.cost.eval_cpu_s += done.cpu_s
        return done.snapshot, done.metrics, done.finished

    def _start(self) -> None:
        # A private copy of the module, evaluated with each snapshot's values: the replica is never touched
        # from this thread (evaluation may compute gradients, which would land in the replica's .grad).
        model = copy.deepcopy(self._source)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._buffers = list(model.buffers())
        self._model = model
        self._thread = threading.Thread(target=self._run, name="dasgd-evaluation", daemon=True)
        self._thread.start()

    def _load(self, snapshot: Snapshot) -> None:
        with torch.no_grad():
            offset = 0
            for p in self._params:
                n = p.numel()
                p.copy_(snapshot.params[offset : offset + n].view_as(p))
                offset += n
            for b, s in zip(self._buffers, snapshot.buffers, strict=True):
                b.copy_(s)

    def _run(self) -> None:
        if torch.backends.openmp.is_available() and torch.get_num_threads() != self._threads:
            torch.set_num_threads(self._threads)  # this thread's own count (see the class doc)
        while True:
            snapshot = self._jobs.get()
            if snapshot is None:
                return
            w0, c0 = time.perf_counter(), time.thread_time()
            metrics: Mapping[str, float] | None = None
            error: BaseException | None = None
            try:
                self._load(snapshot)
                assert self._model is not None
                metrics = dict(self._evaluate(self._model))
            except BaseException as exc:  # handed to the training thread, which raises it
                error = exc
            wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
            self._done.put(_Done(snapshot, metrics, error, wall, cpu, self._clock()))
