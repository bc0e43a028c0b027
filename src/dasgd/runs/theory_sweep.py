"""The theory sweep: does staleness cost only lower-order terms? (``dasgd theory --sweep``)

On the quadratic task, where ``L``, ``sigma^2`` and ``f*`` are known exactly, simulated DASGD runs vary the
staleness through the number of workers, stragglers and message latency. For every setting and every target
``eps``, one run uses the stepsize bound 2 prescribes for that ``eps`` and that setting's staleness
(:func:`dasgd.core.theory.gradients_needed_bound2`: ``eta = min(stepsize limit, eps/(12 L sigma^2), ...)``; the
setting's coverage ``Omega`` comes from a short pilot run, which is exact because the simulated schedule does
not depend on the stepsize), and records **gradients-to-eps**: the gradients computed (all workers) when the
running average of the evaluated replica's ``||grad f||^2`` first reaches ``eps`` (the quantity the bounds
control). A run that does not get there within its budget is reported as not reached and left out of fits.

For each ``eps`` the sweep fits, by least squares, the stated model ``T = a + b x`` for ``x = S_avg`` and for
``x = sqrt(S^_avg S^_max)`` over the settings, and reports ``a``, ``b``, ``R^2`` and the staleness share
``b x_max / (a + b x_max)`` at the stalest setting. The paper's claim is that staleness enters only through
lower-order terms: the share should shrink as ``eps`` does, while the noise term ``sigma^2 eps^-2`` (in ``a``)
takes over. Outputs in the chosen folder: ``theory_sweep.csv``, ``theory_sweep.md`` and
``plots/theory_sweep.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dasgd.core.ledger import StalenessStats, compute_staleness
from dasgd.core.theory import bound2, coverage_constant, gradients_needed_bound2

__all__ = [
    "SlopeFit",
    "SweepRun",
    "TheorySweepConfig",
    "TheorySweepError",
    "TheorySweepResult",
    "config_with",
    "fit_line",
    "gradients_to_eps",
    "run_theory_sweep",
]


_PILOT_MARGIN = 1.25
"""Factor on the pilot's coverage Omega before the stepsize is chosen from it."""


class TheorySweepError(ValueError):
    """A theory-sweep setting is out of range (the message names the option and the valid range)."""


def _need(ok: bool, option: str, message: str) -> None:
    if not ok:
        raise TheorySweepError(f"{option}: {message}")


@dataclass(frozen=True)
class TheorySweepConfig:
    """What the theory sweep runs. The defaults take about a minute on two cores.

    Attributes:
        workers: worker counts.
        latency: one-way message latencies (virtual seconds; a gradient takes ``compute_time``).
        slowdown: straggler slowdown factors (1: no stragglers).
        straggler_share: share of the workers slowed down when ``slowdown > 1``.
        eps: the targets for the running average of ``||grad f||^2``.
        dim: quadratic dimension.
        noise: quadratic noise ``sigma`` of one sample (``sigma^2 / batch_size`` per gradient).
        condition: quadratic condition number.
        batch_size: samples per gradient.
        compute_time: virtual seconds per gradient.
        seed: problem, model and schedule seed.
        pilot_gradients: length of the pilot run that measures each setting's coverage ``Omega``.
        max_gradients: the most gradients one run may take.
    """

    workers: tuple[int, ...] = (1, 4, 16)
    latency: tuple[float, ...] = (0.001, 0.02)
    slowdown: tuple[float, ...] = (1.0, 4.0)
    straggler_share: float = 0.5
    eps: tuple[float, ...] = (0.3, 0.1, 0.03)
    dim: int = 10
    noise: float = 1.0
    condition: float = 10.0
    batch_size: int = 10
    compute_time: float = 0.01
    seed: int = 0
    pilot_gradients: int = 1000
    max_gradients: int = 40_000

    def __post_init__(self) -> None:
        _need(
            bool(self.workers) and all(w >= 1 for w in self.workers), "--workers", "give worker counts >= 1"
        )
        _need(bool(self.latency) and all(v >= 0 for v in self.latency), "--latency", "give latencies >= 0")
        _need(bool(self.slowdown) and all(v >= 1 for v in self.slowdown), "--slowdown", "give factors >= 1")
        _need(0 <= self.straggler_share <= 1, "--straggler-share", "must be a fraction in [0, 1]")
        _need(
            bool(self.eps) and all(0 < e < math.inf for e in self.eps), "--eps", "give targets > 0, e.g. 0.1"
        )
        _need(len(set(self.eps)) == len(self.eps), "--eps", "a target is given twice")
        _need(self.dim >= 1, "--dim", "must be at least 1")
        _need(self.noise > 0, "--noise", "must be > 0 (the sweep is about the noise term)")
        _need(self.condition >= 1, "--condition", "must be at least 1")
        _need(self.batch_size >= 1, "--batch-size", "must be at least 1")
        _need(self.compute_time > 0, "--compute-time", "must be > 0")
        _need(self.seed >= 0, "--seed", "must be >= 0")
        _need(self.pilot_gradients >= 10, "--pilot-gradients", "must be at least 10")
        _need(self.max_gradients >= 10, "--max-gradients", "must be at least 10")

    def settings(self) -> list[tuple[int, float, float]]:
        """Every (workers, latency, slowdown), in grid order; one worker runs once (nothing to wait for)."""
        out = []
        for w in self.workers:
            if w == 1:
                out.append((1, self.latency[0], 1.0))
                continue
            out += [(w, lat, slow) for lat in self.latency for slow in self.slowdown]
        return out


@dataclass(frozen=True)
class SweepRun:
    """One simulated run of the sweep (one setting, one ``eps``)."""

    workers: int
    latency: float
    slowdown: float
    eps: float
    eta: float
    budget: int
    gradients: int
    gradients_to_eps: int | None
    s_avg: float
    s_max: int
    s_hat_avg: float
    s_hat_max: int
    coverage: int
    average_at_end: float
    bound2_at_end: float
    bound2_condition: bool
    predicted: float
    wall_s: float

    @property
    def s_paper(self) -> float:
        """``sqrt(S^_avg S^_max)``, the paper's staleness measure of bound 2."""
        return math.sqrt(self.s_hat_avg * self.s_hat_max)


@dataclass(frozen=True)
class SlopeFit:
    """Least squares ``T = intercept + slope * x`` for one ``eps`` and one staleness measure ``x``."""

    eps: float
    x_name: str
    intercept: float
    slope: float
    r2: float
    points: int
    x_max: float

    @property
    def relative_slope(self) -> float:
        """``b / a``: how much ``T`` grows per unit of staleness, relative to the staleness-free ``T``."""
        return self.slope / self.intercept if self.intercept > 0 else math.nan

    @property
    def share(self) -> float:
        """The staleness share of the fitted ``T`` at the stalest setting: ``b x_max / (a + b x_max)``."""
        top = self.intercept + self.slope * self.x_max
        return self.slope * self.x_max / top if top > 0 else math.nan


@dataclass
class TheorySweepResult:
    """The sweep's runs, fits and the files written."""

    config: TheorySweepConfig
    runs: list[SweepRun]
    fits: list[SlopeFit]
    files: list[Path] = field(default_factory=list)


def fit_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Least squares ``y = a + b x``: ``(a, b, R^2)``; ``R^2`` is NaN when ``y`` is constant.

    Raises:
        TheorySweepError: fewer than two points, or all ``x`` equal.
    """
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xs.size < 2 or xs.shape != ys.shape:
        raise TheorySweepError("a line fit needs at least two (x, y) points")
    if np.ptp(xs) == 0:
        raise TheorySweepError("a line fit needs at least two different x values")
    design = np.stack([np.ones_like(xs), xs], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, ys, rcond=None)
    residual = float(np.sum((ys - a - b * xs) ** 2))
    spread = float(np.sum((ys - ys.mean()) ** 2))
    return float(a), float(b), (1.0 - residual / spread) if spread > 0 else math.nan


def gradients_to_eps(
    times: Sequence[float], values: Sequence[float], ends: Sequence[float], eps: float
) -> int | None:
    """Gradients computed (completed by then) at the first evaluation whose running average reaches ``eps``.

    ``times`` and ``values`` are the evaluations in time order (``grad_norm_sq``); ``ends`` the completion times
    of every gradient. None when the running average never gets to ``eps``.
    """
    vals = np.asarray(values, dtype=np.float64)
    if vals.size == 0:
        return None
    running = np.cumsum(vals) / np.arange(1, vals.size + 1)
    hit = np.flatnonzero(running <= eps)
    if hit.size == 0:
        return None
    when = float(np.asarray(times, dtype=np.float64)[hit[0]])
    return int(np.searchsorted(np.sort(np.asarray(ends, dtype=np.float64)), when, side="right"))


def _spec(config: TheorySweepConfig, setting: tuple[int, float, float], lr: float, budget: int) -> Any:
    from dasgd.experiments.spec import resolve_spec

    workers, latency, slowdown = setting
    return resolve_spec(
        {},
        simulate=True,
        task="quadratic",
        workers=workers,
        dim=config.dim,
        noise=config.noise,
        condition=config.condition,
        seed=config.seed,
        lr=lr,
        batch_size=config.batch_size,
        max_gradients=budget,
        # Four evaluations per step time: gradients-to-eps resolves to about workers/4 gradients.
        eval_every=config.compute_time / 4,
        simulation={
            "compute_time": config.compute_time,
            "latency": latency,
            "slowdown": slowdown,
            "straggler_share": config.straggler_share if slowdown > 1 else 0.0,
        },
    )


def _simulate(spec: Any) -> tuple[StalenessStats, list[dict[str, Any]], np.ndarray]:
    """Run ``spec`` in the simulator without writing a run directory: staleness, evaluations, gradient ends."""
    from dasgd.runs.simulate import build_simulation

    engine, _, _ = build_simulation(spec)
    outcome = engine.run()
    origin, index, _, end, clock = outcome.records.take()
    stats = compute_staleness(origin, index, end, clock)
    evals = sorted(
        (e for e in outcome.evals if "grad_norm_sq" in e),
        key=lambda e: (float(e["time"]), int(e["gradients"])),
    )
    return stats, evals, end


def run_theory_sweep(
    config: TheorySweepConfig,
    out_dir: str | Path,
    on_run: Callable[[str], None] | None = None,
) -> TheorySweepResult:
    """Run the sweep and write its table, fits and figure into ``out_dir``.

    Args:
        config: what to run.
        out_dir: the output folder (created if needed).
        on_run: called with a short label before each simulated run (progress).
    """
    from dasgd.tasks import make_task

    task = make_task(
        "quadratic", dim=config.dim, noise=config.noise, condition=config.condition, seed=config.seed
    )
    known = task.theory_constants(config.batch_size)
    lip, sigma = known["L"], math.sqrt(known["sigma_sq"])
    f0 = task.evaluate(task.build_model(config.seed))["loss"]
    runs: list[SweepRun] = []
    for setting in config.settings():
        label = f"workers={setting[0]} latency={setting[1]:g} slowdown={setting[2]:g}"
        if on_run is not None:
            on_run(f"{label} pilot")
        # The schedule does not depend on the stepsize, so any stepsize measures its staleness.
        pilot, _, _ = _simulate(_spec(config, setting, 1e-3, config.pilot_gradients))
        # A short pilot sees fewer of the rare long windows (stragglers) than a long run: keep a margin.
        omega = math.ceil(_PILOT_MARGIN * coverage_constant(pilot.loose))
        for eps in config.eps:
            need = gradients_needed_bound2(
                eps=eps, L=lip, sigma=sigma, F0=f0, s_avg=pilot.s_avg, coverage=omega
            )
            # f's running average falls like F0/(eta T) on a quadratic: three times that, plus a few rounds.
            budget = int(min(config.max_gradients, math.ceil(3.0 * f0 / (need.eta * eps)) + 20 * setting[0]))
            if on_run is not None:
                on_run(f"{label} eps={eps:g}")
            wall = time.perf_counter()
            stats, evals, ends = _simulate(_spec(config, setting, need.eta, budget))
            wall = time.perf_counter() - wall
            values = [float(e["grad_norm_sq"]) for e in evals]
            reached = gradients_to_eps([float(e["time"]) for e in evals], values, ends, eps)
            cov = coverage_constant(stats.loose)
            at_end = bound2(
                T=stats.count, eta=need.eta, L=lip, sigma=sigma, F0=f0, s_avg=stats.s_avg, coverage=cov
            )
            runs.append(
                SweepRun(
                    workers=setting[0],
                    latency=setting[1],
                    slowdown=setting[2],
                    eps=eps,
                    eta=need.eta,
                    budget=budget,
                    gradients=stats.count,
                    gradients_to_eps=reached,
                    s_avg=stats.s_avg,
                    s_max=stats.s_max,
                    s_hat_avg=stats.loose_avg,
                    s_hat_max=stats.loose_max,
                    coverage=cov,
                    average_at_end=float(np.mean(values)) if values else math.nan,
                    bound2_at_end=at_end.total,
                    bound2_condition=at_end.stepsize_ok,
                    predicted=need.exact,
                    wall_s=wall,
                )
            )
    fits = _fits(config, runs)
    result = TheorySweepResult(config, runs, fits)
    result.files = _write_outputs(result, Path(out_dir), f0=f0, lip=lip, sigma_sq=known["sigma_sq"])
    return result


def _fits(config: TheorySweepConfig, runs: list[SweepRun]) -> list[SlopeFit]:
    fits: list[SlopeFit] = []
    for eps in config.eps:
        done = [r for r in runs if r.eps == eps and r.gradients_to_eps is not None]
        for name, get in (("S_avg", lambda r: r.s_avg), ("sqrt(S^_avg S^_max)", lambda r: r.s_paper)):
            xs = [get(r) for r in done]
            if len(done) < 2 or max(xs) == min(xs):
                continue
            a, b, r2 = fit_line(xs, [float(r.gradients_to_eps) for r in done])
            fits.append(SlopeFit(eps, name, a, b, r2, len(done), max(xs)))
    return fits


_CSV_COLUMNS = (
    "workers",
    "latency",
    "slowdown",
    "eps",
    "eta",
    "gradients_to_eps",
    "budget",
    "gradients",
    "s_avg",
    "s_max",
    "s_hat_avg",
    "s_hat_max",
    "sqrt_s_hat_avg_s_hat_max",
    "coverage",
    "average_at_end",
    "bound2_at_end",
    "bound2_condition",
    "bound2_predicted_T",
    "wall_s",
)


def _csv_row(r: SweepRun) -> list[Any]:
    return [
        r.workers,
        r.latency,
        r.slowdown,
        r.eps,
        repr(r.eta),
        "" if r.gradients_to_eps is None else r.gradients_to_eps,
        r.budget,
        r.gradients,
        repr(r.s_avg),
        r.s_max,
        repr(r.s_hat_avg),
        r.s_hat_max,
        repr(r.s_paper),
        r.coverage,
        repr(r.average_at_end),
        repr(r.bound2_at_end),
        "true" if r.bound2_condition else "false",
        repr(r.predicted),
        f"{r.wall_s:.3f}",
    ]


def _plot(result: TheorySweepResult, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15.0, 4.3), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    measures = (("S_avg", lambda r: r.s_avg), ("sqrt(S^_avg S^_max)", lambda r: r.s_paper))
    for ax, (name, get) in zip(axes[:2], measures):
        for i, eps in enumerate(result.config.eps):
            done = [r for r in result.runs if r.eps == eps and r.gradients_to_eps is not None]
            color = f"C{i}"
            ax.plot(
                [get(r) for r in done],
                [r.gradients_to_eps for r in done],
                "o",
                color=color,
                label=f"eps={eps:g}",
            )
            fit = next((f for f in result.fits if f.eps == eps and f.x_name == name), None)
            if fit is not None:
                grid = np.linspace(0.0, fit.x_max, 50)
                ax.plot(grid, fit.intercept + fit.slope * grid, "-", color=color, alpha=0.7)
        ax.set_xlabel(name.replace("S^_", "Ŝ_"))
        ax.set_ylabel("gradients to eps (running average of ||∇f||²)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    ax = axes[2]
    for name, marker in (("S_avg", "o-"), ("sqrt(S^_avg S^_max)", "s--")):
        pts = sorted((f.eps, f.relative_slope) for f in result.fits if f.x_name == name)
        if pts:
            ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], marker, label=f"fit on {name.replace('S^_', 'Ŝ_')}"
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("eps (decreasing →)")
    ax.set_ylabel("relative staleness cost b/a (per unit of x)")
    ax.set_title("as eps shrinks, the noise term takes over")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.suptitle("DASGD on the quadratic (simulated): gradients to eps against staleness")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _write_outputs(
    result: TheorySweepResult, out: Path, *, f0: float, lip: float, sigma_sq: float
) -> list[Path]:
    from dasgd.runs.report import format_value as fv

    out.mkdir(parents=True, exist_ok=True)
    table = out / "theory_sweep.csv"
    with table.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(_CSV_COLUMNS)
        writer.writerows(_csv_row(r) for r in result.runs)
    plot = _plot(result, out / "plots" / "theory_sweep.png")
    cfg = result.config
    share = cfg.straggler_share
    lines = [
        f"# Theory sweep: DASGD on the quadratic, {len(result.runs)} simulated runs",
        "",
        f"Quadratic: dim {cfg.dim}, condition {cfg.condition:g}, seed {cfg.seed}; exact L = {fv(lip)}, "
        f"sigma^2 = {fv(sigma_sq)} per gradient (noise {cfg.noise:g}, batch {cfg.batch_size}), F0 = {fv(f0)}.",
        f"Settings: workers {', '.join(map(str, cfg.workers))}; latency {', '.join(f'{v:g}' for v in cfg.latency)} "
        f"virtual s (a gradient takes {cfg.compute_time:g}); slowdown {', '.join(f'{v:g}' for v in cfg.slowdown)} "
        f"for {share:.0%} of the workers when above 1.",
        "",
        "Each run uses bound 2's stepsize for its eps and its setting's staleness (docs/theory.md): "
        "eta = min(1/(2L max(1, sqrt(2 Omega))), eps/(12 L sigma^2), sqrt(eps)/(L sigma sqrt(24 S_avg))). "
        "Gradients to eps: gradients computed when the running average of the evaluated replica's "
        "||grad f||^2 first reaches eps; '—' means not within the run's budget (left out of the fits).",
        "",
        "## Fits: T = a + b x (least squares over the settings, per eps)",
        "",
        "| eps | x | a (intercept) | b (slope) | b/a | R^2 | points | share b x_max / (a + b x_max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in result.fits:
        lines.append(
            f"| {f.eps:g} | {f.x_name} | {fv(f.intercept)} | {fv(f.slope)} | {fv(f.relative_slope)} | "
            f"{fv(f.r2)} | {f.points} | {fv(f.share)} (x_max {fv(f.x_max)}) |"
        )
    lines += [
        "",
        "How to read it: b/a is the growth of T per unit of staleness relative to the staleness-free T. The "
        "bound predicts T ~ c1 sigma^2/eps^2 + c2 sqrt(Omega)/eps, so b/a ~ eps/sigma^2: it should fall in "
        "proportion to eps. Staleness then costs a lower-order term, and the noise term (in a) takes over as "
        "eps shrinks. The share is the staleness part of the fitted T at the stalest setting.",
        "",
        "## Runs",
        "",
        "| workers | latency | slowdown | eps | eta | gradients to eps | S_avg | S^_avg | S^_max | "
        "sqrt(S^_avg S^_max) | Omega | bound 2 T | avg at end | bound 2 at end | within |",
        "|" + "---|" * 15,
    ]
    for r in result.runs:
        reached = "—" if r.gradients_to_eps is None else str(r.gradients_to_eps)
        within = r.average_at_end <= r.bound2_at_end
        cond = "" if r.bound2_condition else " (stepsize above condition)"
        lines.append(
            f"| {r.workers} | {r.latency:g} | {r.slowdown:g} | {r.eps:g} | {fv(r.eta)} | {reached} | "
            f"{fv(r.s_avg)} | {fv(r.s_hat_avg)} | {r.s_hat_max} | {fv(r.s_paper)} | {r.coverage} | "
            f"{fv(r.predicted)} | {fv(r.average_at_end)} | {fv(r.bound2_at_end)} | {fv(within)}{cond} |"
        )
    lines += ["", "![gradients to eps against staleness](plots/theory_sweep.png)", ""]
    md = out / "theory_sweep.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    return [table, md, plot]


def config_with(config: TheorySweepConfig, **changes: Any) -> TheorySweepConfig:
    """``config`` with the given fields replaced (None values are ignored), validated again."""
    return dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})
