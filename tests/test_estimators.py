"""The estimators of L, sigma^2, Q and f(x0) - f*, checked on quadratics whose constants are known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dasgd.metrics.estimators import (
    Estimate,
    EstimatorError,
    estimate_constants,
    estimate_gradient_noise,
    estimate_smoothness,
    gradient_noise,
    hessian_top_eigenvalue,
    initial_gap,
    largest_gradient_norm,
    secant_smoothness,
)
from dasgd.tasks import Batch, make_task


def _rotated(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    """A symmetric matrix with the given spectrum in a random orthonormal basis (not diagonal)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return torch.from_numpy(basis @ np.diag(eigenvalues) @ basis.T)


# --- L ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spectrum", "top"),
    [([5.0, 2.0, 1.0, 0.5], 5.0), ([3.0, -7.0, 1.0], 7.0), ([0.25, 0.5, 1.0, 2.0, 4.0, 8.0], 8.0)],
)
def test_power_iteration_finds_the_largest_absolute_eigenvalue(spectrum: list[float], top: float) -> None:
    a = _rotated(spectrum)
    x = torch.randn(len(spectrum), dtype=torch.float64, requires_grad=True)
    b = torch.ones(len(spectrum), dtype=torch.float64)

    def loss() -> torch.Tensor:
        return 0.5 * x @ a @ x + b @ x

    value = hessian_top_eigenvalue(loss, [x], iterations=200, tol=1e-12)
    assert value == pytest.approx(top, rel=1e-6)
    assert x.grad is None  # the parameters' .grad is left alone


def test_power_iteration_over_several_parameter_tensors() -> None:
    """The Hessian is block-diagonal over two tensors with tops 3 and 6: the estimate is the larger one."""
    u = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    v = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    au, av = _rotated([3.0, 1.0], 1), _rotated([6.0, 2.0, 0.5], 2)

    def loss() -> torch.Tensor:
        return 0.5 * (u @ au @ u + v @ av @ v)

    assert hessian_top_eigenvalue(loss, [u, v], iterations=300, tol=1e-12) == pytest.approx(6.0, rel=1e-6)


def test_estimate_smoothness_on_the_quadratic_task_matches_its_exact_l() -> None:
    task = make_task("quadratic", dim=6, condition=4.0, noise=1.0)
    exact = task.theory_constants(8)["L"]
    assert exact == 1.0
    model = task.build_model(0)
    before = model.x.detach().clone()
    assert estimate_smoothness(task, model, iterations=60, points=3) == pytest.approx(exact, rel=1e-4)
    assert torch.equal(model.x.detach(), before)  # perturbed points are copies


def test_secant_smoothness_along_the_top_eigenvector_is_exact_and_otherwise_below() -> None:
    a = _rotated([4.0, 1.0, 0.5], 3)
    values, vectors = np.linalg.eigh(a.numpy())
    top = torch.from_numpy(vectors[:, np.argmax(values)])
    points = [torch.zeros(3, dtype=torch.float64), 0.7 * top, -1.3 * top]
    assert secant_smoothness(points, [a @ p for p in points]) == pytest.approx(4.0, rel=1e-12)
    rng = torch.Generator().manual_seed(0)
    walk = [torch.randn(3, generator=rng, dtype=torch.float64) for _ in range(20)]
    ratio = secant_smoothness(walk, [a @ p for p in walk])
    assert 0.5 <= ratio <= 4.0 + 1e-12


def test_secant_smoothness_rejects_what_it_cannot_use() -> None:
    one = torch.zeros(2)
    with pytest.raises(EstimatorError, match="at least two"):
        secant_smoothness([one], [one])
    with pytest.raises(EstimatorError, match="one gradient per point"):
        secant_smoothness([one, one], [one])
    with pytest.raises(EstimatorError, match="distinct"):
        secant_smoothness([one, one], [one, one])


# --- sigma^2 ------------------------------------------------------------------------------------------------


def test_gradient_noise_hand_worked() -> None:
    grads = [torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])]
    assert gradient_noise(grads) == pytest.approx(2.0)  # ((1-2)^2 + (3-2)^2) / (2 - 1)
    assert gradient_noise(grads, center=torch.zeros(2)) == pytest.approx(5.0)  # (1 + 9) / 2
    with pytest.raises(EstimatorError, match="at least two"):
        gradient_noise(grads[:1])
    with pytest.raises(EstimatorError, match="no gradients"):
        gradient_noise(torch.zeros(0, 2))


def test_gradient_noise_recovers_a_known_covariance() -> None:
    """g = A x + xi with xi ~ N(0, diag(1, 4, 9)): sigma^2 = trace = 14 (standard error about 1.6%)."""
    rng = np.random.default_rng(5)
    a = _rotated([2.0, 1.0, 0.5], 4)
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    full = a @ x
    noise = torch.from_numpy(rng.standard_normal((4000, 3)) * np.array([1.0, 2.0, 3.0]))
    grads = full.unsqueeze(0) + noise
    assert gradient_noise(grads, center=full) == pytest.approx(14.0, rel=0.06)
    assert gradient_noise(grads) == pytest.approx(14.0, rel=0.06)


def test_quadratic_task_noise_matches_its_exact_sigma_sq() -> None:
    """The task's own batches, centred on the hand-computed full gradient A (x - x*), against sigma^2 / b."""
    task = make_task("quadratic", dim=20, noise=2.0, condition=10.0, seed=1)
    batch_size = 4
    exact = task.theory_constants(batch_size)["sigma_sq"]
    assert exact == pytest.approx(2.0**2 / batch_size)
    model = task.build_model(3)
    full = task.eigenvalues * (model.x.detach() - task.optimum)
    sampler = task.sampler(11, batch_size)
    grads = []
    for _ in range(600):
        (g,) = torch.autograd.grad(task.loss(model, sampler.next()), [model.x])
        grads.append(g)
    assert gradient_noise(grads, center=full) == pytest.approx(exact, rel=0.06)
    estimate = estimate_gradient_noise(task, model, batch_size, samples=600)
    assert estimate == pytest.approx(exact, rel=0.06)


# --- Q and F0 ------------------------------------------------------------------------------------------------


def test_largest_gradient_norm() -> None:
    assert largest_gradient_norm([4.0, 9.0, 1.0]) == 3.0
    assert largest_gradient_norm([4.0, math.inf]) == math.inf
    assert largest_gradient_norm([4.0, math.nan]) == math.inf
    with pytest.raises(EstimatorError, match="no grad_norm_sq"):
        largest_gradient_norm([])


def test_initial_gap_prefers_exact_then_lower_bound_then_smallest_loss() -> None:
    exact = initial_gap(5.0, f_star=1.0, f_star_lower=0.0, losses=[2.0])
    assert (exact.value, exact.exact, exact.used) == (4.0, 4.0, 4.0)
    upper = initial_gap(5.0, f_star_lower=0.0, losses=[2.0])
    assert (upper.value, upper.exact, upper.used) == (5.0, None, 5.0)
    assert "upper estimate" in upper.method
    seen = initial_gap(5.0, losses=[3.0, 2.5, math.nan, 4.0])
    assert seen.value == 2.5 and "estimate" in seen.method
    with pytest.raises(EstimatorError, match="f\\* is unknown"):
        initial_gap(5.0)
    with pytest.raises(EstimatorError, match="not finite"):
        initial_gap(math.inf, f_star=0.0)


def test_estimate_used_value() -> None:
    assert Estimate(2.0, "x").used == 2.0
    assert Estimate(2.0, "x", exact=1.0).used == 1.0


def test_estimate_constants_on_the_quadratic_task() -> None:
    task = make_task("quadratic", dim=8, noise=1.5, condition=3.0, seed=2)
    model = task.build_model(0)
    # f(x0) by hand: 0.5 sum a_i (x_i - x*_i)^2.
    delta = model.x.detach() - task.optimum
    loss_x0 = float(0.5 * torch.sum(task.eigenvalues * delta**2))
    constants = estimate_constants(
        task, model, 5, grad_norm_sq=[0.5, 2.25, 1.0], train_losses=[loss_x0, 0.1], loss_x0=loss_x0
    )
    assert constants.smoothness.exact == 1.0
    assert constants.smoothness.value == pytest.approx(1.0, rel=0.02)
    assert constants.noise_sq.exact == pytest.approx(1.5**2 / 5)
    assert constants.noise_sq.value == pytest.approx(1.5**2 / 5, rel=0.6)  # 32 samples: a rough check
    assert constants.grad_bound.used == 1.5
    assert constants.initial_gap.used == pytest.approx(loss_x0)
    assert constants.loss_x0 == loss_x0


def test_quadratic_loss_batch_is_unbiased_for_f() -> None:
    """The loss the Hessian estimate differentiates has the same Hessian as f (the noise term is linear)."""
    task = make_task("quadratic", dim=3, noise=1.0, condition=2.0)
    model = task.build_model(0)
    batch = Batch(torch.ones(2, 3, dtype=torch.float64), None)
    grads = torch.autograd.grad(task.loss(model, batch), [model.x], create_graph=True)[0]
    hessian = torch.stack([torch.autograd.grad(grads[i], [model.x], retain_graph=True)[0] for i in range(3)])
    torch.testing.assert_close(hessian, torch.diag(task.eigenvalues))
