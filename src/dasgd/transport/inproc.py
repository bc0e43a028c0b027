"""In-process transport: the reference implementation of the Transport protocol.

Every endpoint lives in one Python process and messages are handed over immediately (zero delay), through the
same coalescing inbox the real transports use. Used by tests (the sequential-SGD oracle), by the simulator's
zero-latency case, and as the behavioural reference in the conformance suite (tests/test_transport_conformance.py).
Thread-safe, so endpoints may also be driven from several threads.
"""

from __future__ import annotations

import threading

from dasgd.core.message import Message
from dasgd.transport.base import TransportStats
from dasgd.transport.queue import CoalescingQueue

__all__ = ["InProcessNetwork", "InProcessTransport"]


class InProcessNetwork:
    """A set of connected in-process endpoints, one per rank."""

    def __init__(self, world_size: int, coalesce: bool = True) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        self.world_size = world_size
        self._inboxes = [CoalescingQueue(coalesce) for _ in range(world_size)]
        self._endpoints = [InProcessTransport(self, r) for r in range(world_size)]
        self._closed: set[int] = set()

    def endpoint(self, rank: int) -> InProcessTransport:
        """The transport of worker ``rank``."""
        return self._endpoints[rank]

    def _deliver(self, peer: int, msg: Message) -> bool:
        if peer in self._closed:
            return False
        # Counted as received on arrival, as the wire transports do, so sent and received agree over the world
        # however the inbox later merges the message.
        self._endpoints[peer]._count_received(msg)
        self._inboxes[peer].put(msg)
        return True


class InProcessTransport:
    """One endpoint of an :class:`InProcessNetwork`."""

    def __init__(self, network: InProcessNetwork, rank: int) -> None:
        self._net = network
        self.rank = rank
        self.world_size = network.world_size
        self._stats = TransportStats()
        self._lock = threading.Lock()  # peers' threads count their deliveries into our stats

    def send(self, peer: int, msg: Message) -> None:
        """Deliver at once into the peer's coalescing inbox."""
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(f"worker {self.rank} cannot send to peer {peer} (world size {self.world_size})")
        if self._net._deliver(peer, msg):
            self._stats.sent_messages += 1
            self._stats.sent_bytes += _payload_bytes(msg)
        else:
            self._stats.dead_peers.add(peer)
            self._stats.undelivered += 1

    def poll(self) -> list[Message]:
        return self._net._inboxes[self.rank].drain()

    def _count_received(self, msg: Message) -> None:
        with self._lock:
            self._stats.received_messages += 1
            self._stats.received_bytes += _payload_bytes(msg)

    def wait(self, timeout: float) -> bool:
        return self._net._inboxes[self.rank].wait_nonempty(timeout)

    def flush(self, timeout: float) -> bool:
        return True  # delivery is immediate

    def stats(self) -> TransportStats:
        """Counters so far. Bytes are payload bytes (nothing is encoded); ``coalesced`` counts the messages
        this endpoint's inbox merged into a queued one (there is no outbox: delivery is immediate)."""
        with self._lock:
            self._stats.coalesced = self._net._inboxes[self.rank].stats.coalesced
            return self._stats

    def close(self) -> None:
        self._net._closed.add(self.rank)
        self._net._inboxes[self.rank].close()


def _payload_bytes(msg: Message) -> int:
    return 0 if msg.payload is None else msg.payload.numel() * msg.payload.element_size()
