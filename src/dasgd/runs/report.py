"""A readable page (``RUN_DIR/report.md``) and a terminal summary of a finished run.

Both read a run summary as a mapping: ``summary.json`` loaded as a dict (a run directory may come from
another version of dasgd), or the :class:`~dasgd.runs.summary.RunSummary` a run returned. The keys and what
they mean are documented in one place, the fields of :class:`dasgd.runs.summary.RunSummary`; the ones read
here are :data:`SUMMARY_KEYS`. Every key is optional: a missing key, or one of an unexpected type, renders as
``n/a``; rendering never fails on content. Of ``staleness`` the report shows ``s_avg``, ``s_max``,
``loose_avg``, ``loose_max``, and ``anomalies`` when present; of each ``per_worker`` entry ``rank``,
``computed``, ``applied``, ``rejected``, ``sent_messages`` and ``sent_bytes``, and ``evaluation`` (what
evaluating cost the worker that evaluated) in a line under the table and in the terminal summary.

Numbers are formatted by :func:`format_value`: integers in full, other numbers with 4 significant digits.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dasgd.metrics.plots import PLOT_FILES

if TYPE_CHECKING:
    from dasgd.metrics.eventlog import EventLog
    from dasgd.runs.results import OutputOptions

__all__ = [
    "NA",
    "SUMMARY_KEYS",
    "ReportError",
    "format_summary",
    "format_value",
    "rebuild_run_dir",
    "write_report",
]

NA = "n/a"
"""How a missing or unusable value is shown."""

SUMMARY_KEYS: tuple[str, ...] = (
    "task",
    "algorithm",
    "workers",
    "topology",
    "stop_reason",
    "time_unit",
    "wall_time_s",
    "samples_per_s",
    "final_metrics",
    "gradients_computed",
    "gradients_applied",
    "gradients_lost",
    "staleness",
    "replicas_agree",
    "max_replica_diff",
    "per_worker",
)
"""The summary keys the report and the terminal summary read (each a :class:`~dasgd.runs.summary.RunSummary`
field). Adding one is compatible; never rename."""

_PLOT_CAPTIONS: dict[str, str] = {
    "accuracy.png": "Test accuracy",
    "loss.png": "Loss",
    "staleness.png": "Staleness histogram",
    "throughput.png": "Gradients computed per worker",
}

_STALENESS_ROWS: tuple[tuple[str, str], ...] = (
    ("S_avg (average staleness)", "s_avg"),
    ("S_max (maximum staleness)", "s_max"),
    ("S^_avg (average loose staleness)", "loose_avg"),
    ("S^_max (maximum loose staleness)", "loose_max"),
)


# Beyond this many replicas a per-replica list of applied counts stops being readable on one line.
_MAX_LISTED = 8


class ReportError(ValueError):
    """``summary.json`` exists but cannot be read as a JSON object."""


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _is_int(value: Any) -> bool:
    # numbers.Integral covers numpy integers, which an in-memory summary (the CLI's) may hold.
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not _is_bool(value)


def format_value(value: Any) -> str:
    """Render one summary value: ``n/a`` for None or unusable values, yes/no for booleans, integers in full,
    floats with 4 significant digits (integral floats such as ``12.0`` as ``12``), strings as they are."""
    if value is None:
        return NA
    if _is_bool(value):
        return "yes" if value else "no"
    if _is_int(value):
        return str(int(value))
    if _is_real(value):
        value = float(value)
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, str):
        return value if value else NA
    return NA


def _get(mapping: Any, key: str) -> Any:
    return mapping.get(key) if isinstance(mapping, Mapping) else None


def _cell(text: str) -> str:
    # A pipe or newline inside a value would break the Markdown table.
    return text.replace("|", "\\|").replace("\n", " ")


def _loss_key(final: Any) -> str:
    return "loss" if _get(final, "test_loss") is None and _get(final, "loss") is not None else "test_loss"


def _time_unit(summary: Mapping[str, Any]) -> str:
    unit = summary.get("time_unit")
    return unit if unit in ("wall", "virtual") else "wall"


def _applied_text(applied: Any) -> str:
    """Gradients held per replica: one number when all agree, else the range."""
    if not isinstance(applied, list) or not applied or not all(_is_int(a) for a in applied):
        return NA
    low, high = int(min(applied)), int(max(applied))
    if low == high:
        return f"{low} on each of {len(applied)} replicas"
    if len(applied) > _MAX_LISTED:
        return f"{low} to {high} over {len(applied)} replicas"
    return f"{low} to {high} (per replica: {', '.join(str(int(a)) for a in applied)})"


def _agreement_text(summary: Mapping[str, Any]) -> str:
    agree = summary.get("replicas_agree")
    diff = summary.get("max_replica_diff")
    text = format_value(agree) if _is_bool(agree) else NA
    if _is_real(diff):
        text += f" (max difference {format_value(diff)})"
    return text


def _rejected_text(rejected: Any) -> str:
    if not isinstance(rejected, Mapping):
        return NA
    counts = {str(k): int(v) for k, v in rejected.items() if _is_int(v)}
    total = sum(counts.values())
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()) if v)
    return f"{total} ({detail})" if detail else str(total)


def _results_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    final = summary.get("final_metrics")
    loss_key = _loss_key(final)
    staleness = summary.get("staleness")
    unit = _time_unit(summary)
    rows = [
        ("final test accuracy", format_value(_get(final, "test_accuracy"))),
        (f"final {loss_key.replace('_', ' ')}", format_value(_get(final, loss_key))),
    ]
    if isinstance(final, Mapping):
        for key in sorted(final):
            if key not in ("test_accuracy", loss_key):
                rows.append((f"final {key}", format_value(final[key])))
    rows += [
        ("gradients computed", format_value(summary.get("gradients_computed"))),
        ("gradients applied", _applied_text(summary.get("gradients_applied"))),
        ("gradients lost", format_value(summary.get("gradients_lost"))),
    ]
    rows += _death_rows(summary)
    rows += [(label, format_value(_get(staleness, key))) for label, key in _STALENESS_ROWS]
    if _get(staleness, "anomalies") is not None:
        # Nonzero only when clocks of different machines disagree; worth seeing next to the numbers it bends.
        rows.append(("staleness clock anomalies", format_value(_get(staleness, "anomalies"))))
    rows += [
        (f"{unit} time (s)", format_value(summary.get("wall_time_s"))),
        (
            "samples/s" if unit == "wall" else f"samples/s ({unit} time)",
            format_value(summary.get("samples_per_s")),
        ),
        ("replicas agree", _agreement_text(summary)),
    ]
    return rows


def _death_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What the survivors hold of each dead worker's gradients, and survivor groups cut apart (if any)."""
    rows = []
    held = summary.get("dead_gradients_held")
    if isinstance(held, Mapping):
        for dead, by_survivor in sorted(held.items()):
            if isinstance(by_survivor, Mapping) and by_survivor:
                counts = ", ".join(f"{r}: {format_value(c)}" for r, c in sorted(by_survivor.items()))
                rows.append((f"worker {dead} (dead): its gradients held by survivors", counts))
    cut = summary.get("cut_apart")
    if isinstance(cut, list) and cut:
        groups = " | ".join("{" + ", ".join(map(str, g)) + "}" for g in cut if isinstance(g, list))
        rows.append(("survivors cut apart into", groups))
    return rows


def _per_worker_lines(per_worker: Any) -> list[str]:
    if not isinstance(per_worker, list) or not per_worker:
        return [NA]
    lines = [
        "| rank | computed | applied | rejected messages | sent messages | sent bytes |",
        "|---:|---:|---:|---|---:|---:|",
    ]
    for entry in per_worker:
        cells = [
            format_value(_get(entry, "rank")),
            format_value(_get(entry, "computed")),
            format_value(_get(entry, "applied")),
            _rejected_text(_get(entry, "rejected")),
            format_value(_get(entry, "sent_messages")),
            format_value(_get(entry, "sent_bytes")),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    evaluation = _evaluation_text(per_worker)
    if evaluation:
        lines += ["", evaluation[0].upper() + evaluation[1:] + "."]
    return lines


def _evaluation_text(per_worker: Any) -> str:
    """What evaluation cost each worker that evaluated during the run ("" if none reports it)."""
    if not isinstance(per_worker, list):
        return ""
    parts = []
    for entry in per_worker:
        cost = _get(entry, "evaluation")
        if not isinstance(cost, Mapping):
            continue
        share = _get(cost, "eval_cpu_share")
        share_text = f"{100 * share:.0f}% of one core" if isinstance(share, numbers.Real) else NA
        background = _get(cost, "background") is not False
        where = "of snapshots on a background thread" if background else "on its training thread"
        parts.append(
            f"worker {format_value(_get(entry, 'rank'))}: {format_value(_get(cost, 'evaluations'))} "
            f"evaluations {where}, {format_value(_get(cost, 'eval_s'))} s "
            f"({format_value(_get(cost, 'eval_cpu_s'))} CPU s, {share_text} over the training time"
            + (", taken from the cores every worker here shares" if background else "")
            + f"); its training stopped {format_value(_get(cost, 'eval_pause_s'))} s for them"
            + (
                f", and it waited {format_value(_get(cost, 'eval_wait_s'))} s after its drain for the last one"
                if background
                else ""
            )
        )
    return "evaluation: " + "; ".join(parts) if parts else ""


def _plot_lines(run_dir: Path) -> list[str]:
    plots = run_dir / "plots"
    if not plots.is_dir():
        return []
    names = [n for n in PLOT_FILES if (plots / n).is_file()]
    names += sorted(p.name for p in plots.glob("*.png") if p.name not in PLOT_FILES)
    lines: list[str] = []
    for name in names:
        caption = _PLOT_CAPTIONS.get(name, Path(name).stem.replace("_", " "))
        lines += [f"### {caption}", "", f"![{caption}](plots/{name})", ""]
    return lines


def diverged(summary: Mapping[str, Any]) -> bool:
    """Whether the run stopped because a replica diverged (worker/rules.py: NaN/inf, or an exploding loss)."""
    reason = summary.get("stop_reason")
    return isinstance(reason, str) and "diverged" in reason.split(",")


def divergence_point(runs: Sequence[Mapping[str, Any]]) -> str:
    """Where the run diverged, from its "diverged" run events (runs/results.py), in words ("" if none)."""
    parts = []
    for ev in runs:
        if ev.get("event") != "diverged":
            continue
        text = f"worker {ev.get('worker')} at t = {format_value(ev.get('time'))} s"
        if ev.get("gradients") is not None:
            text += f", {format_value(ev.get('gradients'))} gradients"
        if ev.get("metric") is not None:
            text += (
                f", last evaluated {ev['metric'].replace('_', ' ')} {format_value(ev.get('loss'))} "
                f"(first evaluation: {format_value(ev.get('first_loss'))})"
            )
        parts.append(text)
    return "; ".join(parts)


def divergence_advice(summary: Mapping[str, Any]) -> str:
    """What a diverged run tells its user about the stepsize (one paragraph, for the terminal and the report)."""
    n = summary.get("workers")
    lr = summary.get("lr")
    task = summary.get("task") or "TASK"
    n_text = str(n) if _is_int(n) else "n"
    lower = ",".join(f"{float(lr) / d:.3g}" for d in (2, 4, 8)) if _is_real(lr) else "0.01,0.005"
    return (
        f"DASGD applies every gradient at the full stepsize on every replica: with {n_text} workers a replica "
        f"moves about {n_text} times as far per gradient as DDP (or --algorithm sync), which averages {n_text} "
        f"gradients into one step of --lr {format_value(lr)}. A stepsize tuned for DDP is about {n_text}x too "
        f"large here: lower --lr, and choose it by simulation, e.g. `dasgd simulate --task {task} --workers "
        f"{n_text} --sweep lr={lower}` (see docs/stepsize.md)."
    )


def _headline(summary: Mapping[str, Any]) -> str:
    parts = [
        ("task", summary.get("task")),
        ("algorithm", summary.get("algorithm")),
        ("workers", summary.get("workers")),
        ("topology", summary.get("topology")),
        ("stop reason", summary.get("stop_reason")),
    ]
    return " · ".join(f"**{name}** {format_value(value)}" for name, value in parts)


def _read_summary(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(
            f"{path} is not valid JSON ({exc}); rewrite it or delete it and rerun the report"
        ) from exc
    if not isinstance(data, dict):
        raise ReportError(f"{path} must hold a JSON object, got {type(data).__name__}; rewrite it")
    return data


def write_report(
    run_dir: str | os.PathLike[str], *, log: EventLog | None = None, theory: bool = True
) -> Path:
    """Write ``RUN_DIR/report.md`` from ``summary.json`` and the PNG files present in ``RUN_DIR/plots``.

    ``log`` is the run's event log if the caller has read it already (the theory section needs it).
    ``theory`` False leaves the theory section's estimates out (``--no-theory``; it says how to compute them).

    A missing ``summary.json`` gives a report of ``n/a`` values with a note saying so.

    Raises:
        ReportError: ``summary.json`` exists but is not a JSON object.
    """
    run_dir = Path(run_dir)
    summary = _read_summary(run_dir / "summary.json")
    lines = [
        f"# Run report: {format_value(_get(summary, 'task'))} ({format_value(_get(summary, 'algorithm'))})"
    ]
    lines.append("")
    if summary is None:
        lines += ["*summary.json was not found in this run directory; values are shown as n/a.*", ""]
        summary = {}
    lines += [_headline(summary), ""]
    if diverged(summary):
        where = divergence_point(log.runs if log is not None else ())
        lines += [
            "## Diverged",
            "",
            f"**The run stopped because a replica diverged**{': ' + where if where else ''} (the exploding "
            "rule: a NaN/inf loss or gradient, or an evaluated loss above `diverge_factor` times the first "
            "evaluation; the plots mark the point with a dashed red line).",
            "",
            divergence_advice(summary),
            "",
        ]
    lines += ["## Results", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {_cell(label)} | {_cell(value)} |" for label, value in _results_rows(summary)]
    lines += ["", "## Per worker", ""]
    lines += _per_worker_lines(summary.get("per_worker"))
    lines.append("")
    from dasgd.runs.theory_report import report_section  # imports torch: only when a report is written

    if theory:
        lines += report_section(run_dir, log=log)
    else:
        lines += [
            "## Theory",
            "",
            "*Not computed at the end of this run (`--no-theory`): `dasgd theory RUN_DIR` computes it, "
            "and `dasgd report RUN_DIR` adds it here.*",
            "",
        ]
    plot_lines = _plot_lines(run_dir)
    if plot_lines:
        lines += ["## Plots", "", *plot_lines]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    return out


REBUILT = ("metrics.csv", "report.md", "plots")
"""What :func:`rebuild_run_dir` rewrites in a run directory."""


def rebuild_run_dir(
    run_dir: str | os.PathLike[str], *, options: OutputOptions | None = None
) -> list[Path]:
    """Rebuild ``metrics.csv``, ``plots/`` and ``report.md`` of a run directory from ``events.jsonl`` and
    ``summary.json`` (``dasgd report``); return those paths. ``options`` (default: plots and the theory
    section) may skip the plots or the theory's estimates, or add ``tensorboard/``: a run that skipped
    them at its end (``--no-plots``, ``--no-theory``) gets them here.

    All or nothing: the inputs are read and checked before anything is written, and the old outputs are kept
    aside until the new ones are all written (put back if writing fails), so good outputs are never replaced
    by worse ones.

    Raises:
        ReportError: ``events.jsonl`` is missing, not UTF-8 text, not a valid event log (corrupt, truncated,
            binary) or holds no gradient and no evaluation; ``summary.json`` exists but is not a JSON object.
    """
    import shutil
    import tempfile

    from dasgd.metrics.eventlog import EventLogError, read_event_log
    from dasgd.runs.results import OutputOptions, render_run_dir

    options = options or OutputOptions()
    rebuilt = REBUILT + (("tensorboard",) if options.tensorboard else ())
    run_dir = Path(run_dir)
    events = run_dir / "events.jsonl"
    kept = "the run directory was left as it was"
    if not events.is_file():
        raise ReportError(f"{run_dir} has no events.jsonl; give a run directory written by `dasgd train`")
    try:
        log = read_event_log(events)
    except EventLogError as exc:
        raise ReportError(f"{exc}; {kept}") from None
    except UnicodeDecodeError:
        raise ReportError(f"{events} is not UTF-8 text (a binary or damaged file); {kept}") from None
    except OSError as exc:
        raise ReportError(f"cannot read {events}: {(exc.strerror or str(exc)).lower()}; {kept}") from None
    if log.num_gradients == 0 and not log.evals:
        raise ReportError(f"{events} holds no gradient and no evaluation: nothing to report; {kept}")
    _read_summary(run_dir / "summary.json")  # a damaged summary.json is refused before anything is written
    aside = Path(tempfile.mkdtemp(prefix=".dasgd-report-", dir=run_dir))
    try:
        for name in rebuilt:
            old = run_dir / name
            if old.is_dir():
                shutil.copytree(old, aside / name)
            elif old.exists():
                shutil.copy2(old, aside / name)
        try:
            render_run_dir(run_dir, log=log, options=options)
        except BaseException:
            for name in rebuilt:
                new, old = run_dir / name, aside / name
                if new.is_dir() and not new.is_symlink():
                    shutil.rmtree(new, ignore_errors=True)
                elif new.exists():
                    new.unlink()
                if old.exists():
                    old.rename(new)
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return [run_dir / name for name in rebuilt]


def format_summary(summary: Mapping[str, Any]) -> str:
    """The few lines the CLI prints when a run ends (no trailing newline)."""
    final = summary.get("final_metrics")
    staleness = summary.get("staleness")
    unit = _time_unit(summary)
    loss_key = _loss_key(final)
    head = (
        f"{format_value(summary.get('task'))} / {format_value(summary.get('algorithm'))}: "
        f"{format_value(summary.get('workers'))} workers, topology {format_value(summary.get('topology'))}, "
        f"stopped by {format_value(summary.get('stop_reason'))}"
    )
    grads = (
        f"gradients: {format_value(summary.get('gradients_computed'))} computed, "
        f"applied {_applied_text(summary.get('gradients_applied'))}, "
        f"{format_value(summary.get('gradients_lost'))} lost; replicas agree: {_agreement_text(summary)}"
    )
    stale = "staleness: " + ", ".join(
        f"{label.split(' ')[0]} {format_value(_get(staleness, key))}" for label, key in _STALENESS_ROWS
    )
    result = (
        f"final: test accuracy {format_value(_get(final, 'test_accuracy'))}, "
        f"{loss_key.replace('_', ' ')} {format_value(_get(final, loss_key))}; "
        f"{format_value(summary.get('wall_time_s'))} s ({unit}), "
        f"{format_value(summary.get('samples_per_s'))} samples/s"
    )
    evaluation = _evaluation_text(summary.get("per_worker"))
    return "\n".join([head, grads, stale, result, *([evaluation] if evaluation else [])])
