"""The set of one origin's gradient ids a worker has applied, for exactly-once application.

Gradient ids are per origin (see :mod:`dasgd.core.message`): worker ``o`` numbers its gradients 0, 1, 2, ...
and a message carries the sum of a half-open id range ``[lo, hi)``. A receiver keeps one :class:`GradientSet`
per origin and applies a message only if :meth:`GradientSet.add` accepts its range.

Storage is a contiguous prefix ``[0, prefix)`` plus a sorted list of disjoint, non-adjacent ranges beyond it.
With FIFO links and tree routing (:mod:`dasgd.core.topology`) ids arrive in order, so the extras list stays
empty and every operation is O(1); extras appear only when some path reorders messages, and they fold back
into the prefix as soon as the gap closes, so memory tracks the number of gaps, not the number of ids.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

__all__ = ["GradientSet"]


class GradientSet:
    """A set of non-negative integer ids, stored as a prefix ``[0, prefix)`` plus disjoint extra ranges.

    Ranges are half-open ``[lo, hi)``. Adding is all-or-nothing: a range that shares even one id with the
    set is refused unchanged. A coalesced message is a sum of gradients, so applying part of it is impossible;
    a partial overlap can only come from a bug or a forged message, and is treated like a duplicate.
    """

    __slots__ = ("_prefix", "_los", "_his", "_count")

    def __init__(self) -> None:
        """An empty set."""
        self._prefix = 0
        # Invariant: _los/_his describe sorted ranges with prefix < lo_0 < hi_0 < lo_1 < hi_1 < ...
        # (strict, so adjacent ranges are always merged and the representation is unique).
        self._los: list[int] = []
        self._his: list[int] = []
        self._count = 0

    @property
    def prefix(self) -> int:
        """Every id below ``prefix`` is in the set, and ``prefix`` itself is not."""
        return self._prefix

    def overlaps(self, lo: int, hi: int) -> bool:
        """Whether any id in ``[lo, hi)`` is already in the set (False for an empty range)."""
        lo = max(lo, 0)  # no negative id is ever held
        if hi <= lo:
            return False
        if lo < self._prefix:
            return True
        # The only extra range that can intersect [lo, hi) is the first one ending after lo.
        i = bisect_right(self._his, lo)
        return i < len(self._los) and self._los[i] < hi

    def add(self, lo: int, hi: int) -> bool:
        """Add the ids ``[lo, hi)``.

        Returns:
            True if they were added; False, leaving the set unchanged, if any of them was already present.

        Raises:
            ValueError: if ``lo < 0`` or ``lo >= hi``.
        """
        if lo < 0 or lo >= hi:
            raise ValueError(f"gradient id range [{lo}, {hi}) is invalid: need 0 <= lo < hi")
        if self.overlaps(lo, hi):
            return False
        los, his = self._los, self._his
        if lo == self._prefix:
            # Extend the prefix; disjointness means at most the first extra range can now touch it.
            new_prefix = hi
            if los and los[0] == hi:
                new_prefix = his[0]
                del los[0], his[0]
            self._prefix = new_prefix
        else:
            i = bisect_left(los, lo)
            join_left = i > 0 and his[i - 1] == lo
            join_right = i < len(los) and los[i] == hi
            if join_left and join_right:
                his[i - 1] = his[i]
                del los[i], his[i]
            elif join_left:
                his[i - 1] = hi
            elif join_right:
                los[i] = lo
            else:
                los.insert(i, lo)
                his.insert(i, hi)
        self._count += hi - lo
        return True

    def __contains__(self, i: object) -> bool:
        """Whether id ``i`` is in the set."""
        if not isinstance(i, int) or i < 0:
            return False
        if i < self._prefix:
            return True
        j = bisect_right(self._los, i) - 1
        return j >= 0 and i < self._his[j]

    def __len__(self) -> int:
        """Number of ids held."""
        return self._count

    def missing_below(self, n: int) -> list[tuple[int, int]]:
        """The ranges of ids below ``n`` that are not in the set, sorted: the gaps still to be filled."""
        gaps: list[tuple[int, int]] = []
        start = self._prefix
        for lo, hi in zip(self._los, self._his, strict=True):
            if start >= n:
                return gaps
            gaps.append((start, min(lo, n)))
            start = hi
        if start < n:
            gaps.append((start, n))
        return gaps

    def ranges(self) -> list[tuple[int, int]]:
        """The set as sorted, disjoint, non-adjacent ``(lo, hi)`` ranges."""
        head = [(0, self._prefix)] if self._prefix > 0 else []
        return head + list(zip(self._los, self._his, strict=True))

    def __repr__(self) -> str:
        return f"GradientSet({self.ranges()!r})"
