"""What the CLI commands share: run-setting and simulation flags, reading them back, progress bars, exit codes.

Only the CLI layer talks to the terminal; these pieces serve `train`, `simulate` and `compare` alike.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
from pathlib import Path
from typing import Any

__all__ = [
    "EXIT_DIVERGED",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "add_simulation_flags",
    "add_spec_flags",
    "check_trace",
    "choose_run_dir",
    "default_run_dir",
    "plain",
    "prepare_output_dir",
    "progress_printer",
    "simulation_overrides",
    "simulation_progress",
    "simulation_values",
    "spec_overrides",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DIVERGED = 0, 1, 2, 3
"""Exit codes of every command (docs/failures.md): 0 clean, 1 not clean or failed, 2 bad input, 3 diverged."""


def add_spec_flags(p: argparse.ArgumentParser) -> None:
    """``--spec FILE`` and one flag per run setting (generated from RunSpec's fields)."""
    from dasgd.experiments.settings import add_flags
    from dasgd.experiments.spec import RunSpec

    p.add_argument("--spec", metavar="FILE", help="YAML spec file; flags given here override its values")
    add_flags(p, RunSpec)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="the output directory holds an earlier run: remove its outputs first (without it such a run "
        "directory is refused; a sweep or comparison directory is resumed)",
    )


def add_simulation_flags(p: argparse.ArgumentParser) -> None:
    """The simulation settings (generated from SimSpec's fields) and the options of a simulation command."""
    from dasgd.experiments.settings import add_flags
    from dasgd.experiments.simspec import SimSpec

    g = p.add_argument_group("simulation (virtual seconds; see docs/simulator.md)")
    add_flags(g, SimSpec)
    g.add_argument(
        "--calibrate",
        metavar="RUN_DIR",
        help="replay a real run: its per-worker step times and estimated latency (flags given here win)",
    )
    g.add_argument(
        "--sweep",
        action="append",
        metavar="KEY=V1,V2",
        help="sweep a spec or simulation key over values (repeatable: the grid is the product)",
    )
    g.add_argument(
        "--target-loss",
        type=float,
        metavar="X",
        help="report gradients and virtual time until the evaluated loss first reaches X (not a stop rule)",
    )


def spec_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The run settings given as flags (None where not given)."""
    from dasgd.experiments.settings import values_from_args
    from dasgd.experiments.spec import RunSpec

    return values_from_args(args, RunSpec)


def simulation_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The simulation flags as a mapping merged over the spec file's simulation section."""
    from dasgd.experiments.settings import values_from_args
    from dasgd.experiments.simspec import SimSpec

    return values_from_args(args, SimSpec)


def simulation_values(args: argparse.Namespace) -> dict[str, Any]:
    """The spec file's values, with --calibrate's settings over its simulation section (flags still win)."""
    from dasgd.experiments.spec import SpecError, load_spec_file

    values = load_spec_file(args.spec) if args.spec else {}
    if args.calibrate:
        from dasgd.sim.calibrate import calibration
        from dasgd.sim.models import ModelError

        section = values.get("simulation") or {}
        if not isinstance(section, dict):
            raise SpecError("simulation", "must be a mapping of simulation keys")
        from dasgd.metrics.eventlog import EventLogError

        try:
            values = {**values, "simulation": {**section, **calibration(args.calibrate)}}
        except (ModelError, EventLogError) as exc:
            raise SpecError("--calibrate", str(exc)) from None
        except UnicodeDecodeError:
            raise SpecError(
                "--calibrate", f"{args.calibrate}/events.jsonl is not UTF-8 text; give a `dasgd train` run"
            ) from None
        except OSError as exc:
            raise SpecError("--calibrate", f"cannot read {args.calibrate}: {exc.strerror or exc}") from None
    return values


def default_run_dir(task: str) -> Path:
    """A new directory ``runs/<task>-<time>`` (``-2``, ``-3``, ... added when one started in the same second)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{task}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _belongs_to_a_run(spec_file: Path, run_dir: str) -> bool:
    """Whether ``spec_file`` is the spec.yaml of an earlier run: it lies in a run directory (next to that run's
    summary.json or events.jsonl), or its ``run_dir`` names the folder it lies in."""
    folder = spec_file.parent
    if (folder / "summary.json").exists() or (folder / "events.jsonl").exists():
        return True
    try:
        return Path(run_dir).resolve() == folder.resolve()
    except OSError:
        return False


def choose_run_dir(
    args: argparse.Namespace, spec: Any, prefix: str, new: Any = None, quiet: bool = False
) -> Path:
    """The run directory of a new run: ``--run-dir`` if given; the spec file's ``run_dir`` unless that file is
    an earlier run's spec.yaml (re-running it must not replace that run: a new directory is chosen, with a
    note unless ``quiet``); else a new directory. ``new()`` makes the new one (default ``runs/<prefix>-<time>``).
    """
    import sys

    make = new if new is not None else (lambda: default_run_dir(prefix))
    if getattr(args, "run_dir", None) is not None:
        return Path(args.run_dir)
    if not spec.run_dir:
        return make()
    spec_file = Path(args.spec) if getattr(args, "spec", None) else None
    if spec_file is None or not _belongs_to_a_run(spec_file, spec.run_dir):
        return Path(spec.run_dir)
    path = make()
    if not quiet:
        print(
            f"dasgd: note: {spec_file} is the spec of the run in {spec.run_dir}; this re-run goes to {path} "
            f"(to replace that run instead: --run-dir {spec.run_dir} --overwrite)",
            file=sys.stderr,
        )
    return path


def prepare_output_dir(args: argparse.Namespace, path: Path, kind: str = "run") -> Path:
    """Check, clear (``--overwrite``) and create the output directory before anything runs (bad: SpecError)."""
    from dasgd.runs import rundir

    kinds = {"run": rundir.RUN, "compare": rundir.COMPARE, "sweep": rundir.SWEEP}
    flag = "--out" if kind == "compare" and getattr(args, "out", None) is not None else "--run-dir"
    return rundir.prepare_run_dir(path, overwrite=bool(args.overwrite), kind=kinds[kind], flag=flag)


class _Phases:
    """The end-of-run phases on the terminal: each phase (summarising, plotting, estimating constants, ...) gets
    a bar of its own, with its own count and elapsed time, once the main bar is closed."""

    def __init__(self, close_main) -> None:  # noqa: ANN001 - the main bar's close
        self._close_main = close_main
        self._bar: Any = None
        self._name = ""

    def __call__(self, name: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if self._close_main is not None:
            self._close_main()
            self._close_main = None
        if name != self._name:
            if self._bar is not None:
                self._bar.close()
            self._name = name
            self._bar = tqdm(
                total=max(total, 1),
                desc=name,
                dynamic_ncols=True,
                bar_format="{desc}: {n}/{total} [{elapsed}]",
            )
        self._bar.n = min(done, self._bar.total)
        self._bar.refresh()

    def close(self) -> None:
        if self._close_main is not None:
            self._close_main()
            self._close_main = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _worker_phase(seen: list[dict]) -> str:
    """What the workers are doing, in words: training until one stops, then draining until all are done."""
    phases = [s.get("phase", "starting") for s in seen]
    if any(p in ("training", "waiting") for p in phases):
        return "draining" if any(p in ("draining", "drained", "drain_timeout") for p in phases) else "training"
    if all(p in ("drained", "drain_timeout") for p in phases):
        return "workers done"
    return "draining" if any(p == "draining" for p in phases) else "starting"


def progress_printer(spec: Any, enabled: bool):
    """A tqdm bar over the run's budget, fed with every worker's progress; then one bar per end-of-run phase.

    Returns ``(update, on_phase, close)``: ``update(seen)`` takes the workers' progress dicts, ``on_phase(name,
    done, total)`` an end-of-run phase (runs/results.py, ``PhaseCallback``). The training bar starts when the
    first worker reports that it trains (not while processes start and load data: its first ETA would be
    meaningless), and shows the workers' phase (training, draining); once they are done, each phase of the
    end of the run (summarising, plotting, estimating the theory's constants) shows its own progress.
    """
    if not enabled:
        return None, None, lambda: None
    from tqdm import tqdm

    state: dict[str, Any] = {"bar": None}

    def make_bar() -> Any:
        if spec.max_gradients is not None:
            return tqdm(total=spec.max_gradients, unit="grad", desc="training", dynamic_ncols=True)
        return tqdm(
            total=spec.max_seconds,
            unit="s",
            desc="training",
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}{postfix}]",
        )

    def close_main() -> None:
        if state["bar"] is not None:
            state["bar"].close()
            state["bar"] = None

    phases = _Phases(close_main)

    def update(seen: list[dict]) -> None:
        if phases._close_main is None:  # the end-of-run phases have begun: the training bar is closed
            return
        phase = _worker_phase(seen)
        if state["bar"] is None:
            if phase == "starting":
                return  # processes still start and load their data
            state["bar"] = make_bar()
        bar = state["bar"]
        applied = max((s.get("applied", 0) for s in seen), default=0)
        value = applied if spec.max_gradients is not None else max((s.get("time", 0.0) for s in seen), default=0.0)
        if bar.total is not None:
            value = min(value, bar.total)
        bar.n = value
        post = {"computed": "/".join(str(s.get("computed", 0)) for s in seen)}
        acc = seen[0].get("test_accuracy") if seen else None
        if acc is not None:
            post["acc"] = f"{acc:.3f}"
        if phase != "training":
            post["phase"] = phase
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    return update, phases, phases.close


def simulation_progress(spec: Any, enabled: bool):
    """A tqdm bar over the run's budget in gradients (or virtual seconds), fed by the simulator; then one bar
    per end-of-run phase. Returns ``(update, on_phase, close)`` as :func:`progress_printer` does."""
    if not enabled:
        return None, None, lambda final=None: None
    from tqdm import tqdm

    by_gradients = spec.max_gradients is not None or spec.max_seconds is None
    state: dict[str, Any] = {"open": True, "bar": None}

    def make_bar() -> Any:
        # Made at the first progress report, once the simulation runs (not while the task's data loads).
        if by_gradients:
            return tqdm(total=spec.max_gradients, unit="grad", desc="simulating", dynamic_ncols=True)
        return tqdm(
            total=spec.max_seconds,
            desc="simulating",
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} virtual s [{elapsed}{postfix}]",
        )

    def update(progress: dict) -> None:
        if not state["open"]:
            return
        if state["bar"] is None:
            state["bar"] = make_bar()
        bar = state["bar"]
        if "phase" in progress:  # the simulation is over; what follows is bookkeeping (its own bars)
            bar.set_description("simulated", refresh=False)
        value = progress.get("computed", 0) if by_gradients else progress.get("time", 0.0)
        bar.n = min(value, bar.total) if bar.total is not None else value
        post = {"t": f"{progress.get('time', 0.0):.3g}s", "training": progress.get("training", 0)}
        for key in ("test_accuracy", "loss", "test_loss"):
            if progress.get(key) is not None:
                post[key.replace("test_", "")] = f"{progress[key]:.4g}"
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    def close_main() -> None:
        if state["open"]:
            state["open"] = False
            if state["bar"] is not None:
                state["bar"].close()

    phases = _Phases(close_main)

    def close(final: dict | None = None) -> None:
        if final is not None and state["open"]:  # progress arrives every few thousand events
            update(final)
        phases.close()

    return update, phases, close


def plain(obj: Any) -> Any:
    """JSON for the numpy scalars and arrays a summary may hold."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def check_trace(spec: Any) -> None:
    """A trace file that cannot be replayed is bad input: say so before anything runs, naming the flag.

    The file is read here once (a sweep checks every point: the result is kept per file and version).
    """
    sim = spec.simulation
    if sim.compute != "trace" or sim.trace is None:
        return
    p = Path(sim.trace)
    try:
        stat = p.stat()
        version = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        version = None
    _check_trace_file(str(p), version)


@functools.lru_cache(maxsize=8)
def _check_trace_file(path: str, version: tuple[int, int] | None) -> None:
    import math

    from dasgd.experiments.spec import SpecError, file_problem
    from dasgd.sim.models import ModelError, read_step_trace

    what = "a run's events.jsonl or a text file of step times (seconds, one per line)"
    problem = file_problem(path)
    if problem is not None:
        raise SpecError("--trace", f"{path!r} {problem}; give {what}")
    try:
        traces = read_step_trace(path)
    except UnicodeDecodeError:
        raise SpecError("--trace", f"{path!r} is not UTF-8 text (a binary file?); give {what}") from None
    except ModelError as exc:
        raise SpecError("--trace", f"{exc}; give {what}") from None
    except OSError as exc:
        raise SpecError("--trace", f"cannot read {path!r}: {(exc.strerror or str(exc)).lower()}") from None
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
        raise SpecError(
            "--trace", f"{path!r}: a gradient event has a missing or malformed field ({exc!r}); give {what}"
        ) from None
    if not all(math.isfinite(v) for trace in traces for v in trace):
        raise SpecError("--trace", f"{path!r} holds a step time that is not a finite number; give {what}")
