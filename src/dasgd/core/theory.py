"""The convergence bounds of DASGD as pure functions, with explicit constants (derivation: docs/theory.md).

Notation (all quantities of one run):

``T``         gradients computed, all workers together.
``eta``       the fixed stepsize.
``L``         smoothness of the objective ``f``.
``sigma``     gradient noise: ``E ||g - grad f(y)||^2 <= sigma^2`` for one stochastic gradient ``g`` (one
              mini-batch, at the run's batch size).
``F0``        ``f(x0) - f*``.
``Q``         bound 1 only: ``||grad f(y_k)|| <= Q`` at every model that computed a gradient.
``s_avg``     ``S_avg``, the average staleness (:mod:`dasgd.core.ledger`).
``s_sq_avg``  ``mean_k s_k^2``; at most ``S_avg * S_max`` (:func:`mean_square_staleness`).
``coverage``  ``Omega = max_j sum_{k : k - s^_k <= j < k} s^_k``, the loose-window coverage of bound 2; it lies
              between ``S^_avg^2`` and ``S^_max^2`` and equals about ``S^_avg * S^_max`` when windows cover
              the run evenly (:func:`coverage_constant`).

Both bounds hold for ``(1/T) sum_k E ||grad f(y_k)||^2`` (the models that computed the gradients, which is what
an evaluated replica is) and therefore for ``min_k``; the virtual sequence ``x_k`` satisfies the same bound
halved (bound 1) or quartered (bound 2). Every constant here is ours (derived in docs/theory.md); the paper
states only the orders.

Bound 1 (bounded gradients), valid for ``eta <= 1/(2L)``::

    4 F0/(eta T) + 2 L eta sigma^2 + 4 L^2 eta^2 sigma^2 S_avg + 4 L^2 eta^2 Q^2 mean(s_k^2)

Bound 2 (no bound on gradients, loose window), valid for ``eta <= 1/(2L max(1, sqrt(2 Omega)))``::

    8 F0/(eta T) + 4 L eta sigma^2 + 8 L^2 eta^2 sigma^2 S_avg
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "BoundValue",
    "GradientsNeeded",
    "Term",
    "TheoryError",
    "bound1",
    "bound2",
    "coverage_constant",
    "gradients_needed_bound1",
    "gradients_needed_bound2",
    "mean_square_staleness",
    "stepsize_limit_bound1",
    "stepsize_limit_bound2",
]


class TheoryError(ValueError):
    """An input of a bound formula is out of its domain (the message names it and the valid range)."""


@dataclass(frozen=True)
class Term:
    """One additive term of a bound.

    Attributes:
        name: what the term accounts for (``"initial gap"``, ``"noise"``, ...).
        formula: the term as a formula in the module's notation.
        value: the term evaluated.
    """

    name: str
    formula: str
    value: float


@dataclass(frozen=True)
class BoundValue:
    """A bound on ``(1/T) sum_k E ||grad f(y_k)||^2`` evaluated for one run.

    Attributes:
        name: ``"bound 1"`` or ``"bound 2"``.
        terms: the additive terms; the first is the initial-gap term ``c F0/(eta T)``.
        eta: the stepsize it was evaluated at.
        gradients: ``T``.
        stepsize_limit: the largest stepsize for which the bound is proven.
    """

    name: str
    terms: tuple[Term, ...]
    eta: float
    gradients: int
    stepsize_limit: float

    @property
    def total(self) -> float:
        """The bound: the sum of the terms."""
        return float(sum(t.value for t in self.terms))

    @property
    def floor(self) -> float:
        """The terms that do not shrink with ``T`` (the bound's limit as ``T`` grows at this stepsize)."""
        return float(sum(t.value for t in self.terms[1:]))

    @property
    def stepsize_ok(self) -> bool:
        """Whether ``eta`` satisfies the bound's stepsize condition (else the bound is not proven)."""
        return self.eta <= self.stepsize_limit

    def gradients_for(self, eps: float) -> float:
        """The ``T`` at which this bound, at the same stepsize and staleness, reaches ``eps``.

        ``inf`` when ``eps`` is at or below :attr:`floor` (no number of gradients gets there at this stepsize).
        """
        eps = _positive("eps", eps)
        if eps <= self.floor:
            return math.inf
        # The first term is c F0 / (eta T): its value times T is c F0 / eta, whatever T was.
        return self.terms[0].value * self.gradients / (eps - self.floor)


@dataclass(frozen=True)
class GradientsNeeded:
    """How many gradients a bound needs to guarantee ``eps``, with the stepsize chosen for ``eps``.

    Attributes:
        name: ``"bound 1"`` or ``"bound 2"``.
        eps: the target ``(1/T) sum_k E ||grad f(y_k)||^2 <= eps``.
        eta: the stepsize the closed form uses (the largest one that keeps every stepsize-dependent term
            within its share of ``eps``).
        exact: ``T`` for that stepsize: ``c F0 / (eta eps)``.
        terms: the closed form's terms, one per order in ``eps``; their sum bounds :attr:`exact`.
    """

    name: str
    eps: float
    eta: float
    exact: float
    terms: tuple[Term, ...]

    @property
    def total(self) -> float:
        """The sum of the terms (an upper bound on :attr:`exact`)."""
        return float(sum(t.value for t in self.terms))


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TheoryError(f"{name} must be a real number, got {value!r}")
    out = float(value)
    if math.isnan(out):
        raise TheoryError(f"{name} is NaN; pass a measured or estimated value")
    return out


def _positive(name: str, value: Any) -> float:
    out = _real(name, value)
    if not (out > 0 and math.isfinite(out)):
        raise TheoryError(f"{name} must be a finite number > 0, got {value!r}")
    return out


def _non_negative(name: str, value: Any) -> float:
    out = _real(name, value)
    if not (out >= 0 and math.isfinite(out)):
        raise TheoryError(f"{name} must be a finite number >= 0, got {value!r}")
    return out


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise TheoryError(f"{name} must be a positive integer (gradients), got {value!r}")
    return int(value)


def stepsize_limit_bound1(L: float) -> float:
    """The largest stepsize bound 1 is proven for: ``1/(2L)``."""
    return 1.0 / (2.0 * _positive("L", L))


def stepsize_limit_bound2(L: float, coverage: float) -> float:
    """The largest stepsize bound 2 is proven for: ``1/(2L max(1, sqrt(2 Omega)))``."""
    omega = _non_negative("coverage", coverage)
    return 1.0 / (2.0 * _positive("L", L) * max(1.0, math.sqrt(2.0 * omega)))


def bound1(
    *,
    T: int,
    eta: float,
    L: float,
    sigma: float,
    F0: float,
    Q: float,
    s_avg: float,
    s_sq_avg: float,
) -> BoundValue:
    """Bound 1 (bounded gradients) on ``(1/T) sum_k E ||grad f(y_k)||^2``; see the module docstring.

    Raises:
        TheoryError: an input out of its domain (``T`` a positive integer, ``eta``, ``L`` > 0, the rest >= 0).
    """
    t, e, lip = _count("T", T), _positive("eta", eta), _positive("L", L)
    sig, f0, q = _non_negative("sigma", sigma), _non_negative("F0", F0), _non_negative("Q", Q)
    s1, s2 = _non_negative("s_avg", s_avg), _non_negative("s_sq_avg", s_sq_avg)
    terms = (
        Term("initial gap", "4 F0 / (eta T)", 4.0 * f0 / (e * t)),
        Term("noise", "2 L eta sigma^2", 2.0 * lip * e * sig**2),
        Term("staleness x noise", "4 L^2 eta^2 sigma^2 S_avg", 4.0 * lip**2 * e**2 * sig**2 * s1),
        Term("staleness x Q", "4 L^2 eta^2 Q^2 mean(s_k^2)", 4.0 * lip**2 * e**2 * q**2 * s2),
    )
    return BoundValue("bound 1", terms, e, t, stepsize_limit_bound1(lip))


def bound2(
    *,
    T: int,
    eta: float,
    L: float,
    sigma: float,
    F0: float,
    s_avg: float,
    coverage: float,
) -> BoundValue:
    """Bound 2 (no gradient bound, loose window) on ``(1/T) sum_k E ||grad f(y_k)||^2``.

    Staleness enters through the stepsize condition (``coverage``) and through ``S_avg`` in the noise term.

    Raises:
        TheoryError: an input out of its domain.
    """
    t, e, lip = _count("T", T), _positive("eta", eta), _positive("L", L)
    sig, f0 = _non_negative("sigma", sigma), _non_negative("F0", F0)
    s1 = _non_negative("s_avg", s_avg)
    terms = (
        Term("initial gap", "8 F0 / (eta T)", 8.0 * f0 / (e * t)),
        Term("noise", "4 L eta sigma^2", 4.0 * lip * e * sig**2),
        Term("staleness x noise", "8 L^2 eta^2 sigma^2 S_avg", 8.0 * lip**2 * e**2 * sig**2 * s1),
    )
    return BoundValue("bound 2", terms, e, t, stepsize_limit_bound2(lip, coverage))


def _min_positive(*candidates: float) -> float:
    return min(c for c in candidates if c > 0)


def gradients_needed_bound1(
    *,
    eps: float,
    L: float,
    sigma: float,
    F0: float,
    Q: float,
    s_avg: float,
    s_sq_avg: float,
) -> GradientsNeeded:
    """Gradients bound 1 needs for ``eps``, with ``eta = min(1/(2L), eps/(8 L sigma^2),
    sqrt(eps)/(4 L sigma sqrt(S_avg)), sqrt(eps)/(4 L Q sqrt(mean s_k^2)))`` (each ``eta`` term <= eps/4).

    Terms: ``32 L F0/eps + 128 L F0 sigma^2/eps^2 + 64 L F0 sigma sqrt(S_avg)/eps^1.5
    + 64 L F0 Q sqrt(mean s_k^2)/eps^1.5``.

    Raises:
        TheoryError: an input out of its domain.
    """
    e, lip = _positive("eps", eps), _positive("L", L)
    sig, f0, q = _non_negative("sigma", sigma), _non_negative("F0", F0), _non_negative("Q", Q)
    s1, s2 = _non_negative("s_avg", s_avg), _non_negative("s_sq_avg", s_sq_avg)
    inf = math.inf
    eta = _min_positive(
        1.0 / (2.0 * lip),
        e / (8.0 * lip * sig**2) if sig > 0 else inf,
        math.sqrt(e) / (4.0 * lip * sig * math.sqrt(s1)) if sig * s1 > 0 else inf,
        math.sqrt(e) / (4.0 * lip * q * math.sqrt(s2)) if q * s2 > 0 else inf,
    )
    terms = (
        Term("base", "32 L F0 / eps", 32.0 * lip * f0 / e),
        Term("noise", "128 L F0 sigma^2 / eps^2", 128.0 * lip * f0 * sig**2 / e**2),
        Term(
            "staleness x noise",
            "64 L F0 sigma sqrt(S_avg) / eps^1.5",
            64.0 * lip * f0 * sig * math.sqrt(s1) / e**1.5,
        ),
        Term(
            "staleness x Q",
            "64 L F0 Q sqrt(mean s_k^2) / eps^1.5",
            64.0 * lip * f0 * q * math.sqrt(s2) / e**1.5,
        ),
    )
    return GradientsNeeded("bound 1", e, eta, 16.0 * f0 / (eta * e), terms)


def gradients_needed_bound2(
    *,
    eps: float,
    L: float,
    sigma: float,
    F0: float,
    s_avg: float,
    coverage: float,
) -> GradientsNeeded:
    """Gradients bound 2 needs for ``eps``, with ``eta = min(stepsize_limit_bound2, eps/(12 L sigma^2),
    sqrt(eps)/(L sigma sqrt(24 S_avg)))`` (each ``eta`` term <= eps/3).

    Terms: ``48 L F0 max(1, sqrt(2 Omega))/eps + 288 L F0 sigma^2/eps^2 + 24 sqrt(24) L F0 sigma sqrt(S_avg)/eps^1.5``.
    The last one is at most ``59 L F0 (sigma^2/eps^2 + S_avg/eps)`` and ``S_avg <= sqrt(Omega)``, so the
    order is the paper's ``sigma^2 eps^-2 + sqrt(S^_avg S^_max) eps^-1``.

    Raises:
        TheoryError: an input out of its domain.
    """
    e, lip = _positive("eps", eps), _positive("L", L)
    sig, f0 = _non_negative("sigma", sigma), _non_negative("F0", F0)
    s1, omega = _non_negative("s_avg", s_avg), _non_negative("coverage", coverage)
    inf = math.inf
    eta = _min_positive(
        stepsize_limit_bound2(lip, omega),
        e / (12.0 * lip * sig**2) if sig > 0 else inf,
        math.sqrt(e) / (lip * sig * math.sqrt(24.0 * s1)) if sig * s1 > 0 else inf,
    )
    spread = max(1.0, math.sqrt(2.0 * omega))
    terms = (
        Term(
            "staleness (stepsize condition)",
            "48 L F0 max(1, sqrt(2 Omega)) / eps",
            48.0 * lip * f0 * spread / e,
        ),
        Term("noise", "288 L F0 sigma^2 / eps^2", 288.0 * lip * f0 * sig**2 / e**2),
        Term(
            "staleness x noise",
            "24 sqrt(24) L F0 sigma sqrt(S_avg) / eps^1.5",
            24.0 * math.sqrt(24.0) * lip * f0 * sig * math.sqrt(s1) / e**1.5,
        ),
    )
    return GradientsNeeded("bound 2", e, eta, 24.0 * f0 / (eta * e), terms)


def _staleness_array(name: str, values: Any) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise TheoryError(f"{name} must be a 1-D array of per-gradient staleness, got shape {array.shape}")
    if array.size and array.dtype.kind not in "iu":
        raise TheoryError(f"{name} must hold integers (from StalenessStats), got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.size and array.min() < 0:
        raise TheoryError(f"{name} must be >= 0, got {int(array.min())}")
    return array


def mean_square_staleness(per_gradient: Any) -> float:
    """``mean_k s_k^2`` from ``StalenessStats.per_gradient`` (0 for an empty run)."""
    s = _staleness_array("per_gradient", per_gradient)
    return float(np.mean(s.astype(np.float64) ** 2)) if s.size else 0.0


def coverage_constant(loose: Any) -> int:
    """``Omega = max_j sum_{k : k - s^_k <= j < k} s^_k`` from ``StalenessStats.loose`` (0 for an empty run).

    Gradient ``k``'s loose window is the positions ``k - s^_k .. k - 1``; ``Omega`` is the largest total
    window length that covers one position. It bounds ``sum_k s^_k sum_{j in window k} a_j`` by
    ``Omega sum_j a_j``, the step where bound 2 trades staleness for a stepsize condition.

    Raises:
        TheoryError: ``loose`` is not a 1-D integer array, has a negative entry, or a window reaching
            before position 0 (not loose staleness of a run).
    """
    loose_a = _staleness_array("loose", loose)
    total = loose_a.size
    if total == 0:
        return 0
    positions = np.arange(total, dtype=np.int64)
    first = positions - loose_a
    if first.min() < 0:
        k = int(np.argmax(first < 0))
        raise TheoryError(
            f"loose staleness {int(loose_a[k])} at position {k} reaches before the first gradient; "
            "pass StalenessStats.loose in global order"
        )
    # Add s^_k on [k - s^_k, k) with a difference array: O(T) whatever the windows' lengths.
    diff = np.zeros(total + 1, dtype=np.int64)
    np.add.at(diff, first, loose_a)
    np.add.at(diff, positions, -loose_a)
    return int(np.cumsum(diff[:total]).max())
