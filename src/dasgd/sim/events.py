"""The event queue and virtual clock of the simulator.

Ties break by a counter (the order events were scheduled), never by hash order or wall time, so the same
spec and seed replay the same run event for event.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from enum import IntEnum

__all__ = ["EventKind", "EventQueue", "VirtualClock"]


class EventKind(IntEnum):
    """What happens at an event. Values order simultaneous events only through the counter, not by kind."""

    GRADIENT_DONE = 1  # a worker finished computing a gradient
    LINK_FREE = 2  # a busy link can take the next queued message
    WAKE = 3  # a draining worker has messages arriving
    EVALUATE = 4  # evaluate worker 0's replica
    CRASH = 5  # a worker dies
    LINK_DOWN = 6
    LINK_UP = 7
    PEER_DEAD = 8  # worker a notices that its neighbour b died (its link closed)
    CHECKPOINT = 9  # worker a starts a checkpoint at its next step
    RESUME = 10  # worker a takes its first step after a resume (at its local snapshot's time)


@dataclass(order=True)
class _Event:
    time: float
    seq: int
    kind: EventKind = field(compare=False)
    a: int = field(compare=False, default=-1)
    b: int = field(compare=False, default=-1)


class EventQueue:
    """A min-heap of events ordered by (time, scheduling order)."""

    def __init__(self) -> None:
        self._heap: list[_Event] = []
        self._seq = 0
        self.processed = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, time: float, kind: EventKind, a: int = -1, b: int = -1) -> None:
        """Schedule ``kind`` at ``time`` (a, b: the worker or link it concerns)."""
        heapq.heappush(self._heap, _Event(time, self._seq, kind, a, b))
        self._seq += 1

    def pop(self) -> tuple[float, EventKind, int, int]:
        """The earliest event (first scheduled among equals)."""
        ev = heapq.heappop(self._heap)
        self.processed += 1
        return ev.time, ev.kind, ev.a, ev.b


class VirtualClock:
    """Simulated seconds. The engine moves it forward; nothing in a simulation ever sleeps."""

    def __init__(self) -> None:
        self._now = 0.0

    def now(self) -> float:
        return self._now

    def advance_to(self, t: float) -> None:
        if t < self._now:
            raise RuntimeError(f"virtual time cannot go back from {self._now} to {t}")
        self._now = t

    def sleep(self, seconds: float) -> None:
        raise RuntimeError("a simulated worker never sleeps: model slowness with the compute-time model")
