"""Compute-time, network and failure models of the simulator (plain values in, durations out).

Every random draw comes from a generator the engine seeds per worker or per link, so the same spec and seed
give the same durations whatever order other parts of the simulation run in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dasgd.errors import DasgdError

__all__ = [
    "ComputeModel",
    "LinkModel",
    "NetworkModel",
    "FailurePlan",
    "ModelError",
    "read_step_trace",
]


class ModelError(DasgdError, ValueError):
    """A simulation model parameter or trace file is invalid."""


def _lognormal(rng: np.random.Generator, mean: float, sigma: float) -> float:
    """A log-normal draw with the given mean (not median): mu = ln(mean) - sigma^2 / 2."""
    if sigma <= 0:
        return mean
    return float(rng.lognormal(math.log(mean) - 0.5 * sigma * sigma, sigma))


@dataclass(frozen=True)
class ComputeModel:
    """Seconds a worker takes for one gradient.

    kind: "constant" (every step takes ``mean``), "lognormal" (mean ``mean``, log-space spread ``sigma``) or
    "trace" (worker r replays ``traces[r % len(traces)]`` cyclically: measured step times of a real run).
    ``slowdown[r]`` multiplies worker r's times (stragglers).
    """

    kind: str = "constant"
    mean: float = 0.01
    sigma: float = 0.0
    traces: tuple[tuple[float, ...], ...] = ()
    slowdown: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "lognormal", "trace"):
            raise ModelError(f"compute model {self.kind!r}: choose constant, lognormal or trace")
        if self.kind == "trace" and (not self.traces or any(len(t) == 0 for t in self.traces)):
            raise ModelError("a trace compute model needs at least one non-empty trace of step times")
        if self.kind != "trace" and not self.mean > 0:
            raise ModelError(f"compute time mean must be positive, got {self.mean}")

    def duration(self, rank: int, index: int, rng: np.random.Generator) -> float:
        """Seconds for worker ``rank``'s gradient number ``index``."""
        if self.kind == "constant":
            base = self.mean
        elif self.kind == "lognormal":
            base = _lognormal(rng, self.mean, self.sigma)
        else:
            trace = self.traces[rank % len(self.traces)]
            base = trace[index % len(trace)]
        return base * self.slowdown.get(rank, 1.0)


@dataclass(frozen=True)
class LinkModel:
    """One directed link: latency (mean, log-normal spread) and bandwidth in bytes per second."""

    latency: float = 0.001
    latency_sigma: float = 0.0
    bandwidth: float = math.inf

    def __post_init__(self) -> None:
        if self.latency < 0 or self.latency_sigma < 0:
            raise ModelError("latency and its spread must be non-negative")
        if not self.bandwidth > 0:
            raise ModelError(f"bandwidth must be positive (bytes/s), got {self.bandwidth}")

    def transfer(self, nbytes: int) -> float:
        """Seconds the link is busy putting ``nbytes`` on the wire."""
        return 0.0 if math.isinf(self.bandwidth) else nbytes / self.bandwidth

    def delay(self, rng: np.random.Generator) -> float:
        """Propagation latency of one message."""
        if self.latency == 0:
            return 0.0
        return _lognormal(rng, self.latency, self.latency_sigma)


@dataclass(frozen=True)
class NetworkModel:
    """Every link's model, with per-link overrides, and message loss.

    loss: probability that one transmission is lost. loss_mode "retransmit": the sender notices after a
    timeout of ``retransmit_after`` seconds and sends again (delaying that message and, FIFO, those behind
    it); "count": the message is gone and its gradients are counted as lost.
    """

    default: LinkModel = LinkModel()
    overrides: Mapping[tuple[int, int], LinkModel] = field(default_factory=dict)
    loss: float = 0.0
    loss_mode: str = "retransmit"
    retransmit_after: float = 0.01

    def __post_init__(self) -> None:
        if not 0 <= self.loss < 1:
            raise ModelError(f"loss probability must be in [0, 1), got {self.loss}")
        if self.loss_mode not in ("retransmit", "count"):
            raise ModelError(f"loss mode {self.loss_mode!r}: choose retransmit or count")
        if self.retransmit_after <= 0:
            raise ModelError("retransmit_after must be positive")

    def link(self, src: int, dst: int) -> LinkModel:
        return self.overrides.get((src, dst), self.default)


@dataclass(frozen=True)
class FailurePlan:
    """Crashes (worker, time), a crash rate per worker per second, and link outages (a, b, start, end).

    Link outages are undirected: both directions are down in [start, end). Messages sent meanwhile wait
    (coalesced) and leave when the link is back, as a reconnecting transport would do.
    """

    crashes: tuple[tuple[int, float], ...] = ()
    crash_rate: float = 0.0
    link_down: tuple[tuple[int, int, float, float], ...] = ()

    def __post_init__(self) -> None:
        if self.crash_rate < 0:
            raise ModelError("crash rate must be non-negative")
        for a, b, start, end in self.link_down:
            if not end > start >= 0:
                raise ModelError(f"link outage {a}-{b}: need 0 <= start < end, got {start}, {end}")

    def crash_times(self, n: int, rng: np.random.Generator, horizon: float) -> dict[int, float]:
        """When each worker crashes (only those that do before ``horizon``)."""
        times = {w: t for w, t in self.crashes if 0 <= w < n}
        if self.crash_rate > 0:
            draws = rng.exponential(1.0 / self.crash_rate, size=n)
            for w in range(n):
                if draws[w] < horizon and draws[w] < times.get(w, math.inf):
                    times[w] = float(draws[w])
        return times


def _cycles(records: list[tuple[int, float, float]]) -> list[float]:
    """A worker's step times: start-to-start intervals (the last one: its own duration).

    The whole cycle, not only the gradient computation: a real step also applies arrived messages and pushes
    the new gradient, and a simulated worker starts its next step the moment the previous one completes.
    """
    records = sorted(records)
    out = [b[1] - a[1] for a, b in zip(records, records[1:])]
    out.append(records[-1][2] - records[-1][1])
    return [max(v, 1e-9) for v in out]


def read_step_trace(path: str | Path) -> tuple[tuple[float, ...], ...]:
    """Step times from a file: a run's ``events.jsonl`` (per worker, the start-to-start time of its steps), or a
    text file with one duration in seconds per line (one shared trace)."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"trace file {str(p)!r} does not exist")
    if not p.is_file():
        raise ModelError(
            f"trace file {str(p)!r} is not a regular file; give a run's events.jsonl or a text file"
        )
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ModelError(f"{p}: is not UTF-8 text") from None
    except OSError as e:
        raise ModelError(f"{p}: cannot be read ({e.strerror})") from None
    if p.name.endswith(".jsonl"):
        per: dict[int, list[tuple[int, float, float]]] = {}
        width, last = 0, 0.0
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                raise ModelError(f"{p}:{lineno}: not JSON") from None
            if isinstance(ev, dict) and ev.get("type") == "gradient":
                try:
                    record = (int(ev["origin"]), int(ev["index"]), float(ev["start"]), float(ev["end"]))
                    clock_width = len(ev["clock"])
                except (KeyError, TypeError, ValueError, OverflowError):
                    raise ModelError(
                        f"{p}:{lineno}: a gradient record without a valid origin, index, start, end and clock; "
                        "is this a dasgd run's events.jsonl?"
                    ) from None
                per.setdefault(record[0], []).append(record[1:])
                width = max(width, clock_width)
                last = max(last, record[3])
        # One trace per rank, in rank order. A worker that completed no gradient in the whole run gets one
        # step as long as the run, so it stays (almost) silent in the replay too, as it was.
        traces: Sequence[list[float]] = [
            _cycles(per[k]) if k in per else [max(last, 1e-9)] for k in range(width)
        ]
    else:
        values = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                try:
                    values.append(float(line))
                except ValueError:
                    raise ModelError(f"{p}:{lineno}: {line.strip()!r} is not a number of seconds") from None
        traces = [values]
    if not traces or any(not t for t in traces) or any(v <= 0 for t in traces for v in t):
        raise ModelError(f"{p}: no positive step times found")
    if not all(math.isfinite(v) for t in traces for v in t):
        raise ModelError(f"{p}: a step time is not a finite number of seconds")
    return tuple(tuple(t) for t in traces)
