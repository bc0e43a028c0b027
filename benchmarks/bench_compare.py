"""The straggler comparison of issue 4: every registered algorithm and PyTorch DDP, time to target accuracy.

Two tasks, MNIST logistic regression (``mnist-logreg``, target 0.9) and the small Fashion-MNIST CNN
(``fashion-cnn``, target 0.8); 4 real worker processes on this machine, worker 1 four times slower. For each
task:

- every algorithm in ``dasgd.algorithms.ALGORITHMS`` (or ``--algorithms``) runs through the library side of
  ``dasgd compare`` (:func:`dasgd.runs.compare.plan_comparison` and ``run_comparison``): the same spec
  for all (task defaults for stepsize and batch size, seed 0, ``stragglers=["1x4"]``,
  ``target_accuracy`` as the stop rule, ``max_seconds`` as the budget, ``eval_every`` as below), one run
  directory each, plus the comparison's own ``compare.md``, ``report.md`` and plots;
- PyTorch ``DistributedDataParallel`` over Gloo runs with the same model, per-rank mini-batch streams,
  stepsize and batch size (``_common.ddp_rank``: 4 processes, rank 1 emulating the 4x straggler exactly as
  dasgd's loop does, rank 0 evaluating on the same 2,000 test samples every ``eval_every`` seconds).

Time to target is the time, since training started, of the first evaluation of the evaluated replica that
reached the target (dasgd: the run's ``summary.json``; DDP: rank 0's evaluations). The table gives, per
algorithm, time and gradients to target, final test accuracy, S_avg, samples/s, and the ratio of its time to
DDP's (below 1: faster than DDP). One run per variant (time to target is noisy: see benchmarks/README.md).

    python benchmarks/bench_compare.py [--quick] [--tasks mnist-logreg,fashion-cnn] [--algorithms a,b]
                                       [--eval-every S] [--no-ddp] [--keep DIR] [--out results.json]

``--no-ddp`` skips the DDP baseline (its column reads n/a): to re-measure dasgd's rows alone, e.g. the
fashion-cnn row with ``--tasks fashion-cnn --algorithms dasgd --no-ddp``. Each run's per-worker gradient counts
(and what evaluation cost the evaluating worker) are printed under the table.

``--quick`` lowers the targets (0.85 and 0.6) and the budgets (8 s and 15 s), to show that everything runs;
each run also pays about 10 s of process start-up and dataset loading, so with 7 algorithms it took 7 minutes
on 2 cores shared with other work. The full version (up to 60 s and 150 s per run) is for an idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common

__all__ = ["TaskSetup", "main", "run_algorithms", "run_ddp"]

WORKERS = 4
SLOW_RANK = 1
SLOWDOWN = 4.0
SEED = 0


@dataclass(frozen=True)
class TaskSetup:
    """One task's target, budget and evaluation interval."""

    target: float
    max_seconds: float
    eval_every: float


FULL = {
    "mnist-logreg": TaskSetup(target=0.9, max_seconds=60.0, eval_every=0.05),
    "fashion-cnn": TaskSetup(target=0.8, max_seconds=150.0, eval_every=0.25),
}
QUICK = {
    "mnist-logreg": TaskSetup(target=0.85, max_seconds=8.0, eval_every=0.05),
    "fashion-cnn": TaskSetup(target=0.6, max_seconds=15.0, eval_every=0.25),
}


def _overrides(task: str, setup: TaskSetup) -> dict[str, Any]:
    return {
        "task": task,
        "workers": WORKERS,
        "stragglers": [f"{SLOW_RANK}x{SLOWDOWN:g}"],
        "target_accuracy": setup.target,
        "max_seconds": setup.max_seconds,
        "eval_every": setup.eval_every,
        "seed": SEED,
    }


def run_algorithms(
    task: str, setup: TaskSetup, algorithms: list[str], out_dir: Path
) -> tuple[list[dict[str, Any]], Any]:
    """Every algorithm on ``task`` through the comparison library; (per-algorithm rows, the plan)."""
    from dasgd.runs.compare import plan_comparison, run_comparison

    plan = plan_comparison({}, _overrides(task, setup), algorithms, out_dir)

    def on_run(run: Any, i: int, n: int, status: str) -> None:
        if status == "running":
            print(f"  [{i}/{n}] {run.label} ...", end="", flush=True)
        else:
            print(f" {status}", flush=True)

    outcome = run_comparison(plan, on_run=on_run)
    for row in outcome.run_rows:
        if row.get("status") == "failed":
            print(f"  {row['algorithm']} FAILED: {row.get('error')}")
    return outcome.rows, plan


def run_ddp(task: str, setup: TaskSetup, lr: float, batch_size: int) -> dict[str, Any]:
    """One DDP run of ``task`` to the target in ``WORKERS`` fresh processes (rank 1 the straggler)."""
    config = _common.DDPConfig(
        task=task,
        slowdown=SLOWDOWN,
        slow_rank=SLOW_RANK,
        eval_every=setup.eval_every,
        target=setup.target,
        max_seconds=setup.max_seconds,
        batch_size=batch_size,
        lr=lr,
        seed=SEED,
    )
    ranks = _common.run_ranks(__file__, config.to_args(), world_size=WORKERS, timeout=setup.max_seconds + 180)
    evals = ranks[0]["evals"]
    hit = _common.first_hit(evals, setup.target)
    return {
        "time_to_target_s": None if hit is None else hit["time"],
        "gradients_to_target": None if hit is None else int(hit["gradients"]),
        "last_test_accuracy": evals[-1]["test_accuracy"] if evals else None,
        "evaluations": len(evals),
        "steps": ranks[0]["steps"],
        "mean_compute_s_per_rank": [r["mean_compute_s"] for r in ranks],
        "mean_step_s_per_rank": [r["mean_step_s"] for r in ranks],
        "config": config.to_args()[0],
    }


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def _table(task: str, setup: TaskSetup, rows: list[dict[str, Any]], ddp: dict[str, Any]) -> list[str]:
    ddp_time = ddp["time_to_target_s"]
    header = (
        f"| algorithm | time to {setup.target:g} (s) | gradients to target | final test accuracy | S_avg "
        "| samples/s | time / DDP's |"
    )
    lines = [
        f"### {task}: target {setup.target:g}, budget {setup.max_seconds:g} s",
        "",
        header,
        "|" + "---|" * 7,
    ]
    for r in rows:
        t = r.get("time_to_target_s")
        if t is None:
            shown = "failed" if not r.get("runs") else "not reached"
            ratio = "n/a"
        else:
            shown = _fmt(t)
            ratio = _fmt(t / ddp_time, ".3f") + "x" if ddp_time else "n/a (DDP did not reach it)"
            if ddp.get("skipped"):
                ratio = "n/a (DDP not run)"
        lines.append(
            f"| {r['algorithm']} | {shown} | {_fmt(r.get('gradients_to_target'), '.0f')} "
            f"| {_fmt(r.get('final_accuracy'))} | {_fmt(r.get('s_avg'), '.2f')} "
            f"| {_fmt(r.get('samples_per_s'), '.0f')} | {ratio} |"
        )
    if ddp.get("skipped"):
        return lines
    lines.append(
        f"| PyTorch DDP | {_fmt(ddp_time) if ddp_time is not None else 'not reached'} "
        f"| {_fmt(ddp['gradients_to_target'], '.0f')} | {_fmt(ddp['last_test_accuracy'])} (last eval, 2,000 "
        f"samples) | 0 | n/a | 1x |"
    )
    return lines


def _worker_lines(compare_dir: Path) -> list[str]:
    """Each run's gradients computed per worker, and what evaluating cost its evaluating worker."""
    import json

    lines = []
    for summary_path in sorted(compare_dir.glob("**/summary.json")):
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, ValueError):
            continue
        per_worker = summary.get("per_worker") or []
        if not per_worker:
            continue
        counts = ", ".join(f"{w['rank']}: {w['computed']}" for w in per_worker)
        costs = [
            f"worker {w['rank']} evaluated {w['evaluation'].get('evaluations')} times, "
            f"{w['evaluation'].get('eval_s', 0.0):.1f} s, {w['evaluation'].get('eval_cpu_s', 0.0):.1f} CPU s, "
            f"training paused {w['evaluation'].get('eval_pause_s', 0.0):.3f} s"
            for w in per_worker
            if isinstance(w.get("evaluation"), dict)
        ]
        run = summary_path.parent.relative_to(compare_dir)
        lines.append(
            f"- `{run}`: gradients computed per worker {{{counts}}}" + (f"; {costs[0]}" if costs else "")
        )
    return ["", *lines] if lines else []


def main(argv: list[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="lower targets and budgets, to show it runs")
    parser.add_argument("--tasks", default="mnist-logreg,fashion-cnn", help="comma-separated tasks")
    parser.add_argument("--algorithms", help="comma-separated algorithms (default: every registered one)")
    parser.add_argument("--eval-every", type=float, help="seconds between evaluations (default per task)")
    parser.add_argument("--no-ddp", action="store_true", help="skip the PyTorch DDP baseline")
    parser.add_argument("--keep", metavar="DIR", help="keep the comparison directories under DIR")
    parser.add_argument("--out", help="write the results as JSON to this file")
    args = _common.parse_args_or_run_ddp_child(parser, argv)
    if args is None:
        return 0
    setups = QUICK if args.quick else FULL
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in setups]
    if not tasks or unknown:
        parser.error(f"--tasks: choose from {', '.join(setups)}")
    if args.eval_every is not None and args.eval_every <= 0:
        parser.error("--eval-every must be positive (seconds)")

    from dasgd.algorithms import ALGORITHMS
    from dasgd.experiments.spec import SpecError
    from dasgd.runs.build import build_task, resolve
    from dasgd.runs.compare import parse_algorithms

    try:
        algorithms = list(parse_algorithms(args.algorithms if args.algorithms else list(ALGORITHMS)))
    except SpecError as exc:
        parser.error(str(exc))

    command = _common.command_line()
    facts = _common.machine_facts()
    _common.print_header(
        f"bench_compare: time to target, {WORKERS} workers, worker {SLOW_RANK} {SLOWDOWN:g}x slower",
        facts,
        command,
    )
    meter = _common.OtherLoad()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"algorithms: {', '.join(algorithms)} and PyTorch DDP; tasks: {', '.join(tasks)}")
    keep_root = Path(args.keep) if args.keep else None
    tmp = tempfile.TemporaryDirectory(prefix="dasgd-bench-compare-") if keep_root is None else None
    root = keep_root if keep_root is not None else Path(tmp.name)  # type: ignore[union-attr]
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    tables: list[str] = []
    try:
        for task in tasks:
            setup = setups[task]
            if args.eval_every is not None:
                setup = TaskSetup(setup.target, setup.max_seconds, args.eval_every)
            print(
                f"\n{task}: target {setup.target:g}, budget {setup.max_seconds:g} s, "
                f"eval every {setup.eval_every:g} s"
            )
            sys.stdout.flush()
            rows, plan = run_algorithms(task, setup, algorithms, root / task)
            build_task(plan.base)
            resolved = resolve(plan.base)
            if args.no_ddp:
                ddp = {
                    "time_to_target_s": None,
                    "gradients_to_target": None,
                    "last_test_accuracy": None,
                    "skipped": True,
                }
            else:
                print("  PyTorch DDP ...", end="", flush=True)
                ddp = run_ddp(task, setup, resolved.lr, resolved.batch_size)
                print(" done", flush=True)
            tables += [*_table(task, setup, rows, ddp), *_worker_lines(root / task), ""]
            results[task] = {
                "setup": setup.__dict__,
                "lr": resolved.lr,
                "batch_size": resolved.batch_size,
                "rows": rows,
                "ddp": ddp,
                "compare_dir": str(root / task),
            }
    finally:
        if tmp is not None:
            tmp.cleanup()
    elapsed = time.perf_counter() - t_start
    print()
    print("\n".join(tables))
    print(f"elapsed {elapsed:.1f} s")
    if keep_root is not None:
        print(f"comparison directories (tables, plots, reports): {keep_root}")
    other_load = _common.report_other_load(meter)
    _common.write_json(
        args.out,
        {
            "benchmark": "compare",
            "command": command,
            "machine": facts,
            "quick": args.quick,
            "config": {"workers": WORKERS, "slow_rank": SLOW_RANK, "slowdown": SLOWDOWN, "seed": SEED},
            "algorithms": algorithms,
            "tasks": results,
            "elapsed_s": elapsed,
            "cpu_used_by_others": other_load,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
