"""`dasgd theory`: a run against the paper's bounds, or the theory sweep on the quadratic.

``dasgd theory RUN_DIR`` prints the run's theory section and writes ``RUN_DIR/theory.md`` and
``RUN_DIR/plots/theory_grad_norm.png`` (dasgd.runs.theory_report). ``dasgd theory --sweep [--out DIR]``
runs the simulated sweep of dasgd.runs.theory_sweep. Exit codes: 0 done, 2 bad input (the message names
the fix).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_theory_parser", "run_theory"]

EXIT_OK, EXIT_USAGE = 0, 2


def _number_list(kind: type) -> Any:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            values = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of {kind.__name__}s, e.g. 1,4,16"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError("give at least one value, e.g. 1,4,16")
        return values

    return parse


def add_theory_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``theory`` command to ``subparsers`` (the object ``add_subparsers`` returned)."""
    p = subparsers.add_parser(
        "theory",
        help="a run against the paper's convergence bounds, or the theory sweep (--sweep)",
        description="With RUN_DIR: print the run's staleness, the estimated constants (L, sigma, Q, f(x0) - f*), "
        "both bounds term by term and the epsilon the run reached, and write RUN_DIR/theory.md and "
        "RUN_DIR/plots/theory_grad_norm.png. With --sweep: simulate DASGD on the quadratic over workers, "
        "latency and stragglers, and fit gradients-to-eps against staleness. See docs/theory.md.",
    )
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run directory (dasgd train / simulate)")
    p.add_argument("--sweep", action="store_true", help="run the theory sweep instead of analysing a run")
    p.add_argument("--out", metavar="DIR", help="sweep output folder (default runs/theory-sweep)")
    g = p.add_argument_group("sweep options (defaults: a sweep of about a minute)")
    g.add_argument("--workers", type=_number_list(int), metavar="N,N", help="worker counts (default 1,4,16)")
    g.add_argument(
        "--latency", type=_number_list(float), metavar="S,S", help="latencies (default 0.001,0.02)"
    )
    g.add_argument(
        "--slowdown", type=_number_list(float), metavar="F,F", help="straggler factors (default 1,4)"
    )
    g.add_argument("--straggler-share", type=float, metavar="F", help="share slowed down (default 0.5)")
    g.add_argument("--eps", type=_number_list(float), metavar="E,E", help="targets (default 0.3,0.1,0.03)")
    g.add_argument("--dim", type=int, help="quadratic dimension (default 10)")
    g.add_argument("--noise", type=float, help="quadratic noise sigma per sample (default 1)")
    g.add_argument("--condition", type=float, help="quadratic condition number (default 10)")
    g.add_argument("--batch-size", type=int, help="samples per gradient (default 10)")
    g.add_argument("--seed", type=int, help="problem and schedule seed (default 0)")
    g.add_argument("--max-gradients", type=int, help="most gradients one run may take (default 40000)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _say(text: str, *, err: bool = False) -> None:
    # The CLI is the one place that talks to the terminal.
    print(text, file=sys.stderr if err else sys.stdout)


def _error(message: str) -> int:
    _say(f"dasgd: error: {message}", err=True)
    return EXIT_USAGE


def _run_dir(args: argparse.Namespace) -> int:
    from dasgd.runs.theory_report import TheoryReportError, format_theory, write_theory

    try:
        result, files = write_theory(args.run_dir)
    except TheoryReportError as exc:
        return _error(str(exc))
    _say("\n".join(format_theory(result, level=1)).rstrip("\n"))
    _say(f"wrote {files[0]} and {files[1]}")
    return EXIT_OK


def _sweep(args: argparse.Namespace) -> int:
    from dasgd.runs.theory_sweep import (
        TheorySweepConfig,
        TheorySweepError,
        config_with,
        run_theory_sweep,
    )

    try:
        config = config_with(
            TheorySweepConfig(),
            workers=args.workers,
            latency=args.latency,
            slowdown=args.slowdown,
            straggler_share=args.straggler_share,
            eps=args.eps,
            dim=args.dim,
            noise=args.noise,
            condition=args.condition,
            batch_size=args.batch_size,
            seed=args.seed,
            max_gradients=args.max_gradients,
        )
    except TheorySweepError as exc:
        return _error(str(exc))
    out = Path(args.out) if args.out else Path("runs") / "theory-sweep"
    runs = len(config.settings()) * (1 + len(config.eps))
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=runs, unit="run", desc="theory sweep", dynamic_ncols=True)

    def on_run(label: str) -> None:
        if bar is not None:
            bar.set_postfix_str(label)
            bar.update(1)

    try:
        result = run_theory_sweep(config, out, on_run=on_run)
    finally:
        if bar is not None:
            bar.close()
    for fit in result.fits:
        _say(
            f"eps {fit.eps:g}, x = {fit.x_name}: T = {fit.intercept:.4g} + {fit.slope:.4g} x "
            f"(b/a {fit.relative_slope:.3g}, R^2 {fit.r2:.3f}, {fit.points} settings)"
        )
    missed = sum(r.gradients_to_eps is None for r in result.runs)
    if missed:
        _say(f"{missed} run(s) did not reach their eps within --max-gradients (left out of the fits)")
    _say(f"table: {out / 'theory_sweep.md'} and {out / 'theory_sweep.csv'}; figure: {result.files[-1]}")
    return EXIT_OK


def run_theory(args: argparse.Namespace) -> int:
    """Run ``dasgd theory`` with parsed ``args``; returns the exit code (2 on bad input)."""
    if args.sweep and args.run_dir:
        return _error("give either RUN_DIR or --sweep, not both")
    if args.sweep:
        return _sweep(args)
    if not args.run_dir:
        return _error("give a RUN_DIR to analyse (e.g. `dasgd theory runs/quadratic-...`) or --sweep")
    sweep_only = (
        "out",
        "workers",
        "latency",
        "slowdown",
        "straggler_share",
        "eps",
        "dim",
        "noise",
        "condition",
        "batch_size",
        "seed",
        "max_gradients",
    )
    given = [name for name in sweep_only if getattr(args, name) is not None]
    if given:
        return _error(f"--{given[0].replace('_', '-')} is a sweep option; add --sweep or drop it")
    return _run_dir(args)
