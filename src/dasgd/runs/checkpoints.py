"""Checkpoints of real runs on disk: where they go, who writes what, which are kept.

The cut itself is the protocol's (worker/protocol.py); the files are worker/checkpoint.py's. Here:

- ``RUN_DIR/checkpoints/<id>/`` holds checkpoint ``id`` (zero-padded, so names sort by id);
- each worker process writes its own part from a background thread (:class:`PartWriter`): training goes on
  while the tensors are serialised, checksummed and fsynced;
- the launcher finalises a checkpoint (writes its manifest) once every part is there (:func:`finalize_ready`),
  keeps the last :data:`KEEP` complete ones and removes the others, and removes an incomplete checkpoint
  older than the newest complete one: it was abandoned (a worker stopped or died before the marker reached
  it, or a newer cut overtook it) and is never waited for.
"""

from __future__ import annotations

import queue
import shutil
import threading
from pathlib import Path
from typing import Any

from dasgd.errors import DasgdError
from dasgd.experiments.spec import RunSpec
from dasgd.worker.checkpoint import (
    MANIFEST,
    CheckpointError,
    WorkerState,
    checkpoint_complete,
    finalize_checkpoint,
    read_checkpoint,
    write_worker_checkpoint,
)

__all__ = ["RESUME_DIR_ENV", "RESUME_HISTORY_ENV", "RESUME_TIME_ENV", "KEEP", "PartWriter", "ResumeRefused", "resume_point", "checkpoint_dir", "checkpoint_identity", "checkpoint_ids", "complete_checkpoints", "finalize_ready"]

RESUME_DIR_ENV = "DASGD_RESUME_DIR"
"""A resumed worker's checkpoint directory (set by the launcher)."""
RESUME_TIME_ENV = "DASGD_RESUME_TIME"
"""The clock time the resumed run goes on from: the latest local snapshot of the checkpoint."""
RESUME_HISTORY_ENV = "DASGD_RESUME_HISTORY"
"""Where the interrupted run's record streams were moved: each worker carries its records up to the cut over."""

KEEP = 2
"""How many complete checkpoints a run keeps (the newest)."""


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_dir(run_dir: Path, cid: int) -> Path:
    return checkpoints_root(run_dir) / f"{cid:012d}"


def checkpoint_identity(spec: RunSpec) -> dict[str, Any]:
    """What must match for a checkpoint to continue a run: the run's task, size, algorithm, data and stepsize.

    ``spec`` as the workers read it back from RUN_DIR/spec.yaml (the task's defaults filled in)."""
    return {
        "task": spec.task,
        "workers": spec.workers,
        "algorithm": spec.algorithm,
        "topology": spec.topology,
        "seed": spec.seed,
        "data": spec.data,
        "lr": spec.lr,
        "batch_size": spec.batch_size,
        "grads_per_message": spec.grads_per_message,
    }


def checkpoint_ids(run_dir: Path) -> list[int]:
    """The ids of every checkpoint directory, complete or not, oldest first."""
    return _ids(run_dir)


def _ids(run_dir: Path) -> list[int]:
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def complete_checkpoints(run_dir: Path) -> list[int]:
    """The ids of the checkpoints with a manifest, oldest first."""
    return [c for c in _ids(run_dir) if checkpoint_complete(checkpoint_dir(run_dir, c))]


def finalize_ready(run_dir: Path, spec: RunSpec) -> list[int]:
    """Write the manifest of every checkpoint whose parts are all there; drop what is no longer needed.

    Returns the ids finalised by this call. A checkpoint whose parts cannot be finalised (of another run,
    mismatched ids) is left as it is, without a manifest: a resume never uses it."""
    done = []
    identity = checkpoint_identity(spec)
    for cid in _ids(run_dir):
        path = checkpoint_dir(run_dir, cid)
        if checkpoint_complete(path):
            continue
        if all((path / f"worker-{r:05d}.json").is_file() for r in range(spec.workers)):
            try:
                finalize_checkpoint(path, spec.workers, identity)
                done.append(cid)
            except CheckpointError:
                pass
    complete = complete_checkpoints(run_dir)
    keep = set(complete[-KEEP:])
    newest = complete[-1] if complete else -1
    for cid in _ids(run_dir):
        if cid in keep or cid > newest:
            continue  # kept, or still being written
        shutil.rmtree(checkpoint_dir(run_dir, cid), ignore_errors=True)
    return done


class PartWriter:
    """Writes this worker's parts of checkpoints from one background thread, one at a time, in order.

    :meth:`submit` returns at once; :meth:`close` waits for what was submitted. A part that fails to be
    written (disk full, ...) is reported in ``errors`` and leaves the checkpoint without that part: it is
    never finalised, and the run goes on."""

    def __init__(self, run_dir: Path, spec: RunSpec) -> None:
        self.run_dir = Path(run_dir)
        self.identity = checkpoint_identity(spec)
        self.written: list[int] = []
        self.errors: list[str] = []
        self._queue: queue.Queue[WorkerState | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="dasgd-checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, state: WorkerState) -> None:
        self._queue.put(state)

    def _run(self) -> None:
        while True:
            state = self._queue.get()
            if state is None:
                return
            try:
                write_worker_checkpoint(checkpoint_dir(self.run_dir, state.checkpoint), state, self.identity)
                self.written.append(state.checkpoint)
            except (OSError, CheckpointError, ValueError) as e:
                self.errors.append(f"checkpoint {state.checkpoint}: {type(e).__name__}: {e}")

    def close(self, timeout: float | None = None) -> None:
        self._queue.put(None)
        self._thread.join(timeout)


class ResumeRefused(DasgdError, ValueError):
    """``--resume RUN_DIR`` cannot continue that run (no checkpoint, a partial or corrupted one, another spec)."""


def resume_point(run_dir: Path, spec: RunSpec) -> tuple[Path, list[WorkerState]]:
    """The checkpoint a resume of ``run_dir`` continues from (the newest complete one) and its parts, checked
    (manifest, checksums, the run's identity as ``spec`` gives it). Reads only: nothing is changed on disk.

    Raises :class:`ResumeRefused` with one line saying why it cannot be resumed."""
    run_dir = Path(run_dir)
    ids = _ids(run_dir)
    if not ids:
        raise ResumeRefused(
            f"{run_dir} has no checkpoint to resume from (none was completed: was --checkpoint-every 0, or did "
            "the run end before its first one?)"
        )
    complete = complete_checkpoints(run_dir)
    if not complete:
        newest = checkpoint_dir(run_dir, ids[-1])
        raise ResumeRefused(
            f"{newest} is a partial checkpoint ({MANIFEST} missing: not every worker's part was written) and "
            "there is no complete one to resume from"
        )
    path = checkpoint_dir(run_dir, complete[-1])
    try:
        return path, read_checkpoint(path, checkpoint_identity(spec))
    except CheckpointError as e:
        raise ResumeRefused(f"cannot resume from {path}: {e}") from None
