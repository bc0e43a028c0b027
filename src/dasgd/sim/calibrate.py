"""Calibrate the simulator against a real run: its measured step times and message latency.

Step times come straight from the run's event log (start-to-start per worker, see models.read_step_trace).
The one-way message latency is not logged; what the log does record is, for every gradient, how many of
each peer's gradients the computing replica held when it started (its vector clock). The latency is
estimated from those counts by Little's law (gradients in flight = arrival rate x mean latency), measured
the way the replay will use it:

- In the replay, worker j's gradient i leaves when j's next step starts (the trace's step is the whole
  start-to-start cycle), so its send time is e_i = start of j's gradient i + 1 (its own end for j's last).
- A replica polls its inbox at the start of each step. At the start s of a record of worker w, the run had
  ``#{i: e_i < s} - clock[j]`` of j's gradients sent but not yet held.
- A constant latency L leaves ``#{i: s - L < e_i < s}`` of them in flight at s. The estimate is the L at
  which the two totals, summed over every record and every peer, agree (the middle of the interval of
  such L: the count is a step function of L).

Why the mean and not the typical delivery: staleness grows linearly with the number of gradients in flight,
so it is the mean latency, tail included, that the replay must reproduce. On a loaded machine the tail is
long (a process is descheduled, the evaluating worker polls only between evaluations). The estimator this
replaced took the single latency that contradicted the fewest per-message bounds, in effect a typical value.
Measured on 30 real 4-worker mnist-logreg runs of 64-sample batches (2 shared cores), replayed with each
estimate: the old one gave 0.52 to 1.06 times the real S_avg (10 of 30 off by more than 25%), this one 0.94
to 1.31 (mean 1.03). On simulated runs with log-normal latency, where the truth is known, the old one
replayed about half the S_avg and this one the same within 2% (tests/test_calibration.py).

What the replay cannot reproduce: workers that started late (the replay starts every worker at time 0; the
S_avg ratios above, replayed with each worker's real start, were 0.94 to 1.03), and latency that changes
during the run (one constant for every link).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dasgd.sim.models import ModelError

__all__ = ["estimate_latency", "calibration"]

_BISECTIONS = 60


def _send_times(
    origin: np.ndarray, index: np.ndarray, start: np.ndarray, end: np.ndarray, j: int
) -> np.ndarray:
    """When the replay sends worker j's gradients: at the start of j's next step (the last: at its end)."""
    sel = np.flatnonzero(origin == j)
    order = sel[np.argsort(index[sel], kind="stable")]
    sent = np.empty(order.size)
    sent[:-1] = start[order[1:]]
    sent[-1:] = end[order[-1:]]
    return np.sort(sent)


def estimate_latency(
    origin: np.ndarray, index: np.ndarray, start: np.ndarray, end: np.ndarray, clock: np.ndarray
) -> float:
    """The constant one-way latency (seconds, >= 0) whose replay keeps as many gradients in flight as the run.

    Args: the event log's gradient records (``origin``, ``index``, ``start``, ``end``: shape (T,); ``clock``:
    shape (T, N), the computing replica's vector clock at ``start``). See the module docstring.

    Raises:
        ModelError: fewer than two workers have records, or a clock entry is negative.
    """
    origin, index = np.asarray(origin, dtype=np.int64), np.asarray(index, dtype=np.int64)
    start, end = np.asarray(start, dtype=np.float64), np.asarray(end, dtype=np.float64)
    clock = np.asarray(clock, dtype=np.int64)
    n = clock.shape[1] if clock.ndim == 2 else 0
    workers = [w for w in range(n) if np.any(origin == w)]
    if len(workers) < 2:
        raise ModelError("the run has no cross-worker records to estimate a latency from")
    sent = {w: _send_times(origin, index, start, end, w) for w in workers}
    every = np.sort(np.concatenate(list(sent.values())))
    rows = {w: np.flatnonzero(origin == w) for w in workers}

    def sent_by_others(w: int, t: np.ndarray, side: str) -> np.ndarray:
        """Per time in ``t``: the peers' gradients sent before it (side "left") or at or before it ("right")."""
        return np.searchsorted(every, t, side=side) - np.searchsorted(sent[w], t, side=side)

    # Observed: gradients the peers had sent before each snapshot, minus those the snapshot held.
    observed = 0
    for w in workers:
        s = start[rows[w]]
        held = clock[rows[w]].sum(axis=1) - clock[rows[w], w]
        observed += int(sent_by_others(w, s, "left").sum() - held.sum())
    if observed <= 0:
        return 0.0

    def in_flight(latency: float) -> int:
        total = 0
        for w in workers:
            s = start[rows[w]]
            total += int((sent_by_others(w, s, "left") - sent_by_others(w, s - latency, "right")).sum())
        return total

    # in_flight is a non-decreasing step function of the latency, reaching `observed` once the latency spans
    # the run. Every latency between the first one that reaches `observed` and the first one that exceeds it
    # fits the records equally well: take the middle of that interval.
    top = float(start.max() - every.min()) + 1.0

    def first_reaching(count: int) -> float | None:
        if in_flight(top) < count:
            return None
        lo, hi = 0.0, top
        for _ in range(_BISECTIONS):
            mid = 0.5 * (lo + hi)
            if in_flight(mid) < count:
                lo = mid
            else:
                hi = mid
        return hi

    low = first_reaching(observed)
    if low is None:  # observed <= in_flight(top) unless a clock entry is negative
        raise ModelError("a gradient record has a negative clock entry; the event log is inconsistent")
    high = first_reaching(observed + 1)
    return low if high is None else 0.5 * (low + high)


def calibration(run_dir: str | Path) -> dict[str, object]:
    """Simulation settings that replay a real run: its step-time traces and its estimated latency."""
    from dasgd.metrics.eventlog import read_event_log

    path = Path(run_dir) / "events.jsonl"
    if not path.is_file():
        raise ModelError(f"{run_dir} has no events.jsonl; give the directory of a real `dasgd train` run")
    log = read_event_log(path)
    latency = estimate_latency(log.origin, log.index, log.start, log.end, log.clock)
    return {"compute": "trace", "trace": str(path), "latency": latency, "latency_sigma": 0.0}
