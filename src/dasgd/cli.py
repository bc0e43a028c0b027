"""The `dasgd` command line: thin typed commands over the library (parse, validate, call, print).

Exit codes: 0 success, 1 the run itself failed, 2 bad input (a message names the flag and the fix).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep its message but add the hint
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"dasgd: error: {message}\n(see `{self.prog} --help`)\n")


def _add_spec_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", metavar="FILE", help="YAML spec file; flags given here override its values")
    p.add_argument(
        "--task", help="quadratic | digits-logreg | mnist-logreg | fashion-cnn (default mnist-logreg)"
    )
    p.add_argument("--workers", type=int, help="number of workers (default 4)")
    p.add_argument("--algorithm", help="algorithm (default dasgd)")
    p.add_argument("--topology", help="complete | ring | torus | torus:RxC | random-regular:D | edges:PATH")
    p.add_argument("--lr", type=float, help="fixed stepsize (default: the task's)")
    p.add_argument("--batch-size", type=int, help="mini-batch size per gradient (default: the task's)")
    p.add_argument("--seed", type=int, help="run seed (default 0)")
    p.add_argument("--data", help="shared (homogeneous, default) | shards (disjoint, outside the theory)")
    p.add_argument("--max-gradients", type=int, help="stop after T gradients in total")
    p.add_argument("--max-seconds", type=float, help="stop after this many seconds of training")
    p.add_argument("--target-accuracy", type=float, help="stop once worker 0's replica reaches it, e.g. 0.9")
    p.add_argument("--eval-every", type=float, help="seconds between evaluations (default 0.5)")
    p.add_argument(
        "--straggler",
        action="append",
        metavar="RANKxFACTOR",
        help="make a worker slower, e.g. 1x5 (repeatable)",
    )
    p.add_argument("--grads-per-message", type=int, help="own gradients summed per message, B (default 1)")
    p.add_argument("--dim", type=int, help="quadratic: dimension")
    p.add_argument("--noise", type=float, help="quadratic: gradient noise sigma")
    p.add_argument("--condition", type=float, help="quadratic: condition number L/mu")
    p.add_argument("--device", help="cpu (default, Gloo) | cuda (one GPU per worker, NCCL payloads)")
    p.add_argument(
        "--secret-env", metavar="VAR", help="env variable holding a shared secret (HMAC-signed messages)"
    )
    p.add_argument("--drain-timeout", type=float, help="seconds allowed for the end-of-run drain")
    p.add_argument("--run-dir", help="output directory (default runs/<task>-<time>)")


_SPEC_KEYS = (
    "task",
    "workers",
    "algorithm",
    "topology",
    "lr",
    "batch_size",
    "seed",
    "data",
    "max_gradients",
    "max_seconds",
    "target_accuracy",
    "eval_every",
    "grads_per_message",
    "dim",
    "noise",
    "condition",
    "device",
    "secret_env",
    "drain_timeout",
    "run_dir",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = _Parser(prog="dasgd", description="Decentralized asynchronous SGD on PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser(
        "train",
        help="train with real worker processes (or as one torchrun rank)",
        description="Train with DASGD. On one machine it starts --workers processes itself; "
        "under torchrun each process is one worker.",
    )
    _add_spec_flags(train)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--json", action="store_true", help="print the summary as JSON")
    report = sub.add_parser("report", help="rebuild metrics.csv, plots and report.md of a run directory")
    report.add_argument("run_dir", metavar="RUN_DIR")
    return parser


def _spec_from_args(args: argparse.Namespace) -> Any:
    from dasgd.experiments.spec import load_spec_file, resolve_spec

    values = load_spec_file(args.spec) if args.spec else {}
    overrides = {k: getattr(args, k) for k in _SPEC_KEYS}
    if args.straggler:
        overrides["stragglers"] = list(args.straggler)
    return resolve_spec(values, **overrides)


def _default_run_dir(task: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{task}-{stamp}"


def _progress_printer(spec: Any, enabled: bool):
    """A tqdm bar over the run's budget, fed with every worker's progress."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    if spec.max_gradients is not None:
        bar = tqdm(total=spec.max_gradients, unit="grad", desc="training", dynamic_ncols=True)
        unit = "gradients"
    else:
        bar = tqdm(
            total=spec.max_seconds,
            unit="s",
            desc="training",
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}{postfix}]",
        )
        unit = "seconds"

    def update(seen: list[dict]) -> None:
        applied = max((s.get("applied", 0) for s in seen), default=0)
        value = applied if unit == "gradients" else max((s.get("time", 0.0) for s in seen), default=0.0)
        if bar.total is not None:
            value = min(value, bar.total)
        bar.n = value
        post = {"computed": "/".join(str(s.get("computed", 0)) for s in seen)}
        acc = seen[0].get("test_accuracy") if seen else None
        if acc is not None:
            post["acc"] = f"{acc:.3f}"
        phases = {s.get("phase") for s in seen}
        if phases - {"training", "starting"}:
            post["phase"] = "draining"
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    return update, bar.close


def _train(args: argparse.Namespace) -> int:
    from dasgd.runtime.session import in_torchrun

    spec = _spec_from_args(args)
    if in_torchrun() and "DASGD_PROGRESS_DIR" not in os.environ:
        return _train_as_torchrun_rank(args, spec)
    import dataclasses

    from dasgd.metrics.report import format_summary
    from dasgd.runtime.build import build_task, resolve
    from dasgd.runtime.launcher import launch_local

    run_dir = Path(spec.run_dir) if spec.run_dir else _default_run_dir(spec.task)
    spec = dataclasses.replace(spec, run_dir=str(run_dir))
    resolve(spec)  # topology errors surface here, before any process starts
    build_task(spec)  # a missing dataset is reported here, with its install command
    update, close = _progress_printer(spec, not args.no_progress and sys.stderr.isatty())
    try:
        summary = launch_local(spec, run_dir, on_progress=update)
    finally:
        close()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
        print(f"run directory: {run_dir}  (report: {run_dir / 'report.md'})")
    problems = []
    if summary.get("failed_workers"):
        problems.append(
            f"worker(s) {', '.join(summary['failed_workers'])} died; the survivors finished without them"
        )
    if summary.get("gradients_lost", 0):
        problems.append(f"{summary['gradients_lost']} gradients are missing from some replica")
    if not summary.get("replicas_agree", False):
        problems.append("the replicas do not agree at the end")
    for problem in problems:
        print(f"dasgd: warning: {problem}", file=sys.stderr)
    return EXIT_FAILED if problems else EXIT_OK


def _train_as_torchrun_rank(args: argparse.Namespace, spec: Any) -> int:
    import dataclasses

    from dasgd.metrics.report import format_summary
    from dasgd.runtime.entry import run_process

    world = int(os.environ["WORLD_SIZE"])
    if args.workers is None and spec.workers != world:
        spec = dataclasses.replace(spec, workers=world)
    run_dir = Path(spec.run_dir) if spec.run_dir else Path("runs") / f"{spec.task}-torchrun"
    spec = dataclasses.replace(spec, run_dir=str(run_dir))
    if int(os.environ["RANK"]) == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.yaml").write_text(spec.to_yaml())
    summary = run_process(spec, run_dir)
    if summary is not None:
        print(format_summary(summary))
        print(f"run directory: {run_dir}")
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from dasgd.runtime.results import render_run_dir

    run_dir = Path(args.run_dir)
    if not (run_dir / "events.jsonl").is_file():
        print(
            f"dasgd: error: {run_dir} has no events.jsonl; give a run directory written by `dasgd train`",
            file=sys.stderr,
        )
        return EXIT_USAGE
    render_run_dir(run_dir)
    print(f"rebuilt {run_dir / 'report.md'}, {run_dir / 'metrics.csv'} and {run_dir / 'plots'}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dasgd` command."""
    from dasgd.core.topology import TopologyError
    from dasgd.experiments.spec import SpecError
    from dasgd.tasks import DatasetMissing, TaskError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "report":
            return _report(args)
    except (SpecError, DatasetMissing, TaskError, TopologyError) as exc:
        print(f"dasgd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dasgd: interrupted; workers stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"dasgd: run failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
