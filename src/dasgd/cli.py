"""The `dasgd` command line: thin typed commands over the library (parse, validate, call, print).

Exit codes: 0 success, 1 the run itself failed (or is not clean), 2 bad input (a message names the flag and the
fix), 3 the run diverged (a NaN/inf or exploding loss stopped it; docs/failures.md, docs/stepsize.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dasgd.cli_common import (
    EXIT_DIVERGED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_simulation_flags,
    add_spec_flags,
    check_trace,
    choose_run_dir,
    default_run_dir,
    plain,
    prepare_output_dir,
    progress_printer,
    simulation_overrides,
    simulation_progress,
    simulation_values,
    spec_overrides,
)

if TYPE_CHECKING:
    from dasgd.runs.summary import RunSummary

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep its message but add the hint
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"dasgd: error: {message}\n(see `{self.prog} --help`)\n")


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
    add_spec_flags(train)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--json", action="store_true", help="print the summary as JSON")
    train.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR's run from its last complete checkpoint (its spec.yaml; flags given override it)",
    )
    simulate = sub.add_parser(
        "simulate",
        help="run the same spec in the discrete-event simulator (virtual time, many workers)",
        description="Run DASGD's real workers in virtual time: compute times, network and failures come "
        "from the simulation flags (or the spec file's simulation: section). With --sweep, run a grid of "
        "simulations and write one table and plots. See docs/simulator.md.",
    )
    add_spec_flags(simulate)
    add_simulation_flags(simulate)
    simulate.add_argument("--no-progress", action="store_true", help="no progress bar")
    simulate.add_argument("--json", action="store_true", help="print the summary (a sweep: its rows) as JSON")
    report = sub.add_parser(
        "report",
        help="rebuild metrics.csv, plots and report.md of a run directory",
        description="Rebuild metrics.csv, plots/*.png and report.md (with the theory section's estimates) "
        "from events.jsonl and summary.json: also what a run skipped at its end (--no-plots, --no-theory).",
    )
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("--no-theory", action="store_true", help="leave the theory section's estimates out")
    report.add_argument("--no-plots", action="store_true", help="do not redraw plots/*.png")
    report.add_argument(
        "--tensorboard",
        action="store_true",
        help="also (re)write TensorBoard scalars to RUN_DIR/tensorboard (pip install 'dasgd[tensorboard]')",
    )
    from dasgd.cli_compare import add_compare_parser

    add_compare_parser(sub)
    from dasgd.cli_theory import add_theory_parser

    add_theory_parser(sub)
    return parser


def _spec_from_args(args: argparse.Namespace) -> Any:
    from dasgd.experiments.spec import load_spec_file, resolve_spec

    values = load_spec_file(args.spec) if args.spec else {}
    return resolve_spec(values, **spec_overrides(args))


def _train(args: argparse.Namespace) -> int:
    from dasgd.runtime.session import in_torchrun

    if args.resume:
        return _resume(args)
    spec = _spec_from_args(args)
    if in_torchrun() and "DASGD_PROGRESS_DIR" not in os.environ:
        return _train_as_torchrun_rank(args, spec)
    import dataclasses

    from dasgd.runs.build import build_task, secret_key, with_task_defaults

    run_dir = choose_run_dir(args, spec, spec.task)  # a re-run of an earlier run's spec.yaml: a new directory
    # Topology errors surface here, before any process starts; spec.yaml records the lr and batch size used.
    spec = dataclasses.replace(with_task_defaults(spec), run_dir=str(run_dir))
    build_task(spec)  # a missing dataset is reported here, with its install command
    secret_key(spec)  # so is an unset --secret-env variable, before any worker starts
    prepare_output_dir(args, run_dir)  # an earlier run there is refused (or cleared: --overwrite)
    return _launch(args, spec, run_dir)


def _resume(args: argparse.Namespace) -> int:
    """``dasgd train --resume RUN_DIR``: check the checkpoint (nothing is changed if refused), then launch."""
    import dataclasses

    from dasgd.experiments.spec import SpecError, load_spec_file, resolve_spec
    from dasgd.runs.build import build_task, secret_key, with_task_defaults
    from dasgd.runs.checkpoints import ResumeRefused, resume_point

    run_dir = Path(args.resume)
    if args.spec or args.run_dir:
        raise SpecError("--resume RUN_DIR reads RUN_DIR/spec.yaml: give neither --spec nor --run-dir with it")
    if not (run_dir / "spec.yaml").is_file():
        print(f"dasgd: error: cannot resume {run_dir}: not a run directory (no spec.yaml)", file=sys.stderr)
        return EXIT_USAGE
    if (run_dir / "summary.json").is_file():
        print(f"dasgd: error: cannot resume {run_dir}: the run finished (it has a summary.json)", file=sys.stderr)
        return EXIT_USAGE
    spec = resolve_spec(load_spec_file(run_dir / "spec.yaml"), **spec_overrides(args))
    spec = dataclasses.replace(with_task_defaults(spec), run_dir=str(run_dir))
    try:
        resume = resume_point(run_dir, spec)
    except ResumeRefused as exc:
        print(f"dasgd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    build_task(spec)
    secret_key(spec)
    return _launch(args, spec, run_dir, resume)


def _launch(args: argparse.Namespace, spec: Any, run_dir: Path, resume: Any = None) -> int:
    from dasgd.runs.launcher import Interrupted, launch_local
    from dasgd.runs.report import format_summary

    update, on_phase, close = progress_printer(spec, not args.no_progress and sys.stderr.isatty())
    try:
        summary = launch_local(spec, run_dir, on_progress=update, on_phase=on_phase, resume=resume)
    except Interrupted as exc:
        interrupted: Interrupted | None = exc
    else:
        interrupted = None
    finally:
        close()
    if interrupted is not None:
        hint = f"; continue with: dasgd train --resume {run_dir}" if interrupted.checkpoint else ""
        print(f"dasgd: {interrupted}{hint}", file=sys.stderr)
        return interrupted.exit_code
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2, default=plain))
    else:
        print(format_summary(summary))
        from dasgd.runs.summary import UNSET

        if summary.recomputed_after_resume is not UNSET:
            print(
                f"recomputed after resume: {summary.recomputed_after_resume} gradients (computed after the "
                "checkpoint before the interruption, discarded)"
            )
        print(f"run directory: {run_dir}  (report: {run_dir / 'report.md'})")
    problems = []
    if summary.failed_workers:
        problems.append(
            f"worker(s) {', '.join(summary.failed_workers)} died; the survivors finished without them"
        )
    if summary.gradients_lost:
        problems.append(f"{summary.gradients_lost} gradients are missing from some replica")
    if summary.replicas_agree is False:
        problems.append("the replicas do not agree at the end")
    problems += health_problems(summary)
    for problem in problems:
        print(f"dasgd: warning: {problem}", file=sys.stderr)
    if report_divergence(summary, run_dir):
        return EXIT_DIVERGED
    return EXIT_FAILED if problems else EXIT_OK


def report_divergence(summary: RunSummary, run_dir: Path) -> bool:
    """If the run diverged, say where and how to choose a stepsize (stderr) and return True (exit code 3)."""
    from dasgd.metrics.eventlog import EventLogError, read_event_log
    from dasgd.runs.report import diverged, divergence_advice, divergence_point

    facts = summary.to_dict()
    if not diverged(facts):
        return False
    try:
        where = divergence_point(read_event_log(run_dir / "events.jsonl", clocks=False).runs)
    except (EventLogError, OSError, ValueError):
        where = ""
    print(
        f"dasgd: error: the run diverged{' (' + where + ')' if where else ''} and was stopped: a NaN/inf, or "
        f"an evaluated loss above --diverge-factor (10 unless set) times the first evaluation. "
        f"{divergence_advice(facts)} The run directory marks the point: {run_dir / 'report.md'}.",
        file=sys.stderr,
    )
    return True


def health_problems(summary: RunSummary) -> list[str]:
    """What a run's summary says went wrong beyond lost gradients: survivors cut apart by deaths, peers that
    sent NaN or infinity, workers whose own replica diverged."""
    problems = []
    if summary.cut_apart:
        groups = " | ".join("{" + ", ".join(map(str, g)) + "}" for g in summary.cut_apart)
        problems.append(
            f"the deaths of worker(s) {', '.join(map(str, summary.dead_workers))} cut the survivors apart: "
            f"{groups} could no longer reach each other (use a topology with more edges, e.g. --topology torus)"
        )
    flagged = sorted({int(o) for w in summary.per_worker for o in (w.non_finite_from or {})})
    if flagged:
        problems.append(
            f"worker(s) {', '.join(map(str, flagged))} sent NaN or infinite values, which were refused"
        )
    reasons = summary.stop_reason.split(",")
    if "server_died" in reasons or "no_clients" in reasons:
        problems.append(
            "the run stopped early: the parameter server or all of its clients died, and ps-asgd cannot go on "
            "without them (dasgd, gossip and the synchronous baselines go on over the live workers)"
        )
    if "stalled" in reasons:
        problems.append(
            "the run stalled: the workers still training waited on peers that could never send again, so they "
            "were stopped (a plug-in algorithm that waits on a stopped or dead worker?)"
        )
    return problems


def _train_as_torchrun_rank(args: argparse.Namespace, spec: Any) -> int:
    import dataclasses

    from dasgd.runs.build import secret_key, with_task_defaults
    from dasgd.runs.entry import run_process
    from dasgd.runs.report import format_summary

    secret_key(spec)  # an unset --secret-env variable: exit 2 here rather than inside the worker
    world = int(os.environ["WORLD_SIZE"])
    if args.workers is None and spec.workers != world:
        spec = dataclasses.replace(spec, workers=world)
    run_dir = _torchrun_run_dir(args, spec)
    spec = dataclasses.replace(with_task_defaults(spec), run_dir=str(run_dir))
    if int(os.environ["RANK"]) == 0:
        prepare_output_dir(args, run_dir)  # the other ranks wait for rank 0 at the rendezvous
        (run_dir / "spec.yaml").write_text(spec.to_yaml())
    summary = run_process(spec, run_dir)
    if summary is not None:
        print(format_summary(summary))
        print(f"run directory: {run_dir}")
        if report_divergence(summary, run_dir):
            return EXIT_DIVERGED
    return EXIT_OK


def _torchrun_run_dir(args: argparse.Namespace, spec: Any) -> Path:
    """The run directory every rank of a torchrun job agrees on.

    ``--run-dir`` (or the spec's run_dir, unless the spec is an earlier run's spec.yaml) is used as it is.
    Otherwise rank 0 chooses a new ``runs/<task>-torchrun-<rdzv id>-<time>`` and shares it through the
    rendezvous store torchrun's agent serves (the ranks' clocks and start times differ, so each cannot derive
    the time itself); without an agent store the name comes from the rendezvous alone:
    ``runs/<task>-torchrun-<rdzv id>-r<restart count>``.
    """
    import re
    from datetime import timedelta

    rank0 = int(os.environ["RANK"]) == 0
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "") or "none"
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    # torchrun --standalone makes up a UUID: its first 8 digits are enough to tell jobs apart by eye.
    uuid = re.fullmatch(r"[0-9a-f]{8}-[0-9a-f-]{27}", run_id)
    tag = run_id[:8] if uuid else re.sub(r"[^A-Za-z0-9._-]", "_", run_id)[:24]

    def new() -> Path:
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            return Path("runs") / f"{spec.task}-torchrun-{tag}-r{restart}"
        from torch.distributed import TCPStore

        store = TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=max(1.0, spec.startup_timeout)),
        )
        key = f"dasgd/{run_id}/{restart}/run_dir"
        if rank0:
            path = default_run_dir(f"{spec.task}-torchrun-{tag}")
            store.set(key, str(path))
            return path
        return Path(store.get(key).decode())

    return choose_run_dir(args, spec, spec.task, new=new, quiet=not rank0)


def _modelled_failures(spec: Any) -> bool:
    """Whether the simulation section asks for failures that may lose gradients (then a loss is expected)."""
    sim = spec.simulation
    return bool(sim.crashes) or sim.crash_rate > 0 or (sim.loss > 0 and sim.loss_mode == "count")


def _check_target_loss(args: argparse.Namespace) -> None:
    import math

    from dasgd.experiments.spec import SpecError

    if args.target_loss is None:
        return
    if not (math.isfinite(args.target_loss) and args.target_loss > 0):
        raise SpecError("--target-loss", f"{args.target_loss:g}: give a positive loss, e.g. 0.05")
    if args.target_accuracy is not None:
        raise SpecError(
            "--target-loss", "give either --target-accuracy or --target-loss as the target, not both"
        )


def _simulate(args: argparse.Namespace) -> int:
    from dasgd.sim.models import ModelError

    try:
        if args.sweep:
            return _sweep(args)
        return _simulate_one(args)
    except ModelError as exc:
        print(f"dasgd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _simulate_one(args: argparse.Namespace) -> int:
    import dataclasses

    from dasgd.experiments.spec import resolve_spec
    from dasgd.runs.report import format_summary, format_value
    from dasgd.runs.simulate import simulate
    from dasgd.runs.summary import UNSET

    _check_target_loss(args)
    values = simulation_values(args)
    spec = resolve_spec(values, simulate=True, **spec_overrides(args), simulation=simulation_overrides(args))
    from dasgd.runs.build import with_task_defaults

    run_dir = choose_run_dir(args, spec, f"sim-{spec.task}")  # an earlier run's spec.yaml: a new directory
    spec = dataclasses.replace(with_task_defaults(spec), run_dir=str(run_dir))  # spec.yaml: the lr used
    check_trace(spec)
    prepare_output_dir(args, run_dir)  # an earlier run there is refused (or cleared: --overwrite)
    update, on_phase, close = simulation_progress(spec, not args.no_progress and sys.stderr.isatty())
    summary: RunSummary | None = None
    try:
        summary = simulate(spec, run_dir, on_progress=update, on_phase=on_phase)
    finally:
        close(
            None
            if summary is None
            else {
                "computed": summary.gradients_computed,
                "time": (summary.simulation or {}).get("virtual_end_s", 0.0),
            }
        )
    if args.target_loss is not None:
        from dasgd.metrics.eventlog import read_event_log
        from dasgd.runs.sweep import loss_to_target

        grads, when = loss_to_target(
            read_event_log(run_dir / "events.jsonl", clocks=False).evals, args.target_loss
        )
        # Measured from the event log after summary.json was written: only the printed summary has these.
        summary = dataclasses.replace(
            summary, target_loss=args.target_loss, gradients_to_target=grads, time_to_target_s=when
        )
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2, default=plain))
    else:
        sim = summary.simulation or {}
        print(format_summary(summary))
        facts = (
            f"simulation: {format_value(sim.get('events'))} events, virtual end "
            f"{format_value(sim.get('virtual_end_s'))} s, wall time {format_value(sim.get('wall_time_s'))} s, "
            f"peak memory {format_value(sim.get('peak_memory_mb'))} MB"
        )
        extras = [
            ("crashed workers", ", ".join(str(w) for w in sim.get("crashed_workers", [])) or None),
            ("messages lost", sim.get("messages_lost") or None),
            ("retransmissions", sim.get("retransmissions") or None),
        ]
        facts += "".join(f"; {name} {value}" for name, value in extras if value is not None)
        print(facts)
        if summary.gradients_to_target is not UNSET:
            target = (
                f"loss <= {args.target_loss:g}"
                if args.target_loss is not None
                else f"accuracy >= {format_value(summary.target_accuracy)}"
            )
            print(
                f"target {target}: {format_value(summary.gradients_to_target)} gradients, "
                f"{format_value(summary.time_to_target_s)} virtual s"
            )
        print(f"run directory: {run_dir}  (report: {run_dir / 'report.md'})")
    problems = []
    if summary.gradients_lost:
        problems.append(f"{summary.gradients_lost} gradients are missing from some replica")
    if summary.replicas_agree is False:
        problems.append("the replicas do not agree at the end")
    problems += health_problems(summary)
    if not summary.drained:
        problems.append("the end-of-run drain did not complete (a replica still misses gradients)")
    if report_divergence(summary, run_dir):
        for problem in problems:
            print(f"dasgd: warning: {problem}", file=sys.stderr)
        return EXIT_DIVERGED
    if not problems:
        return EXIT_OK
    expected = _modelled_failures(spec)
    for problem in problems:
        note = " (expected: the simulation models crashes or counted message loss)" if expected else ""
        print(f"dasgd: warning: {problem}{note}", file=sys.stderr)
    return EXIT_OK if expected else EXIT_FAILED


def _sweep(args: argparse.Namespace) -> int:
    from dasgd.experiments.spec import resolve_spec
    from dasgd.runs.build import build_task
    from dasgd.runs.sweep import format_sweep_table, plan_sweep, run_sweep

    _check_target_loss(args)
    values = simulation_values(args)
    overrides = {**spec_overrides(args), "simulation": simulation_overrides(args)}
    # The base spec alone first: its errors name their own flag, not --sweep.
    base = resolve_spec(values, simulate=True, **overrides)
    run_dir = Path(base.run_dir) if base.run_dir else default_run_dir(f"sweep-{base.task}")
    plan = plan_sweep(values, overrides, args.sweep, run_dir, target_loss=args.target_loss)
    checked: set[str] = set()
    for point in plan.points:
        check_trace(point.spec)
        if point.spec.task not in checked:
            build_task(point.spec)  # a missing dataset is reported here, with its install command
            checked.add(point.spec.task)
    prepare_output_dir(args, run_dir, kind="sweep")  # resumed if it is this sweep's; --overwrite: afresh
    for note in plan.notes:
        print(f"dasgd: note: {note}", file=sys.stderr)
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(plan.points), unit="point", desc="sweep", dynamic_ncols=True)

    def on_point(point: Any, status: str) -> None:
        if bar is None:
            return
        if status == "running":
            bar.set_postfix_str(point.name)
        else:
            bar.update(1)

    try:
        outcome = run_sweep(plan, on_point=on_point)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(outcome.rows, indent=2, default=plain))
    else:
        print(format_sweep_table(outcome.rows, [a.key for a in plan.axes]))
        print(
            f"{len(outcome.ran)} point(s) simulated, {len(outcome.reused)} reused from an earlier run; "
            f"table: {run_dir / 'sweep.md'} and {run_dir / 'sweep.csv'}; plots: {run_dir / 'plots'}"
        )
    failed = False
    for point, row in zip(plan.points, outcome.rows):
        if "diverged" in str(row.get("stop_reason") or "").split(","):
            # Information, not a failure: a stepsize sweep is how a user finds where the run diverges.
            print(f"dasgd: note: {point.name}: diverged (stopped early; docs/stepsize.md)", file=sys.stderr)
        if row.get("gradients_lost") or row.get("replicas_agree") is False:
            expected = _modelled_failures(point.spec)
            failed = failed or not expected
            note = " (expected: the simulation models crashes or counted message loss)" if expected else ""
            print(
                f"dasgd: warning: {point.name}: lost gradients or disagreeing replicas{note}", file=sys.stderr
            )
    return EXIT_FAILED if failed else EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from dasgd.metrics.tensorboard import INSTALL_HINT, tensorboard_available
    from dasgd.runs.report import ReportError, rebuild_run_dir
    from dasgd.runs.results import OutputOptions

    run_dir = Path(args.run_dir)
    if args.tensorboard and not tensorboard_available():
        print(
            f"dasgd: error: --tensorboard: the tensorboard package is not installed: {INSTALL_HINT}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    options = OutputOptions(plots=not args.no_plots, theory=not args.no_theory, tensorboard=args.tensorboard)
    try:
        rebuild_run_dir(run_dir, options=options)  # all or nothing: a bad events.jsonl leaves the old outputs
    except ReportError as exc:
        print(f"dasgd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a full disk, say: the earlier outputs are back in place
        print(f"dasgd: report failed: {exc}; the earlier outputs were put back", file=sys.stderr)
        return EXIT_FAILED
    extra = f" and {run_dir / 'tensorboard'}" if args.tensorboard else ""
    print(f"rebuilt {run_dir / 'report.md'}, {run_dir / 'metrics.csv'} and {run_dir / 'plots'}{extra}")
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
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "report":
            return _report(args)
        if args.command == "compare":
            from dasgd.cli_compare import run_compare

            return run_compare(args)
        if args.command == "theory":
            from dasgd.cli_theory import run_theory

            return run_theory(args)
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
