"""One worker: a flat-parameter replica and the step-level DASGD operations on it."""

from __future__ import annotations

from dasgd.worker.replica import ReplicaError, checksum, flat_grad, flatten_parameters
from dasgd.worker.worker import Gradient, Outgoing, Worker

__all__ = ["Gradient", "Outgoing", "ReplicaError", "Worker", "checksum", "flat_grad", "flatten_parameters"]
