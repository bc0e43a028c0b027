"""The Transport protocol: how a worker's messages reach its peers.

A transport is narrow on purpose: ``send`` never blocks the training loop, ``poll`` returns
what has arrived without blocking, ``wait`` lets an idle loop sleep until something arrives, ``flush``
waits until everything sent has left. Every implementation passes the same conformance tests
(tests/test_transport_conformance.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from dasgd.core.message import Message

__all__ = ["Transport", "TransportStats"]


@dataclass
class TransportStats:
    """What one endpoint sent, received and refused."""

    sent_messages: int = 0
    sent_bytes: int = 0
    received_messages: int = 0
    received_bytes: int = 0
    coalesced: int = 0
    """Gradient messages merged into a queued one instead of travelling alone."""
    rejected: Counter[str] = field(default_factory=Counter)
    """Messages refused on arrival, by reason (see dasgd.core.wire.REJECT_REASONS)."""
    dead_peers: set[int] = field(default_factory=set)
    """Peers found unreachable (a send failed with a closed connection)."""
    undelivered: int = 0
    """Messages that could not be delivered because their peer was dead."""

    def to_dict(self) -> dict[str, object]:
        """JSON-ready copy."""
        return {
            "sent_messages": self.sent_messages,
            "sent_bytes": self.sent_bytes,
            "received_messages": self.received_messages,
            "received_bytes": self.received_bytes,
            "coalesced": self.coalesced,
            "rejected": dict(self.rejected),
            "dead_peers": sorted(self.dead_peers),
            "undelivered": self.undelivered,
        }


@runtime_checkable
class Transport(Protocol):
    """One worker's endpoint on the network."""

    rank: int
    world_size: int

    def send(self, peer: int, msg: Message) -> None:
        """Queue ``msg`` for ``peer``; never blocks (a slow peer gets gradients coalesced)."""
        ...

    def poll(self) -> list[Message]:
        """Every message that has arrived since the last poll, in arrival order; never blocks."""
        ...

    def wait(self, timeout: float) -> bool:
        """Block until a message can be polled (True) or ``timeout`` seconds pass (False)."""
        ...

    def flush(self, timeout: float) -> bool:
        """Block until every queued message has been handed to the network; False on timeout."""
        ...

    def stats(self) -> TransportStats:
        """Counters so far."""
        ...

    def close(self) -> None:
        """Release threads and connections. Idempotent."""
        ...
