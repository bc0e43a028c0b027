"""Throughput of dasgd's synchronous baseline (``--algorithm sync``) against PyTorch DDP, no straggler.

Issue 4 asks the mini-batch SGD baseline to run within 10% of DDP's throughput on this machine. Both sides
train the same model with the same per-rank mini-batch streams, stepsize and batch size, 4 processes over
Gloo on 127.0.0.1, for a fixed time budget, evaluating only once at the start:

- dasgd: ``dasgd.train(algorithm="sync", max_seconds=S)``; samples/s from its summary (gradients computed x
  batch size / training time);
- DDP: ``_common.ddp_rank`` (slowdown 1, an unreachable target); samples/s = ranks x batch size / mean step
  time of rank 0 (its stop agreement every 10 steps is left out of the step time, which favours DDP).

Repetitions alternate the two; the ratio of medians is printed (above 1: dasgd sync faster).

    python benchmarks/bench_sync_ddp.py [--tasks mnist-logreg,fashion-cnn] [--seconds 8] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

import _common

WORKERS = 4


def run_sync(task: str, seconds: float) -> float:
    import dasgd

    with tempfile.TemporaryDirectory(prefix="dasgd-bench-sync-") as tmp:
        s = dasgd.train(
            task=task, workers=WORKERS, algorithm="sync", max_seconds=seconds, eval_every=1e9, run_dir=tmp
        )
    return float(s.samples_per_s)


def run_ddp(task: str, seconds: float, lr: float, batch_size: int) -> float:
    config = _common.DDPConfig(
        task=task,
        slowdown=1.0,
        slow_rank=0,
        eval_every=1e9,
        target=2.0,  # unreachable: stop by time
        max_seconds=seconds,
        batch_size=batch_size,
        lr=lr,
    )
    ranks = _common.run_ranks(__file__, config.to_args(), world_size=WORKERS, timeout=seconds + 180)
    return WORKERS * batch_size / ranks[0]["mean_step_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="mnist-logreg,fashion-cnn")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", help="write the results as JSON to this file")
    args = _common.parse_args_or_run_ddp_child(parser, argv)
    if args is None:
        return 0
    from dasgd.experiments.spec import resolve_spec
    from dasgd.runs.build import resolve

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _common.print_header(
        f"bench_sync_ddp: samples/s of sync vs DDP, {WORKERS} workers",
        _common.machine_facts(),
        _common.command_line(),
    )
    meter = _common.OtherLoad()
    results: dict[str, Any] = {}
    for task in [t for t in args.tasks.split(",") if t]:
        resolved = resolve(resolve_spec({}, task=task, workers=WORKERS, algorithm="sync"))
        sync, ddp = [], []
        for rep in range(args.reps):
            sync.append(run_sync(task, args.seconds))
            ddp.append(run_ddp(task, args.seconds, resolved.lr, resolved.batch_size))
            print(
                f"  {task} rep {rep + 1}: sync {sync[-1]:,.0f} samples/s, DDP {ddp[-1]:,.0f} samples/s",
                flush=True,
            )
        ms, md = _common.median(sync), _common.median(ddp)
        assert ms is not None and md is not None
        results[task] = {"sync_samples_per_s": sync, "ddp_samples_per_s": ddp, "ratio": ms / md}
        print(
            f"{task}: sync / DDP throughput {ms / md:.3f}x (median sync {ms:,.0f}, DDP {md:,.0f} samples/s)"
        )
    _common.report_other_load(meter)
    _common.write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
