"""What an algorithm's hook asks the worker to do: the only way a plug-in changes a replica or sends.

A hook returns a list of effects; the Worker carries them out in order, checks each one against its replica
(shape, dtype, clock length) and keeps the bookkeeping itself. Algorithms therefore never write parameters,
vector clocks or gradient-id records, and the exactly-once rule is enforced in one place (the Worker) for every
plug-in, including ones written outside this package.

Order matters and is kept: ``[Step(g, lr), ShareModel(peers, r, r + 1)]`` sends the model *after* the step,
``[ShareModel((j,), 1, 1), AverageModel(x)]`` sends it *before* the average.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from dasgd.worker.worker import Gradient

__all__ = [
    "AdoptClock",
    "AverageModel",
    "Effect",
    "MergeClock",
    "PushGradient",
    "Reject",
    "SetModel",
    "ShareModel",
    "Step",
]


@dataclass(frozen=True)
class Step:
    """``x -= scale * vector``: a gradient, a sum of gradients, or a step's mean."""

    vector: torch.Tensor
    scale: float


@dataclass(frozen=True)
class SetModel:
    """``x = model``: a pulled or averaged model (its values are copied)."""

    model: torch.Tensor


@dataclass(frozen=True)
class AverageModel:
    """``x = (x + model) / 2``: pairwise model averaging."""

    model: torch.Tensor


@dataclass(frozen=True)
class MergeClock:
    """After averaging with a model whose gradient set is ``clock``: the replica holds the union (element-wise
    max). For model averaging the clock says which gradient ids have a non-zero weight in the replica. A clock
    of another length, or None, is ignored."""

    clock: np.ndarray | None


@dataclass(frozen=True)
class AdoptClock:
    """The replica was replaced by a model whose gradient set is ``clock`` (a server's): take it, keeping this
    worker's own count. A clock of another length, or None, is ignored."""

    clock: np.ndarray | None


@dataclass(frozen=True)
class PushGradient:
    """Send own gradient ``index`` (the one being committed) to ``peers``, or along this worker's broadcast
    tree when None. With grads_per_message B > 1 the worker sums B of them into one message."""

    index: int
    gradient: Gradient
    peers: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ShareModel:
    """Send a copy of the replica, as it is at this point of the effect list, to ``peers`` as a MODEL message
    tagged ``[lo, hi)`` (the algorithm's own meaning: a round, a request, a reply), with the replica's clock.

    The worker then calls the algorithm's ``on_model_shared(message)`` with the copy it sent, for an
    algorithm that counts its own model too (Local SGD's round average)."""

    peers: Sequence[int]
    lo: int
    hi: int


@dataclass(frozen=True)
class Reject:
    """Count a message the algorithm refused, under ``reason`` (reported in the run summary)."""

    reason: str


Effect = Union[Step, SetModel, AverageModel, MergeClock, AdoptClock, PushGradient, ShareModel, Reject]  # noqa: UP007
"""Anything a hook may ask for."""
