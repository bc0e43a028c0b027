"""GradientSet against hand-worked cases and a plain Python set oracle."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dasgd.core.gradset import GradientSet


def runs(ids: set[int]) -> list[tuple[int, int]]:
    """Maximal half-open runs of consecutive ids, sorted (the oracle's view of ranges())."""
    out: list[tuple[int, int]] = []
    for i in sorted(ids):
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def test_empty() -> None:
    g = GradientSet()
    assert g.prefix == 0 and len(g) == 0 and g.ranges() == []
    assert 0 not in g and g.missing_below(3) == [(0, 3)] and g.missing_below(0) == []
    assert not g.overlaps(0, 10)


def test_gap_closes_into_prefix() -> None:
    g = GradientSet()
    assert g.add(5, 7)
    assert g.add(0, 2)
    assert g.prefix == 2 and g.ranges() == [(0, 2), (5, 7)] and len(g) == 4
    assert g.missing_below(9) == [(2, 5), (7, 9)]
    assert g.missing_below(4) == [(2, 4)]
    assert g.add(2, 5)
    assert g.prefix == 7 and g.ranges() == [(0, 7)] and len(g) == 7
    assert g.missing_below(7) == [] and g.missing_below(8) == [(7, 8)]


def test_adjacent_extras_merge() -> None:
    g = GradientSet()
    for lo, hi in [(10, 12), (14, 16), (12, 14), (3, 4)]:
        assert g.add(lo, hi)
    assert g.ranges() == [(3, 4), (10, 16)] and g.prefix == 0 and len(g) == 7


def test_duplicates_and_partial_overlaps_change_nothing() -> None:
    g = GradientSet()
    g.add(0, 4)
    g.add(8, 10)
    before = (g.ranges(), len(g), g.prefix)
    for lo, hi in [(0, 4), (3, 5), (2, 3), (7, 9), (9, 12), (6, 11), (0, 100)]:
        assert g.overlaps(lo, hi)
        assert not g.add(lo, hi)
        assert (g.ranges(), len(g), g.prefix) == before
    assert not g.overlaps(4, 8) and not g.overlaps(10, 11)


@pytest.mark.parametrize(("lo", "hi"), [(3, 3), (4, 2), (-1, 2)])
def test_invalid_ranges_raise(lo: int, hi: int) -> None:
    with pytest.raises(ValueError, match="invalid"):
        GradientSet().add(lo, hi)


def test_contains_rejects_negatives_and_non_ints() -> None:
    g = GradientSet()
    g.add(0, 3)
    assert -1 not in g and 2 in g and 3 not in g
    assert "1" not in g  # type: ignore[operator]


ranges_strategy = st.lists(
    st.tuples(st.integers(0, 40), st.integers(1, 8)).map(lambda t: (t[0], t[0] + t[1])), max_size=60
)


@settings(max_examples=300, deadline=None)
@given(ranges_strategy, st.lists(st.tuples(st.integers(-3, 55), st.integers(-3, 55)), max_size=10))
def test_matches_a_python_set(adds: list[tuple[int, int]], queries: list[tuple[int, int]]) -> None:
    g = GradientSet()
    oracle: set[int] = set()
    for lo, hi in adds:
        new = set(range(lo, hi))
        fresh = not (new & oracle)
        assert g.add(lo, hi) is fresh
        if fresh:
            oracle |= new
        assert len(g) == len(oracle)
        expected_prefix = 0
        while expected_prefix in oracle:
            expected_prefix += 1
        assert g.prefix == expected_prefix
        assert g.ranges() == runs(oracle)
    for i in range(-2, 55):
        assert (i in g) is (i in oracle)
    for limit in (0, 1, 7, 20, 49, 60):
        assert g.missing_below(limit) == runs(set(range(limit)) - oracle)
    for lo, hi in queries:
        assert g.overlaps(lo, hi) is bool(set(range(lo, hi)) & oracle)
