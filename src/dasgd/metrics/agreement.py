"""When replicas that hold the same gradient set count as agreeing: float summation order, bounded."""

from __future__ import annotations

import numpy as np

__all__ = ["replica_tolerance"]


def replica_tolerance(dtype: np.dtype, gradients: int) -> float:
    """Relative parameter difference still counted as agreement between replicas.

    Replicas hold the same gradient SET but add it up in different orders, and float addition is not
    associative: the rounding differences grow like sqrt(T) unit roundoffs (random-walk accumulation), with
    a generous factor 64 for correlated rounding.
    """
    eps = float(np.finfo(dtype).eps)
    return 64.0 * eps * max(1.0, float(np.sqrt(max(1, gradients))))
