"""`dasgd compare`: run several algorithms on one spec and answer "which reaches my target first, and by how
much" with a table, plots and a short report (the library side is :mod:`dasgd.runs.compare`).

    dasgd compare [SPEC] --algorithms dasgd,sync,ps-asgd,local-sgd,gossip [--simulate] [--straggler 1x4]
                  [--out DIR] [--seeds 0 1 2] [train flags: --task, --workers, --max-seconds, ...]

Exit codes as for every command: 0 success, 1 a run failed (the others still ran and are in the table),
2 bad input (an unknown algorithm names the valid ones), 130 interrupted (rerun the same command with the
same --out to resume).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dasgd.cli_common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_simulation_flags,
    add_spec_flags,
    check_trace,
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

__all__ = ["add_compare_parser", "run_compare"]


def _say(text: str, *, err: bool = False) -> None:
    # The CLI is the one layer that talks to the terminal.
    print(text, file=sys.stderr if err else sys.stdout)


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` command to ``dasgd``'s subparsers; return its parser."""
    from dasgd.algorithms import ALGORITHMS

    names = ", ".join(ALGORITHMS)
    p = subparsers.add_parser(
        "compare",
        help="run several algorithms on the same spec; table, plots and who reached the target first",
        description="Run each algorithm on the same task, workers, seeds and budget (real worker processes, "
        "or the simulator with --simulate), into OUT/<algorithm>/, then write compare.csv, compare.md, "
        "plots/ and report.md into OUT. Finished runs are reused: rerun the same command with the same "
        "--out to resume. See docs/compare.md.",
    )
    p.add_argument("spec_file", nargs="?", metavar="SPEC", help="YAML spec file (flags override its values)")
    p.add_argument(
        "--algorithms",
        metavar="A,B,...",
        help=f"comma-separated algorithms to compare (default: every registered one: {names})",
    )
    p.add_argument("--simulate", action="store_true", help="run in the simulator (virtual time)")
    p.add_argument("--out", metavar="DIR", help="comparison directory (default runs/compare-<task>-<time>)")
    p.add_argument(
        "--seeds",
        nargs="+",
        metavar="S",
        help="run every algorithm once per seed (e.g. --seeds 0 1 2); rows are medians over seeds",
    )
    add_spec_flags(p)
    add_simulation_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar within each run")
    p.add_argument("--json", action="store_true", help="print the per-algorithm rows as JSON")
    return p


def _spec_path(args: argparse.Namespace) -> str | None:
    from dasgd.experiments.spec import SpecError

    if args.spec_file and args.spec and Path(args.spec_file) != Path(args.spec):
        raise SpecError("SPEC", "give the spec file once: as SPEC or as --spec, not both")
    return args.spec_file or args.spec


def _check_flags(args: argparse.Namespace) -> None:
    """Flags of `train`/`simulate` that mean something else, or nothing, in a comparison."""
    from dasgd.experiments.settings import flag_of
    from dasgd.experiments.simspec import SimSpec
    from dasgd.experiments.spec import SpecError

    if args.algorithm is not None:
        raise SpecError(
            "--algorithm", "a comparison runs several algorithms: give them as --algorithms a,b,c"
        )
    if args.sweep:
        raise SpecError("--sweep", "compare does not sweep; run `dasgd simulate --sweep` for a grid")
    if args.run_dir is not None and args.out is not None:
        raise SpecError("--out", "give the output directory once: --out (or --run-dir), not both")
    if args.seeds is not None and args.seed is not None:
        raise SpecError("--seeds", "give the seeds either with --seeds or with --seed, not both")
    if not args.simulate:
        given = [k for k, v in simulation_overrides(args).items() if v is not None]
        if args.calibrate:
            given.insert(0, "calibrate")
        if given:
            raise SpecError(
                "--calibrate" if given[0] == "calibrate" else flag_of(SimSpec, given[0]),
                "is a simulation flag; add --simulate to compare in the simulator, or drop it",
            )


def _run_one(args: argparse.Namespace, simulate: bool, show: bool):
    """The function that runs one spec, with the per-run progress bar of `train` or `simulate`."""

    def run(spec: Any, run_dir: Path) -> RunSummary:
        if simulate:
            from dasgd.runs.simulate import simulate as run_simulated

            update, on_phase, close = simulation_progress(spec, show)
            summary: RunSummary | None = None
            try:
                summary = run_simulated(spec, run_dir, on_progress=update, on_phase=on_phase)
            finally:
                close(
                    None
                    if summary is None
                    else {
                        "computed": summary.gradients_computed,
                        "time": (summary.simulation or {}).get("virtual_end_s", 0.0),
                    }
                )
            return summary
        from dasgd.runs.launcher import launch_local

        update, on_phase, close = progress_printer(spec, show)
        try:
            return launch_local(spec, run_dir, on_progress=update, on_phase=on_phase)
        finally:
            close()

    return run


def run_compare(args: argparse.Namespace) -> int:
    """Run ``dasgd compare`` for parsed arguments; return the exit code."""
    from dasgd.core.topology import TopologyError
    from dasgd.experiments.spec import SpecError
    from dasgd.sim.models import ModelError
    from dasgd.tasks import DatasetMissing, TaskError

    try:
        return _compare(args)
    except (SpecError, DatasetMissing, TaskError, TopologyError, ModelError) as exc:
        _say(f"dasgd: error: {exc}", err=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _say(
            "dasgd: interrupted; finished runs are kept: rerun the same command (same --out) to resume",
            err=True,
        )
        return 130


def _compare(args: argparse.Namespace) -> int:
    from dasgd.algorithms import ALGORITHMS
    from dasgd.experiments.spec import RunSpec, load_spec_file
    from dasgd.runs.build import build_task
    from dasgd.runs.compare import (
        compare_verdict,
        format_compare_table,
        parse_algorithms,
        parse_seeds,
        plan_comparison,
        run_comparison,
    )

    _check_flags(args)
    algorithms = parse_algorithms(args.algorithms if args.algorithms is not None else list(ALGORITHMS))
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    args.spec = _spec_path(args)  # the helpers of `simulate` read the file from args.spec
    if args.simulate:
        values = simulation_values(args)
    else:
        values = load_spec_file(args.spec) if args.spec else {}
    overrides = spec_overrides(args)
    out = args.out if args.out is not None else overrides.get("run_dir")
    overrides.pop("run_dir", None)
    if args.simulate:
        overrides["simulation"] = simulation_overrides(args)
    task = overrides.get("task") or values.get("task") or RunSpec.task
    out_dir = Path(out) if out else default_run_dir(f"compare-{task}")
    plan = plan_comparison(
        values,
        overrides,
        algorithms,
        out_dir,
        seeds=seeds,
        simulate=args.simulate,
        target_loss=args.target_loss,
    )
    if args.simulate:
        check_trace(plan.base)
    build_task(plan.base)  # a missing dataset is reported here, before any run starts
    if not plan.simulate:
        from dasgd.runs.build import secret_key

        secret_key(plan.base)  # an unset --secret-env variable: exit 2 now, not one failed run per algorithm
    # A comparison directory is resumed; --overwrite starts it afresh; anything else non-empty is refused.
    prepare_output_dir(args, out_dir, kind="compare")
    show = not args.no_progress and sys.stderr.isatty()
    mode = "simulated" if plan.simulate else "real"

    def on_run(run: Any, i: int, n: int, status: str) -> None:
        if status == "running":
            _say(f"[{i}/{n}] {run.label}: running ({mode}) -> {run.run_dir}", err=True)
        elif status == "reused":
            _say(f"[{i}/{n}] {run.label}: already finished, reused", err=True)
        elif status == "failed":
            _say(f"[{i}/{n}] {run.label}: FAILED (the comparison goes on)", err=True)
        else:
            _say(f"[{i}/{n}] {run.label}: done", err=True)

    outcome = run_comparison(plan, run_one=_run_one(args, plan.simulate, show), on_run=on_run)
    if args.json:
        _say(json.dumps(outcome.rows, indent=2, default=plain))
    else:
        _say(format_compare_table(outcome.rows, plan.time_unit))
        verdict = compare_verdict(
            outcome.rows, has_target=plan.has_target, target_text=plan.target_text(), time_unit=plan.time_unit
        )
        _say("")
        _say("\n".join(line.replace("**", "") for line in verdict.lines))
        _say(
            f"{len(outcome.ran)} run(s) done, {len(outcome.reused)} reused, {len(outcome.failed)} failed; "
            f"report: {out_dir / 'report.md'}; table: {out_dir / 'compare.md'} and {out_dir / 'compare.csv'}"
        )
    for row in outcome.run_rows:
        if row.get("status") == "failed":
            _say(f"dasgd: run failed: {row['algorithm']} seed {row['seed']}: {row['error']}", err=True)
        elif row.get("gradients_lost"):
            _say(
                f"dasgd: warning: {row['algorithm']} seed {row['seed']}: {row['gradients_lost']} gradients "
                "are missing from some replica",
                err=True,
            )
    return EXIT_FAILED if outcome.failed else EXIT_OK
