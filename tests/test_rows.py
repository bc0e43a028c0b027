"""Tests for dasgd.core.rows: clock rows in blocks, handed over as one table."""

from __future__ import annotations

import numpy as np
import pytest

import dasgd.core.rows as rows_module
from dasgd.core.rows import RowBlocks, mapped_zeros


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rows_module, "_BLOCK_BYTES", 64)  # 16 rows a block (the floor), many blocks


def test_mapped_zeros_is_a_writable_zero_array() -> None:
    a = mapped_zeros((3, 5), np.dtype(np.int32))
    assert a.shape == (3, 5) and a.dtype == np.int32 and not a.any()
    a[1, 2] = 7
    assert a.sum() == 7
    assert mapped_zeros((0, 4), np.dtype(np.int64)).shape == (0, 4)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("count", [0, 1, 15, 16, 17, 100])
def test_table_holds_every_row_in_order_across_blocks(count: int) -> None:
    rng = np.random.default_rng(count)
    expected = rng.integers(0, 1000, (count, 3))
    blocks = RowBlocks(3, np.int32)
    for row in expected:
        blocks.append(row)
    assert len(blocks) == count
    table = blocks.table()
    assert table.dtype == np.int32 and table.shape == (count, 3)
    np.testing.assert_array_equal(table, expected)
    np.testing.assert_array_equal(blocks.table(release=True), expected)  # the first table was a copy
    assert len(blocks) == 0 and blocks.table().shape == (0, 3)


@pytest.mark.usefixtures("small_blocks")
def test_an_entry_too_large_widens_or_raises() -> None:
    big = 2**31 + 3
    wide = RowBlocks(2, np.int32, widen=True)
    for k in range(40):
        wide.append(np.array([k, k + 1]))
    wide.append(np.array([1, big]))
    assert wide.dtype == np.int64
    table = wide.table()
    assert table[-1].tolist() == [1, big] and table[:40, 0].tolist() == list(range(40))

    strict = RowBlocks(2, np.int32)
    strict.append(np.array([1, 2]))
    with pytest.raises(OverflowError, match="above"):
        strict.append(np.array([1, big]))
    assert len(strict) == 1 and strict.dtype == np.int32
