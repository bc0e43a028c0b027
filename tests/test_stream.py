"""A worker's streamed records (metrics/stream.py): what a killed worker leaves behind, torn tail included."""

from __future__ import annotations

import numpy as np

from dasgd.metrics.stream import RecordStream, StreamedLedger, read_stream


def _write(tmp_path, rows: int, n: int = 3) -> RecordStream:  # noqa: ANN001
    stream = RecordStream(tmp_path, 1, n, flush_every=3600.0)
    ledger = StreamedLedger(n, stream)
    for i in range(rows):
        ledger.record(1, i, float(i), i + 0.5, np.array([i, i + 1, 2 * i]))
    return stream


def test_records_and_evaluations_read_back_exactly(tmp_path):
    stream = _write(tmp_path, 5)
    stream.evaluation({"worker": 1, "time": 2.0, "gradients": 7, "test_accuracy": 0.5})
    stream.close()
    got = read_stream(tmp_path, 1, 3)
    assert got is not None and got.computed == 5
    assert got.index.tolist() == [0, 1, 2, 3, 4]
    assert got.end.tolist() == [0.5, 1.5, 2.5, 3.5, 4.5]
    assert got.clock.tolist()[4] == [4, 5, 8]
    assert got.evals == [{"worker": 1, "time": 2.0, "gradients": 7, "test_accuracy": 0.5}]


def test_a_flush_every_second_leaves_rows_on_disk_before_close(tmp_path):
    stream = RecordStream(tmp_path, 0, 2, flush_every=0.0)
    stream.record(0, 0.0, 1.0, np.array([0, 0]))
    got = read_stream(tmp_path, 0, 2)  # not closed: what a killed process would leave
    assert got is not None and got.computed == 1
    buffered = RecordStream(tmp_path / "b", 0, 2, flush_every=3600.0)
    buffered.record(0, 0.0, 1.0, np.array([0, 0]))
    assert read_stream(tmp_path / "b", 0, 2).computed == 0  # still in the buffer: the bound is the flush period


def test_a_torn_last_row_and_line_are_ignored(tmp_path):
    _write(tmp_path, 4).close()
    path = tmp_path / "rank1.records"
    path.write_bytes(path.read_bytes()[:-5])
    (tmp_path / "rank1.evals.jsonl").write_bytes(b'{"worker": 1, "time": 1.0, "gradients": 2}\n{"worker": 1, "ti')
    got = read_stream(tmp_path, 1, 3)
    assert got.computed == 3 and len(got.evals) == 1


def test_a_stream_of_another_world_size_or_garbage_is_not_read(tmp_path):
    _write(tmp_path, 2).close()
    assert read_stream(tmp_path, 1, 4) is None
    assert read_stream(tmp_path, 2, 3) is None  # never written
    (tmp_path / "rank2.records").write_bytes(b"\xff" * 100)
    assert read_stream(tmp_path, 2, 3) is None
