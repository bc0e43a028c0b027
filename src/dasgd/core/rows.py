"""Integer rows of a fixed width, appended one at a time and handed over as one table.

The staleness record of a run is one vector clock (one integer per worker) per gradient: 10^8 integers for
1,000 simulated workers and 10^5 gradients. Held as a growing array it would be copied on every doubling
(two copies at once); held as Python lists it would take tens of gigabytes. :class:`RowBlocks` keeps the rows
in fixed-size blocks, each on its own anonymous memory map, so growing copies nothing and a block dropped
after :meth:`RowBlocks.table` has copied it goes straight back to the operating system (memory the C
allocator frees is often kept by the process; a memory map is unmapped when its last array goes).
"""

from __future__ import annotations

import mmap

import numpy as np

__all__ = ["RowBlocks", "mapped_zeros"]

_BLOCK_BYTES = 1 << 22
"""About 4 MiB a block: small next to a large run's table, large enough that a short run needs one."""


def mapped_zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A zero-filled array on its own anonymous memory map, unmapped when the array is dropped.

    Pages are allocated when first written, so an unfilled tail costs address space, not memory.
    """
    dtype = np.dtype(dtype)
    nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    buffer = mmap.mmap(-1, nbytes)
    return np.frombuffer(buffer, dtype=dtype, count=int(np.prod(shape, dtype=np.int64))).reshape(shape)


class RowBlocks:
    """Rows of ``width`` integers in blocks, stored as ``dtype`` while every entry fits it.

    Args:
        width: entries a row.
        dtype: the storage dtype (an integer type).
        widen: what to do with an entry ``dtype`` cannot hold: True switches the storage to int64 (converting
            what is stored), False raises :class:`OverflowError` and stores nothing.
    """

    def __init__(self, width: int, dtype: type | np.dtype = np.int32, widen: bool = False) -> None:
        self.width = int(width)
        self.dtype = np.dtype(dtype)
        self._widen = widen
        self._block_rows = max(16, _BLOCK_BYTES // max(1, self.width * self.dtype.itemsize))
        self._blocks: list[np.ndarray] = []
        self._rows = 0

    def __len__(self) -> int:
        return self._rows

    def append(self, row: np.ndarray) -> None:
        """Store one row (an integer array of ``width`` entries; checked by the caller)."""
        if row.size and self.dtype.itemsize < 8:
            top = np.iinfo(self.dtype).max
            if int(row.max()) > top:
                if not self._widen:
                    raise OverflowError(
                        f"entry {int(row.max())} is above {top}, the largest {self.dtype} holds"
                    )
                self.dtype = np.dtype(np.int64)
                self._blocks = [self._copy(b) for b in self._blocks]
        at = self._rows % self._block_rows
        if at == 0:
            self._blocks.append(mapped_zeros((self._block_rows, self.width), self.dtype))
        self._blocks[-1][at] = row
        self._rows += 1

    def _copy(self, block: np.ndarray) -> np.ndarray:
        wide = mapped_zeros(block.shape, self.dtype)
        wide[:] = block
        return wide

    def _span(self, b: int) -> tuple[int, int]:
        lo = b * self._block_rows
        return lo, min(self._rows, lo + self._block_rows)

    def table(self, release: bool = False) -> np.ndarray:
        """All rows as one ``(len, width)`` array (a copy). ``release`` drops each block once copied and
        leaves this empty, so the rows are held about once, not twice."""
        table = np.empty((self._rows, self.width), dtype=self.dtype)
        for b in range(len(self._blocks)):
            lo, hi = self._span(b)
            table[lo:hi] = self._blocks[b][: hi - lo]
            if release:
                self._blocks[b] = None  # type: ignore[call-overload]
        if release:
            self._blocks, self._rows = [], 0
        return table
