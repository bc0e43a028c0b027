"""Algorithms: the update rules plugged into the one worker loop."""

from __future__ import annotations

from dasgd.algorithms.base import Algorithm
from dasgd.algorithms.dasgd import DASGD

__all__ = ["ALGORITHMS", "Algorithm", "DASGD", "make_algorithm"]

ALGORITHMS: dict[str, type] = {"dasgd": DASGD}


def make_algorithm(name: str) -> Algorithm:
    """The algorithm registered as ``name``."""
    try:
        return ALGORITHMS[name]()
    except KeyError:
        raise ValueError(
            f"unknown algorithm {name!r}; choose one of: {', '.join(sorted(ALGORITHMS))}"
        ) from None
