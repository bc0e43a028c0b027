"""Overlay figures of a comparison: one line per run, every algorithm on the same axes.

Two files, drawn from each run's ``events.jsonl`` alone (so they can be regenerated later):

``<metric>_vs_time.png``       the metric against wall (or virtual) time since the run started
``<metric>_vs_gradients.png``  the metric against the gradients computed by all workers by then

``<metric>`` is ``accuracy`` (``test_accuracy``) when any run reports it and no loss target is given, else
``loss`` (``test_loss``, or the quadratic's ``loss``). Gradients computed at an evaluation at time t are the
run's gradient events that ended by t, over every worker: the work spent, which is the fair x axis across
algorithms (a synchronous step and a parameter server's applied gradient count alike). The lines hold the
evaluations made during training. The end-of-run evaluation is left out: it is made on the whole test set
(the periodic ones on a subset), after the end-of-run drain, whose length would stretch the time axis; the
comparison's table has it. Runs of one algorithm share a colour and one legend entry. A target, when given,
is a dashed line.

Figures use an Agg canvas and never ``matplotlib.pyplot`` (see :mod:`dasgd.metrics.plots` for why).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dasgd.metrics.eventlog import EventLog, read_event_log

__all__ = ["Curve", "comparison_figure", "comparison_figures", "curve_of", "pick_metric", "plot_comparison"]

_DPI = 110
_LABELS = {
    "test_accuracy": "test accuracy",
    "test_loss": "test loss",
    "loss": "loss (f(x) - f*)",
}


@dataclass(frozen=True)
class Curve:
    """One run's evaluations of one metric.

    Attributes:
        label: the legend entry (the algorithm).
        time: evaluation times during training, sorted.
        gradients: gradients computed by all workers by each of those times.
        value: the metric at each evaluation.
    """

    label: str
    time: np.ndarray
    gradients: np.ndarray
    value: np.ndarray


def pick_metric(logs: Sequence[EventLog], prefer_loss: bool = False) -> str:
    """``test_accuracy`` if any log reports it, else ``test_loss``, else ``loss``; loss first if asked."""
    names = {name for log in logs for name in log.metric_names()}
    order = ("test_loss", "loss", "test_accuracy") if prefer_loss else ("test_accuracy", "test_loss", "loss")
    for metric in order:
        if metric in names:
            return metric
    return order[0]


def curve_of(log: EventLog, metric: str, label: str) -> Curve:
    """The curve of ``metric`` in one run's event log: its evaluations during training that report a finite
    value, sorted by time (the end-of-run evaluation, marked ``final``, is left out)."""
    ends = np.sort(np.asarray(log.end, dtype=np.float64))
    points: list[tuple[float, float, float]] = []
    for ev in log.evals:
        raw = ev.get(metric)
        if ev.get("final") or raw is None or not math.isfinite(float(raw)):
            continue
        t = float(ev["time"])
        # A log without gradient events still plots, against the gradients the replica held.
        done = float(np.searchsorted(ends, t, side="right")) if ends.size else float(ev["gradients"])
        points.append((t, done, float(raw)))
    points.sort()
    columns = np.array(points, dtype=np.float64).reshape(-1, 3)
    return Curve(label, columns[:, 0], columns[:, 1], columns[:, 2])


def comparison_figure(
    curves: Sequence[Curve],
    x: str,
    *,
    metric: str,
    x_label: str,
    target: float | None = None,
    title: str = "",
) -> Figure:
    """One overlay figure: every curve's metric against ``x`` (``"time"`` or ``"gradients"``)."""
    if x not in ("time", "gradients"):
        raise ValueError(f"x must be 'time' or 'gradients', got {x!r}")
    fig = Figure(figsize=(7.5, 4.8), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours: dict[str, str] = {}
    for curve in curves:
        first = curve.label not in colours
        colour = colours.setdefault(curve.label, f"C{len(colours) % 10}")
        xs = curve.time if x == "time" else curve.gradients
        ax.plot(
            xs,
            curve.value,
            color=colour,
            linewidth=1.4,
            marker="." if xs.size < 40 else None,
            label=curve.label if first else None,
        )
    if target is not None:
        ax.axhline(target, color="0.35", linestyle="--", linewidth=1.0, label=f"target {target:g}")
    if not any(c.value.size for c in curves):
        ax.text(
            0.5,
            0.5,
            "no evaluation reports this metric",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="0.4",
        )
    ax.set_xlabel(x_label)
    ax.set_ylabel(_LABELS.get(metric, metric))
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return fig


def comparison_figures(
    runs: Sequence[tuple[str, str | os.PathLike[str]]],
    *,
    time_label: str = "wall time (s)",
    target_accuracy: float | None = None,
    target_loss: float | None = None,
    title: str = "",
) -> dict[str, Figure]:
    """The two overlay figures :func:`plot_comparison` writes, by file name (none when no run has a log).

    Arguments as for :func:`plot_comparison`.
    """
    logs = [
        (label, read_event_log(Path(d) / "events.jsonl", clocks=False))  # times and evals only
        for label, d in runs
        if (Path(d) / "events.jsonl").is_file()
    ]
    if not logs:
        return {}
    metric = pick_metric([log for _, log in logs], prefer_loss=target_loss is not None)
    target = target_accuracy if metric == "test_accuracy" else target_loss
    curves = [curve_of(log, metric, label) for label, log in logs]
    short = "accuracy" if metric == "test_accuracy" else "loss"
    return {
        f"{short}_vs_{x}.png": comparison_figure(
            curves, x, metric=metric, x_label=x_label, target=target, title=title
        )
        for x, x_label in (("time", time_label), ("gradients", "gradients computed (all workers)"))
    }


def plot_comparison(
    runs: Sequence[tuple[str, str | os.PathLike[str]]],
    out_dir: str | os.PathLike[str],
    *,
    time_label: str = "wall time (s)",
    target_accuracy: float | None = None,
    target_loss: float | None = None,
    title: str = "",
) -> list[Path]:
    """Write the two overlay figures into ``out_dir`` (created); return the files written.

    Args:
        runs: (label, run directory) per run, in legend order; a directory without ``events.jsonl`` is
            skipped.
        out_dir: usually ``OUT/plots``.
        time_label: the time axis label (``"virtual time (s)"`` for simulated runs).
        target_accuracy: drawn as a dashed line when accuracy is plotted.
        target_loss: drawn as a dashed line; with it the figures show the loss even where accuracy exists.
        title: shown above both figures.
    """
    figures = comparison_figures(
        runs, time_label=time_label, target_accuracy=target_accuracy, target_loss=target_loss, title=title
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        path = out / name
        fig.savefig(path, format="png")
        written.append(path)
    return written
