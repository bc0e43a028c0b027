"""Tests for dasgd.core.ledger: hand-worked staleness, a set-based oracle, and input validation."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from dasgd.core.ledger import (
    LedgerError,
    StalenessLedger,
    StalenessStats,
    compute_staleness,
    keep_clock_rows,
    model_staleness,
)

# ---------------------------------------------------------------------------------------------------------
# Hand-worked schedule: 3 workers A=0, B=1, C=2, 8 gradients. Links A->B and B->C are slow.
# Rows are listed here in global order (end, origin, id); the test feeds them to the code shuffled.
#
#  k  grad  end  clock[A,B,C]  C(k)=[A,B,C] before k   missing M_k (global positions)   s_k  s^_k = k - min M_k
#  0  A#0   1.0  [0,0,0]       [0,0,0]                 {}                               0    0
#  1  B#0   1.0  [0,0,0]       [1,0,0]                 A#0(p0)                          1    1 - 0 = 1
#     (tie with A#0 at end 1.0: origin 0 < 1, so A#0 is position 0)
#  2  C#0   1.5  [0,0,0]       [1,1,0]                 A#0(p0), B#0(p1)                 2    2 - 0 = 2
#  3  A#1   2.0  [1,1,0]       [1,1,1]                 C#0(p2)                          1    3 - 2 = 1
#  4  B#1   2.5  [0,1,1]       [2,1,1]                 A#0(p0), A#1(p3)                 2    4 - 0 = 4
#     (hole: B#0 p1 and C#0 p2 are in B's model, so the loose window 4 exceeds s = 2)
#  5  A#2   3.0  [2,1,1]       [2,2,1]                 B#1(p4)                          1    5 - 4 = 1
#  6  C#1   3.0  [1,0,1]       [3,2,1]                 A#1(p3), A#2(p5), B#0(p1),       4    6 - 1 = 5
#                                                        B#1(p4)
#     (tie with A#2 at end 3.0: origin 0 < 2, so A#2 is position 5 and C#1 position 6)
#  7  B#2   3.5  [1,2,1]       [3,2,2]                 A#1(p3), A#2(p5), C#1(p6)        3    7 - 3 = 4
#
#  sum s  = 0+1+2+1+2+1+4+3 = 14   S_avg  = 14/8 = 7/4    S_max  = 4
#  sum s^ = 0+1+2+1+4+1+5+4 = 18   S^_avg = 18/8 = 9/4    S^_max = 5
#  histogram of s (integer bins 0..4): [1, 3, 2, 1, 1]
# ---------------------------------------------------------------------------------------------------------
HAND_ROWS = [  # (origin, id, end, clock) in global order
    (0, 0, 1.0, (0, 0, 0)),
    (1, 0, 1.0, (0, 0, 0)),
    (2, 0, 1.5, (0, 0, 0)),
    (0, 1, 2.0, (1, 1, 0)),
    (1, 1, 2.5, (0, 1, 1)),
    (0, 2, 3.0, (2, 1, 1)),
    (2, 1, 3.0, (1, 0, 1)),
    (1, 2, 3.5, (1, 2, 1)),
]
HAND_S = [0, 1, 2, 1, 2, 1, 4, 3]
HAND_LOOSE = [0, 1, 2, 1, 4, 1, 5, 4]


def _arrays(rows):
    origin = np.array([r[0] for r in rows], dtype=np.int64)
    index = np.array([r[1] for r in rows], dtype=np.int64)
    end = np.array([r[2] for r in rows], dtype=np.float64)
    clock = np.array([r[3] for r in rows], dtype=np.int64).reshape(len(rows), -1)
    return origin, index, end, clock


def test_hand_worked_schedule() -> None:
    perm = [5, 2, 7, 0, 6, 3, 1, 4]  # input rows shuffled: the code must find the global order itself
    rows = [HAND_ROWS[p] for p in perm]
    stats = compute_staleness(*_arrays(rows))

    assert stats.count == 8
    assert Fraction(stats.s_avg).limit_denominator(1000) == Fraction(7, 4)
    assert stats.s_max == 4
    assert Fraction(stats.loose_avg).limit_denominator(1000) == Fraction(9, 4)
    assert stats.loose_max == 5
    assert stats.anomalies == 0
    assert stats.per_gradient.tolist() == HAND_S
    assert stats.loose.tolist() == HAND_LOOSE
    # order[k] is the input row of global position k; input row i holds HAND_ROWS[perm[i]].
    assert [perm[r] for r in stats.order.tolist()] == list(range(8))
    counts, edges = stats.histogram()
    assert counts.tolist() == [1, 3, 2, 1, 1]
    assert edges.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_hand_worked_loose_exceeds_plain_and_ties() -> None:
    stats = compute_staleness(*_arrays(HAND_ROWS))
    # Position 4 (B#1) has a hole in its missing set: s=2 but s^=4.
    assert (stats.per_gradient[4], stats.loose[4]) == (2, 4)
    # Tie at end 1.0 (A#0, B#0) and at 3.0 (A#2, C#1) broken by origin.
    assert stats.order.tolist()[:2] == [0, 1]
    assert stats.order.tolist()[5:7] == [5, 6]
    assert np.all(stats.per_gradient <= stats.loose)


def test_tie_break_changes_the_numbers() -> None:
    # Same clocks, but C#1 now ends strictly before A#2: C#1 (clock [1,0,1]) at position 5 misses
    # A#1(p3), B#0(p1), B#1(p4) -> s=3, s^=5-1=4; A#2 (clock [2,1,1]) at position 6 misses B#1(p4), C#1(p5)
    # -> s=2, s^=6-4=2. Sums: s 0+1+2+1+2+3+2+3=14, s^ 0+1+2+1+4+4+2+4=18; per-gradient values differ.
    rows = list(HAND_ROWS)
    rows[6] = (2, 1, 2.9, (1, 0, 1))
    stats = compute_staleness(*_arrays(rows))
    assert stats.order.tolist() == [0, 1, 2, 3, 4, 6, 5, 7]
    assert stats.per_gradient.tolist() == [0, 1, 2, 1, 2, 3, 2, 3]
    assert stats.loose.tolist() == [0, 1, 2, 1, 4, 4, 2, 4]
    assert (stats.s_max, stats.loose_max) == (3, 4)


def test_hand_worked_anomaly_is_clamped() -> None:
    # Clock skew: B's machine says B#0 ended at 1.0, yet B's model already held A#0, which A's machine says
    # ended at 2.0. Global order: B#0 (p0), A#0 (p1).
    #  k=0 B#0 clock [1,0], C(0)=[0,0]: entry A clamped 1 -> 0 (1 anomaly), M={} -> s=0, s^=0
    #  k=1 A#0 clock [0,0], C(1)=[0,1]: M={B#0(p0)} -> s=1, s^=1
    stats = compute_staleness([0, 1], [0, 0], [2.0, 1.0], [[0, 0], [1, 0]])
    assert stats.anomalies == 1
    assert stats.per_gradient.tolist() == [0, 1]
    assert stats.loose.tolist() == [0, 1]
    assert stats.order.tolist() == [1, 0]


def test_sequential_run_is_all_zero() -> None:
    # Round robin over 4 workers, each model holding every earlier gradient: clock = counts so far.
    world, total = 4, 40
    applied = [0] * world
    rows = []
    for k in range(total):
        w = k % world
        rows.append((w, applied[w], float(k), tuple(applied)))
        applied[w] += 1
    stats = compute_staleness(*_arrays(rows))
    assert stats.count == total
    assert stats.per_gradient.tolist() == [0] * total
    assert stats.loose.tolist() == [0] * total
    assert (stats.s_avg, stats.s_max, stats.loose_avg, stats.loose_max, stats.anomalies) == (
        0.0,
        0,
        0.0,
        0,
        0,
    )


def test_empty_input_is_all_zero() -> None:
    for clock in ([], np.zeros((0, 3), dtype=np.int64)):
        stats = compute_staleness([], [], [], clock)
        assert (stats.count, stats.s_avg, stats.s_max, stats.loose_avg, stats.loose_max, stats.anomalies) == (
            0,
            0.0,
            0,
            0.0,
            0,
            0,
        )
        assert stats.per_gradient.size == stats.loose.size == stats.order.size == 0
        assert int(stats.histogram()[0].sum()) == 0
    assert StalenessLedger(3).stats().count == 0


# --- brute-force oracle ----------------------------------------------------------------------------------


def _oracle(origin, index, end, clock):
    """Literal set-based definition: build M_k from sets of (origin, id) pairs."""
    rows = sorted(range(len(origin)), key=lambda r: (float(end[r]), int(origin[r]), int(index[r])))
    ident = [(int(origin[r]), int(index[r])) for r in rows]
    position = {g: k for k, g in enumerate(ident)}
    s, loose, anomalies = [], [], 0
    for k, r in enumerate(rows):
        before = set(ident[:k])
        model = {(j, i) for j in range(clock.shape[1]) for i in range(int(clock[r, j]))}
        for j in range(clock.shape[1]):
            if any((j, i) not in before for i in range(int(clock[r, j]))):
                anomalies += 1
        missing = before - model
        s.append(len(missing))
        loose.append(k - min(position[g] for g in missing) if missing else 0)
    return rows, s, loose, anomalies


def _random_schedule(rng: np.random.Generator, skew: bool):
    world = int(rng.integers(1, 5))
    total = int(rng.integers(1, 16))
    origin = rng.integers(0, world, total)
    index = np.zeros(total, dtype=np.int64)
    end = np.zeros(total)
    for j in range(world):
        mine = np.flatnonzero(origin == j)
        index[mine] = np.arange(mine.size)
        # Small integer steps (including 0) make ties across and within origins common.
        end[mine] = np.cumsum(rng.integers(0, 3, mine.size))
    clock = np.zeros((total, world), dtype=np.int64)
    for r in range(total):
        for j in range(world):
            if skew:
                clock[r, j] = rng.integers(0, int((origin == j).sum()) + 1)
            else:
                # A plausible model: only gradients that ended strictly earlier can be in it.
                done = int(((origin == j) & (end < end[r])).sum())
                clock[r, j] = rng.integers(0, done + 1)
        if not skew:
            clock[r, origin[r]] = index[r]  # a worker always holds its own earlier gradients
    perm = rng.permutation(total)
    return origin[perm], index[perm], end[perm], clock[perm]


@pytest.mark.parametrize("skew", [False, True])
def test_matches_set_oracle(skew: bool) -> None:
    rng = np.random.default_rng(12345 + skew)
    saw_anomaly = saw_hole = False
    for _ in range(300):
        origin, index, end, clock = _random_schedule(rng, skew)
        rows, s, loose, anomalies = _oracle(origin, index, end, clock)
        stats = compute_staleness(origin, index, end, clock)
        assert stats.order.tolist() == rows
        assert stats.per_gradient.tolist() == s
        assert stats.loose.tolist() == loose
        assert stats.anomalies == anomalies
        assert stats.s_max == max(s) and stats.loose_max == max(loose)
        assert stats.s_avg == pytest.approx(sum(s) / len(s))
        assert stats.loose_avg == pytest.approx(sum(loose) / len(loose))
        saw_anomaly |= anomalies > 0
        saw_hole |= any(a < b for a, b in zip(s, loose, strict=True))
    assert saw_hole
    assert saw_anomaly == skew


@pytest.mark.parametrize("skew", [False, True])
def test_matches_set_oracle_in_small_blocks(skew: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """compute_staleness works on row blocks (memory at 10,000 workers); tiny blocks change nothing."""
    import dasgd.core.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "_BLOCK_ENTRIES", 3)  # a block of 1 to 3 rows
    test_matches_set_oracle(skew)


def test_ledger_collects_and_matches() -> None:
    ledger = StalenessLedger(3)
    clock = np.zeros(3, dtype=np.int64)
    for origin, index, end, vc in reversed(HAND_ROWS):
        clock[:] = vc
        ledger.record(origin, index, end - 0.5, end, clock)
        clock[:] = 99  # the ledger must have copied the clock
    assert len(ledger) == 8
    stats = ledger.stats()
    assert stats.per_gradient.tolist() == HAND_S
    assert stats.loose.tolist() == HAND_LOOSE
    o, i, start, end, vc = ledger.arrays()
    assert o.tolist() == [r[0] for r in reversed(HAND_ROWS)]
    assert i.tolist() == [r[1] for r in reversed(HAND_ROWS)]
    assert end.tolist() == [r[2] for r in reversed(HAND_ROWS)]
    assert (end - start).tolist() == [0.5] * 8
    assert vc.tolist() == [list(r[3]) for r in reversed(HAND_ROWS)]


def test_ledger_grows_past_initial_capacity() -> None:
    ledger = StalenessLedger(2)
    for k in range(3000):
        ledger.record(k % 2, k // 2, float(k), float(k), np.array([(k + 1) // 2, k // 2]))
    stats = ledger.stats()
    assert stats.count == 3000 and stats.s_max == 0 and stats.anomalies == 0
    assert ledger.arrays()[4].shape == (3000, 2)


def test_ledger_take_hands_over_narrow_clocks_and_empties_it() -> None:
    ledger = StalenessLedger(3)
    for origin, index, end, vc in HAND_ROWS:
        ledger.record(origin, index, end - 0.5, end, np.array(vc))
    copies = ledger.arrays()
    taken = ledger.take()
    assert taken[4].dtype == np.int32  # 4 bytes an entry: a large run's table is 10^8 of them
    for a, b in zip(copies, taken, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(ledger) == 0 and ledger.arrays()[4].shape == (0, 3)
    ledger.record(0, 0, 0.0, 1.0, np.zeros(3, dtype=np.int64))  # still usable
    assert len(ledger) == 1


def test_narrow_clocks_give_the_same_staleness_as_int64() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        origin, index, end, clock = _random_schedule(rng, skew=True)
        wide = compute_staleness(origin, index, end, clock.astype(np.int64))
        narrow = compute_staleness(origin, index, end, clock.astype(np.int32))
        assert narrow.per_gradient.tolist() == wide.per_gradient.tolist()
        assert narrow.loose.tolist() == wide.loose.tolist() and narrow.anomalies == wide.anomalies


def test_ledger_refuses_a_clock_entry_it_cannot_store() -> None:
    ledger = StalenessLedger(2)
    with pytest.raises(LedgerError, match="more gradients of one worker"):
        ledger.record(0, 0, 0.0, 1.0, np.array([0, 2**31]))
    assert len(ledger) == 0


# --- model staleness, histogram, dict ----------------------------------------------------------------------


def test_model_staleness_hand_examples() -> None:
    assert model_staleness(np.array([3, 1, 4]), np.array([3, 1, 4])) == 0
    # G_a = {A0,A1,A2, B0}, G_b = {A0, B0,B1,B2, C0}: sym-diff = {A1,A2, B1,B2, C0} -> 5
    assert model_staleness(np.array([3, 1, 0]), np.array([1, 3, 1])) == 5
    assert model_staleness(np.array([0]), np.array([7])) == 7


def test_histogram_and_dict() -> None:
    stats = compute_staleness(*_arrays(HAND_ROWS))
    counts, edges = stats.histogram(bins=2)
    assert counts.tolist() == [4, 4]  # [0,2): s in {0,1,1,1}; [2,4]: s in {2,2,4,3}
    assert edges.tolist() == [0.0, 2.0, 4.0]
    assert int(stats.histogram(bins=7)[0].sum()) == stats.count
    summary = json.loads(json.dumps(stats.to_dict()))
    assert summary == {
        "count": 8,
        "s_avg": 1.75,
        "s_max": 4,
        "loose_avg": 2.25,
        "loose_max": 5,
        "anomalies": 0,
        "histogram": {"counts": [1, 3, 2, 1, 1], "edges": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]},
    }
    with pytest.raises(LedgerError, match="bins"):
        stats.histogram(bins=0)


def test_stats_arrays_are_read_only() -> None:
    stats = compute_staleness(*_arrays(HAND_ROWS))
    assert isinstance(stats, StalenessStats)
    with pytest.raises(ValueError):
        stats.per_gradient[0] = 5


# --- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "index", "end", "clock", "match"),
    [
        ([0, 1], [0], [1.0, 2.0], [[0, 0], [0, 0]], "one row per gradient"),
        ([0.0, 1.0], [0, 0], [1.0, 2.0], [[0, 0], [0, 0]], "origin must have an integer dtype"),
        ([0, 2], [0, 0], [1.0, 2.0], [[0, 0], [0, 0]], "origin 2 is not a worker"),
        ([0, 1], [0, -1], [1.0, 2.0], [[0, 0], [0, 0]], "index must be >= 0"),
        ([0, 1], [0, 0], [1.0, np.nan], [[0, 0], [0, 0]], "finite"),
        ([0, 1], [0, 0], [1.0, 2.0], [0, 0], "clock must be a 2-D"),
        ([0, 1], [0, 0], [1.0, 2.0], [[0, -1], [0, 0]], "must be >= 0"),
        ([0, 1], [0, 0], [1.0, 2.0], [[0.0, 0.0], [0.0, 0.0]], "clock must have an integer dtype"),
        ([0, 0], [0, 0], [1.0, 2.0], [[0], [0]], "duplicate record"),
        ([0, 0], [0, 2], [1.0, 2.0], [[0], [0]], "id 1 is missing"),
        ([0, 0], [0, 1], [2.0, 1.0], [[0], [0]], "must not decrease"),
        ([[0]], [0], [1.0], [[0]], "origin must be a 1-D"),
    ],
)
def test_compute_staleness_validation(origin, index, end, clock, match) -> None:
    with pytest.raises(LedgerError, match=match):
        compute_staleness(origin, index, end, clock)


def test_other_validation() -> None:
    assert issubclass(LedgerError, ValueError)
    with pytest.raises(LedgerError, match="one entry per worker"):
        model_staleness(np.array([1, 2]), np.array([1, 2, 3]))
    with pytest.raises(LedgerError, match=">= 0"):
        model_staleness(np.array([-1]), np.array([1]))
    with pytest.raises(LedgerError, match="world_size"):
        StalenessLedger(0)
    ledger = StalenessLedger(2)
    with pytest.raises(LedgerError, match="not a worker"):
        ledger.record(2, 0, 0.0, 1.0, np.zeros(2, dtype=np.int64))
    with pytest.raises(LedgerError, match="before it started"):
        ledger.record(0, 0, 2.0, 1.0, np.zeros(2, dtype=np.int64))
    with pytest.raises(LedgerError, match="world_size=2 entries"):
        ledger.record(0, 0, 0.0, 1.0, np.zeros(3, dtype=np.int64))
    with pytest.raises(LedgerError, match="integer"):
        ledger.record(0, 0.5, 0.0, 1.0, np.zeros(2, dtype=np.int64))
    assert len(ledger) == 0


def test_large_run_is_fast() -> None:
    # T = 200k, N = 16 must be well under a second; 5 s leaves room for a loaded CI box yet fails on O(T^2).
    rng = np.random.default_rng(7)
    total, world = 200_000, 16
    origin = rng.integers(0, world, total)
    index = np.zeros(total, dtype=np.int64)
    end = np.zeros(total)
    for j in range(world):
        mine = np.flatnonzero(origin == j)
        index[mine] = np.arange(mine.size)
        end[mine] = np.cumsum(rng.exponential(1.0, mine.size))
    clock = rng.integers(0, 500, (total, world))
    began = time.perf_counter()
    stats = compute_staleness(origin, index, end, clock)
    assert time.perf_counter() - began < 5.0
    assert stats.count == total and int(stats.histogram()[0].sum()) == total


@pytest.mark.parametrize("block_entries", [1, 7, 1 << 22])
def test_keep_clock_rows_moves_the_kept_rows_up_in_place(monkeypatch, block_entries):
    import dasgd.core.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "_BLOCK_ENTRIES", block_entries)
    rng = np.random.default_rng(3)
    table = rng.integers(0, 1000, size=(50, 4)).astype(np.int32)
    rows = np.flatnonzero(rng.random(50) < 0.6)
    want = table[rows].copy()  # fancy indexing copies: the truth, taken before the table is changed
    got = ledger_module.keep_clock_rows(table, rows)
    assert np.shares_memory(got, table)  # no second table
    np.testing.assert_array_equal(got, want)


# --- mutation-testing additions (benchmarks/mutation.py): exact reasons, edges of each check -------------


def _raises(match: str, call: Callable[..., Any], *args: Any) -> None:
    """``call(*args)`` raises LedgerError with exactly ``match`` as the start of its message."""
    with pytest.raises(LedgerError) as caught:
        call(*args)
    assert str(caught.value).startswith(match), str(caught.value)


def test_histogram_types_and_edges_are_the_same_in_both_bin_modes() -> None:
    stats = compute_staleness(*_arrays(HAND_ROWS))
    for counts, edges in (stats.histogram(), stats.histogram(bins=3)):
        assert counts.dtype == np.int64  # counts of gradients, whatever numpy's own histogram returns
        assert edges.dtype == np.float64  # fractional edges in the binned mode, so float in both
        assert counts.size == edges.size - 1
    # One bin is a valid request: everything in [0, s_max].
    counts, edges = stats.histogram(bins=1)
    assert (counts.tolist(), edges.tolist()) == ([8], [0.0, 4.0])


def test_histogram_of_a_zero_staleness_run_spans_zero_to_one() -> None:
    # s_max = 0: the docstring's range [0, max(s_max, 1)] = [0, 1], not numpy's default around the data.
    stats = compute_staleness([0, 0, 0], [0, 1, 2], [1.0, 2.0, 3.0], [[0], [1], [2]])
    assert stats.s_max == 0
    counts, edges = stats.histogram(bins=2)
    assert (counts.tolist(), edges.tolist()) == ([3, 0], [0.0, 0.5, 1.0])
    assert [a.tolist() for a in stats.histogram()] == [[3], [0.0, 1.0]]
    # No gradients: still one integer bin [0, 1) for s = 0, holding nothing.
    counts, edges = compute_staleness([], [], [], []).histogram()
    assert (counts.tolist(), edges.tolist()) == ([0], [0.0, 1.0])


@pytest.mark.parametrize("bins", [True, 2.5, "3", -1])
def test_histogram_refuses_bins_that_are_not_positive_integers(bins: object) -> None:
    stats = compute_staleness(*_arrays(HAND_ROWS))
    _raises(f"histogram bins must be None or a positive integer, got {bins!r}", stats.histogram, bins)


def test_unsigned_and_narrow_integer_inputs_give_the_int64_answers() -> None:
    # Clocks may arrive as unsigned integers; differences must not wrap around (1 - 3 is -2, not 2^32 - 2).
    for dtype in (np.uint8, np.uint32, np.uint64, np.int16):
        a, b = np.array([3, 1, 0], dtype=dtype), np.array([1, 3, 1], dtype=dtype)
        assert model_staleness(a, b) == 5  # the hand example above
    origin, index, end, clock = _arrays(HAND_ROWS)
    stats = compute_staleness(origin.astype(np.uint16), index.astype(np.uint32), end, clock.astype(np.uint8))
    assert stats.per_gradient.tolist() == HAND_S and stats.loose.tolist() == HAND_LOOSE


def test_uint64_values_up_to_the_int64_limit_are_accepted_and_above_it_refused() -> None:
    top = np.iinfo(np.int64).max
    assert model_staleness(np.array([top], dtype=np.uint64), np.array([top - 2], dtype=np.uint64)) == 2
    _raises(
        "clock_a holds values too large for int64",
        model_staleness,
        np.array([top + 1], dtype=np.uint64),
        np.array([0], dtype=np.uint64),
    )


def test_a_narrow_clock_table_is_widened_block_by_block_not_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    # Clocks are the bulk of a run's records (int32 in the ledger; 10^8 entries at 1,000 workers), so
    # compute_staleness reads a narrow table in place and widens one block of rows at a time. Here an int64
    # copy of the table would be 8 MB; the rest of the work stays near 1 MB.
    import tracemalloc

    import dasgd.core.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "_BLOCK_ENTRIES", 1 << 14)
    total, world = 4000, 256
    origin, index = np.arange(total) % world, np.arange(total) // world
    end = np.arange(total, dtype=np.float64)
    for dtype in (np.int32, np.uint16):
        clock = np.zeros((total, world), dtype=dtype)
        tracemalloc.start()
        try:
            stats = compute_staleness(origin, index, end, clock)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # Every model is empty, so gradient k misses the k before it.
        assert stats.per_gradient.tolist() == list(range(total))
        assert peak < 8 * total * world / 2, f"{dtype.__name__}: peak {peak} bytes"


def test_id_errors_name_the_exact_duplicate_gap_or_reversal() -> None:
    zeros = np.zeros((4, 2), dtype=np.int64)
    # The duplicate is worker 1's id 1, not the first row: the message must find it.
    _raises(
        "duplicate record: worker 1 gradient id 1 appears more than once; record each gradient exactly once",
        compute_staleness,
        [0, 0, 1, 1],
        [0, 1, 1, 1],
        [1.0, 2.0, 3.0, 4.0],
        zeros,
    )
    # A worker with a single record whose id is not 0.
    _raises(
        "worker 1 has 1 records but its ids are not 0..0 (id 0 is missing); every gradient",
        compute_staleness,
        [0, 1],
        [0, 3],
        [1.0, 2.0],
        zeros[:2],
    )
    _raises(
        "worker 0 has 3 records but its ids are not 0..2 (id 1 is missing)",
        compute_staleness,
        [0, 0, 0],
        [0, 2, 3],
        [1.0, 2.0, 3.0],
        zeros[:3, :1],
    )
    # Equal ends within a worker are fine (ids break the tie); only a decrease is an error, and the message
    # names the first decrease, not a comparison with the first gradient.
    _raises(
        "worker 1's gradient 1 ends at 2.0, before its gradient 0 (ends at 3.0); a worker's own",
        compute_staleness,
        [0, 0, 1, 1],
        [0, 1, 0, 1],
        [1.0, 1.0, 3.0, 2.0],
        zeros,
    )
    _raises(
        "worker 0's gradient 2 ends at 2.0, before its gradient 1 (ends at 3.0)",
        compute_staleness,
        [0, 0, 0],
        [0, 1, 2],
        [1.0, 3.0, 2.0],
        zeros[:3, :1],
    )


def test_compute_staleness_reasons_name_the_argument_and_the_numbers() -> None:
    ok = ([0, 1], [0, 0], [1.0, 2.0], [[0, 0], [0, 0]])
    _raises("index must be a 1-D array, got shape (1, 2)", compute_staleness, ok[0], [[0, 0]], ok[2], ok[3])
    _raises(
        "index must have an integer dtype (int64), got float64",
        compute_staleness,
        ok[0],
        [0.0, 0.0],
        ok[2],
        ok[3],
    )
    _raises("end must be a 1-D array, got shape (1, 2)", compute_staleness, ok[0], ok[1], [[1.0, 2.0]], ok[3])
    _raises(
        "end must hold real numbers (float64), got dtype <U1",
        compute_staleness,
        ok[0],
        ok[1],
        ["a", "b"],
        ok[3],
    )
    _raises(
        "origin, index, end and clock must have one row per gradient, got lengths 2, 2, 2 and 1",
        compute_staleness,
        ok[0],
        ok[1],
        ok[2],
        [[0, 0]],
    )
    _raises(
        "clock has 0 columns; it needs one column per worker",
        compute_staleness,
        ok[0],
        ok[1],
        ok[2],
        np.zeros((2, 0), dtype=np.int64),
    )
    _raises(
        "origin 2 is not a worker: clock has 2 columns, so origins are 0..1",
        compute_staleness,
        [0, 2],
        ok[1],
        ok[2],
        ok[3],
    )
    _raises(
        "end holds a NaN or infinite time; every gradient needs a finite completion time",
        compute_staleness,
        ok[0],
        ok[1],
        [1.0, np.inf],
        ok[3],
    )
    _raises(
        "clock entries count applied gradients and must be >= 0, got -1",
        compute_staleness,
        ok[0],
        ok[1],
        ok[2],
        [[0, -1], [0, 0]],
    )


@pytest.mark.parametrize(
    ("origin", "index", "end", "clock", "lengths"),
    [
        ([0], [0], [], [[0]], "1, 1, 0 and 1"),  # only end is empty
        ([0], [], [], [[0]], "1, 0, 0 and 1"),  # index and end are empty
        ([], [], [], [[0, 0]], "0, 0, 0 and 1"),  # only the clock has rows
    ],
)
def test_partly_empty_input_is_an_error_not_an_empty_run(origin, index, end, clock, lengths) -> None:
    _raises(
        f"origin, index, end and clock must have one row per gradient, got lengths {lengths}",
        compute_staleness,
        origin,
        index,
        end,
        clock,
    )


def test_keep_clock_rows_moves_the_first_block_too() -> None:
    table = np.arange(12, dtype=np.int32).reshape(6, 2)  # row r holds [2r, 2r + 1]
    kept = keep_clock_rows(table, np.array([1, 3, 4]))
    assert kept.tolist() == [[2, 3], [6, 7], [8, 9]]


def test_model_staleness_accepts_zero_entries_and_names_each_clock() -> None:
    # G_a = {A0, A1}, G_b = {B0}: sym-diff 3; zeros are valid counts on either side.
    assert model_staleness(np.array([2, 0]), np.array([0, 1])) == 3
    _raises("clock_a must be a 1-D array, got shape (1, 1)", model_staleness, np.array([[1]]), np.array([1]))
    _raises(
        "clock_b must have an integer dtype (int64), got float64",
        model_staleness,
        np.array([1]),
        np.array([1.0]),
    )
    _raises(
        "clock entries count applied gradients and must be >= 0",
        model_staleness,
        np.array([0]),
        np.array([-1]),
    )


def test_a_one_worker_ledger_is_sequential_sgd() -> None:
    ledger = StalenessLedger(1)
    for k in range(3):
        ledger.record(0, k, float(k), float(k) + 0.5, np.array([k]))
    assert ledger.stats().per_gradient.tolist() == [0, 0, 0]


def test_ledger_reasons_name_the_argument_and_the_values() -> None:
    _raises("world_size must be an integer, got a bool", StalenessLedger, True)
    _raises("world_size must be an integer, got float", StalenessLedger, 2.0)
    _raises("world_size must be >= 1, got 0", StalenessLedger, 0)
    ledger = StalenessLedger(2)
    clock = np.zeros(2, dtype=np.int64)
    _raises("origin must be an integer, got str", ledger.record, "0", 0, 0.0, 1.0, clock)
    _raises("index must be an integer, got float", ledger.record, 0, 0.5, 0.0, 1.0, clock)
    _raises("index must be >= 0, got -1", ledger.record, 0, -1, 0.0, 1.0, clock)
    _raises("start and end must be finite times, got 0.0 and inf", ledger.record, 0, 0, 0.0, np.inf, clock)
    _raises("start and end must be finite times, got nan and 1.0", ledger.record, 0, 0, np.nan, 1.0, clock)
    _raises("clock must be a 1-D array, got shape (1, 2)", ledger.record, 0, 0, 0.0, 1.0, clock[None, :])
    _raises(
        "clock entries count applied gradients and must be >= 0",
        ledger.record,
        0,
        0,
        0.0,
        1.0,
        np.array([0, -1]),
    )
    assert len(ledger) == 0


def test_the_ledger_stores_clocks_as_clock_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    # CLOCK_DTYPE is the one place that sets the storage width (the simulator keeps its clock snapshots in it too).
    import dasgd.core.ledger as ledger_module

    for dtype in (np.int16, np.int64):
        monkeypatch.setattr(ledger_module, "CLOCK_DTYPE", np.dtype(dtype))
        ledger = StalenessLedger(2)
        ledger.record(0, 0, 0.0, 1.0, np.array([0, 3]))
        assert ledger.take()[4].dtype == dtype
