"""A worker's records, streamed to disk as it goes, so that a worker that dies still leaves them.

A worker's shard (metrics/shard.py) is written once, at the end of its run; a worker killed mid-run leaves
none, and without a stream its gradients would be missing from ``events.jsonl``, from the staleness and from
its own computed count (which the summary could then only infer from what survivors hold). The stream fixes
that: every own gradient record and every evaluation is appended as it happens, flushed to the OS at least
every ``flush_every`` seconds (and at the end), and read back by the launcher for a worker without a shard.

Two append-only files per worker, both tolerant of a torn tail (a process killed in the middle of a write):

- ``rank{R}.records``: a 16-byte header (magic ``b"DSGS"``, u32 version 1, u32 world_size, u32 reserved),
  then fixed-size little-endian rows ``index i64, start f64, end f64, clock i32[world_size]``. A partial
  last row is ignored.
- ``rank{R}.evals.jsonl``: one JSON object per evaluation. A last line without its newline, or one that does
  not parse, is ignored.
"""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from dasgd.core.ledger import StalenessLedger

__all__ = ["RecordStream", "StreamedLedger", "StreamRead", "read_stream"]

_MAGIC = b"DSGS"
_VERSION = 1
_HEADER = struct.Struct("<4sIII")
_FIXED = struct.Struct("<qdd")  # index, start, end: the fixed part of a row


def _row_dtype(world_size: int) -> np.dtype:
    return np.dtype([("index", "<i8"), ("start", "<f8"), ("end", "<f8"), ("clock", "<i4", (world_size,))])


class RecordStream:
    """Appends one worker's gradient records and evaluations to ``folder/rank{R}.*`` (see the module doc).

    Args:
        folder: where the two files go (created if missing).
        rank: the worker's rank.
        world_size: number of workers (the length of each record's clock).
        flush_every: seconds between flushes to the OS at most (records are buffered in between).
    """

    def __init__(self, folder: Path, rank: int, world_size: int, flush_every: float = 1.0) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.world_size = world_size
        self.flush_every = flush_every
        self._dtype = _row_dtype(world_size)
        self._records: BinaryIO = open(folder / f"rank{rank}.records", "wb")  # noqa: SIM115 (closed in close())
        self._records.write(_HEADER.pack(_MAGIC, _VERSION, world_size, 0))
        self._records.flush()
        # Every record at once to the OS: the same file, written through without Python's buffer.
        self._unbuffered = open(self._records.fileno(), "ab", buffering=0, closefd=False) if flush_every <= 0 else None
        self._evals: BinaryIO = open(folder / f"rank{rank}.evals.jsonl", "wb")  # noqa: SIM115
        self._last_flush = time.monotonic()
        self.flush()

    def record(self, index: int, start: float, end: float, clock: np.ndarray) -> None:
        """Append one own gradient's record (its id, start and end times, and the clock at its start)."""
        # Runs once per gradient: one packed row, and with flush_every 0 one unbuffered write (a syscall).
        data = _FIXED.pack(index, start, end) + np.asarray(clock, dtype="<i4").tobytes()
        if self._unbuffered is not None:
            self._unbuffered.write(data)
            return
        self._records.write(data)
        self._maybe_flush()

    def evaluation(self, record: dict[str, Any]) -> None:
        """Append one evaluation (as the event log stores it); flushed at once, since evaluations are rare."""
        self._evals.write((json.dumps(record, default=float) + "\n").encode())
        self.flush()

    def flush(self) -> None:
        """Hand everything appended so far to the OS (it survives the process being killed)."""
        self._records.flush()
        self._evals.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush and close both files."""
        if not self._records.closed:
            self.flush()
            if self._unbuffered is not None:
                self._unbuffered.close()
            self._records.close()
            self._evals.close()

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= self.flush_every:
            self.flush()


class StreamedLedger(StalenessLedger):
    """A staleness ledger that also streams each record it takes (see :class:`RecordStream`)."""

    def __init__(self, world_size: int, stream: RecordStream) -> None:
        super().__init__(world_size)
        self.stream = stream

    def record(self, origin: int, index: int, start: float, end: float, clock: np.ndarray) -> None:
        super().record(origin, index, start, end, clock)  # validates first: only good records are streamed
        self.stream.record(index, start, end, clock)


class StreamRead:
    """What a worker's stream holds: its records (``index``, ``start``, ``end``, ``clock``) and evaluations."""

    def __init__(
        self, index: np.ndarray, start: np.ndarray, end: np.ndarray, clock: np.ndarray, evals: list[dict]
    ) -> None:
        self.index, self.start, self.end, self.clock, self.evals = index, start, end, clock, evals

    @property
    def computed(self) -> int:
        """Gradients the worker is known to have computed: one past the highest id recorded."""
        return int(self.index.max()) + 1 if self.index.size else 0


def read_stream(folder: Path, rank: int, world_size: int) -> StreamRead | None:
    """Read worker ``rank``'s stream (None if it left none); a torn last row or line is ignored, and so is a
    file whose header does not match (it is not a stream of this run)."""
    path = folder / f"rank{rank}.records"
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if len(raw) < _HEADER.size:
        return None
    magic, version, n, _ = _HEADER.unpack_from(raw)
    if magic != _MAGIC or version != _VERSION or n != world_size:
        return None
    dtype = _row_dtype(world_size)
    body = raw[_HEADER.size :]
    rows = np.frombuffer(body[: len(body) - len(body) % dtype.itemsize], dtype=dtype)
    good = np.isfinite(rows["start"]) & np.isfinite(rows["end"]) & (rows["index"] >= 0)
    rows = rows[good]
    evals: list[dict] = []
    try:
        text = (folder / f"rank{rank}.evals.jsonl").read_bytes()
    except OSError:
        text = b""
    for line in text.split(b"\n")[:-1]:  # the part after the last newline is torn (or empty)
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict) and isinstance(ev.get("time"), (int, float)) and math.isfinite(ev["time"]):
            evals.append(ev)
    return StreamRead(
        rows["index"].astype(np.int64),
        rows["start"].astype(np.float64),
        rows["end"].astype(np.float64),
        np.ascontiguousarray(rows["clock"]).astype(np.int32),
        evals,
    )
