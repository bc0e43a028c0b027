"""What the CLI commands share: run-setting and simulation flags, reading them back, progress bars, exit codes.

Only the CLI layer talks to the terminal; these pieces serve `train`, `simulate` and `compare` alike.
"""

from __future__ import annotations

import argparse
import datetime as _dt
from pathlib import Path
from typing import Any

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "add_simulation_flags",
    "add_spec_flags",
    "check_trace",
    "default_run_dir",
    "plain",
    "progress_printer",
    "simulation_overrides",
    "simulation_progress",
    "simulation_values",
    "spec_overrides",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_spec_flags(p: argparse.ArgumentParser) -> None:
    """``--spec FILE`` and one flag per run setting (generated from RunSpec's fields)."""
    from dasgd.experiments.settings import add_flags
    from dasgd.experiments.spec import RunSpec

    p.add_argument("--spec", metavar="FILE", help="YAML spec file; flags given here override its values")
    add_flags(p, RunSpec)


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
        try:
            values = {**values, "simulation": {**section, **calibration(args.calibrate)}}
        except ModelError as exc:
            raise SpecError("--calibrate", str(exc)) from None
    return values


def default_run_dir(task: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{task}-{stamp}"


def progress_printer(spec: Any, enabled: bool):
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


def simulation_progress(spec: Any, enabled: bool):
    """A tqdm bar over the run's budget in gradients (or virtual seconds), fed by the simulator."""
    if not enabled:
        return None, lambda final=None: None
    from tqdm import tqdm

    by_gradients = spec.max_gradients is not None or spec.max_seconds is None
    if by_gradients:
        bar = tqdm(total=spec.max_gradients, unit="grad", desc="simulating", dynamic_ncols=True)
    else:
        bar = tqdm(
            total=spec.max_seconds,
            desc="simulating",
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} virtual s [{elapsed}{postfix}]",
        )

    def update(progress: dict) -> None:
        if "phase" in progress:  # the simulation is over; what follows is bookkeeping
            bar.set_description(progress["phase"], refresh=False)
        value = progress.get("computed", 0) if by_gradients else progress.get("time", 0.0)
        bar.n = min(value, bar.total) if bar.total is not None else value
        post = {"t": f"{progress.get('time', 0.0):.3g}s", "training": progress.get("training", 0)}
        for key in ("test_accuracy", "loss", "test_loss"):
            if progress.get(key) is not None:
                post[key.replace("test_", "")] = f"{progress[key]:.4g}"
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    def close(final: dict | None = None) -> None:
        if final is not None:  # progress arrives every few thousand events: show where the run ended
            update(final)
        bar.close()

    return update, close


def plain(obj: Any) -> Any:
    """JSON for the numpy scalars and arrays a summary may hold."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def check_trace(spec: Any) -> None:
    """A missing trace file is bad input: say so before anything runs, naming the flag."""
    from dasgd.experiments.spec import SpecError

    sim = spec.simulation
    if sim.compute == "trace" and sim.trace is not None and not Path(sim.trace).is_file():
        raise SpecError("--trace", f"{sim.trace!r} does not exist; give a run's events.jsonl or a text file")
