"""The per-run event log: one JSON object per line in ``RUN_DIR/events.jsonl``.

Every figure and every staleness number of a run can be regenerated from this file alone, so its format is a
contract. Times are seconds since the run started (wall or virtual, the log does not care). Three event types:

``{"type": "gradient", "origin": o, "index": i, "start": t0, "end": t1, "clock": [v_0, ..., v_{N-1}]}``
    Worker ``o`` computed its ``i``-th gradient (per-origin ids, 0-based) between ``t0`` and ``t1`` on a model
    whose vector clock was ``clock`` (``clock[j]`` = gradients of worker ``j`` applied) when it started.
``{"type": "eval", "worker": w, "time": t, "gradients": n, "<metric>": value, ...}``
    Worker ``w`` evaluated its replica, which held ``n`` gradients, at time ``t``. Every further key is a
    numeric metric (``test_accuracy``, ``test_loss``, ``loss``, ...).
``{"type": "run", "event": "start" | "stop" | "drained" | "drain_timeout" | "died", "time": t, ...}``
(``died``: a worker without a result, at its last streamed gradient)
    Informational milestones; extra keys are kept as they are.

Reading is strict: a line that is not valid JSON, lacks a field or has a field of the wrong type raises
:class:`EventLogError` naming ``file:line``, because a silently skipped gradient would make every staleness
number wrong. Blank lines are ignored. Events may appear in any order (several processes may append to one
file); :func:`read_event_log` keeps file order and the staleness computation sorts by completion time.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from dasgd.core.rows import RowBlocks
from dasgd.errors import DasgdError

if TYPE_CHECKING:
    from dasgd.core.ledger import StalenessStats

__all__ = [
    "EVAL_RESERVED_KEYS",
    "EventLog",
    "EventLogError",
    "EventLogWriter",
    "read_event_log",
    "write_event_log",
    "write_metrics_csv",
]

EVAL_RESERVED_KEYS: frozenset[str] = frozenset({"type", "worker", "time", "gradients"})
"""Keys of an eval event that are not metrics."""

_RUN_RESERVED_KEYS: frozenset[str] = frozenset({"type", "event", "time"})

# Lines are collected in memory and written in one os.write per flush: whole lines only, so several processes
# appending to one file (O_APPEND) never interleave half lines.
_FLUSH_LINES = 4096


class EventLogError(DasgdError, ValueError):
    """An event log line or an event passed to a writer is malformed."""


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python; `true` in a clock is a bug, not the number 1.
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _int_list(values: Any) -> list[int] | None:
    """``values`` as a list of Python ints, or None if any is not an integer (bools are not).

    Fast on the shapes that occur: an integer ndarray (a worker's clock) or a JSON list of ints, checked by
    type in C (``map(type, ...)``) rather than one isinstance call per entry: clocks have one entry per
    worker, and logs of large simulations hold millions of them.
    """
    if isinstance(values, np.ndarray):
        return values.reshape(-1).tolist() if values.dtype.kind in "iu" else None
    if not isinstance(values, list):
        values = list(values)
    kinds = set(map(type, values))
    if kinds <= {int}:
        return values
    if all(_is_int(v) for v in values):
        return [int(v) for v in values]
    return None


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, (float, np.floating))


class EventLogWriter:
    """Append-only writer of an event log (JSON lines).

    Buffered: lines are written in batches and on :meth:`close`; use it as a context manager so a crash in
    the caller still flushes what was recorded. The file is opened for appending, so a writer never erases an
    existing log.

    Args:
        path: the ``events.jsonl`` file; its parent directory must exist.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lines: list[str] = []
        self._width: int | None = None

    def write_gradient(
        self, origin: int, index: int, start: float, end: float, clock: Sequence[int] | np.ndarray
    ) -> None:
        """Record that worker ``origin`` computed its gradient ``index`` in ``[start, end]`` at ``clock``."""
        values = _int_list(clock)
        if values is None:
            raise EventLogError(f"gradient clock must hold integers, got {clock!r}")
        if self._width is None:
            self._width = len(values)
        elif len(values) != self._width:
            raise EventLogError(
                f"gradient clock has {len(values)} entries but earlier ones had {self._width}; "
                "every clock must have one entry per worker"
            )
        if not _is_int(origin) or not _is_int(index):
            raise EventLogError(f"gradient origin and index must be integers, got {origin!r}, {index!r}")
        if not _is_number(start) or not _is_number(end):
            raise EventLogError(f"gradient start and end must be numbers, got {start!r}, {end!r}")
        self._append(
            {
                "type": "gradient",
                "origin": int(origin),
                "index": int(index),
                "start": float(start),
                "end": float(end),
                "clock": values,
            }
        )

    def write_eval(self, worker: int, time: float, gradients: int, metrics: Mapping[str, float]) -> None:
        """Record an evaluation of ``worker``'s replica (holding ``gradients`` gradients) at ``time``."""
        if not _is_int(worker) or not _is_int(gradients):
            raise EventLogError(f"eval worker and gradients must be integers, got {worker!r}, {gradients!r}")
        if not _is_number(time):
            raise EventLogError(f"eval time must be a number, got {time!r}")
        event: dict[str, Any] = {"type": "eval", "worker": int(worker), "time": float(time)}
        event["gradients"] = int(gradients)
        for key, value in metrics.items():
            if key in EVAL_RESERVED_KEYS:
                raise EventLogError(f"eval metric name {key!r} is reserved; rename the metric")
            if not _is_number(value):
                raise EventLogError(f"eval metric {key!r} must be a number, got {value!r}")
            event[str(key)] = float(value)
        self._append(event)

    def write_run(self, event: str, time: float, **fields: Any) -> None:
        """Record a run milestone (``"start"``, ``"stop"``, ``"drained"``) with any JSON-serialisable fields."""
        if not isinstance(event, str) or not _is_number(time):
            raise EventLogError(f"run event needs a string name and a numeric time, got {event!r}, {time!r}")
        clash = _RUN_RESERVED_KEYS & fields.keys()
        if clash:
            raise EventLogError(f"run event field(s) {sorted(clash)} are reserved; rename them")
        self._append({"type": "run", "event": event, "time": float(time), **fields})

    def _append(self, event: dict[str, Any]) -> None:
        if self._fd is None:
            raise EventLogError(f"event log writer for {self.path} is closed; open a new EventLogWriter")
        try:
            line = json.dumps(event)
        except (TypeError, ValueError) as exc:
            raise EventLogError(
                f"event is not JSON-serialisable ({exc}); pass plain numbers and strings"
            ) from exc
        self._lines.append(line + "\n")
        if len(self._lines) >= _FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        """Write the buffered lines to the file."""
        if self._fd is None or not self._lines:
            return
        data = "".join(self._lines).encode("utf-8")
        self._lines.clear()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def close(self) -> None:
        """Flush and close; closing twice is harmless."""
        if self._fd is None:
            return
        try:
            self.flush()
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> EventLogWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class EventLog:
    """A parsed event log. Arrays are read-only and hold the gradient events in file order.

    Attributes:
        origin: computing worker of each gradient, int64, shape (T,).
        index: per-origin gradient id, int64, shape (T,).
        start: computation start time, float64, shape (T,).
        end: computation end time, float64, shape (T,).
        clock: the computing worker's vector clock at start, shape (T, N); int32 where every entry fits
            (large simulations hold 10^8 entries), else int64.
        evals: eval events as dicts (``worker``, ``time``, ``gradients`` and metric keys; no ``type``).
        runs: run events as dicts (``event``, ``time`` and any extra keys; no ``type``).
        world_size: N, the number of workers (clock width; without gradients, 1 + the largest eval worker).
    """

    origin: np.ndarray
    index: np.ndarray
    start: np.ndarray
    end: np.ndarray
    clock: np.ndarray
    evals: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    world_size: int = 0

    @property
    def num_gradients(self) -> int:
        """T, the number of gradients computed."""
        return int(self.origin.shape[0])

    def metric_names(self) -> list[str]:
        """Metric keys found in the eval events, in order of first appearance."""
        names: dict[str, None] = {}
        for ev in self.evals:
            for key in ev:
                if key not in EVAL_RESERVED_KEYS:
                    names.setdefault(key, None)
        return list(names)

    def staleness(self) -> StalenessStats:
        """Exact staleness statistics of the recorded gradients (see :mod:`dasgd.core.ledger`).

        Computed once and kept: the summary, the plots and the theory section of one run all ask for it, and
        at scale each computation is a pass over 10^8 clock entries.
        """
        return self._staleness

    @functools.cached_property
    def _staleness(self) -> StalenessStats:
        # Imported here so reading a log does not depend on the ledger module being importable.
        from dasgd.core.ledger import compute_staleness

        if self.clock.shape[0] != self.num_gradients:
            raise EventLogError(
                "this log was read without its clocks (read_event_log(..., clocks=False)); read it with clocks "
                "to compute staleness"
            )
        return compute_staleness(self.origin, self.index, self.end, self.clock)


class _LineParser:
    """Validates decoded lines, collecting the columns; errors name ``file:line``."""

    def __init__(self, path: Path, clocks: bool = True) -> None:
        self.path = path
        self.clocks = clocks
        self.origin: list[int] = []
        self.index: list[int] = []
        self.start: list[float] = []
        self.end: list[float] = []
        self.clock: RowBlocks | None = None  # int32 rows in blocks: 10^8 entries as lists would be 10s of GB
        self.evals: list[dict[str, Any]] = []
        self.runs: list[dict[str, Any]] = []

    def fail(self, lineno: int, problem: str) -> EventLogError:
        return EventLogError(
            f"{self.path}:{lineno}: {problem}; fix or remove that line (each line must be one JSON event)"
        )

    def need(self, event: dict[str, Any], key: str, check: Any, kind: str, lineno: int) -> Any:
        if key not in event:
            raise self.fail(lineno, f"{event['type']} event lacks the field {key!r}")
        value = event[key]
        if not check(value):
            raise self.fail(lineno, f"{event['type']} field {key!r} must be {kind}, got {value!r}")
        return value

    def add(self, event: Any, lineno: int) -> None:
        if not isinstance(event, dict):
            raise self.fail(lineno, f"expected a JSON object, got {type(event).__name__}")
        kind = event.get("type")
        if kind == "gradient":
            self._gradient(event, lineno)
        elif kind == "eval":
            self._eval(event, lineno)
        elif kind == "run":
            self.need(event, "event", lambda v: isinstance(v, str), "a string", lineno)
            self.need(event, "time", _is_number, "a number", lineno)
            self.runs.append({k: v for k, v in event.items() if k != "type"})
        else:
            raise self.fail(lineno, f"unknown event type {kind!r}; expected 'gradient', 'eval' or 'run'")

    def _gradient(self, event: dict[str, Any], lineno: int) -> None:
        origin = self.need(event, "origin", _is_int, "an integer", lineno)
        index = self.need(event, "index", _is_int, "an integer", lineno)
        start = self.need(event, "start", _is_number, "a number", lineno)
        end = self.need(event, "end", _is_number, "a number", lineno)
        if not self.clocks:
            if origin < 0 or index < 0:
                raise self.fail(lineno, "gradient origin and index must be non-negative")
            self.origin.append(origin)
            self.index.append(index)
            self.start.append(float(start))
            self.end.append(float(end))
            return
        clock = self.need(
            event,
            "clock",
            lambda v: isinstance(v, list) and _int_list(v) is not None,
            "a list of integers",
            lineno,
        )
        if self.clock is None:
            self.clock = RowBlocks(len(clock), np.dtype(np.int32), widen=True)
        elif len(clock) != self.clock.width:
            raise self.fail(
                lineno, f"clock has {len(clock)} entries but earlier lines had {self.clock.width}"
            )
        if not 0 <= origin < len(clock):
            raise self.fail(lineno, f"origin {origin} is outside 0..{len(clock) - 1} (the clock's width)")
        if index < 0 or (clock and min(clock) < 0):
            raise self.fail(lineno, "gradient index and clock entries must be non-negative")
        try:
            row = np.asarray(clock, dtype=np.int64)
        except OverflowError:
            raise self.fail(lineno, "a clock entry is too large for a 64-bit integer") from None
        self.origin.append(origin)
        self.index.append(index)
        self.start.append(float(start))
        self.end.append(float(end))
        self.clock.append(row)

    def _eval(self, event: dict[str, Any], lineno: int) -> None:
        self.need(event, "worker", _is_int, "an integer", lineno)
        self.need(event, "time", _is_number, "a number", lineno)
        self.need(event, "gradients", _is_int, "an integer", lineno)
        for key, value in event.items():
            if key not in EVAL_RESERVED_KEYS and not _is_number(value):
                raise self.fail(lineno, f"eval metric {key!r} must be a number, got {value!r}")
        self.evals.append({k: v for k, v in event.items() if k != "type"})

    def build(self) -> EventLog:
        if self.clock is not None:
            width = self.clock.width
            clock = self.clock.table(release=True)
        else:
            # No clocks read: the workers seen are all the log can tell.
            seen = [int(ev["worker"]) for ev in self.evals] + ([max(self.origin)] if self.origin else [])
            width = 1 + max(seen) if seen else 0
            clock = np.zeros((0, width), dtype=np.int64)
        return EventLog(
            origin=_readonly(np.asarray(self.origin, dtype=np.int64)),
            index=_readonly(np.asarray(self.index, dtype=np.int64)),
            start=_readonly(np.asarray(self.start, dtype=np.float64)),
            end=_readonly(np.asarray(self.end, dtype=np.float64)),
            clock=_readonly(clock),
            evals=self.evals,
            runs=self.runs,
            world_size=width,
        )


_GRADIENT_PREFIX = '{"type": "gradient"'
_CLOCK_KEY = ', "clock": ['


def read_event_log(path: str | os.PathLike[str], clocks: bool = True) -> EventLog:
    """Parse an event log strictly.

    Args:
        path: the ``events.jsonl`` file.
        clocks: False reads gradient events without their clocks (``clock`` has no rows): for callers that need
            evaluations, run events and gradient times only. A large simulation's log holds 10^8 clock entries;
            lines as this module writes them are then parsed up to the clock, which is neither read nor checked.

    Raises:
        EventLogError: a line is not a JSON object, has an unknown ``type``, lacks a field, has a field of the
            wrong type, or has a clock of a different width than earlier lines. The message names ``file:line``.
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    parser = _LineParser(path, clocks)
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            text = line
            if not clocks and line.startswith(_GRADIENT_PREFIX):
                cut = line.find(_CLOCK_KEY)
                if cut > 0:
                    text = line[:cut] + "}"  # the writer puts the clock last: stop before it
            try:
                event = json.loads(text)
            except json.JSONDecodeError as exc:
                raise parser.fail(lineno, f"not valid JSON ({exc.msg} at column {exc.colno})") from exc
            parser.add(event, lineno)
    return parser.build()


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if _is_int(value):
        return str(int(value))
    number = float(value)
    # repr round-trips exactly; nan/inf spelled the way float() parses them back.
    return repr(number) if math.isfinite(number) else str(number)


def write_metrics_csv(log: EventLog, path: str | os.PathLike[str]) -> None:
    """Write the eval events as ``metrics.csv``: columns ``time,gradients,<metrics...>``.

    Rows are sorted by time (ties by gradients, then file order); metric columns appear in order of first
    appearance in the log; a metric an eval did not report is an empty cell.
    """
    names = log.metric_names()
    rows = sorted(log.evals, key=lambda ev: (float(ev["time"]), int(ev["gradients"])))
    with Path(path).open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["time", "gradients", *names])
        for ev in rows:
            writer.writerow(
                [_csv_cell(float(ev["time"])), _csv_cell(int(ev["gradients"]))]
                + [_csv_cell(ev.get(name)) for name in names]
            )


def write_event_log(
    path: str | os.PathLike[str],
    origin: Iterable[int] | np.ndarray,
    index: Iterable[int] | np.ndarray,
    start: Iterable[float] | np.ndarray,
    end: Iterable[float] | np.ndarray,
    clock: Iterable[Sequence[int]] | np.ndarray,
    evals: Iterable[Mapping[str, Any]] = (),
    runs: Iterable[Mapping[str, Any]] = (),
) -> None:
    """Write a whole event log at once (same format as :class:`EventLogWriter`), replacing ``path``.

    ``evals`` are dicts with ``worker``, ``time``, ``gradients`` and metric keys; ``runs`` are dicts with
    ``event``, ``time`` and any extra keys (the shapes :class:`EventLog` holds). Gradients come first, then
    evals, then run events.
    """
    columns = [np.asarray(origin), np.asarray(index), np.asarray(start), np.asarray(end)]
    clocks = np.asarray(clock)  # not widened: a large run's clock table is gigabytes
    count = columns[0].shape[0] if columns[0].ndim == 1 else -1
    if count == 0 and clocks.size == 0:
        clocks = clocks.reshape(0, 0).astype(np.int64)
    elif clocks.dtype.kind not in "iu":
        raise EventLogError(f"gradient clocks must hold integers, got dtype {clocks.dtype}")
    if any(c.shape != (count,) for c in columns) or clocks.ndim != 2 or clocks.shape[0] != count:
        raise EventLogError(
            "origin, index, start, end must be 1-D of equal length T and clock 2-D of shape (T, N); "
            f"got {[c.shape for c in columns]} and {clocks.shape}"
        )
    path = Path(path)
    path.unlink(missing_ok=True)
    with EventLogWriter(path) as writer:
        for o, i, s, e, c in zip(*columns, clocks, strict=True):
            writer.write_gradient(int(o), int(i), float(s), float(e), c.tolist())
        for ev in evals:
            if not {"worker", "time", "gradients"} <= ev.keys():
                raise EventLogError(
                    f"eval dict needs 'worker', 'time' and 'gradients', got keys {sorted(ev)}"
                )
            metrics = {k: v for k, v in ev.items() if k not in EVAL_RESERVED_KEYS}
            writer.write_eval(ev["worker"], ev["time"], ev["gradients"], metrics)
        for run in runs:
            if "event" not in run or "time" not in run:
                raise EventLogError(f"run dict needs 'event' and 'time', got keys {sorted(run)}")
            extra = {k: v for k, v in run.items() if k not in _RUN_RESERVED_KEYS}
            writer.write_run(run["event"], run["time"], **extra)
