"""Calibrate the simulator against a real run: its measured step times and message latency.

Step times come straight from the run's event log (start-to-start per worker, see models.read_step_trace).
The one-way message latency is not logged directly, but every gradient record bounds it: when worker w
started a gradient at time s holding c of worker j's gradients, j's gradient c-1 (completed at e_held) had
arrived, so its latency was at most s - e_held; and j's gradient c, if it completed at e_miss < s, had not,
so its latency was more than s - e_miss. The estimate is the single latency that contradicts the fewest of
these bounds (ties: the midpoint of the best interval).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dasgd.sim.models import ModelError

__all__ = ["estimate_latency", "calibration"]


def estimate_latency(
    origin: np.ndarray, index: np.ndarray, start: np.ndarray, end: np.ndarray, clock: np.ndarray
) -> float:
    """The constant one-way latency most consistent with the records (seconds, >= 0)."""
    n = clock.shape[1] if clock.ndim == 2 else 0
    ends: list[np.ndarray] = []
    for j in range(n):
        sel = origin == j
        e = np.full(int(index[sel].max()) + 1 if sel.any() else 0, np.nan)
        e[index[sel]] = end[sel]
        ends.append(e)
    upper, lower = [], []  # latency <= upper (held), latency > lower (missing)
    for j in range(n):
        e = ends[j]
        if e.size == 0:
            continue
        mask = origin != j
        c = clock[mask, j]
        s = start[mask]
        held = c > 0
        upper.append(s[held] - e[np.minimum(c[held], e.size) - 1])
        has_next = c < e.size
        miss_end = e[c[has_next]]
        missing = miss_end < s[has_next]
        lower.append(s[has_next][missing] - miss_end[missing])
    up = np.concatenate(upper) if upper else np.empty(0)
    lo = np.concatenate(lower) if lower else np.empty(0)
    up, lo = up[np.isfinite(up)], lo[np.isfinite(lo)]
    if up.size + lo.size == 0:
        raise ModelError("the run has no cross-worker records to estimate a latency from")
    # Violations at L: held bounds below L (#up < L) plus missing bounds at or above L (#lo >= L).
    candidates = np.unique(
        np.concatenate([[0.0], up, lo, [max(up.max(initial=0), lo.max(initial=0)) + 1e-6]])
    )
    up_sorted, lo_sorted = np.sort(up), np.sort(lo)
    violations = np.searchsorted(up_sorted, candidates, side="left") + (
        lo_sorted.size - np.searchsorted(lo_sorted, candidates, side="left")
    )
    best = np.flatnonzero(violations == violations.min())
    # The best set is a run of candidates; take the middle of the first contiguous run.
    run_end = best[0]
    while run_end + 1 in set(best):
        run_end += 1
    return float(max(0.0, 0.5 * (candidates[best[0]] + candidates[run_end])))


def calibration(run_dir: str | Path) -> dict[str, object]:
    """Simulation settings that replay a real run: its step-time traces and its estimated latency."""
    from dasgd.metrics.eventlog import read_event_log

    path = Path(run_dir) / "events.jsonl"
    if not path.is_file():
        raise ModelError(f"{run_dir} has no events.jsonl; give the directory of a real `dasgd train` run")
    log = read_event_log(path)
    latency = estimate_latency(log.origin, log.index, log.start, log.end, log.clock)
    return {"compute": "trace", "trace": str(path), "latency": latency, "latency_sigma": 0.0}
