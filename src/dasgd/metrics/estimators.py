"""Estimates of the constants the convergence bounds need: L, sigma^2, Q and f(x0) - f*.

Each estimator is a small function over tensors or recorded numbers, tested on quadratics whose constants are
known (tests/test_estimators.py). :func:`estimate_constants` puts them together for one task and one model
(the run's initial model ``x0`` in a theory report), next to the values the task knows exactly
(:meth:`dasgd.tasks.Task.theory_constants`); where the task knows a value, the bounds use it.

- ``L``: power iteration on Hessian-vector products (:func:`hessian_top_eigenvalue`) of the loss on one fixed
  mini-batch, at ``x0`` and at perturbed copies of it; the largest value seen. It is local to those points:
  a lower estimate of the global ``L`` for a non-quadratic objective. :func:`secant_smoothness` gives another
  lower estimate from pairs of points and gradients.
- ``sigma^2``: the spread of independent mini-batch gradients at one point (:func:`gradient_noise`): around
  the full gradient when it is known, else around their mean (the unbiased sample variance).
- ``Q``: the largest full-gradient norm seen (:func:`largest_gradient_norm`), from the recorded
  ``grad_norm_sq`` of the evaluated models (a lower estimate of the supremum over every model).
- ``f(x0) - f*``: exact when the task knows ``f*``; else ``f(x0)`` minus a known lower bound of ``f*`` (an
  upper estimate, so the bounds stay valid); else ``f(x0)`` minus the smallest loss seen (labelled estimate).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    # Only for annotations: metrics sits below tasks in the layering, and any object with the Task methods
    # used here (loss, sampler, theory_constants) will do.
    from dasgd.tasks import Task

__all__ = [
    "ESTIMATOR_SEED",
    "ConstantEstimates",
    "Estimate",
    "EstimatorError",
    "estimate_constants",
    "estimate_gradient_noise",
    "estimate_smoothness",
    "gradient_noise",
    "hessian_top_eigenvalue",
    "initial_gap",
    "largest_gradient_norm",
    "secant_smoothness",
]

ESTIMATOR_SEED = 0x7E0
"""Base seed of the estimators' own data streams (kept apart from the workers' streams)."""


class EstimatorError(ValueError):
    """An estimator was given inputs it cannot estimate from (the message says what is missing)."""


@dataclass(frozen=True)
class Estimate:
    """One constant: the estimate, how it was made, and the exact value when the task knows it.

    Attributes:
        value: the estimate.
        method: how it was obtained, in a few words a reader can check.
        exact: the task's exact value, or None.
    """

    value: float
    method: str
    exact: float | None = None

    @property
    def used(self) -> float:
        """What the bounds use: the exact value when known, else the estimate."""
        return self.exact if self.exact is not None else self.value


@dataclass(frozen=True)
class ConstantEstimates:
    """The constants of one run's bounds.

    Attributes:
        smoothness: ``L``.
        noise_sq: ``sigma^2`` of one mini-batch gradient at the run's batch size.
        grad_bound: ``Q``.
        initial_gap: ``F0 = f(x0) - f*``.
        loss_x0: ``f(x0)``, the training objective at the initial model.
    """

    smoothness: Estimate
    noise_sq: Estimate
    grad_bound: Estimate
    initial_gap: Estimate
    loss_x0: float


def _trainable(model: torch.nn.Module) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise EstimatorError("the model has no trainable parameters; nothing to estimate")
    return params


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum(
        (torch.sum(x * y) for x, y in zip(a, b)), torch.zeros((), dtype=a[0].dtype, device=a[0].device)
    )


def hessian_top_eigenvalue(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    *,
    iterations: int = 30,
    tol: float = 1e-4,
    seed: int = 0,
) -> float:
    """The largest absolute eigenvalue of the Hessian of ``loss_fn()`` at ``params``, by power iteration.

    Each iteration is one Hessian-vector product (double backward through one graph of ``loss_fn()``). The
    iteration stops when the estimate changes by less than ``tol`` (relative) or after ``iterations``. The
    start vector is drawn from ``seed``. Parameters and their ``.grad`` are left unchanged.

    Raises:
        EstimatorError: ``iterations`` < 1, or no parameters.
    """
    if iterations < 1:
        raise EstimatorError(f"iterations must be at least 1, got {iterations}")
    params = list(params)
    if not params:
        raise EstimatorError("no parameters given; pass the model's trainable parameters")
    generator = torch.Generator().manual_seed(seed)
    vec = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    norm = torch.sqrt(_dot(vec, vec))
    vec = [v / norm for v in vec]
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
        value = 0.0
        for _ in range(iterations):
            hv = torch.autograd.grad(_dot(grads, vec), params, retain_graph=True)
            hv = [h.detach() for h in hv]
            size = float(torch.sqrt(_dot(hv, hv)))
            if size == 0.0 or not math.isfinite(size):
                return size
            done = abs(size - value) <= tol * size
            value = size
            vec = [h / size for h in hv]
            if done:
                break
    return value


def secant_smoothness(points: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> float:
    """``max_i ||g_{i+1} - g_i|| / ||x_{i+1} - x_i||`` over consecutive pairs: a lower estimate of ``L``.

    ``points[i]`` and ``gradients[i]`` are flat tensors (a point and the full gradient there). Pairs at the same
    point are skipped.

    Raises:
        EstimatorError: fewer than two points, lengths that differ, or no two distinct points.
    """
    if len(points) != len(gradients):
        raise EstimatorError(f"one gradient per point is needed, got {len(points)} points, {len(gradients)}")
    if len(points) < 2:
        raise EstimatorError("secant estimates need at least two points")
    best = -1.0
    for i in range(len(points) - 1):
        dx = float(torch.linalg.vector_norm((points[i + 1] - points[i]).to(torch.float64)))
        if dx == 0.0:
            continue
        dg = float(torch.linalg.vector_norm((gradients[i + 1] - gradients[i]).to(torch.float64)))
        best = max(best, dg / dx)
    if best < 0:
        raise EstimatorError("all points are equal; secant estimates need distinct points")
    return best


def gradient_noise(
    gradients: Sequence[torch.Tensor] | torch.Tensor, center: torch.Tensor | None = None
) -> float:
    """``sigma^2`` from independent stochastic gradients at one point (rows, or a sequence of flat tensors).

    With ``center`` (the full gradient): ``mean_i ||g_i - center||^2``. Without: the unbiased sample variance
    ``sum_i ||g_i - mean||^2 / (m - 1)``.

    Raises:
        EstimatorError: no gradients, or a single one without ``center``.
    """
    rows = gradients if isinstance(gradients, torch.Tensor) else torch.stack(list(gradients))
    rows = rows.reshape(rows.shape[0], -1).to(torch.float64) if rows.numel() else rows
    m = rows.shape[0] if rows.ndim else 0
    if m == 0:
        raise EstimatorError("no gradients given")
    if center is not None:
        return float(torch.mean(torch.sum((rows - center.reshape(1, -1).to(torch.float64)) ** 2, dim=1)))
    if m < 2:
        raise EstimatorError("the sample variance needs at least two gradients (or pass the full gradient)")
    return float(torch.sum((rows - rows.mean(dim=0, keepdim=True)) ** 2) / (m - 1))


def largest_gradient_norm(grad_norm_sq: Iterable[float]) -> float:
    """``Q``: the largest ``sqrt(grad_norm_sq)`` recorded (``inf`` if any record is not finite: a divergence).

    Raises:
        EstimatorError: no records.
    """
    values = [float(v) for v in grad_norm_sq]
    if not values:
        raise EstimatorError(
            "no grad_norm_sq records; rerun with a dasgd that records them at every evaluation"
        )
    if not all(math.isfinite(v) for v in values):
        return math.inf
    return math.sqrt(max(0.0, max(values)))


def initial_gap(
    loss_x0: float,
    *,
    f_star: float | None = None,
    f_star_lower: float | None = None,
    losses: Iterable[float] = (),
) -> Estimate:
    """``F0 = f(x0) - f*``: exact with ``f_star``; else ``f(x0) - f_star_lower`` (an upper estimate, so a
    bound evaluated with it stays valid); else ``f(x0) - min(losses)`` (an estimate: ``f*`` may be lower).

    Raises:
        EstimatorError: nothing to estimate ``f*`` from, or a non-finite ``f(x0)``.
    """
    if not math.isfinite(loss_x0):
        raise EstimatorError(f"f(x0) = {loss_x0} is not finite")
    if f_star is not None:
        gap = loss_x0 - f_star
        return Estimate(gap, f"f(x0) - f*, f* = {f_star:g} known exactly", exact=gap)
    if f_star_lower is not None:
        return Estimate(
            loss_x0 - f_star_lower,
            f"upper estimate f(x0) - {f_star_lower:g} (the loss is >= {f_star_lower:g})",
        )
    seen = [float(v) for v in losses if math.isfinite(float(v))]
    if not seen:
        raise EstimatorError("f* is unknown and no training losses were recorded to estimate it from")
    low = min(seen)
    return Estimate(
        loss_x0 - low, f"estimate f(x0) - {low:.4g} (f* taken as the smallest training loss seen)"
    )


def _perturbed(model: torch.nn.Module, scale: float, generator: torch.Generator) -> torch.nn.Module:
    """A deep copy of ``model`` moved by a random vector of norm ``scale * (1 + ||x||)``."""
    other = copy.deepcopy(model)
    params = _trainable(other)
    with torch.no_grad():
        size = math.sqrt(sum(float(torch.sum(p.to(torch.float64) ** 2)) for p in params))
        steps = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
        norm = math.sqrt(sum(float(torch.sum(s.to(torch.float64) ** 2)) for s in steps))
        for p, s in zip(params, steps):
            p.add_(s, alpha=scale * (1.0 + size) / norm)
    return other


def estimate_smoothness(
    task: Task,
    model: torch.nn.Module,
    *,
    batch_size: int = 512,
    points: int = 2,
    scale: float = 0.1,
    iterations: int = 20,
    seed: int = 0,
) -> float:
    """``L``: the largest Hessian eigenvalue (in absolute value) of ``task.loss`` on one fixed mini-batch of
    ``batch_size`` samples, at ``model`` and at ``points - 1`` random points around it (moved by ``scale`` of
    ``1 + ||x||``). ``model`` itself is not changed.

    Raises:
        EstimatorError: ``points`` < 1.
    """
    if points < 1:
        raise EstimatorError(f"points must be at least 1, got {points}")
    batch = task.sampler(ESTIMATOR_SEED + seed, batch_size).next()
    generator = torch.Generator().manual_seed(ESTIMATOR_SEED + seed)
    best = 0.0
    for i in range(points):
        at = model if i == 0 else _perturbed(model, scale, generator)
        value = hessian_top_eigenvalue(
            lambda at=at: task.loss(at, batch), _trainable(at), iterations=iterations, seed=seed + i
        )
        best = max(best, value)
    return best


def estimate_gradient_noise(
    task: Task,
    model: torch.nn.Module,
    batch_size: int,
    *,
    samples: int = 32,
    seed: int = 0,
    center: torch.Tensor | None = None,
) -> float:
    """``sigma^2`` at ``model``: :func:`gradient_noise` of ``samples`` mini-batch gradients of ``batch_size``
    from an estimator-only stream of the task's training data (``center``: the full gradient, if known).

    Raises:
        EstimatorError: fewer than two samples without ``center``.
    """
    sampler = task.sampler(ESTIMATOR_SEED + 1 + seed, batch_size)
    params = _trainable(model)
    rows = []
    with torch.enable_grad():
        for _ in range(samples):
            grads = torch.autograd.grad(task.loss(model, sampler.next()), params)
            rows.append(torch.cat([g.reshape(-1) for g in grads]).detach())
    return gradient_noise(rows, center)


def estimate_constants(
    task: Task,
    model: torch.nn.Module,
    batch_size: int,
    *,
    grad_norm_sq: Sequence[float],
    train_losses: Sequence[float],
    loss_x0: float,
    seed: int = 0,
    hvp_batch: int = 512,
    noise_samples: int = 32,
) -> ConstantEstimates:
    """Every constant of the bounds for a run of ``task`` from ``model`` (its ``x0``) at ``batch_size``.

    Args:
        task: the run's task.
        model: the initial model ``x0`` (not changed).
        batch_size: the run's mini-batch size (``sigma^2`` is per mini-batch gradient).
        grad_norm_sq: the recorded squared full-gradient norms of the evaluated models.
        train_losses: the recorded training losses (for ``f*`` when the task does not know it).
        loss_x0: ``f(x0)``.
        seed: the estimators' seed.
        hvp_batch: samples in the mini-batch whose Hessian gives ``L``.
        noise_samples: mini-batch gradients drawn for ``sigma^2``.

    Raises:
        EstimatorError: no ``grad_norm_sq`` records, or nothing to estimate ``f*`` from.
    """
    known = task.theory_constants(batch_size)
    points = 2
    smooth = estimate_smoothness(task, model, batch_size=hvp_batch, points=points, seed=seed)
    noise = estimate_gradient_noise(task, model, batch_size, samples=noise_samples, seed=seed)
    return ConstantEstimates(
        smoothness=Estimate(
            smooth,
            f"Hessian power iteration at x0 and {points - 1} nearby point(s), one {hvp_batch}-sample batch",
            known.get("L"),
        ),
        noise_sq=Estimate(
            noise,
            f"variance of {noise_samples} mini-batch gradients at x0 (batch {batch_size})",
            known.get("sigma_sq"),
        ),
        grad_bound=Estimate(
            largest_gradient_norm(grad_norm_sq), "largest full-gradient norm of the evaluated models"
        ),
        initial_gap=initial_gap(
            loss_x0, f_star=known.get("f_star"), f_star_lower=known.get("f_star_lower"), losses=train_losses
        ),
        loss_x0=float(loss_x0),
    )
