"""Tests for dasgd.runs.results.run_log: the workers' shards merged into the run's event log."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dasgd.core.ledger import compute_staleness
from dasgd.metrics.shard import WorkerShard
from dasgd.runs.results import run_log


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


def _summary_of(params: list[np.ndarray], clocks: list[np.ndarray], algorithm: str = "dasgd") -> dict:
    from dasgd.experiments.spec import resolve_spec
    from dasgd.runs.results import summarize

    world = len(params)
    shards = [
        dataclasses.replace(s, params=p, final_clock=c, meta={**s.meta, "computed": 30})
        for s, p, c in zip(_shards(np.random.default_rng(1), world, 30), params, clocks, strict=True)
    ]
    spec = resolve_spec({}, task="quadratic", workers=world, algorithm=algorithm)
    return summarize(spec, shards, {}, 8, 0.1, log=run_log(shards, world))


def test_replicas_with_the_same_gradient_set_and_different_parameters_do_not_agree() -> None:
    """Negative control: equal clocks say nothing about the parameters; the difference must decide."""
    x = np.linspace(-1.0, 1.0, 50).astype(np.float32)
    clocks = [np.full(3, 30, dtype=np.int64)] * 3
    same = _summary_of([x.copy(), x.copy(), x.copy()], clocks)
    assert same["exactly_once"] is True and same["replicas_agree"] is True
    assert same["max_replica_diff"] == 0.0
    off = x.copy()
    off[7] += 1e-3  # far above float32 rounding over 90 gradients (tolerance ~1e-4 of the scale)
    differ = _summary_of([x.copy(), off, x.copy()], clocks)
    assert differ["exactly_once"] is True  # the id sets still match...
    assert differ["replicas_agree"] is False  # ...but the parameters do not
    assert differ["max_replica_diff"] == pytest.approx(1e-3, rel=1e-3)
    # Rounding-sized differences (one float32 ulp) are still agreement.
    ulp = x.copy()
    ulp[7] = np.nextafter(ulp[7], np.float32(2))
    assert _summary_of([x.copy(), ulp, x.copy()], clocks)["replicas_agree"] is True


def test_replicas_with_different_gradient_sets_do_not_agree_even_with_equal_parameters() -> None:
    x = np.zeros(10, dtype=np.float32)
    clocks = [np.full(3, 30, dtype=np.int64), np.array([30, 29, 30]), np.full(3, 30, dtype=np.int64)]
    s = _summary_of([x, x.copy(), x.copy()], clocks)
    assert s["exactly_once"] is False and s["replicas_agree"] is False
    assert s["gradients_lost"] == 1
