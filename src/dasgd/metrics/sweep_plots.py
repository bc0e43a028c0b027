"""Figures of a parameter sweep: each headline quantity against each swept key.

One figure per swept key (``sweep_<key>.png``), with four panels: S_avg, S^_max, gradients to target and
virtual time to target against that key's values, one line per combination of the other swept keys' values.
A point without a value (for example one that never reached the target) leaves a gap in its line.

Figures are :class:`matplotlib.figure.Figure` objects on an Agg canvas; ``matplotlib.pyplot`` is never
imported (see :mod:`dasgd.metrics.plots` for why).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["SWEEP_PLOT_METRICS", "plot_sweep", "sweep_figure", "sweep_figures"]

SWEEP_PLOT_METRICS: tuple[tuple[str, str], ...] = (
    ("s_avg", "$S_{avg}$ (average staleness)"),
    ("s_hat_max", r"$\hat{S}_{max}$ (maximum loose staleness)"),
    ("gradients_to_target", "gradients to target"),
    ("time_to_target_s", "virtual time to target (s)"),
)
"""(row column, panel label) of each panel, in panel order."""

# Beyond this many lines a legend hides the data; the lines still show the spread.
_MAX_LEGEND = 10
_DPI = 110


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _number(value: Any) -> float:
    return float(value) if _is_number(value) and math.isfinite(float(value)) else math.nan


def _x_positions(values: Sequence[Any]) -> tuple[np.ndarray, list[str] | None, bool]:
    """x coordinates of the key's values, tick labels when categorical, and whether a log axis suits."""
    if values and all(_is_number(v) for v in values):
        xs = np.array([float(v) for v in values])
        # A grid like workers=4,16,64,256 is geometric; on a linear axis its small values would crowd.
        log = bool(np.all(xs > 0) and xs.max() / xs.min() >= 8)
        return xs, None, log
    return np.arange(len(values), dtype=float), [str(v) for v in values], False


def _describe(combo: tuple[tuple[str, Any], ...]) -> str:
    return ", ".join(f"{k}={v:g}" if _is_number(v) else f"{k}={v}" for k, v in combo)


def sweep_figure(
    rows: Sequence[Mapping[str, Any]],
    key: str,
    values: Sequence[Any],
    other_keys: Sequence[str] = (),
    *,
    title: str = "",
) -> Figure:
    """The figure of one swept key: the four :data:`SWEEP_PLOT_METRICS` panels against ``key``.

    Args:
        rows: one mapping per point, holding every swept key and the metric columns.
        key: the swept key on the x axis.
        values: that key's values, in order (numbers give a numeric axis, anything else a categorical one).
        other_keys: the other swept keys; each combination of their values is one line.
        title: the figure's title.
    """
    order = sorted(range(len(values)), key=lambda i: float(values[i])) if _is_numeric(values) else None
    ordered = [values[i] for i in order] if order is not None else list(values)
    xs, ticks, log = _x_positions(ordered)
    groups: dict[tuple[tuple[str, Any], ...], dict[int, Mapping[str, Any]]] = {}
    for row in rows:
        combo = tuple((k, row.get(k)) for k in other_keys)
        for i, v in enumerate(ordered):
            if row.get(key) == v:
                groups.setdefault(combo, {})[i] = row
    fig = Figure(figsize=(10.0, 7.5), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(f"{title}: sweep over {key}")
    for panel, (column, label) in enumerate(SWEEP_PLOT_METRICS):
        ax = fig.add_subplot(2, 2, panel + 1)
        drawn = False
        for combo, by_index in groups.items():
            ys = np.array(
                [_number(by_index[i].get(column)) if i in by_index else math.nan for i in range(len(xs))]
            )
            drawn = drawn or bool(np.isfinite(ys).any())
            ax.plot(xs, ys, marker="o", linewidth=1.2, label=_describe(combo) or None)
        if not drawn:
            ax.text(
                0.5,
                0.5,
                "no point has a value\n(no target set, or none reached it)",
                transform=ax.transAxes,
                ha="center",
                va="center",
                fontsize="small",
                color="0.4",
            )
        if log:
            ax.set_xscale("log")
        if ticks is not None:
            ax.set_xticks(xs, ticks)
        elif xs.size:
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.minorticks_off()
        ax.set_xlabel(key)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if drawn and other_keys and 1 < len(groups) <= _MAX_LEGEND and panel == 0:
            ax.legend(fontsize="small")
    return fig


def _is_numeric(values: Sequence[Any]) -> bool:
    return bool(values) and all(_is_number(v) for v in values)


def sweep_figures(
    rows: Sequence[Mapping[str, Any]], axes: Mapping[str, Sequence[Any]], *, title: str = ""
) -> dict[str, Figure]:
    """The figures :func:`plot_sweep` writes, by file name (``sweep_<key>.png``; none without rows).

    Arguments as for :func:`plot_sweep`.
    """
    if not rows:
        return {}
    return {
        f"sweep_{key}.png": sweep_figure(rows, key, list(values), [k for k in axes if k != key], title=title)
        for key, values in axes.items()
    }


def plot_sweep(
    rows: Sequence[Mapping[str, Any]],
    axes: Mapping[str, Sequence[Any]],
    out_dir: str | os.PathLike[str],
    *,
    title: str = "",
) -> list[Path]:
    """Write ``sweep_<key>.png`` for every swept key into ``out_dir`` (created); return the files written.

    Args:
        rows: one mapping per point (the sweep table's rows).
        axes: swept key -> its values, in the order given on the command line.
        out_dir: usually ``SWEEP_DIR/plots``.
        title: shown above every figure.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, fig in sweep_figures(rows, axes, title=title).items():
        path = out / name
        fig.savefig(path, format="png")
        written.append(path)
    return written
