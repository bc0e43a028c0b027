"""Time as an object: the runtime reads and waits through a Clock, never the time module.

The real-time driver (runtime/loop.py) uses :class:`WallClock`, or a fake clock in tests. The simulator does not
run that loop: it drives the same worker protocol (worker/protocol.py) from its event queue, and its virtual
clock only tells time (a simulated worker never sleeps; slowness comes from the compute-time model). What is
shared across all three drivers is the protocol, which reads no clock at all: each driver passes it the time.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "WallClock"]


@runtime_checkable
class Clock(Protocol):
    """Seconds since the run started, and a way to let time pass."""

    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class WallClock:
    """Real time in seconds since ``origin`` (a Unix timestamp shared by every process of the run).

    Sharing the origin makes completion times from different processes of one machine comparable, which the
    staleness ledger needs to merge records into one global order. Across machines the comparison is as good
    as their clock synchronisation (NTP: about a millisecond); the ledger counts what skew it detects.
    """

    def __init__(self, origin: float | None = None) -> None:
        self.origin = time.time() if origin is None else origin

    def now(self) -> float:
        return time.time() - self.origin

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)
