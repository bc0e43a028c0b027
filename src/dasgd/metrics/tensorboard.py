"""TensorBoard scalars of a run: loss, accuracy, staleness and throughput, per worker.

Two entry points:

- :class:`TensorBoardLog`: a small writer, ``TensorBoardLog(dir).scalar(tag, value, step, worker=w)``, for any
  driver that wants to log as it goes (the ``dasgd.DecentralizedSGD`` wrapper can call it from a user's loop);
- :func:`write_run_scalars`: every scalar of a finished run, built from its records (the run's
  :class:`~dasgd.metrics.eventlog.EventLog`), so ``dasgd report RUN_DIR --tensorboard`` regenerates the same
  files from ``events.jsonl`` alone. ``dasgd train/simulate --tensorboard`` writes them to
  ``RUN_DIR/tensorboard``; view them with ``tensorboard --logdir RUN_DIR/tensorboard``.

TensorBoard is an optional extra (``pip install 'dasgd[tensorboard]'``): without it, creating a
:class:`TensorBoardLog` raises :class:`TensorBoardMissing` with that command (the CLI refuses the flag before
anything runs, exit code 2).

Tags (``/worker<r>`` is appended to every per-worker tag; TensorBoard groups tags by their first part):

==============================  =====================================================  ======================
tag                             value                                                  step
==============================  =====================================================  ======================
``eval/<metric>/worker<r>``     each evaluation's metric (test_accuracy, test_loss,    gradients the evaluated
                                loss, ...) of worker r's replica                       replica held
``staleness/s_k/worker<r>``     mean staleness s_k of worker r's gradients in a        gradients completed (all
                                window of the run                                      workers), window end
``staleness/s_k/all``           mean s_k of all gradients in the window                same
``throughput/grad_per_s/...``   gradients per second of worker r (and ``all``) in      same
                                the window
==============================  =====================================================  ======================

Every scalar's wall time is the run's own time (seconds since the start; virtual seconds for a simulation),
so TensorBoard's "relative" axis is the run's time axis. Long runs are cut into at most ``windows`` windows
(default 500) per series, and per-worker staleness and throughput series are written for the first
``max_workers`` workers only (default 64): at 1,000 workers the aggregate series say more than 1,000 lines.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from dasgd.errors import DasgdError
from dasgd.metrics.eventlog import EVAL_RESERVED_KEYS, EventLog

__all__ = [
    "INSTALL_HINT",
    "TensorBoardLog",
    "TensorBoardMissing",
    "tensorboard_available",
    "write_run_scalars",
]

INSTALL_HINT = "pip install 'dasgd[tensorboard]'"
"""The command that installs what TensorBoard output needs."""


class TensorBoardMissing(DasgdError, ImportError):
    """The ``tensorboard`` package is not installed; the message holds the install command."""


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package can be imported (TensorBoard output works)."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardLog:
    """A TensorBoard event-file writer into ``log_dir`` (created): scalars by tag, optionally per worker.

    Raises:
        TensorBoardMissing: the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        if not tensorboard_available():
            raise TensorBoardMissing(f"TensorBoard output needs the tensorboard package: {INSTALL_HINT}")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer: Any = SummaryWriter(log_dir=str(self.log_dir))

    def scalar(
        self,
        tag: str,
        value: float,
        step: int,
        *,
        worker: int | str | None = None,
        time: float | None = None,
    ) -> None:
        """Log ``value`` under ``tag`` (``tag/worker<r>`` when ``worker`` is given; ``tag/all`` for "all") at
        ``step``; ``time`` is the wall time shown by TensorBoard (default: now). Non-finite values are
        logged as they are (TensorBoard shows them as gaps)."""
        if worker is not None:
            tag = f"{tag}/{worker}" if isinstance(worker, str) else f"{tag}/worker{int(worker)}"
        self._writer.add_scalar(tag, float(value), global_step=int(step), walltime=time)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _windows(end: np.ndarray, windows: int) -> np.ndarray:
    """Window edges (times) over the gradient completion times ``end``: at most ``windows`` equal windows."""
    if end.size == 0:
        return np.zeros(0)
    top = float(end.max())
    count = max(1, min(windows, end.size))
    return np.linspace(0.0, top, count + 1) if top > 0 else np.array([0.0, 1.0])


def write_run_scalars(
    log: EventLog,
    out_dir: str | os.PathLike[str],
    *,
    windows: int = 500,
    max_workers: int = 64,
) -> Path:
    """Write the run's scalars (module docstring) into ``out_dir``, replacing earlier event files there.

    Raises:
        TensorBoardMissing: the ``tensorboard`` package is not installed.
    """
    out = Path(out_dir)
    if out.is_dir():
        for old in out.glob("events.out.tfevents.*"):
            old.unlink()  # regenerated from the records: never two copies of one series
    with TensorBoardLog(out) as tb:
        for ev in log.evals:
            for key, value in ev.items():
                if key in EVAL_RESERVED_KEYS or key == "final" or not isinstance(value, (int, float)):
                    continue
                tb.scalar(
                    f"eval/{key}",
                    value,
                    int(ev["gradients"]),
                    worker=int(ev["worker"]),
                    time=float(ev["time"]),
                )
        if log.num_gradients:
            _gradient_scalars(tb, log, windows, max_workers)
    return out


def _gradient_scalars(tb: TensorBoardLog, log: EventLog, windows: int, max_workers: int) -> None:
    end = np.asarray(log.end, dtype=np.float64)
    origin = np.asarray(log.origin, dtype=np.int64)
    stale: np.ndarray | None = None
    if log.clock.shape[0] == log.num_gradients:
        stats = log.staleness()
        stale = np.empty(log.num_gradients, dtype=np.float64)
        stale[stats.order] = stats.per_gradient  # s_k back in the log's row order
    edges = _windows(end, windows)
    slot = np.clip(np.searchsorted(edges, end, side="right") - 1, 0, len(edges) - 2)
    completed = np.cumsum(np.bincount(slot, minlength=len(edges) - 1))
    width = np.diff(edges)
    series: list[tuple[str | int, np.ndarray]] = [("all", np.ones(end.size, dtype=bool))]
    series += [(int(w), origin == w) for w in np.unique(origin)[:max_workers]]
    for name, mask in series:
        counts = np.bincount(slot[mask], minlength=len(edges) - 1)
        sums = (
            np.bincount(slot[mask], weights=stale[mask], minlength=len(edges) - 1)
            if stale is not None
            else None
        )
        for i in np.nonzero(counts)[0]:
            step, when = int(completed[i]), float(edges[i + 1])
            if width[i] > 0 and math.isfinite(width[i]):
                tb.scalar("throughput/grad_per_s", counts[i] / width[i], step, worker=name, time=when)
            if sums is not None:
                tb.scalar("staleness/s_k", sums[i] / counts[i], step, worker=name, time=when)
