"""Algorithms: DASGD and the baselines, plug-ins of the one worker loop (one file each, one line here)."""

from __future__ import annotations

from dasgd.algorithms.base import Algorithm, AlgorithmError, AlgorithmParams
from dasgd.algorithms.dasgd import DASGD
from dasgd.algorithms.gossip import GossipAveraging
from dasgd.algorithms.local_sgd import LocalSGD
from dasgd.algorithms.ps import ParameterServerASGD
from dasgd.algorithms.staleness_policies import DampedDASGD, StalenessCappedDASGD
from dasgd.algorithms.sync import SynchronousSGD

__all__ = ["ALGORITHMS", "Algorithm", "AlgorithmError", "AlgorithmParams", "DASGD", "make_algorithm"]

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (
        DASGD,
        SynchronousSGD,
        ParameterServerASGD,
        LocalSGD,
        GossipAveraging,
        StalenessCappedDASGD,
        DampedDASGD,
    )
}


def make_algorithm(name: str, params: AlgorithmParams | None = None) -> Algorithm:
    """A fresh instance of the algorithm registered as ``name`` (one per worker)."""
    try:
        cls = ALGORITHMS[name]
    except KeyError:
        raise ValueError(
            f"unknown algorithm {name!r}; choose one of: {', '.join(sorted(ALGORITHMS))}"
        ) from None
    return cls(params)
