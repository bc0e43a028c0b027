"""Tests for dasgd.runtime.results.run_log: the workers' shards merged into the run's event log."""

from __future__ import annotations

import numpy as np

from dasgd.core.ledger import compute_staleness
from dasgd.metrics.shard import WorkerShard
from dasgd.runtime.results import run_log


def _shards(rng: np.random.Generator, world: int, per_worker: int) -> list[WorkerShard]:
    shards = []
    for rank in range(world):
        # Coarse times so that ends tie across workers: the merge must break ties by origin, then id.
        ends = np.cumsum(rng.integers(1, 4, per_worker)).astype(np.float64)
        shards.append(
            WorkerShard(
                origin=np.full(per_worker, rank, dtype=np.int64),
                index=np.arange(per_worker, dtype=np.int64),
                start=ends - 0.5,
                end=ends,
                clock=rng.integers(0, 50, (per_worker, world)).astype(np.int32),
                params=np.zeros(3, dtype=np.float32),
                final_clock=np.full(world, per_worker, dtype=np.int64),
                meta={
                    "rank": rank,
                    "train_end": float(ends[-1]),
                    "drain_end": float(ends[-1]) + 1.0,
                    "drained": True,
                    "stop_reason": "max_gradients",
                    "evals": [{"worker": rank, "time": float(ends[0]), "gradients": 1, "test_accuracy": 1}],
                },
            )
        )
    return shards


def test_run_log_merges_shards_in_global_order_with_their_own_rows() -> None:
    rng = np.random.default_rng(5)
    shards = _shards(rng, world=4, per_worker=30)
    log = run_log(list(reversed(shards)), 4)  # shard order must not matter
    origin = np.concatenate([s.origin for s in shards])
    index = np.concatenate([s.index for s in shards])
    end = np.concatenate([s.end for s in shards])
    clock = np.concatenate([s.clock for s in shards])
    order = np.lexsort((index, origin, end))
    assert log.origin.tolist() == origin[order].tolist()
    assert log.index.tolist() == index[order].tolist()
    assert log.end.tolist() == end[order].tolist()
    assert log.start.tolist() == (end[order] - 0.5).tolist()
    np.testing.assert_array_equal(log.clock, clock[order])
    assert log.clock.dtype == np.int32
    assert log.staleness().to_dict() == compute_staleness(origin, index, end, clock).to_dict()
    # Evaluations as the event log stores them (float metrics), sorted by time; stop and drain per worker.
    assert [e["time"] for e in log.evals] == sorted(e["time"] for e in log.evals)
    assert all(isinstance(e["test_accuracy"], float) for e in log.evals)
    assert [(r["event"], r["worker"]) for r in log.runs[:2]] == [("stop", 0), ("drained", 0)]
    assert log.world_size == 4 and not log.clock.flags.writeable
