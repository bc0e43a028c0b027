"""TensorBoard scalars from a user's training loop (``DecentralizedSGD(..., tensorboard=DIR)``).

Every rank writes its own event file into the one directory, with its tags ending in ``/worker<r>``, so
``tensorboard --logdir DIR`` shows all workers side by side:

- ``throughput/updates_per_s/worker<r>``: own updates per second over the last ``every`` steps;
- ``staleness/peer_updates_per_step/worker<r>``: the peers' updates this replica applied per own step in that
  window (how far the replica moves between two of its own gradients: the staleness its next gradient adds);
- ``staleness/s_avg``, ``staleness/s_max`` (and the loose ``s_hat_*``): the run's exact staleness, once, at
  ``finish()``;
- whatever the loop logs itself with ``trainer.log_scalar(tag, value)`` (a loss, an accuracy), at the
  worker's own update count.
"""

from __future__ import annotations

import os
from typing import Any

from dasgd.metrics.tensorboard import INSTALL_HINT, TensorBoardLog, TensorBoardMissing, tensorboard_available

__all__ = ["WrapperScalars", "require_tensorboard"]


def require_tensorboard() -> None:
    """Raise :class:`TensorBoardMissing` (with the install command) unless TensorBoard output can work."""
    if not tensorboard_available():
        raise TensorBoardMissing(f"tensorboard= needs the tensorboard package: {INSTALL_HINT}")


class WrapperScalars:
    """One rank's TensorBoard writer for the wrapper: a window of steps at a time, plus the user's scalars."""

    def __init__(self, log_dir: str | os.PathLike[str], rank: int, every: int = 20) -> None:
        self._log = TensorBoardLog(log_dir)
        self.rank = rank
        self.every = max(1, int(every))
        self._window_start: tuple[int, int, float] | None = None  # (own updates, applied, time)

    def after_step(self, own: int, applied: int, now: float) -> None:
        """Called after each own update: ``own`` updates so far, ``applied`` updates held, at wall ``now``."""
        if self._window_start is None:
            self._window_start = (own, applied, now)
            return
        own0, applied0, t0 = self._window_start
        steps = own - own0
        if steps < self.every:
            return
        if now > t0:
            self._log.scalar("throughput/updates_per_s", steps / (now - t0), own, worker=self.rank)
        peers = (applied - applied0) - steps
        self._log.scalar("staleness/peer_updates_per_step", peers / steps, own, worker=self.rank)
        self._window_start = (own, applied, now)

    def user(self, tag: str, value: float, step: int) -> None:
        """A scalar the training loop logs itself (``trainer.log_scalar``)."""
        self._log.scalar(tag, value, step, worker=self.rank)

    def finish(self, report: Any, step: int) -> None:
        """The run's exact staleness from the finish report (rank 0 writes it: it is the same everywhere)."""
        if self.rank == 0:
            for tag, value in (
                ("staleness/s_avg", report.s_avg),
                ("staleness/s_max", report.s_max),
                ("staleness/s_hat_avg", report.loose_avg),
                ("staleness/s_hat_max", report.loose_max),
            ):
                self._log.scalar(tag, value, step)
        self._log.flush()

    def close(self) -> None:
        self._log.close()

