"""Stop rules, shared by every driver of a worker (the real-time loop and the simulator).

One function so that a rule means the same thing in real and virtual time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from dasgd.worker.worker import Worker

__all__ = ["stop_reason", "exploded", "LOSS_KEYS"]

LOSS_KEYS = ("loss", "test_loss", "train_loss")
"""The evaluation keys the exploding-loss rule reads, in order: the first one the first evaluation has."""


def exploded(
    first_metrics: Mapping[str, float], last_metrics: Mapping[str, float], factor: float | None
) -> str:
    """Why the evaluated replica counts as diverged, or "" when it does not (the exploding rule).

    The rule: an evaluated loss (any of :data:`LOSS_KEYS`) that is NaN or infinite, or the loss of the last
    evaluation above ``factor`` times the loss of the first (the initial model's, taken at the start).
    ``factor`` None or 0 switches the second part off; a first loss of 0 or below is no reference.
    """
    for key in LOSS_KEYS:
        value = last_metrics.get(key)
        if value is not None and not math.isfinite(value):
            return f"the evaluated {key} is {value}"
    if not factor:
        return ""
    key = next((k for k in LOSS_KEYS if k in first_metrics), None)
    if key is None or key not in last_metrics:
        return ""
    first, last = float(first_metrics[key]), float(last_metrics[key])
    if math.isfinite(first) and first > 0 and last > factor * first:
        return f"the evaluated {key} {last:.4g} is above {factor:g} x its first evaluation {first:.4g}"
    return ""


def stop_reason(
    worker: Worker,
    elapsed: float,
    last_metrics: Mapping[str, float],
    max_gradients: int | None,
    max_seconds: float | None,
    target_accuracy: float | None,
    accuracy_metric: str | None,
    first_metrics: Mapping[str, float] | None = None,
    diverge_factor: float | None = None,
) -> str:
    """Why ``worker`` should stop now, or "" to go on.

    - "diverged": this worker computed a gradient with a NaN or infinity (its replica diverged), or its last
      evaluation exploded (:func:`exploded`: a non-finite loss, or one above ``diverge_factor`` times the
      loss of ``first_metrics``, its first evaluation);
    - the algorithm's own reason when it can never go on (``server_died``: a parameter-server client whose
      server died; ``no_clients``: a server whose clients all died);
    - "stop_requested": a peer asked (a STOP message arrived);
    - "max_gradients": the replica holds the run's gradient budget T (its view of the total);
    - "max_seconds": the time budget is spent (wall or virtual seconds since the start);
    - "target_accuracy": the last evaluation of this replica reached the target.
    """
    if worker.diverged:
        return "diverged"
    if last_metrics and exploded(first_metrics or {}, last_metrics, diverge_factor):
        return "diverged"
    if worker.stop_requested:
        return "stop_requested"
    stranded = worker.stranded
    if stranded:
        return stranded
    if max_gradients is not None and worker.applied >= max_gradients:
        return "max_gradients"
    if max_seconds is not None and elapsed >= max_seconds:
        return "max_seconds"
    if target_accuracy is not None and accuracy_metric is not None:
        acc = last_metrics.get(accuracy_metric)
        if acc is not None and acc >= target_accuracy:
            return "target_accuracy"
    return ""
