"""Time to 90% test accuracy with a straggler: dasgd against PyTorch DistributedDataParallel (Gloo).

MNIST logistic regression, 2 workers, worker 1 four times slower. Four variants, all on this machine, all
with the same model (``task.build_model(0)``), the same per-worker mini-batch streams (batch 64), the same
stepsize (the task's default) and one thread per process:

- ``dasgd``: ``dasgd.train(workers=2, stragglers=["1x4"], target_accuracy=0.9, eval_every=E)``;
- ``dasgd-no-straggler``: the same without the straggler;
- ``ddp``: written here: 2 processes, ``DistributedDataParallel`` over Gloo on loopback, ``torch.optim.SGD``.
  Each iteration does what dasgd's loop does, in its order: apply what arrived (the averaged gradient of
  the previous all-reduce, ``optimizer.step()``), evaluate if due (rank 0), compute the next gradient. The
  slow rank emulates the straggler as dasgd does (``LoopConfig.slowdown``): once its iteration produced the
  gradient it waits (4 - 1) x the time the iteration took so far. The wait happens in a DDP communication
  hook, i.e. once the backward pass has filled the gradient bucket and before the all-reduce, so the
  measured time holds no communication (one bucket: the model has 7,850 parameters). Rank 0 evaluates
  ``task.evaluate(model, full=False)`` (the same 2,000 test samples dasgd's rank 0 uses) when E seconds have
  passed since its last evaluation ended, exactly like dasgd's loop, and both ranks stop once it saw >= 0.9
  (they agree on stopping through a one-element all-reduce every 10 iterations, outside the measured time);
- ``ddp-no-straggler``: the same without the straggler (for reference: DDP's own cost on this machine).

Time to 90% is, for every variant, the time (since the start of training) of the first evaluation of rank 0's
model whose test accuracy is >= 0.9: for dasgd read from RUN_DIR/metrics.csv, whose last row (the final
evaluation on the full test set) is left out. Each repetition runs the variants in rotating order; the
report gives medians over repetitions and the ratios of the medians.

    python benchmarks/bench_straggler.py [--quick] [--reps 3] [--eval-every 0.02] [--out results.json]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

__all__ = ["ddp_child", "main", "run_dasgd", "run_ddp"]

TASK = "mnist-logreg"
WORKERS = 2
BATCH_SIZE = 64
SEED = 0
SLOW_RANK = 1
SLOWDOWN = 4.0
TARGET = 0.9
MAX_SECONDS = 60.0
STOP_CHECK_EVERY = 10
GOAL_DDP_OVER_DASGD = 4.0
GOAL_STRAGGLER_OVER_NONE = 1.3
VARIANTS = ("dasgd", "dasgd-no-straggler", "ddp", "ddp-no-straggler")


def _first_hit(evals: list[dict[str, float]], target: float) -> dict[str, float] | None:
    for row in evals:
        if row["test_accuracy"] >= target:
            return row
    return None


def run_dasgd(straggler: bool, eval_every: float) -> dict[str, Any]:
    """One dasgd run to the target; its time to target from the eval log."""
    import dasgd

    with tempfile.TemporaryDirectory(prefix="dasgd-bench-straggler-") as tmp:
        summary = dasgd.train(
            task=TASK,
            workers=WORKERS,
            stragglers=[f"{SLOW_RANK}x{SLOWDOWN:g}"] if straggler else [],
            target_accuracy=TARGET,
            eval_every=eval_every,
            max_seconds=MAX_SECONDS,
            batch_size=BATCH_SIZE,
            seed=SEED,
            run_dir=tmp,
        )
        with open(Path(tmp) / "metrics.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
    # The last row is the final full-test-set evaluation after training; the target is judged on the
    # evaluations made during training, like the DDP baseline's.
    evals = [
        {
            "time": float(r["time"]),
            "gradients": float(r["gradients"]),
            "test_accuracy": float(r["test_accuracy"]),
        }
        for r in rows[:-1]
    ]
    hit = _first_hit(evals, TARGET)
    # Rank 0 starts its next evaluation eval_every after the previous one ended, so the gap between the
    # first two evaluations, less eval_every, is how long the first one took (the eval path's warm-up).
    first_eval = evals[1]["time"] - evals[0]["time"] - eval_every if len(evals) > 1 else None
    return {
        "time_to_target_s": None if hit is None else hit["time"],
        "gradients_at_target": None if hit is None else int(hit["gradients"]),
        "evaluations": len(evals),
        "first_eval_s": first_eval,
        "stop_reason": summary.stop_reason,
        "wall_time_s": summary.wall_time_s,
        "computed_per_worker": [w.computed for w in summary.per_worker],
        "s_per_gradient_per_worker": [w.compute_s_per_gradient for w in summary.per_worker],
        "staleness": {k: summary.staleness.get(k) for k in ("s_avg", "s_max")},
        "final_test_accuracy": summary.final_metrics.get("test_accuracy"),
    }


def ddp_child(slowdown: float, eval_every: float, result: str) -> None:
    """One DDP rank (runs in its own process under the environment ``_common.run_ranks`` sets)."""
    from dasgd.tasks import default_lr

    config = _common.DDPConfig(
        task=TASK,
        slowdown=slowdown,
        slow_rank=SLOW_RANK,
        eval_every=eval_every,
        target=TARGET,
        max_seconds=MAX_SECONDS,
        batch_size=BATCH_SIZE,
        lr=default_lr(TASK),
        seed=SEED,
        stop_check_every=STOP_CHECK_EVERY,
    )
    _common.ddp_rank(config, result)


def run_ddp(slowdown: float, eval_every: float) -> dict[str, Any]:
    """One DDP run to the target in two fresh processes."""
    ranks = _common.run_ranks(
        __file__, ["ddp", repr(slowdown), repr(eval_every)], world_size=WORKERS, timeout=MAX_SECONDS + 120
    )
    evals = ranks[0]["evals"]
    hit = _first_hit(evals, TARGET)
    return {
        "time_to_target_s": None if hit is None else hit["time"],
        "gradients_at_target": None if hit is None else int(hit["gradients"]),
        "evaluations": len(evals),
        "steps": ranks[0]["steps"],
        "mean_compute_s_per_rank": [r["mean_compute_s"] for r in ranks],
        "mean_step_s_per_rank": [r["mean_step_s"] for r in ranks],
        "first_eval_s": ranks[0]["eval_s"][0] if ranks[0]["eval_s"] else None,
        "median_later_eval_s": _common.median(ranks[0]["eval_s"][1:]),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "not reached" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repetition (< 60 s)")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--reps", type=int, help="repetitions (default 3; --quick: 1)")
    parser.add_argument(
        "--eval-every",
        type=float,
        default=0.02,
        help="seconds between evaluations, all variants (default 0.02)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.child:
        _kind, slowdown, eval_every = rest
        ddp_child(float(slowdown), float(eval_every), args.result)
        return 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.eval_every <= 0:
        parser.error("--eval-every must be positive (seconds)")
    reps = args.reps or (1 if args.quick else 3)

    command = _common.command_line()
    facts = _common.machine_facts()
    _common.print_header("bench_straggler: time to 90% test accuracy, worker 1 4x slower", facts, command)
    meter = _common.OtherLoad()
    print(
        f"{TASK}, {WORKERS} workers, batch {BATCH_SIZE}/worker, worker {SLOW_RANK} {SLOWDOWN:g}x slower, "
        f"evaluation every {args.eval_every:g} s on 2,000 test samples, {reps} repetition(s)"
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    runners = {
        "dasgd": lambda: run_dasgd(True, args.eval_every),
        "dasgd-no-straggler": lambda: run_dasgd(False, args.eval_every),
        "ddp": lambda: run_ddp(SLOWDOWN, args.eval_every),
        "ddp-no-straggler": lambda: run_ddp(1.0, args.eval_every),
    }
    t_start = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for rep in range(reps):
        shift = rep % len(VARIANTS)
        order = VARIANTS[shift:] + VARIANTS[:shift]  # rotate so drift favours no variant
        for variant in order:
            r = runners[variant]()
            runs[variant].append(r)
            print(
                f"  rep {rep + 1}/{reps} {variant:<19} time to {TARGET:.0%}: {_fmt(r['time_to_target_s'])} s "
                f"(gradients {r['gradients_at_target']}, {r['evaluations']} evaluations)"
            )
            sys.stdout.flush()
    elapsed = time.perf_counter() - t_start

    med = {v: _common.median([r["time_to_target_s"] for r in runs[v]]) for v in VARIANTS}
    med_grads = {v: _common.median([r["gradients_at_target"] for r in runs[v]]) for v in VARIANTS}
    ddp_over = _ratio(med["ddp"], med["dasgd"])
    strag_over = _ratio(med["dasgd"], med["dasgd-no-straggler"])
    ddp_strag_over = _ratio(med["ddp"], med["ddp-no-straggler"])
    missing = {v: sum(r["time_to_target_s"] is None for r in runs[v]) for v in VARIANTS}

    print()
    print(f"variant              median time to {TARGET:.0%} (s)   median gradients   runs not reaching it")
    for v in VARIANTS:
        print(f"{v:<20} {_fmt(med[v]):>24}   {_fmt(med_grads[v], '.0f'):>16}   {missing[v]:>20}")
    ddp_runs = runs["ddp"]
    print(
        "last run: ddp compute/step per rank "
        + ", ".join(f"{1e3 * c:.3f} ms" for c in ddp_runs[-1]["mean_compute_s_per_rank"])
        + ", whole step per rank "
        + ", ".join(f"{1e3 * c:.3f} ms" for c in ddp_runs[-1]["mean_step_s_per_rank"])
        + "; dasgd time/gradient per worker (straggler wait included) "
        + ", ".join(f"{1e3 * c:.3f} ms" for c in runs["dasgd"][-1]["s_per_gradient_per_worker"])
    )
    verdict1 = "n/a" if ddp_over is None else ("meets" if ddp_over >= GOAL_DDP_OVER_DASGD else "misses")
    verdict2 = (
        "n/a" if strag_over is None else ("meets" if strag_over <= GOAL_STRAGGLER_OVER_NONE else "misses")
    )
    print(
        f"ratio DDP / dasgd (with straggler): {_fmt(ddp_over)}x  ({verdict1} the goal >= {GOAL_DDP_OVER_DASGD:g}x)"
    )
    print(
        f"ratio dasgd straggler / no straggler: {_fmt(strag_over)}x  "
        f"({verdict2} the goal <= {GOAL_STRAGGLER_OVER_NONE:g}x)"
    )
    print(f"(for reference) ratio DDP straggler / DDP no straggler: {_fmt(ddp_strag_over)}x")
    first = {v: _common.median([r["first_eval_s"] for r in runs[v]]) for v in VARIANTS}
    print(
        "rank 0's first evaluation (warm-up, inside every variant's time) took, median: "
        + ", ".join(f"{v} {_fmt(first[v])} s" for v in VARIANTS)
    )
    print(f"elapsed {elapsed:.1f} s")
    other_load = _common.report_other_load(meter)
    _common.write_json(
        args.out,
        {
            "benchmark": "straggler",
            "command": command,
            "machine": facts,
            "quick": args.quick,
            "config": {
                "task": TASK,
                "workers": WORKERS,
                "batch_size": BATCH_SIZE,
                "slow_rank": SLOW_RANK,
                "slowdown": SLOWDOWN,
                "target_accuracy": TARGET,
                "eval_every_s": args.eval_every,
                "reps": reps,
            },
            "median_time_to_target_s": med,
            "median_gradients_at_target": med_grads,
            "median_first_eval_s": first,
            "runs_not_reaching_target": missing,
            "ratio_ddp_over_dasgd": ddp_over,
            "ratio_dasgd_straggler_over_no_straggler": strag_over,
            "ratio_ddp_straggler_over_no_straggler": ddp_strag_over,
            "goals": {
                "ddp_over_dasgd_min": GOAL_DDP_OVER_DASGD,
                "straggler_over_none_max": GOAL_STRAGGLER_OVER_NONE,
            },
            "elapsed_s": elapsed,
            "cpu_used_by_others": other_load,
            "runs": runs,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
