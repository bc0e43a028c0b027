"""A run against the paper's bounds: the theory section of every report, and ``dasgd theory RUN_DIR``.

From a run directory (``spec.yaml``, ``summary.json``, ``events.jsonl``) :func:`analyze_run` gathers

- the measured staleness ``S_avg``, ``S_max``, ``S^_avg``, ``S^_max`` (exact, from the event log), and the two
  derived constants the bounds use: ``mean_k s_k^2`` and the loose-window coverage ``Omega``
  (:mod:`dasgd.core.theory`);
- the constants ``L``, ``sigma^2``, ``Q`` and ``F0 = f(x0) - f*`` (:mod:`dasgd.metrics.estimators`; the task is
  rebuilt from ``spec.yaml`` and ``x0`` from its seed, so nothing but the run directory is needed);
- the epsilon the run reached: the smallest and the average ``grad_norm_sq`` its evaluations recorded (the
  evaluated replica's squared full-gradient norm, at evaluation times during training);
- both bounds evaluated at the run's ``T`` and stepsize, term by term, and the gradients each bound would need
  to guarantee the reached average;
- flags for every way the run leaves the theory's assumptions.

What is compared: the bounds hold for ``(1/T) sum_k E ||grad f(y_k)||^2`` over the models ``y_k`` that computed
the gradients. An evaluated replica is such a model (it is the model of the gradient its worker is computing),
sampled at evaluation times rather than at every ``k``, and one run is one draw of the expectation: the
comparison is the natural one, not an identity.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dasgd.core.ledger import StalenessStats
from dasgd.core.theory import (
    BoundValue,
    GradientsNeeded,
    bound1,
    bound2,
    coverage_constant,
    gradients_needed_bound1,
    gradients_needed_bound2,
    mean_square_staleness,
)
from dasgd.metrics.estimators import ConstantEstimates, estimate_constants

if TYPE_CHECKING:
    from dasgd.metrics.eventlog import EventLog

__all__ = [
    "THEORY_PLOT",
    "Flag",
    "RunTheory",
    "TheoryReportError",
    "analyze_run",
    "format_theory",
    "plot_theory",
    "report_section",
    "write_theory",
]

THEORY_PLOT = "theory_grad_norm.png"
"""The figure's file name under ``RUN_DIR/plots``."""

_MOMENTUM_KEYS = ("momentum", "nesterov", "weight_decay", "betas")
_ADAPTIVE_WORDS = ("adam", "adagrad", "rmsprop", "lamb", "lars")
_NORM_LAYERS = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
    torch.nn.InstanceNorm1d,
    torch.nn.InstanceNorm2d,
    torch.nn.InstanceNorm3d,
)


class TheoryReportError(ValueError):
    """A run directory lacks what the theory section needs (the message names what and how to fix it)."""


@dataclass(frozen=True)
class Flag:
    """One way a run is outside the theory's assumptions.

    Attributes:
        key: a short stable identifier (``"algorithm"``, ``"momentum"``, ``"batchnorm"``, ``"shards"``,
            ``"stepsize"``, ``"lost"``, ``"anomalies"``, ``"diverged"``).
        message: what is wrong and what it means for the bounds.
    """

    key: str
    message: str


@dataclass(frozen=True, eq=False)
class RunTheory:
    """Everything the theory section shows for one run (see the module docstring)."""

    run_dir: Path
    task: str
    algorithm: str
    workers: int
    eta: float
    batch_size: int
    gradients: int
    staleness: StalenessStats
    s_sq_avg: float
    coverage: int
    constants: ConstantEstimates
    eps_min: float
    eps_mean: float
    evaluations: int
    bound1: BoundValue | None
    bound2: BoundValue | None
    needed1: GradientsNeeded | None
    needed2: GradientsNeeded | None
    flags: tuple[Flag, ...]
    eval_gradients: np.ndarray
    """Gradients computed (all workers) at each training evaluation, in time order."""
    eval_grad_norm_sq: np.ndarray
    """``grad_norm_sq`` of each training evaluation, in time order."""

    @property
    def faithful(self) -> bool:
        """Whether no flag was raised: the run is inside the theory's assumptions."""
        return not self.flags

    def within(self, bound: BoundValue | None) -> bool | None:
        """Whether the average reached is within ``bound`` (None when the bound could not be evaluated)."""
        return None if bound is None else bool(self.eps_mean <= bound.total)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TheoryReportError(
            f"{path} is not valid JSON ({exc}); rerun the run or `dasgd report` it"
        ) from exc
    return data if isinstance(data, dict) else {}


def _spec_values(run_dir: Path) -> dict[str, Any]:
    import yaml

    path = run_dir / "spec.yaml"
    if not path.is_file():
        raise TheoryReportError(
            f"{run_dir} has no spec.yaml; the theory section rebuilds the task and x0 from it. Give a run "
            "directory written by `dasgd train` or `dasgd simulate`"
        )
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise TheoryReportError(f"{path} is not UTF-8 text (a binary or damaged file)") from exc
    except yaml.YAMLError as exc:
        raise TheoryReportError(f"{path} is not valid YAML ({exc}); restore it from the run") from exc
    if not isinstance(values, dict):
        raise TheoryReportError(f"{path} must hold a mapping of spec keys")
    return values


def _build(values: dict[str, Any]) -> tuple[Any, Any]:
    """The spec and task of the run (imported here: metrics sits below experiments and runtime).

    Keys this version's RunSpec does not know (a spec from another version, or settings such as an optimizer's
    momentum that only the flags read) are left out of the rebuild.
    """
    import dataclasses

    from dasgd.experiments.spec import RunSpec, resolve_spec
    from dasgd.runs.build import build_task

    known = {f.name for f in dataclasses.fields(RunSpec)}
    spec = resolve_spec({k: v for k, v in values.items() if k in known}, simulate=True)
    return spec, build_task(spec)


def _training_evals(evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # The end-of-run evaluation ("final") is of x_T after the drain, not of a model that computed a gradient.
    rows = [ev for ev in evals if not ev.get("final") and "grad_norm_sq" in ev]
    return sorted(rows, key=lambda ev: (float(ev["time"]), int(ev["gradients"])))


def _loss_of(metrics: dict[str, Any]) -> float | None:
    value = metrics.get("train_loss", metrics.get("loss"))
    return None if value is None else float(value)


def _flags(
    values: dict[str, Any],
    summary: dict[str, Any],
    model: torch.nn.Module,
    stats: StalenessStats,
    bounds: tuple[BoundValue | None, BoundValue | None],
    diverged: bool,
) -> list[Flag]:
    from dasgd.algorithms import ALGORITHMS

    flags: list[Flag] = []
    name = str(values.get("algorithm", summary.get("algorithm", "dasgd")))
    cls = ALGORITHMS.get(name)
    if cls is None or not getattr(cls, "faithful", False):
        why = "is not a registered algorithm" if cls is None else "is not the paper's fixed-stepsize SGD"
        flags.append(Flag("algorithm", f"algorithm {name!r} {why}: the bounds are for DASGD (faithful) only"))
    optimizer = str(values.get("optimizer") or "sgd").lower()
    if any(word in optimizer or word in name.lower() for word in _ADAPTIVE_WORDS):
        flags.append(
            Flag("adaptive", "an adaptive optimizer is outside the theory (fixed-stepsize SGD only)")
        )
    momentum = [key for key in _MOMENTUM_KEYS if values.get(key) not in (None, 0, 0.0, False)]
    if momentum or "momentum" in name.lower():
        flags.append(
            Flag(
                "momentum", f"momentum or weight decay ({', '.join(momentum) or name}) is outside the theory"
            )
        )
    batchnorm = [m for m in model.modules() if isinstance(m, _NORM_LAYERS)]
    # Any buffer (running mean, variance, counts) is model state that gradients do not describe.
    if batchnorm or any(True for _ in model.buffers()):
        flags.append(
            Flag(
                "batchnorm",
                "the model has BatchNorm or other running statistics: state outside the gradients",
            )
        )
    if values.get("data") == "shards":
        flags.append(
            Flag(
                "shards",
                "data=shards: workers sample disjoint shards (heterogeneous), the theory needs shared",
            )
        )
    for bound in bounds:
        if bound is not None and not bound.stepsize_ok:
            flags.append(
                Flag(
                    "stepsize",
                    f"stepsize {bound.eta:.4g} is above {bound.name}'s condition eta <= "
                    f"{bound.stepsize_limit:.4g}: {bound.name} is not proven for this run",
                )
            )
    lost = summary.get("gradients_lost")
    if isinstance(lost, (int, float)) and lost > 0:
        flags.append(Flag("lost", f"{int(lost)} gradients never reached every replica (a worker died)"))
    if stats.anomalies:
        flags.append(
            Flag("anomalies", f"{stats.anomalies} clock anomalies: staleness is approximate (clock skew)")
        )
    if diverged:
        flags.append(
            Flag(
                "diverged",
                "the gradient norm ended above where it started (or is not finite): the run diverged",
            )
        )
    return flags


def _gradients_at(times: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Gradients computed (completed) by each time."""
    return np.searchsorted(np.sort(ends), times, side="right").astype(np.int64)


def analyze_run(run_dir: str | os.PathLike[str], *, seed: int = 0, log: EventLog | None = None) -> RunTheory:
    """The theory section's content for the run in ``run_dir`` (see the module docstring).

    Args:
        run_dir: a run directory written by ``dasgd train`` or ``dasgd simulate``.
        seed: the estimators' seed (the same seed gives the same estimates).
        log: the run's event log, if the caller has read it already (else it is read from the directory).

    Raises:
        TheoryReportError: the directory, its spec, its event log, or the ``grad_norm_sq`` records are missing
            or unreadable, or the task cannot be rebuilt (the message names the fix).
    """
    from dasgd.metrics.estimators import EstimatorError
    from dasgd.metrics.eventlog import read_event_log

    run = Path(run_dir)
    if not run.is_dir():
        raise TheoryReportError(
            f"{run} is not a directory; give a run directory written by `dasgd train` or `dasgd simulate`"
        )
    if not (run / "events.jsonl").is_file():
        raise TheoryReportError(
            f"{run} has no events.jsonl; give a run directory written by `dasgd train` or `dasgd simulate`"
        )
    if log is None:
        try:
            log = read_event_log(run / "events.jsonl")
        except UnicodeDecodeError as exc:
            raise TheoryReportError(
                f"{run}/events.jsonl is not UTF-8 text (a binary or damaged file)"
            ) from exc
        except ValueError as exc:
            raise TheoryReportError(str(exc)) from exc
    if log.num_gradients == 0:
        raise TheoryReportError(f"{run}/events.jsonl records no gradients; the run computed nothing")
    evals = _training_evals(log.evals)
    if not evals:
        raise TheoryReportError(
            f"{run}/events.jsonl has no evaluation with grad_norm_sq (the run predates the theory records, or "
            "its task does not report them); rerun it with this version of dasgd"
        )
    summary = _read_json(run / "summary.json")
    values = _spec_values(run)
    try:
        spec, task = _build(values)
    except ValueError as exc:  # SpecError, TaskError, DatasetMissing: each names its fix
        raise TheoryReportError(f"cannot rebuild the run's task from spec.yaml: {exc}") from exc
    from dasgd.runs.build import resolve

    resolved = resolve(spec)
    eta = float(summary.get("lr") or resolved.lr)
    batch_size = int(summary.get("batch_size") or resolved.batch_size)
    stats = log.staleness()  # computed once per log: the plots and the summary ask for it too
    s_sq = mean_square_staleness(stats.per_gradient)
    omega = coverage_constant(stats.loose)
    model = task.build_model(spec.seed)
    loss_x0 = _loss_of(task.evaluate(model, full=False))
    if loss_x0 is None:
        raise TheoryReportError(f"task {spec.task!r} reports no training loss; the theory section needs one")
    norms = np.array([float(ev["grad_norm_sq"]) for ev in evals])
    losses = [v for v in (_loss_of(ev) for ev in evals) if v is not None]
    try:
        constants = estimate_constants(
            task, model, batch_size, grad_norm_sq=norms, train_losses=losses, loss_x0=loss_x0, seed=seed
        )
    except EstimatorError as exc:
        raise TheoryReportError(f"cannot estimate the bounds' constants: {exc}") from exc
    # Not finite, or ending above where it started: the run moved away from stationarity.
    diverged = not bool(np.all(np.isfinite(norms))) or float(norms[-1]) > float(norms[0])
    lip = constants.smoothness.used
    sigma = math.sqrt(max(0.0, constants.noise_sq.used))
    f0 = max(0.0, constants.initial_gap.used)
    q = constants.grad_bound.used
    total = log.num_gradients
    usable = all(math.isfinite(v) for v in (lip, sigma, f0)) and lip > 0
    b1 = b2 = None
    n1 = n2 = None
    eps_mean = float(np.mean(norms))
    if usable:
        b2 = bound2(T=total, eta=eta, L=lip, sigma=sigma, F0=f0, s_avg=stats.s_avg, coverage=omega)
        if eps_mean > 0:
            n2 = gradients_needed_bound2(
                eps=eps_mean, L=lip, sigma=sigma, F0=f0, s_avg=stats.s_avg, coverage=omega
            )
        if math.isfinite(q):
            b1 = bound1(T=total, eta=eta, L=lip, sigma=sigma, F0=f0, Q=q, s_avg=stats.s_avg, s_sq_avg=s_sq)
            if eps_mean > 0:
                n1 = gradients_needed_bound1(
                    eps=eps_mean, L=lip, sigma=sigma, F0=f0, Q=q, s_avg=stats.s_avg, s_sq_avg=s_sq
                )
    flags = _flags(values, summary, model, stats, (b1, b2), diverged)
    times = np.array([float(ev["time"]) for ev in evals])
    return RunTheory(
        run_dir=run,
        task=spec.task,
        algorithm=spec.algorithm,
        workers=spec.workers,
        eta=eta,
        batch_size=batch_size,
        gradients=total,
        staleness=stats,
        s_sq_avg=s_sq,
        coverage=omega,
        constants=constants,
        eps_min=float(np.min(norms)),
        eps_mean=eps_mean,
        evaluations=len(evals),
        bound1=b1,
        bound2=b2,
        needed1=n1,
        needed2=n2,
        flags=tuple(flags),
        eval_gradients=_gradients_at(times, log.end),
        eval_grad_norm_sq=norms,
    )


def plot_theory(result: RunTheory, path: str | os.PathLike[str]) -> Path:
    """Draw the squared gradient norm against gradients computed, with each bound as a function of ``T``.

    The bound curves use the whole run's stepsize, staleness and constants at every ``T`` (the bound on the
    running average up to ``T``); a bound whose stepsize condition fails is dashed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.maximum(result.eval_gradients, 0)
    y = result.eval_grad_norm_sq
    finite = np.isfinite(y) & (y > 0)
    ax.plot(
        x[finite],
        y[finite],
        ".",
        color="C0",
        markersize=4,
        label=r"$\|\nabla f\|^2$ of the evaluated replica",
    )
    running = np.cumsum(y) / np.arange(1, y.size + 1)
    ok = np.isfinite(running) & (running > 0)
    ax.plot(x[ok], running[ok], "-", color="C0", label="running average")
    grid = np.unique(np.geomspace(1, max(2, result.gradients), 200).astype(np.int64))
    for bound, color in ((result.bound1, "C3"), (result.bound2, "C2")):
        if bound is None:
            continue
        scale = bound.terms[0].value * bound.gradients
        curve = scale / grid + bound.floor
        style = "-" if bound.stepsize_ok else "--"
        note = "" if bound.stepsize_ok else " (stepsize above its condition: not proven)"
        ax.plot(grid, curve, style, color=color, label=f"{bound.name} on the average up to T{note}")
    ax.set_yscale("log")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0)
    ax.set_xlabel("gradients computed T (all workers)")
    ax.set_ylabel(r"squared gradient norm $\|\nabla f\|^2$")
    ax.set_title(f"{result.algorithm} on {result.task}, {result.workers} workers: against the bounds")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _fmt(value: Any) -> str:
    from dasgd.runs.report import format_value

    return format_value(value)


def _estimate_row(label: str, est: Any) -> str:
    exact = _fmt(est.exact) if est.exact is not None else "unknown"
    return f"| {label} | {_fmt(est.value)} | {exact} | {_fmt(est.used)} | {est.method} |"


def format_theory(result: RunTheory, *, level: int = 2) -> list[str]:
    """The theory section as Markdown lines (headings at ``level``)."""
    h = "#" * level
    st = result.staleness
    c = result.constants
    lines = [f"{h} Theory: the run against the paper's bounds", ""]
    if result.flags:
        lines += ["**Outside the theory's assumptions:**", ""]
        lines += [f"- {f.message}" for f in result.flags]
        lines.append("")
    else:
        lines += [
            "Inside the theory's assumptions (faithful DASGD, shared data, stepsize within both conditions).",
            "",
        ]
    lines += [
        f"T = {result.gradients} gradients, stepsize eta = {_fmt(result.eta)}, batch {result.batch_size}. "
        "Derivation and constants: docs/theory.md (all constants are ours; the paper states orders only).",
        "",
        "| staleness | value |",
        "|---|---|",
        f"| S_avg | {_fmt(st.s_avg)} |",
        f"| S_max | {_fmt(st.s_max)} |",
        f"| S^_avg | {_fmt(st.loose_avg)} |",
        f"| S^_max | {_fmt(st.loose_max)} |",
        f"| sqrt(mean s_k^2) (bound 1) | {_fmt(math.sqrt(result.s_sq_avg))} |",
        f"| Omega, loose-window coverage (bound 2) | {_fmt(result.coverage)} |",
        f"| sqrt(S^_avg S^_max) (the paper's form of sqrt(Omega)) | {_fmt(math.sqrt(st.loose_avg * st.loose_max))} |",
        "",
        "| constant | estimate | exact | used | how |",
        "|---|---|---|---|---|",
        _estimate_row("L (smoothness)", c.smoothness),
        _estimate_row("sigma^2 (noise of one mini-batch gradient)", c.noise_sq),
        _estimate_row("Q (largest gradient norm)", c.grad_bound),
        _estimate_row("F0 = f(x0) - f*", c.initial_gap),
        "",
    ]
    bounds = [b for b in (result.bound1, result.bound2) if b is not None]
    if not bounds:
        lines += ["*The bounds could not be evaluated (a constant is not finite).*", ""]
        return lines
    names = [b.name for b in bounds]
    lines += [
        f"Bounds on the average over k of E ||grad f(y_k)||^2 at this T and stepsize; reached: average "
        f"{_fmt(result.eps_mean)}, smallest {_fmt(result.eps_min)} over {result.evaluations} evaluations.",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(bounds),
        "| stepsize condition | " + " | ".join(f"eta <= {_fmt(b.stepsize_limit)}" for b in bounds) + " |",
        "| condition met | " + " | ".join(_fmt(b.stepsize_ok) for b in bounds) + " |",
    ]
    term_names = list(dict.fromkeys(t.name for b in bounds for t in b.terms))
    for name in term_names:
        cells = []
        for b in bounds:
            term = next((t for t in b.terms if t.name == name), None)
            cells.append("—" if term is None else f"{_fmt(term.value)} ({term.formula})")
        lines.append(f"| term: {name} | " + " | ".join(cells) + " |")
    lines += [
        "| **bound (epsilon allowed at this T)** | "
        + " | ".join(f"**{_fmt(b.total)}**" for b in bounds)
        + " |",
        "| reached average within it | " + " | ".join(_fmt(result.within(b)) for b in bounds) + " |",
        "| T needed for the reached average at this stepsize | "
        + " | ".join(_fmt(b.gradients_for(result.eps_mean)) if result.eps_mean > 0 else "n/a" for b in bounds)
        + " |",
    ]
    needed = [n for n in (result.needed1, result.needed2) if n is not None]
    if needed:
        lines += [
            "",
            f"Gradients each bound needs to guarantee epsilon = {_fmt(result.eps_mean)} (the reached average) "
            "with the stepsize chosen for it (closed form, term by term):",
            "",
            "| bound | stepsize | T | terms |",
            "|---|---|---|---|",
        ]
        for n in needed:
            terms = "; ".join(f"{t.name} {_fmt(t.value)}" for t in n.terms)
            lines.append(
                f"| {n.name} | {_fmt(n.eta)} | {_fmt(n.exact)} (terms sum {_fmt(n.total)}) | {terms} |"
            )
    lines += [
        "",
        f"Figure: plots/{THEORY_PLOT}. The measured values are the evaluated replica's at evaluation times, a "
        "sample of the models y_k the bounds average over; one run is one draw of the expectation.",
        "",
    ]
    return lines


def write_theory(run_dir: str | os.PathLike[str], *, seed: int = 0) -> tuple[RunTheory, list[Path]]:
    """Analyse the run and write ``RUN_DIR/theory.md`` and ``RUN_DIR/plots/theory_grad_norm.png``.

    Raises:
        TheoryReportError: see :func:`analyze_run`.
    """
    result = analyze_run(run_dir, seed=seed)
    run = Path(run_dir)
    plot = plot_theory(result, run / "plots" / THEORY_PLOT)
    text = run / "theory.md"
    text.write_text("\n".join(format_theory(result, level=1)).rstrip("\n") + "\n", encoding="utf-8")
    return result, [text, plot]


def report_section(run_dir: str | os.PathLike[str], *, log: EventLog | None = None) -> list[str]:
    """The theory section of ``report.md`` (and its figure, written to ``plots/``); never raises on content.

    A run the section cannot be computed for (no spec, no ``grad_norm_sq`` records, a missing dataset, ...)
    gets a short section that says why.
    """
    try:
        result = analyze_run(run_dir, log=log)
        plot_theory(result, Path(run_dir) / "plots" / THEORY_PLOT)
    # Every input problem is a ValueError subclass; extreme settings (a stepsize of 1e300) overflow the bounds.
    except (ValueError, OSError, RuntimeError, ArithmeticError) as exc:
        return ["## Theory", "", f"*Not available for this run: {exc}*", ""]
    return format_theory(result, level=2)
