"""Compare algorithms on one workload: `dasgd compare SPEC --algorithms dasgd,sync,ps-asgd,...`.

A comparison is one base spec (task, workers, stragglers, stepsize, budget, ...) run once per algorithm and
seed, everything else equal. Each run is a full run directory (``OUT/<algorithm>/``, or
``OUT/<algorithm>/seed-<s>/`` when several seeds are given), by real worker processes or, with
``simulate=True``, in the simulator (virtual time). The comparison then writes into ``OUT``:

``compare.csv``       one row per algorithm (:data:`COMPARE_COLUMNS`)
``compare_runs.csv``  one row per run (:data:`RUN_COLUMNS`), rewritten after every run
``compare.md``        the table, with the setup and a link to every run's report
``report.md``         which algorithm reached the target first and by what ratio over each other one
``plots/*.png``       test accuracy (or loss) against time and against gradients computed, one line per run
``compare.yaml``      the plan: algorithms, seeds, mode and the base spec

Resume: a run whose directory already holds ``summary.json`` and ``report.md`` and whose ``spec.yaml``
resolves to the same spec is read back, not run again (:func:`dasgd.runs.sweep.finished_summary`);
any other run, including one interrupted half-way, is run again from the start. So an interrupted comparison restarts
with the same command and the same ``OUT``.

Aggregation over seeds: each column of an algorithm's row is the median over its finished runs. For time
and gradients to target, a run that never reached the target counts as infinitely slow, so the median is
"not reached" when half or more of the runs missed it. The median is monotone in every value, so replacing
each missed run's unknown time by its whole training time gives a lower bound on that median
(``time_to_target_at_least_s``): the report's "more than Nx" ratios come from it.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dasgd.experiments.spec import RunSpec, SpecError, flag_name, resolve_spec
from dasgd.runs.sweep import csv_cell, finished_summary, loss_to_target

__all__ = [
    "COMPARE_COLUMNS",
    "RUN_COLUMNS",
    "CompareOutcome",
    "ComparePlan",
    "CompareRun",
    "Verdict",
    "aggregate_rows",
    "compare_verdict",
    "format_compare_table",
    "parse_algorithms",
    "parse_seeds",
    "plan_comparison",
    "run_comparison",
    "run_row",
    "write_compare_outputs",
]

_METRICS: tuple[str, ...] = (
    "time_to_target_s",
    "gradients_to_target",
    "final_accuracy",
    "final_loss",
    "samples_per_s",
    "s_avg",
    "s_hat_max",
    "bytes_sent_per_worker",
    "gradients_computed",
    "train_time_s",
    "gradients_lost",
)

RUN_COLUMNS: tuple[str, ...] = ("algorithm", "seed", "status", *_METRICS, "run_dir", "error")
"""Columns of ``compare_runs.csv``: one row per run; ``status`` is ran, reused or failed."""

COMPARE_COLUMNS: tuple[str, ...] = (
    "algorithm",
    "runs",
    "failed",
    "reached",
    *_METRICS,
    "time_to_target_at_least_s",
    "gradients_to_target_at_least",
)
"""Columns of ``compare.csv``: one row per algorithm, medians over its finished runs (module docstring).

``reached`` counts the runs that reached the target (empty when no target is set); the ``*_at_least``
columns are set only when the median run did not reach it. Times are in the runs' time unit (wall seconds,
or virtual seconds in a simulated comparison); ``train_time_s`` is the training phase of each run."""

_HEADERS: dict[str, str] = {
    "algorithm": "algorithm",
    "runs": "runs",
    "reached": "reached target",
    "time_to_target_s": "time to target (s)",
    "gradients_to_target": "gradients to target",
    "final_accuracy": "final test accuracy",
    "final_loss": "final loss",
    "samples_per_s": "samples/s",
    "s_avg": "S_avg",
    "s_hat_max": "S^_max",
    "bytes_sent_per_worker": "bytes sent per worker",
}
# The columns of the markdown and terminal tables (the CSV holds them all).
_TABLE: tuple[str, ...] = tuple(_HEADERS)


def parse_algorithms(text: str | Sequence[str], known: Iterable[str] | None = None) -> tuple[str, ...]:
    """``"dasgd,sync"`` (or a list of names, each possibly comma-separated) -> ``("dasgd", "sync")``.

    Args:
        text: the ``--algorithms`` value(s).
        known: the valid names (default: the registry, :data:`dasgd.algorithms.ALGORITHMS`).

    Raises:
        SpecError: (naming ``--algorithms``) no name, an empty name, a name given twice, or an unknown name;
            the message lists the valid names.
    """
    if known is None:
        from dasgd.algorithms import ALGORITHMS

        known = ALGORITHMS
    valid = list(known)
    parts = [text] if isinstance(text, str) else list(text)
    names = [name.strip() for part in parts for name in str(part).split(",")]
    if not names or any(not name for name in names):
        raise SpecError(
            "--algorithms", f"give comma-separated algorithm names, e.g. {','.join(valid[:3]) or 'dasgd'}"
        )
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise SpecError(
            "--algorithms",
            f"unknown algorithm {unknown[0]!r}; choose from: {', '.join(valid)}",
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SpecError("--algorithms", f"{repeated[0]!r} is named twice; give each algorithm once")
    return tuple(names)


def parse_seeds(values: int | str | Sequence[int | str]) -> tuple[int, ...]:
    """Seeds from ``--seeds 0 1 2``, ``--seeds 0,1,2`` or a list of ints.

    Raises:
        SpecError: (naming ``--seeds``) nothing given, a value that is not a non-negative integer, or a
            seed given twice.
    """
    items = [values] if isinstance(values, (int, str)) else list(values)
    texts = [t.strip() for item in items for t in str(item).split(",")]
    if not texts or any(not t for t in texts):
        raise SpecError("--seeds", "give one or more non-negative integers, e.g. --seeds 0 1 2")
    seeds: list[int] = []
    for t in texts:
        if not (t.isascii() and t.isdigit()):
            raise SpecError("--seeds", f"{t!r} is not a non-negative integer; write e.g. --seeds 0 1 2")
        seeds.append(int(t))
    if len(set(seeds)) != len(seeds):
        raise SpecError("--seeds", "a seed is given twice; give each seed once")
    return tuple(seeds)


@dataclass(frozen=True)
class CompareRun:
    """One run of the comparison: an algorithm, a seed, and its fully resolved spec (``run_dir`` set)."""

    algorithm: str
    seed: int
    spec: RunSpec
    label: str
    """How the run is named in progress lines: the algorithm, and its seed when several are compared."""

    @property
    def run_dir(self) -> Path:
        """The run's own directory."""
        return Path(str(self.spec.run_dir))


@dataclass(frozen=True)
class ComparePlan:
    """A validated comparison: the base spec, the algorithms and seeds, and every run's spec."""

    out_dir: Path
    base: RunSpec
    algorithms: tuple[str, ...]
    seeds: tuple[int, ...]
    simulate: bool
    runs: tuple[CompareRun, ...]
    target_loss: float | None = None

    @property
    def time_unit(self) -> str:
        """``"virtual"`` for a simulated comparison, else ``"wall"``."""
        return "virtual" if self.simulate else "wall"

    @property
    def has_target(self) -> bool:
        """Whether a target (accuracy or loss) is set, so that times to target are measured."""
        return self.target_loss is not None or self.base.target_accuracy is not None

    def target_text(self) -> str:
        """The target in words, e.g. ``test accuracy >= 0.9``."""
        if self.target_loss is not None:
            return f"loss <= {self.target_loss:g}"
        if self.base.target_accuracy is not None:
            return f"test accuracy >= {self.base.target_accuracy:g}"
        return "none"


@dataclass
class CompareOutcome:
    """Rows per run (plan order) and per algorithm, which runs ran, were reused or failed, files written."""

    run_rows: list[dict[str, Any]]
    rows: list[dict[str, Any]] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def plan_comparison(
    values: Mapping[str, Any],
    overrides: Mapping[str, Any],
    algorithms: str | Sequence[str],
    out_dir: str | Path,
    *,
    seeds: Sequence[int] | None = None,
    simulate: bool = False,
    target_loss: float | None = None,
) -> ComparePlan:
    """Validate a comparison and resolve every run's spec.

    Args:
        values: the spec file's values (``load_spec_file``), or ``{}``; an ``algorithm`` key there is
            replaced by each compared algorithm.
        overrides: keyword overrides for ``resolve_spec`` (the train flags; ``simulation`` a mapping of
            simulation keys). They must not set ``algorithm``, ``seed`` together with ``seeds``, or
            ``run_dir``: the comparison sets those per run.
        algorithms: the names to compare, in table order: a list, or ``"a,b"`` (:func:`parse_algorithms`).
        out_dir: the comparison's directory.
        seeds: run every algorithm once per seed (default: the spec's seed).
        simulate: run in the simulator (virtual time) instead of real worker processes.
        target_loss: also measure time and gradients until the evaluated loss first reaches this (not a
            stop rule); excludes a target accuracy.

    Raises:
        SpecError: a bad base spec (naming its flag), an unknown algorithm, bad seeds or a bad target.
    """
    from dasgd.runs.build import resolve

    names = parse_algorithms(algorithms)
    overrides = dict(overrides)
    for key, flag in (("algorithm", "--algorithm"), ("run_dir", "--run-dir")):
        if overrides.get(key) is not None:
            raise SpecError(
                flag,
                "the comparison sets it for every run; give the algorithms with --algorithms and the "
                "output directory with --out",
            )
    if seeds is not None and overrides.get("seed") is not None:
        raise SpecError("--seeds", "give the seeds either with --seeds or with --seed, not both")
    overrides.pop("algorithm", None)
    overrides.pop("run_dir", None)
    base = resolve_spec(dict(values), simulate=simulate, **{**overrides, "algorithm": names[0]})
    if target_loss is not None:
        if not (math.isfinite(target_loss) and target_loss > 0):
            raise SpecError("--target-loss", f"{target_loss:g}: give a positive loss, e.g. 0.05")
        if base.target_accuracy is not None:
            raise SpecError(
                "--target-loss", "give either --target-accuracy or --target-loss as the target, not both"
            )
    seed_list = parse_seeds(list(seeds)) if seeds is not None else (base.seed,)
    out = Path(out_dir)
    runs: list[CompareRun] = []
    for name in names:
        for seed in seed_list:
            run_dir = out / name if len(seed_list) == 1 else out / name / f"seed-{seed}"
            spec = resolve_spec(
                dict(values),
                simulate=simulate,
                **{**overrides, "algorithm": name, "seed": seed, "run_dir": str(run_dir)},
            )
            resolve(spec)  # the topology for this many workers
            label = name if len(seed_list) == 1 else f"{name} seed {seed}"
            runs.append(CompareRun(name, seed, spec, label))
    return ComparePlan(out, base, names, seed_list, simulate, tuple(runs), target_loss)


def _number(value: Any) -> int | float | None:
    """A finite int or float as it is (counts stay integers); anything else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(float(value)) else None


def run_row(run: CompareRun, summary: Mapping[str, Any], target_loss: float | None = None) -> dict[str, Any]:
    """The table row of one finished run, from its summary (and, for a loss target, its event log).

    ``bytes_sent_per_worker`` is the mean of ``per_worker[].sent_bytes`` over the workers that finished;
    ``final_accuracy`` and ``final_loss`` come from the end-of-run evaluation (``test_loss``, else
    ``loss``); ``train_time_s`` is the training phase (``wall_time_s``, in the run's time unit).
    """
    staleness = summary.get("staleness") or {}
    final = summary.get("final_metrics") or {}
    sent = [
        float(w["sent_bytes"])
        for w in summary.get("per_worker") or []
        if _number(w.get("sent_bytes")) is not None
    ]
    if target_loss is not None:
        from dasgd.metrics.eventlog import read_event_log

        grads, when = loss_to_target(
            read_event_log(run.run_dir / "events.jsonl", clocks=False).evals, target_loss
        )
    else:
        grads, when = summary.get("gradients_to_target"), summary.get("time_to_target_s")
    return {
        "algorithm": run.algorithm,
        "seed": run.seed,
        "time_to_target_s": when,
        "gradients_to_target": grads,
        "final_accuracy": final.get("test_accuracy"),
        "final_loss": final.get("test_loss", final.get("loss")),
        "samples_per_s": summary.get("samples_per_s"),
        "s_avg": staleness.get("s_avg"),
        "s_hat_max": staleness.get("loose_max"),
        "bytes_sent_per_worker": sum(sent) / len(sent) if sent else None,
        "gradients_computed": summary.get("gradients_computed"),
        "train_time_s": summary.get("wall_time_s"),
        "gradients_lost": summary.get("gradients_lost"),
        "run_dir": str(run.run_dir),
    }


def _median_of(values: Sequence[int | float]) -> int | float:
    med = statistics.median(values)
    # Counts (gradients, lost) stay integers unless two middle values average to a fraction.
    if all(isinstance(v, int) or v == math.inf for v in values) and math.isfinite(med) and med == int(med):
        return int(med)
    return float(med)


def _median(values: Sequence[int | float | None]) -> int | float | None:
    present = [v for v in values if v is not None]
    return _median_of(present) if present else None


def _median_to_target(
    hits: Sequence[int | float | None], bounds: Sequence[int | float | None]
) -> tuple[int | float | None, int | float | None]:
    """(the median, a miss counting as infinity; else None and a lower bound on that median).

    The bound replaces each miss by its bound (what the run spent without reaching the target); it is None
    when some bound is unknown.
    """
    if not hits:
        return None, None
    med = _median_of([math.inf if h is None else h for h in hits])
    if math.isfinite(med):
        return med, None
    filled = [h if h is not None else b for h, b in zip(hits, bounds)]
    if any(f is None for f in filled):
        return None, None
    return None, _median(filled)


def aggregate_rows(
    run_rows: Sequence[Mapping[str, Any]], algorithms: Sequence[str], has_target: bool
) -> list[dict[str, Any]]:
    """One row per algorithm (in ``algorithms`` order) from the per-run rows: medians over finished runs.

    A run row whose ``status`` is ``failed`` counts in ``failed`` only. With a target, a run that did not
    reach it counts as infinitely slow (see the module docstring); without one, the to-target columns and
    ``reached`` are None.
    """
    rows: list[dict[str, Any]] = []
    for name in algorithms:
        mine = [r for r in run_rows if r.get("algorithm") == name]
        done = [r for r in mine if r.get("status") != "failed"]
        row: dict[str, Any] = {
            "algorithm": name,
            "runs": len(done),
            "failed": len(mine) - len(done),
            "reached": None,
            "time_to_target_at_least_s": None,
            "gradients_to_target_at_least": None,
        }
        for key in _METRICS:
            row[key] = _median([_number(r.get(key)) for r in done])
        if has_target:
            times = [_number(r.get("time_to_target_s")) for r in done]
            grads = [_number(r.get("gradients_to_target")) for r in done]
            row["reached"] = sum(t is not None for t in times)
            row["time_to_target_s"], row["time_to_target_at_least_s"] = _median_to_target(
                times, [_number(r.get("train_time_s")) for r in done]
            )
            row["gradients_to_target"], row["gradients_to_target_at_least"] = _median_to_target(
                grads, [_number(r.get("gradients_computed")) for r in done]
            )
        else:
            row["time_to_target_s"] = row["gradients_to_target"] = None
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Verdict:
    """Who reached the target first, and each other algorithm's time over the winner's.

    ``ratios[name]`` is that algorithm's time to target divided by the winner's (>= 1); ``at_least[name]``
    is a lower bound on that ratio for an algorithm that did not reach the target (its training time over
    the winner's time); ``failed`` lists algorithms without a finished run. ``lines`` is the report text.
    """

    winner: str | None
    ratios: dict[str, float]
    at_least: dict[str, float]
    failed: tuple[str, ...]
    lines: tuple[str, ...]


def _fmt(value: Any) -> str:
    from dasgd.runs.report import format_value

    return format_value(value)


def compare_verdict(
    rows: Sequence[Mapping[str, Any]], *, has_target: bool, target_text: str, time_unit: str
) -> Verdict:
    """The report's answer, computed from the per-algorithm rows alone."""
    unit = "virtual s" if time_unit == "virtual" else "s"
    failed = tuple(r["algorithm"] for r in rows if not r.get("runs"))
    finished = [r for r in rows if r.get("runs")]
    lines: list[str] = []
    if not has_target:
        lines.append(
            "No target was set, so no algorithm can be said to reach one first. Give --target-accuracy "
            "(classification tasks) or --target-loss to measure time and gradients to a target."
        )
        best = [r for r in finished if _number(r.get("final_accuracy")) is not None]
        if best:
            top = max(best, key=lambda r: float(r["final_accuracy"]))
            lines.append(
                f"Highest final test accuracy: **{top['algorithm']}** ({_fmt(top['final_accuracy'])})."
            )
        lines += [f"{name}: no run finished (see compare_runs.csv for the error)." for name in failed]
        return Verdict(None, {}, {}, failed, tuple(lines))
    reached = [r for r in finished if _number(r.get("time_to_target_s")) is not None]
    if not reached:
        lines.append(
            f"No algorithm reached the target ({target_text}) within the budget. Raise the budget "
            "(--max-seconds, --max-gradients) or lower the target."
        )
        lines += [f"{name}: no run finished (see compare_runs.csv for the error)." for name in failed]
        return Verdict(None, {}, {}, failed, tuple(lines))
    win = min(reached, key=lambda r: float(r["time_to_target_s"]))  # first in table order on a tie
    t_win = float(win["time_to_target_s"])
    winner = str(win["algorithm"])
    first = " first" if len(finished) > 1 else ""
    lines.append(
        f"**{win['algorithm']}** reached the target ({target_text}){first}: {_fmt(t_win)} {unit}, "
        f"{_fmt(win.get('gradients_to_target'))} gradients."
    )
    ratios: dict[str, float] = {}
    at_least: dict[str, float] = {}
    for r in finished:
        name = r["algorithm"]
        if name == win["algorithm"]:
            continue
        t = _number(r.get("time_to_target_s"))
        if t is not None:
            ratios[name] = t / t_win if t_win > 0 else math.inf
            lines.append(
                f"- {name}: {_fmt(ratios[name])}x {winner}'s time ({_fmt(t)} {unit}, "
                f"{_fmt(r.get('gradients_to_target'))} gradients)."
            )
            continue
        bound = _number(r.get("time_to_target_at_least_s"))
        if bound is not None and t_win > 0:
            at_least[name] = bound / t_win
            lines.append(
                f"- {name}: did not reach the target in the {_fmt(bound)} {unit} it trained, so more than "
                f"{_fmt(at_least[name])}x {winner}'s time."
            )
        else:
            lines.append(f"- {name}: did not reach the target.")
    lines += [f"- {name}: no run finished (see compare_runs.csv for the error)." for name in failed]
    return Verdict(winner, ratios, at_least, failed, tuple(lines))


def _reached_cell(row: Mapping[str, Any]) -> str:
    if row.get("reached") is None:
        return "n/a"
    return f"{row['reached']}/{row.get('runs', 0)}"


def _time_cell(row: Mapping[str, Any], key: str, bound_key: str) -> str:
    value = row.get(key)
    if value is not None:
        return _fmt(value)
    bound = row.get(bound_key)
    return f"not reached (> {_fmt(bound)})" if bound is not None else "n/a"


def _cells(row: Mapping[str, Any]) -> list[str]:
    cells = []
    for key in _TABLE:
        if key == "reached":
            cells.append(_reached_cell(row))
        elif key == "time_to_target_s":
            cells.append(_time_cell(row, key, "time_to_target_at_least_s"))
        elif key == "gradients_to_target":
            cells.append(_time_cell(row, key, "gradients_to_target_at_least"))
        elif key == "algorithm":
            cells.append(str(row["algorithm"]) + (" (failed)" if not row.get("runs") else ""))
        else:
            cells.append(_fmt(row.get(key)))
    return cells


def format_compare_table(rows: Sequence[Mapping[str, Any]], time_unit: str = "wall") -> str:
    """A fixed-width text table of the per-algorithm rows, for the terminal (no trailing newline)."""
    header = [_HEADERS[k] for k in _TABLE]
    header[_TABLE.index("time_to_target_s")] = (
        f"time to target ({'virtual s' if time_unit == 'virtual' else 's'})"
    )
    body = [_cells(r) for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def _markdown_table(plan: ComparePlan, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    unit = "virtual s" if plan.simulate else "wall s"
    header = [_HEADERS[k] for k in _TABLE] + ["run"]
    header[_TABLE.index("time_to_target_s")] = f"time to target ({unit})"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        dirs = [r for r in plan.runs if r.algorithm == row["algorithm"]]
        links = ", ".join(
            f"[{'report' if len(dirs) == 1 else f'seed {r.seed}'}]"
            f"({r.run_dir.relative_to(plan.out_dir).as_posix()}/report.md)"
            for r in dirs
        )
        cells = [*_cells(row), links]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def _setup_lines(plan: ComparePlan) -> list[str]:
    base = plan.base
    mode = (
        "simulated (virtual time; the simulator's compute and network models)"
        if plan.simulate
        else "real worker processes on this machine (wall time)"
    )
    stragglers = ", ".join(f"worker {r} {f:g}x slower" for r, f in base.stragglers) or "none"
    budget = ", ".join(f"{flag_name(k)} {v:g}" for k, v in base.stop_rules().items())
    seeds = ", ".join(str(s) for s in plan.seeds)
    return [
        f"Task {base.task}, {base.workers} workers, topology {base.topology}, stragglers: {stragglers}.",
        f"Runs: {mode}; seed(s) {seeds}; stop rules (every run): {budget}; target: {plan.target_text()}.",
        f"Evaluation every {base.evaluation_interval(simulated=plan.simulate):g} "
        f"{'virtual ' if plan.simulate else ''}s on worker 0's replica: that is the resolution of the "
        "times to target.",
    ]


_COLUMN_NOTES = (
    "Columns: time and gradients to target are those of the first evaluation that reached the target "
    "(median over seeds; a run that missed it counts as never, and `> X` is a lower bound: the median's "
    "training time); gradients to target are the gradients the evaluated replica held then. "
    "Final test accuracy and loss are the end-of-run evaluation on the whole test set. samples/s counts "
    "every worker's mini-batches over the training phase. S_avg and S^_max are the average staleness and "
    "the maximum loose staleness of the run (docs/staleness.md). Bytes sent per worker is the mean over "
    "workers of the bytes each one sent."
)


def _plan_yaml(plan: ComparePlan) -> str:
    base = plan.base.to_dict()
    base["run_dir"] = None
    base["algorithm"] = None
    data = {
        "algorithms": list(plan.algorithms),
        "seeds": list(plan.seeds),
        "simulate": plan.simulate,
        "target_loss": plan.target_loss,
        "base": base,
    }
    return yaml.safe_dump(data, sort_keys=False)


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([csv_cell(row.get(c)) for c in columns])
    return path


def write_compare_outputs(
    plan: ComparePlan, run_rows: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]
) -> list[Path]:
    """Write ``compare.csv``, ``compare_runs.csv``, ``compare.md``, ``plots/*.png`` and ``report.md``."""
    from dasgd.metrics.compare_plots import plot_comparison

    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    files = [
        _write_csv(out / "compare.csv", COMPARE_COLUMNS, rows),
        _write_csv(out / "compare_runs.csv", RUN_COLUMNS, run_rows),
    ]
    finished = {(r["algorithm"], r["seed"]) for r in run_rows if r.get("status") != "failed"}
    curves = [(run.algorithm, run.run_dir) for run in plan.runs if (run.algorithm, run.seed) in finished]
    plots = plot_comparison(
        curves,
        out / "plots",
        time_label="virtual time (s)" if plan.simulate else "wall time (s)",
        target_accuracy=plan.base.target_accuracy,
        target_loss=plan.target_loss,
        title=f"{plan.base.task}, {plan.base.workers} workers",
    )
    title = f"Comparison: {', '.join(plan.algorithms)} on {plan.base.task}"
    table = _markdown_table(plan, rows)
    md = [
        f"# {title}",
        "",
        *_setup_lines(plan),
        "",
        *table,
        "",
        _COLUMN_NOTES,
        "",
        "Per-run rows: `compare_runs.csv`; the plan: `compare.yaml`; the verdict and plots: `report.md`.",
    ]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    verdict = compare_verdict(
        rows, has_target=plan.has_target, target_text=plan.target_text(), time_unit=plan.time_unit
    )
    report = [f"# {title}", "", *_setup_lines(plan), "", "## Result", "", *verdict.lines, ""]
    report += ["## Table", "", *table, "", _COLUMN_NOTES, ""]
    if plots:
        report += ["## Plots", ""]
        report += [f"![{p.stem}](plots/{p.name})" for p in plots]
        report.append("")
    failed = [r for r in run_rows if r.get("status") == "failed"]
    if failed:
        report += ["## Failed runs", ""]
        report += [f"- {r['algorithm']} seed {r['seed']}: {r.get('error', '')}" for r in failed]
        report.append("")
    (out / "report.md").write_text("\n".join(report))
    return [*files, out / "compare.md", *plots, out / "report.md"]


def _clear_markers(run_dir: Path) -> None:
    # An unfinished directory may still hold the summary and report of an older run with another spec; a
    # rerun that stopped early would otherwise leave them next to the new spec.yaml and be taken as done.
    for name in ("summary.json", "report.md"):
        (run_dir / name).unlink(missing_ok=True)


def _default_runner(simulate: bool) -> Callable[[RunSpec, Path], Mapping[str, Any]]:
    if simulate:
        from dasgd.runs.simulate import simulate as run_simulated

        return run_simulated
    from dasgd.runs.launcher import launch_local

    return launch_local


def run_comparison(
    plan: ComparePlan,
    run_one: Callable[[RunSpec, Path], Mapping[str, Any]] | None = None,
    on_run: Callable[[CompareRun, int, int, str], None] | None = None,
) -> CompareOutcome:
    """Run every run not already finished, then write the comparison's tables, plots and report.

    Args:
        plan: from :func:`plan_comparison`.
        run_one: runs one spec into its run directory and returns its summary (default: real worker
            processes, :func:`dasgd.runs.launcher.launch_local`, or the simulator when ``plan.simulate``).
        on_run: called as ``on_run(run, i, n, status)`` (``i`` counts from 1) with status ``"running"``
            before each run and ``"ran"``, ``"reused"`` or ``"failed"`` after it.

    A run that raises an ``Exception`` is recorded as failed (its message in the ``error`` column) and the
    comparison goes on; rerunning the comparison retries it. ``KeyboardInterrupt`` stops the comparison.
    """
    runner = run_one if run_one is not None else _default_runner(plan.simulate)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    (plan.out_dir / "compare.yaml").write_text(_plan_yaml(plan))
    outcome = CompareOutcome(run_rows=[])
    total = len(plan.runs)
    for i, run in enumerate(plan.runs, start=1):
        if on_run is not None:
            on_run(run, i, total, "running")
        summary: Mapping[str, Any] | None = finished_summary(run.run_dir, run.spec)
        status = "reused"
        error = ""
        if summary is None:
            _clear_markers(run.run_dir)
            try:
                # A RunSummary: the row reads it through its mapping, as it reads a reused run's file.
                summary = runner(run.spec, run.run_dir)
                status = "ran"
            except Exception as exc:  # one failed algorithm must not lose the others' results
                status, error = "failed", f"{type(exc).__name__}: {exc}"
        if status == "failed":
            row: dict[str, Any] = {"algorithm": run.algorithm, "seed": run.seed, "run_dir": str(run.run_dir)}
            outcome.failed.append(run.label)
        else:
            row = run_row(run, summary or {}, plan.target_loss)
            (outcome.ran if status == "ran" else outcome.reused).append(run.label)
        row.update(status=status, error=error)
        outcome.run_rows.append(row)
        # The rows so far, so a long comparison's finished runs can be read before it ends.
        _write_csv(plan.out_dir / "compare_runs.csv", RUN_COLUMNS, outcome.run_rows)
        if on_run is not None:
            on_run(run, i, total, status)
    outcome.rows = aggregate_rows(outcome.run_rows, plan.algorithms, plan.has_target)
    outcome.files = write_compare_outputs(plan, outcome.run_rows, outcome.rows)
    return outcome
