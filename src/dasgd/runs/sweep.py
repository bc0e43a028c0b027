"""Parameter sweeps of simulated runs: `dasgd simulate --sweep KEY=V1,V2 ...`.

A sweep is a grid: the Cartesian product of the values given for each swept key, over one base spec (the
spec file and the other flags). Every point is a full simulated run in ``RUN_DIR/points/<key=value,...>/``;
the sweep then writes one table (``sweep.csv``, ``sweep.md``) and one figure per swept key
(``plots/sweep_<key>.png``, :mod:`dasgd.metrics.sweep_plots`).

Values are validated by the spec validation itself (:func:`dasgd.experiments.spec.resolve_spec`), so an
error names both ``--sweep`` and the key's own flag. The whole grid is validated before the first point
runs.

Resume: a point whose directory already holds ``summary.json`` and ``report.md`` (the last file a run writes)
and whose ``spec.yaml`` resolves to the same spec (ignoring ``run_dir``) is read back, not run again, so an
interrupted sweep restarts with the same command and the same ``--run-dir``.

Stragglers: ``slowdown`` only slows the workers chosen by ``straggler_share`` (or named by ``--straggler``).
A sweep over ``slowdown`` whose spec sets neither gets ``straggler_share`` = :data:`DEFAULT_STRAGGLER_SHARE`
and says so in ``sweep.md``; an explicit ``straggler_share: 0`` is kept (with a note that slowdown then has
no effect).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dasgd.experiments.simspec import SimSpec
from dasgd.experiments.spec import RunSpec, SpecError, flag_name, load_spec_file, resolve_spec

__all__ = [
    "DEFAULT_STRAGGLER_SHARE",
    "SWEEP_COLUMNS",
    "SweepAxis",
    "SweepOutcome",
    "SweepPlan",
    "SweepPoint",
    "csv_cell",
    "finished_summary",
    "format_sweep_table",
    "loss_to_target",
    "parse_sweep",
    "plan_sweep",
    "run_sweep",
    "sweepable_keys",
    "write_sweep_outputs",
]

DEFAULT_STRAGGLER_SHARE = 0.25
"""Share of workers slowed down in a ``slowdown`` sweep whose spec names no stragglers."""

SWEEP_COLUMNS: tuple[str, ...] = (
    "stop_reason",
    "gradients_computed",
    "s_avg",
    "s_max",
    "s_hat_avg",
    "s_hat_max",
    "final_accuracy",
    "final_loss",
    "gradients_to_target",
    "time_to_target_s",
    "gradients_lost",
    "replicas_agree",
    "wall_s",
    "peak_memory_mb",
)
"""Columns of ``sweep.csv`` after the swept keys (``time_to_target_s`` is virtual time)."""

_HEADERS: dict[str, str] = {
    "stop_reason": "stopped by",
    "gradients_computed": "gradients",
    "s_avg": "S_avg",
    "s_max": "S_max",
    "s_hat_avg": "S^_avg",
    "s_hat_max": "S^_max",
    "final_accuracy": "final accuracy",
    "final_loss": "final loss",
    "gradients_to_target": "gradients to target",
    "time_to_target_s": "virtual time to target (s)",
    "gradients_lost": "lost",
    "replicas_agree": "replicas agree",
    "wall_s": "wall (s)",
    "peak_memory_mb": "peak memory (MB)",
}

_RUN_KEYS = tuple(
    f.name for f in dataclasses.fields(RunSpec) if f.name not in ("simulation", "notes", "run_dir")
)
_SIM_KEYS = tuple(f.name for f in dataclasses.fields(SimSpec))
# Tuple-valued keys: one swept value is a list of items joined by "+", or "none" for no item.
_LIST_KEYS = frozenset({"stragglers", "crashes", "link_down", "links"})
_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
# The singular CLI flags (--crash, --straggler) name plural spec keys.
_ALIASES = {"crash": "crashes", "straggler": "stragglers"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,@+-]")


def sweepable_keys() -> tuple[str, ...]:
    """Every key ``--sweep`` accepts: the run spec's fields and the simulation section's fields."""
    return _RUN_KEYS + _SIM_KEYS


def _sweep_error(message: str) -> SpecError:
    return SpecError("--sweep", message)


def parse_sweep(text: str) -> tuple[str, tuple[str, ...]]:
    """``"KEY=V1,V2"`` -> ``(key, ("V1", "V2"))``; the key as a spec field name (dashes become underscores).

    Raises:
        SpecError: no ``=``, an unknown key, no value, or a value given twice.
    """
    key, sep, rest = str(text).partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    key = _ALIASES.get(key, key)
    if not sep or not key:
        raise _sweep_error(f"{text!r} is not KEY=V1,V2,...; write e.g. --sweep workers=4,16")
    if key not in sweepable_keys():
        raise _sweep_error(
            f"{text!r}: unknown key {key!r}; sweepable keys: {', '.join(sorted(sweepable_keys()))}"
        )
    values = tuple(v.strip() for v in rest.split(","))
    if not values or any(not v for v in values):
        raise _sweep_error(f"{text!r}: give one or more comma-separated values, e.g. {key}=1,2")
    if len(set(values)) != len(values):
        raise _sweep_error(f"{text!r}: a value is given twice; give each value once")
    return key, values


def _raw_value(key: str, text: str) -> Any:
    """The plain value resolve_spec expects for ``key`` from the swept text."""
    if key in _LIST_KEYS:
        return [] if text.lower() in ("none", "") else text.split("+")
    if key == "batched":
        word = text.lower()
        if word not in _BOOL_WORDS:
            raise _sweep_error(f"batched={text}: give true or false")
        return _BOOL_WORDS[word]
    if key == "bandwidth" and text.lower() == "inf":
        return "inf"
    return text


def _with_values(overrides: Mapping[str, Any], assignment: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(overrides)
    sim = dict(out.get("simulation") or {})
    for key, value in assignment.items():
        if key in _SIM_KEYS:
            sim[key] = value
        else:
            out[key] = value
    out["simulation"] = sim
    return out


def _field(spec: RunSpec, key: str) -> Any:
    return getattr(spec.simulation, key) if key in _SIM_KEYS else getattr(spec, key)


def _label(value: Any, text: str) -> str:
    """How a resolved value is written in directory names and tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, tuple):
        return text if value else "none"
    return str(value)


@dataclass(frozen=True)
class SweepAxis:
    """One swept key, its resolved values and their labels, in the order given."""

    key: str
    values: tuple[Any, ...]
    labels: tuple[str, ...]


@dataclass(frozen=True)
class SweepPoint:
    """One grid point: its swept values, directory name and fully resolved spec (``run_dir`` set)."""

    values: tuple[tuple[str, Any], ...]
    labels: tuple[tuple[str, str], ...]
    name: str
    spec: RunSpec

    @property
    def run_dir(self) -> Path:
        """The point's own run directory."""
        return Path(str(self.spec.run_dir))


@dataclass(frozen=True)
class SweepPlan:
    """A validated sweep: base spec, axes, points, and notes for the reader of ``sweep.md``."""

    run_dir: Path
    base: RunSpec
    axes: tuple[SweepAxis, ...]
    points: tuple[SweepPoint, ...]
    notes: tuple[str, ...] = ()
    target_loss: float | None = None


@dataclass
class SweepOutcome:
    """The sweep's table rows (one per point, grid order), which points ran and which were reused."""

    rows: list[dict[str, Any]]
    ran: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def _explicit(values: Mapping[str, Any], overrides: Mapping[str, Any], key: str) -> bool:
    sim_file = values.get("simulation") or {}
    sim_flags = overrides.get("simulation") or {}
    return (isinstance(sim_file, Mapping) and sim_file.get(key) is not None) or sim_flags.get(key) is not None


def plan_sweep(
    values: Mapping[str, Any],
    overrides: Mapping[str, Any],
    sweeps: Sequence[str],
    run_dir: Path,
    target_loss: float | None = None,
) -> SweepPlan:
    """Validate a sweep and resolve every point's spec.

    Args:
        values: the spec file's values (``load_spec_file``), or ``{}``.
        overrides: keyword overrides for ``resolve_spec`` (flags), ``simulation`` a mapping of sim keys.
        sweeps: the ``--sweep`` texts, ``KEY=V1,V2,...``.
        run_dir: the sweep's directory; points go to ``run_dir/points/<name>``.
        target_loss: report gradients and virtual time until the evaluated loss first reaches it.

    Raises:
        SpecError: a bad base spec (naming its flag), or a bad sweep (naming ``--sweep`` and the key).
    """
    from dasgd.runs.build import resolve

    base = resolve_spec(dict(values), simulate=True, **_with_values(overrides, {}))
    parsed = [parse_sweep(s) for s in sweeps]
    if not parsed:
        raise _sweep_error("give at least one KEY=V1,V2,... to sweep")
    keys = [k for k, _ in parsed]
    for key in keys:
        if keys.count(key) > 1:
            raise _sweep_error(f"{key} is swept twice; give all its values in one --sweep {key}=V1,V2")
        given = (overrides.get("simulation") or {}).get(key) if key in _SIM_KEYS else overrides.get(key)
        if given not in (None, [], ()):
            raise _sweep_error(f"{key} is both swept and set by {flag_name(key)}; drop one of them")
    notes: list[str] = []
    overrides = dict(overrides)
    if (
        "slowdown" in keys
        and "straggler_share" not in keys
        and "stragglers" not in keys
        and not base.stragglers
    ):
        if not _explicit(values, overrides, "straggler_share"):
            sim = dict(overrides.get("simulation") or {})
            sim["straggler_share"] = DEFAULT_STRAGGLER_SHARE
            overrides["simulation"] = sim
            notes.append(
                f"slowdown is swept but the spec names no stragglers: straggler_share was set to "
                f"{DEFAULT_STRAGGLER_SHARE:g} (a seeded {DEFAULT_STRAGGLER_SHARE:.0%} of the workers run "
                f"`slowdown` times slower). Set --straggler-share or --straggler to choose them yourself."
            )
        elif base.simulation.straggler_share == 0:
            notes.append(
                "slowdown is swept but straggler_share is 0 and no worker is named a straggler: "
                "every point runs at full speed, so slowdown has no effect."
            )
    if "workers" in keys and base.task == "quadratic" and base.lr is None and "lr" not in keys:
        notes.append(
            "workers is swept without --lr: the quadratic's default stepsize is 0.5 / workers, so it changes "
            "from point to point with the staleness; pass --lr to hold it fixed."
        )
    axes: list[SweepAxis] = []
    for key, texts in parsed:
        resolved, labels = [], []
        for text in texts:
            try:
                spec = resolve_spec(
                    dict(values), simulate=True, **_with_values(overrides, {key: _raw_value(key, text)})
                )
            except SpecError as exc:
                raise _sweep_error(f"{key}={text}: {exc}") from None
            value = _field(spec, key)
            resolved.append(value)
            labels.append(_label(value, text))
        if len(set(labels)) != len(labels):
            raise _sweep_error(f"{key}={','.join(texts)}: two values are the same ({', '.join(labels)})")
        axes.append(SweepAxis(key, tuple(resolved), tuple(labels)))
    points: list[SweepPoint] = []
    names: set[str] = set()
    grid = itertools.product(*[range(len(a.values)) for a in axes])
    for idx in grid:
        assignment = {a.key: _raw_value(a.key, texts[i]) for a, (_, texts), i in zip(axes, parsed, idx)}
        point_labels = tuple((a.key, a.labels[i]) for a, i in zip(axes, idx))
        name = _UNSAFE.sub("_", ",".join(f"{k}={v}" for k, v in point_labels))
        if name in names:
            raise _sweep_error(f"two points would share the directory {name!r}; give distinct values")
        names.add(name)
        point_dir = run_dir / "points" / name
        try:
            spec = resolve_spec(
                dict(values),
                simulate=True,
                **_with_values({**overrides, "run_dir": str(point_dir)}, assignment),
            )
            resolve(spec)  # the topology for this many workers, which only the whole point can check
        except SpecError as exc:
            raise _sweep_error(f"the point {name}: {exc}") from None
        values_at = tuple((a.key, a.values[i]) for a, i in zip(axes, idx))
        points.append(SweepPoint(values_at, point_labels, name, spec))
    return SweepPlan(run_dir, base, tuple(axes), tuple(points), tuple(notes), target_loss)


def loss_to_target(evals: Sequence[Mapping[str, Any]], target: float) -> tuple[int | None, float | None]:
    """Gradients held and time at the first evaluation whose loss is at most ``target`` (None if never).

    The loss is ``test_loss`` where the task reports it, else ``loss`` (the quadratic's f(x) - f*). The
    resolution is the run's evaluation interval (``eval_every``, virtual seconds in a simulation). The
    end-of-run evaluation (marked ``final``) comes after training stopped, so it never counts as reaching it.
    """
    for ev in sorted(evals, key=lambda e: (float(e["time"]), int(e["gradients"]))):
        if ev.get("final"):
            continue
        value = ev.get("test_loss", ev.get("loss"))
        if value is not None and math.isfinite(float(value)) and float(value) <= target:
            return int(ev["gradients"]), float(ev["time"])
    return None, None


def finished_summary(run_dir: Path, spec: RunSpec) -> dict[str, Any] | None:
    """The summary in ``run_dir`` if a run of ``spec`` already finished there, else None.

    It is the file's dict, not a :class:`~dasgd.runs.summary.RunSummary`: a resumed directory may come from
    another version of dasgd, and the rows read it key by key (every key optional).

    Finished means ``summary.json`` and ``report.md`` (the last file a run writes) exist and ``spec.yaml``
    resolves to ``spec`` (ignoring ``run_dir``; the task's default stepsize and batch size count as given).
    Real and simulated runs write the same files.
    """
    d = Path(run_dir)
    if not all((d / f).is_file() for f in ("summary.json", "report.md", "spec.yaml")):
        return None
    try:
        old = resolve_spec(load_spec_file(d / "spec.yaml"), simulate=True)
        summary = json.loads((d / "summary.json").read_text())
    except (SpecError, ValueError, OSError):
        return None  # unreadable or from another version: run it again
    from dasgd.runs.build import with_task_defaults

    try:
        # spec.yaml records the stepsize and batch size used; a planned spec may leave them to the task.
        same = dataclasses.replace(with_task_defaults(old), run_dir=None) == dataclasses.replace(
            with_task_defaults(spec), run_dir=None
        )
    except SpecError:
        return None
    if not same:
        return None
    return summary if isinstance(summary, dict) else None


def _finished_summary(point: SweepPoint) -> dict[str, Any] | None:
    return finished_summary(point.run_dir, point.spec)


def _reset_peak_memory() -> None:
    # Linux: "5" resets this process's peak RSS (VmHWM, which getrusage's ru_maxrss also reads), so each
    # point's summary reports its own peak rather than the sweep's running maximum. Elsewhere: a no-op, and
    # the peaks are the sweep process's high-water mark.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _row(point: SweepPoint, summary: Mapping[str, Any], target_loss: float | None) -> dict[str, Any]:
    staleness = summary.get("staleness") or {}
    final = summary.get("final_metrics") or {}
    sim = summary.get("simulation") or {}
    if target_loss is not None:
        from dasgd.metrics.eventlog import read_event_log

        grads, when = loss_to_target(
            read_event_log(point.run_dir / "events.jsonl", clocks=False).evals, target_loss
        )
    else:
        grads, when = summary.get("gradients_to_target"), summary.get("time_to_target_s")
    row: dict[str, Any] = {
        key: (label if isinstance(value, tuple) else value)
        for (key, value), (_, label) in zip(point.values, point.labels)
    }
    row.update(
        {
            "stop_reason": summary.get("stop_reason"),
            "gradients_computed": summary.get("gradients_computed"),
            "s_avg": staleness.get("s_avg"),
            "s_max": staleness.get("s_max"),
            "s_hat_avg": staleness.get("loose_avg"),
            "s_hat_max": staleness.get("loose_max"),
            "final_accuracy": final.get("test_accuracy"),
            "final_loss": final.get("test_loss", final.get("loss")),
            "gradients_to_target": grads,
            "time_to_target_s": when,
            "gradients_lost": summary.get("gradients_lost"),
            "replicas_agree": summary.get("replicas_agree"),
            "wall_s": sim.get("wall_time_s"),
            "peak_memory_mb": sim.get("peak_memory_mb"),
        }
    )
    return row


def run_sweep(
    plan: SweepPlan,
    run_point: Callable[[RunSpec, Path], Mapping[str, Any]] | None = None,
    on_point: Callable[[SweepPoint, str], None] | None = None,
    reset_peak_memory: bool = True,
) -> SweepOutcome:
    """Run every point not already finished, then write the sweep's table and plots.

    Args:
        plan: from :func:`plan_sweep`.
        run_point: runs one spec into its run directory and returns the summary (default: the simulator).
        on_point: called as ``on_point(point, status)`` with status ``"running"`` before each point and
            ``"ran"`` or ``"reused"`` after it.
        reset_peak_memory: reset this process's peak-RSS counter before each point (Linux), so each point
            reports its own peak memory. It is process-wide; pass False if something else reads it.
    """
    if run_point is None:
        from dasgd.runs.simulate import simulate as run_point
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    (plan.run_dir / "sweep.yaml").write_text(_plan_yaml(plan))
    outcome = SweepOutcome(rows=[])
    for point in plan.points:
        if on_point is not None:
            on_point(point, "running")
        summary: Mapping[str, Any] | None = _finished_summary(point)
        if summary is None:
            if reset_peak_memory:
                _reset_peak_memory()
            # A RunSummary (from the simulator): the row reads it through its mapping, as it reads a file.
            summary = run_point(point.spec, point.run_dir)
            outcome.ran.append(point.name)
            status = "ran"
        else:
            outcome.reused.append(point.name)
            status = "reused"
        outcome.rows.append(_row(point, summary, plan.target_loss))
        # The table so far, so a long sweep's finished points can be read before it ends.
        _write_csv(plan, outcome.rows)
        if on_point is not None:
            on_point(point, status)
    outcome.files = write_sweep_outputs(plan, outcome.rows)
    return outcome


def _plan_yaml(plan: SweepPlan) -> str:
    base = plan.base.to_dict()
    base["run_dir"] = None
    data = {
        "sweep": {a.key: list(a.labels) for a in plan.axes},
        "target_loss": plan.target_loss,
        "notes": list(plan.notes),
        "base": base,
    }
    return yaml.safe_dump(data, sort_keys=False)


def _columns(plan: SweepPlan) -> list[str]:
    return [a.key for a in plan.axes] + list(SWEEP_COLUMNS)


def csv_cell(value: Any) -> str:
    """A table value as a CSV cell: None empty, booleans as true/false, floats in full (repr)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _write_csv(plan: SweepPlan, rows: Sequence[Mapping[str, Any]]) -> Path:
    path = plan.run_dir / "sweep.csv"
    columns = _columns(plan)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([csv_cell(row.get(c)) for c in columns])
    return path


def _target_text(plan: SweepPlan) -> str:
    if plan.target_loss is not None:
        return (
            f"Target: loss <= {plan.target_loss:g} (first evaluation of the evaluated replica that reaches it; "
            f"resolution --eval-every = {plan.base.evaluation_interval(simulated=True):g} virtual s)."
        )
    if plan.base.target_accuracy is not None:
        return f"Target: test accuracy >= {plan.base.target_accuracy:g} (also a stop rule of every point)."
    return (
        "No target set: the to-target columns are n/a. Give --target-accuracy (classification tasks) or "
        "--target-loss to measure gradients and virtual time to a target."
    )


def write_sweep_outputs(plan: SweepPlan, rows: Sequence[Mapping[str, Any]]) -> list[Path]:
    """Write ``sweep.csv``, ``sweep.md`` and ``plots/sweep_<key>.png`` into the sweep's directory."""
    from dasgd.metrics.sweep_plots import plot_sweep
    from dasgd.runs.report import format_value

    files = [_write_csv(plan, rows)]
    base = plan.base
    title = f"{base.algorithm} on {base.task}"
    # Rows hold a list-valued key (crashes, ...) by its label; the plots must use the same values.
    axes = {a.key: (a.labels if a.key in _LIST_KEYS else a.values) for a in plan.axes}
    plots = plot_sweep(rows, axes, plan.run_dir / "plots", title=title)
    columns = _columns(plan)
    budget = ", ".join(f"{flag_name(k)} {v:g}" for k, v in base.stop_rules().items())
    lines = [
        f"# Sweep: {base.task} ({base.algorithm}), {len(rows)} simulated runs",
        "",
        "Swept: " + "; ".join(f"`{a.key}` = {', '.join(a.labels)}" for a in plan.axes) + ".",
        f"Base: {base.workers} workers, topology {base.topology}, seed {base.seed}, stop rules: {budget}.",
        "Times are virtual seconds of the simulation, except `wall (s)` (the simulator's own running time) "
        "and peak memory (resident set size of the process while the point ran).",
        _target_text(plan),
        "",
    ]
    if plan.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in plan.notes], ""]
    header = [_HEADERS.get(c, c) for c in columns] + ["run"]
    lines += ["## Results", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for point, row in zip(plan.points, rows):
        cells = [label for _, label in point.labels]
        cells += [format_value(row.get(c)) for c in SWEEP_COLUMNS]
        cells.append(f"[report](points/{point.name}/report.md)")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    if plots:
        lines += ["## Plots", ""]
        for path in plots:
            lines += [f"![{path.stem}](plots/{path.name})", ""]
    lines += [
        "Every point's full run directory (event log, metrics, summary, plots, report) is under `points/`; "
        "`sweep.yaml` records the base spec and the swept values.",
    ]
    md = plan.run_dir / "sweep.md"
    md.write_text("\n".join(lines) + "\n")
    return [*files, md, *plots]


def format_sweep_table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    """A fixed-width text table of the headline columns, for the terminal (no trailing newline)."""
    from dasgd.runs.report import format_value

    columns = [
        *keys,
        "stop_reason",
        "s_avg",
        "s_hat_max",
        "final_accuracy",
        "final_loss",
        "gradients_to_target",
        "time_to_target_s",
    ]
    header = [_HEADERS.get(c, c) for c in columns]
    body = [[format_value(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
