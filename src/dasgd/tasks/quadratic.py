"""A strongly convex quadratic with additive Gaussian gradient noise: every constant of the theory is known.

Objective::

    f(x) = 0.5 * (x - x*)^T A (x - x*),      A = diag(a_1, ..., a_d)

with eigenvalues ``a_i`` log-spaced from ``L / condition`` to ``L`` and ``L = 1``. So the smoothness is
``L = max a_i = 1``, the strong convexity is ``mu = min a_i = 1 / condition`` (for ``dim = 1`` the single
eigenvalue is ``L``), ``f* = 0`` and the minimiser ``x*`` is drawn once from the problem ``seed``.

Noise model (the stochastic oracle)::

    g(x) = A (x - x*) + xi_bar,      xi_bar = (1/b) * sum_{r=1..b} xi_r,      xi_r ~ N(0, sigma^2 / d * I)

One sample ``xi_r`` has ``E ||xi_r||^2 = sigma^2``; a batch of ``b`` samples averages them, so the gradient
noise has covariance ``sigma^2 / (b d) I`` and ``E ||g(x) - grad f(x)||^2 = sigma^2 / b``. A :class:`Batch` of
this task carries the draws: ``batch.x`` is the ``(b, d)`` float64 matrix of the ``xi_r`` and ``batch.y`` is
None. The task's loss on a batch is ``f(x) + xi_bar . x``, whose autograd gradient is exactly ``g(x)`` and
whose expectation is ``f(x)``.

The model is a module with a single float64 parameter vector ``x`` (float64 so the exact oracles are precise);
``build_model(seed)`` starts it at ``x* + N(0, I)``, a fixed distance scale (``E ||x0 - x*||^2 = d``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dasgd.tasks.base import Batch, BatchSampler, Task, TaskError, check_sampler_args
from dasgd.tasks.registry import TaskEntry

__all__ = ["QUADRATIC", "NoiseSampler", "QuadraticModel", "QuadraticTask"]

# Stream tags keep the problem instance and the model initialisation statistically independent even when the
# user passes the same number as problem seed and model seed.
_OPTIMUM_STREAM = 1
_INIT_STREAM = 2


class QuadraticModel(torch.nn.Module):
    """The point ``x`` the quadratic task optimises, as one float64 parameter."""

    def __init__(self, x0: torch.Tensor) -> None:
        """A model at ``x0`` (copied)."""
        super().__init__()
        self.x = torch.nn.Parameter(x0.detach().clone().to(torch.float64))

    def forward(self) -> torch.Tensor:
        """The current point."""
        return self.x


class NoiseSampler(BatchSampler):
    """Draws the gradient noise of the quadratic task: batches of ``b`` i.i.d. ``N(0, sigma^2/d I)`` rows.

    The noise has no finite training set, so there are no epochs and a shard restricts nothing: every stream
    is an independent draw of the same distribution, determined by its seed.
    """

    def __init__(self, dim: int, noise: float, batch_size: int, seed: int) -> None:
        """A stream of ``(batch_size, dim)`` noise matrices from ``numpy`` Generator ``seed``."""
        self._scale = noise / math.sqrt(dim)
        self._shape = (int(batch_size), int(dim))
        self._rng = np.random.default_rng(seed)

    def state(self) -> dict:
        return {"rng": self._rng.bit_generator.state}

    def set_state(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]

    def next(self) -> Batch:
        """The next batch of noise draws (float64)."""
        return Batch(torch.from_numpy(self._rng.standard_normal(self._shape) * self._scale), None)


class QuadraticTask(Task):
    """The quadratic task described in the module docstring."""

    name = "quadratic"

    def __init__(self, dim: int = 100, noise: float = 1.0, condition: float = 10.0, seed: int = 0) -> None:
        """A problem instance of dimension ``dim``, noise level ``noise`` (sigma) and condition number
        ``condition``, with its minimiser drawn from ``seed``.

        Raises:
            TaskError: an option is out of range.
        """
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise TaskError(f"quadratic option dim must be a positive integer, got {dim!r}")
        if not _is_real(noise) or not noise >= 0 or not math.isfinite(noise):
            raise TaskError(f"quadratic option noise (sigma) must be a finite number >= 0, got {noise!r}")
        if not _is_real(condition) or not condition >= 1 or not math.isfinite(condition):
            raise TaskError(f"quadratic option condition must be a finite number >= 1, got {condition!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise TaskError(f"quadratic option seed must be a non-negative integer, got {seed!r}")
        self._dim = int(dim)
        self._noise = float(noise)
        self._condition = float(condition)
        self._seed = int(seed)
        lipschitz = 1.0
        if self._dim == 1:
            eigenvalues = np.array([lipschitz])
        else:
            eigenvalues = np.geomspace(lipschitz / self._condition, lipschitz, self._dim)
        optimum = np.random.default_rng([_OPTIMUM_STREAM, self._seed]).standard_normal(self._dim)
        self._a = torch.from_numpy(eigenvalues)
        self._x_star = torch.from_numpy(optimum)

    @property
    def dim(self) -> int:
        """Dimension ``d`` of the problem."""
        return self._dim

    @property
    def eigenvalues(self) -> torch.Tensor:
        """The diagonal of ``A`` (a float64 copy)."""
        return self._a.clone()

    @property
    def smoothness(self) -> float:
        """``L``, the largest eigenvalue of ``A`` (1 by construction)."""
        return float(self._a.max())

    @property
    def strong_convexity(self) -> float:
        """``mu``, the smallest eigenvalue of ``A``."""
        return float(self._a.min())

    @property
    def optimum(self) -> torch.Tensor:
        """The minimiser ``x*`` (a float64 copy); ``f(x*) = 0``."""
        return self._x_star.clone()

    @property
    def noise(self) -> float:
        """``sigma``: one noise sample has ``E ||xi||^2 = sigma^2``; a batch of ``b`` has ``sigma^2 / b``."""
        return self._noise

    @property
    def accuracy_metric(self) -> str | None:
        """None: the quadratic has no accuracy."""
        return None

    def build_model(self, seed: int) -> torch.nn.Module:
        """A :class:`QuadraticModel` at ``x* + N(0, I)``, drawn from ``seed``."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise TaskError(f"model seed must be a non-negative integer, got {seed!r}")
        offset = np.random.default_rng([_INIT_STREAM, int(seed)]).standard_normal(self._dim)
        return QuadraticModel(self._x_star + torch.from_numpy(offset))

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """``f(x) + xi_bar . x``: an unbiased estimate of ``f(x)`` whose gradient is the noisy oracle."""
        x = self._point(model)
        if batch.x.ndim != 2 or batch.x.shape[1] != self._dim:
            raise TaskError(f"a quadratic batch must have shape (b, {self._dim}), got {tuple(batch.x.shape)}")
        xi_bar = batch.x.to(device=x.device, dtype=torch.float64).mean(dim=0)
        a, x_star = self._a.to(x.device), self._x_star.to(x.device)
        return 0.5 * torch.dot(a * (x - x_star), x - x_star) + torch.dot(xi_bar, x)

    def sampler(self, seed: int, batch_size: int, shard: tuple[int, int] | None = None) -> BatchSampler:
        """A :class:`NoiseSampler`; ``shard`` is validated but changes nothing (the noise is i.i.d.)."""
        check_sampler_args(seed, batch_size, shard, size=None)
        return NoiseSampler(self._dim, self._noise, batch_size, seed)

    def evaluate(self, model: torch.nn.Module, *, full: bool = True) -> dict[str, float]:
        """Exact ``{"loss": f(x) - f*, "grad_norm_sq": ||grad f(x)||^2, "dist_sq": ||x - x*||^2}``.

        ``loss`` is the training objective itself (``f* = 0``), so there is no separate ``train_loss``.
        ``full`` is accepted for interface compatibility; the values are always exact.
        """
        with torch.no_grad():
            x = self._point(model).detach().to("cpu", torch.float64)
            delta = x - self._x_star
            gradient = self._a * delta
            return {
                "loss": float(0.5 * torch.dot(gradient, delta)),
                "grad_norm_sq": float(torch.dot(gradient, gradient)),
                "dist_sq": float(torch.dot(delta, delta)),
            }

    def theory_constants(self, batch_size: int) -> dict[str, float]:
        """The exact ``L`` (largest eigenvalue), ``sigma_sq = sigma^2 / batch_size`` and ``f_star = 0``.

        Raises:
            TaskError: ``batch_size`` is not a positive integer.
        """
        check_sampler_args(0, batch_size, None, size=None)
        return {"L": self.smoothness, "sigma_sq": self._noise**2 / int(batch_size), "f_star": 0.0}

    def describe(self) -> dict[str, object]:
        """Name, parameter count, (unbounded) dataset sizes, options and the exact constants."""
        return {
            "name": self.name,
            "parameters": self._dim,
            "train_size": None,
            "test_size": None,
            "options": {
                "dim": self._dim,
                "noise": self._noise,
                "condition": self._condition,
                "seed": self._seed,
            },
            "smoothness": self.smoothness,
            "strong_convexity": self.strong_convexity,
            "f_star": 0.0,
        }

    def _point(self, model: torch.nn.Module) -> torch.Tensor:
        """The model's single parameter vector, checked against this problem's dimension."""
        parameters = list(model.parameters())
        if len(parameters) != 1 or parameters[0].shape != (self._dim,):
            shapes = [tuple(p.shape) for p in parameters]
            raise TaskError(
                f"a quadratic model has one parameter of shape ({self._dim},), got parameters {shapes}; "
                "build it with QuadraticTask.build_model"
            )
        return parameters[0]


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


QUADRATIC = TaskEntry(
    "quadratic",
    QuadraticTask,
    "noisy strongly convex quadratic (float64)",
    default_lr=0.5,
    default_budget=2000,
    # ``seed`` is the problem instance (the minimiser): the run's seed.
    options=("dim", "noise", "condition", "seed"),
    # Its curvature is known (L = 1), and with n workers each gradient misses about n others' (S_avg close to
    # n on a complete graph), while gradient descent with delays of S steps is stable only for eta * L * S
    # below about 1: the sequential 0.5 diverges from 4 workers on (16 simulated workers reached 1e110).
    lr_scales_with_workers=True,
    has_accuracy=False,
)
