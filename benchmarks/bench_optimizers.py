"""Does a local preconditioner (practical mode) reach a target accuracy sooner than plain SGD under dasgd?

On the fashion-cnn task, 2 workers (processes on loopback) run ``dasgd.DecentralizedSGD`` with
- ``sgd``: plain SGD, faithful mode (the paper's algorithm);
- ``momentum``: SGD with momentum 0.9, practical mode (``faithful=False``);
- ``adam``: Adam, practical mode.
Each optimizer runs at every stepsize of its small grid, ``--reps`` times; rank 0 evaluates its replica every
``--eval-every`` seconds (``task.evaluate(model, full=False)``) and asks everyone to stop at the target. For
each optimizer the best stepsize is the one with the smallest median time to the target (a run that misses
it counts as never); the table shows, per optimizer, that stepsize's median time and gradients to target.

    python benchmarks/bench_optimizers.py [--quick] [--out optimizers.json]   # full: ~15 min, quick: ~3 min

Needs Fashion-MNIST (see the top README). Run on an otherwise idle machine (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import _common

GRIDS = {
    "sgd": [0.05, 0.1, 0.2],
    "momentum": [0.005, 0.01, 0.02],
    "adam": [1e-3, 3e-3, 1e-2],
}
QUICK_GRIDS = {"sgd": [0.1, 0.2], "momentum": [0.01, 0.02], "adam": [1e-3, 3e-3]}


def child(argv: list[str]) -> None:
    """One rank: train with the wrapper until a stop is requested or time runs out; write rank 0's evals."""
    import torch

    import dasgd
    from dasgd.experiments.spec import RunSpec
    from dasgd.runs.build import sampler_seed
    from dasgd.tasks import make_task

    p = argparse.ArgumentParser()
    p.add_argument("--child", action="store_true")
    p.add_argument("--result")
    p.add_argument("--optimizer")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--target", type=float)
    p.add_argument("--max-seconds", type=float)
    p.add_argument("--eval-every", type=float)
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    task = make_task("fashion-cnn")
    model = task.build_model(a.seed)
    if a.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=a.lr)
    elif a.optimizer == "momentum":
        opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    trainer = dasgd.DecentralizedSGD(model, opt, faithful=a.optimizer == "sgd")
    sampler = task.sampler(sampler_seed(RunSpec(seed=a.seed), rank), a.batch_size)
    origin = time.time()
    next_eval = 0.0
    evals = []
    while not trainer.stop_requested and time.time() - origin < a.max_seconds:
        now = time.time() - origin
        if rank == 0 and now >= next_eval:
            metrics = task.evaluate(model, full=False)
            evals.append({"time": now, "gradients": trainer.worker.applied, **metrics})
            if metrics["test_accuracy"] >= a.target:
                trainer.request_stop()
                break
            next_eval = time.time() - origin + a.eval_every
        opt.zero_grad(set_to_none=True)
        task.loss(model, sampler.next()).backward()
        trainer.step()
    report = trainer.finish()
    Path(a.result).write_text(
        json.dumps({"rank": rank, "evals": evals, "agree": report.replicas_agree, "computed": report.computed})
    )
    trainer.close()
    sys.stdout.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--child" in argv:
        child(argv)
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 stepsizes per optimizer, 1 repeat, shorter runs")
    p.add_argument("--reps", type=int, default=None, help="repeats per (optimizer, stepsize); default 3 (quick: 1)")
    p.add_argument("--target", type=float, default=None, help="test accuracy to reach (default 0.75, quick 0.7)")
    p.add_argument("--max-seconds", type=float, default=None, help="per run (default 40, quick 20)")
    p.add_argument("--eval-every", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write everything measured as JSON")
    args = p.parse_args(argv)
    grids = QUICK_GRIDS if args.quick else GRIDS
    reps = args.reps or (1 if args.quick else 3)
    target = args.target or (0.7 if args.quick else 0.75)
    max_s = args.max_seconds or (20.0 if args.quick else 40.0)
    facts = _common.machine_facts()
    _common.print_header("dasgd: optimizers under DecentralizedSGD (fashion-cnn, 2 workers)", facts, _common.command_line())
    meter = _common.OtherLoad()
    runs = []
    for name, grid in grids.items():
        for lr in grid:
            for rep in range(reps):
                results = _common.run_ranks(
                    __file__,
                    [
                        "--optimizer", name, "--lr", str(lr), "--seed", str(args.seed + rep),
                        "--target", str(target), "--max-seconds", str(max_s), "--eval-every", str(args.eval_every),
                    ],
                    2,
                    timeout=max_s + 120,
                )
                hit = _common.first_hit(results[0]["evals"], target)
                run = {
                    "optimizer": name,
                    "lr": lr,
                    "rep": rep,
                    "seconds": hit["time"] if hit else None,
                    "gradients": hit["gradients"] if hit else None,
                    "best_accuracy": max((e["test_accuracy"] for e in results[0]["evals"]), default=None),
                    "agree": all(r["agree"] for r in results),
                }
                runs.append(run)
                print(
                    f"  {name:8s} lr={lr:<7g} rep={rep}  "
                    + (f"target in {run['seconds']:.1f} s, {run['gradients']} gradients" if hit else "missed")
                    + f"  (best acc {run['best_accuracy']:.3f}, agree={run['agree']})",
                    flush=True,
                )
    print(f"\nBest stepsize per optimizer (median of {reps}; target test accuracy {target}):")
    best = {}
    for name, grid in grids.items():
        scored = []
        for lr in grid:
            sel = [r for r in runs if r["optimizer"] == name and r["lr"] == lr]
            secs = [r["seconds"] if r["seconds"] is not None else math.inf for r in sel]
            grads = [r["gradients"] for r in sel if r["gradients"] is not None]
            scored.append((_common.median(secs), lr, _common.median(grads) if grads else None, sel))
        med, lr, grads, sel = min(scored, key=lambda s: s[0])
        best[name] = {"lr": lr, "median_seconds": None if math.isinf(med) else med, "median_gradients": grads}
        shown = "never" if math.isinf(med) else f"{med:.1f} s, {grads:.0f} gradients"
        print(f"  {name:8s} lr={lr:<7g} {shown}")
    other = _common.report_other_load(meter)
    _common.write_json(
        args.out,
        {"facts": facts, "target": target, "reps": reps, "max_seconds": max_s, "runs": runs, "best": best,
         "other_load": other},
    )


if __name__ == "__main__":
    main()
