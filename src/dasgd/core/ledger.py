"""Exact staleness accounting from per-gradient vector clocks.

This module is the reference definition of staleness for dasgd; the documentation points here.

Records
-------
A run produces one record per gradient computed by any worker (``T`` records, ``N`` workers):

``origin[r]``
    the worker that computed the gradient.
``index[r]``
    its per-origin id: worker ``o``'s gradients are numbered ``0, 1, 2, ...`` in the order ``o`` computed them.
``end[r]``
    the time its computation completed.
``clock[r, j]``
    the computing worker's vector clock when it *started* computing the gradient: the number of worker
    ``j``'s gradients applied to its model at that moment. Links are FIFO and gradients are applied in order,
    so the set of ``j``'s gradients in that model is the prefix of ids ``0 .. clock[r, j] - 1``. In a faithful
    run the own entry ``clock[r, origin[r]]`` equals ``index[r]``.

Because fixed-stepsize SGD updates commute, the model that computed a gradient is fully described by this
gradient set ``G(y_k)``, so the clock alone determines what was missing.

Definitions (gradient-set view)
-------------------------------
Global order
    Records are sorted by ``(end, origin, index)``; the position ``k = 0 .. T-1`` in that order is the global
    index of the gradient. Ties in ``end`` are broken by origin, then by id, so the order is deterministic.
    Each origin's gradients must appear in id order (a worker's own completion times never decrease);
    :func:`compute_staleness` rejects records where they do not.
``C_j(k)``
    the number of worker ``j``'s gradients at global positions ``< k``. Since each origin's gradients appear
    in id order, these are exactly ``j``'s ids ``0 .. C_j(k) - 1``.
Missing set ``M_k``
    the gradients at positions ``< k`` that are not in the model that computed gradient ``k``:
    ``M_k = {0 .. k-1} \\ G(y_k)``; for each ``j`` it holds ``j``'s ids ``clock[k, j] .. C_j(k) - 1``.
Staleness
    ``s_k = |M_k| = sum_j max(0, C_j(k) - clock[k, j])``.
    ``S_avg = mean_k s_k`` and ``S_max = max_k s_k``.
Loose staleness
    ``s^_k = k - min(M_k)`` where ``min(M_k)`` is the smallest global position of a missing gradient, and
    ``s^_k = 0`` when ``M_k`` is empty. It is the smallest window of recent gradients that covers every
    missing one, so ``s_k <= s^_k``; the two differ when the model holds some gradients inside that window
    (a "hole"). ``S^_avg = mean_k s^_k`` and ``S^_max = max_k s^_k``.
Pairwise model staleness
    between two models with gradient sets ``G_a`` and ``G_b``: ``|G_a symmetric-difference G_b|``; for
    prefix clocks this is ``sum_j |a_j - b_j|`` (:func:`model_staleness`).

Anomalies
---------
A clock entry ``clock[k, j] > C_j(k)`` says the model held a gradient that the merged order places *after*
gradient ``k``. A gradient applied before ``k`` started must have completed before ``k`` did, so this can only
happen when records come from machines whose clocks disagree (skew), or when a zero-duration computation ties
in ``end`` with a gradient it already holds and the tie-break orders it first. Such an entry is clamped to
``C_j(k)`` (the extra gradients are not "before" ``k``, so they neither add to nor remove from ``M_k``) and
each clamped entry adds one to :attr:`StalenessStats.anomalies`. A faithful single-clock run has 0 anomalies.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

from dasgd.core.rows import RowBlocks

__all__ = [
    "CLOCK_DTYPE",
    "LedgerError",
    "StalenessLedger",
    "StalenessStats",
    "compute_staleness",
    "keep_clock_rows",
    "model_staleness",
]


class LedgerError(ValueError):
    """Staleness records or clocks that do not describe a valid run."""


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class StalenessStats:
    """Exact staleness statistics of one run (see the module docstring for the definitions).

    Attributes:
        count: number of gradients ``T``.
        s_avg: ``S_avg``, the mean of ``s_k``.
        s_max: ``S_max``, the max of ``s_k``.
        loose_avg: ``S^_avg``, the mean of the loose staleness ``s^_k``.
        loose_max: ``S^_max``, the max of ``s^_k``.
        per_gradient: ``s_k`` for ``k = 0 .. T-1`` in global order (int64, read-only).
        loose: ``s^_k`` in global order (int64, read-only).
        order: ``order[k]`` is the input row of the gradient at global position ``k`` (int64, read-only).
        anomalies: number of clock entries clamped because they exceeded ``C_j(k)`` (clock skew).
    """

    count: int
    s_avg: float
    s_max: int
    loose_avg: float
    loose_max: int
    per_gradient: np.ndarray
    loose: np.ndarray
    order: np.ndarray
    anomalies: int

    def histogram(self, bins: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Histogram of ``s_k``: ``(counts, edges)``; the counts always sum to ``count``.

        Args:
            bins: ``None`` (default) for one bin per integer value: ``counts[i]`` is the number of gradients
                with ``s_k == i`` for ``i = 0 .. s_max`` and ``edges = [0, 1, ..., s_max + 1]``. A positive
                int gives that many equal-width bins over ``[0, max(s_max, 1)]``.

        Raises:
            LedgerError: ``bins`` is not None or a positive integer.
        """
        if bins is None:
            counts = np.bincount(self.per_gradient, minlength=self.s_max + 1).astype(np.int64)
            edges = np.arange(self.s_max + 2, dtype=np.float64)
            return counts, edges
        if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
            raise LedgerError(f"histogram bins must be None or a positive integer, got {bins!r}")
        counts, edges = np.histogram(
            self.per_gradient, bins=int(bins), range=(0.0, float(max(self.s_max, 1)))
        )
        return counts.astype(np.int64), edges.astype(np.float64)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: the scalar statistics plus the integer-bin histogram as plain lists."""
        counts, edges = self.histogram()
        return {
            "count": int(self.count),
            "s_avg": float(self.s_avg),
            "s_max": int(self.s_max),
            "loose_avg": float(self.loose_avg),
            "loose_max": int(self.loose_max),
            "anomalies": int(self.anomalies),
            "histogram": {"counts": [int(c) for c in counts], "edges": [float(e) for e in edges]},
        }


def _int_array(name: str, value: Any, ndim: int, keep_narrow: bool = False) -> np.ndarray:
    """``value`` as an integer array of ``ndim`` dimensions: int64, or (``keep_narrow``) any dtype that
    converts to int64 without loss, left as it is so a large clock table is not copied."""
    array = np.asarray(value)
    if array.ndim != ndim:
        raise LedgerError(f"{name} must be a {ndim}-D array, got shape {array.shape}")
    if array.size == 0:
        # An empty list arrives as float64; its dtype says nothing about the caller's intent.
        return array.astype(np.int64)
    if array.dtype.kind not in "iu":
        raise LedgerError(f"{name} must have an integer dtype (int64), got {array.dtype}; convert it first")
    if array.dtype.kind == "u" and array.dtype.itemsize >= 8 and array.max() > np.iinfo(np.int64).max:
        raise LedgerError(f"{name} holds values too large for int64")
    if keep_narrow and (array.dtype.kind == "i" or array.dtype.itemsize < 8):
        return array
    return array.astype(np.int64, copy=False)


def _empty_stats() -> StalenessStats:
    empty = np.zeros(0, dtype=np.int64)
    return StalenessStats(
        count=0,
        s_avg=0.0,
        s_max=0,
        loose_avg=0.0,
        loose_max=0,
        per_gradient=_frozen(empty.copy()),
        loose=_frozen(empty.copy()),
        order=_frozen(empty.copy()),
        anomalies=0,
    )


def _explain_bad_ids(origin: np.ndarray, index: np.ndarray, end: np.ndarray, world: int) -> LedgerError:
    """Say which per-origin id property the records break (duplicates, a gap, or out-of-order ends)."""
    by_id = np.lexsort((index, origin))
    o, i = origin[by_id], index[by_id]
    same = (o[1:] == o[:-1]) & (i[1:] == i[:-1])
    if same.any():
        at = int(np.argmax(same))
        return LedgerError(
            f"duplicate record: worker {int(o[at])} gradient id {int(i[at])} appears more than once; "
            "record each gradient exactly once"
        )
    counts = np.bincount(origin, minlength=world)
    for j in range(world):
        ids = i[o == j]
        if ids.size and int(ids[-1]) != ids.size - 1:
            missing = int(np.setdiff1d(np.arange(ids.size), ids)[0])
            return LedgerError(
                f"worker {j} has {int(counts[j])} records but its ids are not 0..{ids.size - 1} "
                f"(id {missing} is missing); every gradient a worker computed must be recorded"
            )
    # Ids are complete, so the ends must be out of id order for some origin.
    for j in range(world):
        mine = by_id[o == j]
        ends = end[mine]
        bad = np.flatnonzero(ends[1:] < ends[:-1])
        if bad.size:
            b = int(bad[0])
            return LedgerError(
                f"worker {j}'s gradient {b + 1} ends at {float(ends[b + 1])!r}, before its gradient {b} "
                f"(ends at {float(ends[b])!r}); a worker's own completion times must not decrease with its ids"
            )
    return LedgerError("records are not in per-origin id order")  # unreachable for consistent input


_BLOCK_ENTRIES = 1 << 22
"""Entries of each (rows, workers) block compute_staleness works on (32 MiB of int64)."""

CLOCK_DTYPE = np.dtype(np.int32)
"""How the ledger stores clock entries: 4 bytes each. A run of 1,000 simulated workers records 10^8 of them;
an entry counts one worker's gradients, which stays far below 2^31."""


def compute_staleness(origin: Any, index: Any, end: Any, clock: Any) -> StalenessStats:
    """Exact staleness statistics of a run from its per-gradient records.

    Args:
        origin: int array ``(T,)``, the worker that computed each gradient, in ``[0, N)``.
        index: int array ``(T,)``, each gradient's per-origin id; each origin's ids must be ``0 .. n-1``.
        end: float array ``(T,)``, completion times (finite).
        clock: int array ``(T, N)``, the computing worker's vector clock when it started the gradient (>= 0).

    Returns:
        The statistics; empty input (``T == 0``) gives all zeros. Definitions: see the module docstring.

    Raises:
        LedgerError: a shape, dtype or value does not describe a valid run (the message names it).
    """
    origin_a = _int_array("origin", origin, 1)
    index_a = _int_array("index", index, 1)
    end_a = np.asarray(end)
    if end_a.ndim != 1:
        raise LedgerError(f"end must be a 1-D array, got shape {end_a.shape}")
    if end_a.size and (end_a.dtype.kind not in "iuf"):
        raise LedgerError(f"end must hold real numbers (float64), got dtype {end_a.dtype}")
    end_a = end_a.astype(np.float64, copy=False)
    clock_raw = np.asarray(clock)
    total = origin_a.shape[0]
    if total == 0 and clock_raw.size == 0 and index_a.size == 0 and end_a.size == 0:
        return _empty_stats()
    clock_a = _int_array("clock", clock_raw, 2, keep_narrow=True)
    if index_a.shape[0] != total or end_a.shape[0] != total or clock_a.shape[0] != total:
        raise LedgerError(
            "origin, index, end and clock must have one row per gradient, got lengths "
            f"{total}, {index_a.shape[0]}, {end_a.shape[0]} and {clock_a.shape[0]}"
        )
    world = clock_a.shape[1]
    if world == 0:
        raise LedgerError("clock has 0 columns; it needs one column per worker")
    if origin_a.min() < 0 or origin_a.max() >= world:
        bad = int(origin_a[(origin_a < 0) | (origin_a >= world)][0])
        raise LedgerError(
            f"origin {bad} is not a worker: clock has {world} columns, so origins are 0..{world - 1}"
        )
    if index_a.min() < 0:
        raise LedgerError(f"index must be >= 0, got {int(index_a.min())}")
    if not np.isfinite(end_a).all():
        raise LedgerError("end holds a NaN or infinite time; every gradient needs a finite completion time")
    if clock_a.min() < 0:
        raise LedgerError(f"clock entries count applied gradients and must be >= 0, got {int(clock_a.min())}")

    # np.lexsort sorts by the last key first: (end, origin, index).
    order = np.lexsort((index_a, origin_a, end_a)).astype(np.int64)
    o_sorted = origin_a[order]

    # Gradient k must be its origin's C_o(k)-th: this one check rules out duplicates, gaps and ends that
    # go backwards within an origin, all of which would make "ids 0..C_j(k)-1" false.
    by_origin = np.argsort(o_sorted, kind="stable").astype(np.int64)
    per_origin = np.bincount(o_sorted, minlength=world)
    starts = np.zeros(world, dtype=np.int64)
    np.cumsum(per_origin[:-1], out=starts[1:])
    rank_in_origin = np.empty(total, dtype=np.int64)
    rank_in_origin[by_origin] = np.arange(total, dtype=np.int64) - np.repeat(starts, per_origin)
    if not np.array_equal(index_a[order], rank_in_origin):
        raise _explain_bad_ids(origin_a, index_a, end_a, world)

    # The earliest missing gradient of origin j is j's id clock[k, j]; look up its global position.
    # Positions grouped by origin (stable) are in id order because ids follow global order per origin.
    # Trailing sentinel: a fully caught-up last origin would index one past the end (masked out below).
    lookup = np.concatenate([by_origin, np.array([total], dtype=np.int64)])
    per_gradient = np.empty(total, dtype=np.int64)
    loose = np.empty(total, dtype=np.int64)
    anomalies = 0
    # Rows in blocks, so the (T, N) intermediates are (block, N): a run of 10,000 workers has 10^8+ entries.
    block = max(1, min(total, _BLOCK_ENTRIES // world))
    running = np.zeros(world, dtype=np.int64)  # C_j at the start of the block
    for b0 in range(0, total, block):
        b1 = min(total, b0 + block)
        rows = np.arange(b1 - b0, dtype=np.int64)
        ob = o_sorted[b0:b1]
        # counts[k, j] = C_j(k): an inclusive running count per origin, minus the row's own gradient.
        counts = np.zeros((b1 - b0, world), dtype=np.int64)
        counts[rows, ob] = 1
        np.cumsum(counts, axis=0, out=counts)
        counts += running
        running = counts[-1].copy()
        counts[rows, ob] -= 1
        have = clock_a[order[b0:b1]].astype(np.int64, copy=False)  # one block widened at a time
        anomalies += int(np.count_nonzero(have > counts))
        np.minimum(have, counts, out=have)
        missing = counts  # reuse the buffer: C_j(k) - clamped clock, always >= 0 now
        np.subtract(counts, have, out=missing)
        per_gradient[b0:b1] = missing.sum(axis=1)
        have += starts[None, :]
        first = lookup[have]
        first[missing == 0] = total
        earliest = first.min(axis=1)
        positions = rows + b0
        loose[b0:b1] = np.where(earliest < total, positions - earliest, 0)

    return StalenessStats(
        count=int(total),
        s_avg=float(per_gradient.mean()),
        s_max=int(per_gradient.max()),
        loose_avg=float(loose.mean()),
        loose_max=int(loose.max()),
        per_gradient=_frozen(per_gradient.astype(np.int64, copy=False)),
        loose=_frozen(loose),
        order=_frozen(order),
        anomalies=anomalies,
    )


def keep_clock_rows(clock: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Keep only ``rows`` (increasing indices) of a (T, N) clock table, moved up in place; returns the view
    of the first ``len(rows)`` rows. Works in blocks of :data:`_BLOCK_ENTRIES`, so no second table is made."""
    step = max(1, _BLOCK_ENTRIES // max(1, clock.shape[1]))
    for lo in range(0, rows.size, step):
        # Destinations never pass their sources (rows[i] >= i), so moving blocks in order is safe.
        part = rows[lo : lo + step]
        clock[lo : lo + part.size] = clock[part]
    return clock[: rows.size]


def model_staleness(clock_a: np.ndarray, clock_b: np.ndarray) -> int:
    """Pairwise model staleness ``|G_a symmetric-difference G_b|`` of two prefix clocks: ``sum_j |a_j - b_j|``.

    Raises:
        LedgerError: the clocks are not 1-D non-negative integer arrays of the same length.
    """
    a = _int_array("clock_a", clock_a, 1)
    b = _int_array("clock_b", clock_b, 1)
    if a.shape != b.shape:
        raise LedgerError(
            f"clocks must have one entry per worker on both sides, got lengths {a.size} and {b.size}"
        )
    if a.size and (a.min() < 0 or b.min() < 0):
        raise LedgerError("clock entries count applied gradients and must be >= 0")
    return int(np.abs(a - b).sum())


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise LedgerError(f"{name} must be an integer, got a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise LedgerError(f"{name} must be an integer, got {type(value).__name__}") from None


class StalenessLedger:
    """Incremental collector: record(origin, index, start, end, clock) per gradient, then stats().

    Records may arrive in any order (for example merged from several workers' logs); the global order is
    computed by :meth:`stats`. The clock is copied on record, so callers may keep mutating theirs.

    Clocks are the bulk of a long run's records (one entry per worker per gradient), so they are kept as
    :data:`CLOCK_DTYPE` rows in fixed-size blocks (:class:`dasgd.core.rows.RowBlocks`): growing never copies
    what is already recorded, and :meth:`take` hands the records over as one table without holding two
    copies at once.
    """

    def __init__(self, world_size: int) -> None:
        world = _as_int("world_size", world_size)
        if world < 1:
            raise LedgerError(f"world_size must be >= 1, got {world}")
        self._world = world
        self._reset()

    def _reset(self) -> None:
        self._size = 0
        self._clocks = RowBlocks(self._world, CLOCK_DTYPE)
        self._origin = np.zeros(64, dtype=np.int64)
        self._index = np.zeros(64, dtype=np.int64)
        self._start = np.zeros(64, dtype=np.float64)
        self._end = np.zeros(64, dtype=np.float64)

    @property
    def world_size(self) -> int:
        """Number of workers (columns of every clock)."""
        return self._world

    def __len__(self) -> int:
        return self._size

    def record(self, origin: int, index: int, start: float, end: float, clock: np.ndarray) -> None:
        """Record one gradient: its origin, per-origin id, start and end times, and the start-time clock.

        Raises:
            LedgerError: origin out of range, negative id, non-finite or reversed times, or a clock that is not
                ``world_size`` non-negative integers below 2^31.
        """
        o = _as_int("origin", origin)
        i = _as_int("index", index)
        if not 0 <= o < self._world:
            raise LedgerError(f"origin {o} is not a worker of this ledger (world_size {self._world})")
        if i < 0:
            raise LedgerError(f"index must be >= 0, got {i}")
        t0, t1 = float(start), float(end)
        if not (math.isfinite(t0) and math.isfinite(t1)):
            raise LedgerError(f"start and end must be finite times, got {t0!r} and {t1!r}")
        if t1 < t0:
            raise LedgerError(f"gradient ({o}, {i}) ends at {t1!r}, before it started at {t0!r}")
        vc = _int_array("clock", clock, 1, keep_narrow=True)
        if vc.shape[0] != self._world:
            raise LedgerError(f"clock must have world_size={self._world} entries, got {vc.shape[0]}")
        if vc.size and vc.min() < 0:
            raise LedgerError("clock entries count applied gradients and must be >= 0")
        try:
            self._clocks.append(vc)
        except OverflowError as exc:
            raise LedgerError(f"clock {exc}: more gradients of one worker than the ledger counts") from None
        n = self._size
        if n == self._origin.shape[0]:
            self._grow_columns()
        self._origin[n], self._index[n], self._start[n], self._end[n] = o, i, t0, t1
        self._size = n + 1

    def _grow_columns(self) -> None:
        # The per-gradient scalars are 32 bytes a record: doubling them is cheap next to the clocks.
        capacity = 2 * self._origin.shape[0]
        for name in ("_origin", "_index", "_start", "_end"):
            old = getattr(self, name)
            new = np.zeros(capacity, dtype=old.dtype)
            new[: self._size] = old[: self._size]
            setattr(self, name, new)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Copies of the records in recording order: ``(origin, index, start, end, clock)``."""
        n = self._size
        return (
            self._origin[:n].copy(),
            self._index[:n].copy(),
            self._start[:n].copy(),
            self._end[:n].copy(),
            self._clocks.table(),
        )

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The records in recording order, like :meth:`arrays`, leaving the ledger empty.

        Peak memory stays near one copy of the clocks: each block is freed as soon as it is copied.
        """
        n = self._size
        records = (
            self._origin[:n].copy(),
            self._index[:n].copy(),
            self._start[:n].copy(),
            self._end[:n].copy(),
            self._clocks.table(release=True),
        )
        self._reset()
        return records

    def stats(self) -> StalenessStats:
        """Staleness statistics of everything recorded so far (see :func:`compute_staleness`)."""
        n = self._size
        return compute_staleness(self._origin[:n], self._index[:n], self._end[:n], self._clocks.table())
