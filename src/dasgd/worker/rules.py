"""Stop rules, shared by every driver of a worker (the real-time loop and the simulator).

One function so that a rule means the same thing in real and virtual time.
"""

from __future__ import annotations

from collections.abc import Mapping

from dasgd.worker.worker import Worker

__all__ = ["stop_reason"]


def stop_reason(
    worker: Worker,
    elapsed: float,
    last_metrics: Mapping[str, float],
    max_gradients: int | None,
    max_seconds: float | None,
    target_accuracy: float | None,
    accuracy_metric: str | None,
) -> str:
    """Why ``worker`` should stop now, or "" to go on.

    - "diverged": this worker computed a gradient with a NaN or infinity (its replica diverged);
    - the algorithm's own reason when it can never go on (``server_died``: a parameter-server client whose
      server died; ``no_clients``: a server whose clients all died);
    - "stop_requested": a peer asked (a STOP message arrived);
    - "max_gradients": the replica holds the run's gradient budget T (its view of the total);
    - "max_seconds": the time budget is spent (wall or virtual seconds since the start);
    - "target_accuracy": the last evaluation of this replica reached the target.
    """
    if worker.diverged:
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
