"""Figures of a run, drawn from its event log alone (so any figure can be regenerated later).

Figures are built as :class:`matplotlib.figure.Figure` objects on an Agg canvas. ``matplotlib.pyplot`` is never
imported: it keeps a process-wide registry of open figures and picks a GUI backend, which a library must not
touch (a CLI user with an interactive session keeps theirs). :func:`run_figures` builds them (so what a figure
shows can be read back from it) and :func:`plot_run` writes them. Files written by :func:`plot_run`:

``accuracy.png``    test accuracy vs time and vs gradients the evaluated replica held (if any eval has it)
``loss.png``        ``test_loss`` (else ``loss``, as the quadratic task reports) vs time and vs gradients
``staleness.png``   histograms of the staleness s_k and the loose staleness s^_k with averages and maxima
``throughput.png``  cumulative gradients computed per worker vs time (stragglers show as flat lines)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dasgd.metrics.eventlog import EventLog

__all__ = ["PLOT_FILES", "plot_run", "run_figures"]

PLOT_FILES: tuple[str, ...] = ("accuracy.png", "loss.png", "staleness.png", "throughput.png")
"""Every file :func:`plot_run` may write, in the order it writes them."""

# Beyond this many workers a per-worker legend is noise; the lines still show the spread.
_MAX_LEGEND = 10
# Integer staleness values up to this get one bar each; larger ranges get automatic bins.
_MAX_UNIT_BINS = 100
_DPI = 110


def _new_figure(ncols: int, title: str) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(5.0 * ncols, 4.0), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    if title:
        fig.suptitle(title)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _series(log: EventLog, metric: str) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per worker: (time, gradients, value) of the evals that report a finite ``metric``, sorted by time."""
    rows: dict[int, list[tuple[float, int, float]]] = {}
    for ev in log.evals:
        value = ev.get(metric)
        if value is None or not math.isfinite(float(value)):
            continue
        rows.setdefault(int(ev["worker"]), []).append((float(ev["time"]), int(ev["gradients"]), float(value)))
    out = {}
    for worker in sorted(rows):
        data = sorted(rows[worker])
        out[worker] = (
            np.array([r[0] for r in data]),
            np.array([r[1] for r in data]),
            np.array([r[2] for r in data]),
        )
    return out


def _metric_figure(
    log: EventLog, metric: str, label: str, time_label: str, title: str, log_y: bool
) -> Figure | None:
    series = _series(log, metric)
    if not series:
        return None
    fig, (ax_time, ax_grad) = _new_figure(2, title)
    values = np.concatenate([s[2] for s in series.values()])
    use_log = log_y and bool(np.all(values > 0))
    for worker, (time, grads, vals) in series.items():
        name = f"worker {worker}"
        ax_time.plot(time, vals, marker=".", label=name)
        ax_grad.plot(grads, vals, marker=".", label=name)
    for ev in log.runs:  # where the run stopped as diverged (runs/results.py, the "diverged" run event)
        if ev.get("event") != "diverged":
            continue
        mark = {"color": "red", "linestyle": "--", "label": f"diverged (worker {ev.get('worker')})"}
        ax_time.axvline(float(ev["time"]), **mark)
        if isinstance(ev.get("gradients"), (int, float)):
            ax_grad.axvline(float(ev["gradients"]), **mark)
    ax_time.set_xlabel(time_label)
    ax_grad.set_xlabel("gradients computed (held by the evaluated replica)")
    for ax in (ax_time, ax_grad):
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if use_log:
            ax.set_yscale("log")
    if len(series) <= _MAX_LEGEND:
        ax_time.legend(fontsize="small")
    return fig


def _integer_hist(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    top = int(values.max()) if values.size else 0
    if top <= _MAX_UNIT_BINS:
        # One bar per integer value, centred on it.
        edges = np.arange(top + 2, dtype=np.float64) - 0.5
    else:
        edges = np.histogram_bin_edges(values, bins=50)
    counts, edges = np.histogram(values, bins=edges)
    return counts, edges


def _staleness_figure(log: EventLog, title: str) -> Figure | None:
    if log.num_gradients == 0:
        return None
    stats = log.staleness()
    panels: Sequence[tuple[str, str, Any, float, float]] = (
        ("staleness $s_k$", "S", stats.per_gradient, stats.s_avg, stats.s_max),
        ("loose staleness $\\hat{s}_k$", "\\hat{S}", stats.loose, stats.loose_avg, stats.loose_max),
    )
    fig, axes = _new_figure(2, title)
    for ax, (label, sym, values, avg, peak) in zip(axes, panels, strict=True):
        data = np.asarray(values, dtype=np.float64)
        counts, edges = _integer_hist(data)
        ax.stairs(counts, edges, fill=True, alpha=0.6)
        ax.axvline(float(avg), color="C1", linestyle="--", label=f"${sym}_{{avg}}$ = {float(avg):.3g}")
        ax.axvline(float(peak), color="C3", linestyle=":", label=f"${sym}_{{max}}$ = {float(peak):.3g}")
        ax.set_xlabel(label)
        ax.set_ylabel("gradients")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def _throughput_figure(log: EventLog, time_label: str, title: str) -> Figure | None:
    if log.num_gradients == 0:
        return None
    fig, (ax,) = _new_figure(1, title)
    workers = max(log.world_size, int(log.origin.max()) + 1)
    for worker in range(workers):
        ends = np.sort(log.end[log.origin == worker])
        # Start every line at (0, 0) so a worker that never computed shows as a flat line, not nothing.
        ax.step(
            np.concatenate(([0.0], ends)),
            np.arange(ends.size + 1),
            where="post",
            linewidth=1.0,
            label=f"worker {worker}",
        )
    ax.set_xlabel(time_label)
    ax.set_ylabel("gradients computed (cumulative)")
    ax.grid(True, alpha=0.3)
    if workers <= _MAX_LEGEND:
        ax.legend(fontsize="small")
    return fig


def _figures(log: EventLog, time_label: str, title: str) -> Iterator[tuple[str, Figure]]:
    """(file name, figure) of each figure the log has data for, built one at a time: a caller that saves
    each before asking for the next never holds two (a throughput figure of 10,000 workers is large)."""
    metrics = set(log.metric_names())
    loss_key = "test_loss" if "test_loss" in metrics else "loss"
    accuracy = _metric_figure(log, "test_accuracy", "test accuracy", time_label, title, False)
    if accuracy is not None:
        yield "accuracy.png", accuracy
    del accuracy  # the caller has saved it
    loss = _metric_figure(log, loss_key, loss_key.replace("_", " "), time_label, title, True)
    if loss is not None:
        yield "loss.png", loss
    del loss
    staleness = _staleness_figure(log, title)
    if staleness is not None:
        yield "staleness.png", staleness
    del staleness
    throughput = _throughput_figure(log, time_label, title)
    if throughput is not None:
        yield "throughput.png", throughput


def run_figures(log: EventLog, *, time_label: str = "wall time (s)", title: str = "") -> dict[str, Figure]:
    """The figures :func:`plot_run` would write, by file name, in :data:`PLOT_FILES` order.

    A figure whose data the log lacks is left out (see :func:`plot_run`). Arguments as for :func:`plot_run`.
    """
    return dict(_figures(log, time_label, title))


def plot_run(
    log: EventLog,
    out_dir: str | os.PathLike[str],
    *,
    time_label: str = "wall time (s)",
    title: str = "",
    on_figure: Callable[[int], None] | None = None,
) -> list[Path]:
    """Draw the run's figures into ``out_dir`` (created if needed) and return the files written.

    A figure whose data the log lacks is skipped (no evals with accuracy: no ``accuracy.png``; no gradients:
    no staleness or throughput figure), so an empty log writes nothing and does not fail.

    Args:
        log: the parsed event log.
        out_dir: directory for the PNG files, usually ``RUN_DIR/plots``.
        time_label: x-axis label for time, e.g. ``"virtual time (s)"`` for a simulated run.
        title: figure title shown above every figure.
        on_figure: called with the number of figures saved so far, after each one.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in _figures(log, time_label, title):
        written.append(_save(fig, out / name))
        if on_figure is not None:
            on_figure(len(written))
    return written
