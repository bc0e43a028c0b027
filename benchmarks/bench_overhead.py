"""Overhead of dasgd's machinery on one worker, against a plain PyTorch training loop.

Both variants train the same task from the same initial model (``task.build_model(seed)``), draw the same
mini-batches (the sampler dasgd's worker 0 uses, batch 64), use the same stepsize, and compute the same number
of gradients. The plain loop is ``zero_grad(); task.loss(model, batch).backward(); torch.optim.SGD.step()``.
Each variant runs in a fresh process with the same thread settings (OMP_NUM_THREADS=1,
``torch.set_num_threads(cores)``, which is what dasgd's launcher gives a single worker). Periodic evaluation is
switched off (a huge ``eval_every``); dasgd's rank 0 still evaluates once at start, so the plain loop does too.

Per gradient, three measures:
- span: (last gradient end - first gradient start) / gradients, from dasgd's event log (the plain loop records
  the same start/end points: start before zero_grad, end after backward);
- wall: the whole training phase / gradients (dasgd: summary ``wall_time_s``; plain: from before the initial
  evaluation to after the last step);
- cycle: the median time between consecutive gradient starts (robust against the machine's stalls).

The variants run alternately, ``--reps`` times, and the median of the per-pair ratios dasgd/plain is reported.
As a correctness check, the final parameters of the two variants are compared bit for bit (one worker with no
peers is sequential SGD, so they must agree).

    python benchmarks/bench_overhead.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common
import numpy as np

__all__ = ["main", "plain_child", "run_dasgd", "run_plain"]

BATCH_SIZE = 64
SEED = 0
FULL = {"mnist-logreg": (6000, 5), "fashion-cnn": (1000, 5)}
"""task -> (gradients, repetitions) of the full version."""
QUICK = {"mnist-logreg": (1500, 2), "fashion-cnn": (150, 2)}
GOAL = 1.05
MEASURES = {"span": "span_s_per_gradient", "wall": "wall_s_per_gradient", "median_cycle": "median_cycle_s"}
"""ratio name -> the per-gradient measure it compares."""


def _measures(starts: np.ndarray, ends: np.ndarray, wall: float) -> dict[str, float]:
    n = len(starts)
    return {
        "span_s_per_gradient": float(ends[-1] - starts[0]) / n,
        "wall_s_per_gradient": wall / n,
        "wall_time_s": wall,
        "median_cycle_s": float(np.median(np.diff(starts))) if n > 1 else float("nan"),
    }


def run_dasgd(task: str, gradients: int, lr: float) -> dict[str, Any]:
    """One single-worker dasgd run; per-gradient times from its event log and summary."""
    import dasgd
    from dasgd.metrics.eventlog import read_event_log

    with tempfile.TemporaryDirectory(prefix="dasgd-bench-overhead-") as tmp:
        summary = dasgd.train(
            task=task,
            workers=1,
            max_gradients=gradients,
            eval_every=1e9,
            lr=lr,
            batch_size=BATCH_SIZE,
            seed=SEED,
            run_dir=tmp,
        )
        log = read_event_log(Path(tmp) / "events.jsonl")
    order = np.argsort(log.index)
    starts, ends = np.asarray(log.start)[order], np.asarray(log.end)[order]
    if len(starts) != gradients or summary.gradients_computed != gradients:
        raise RuntimeError(
            f"dasgd computed {summary.gradients_computed} gradients ({len(starts)} logged), expected {gradients}"
        )
    out = _measures(starts, ends, float(summary.wall_time_s))
    out["param_checksum"] = summary.per_worker[0].param_checksum
    out["final_test_accuracy"] = summary.final_metrics.get("test_accuracy")
    return out


def plain_child(task_name: str, gradients: int, lr: float, result: str) -> None:
    """The plain PyTorch loop (runs in its own process; writes its measures to ``result`` as JSON)."""
    import json

    import torch

    from dasgd.experiments.spec import RunSpec
    from dasgd.runs.build import sampler_seed
    from dasgd.tasks import make_task
    from dasgd.worker.replica import checksum

    # The thread count dasgd's entry point gives each of LOCAL_WORLD_SIZE workers (here 1).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    task = make_task(task_name)
    model = task.build_model(SEED)
    sampler = task.sampler(sampler_seed(RunSpec(seed=SEED), 0), BATCH_SIZE)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    starts = np.empty(gradients)
    ends = np.empty(gradients)
    origin = time.time()
    task.evaluate(model, full=False)  # dasgd's rank 0 evaluates once before its first gradient
    for i in range(gradients):
        starts[i] = time.time() - origin
        optimizer.zero_grad(set_to_none=True)
        task.loss(model, sampler.next()).backward()
        ends[i] = time.time() - origin
        optimizer.step()
    wall = time.time() - origin
    out = _measures(starts, ends, wall)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    out["param_checksum"] = checksum(flat)[:16]
    out["final_test_accuracy"] = task.evaluate(model, full=True)["test_accuracy"]
    Path(result).write_text(json.dumps(out))


def run_plain(task: str, gradients: int, lr: float) -> dict[str, Any]:
    """One plain-loop run in a fresh process."""
    return _common.run_ranks(__file__, [task, str(gradients), repr(lr)], world_size=1, timeout=600)[0]


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def bench_task(task: str, gradients: int, reps: int) -> dict[str, Any]:
    """Alternate dasgd and the plain loop ``reps`` times on ``task``; ratios per pair and their medians."""
    from dasgd.tasks import default_lr

    lr = default_lr(task)
    pairs = []
    for rep in range(reps):
        # Alternate which variant goes first, so slow drift of the machine does not favour one of them.
        if rep % 2 == 0:
            d = run_dasgd(task, gradients, lr)
            p = run_plain(task, gradients, lr)
        else:
            p = run_plain(task, gradients, lr)
            d = run_dasgd(task, gradients, lr)
        ratios = {name: _ratio(d[key], p[key]) for name, key in MEASURES.items()}
        pairs.append(
            {
                "dasgd": d,
                "plain": p,
                "ratio": ratios,
                "same_params": d["param_checksum"] == p["param_checksum"],
            }
        )
        print(
            f"  {task} rep {rep + 1}/{reps}: span/gradient dasgd {d['span_s_per_gradient'] * 1e3:.3f} ms, "
            f"plain {p['span_s_per_gradient'] * 1e3:.3f} ms, ratio {ratios['span']:.3f}; "
            f"wall ratio {ratios['wall']:.3f}; median cycle ratio {ratios['median_cycle']:.3f}; "
            f"same final params: {pairs[-1]['same_params']}"
        )
        sys.stdout.flush()
    med = {name: _common.median([pr["ratio"][name] for pr in pairs]) for name in MEASURES}
    return {
        "task": task,
        "gradients": gradients,
        "reps": reps,
        "lr": lr,
        "batch_size": BATCH_SIZE,
        "median_ratio": med,
        "median_ms_per_gradient": {
            variant: {
                key: 1e3 * (_common.median([pr[variant][key] for pr in pairs]) or float("nan"))
                for key in MEASURES.values()
            }
            for variant in ("dasgd", "plain")
        },
        "same_params_all_reps": all(pr["same_params"] for pr in pairs),
        "runs": pairs,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short version (< 60 s)")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--tasks", default="mnist-logreg,fashion-cnn", help="comma-separated tasks")
    parser.add_argument("--reps", type=int, help="alternating repetitions (default: 5 each; quick: 2 each)")
    parser.add_argument("--gradients", type=int, help="gradients per run (default per task)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.child:
        task, gradients, lr = rest
        plain_child(task, int(gradients), float(lr), args.result)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    command = _common.command_line()
    facts = _common.machine_facts()
    _common.print_header("bench_overhead: 1-worker dasgd vs a plain PyTorch SGD loop", facts, command)
    meter = _common.OtherLoad()
    plan = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    results = []
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        gradients, reps = plan.get(task, (1000, 3))
        gradients = args.gradients or gradients
        reps = args.reps or reps
        print(f"{task}: {gradients} gradients, batch {BATCH_SIZE}, {reps} alternating runs of each variant")
        results.append(bench_task(task, gradients, reps))
    elapsed = time.perf_counter() - t0

    print()
    print(
        "task           gradients  ms/grad dasgd  ms/grad plain  ratio span  ratio wall  ratio cycle  same params"
    )
    for r in results:
        ms = r["median_ms_per_gradient"]
        med = r["median_ratio"]
        print(
            f"{r['task']:<14} {r['gradients']:>9}  {ms['dasgd']['span_s_per_gradient']:>13.3f}  "
            f"{ms['plain']['span_s_per_gradient']:>13.3f}  {med['span']:>10.3f}  {med['wall']:>10.3f}  "
            f"{med['median_cycle']:>11.3f}  {r['same_params_all_reps']}"
        )
    for r in results:
        verdict = "meets" if r["median_ratio"]["span"] <= GOAL else "misses"
        print(
            f"{r['task']}: median dasgd/plain time per gradient {r['median_ratio']['span']:.3f}x "
            f"({verdict} the goal <= {GOAL}x)"
        )
    print(f"elapsed {elapsed:.1f} s")
    other_load = _common.report_other_load(meter)
    _common.write_json(
        args.out,
        {
            "benchmark": "overhead",
            "command": command,
            "machine": facts,
            "quick": args.quick,
            "goal_ratio_max": GOAL,
            "elapsed_s": elapsed,
            "cpu_used_by_others": other_load,
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
