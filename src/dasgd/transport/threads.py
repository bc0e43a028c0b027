"""The thread plumbing the torch.distributed transports share: one sender thread per peer, one receiver.

Both :class:`~dasgd.transport.torchdist.TorchDistTransport` and
:class:`~dasgd.transport.splitplane.SplitPlaneTransport` keep a coalescing outbox per peer, drained by that
peer's own sender thread (a posted Gloo/NCCL send blocks until the peer receives, so training must never wait
on one), and a receiver thread feeding a coalescing inbox that the training loop polls. What differs is what
a sender and the receiver do with the bytes (``_send_loop``, ``_receive_loop``) and what an outbox holds (the
split plane also keeps CUDA events next to its queue): subclasses provide those.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from dasgd.core.wire import WireError
from dasgd.transport.base import RingShutdown, TransportStats
from dasgd.transport.queue import CoalescingQueue

__all__ = ["PeerThreads"]


class PeerThreads(RingShutdown):
    """Per-peer sender threads, a receiver thread, and the Transport methods that only touch the queues.

    Subclasses call :meth:`_setup_threads` in their constructor, :meth:`_start_receiver` once ready, get a
    peer's outbox with :meth:`_outbox` in ``send``, and implement ``_send_loop(peer, outbox)`` and
    ``_receive_loop()``. Override :meth:`_new_outbox` and :meth:`_queue_of` when an outbox is more than a
    :class:`CoalescingQueue`. Subclasses also set ``_capacity`` (bytes of the largest valid message) and
    ``_key`` (the HMAC key or None) before the receiver starts.
    """

    _capacity: int
    _key: bytes | None

    def _setup_threads(self, rank: int, world_size: int, coalesce: bool) -> None:
        self.rank = rank
        self.world_size = world_size
        self._coalesce = coalesce
        self._inbox = CoalescingQueue(coalesce)
        self._outboxes: dict[int, Any] = {}
        self._senders: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()  # guards the outboxes, the senders and the stats
        self._stats = TransportStats()
        self._shutdown_expected = threading.Event()
        self._closed = False
        self._receiver: threading.Thread | None = None

    def _start_receiver(self, name: str) -> None:
        if self.world_size > 1:
            self._receiver = threading.Thread(target=self._receive_loop, name=name, daemon=True)
            self._receiver.start()

    def _new_outbox(self) -> Any:
        return CoalescingQueue(self._coalesce)

    @staticmethod
    def _queue_of(outbox: Any) -> CoalescingQueue:
        return outbox

    def _outbox(self, peer: int, thread_name: str) -> Any | None:
        """``peer``'s outbox, starting its sender thread on first use; None (counted as undelivered) when
        the peer is known dead."""
        with self._lock:
            if peer in self._stats.dead_peers:
                self._stats.undelivered += 1
                return None
            outbox = self._outboxes.get(peer)
            if outbox is None:
                outbox = self._outboxes[peer] = self._new_outbox()
                thread = threading.Thread(
                    target=self._send_loop, args=(peer, outbox), name=thread_name, daemon=True
                )
                self._senders[peer] = thread
                thread.start()
            return outbox

    def _count_sent(self, nbytes: int) -> None:
        with self._lock:
            self._stats.sent_messages += 1
            self._stats.sent_bytes += nbytes

    def _count_received(self, nbytes: int) -> None:
        with self._lock:
            self._stats.received_messages += 1
            self._stats.received_bytes += nbytes

    def _count_rejected(self, reason: str) -> None:
        with self._lock:
            self._stats.rejected[reason] += 1

    def _peer_died(self, peer: int, queue: CoalescingQueue) -> None:
        """A send to ``peer`` failed: Gloo raises RuntimeError("... Connection closed by peer ...") when the
        peer died. The pair is unusable for good: count what we could not deliver and stop sending to it."""
        with self._lock:
            self._stats.dead_peers.add(peer)
            self._stats.undelivered += 1 + len(queue.drain())

    def _decoded(
        self, group: dist.ProcessGroup | None, tag: int, decode: Callable[..., Any]
    ) -> Iterator[Any]:
        """What arrives on ``group``, decoded by ``decode(view, world_size=..., key=...)``, until the
        transport is closed. One receive is always posted, into a buffer of ``self._capacity`` bytes (the
        largest valid message); the bytes are untrusted, so what fails to arrive or to decode is counted as
        rejected (``receive_error`` or the wire's reason) and skipped."""
        buf = torch.empty(self._capacity, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        while True:
            try:
                dist.irecv(buf, src=None, group=group, tag=tag).wait()
            except RuntimeError:
                if self._closed:
                    return
                # Oversized (the buffer cannot hold it) or broken: count and keep listening.
                self._count_rejected("receive_error")
                continue
            try:
                item = decode(view, world_size=self.world_size, key=self._key)
            except WireError as exc:
                self._count_rejected(exc.reason)
                continue
            yield item

    def _send_loop(self, peer: int, outbox: Any) -> None:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    def _receive_loop(self) -> None:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    # -- Transport protocol (the parts that only touch queues) ------------------------------------------
    def poll(self) -> list[Any]:
        return self._inbox.drain()

    def wait(self, timeout: float) -> bool:
        return self._inbox.wait_nonempty(timeout)

    def flush(self, timeout: float) -> bool:
        import time  # the transport is a real-time component; the deadline is wall time by nature

        deadline = time.monotonic() + timeout
        for outbox in list(self._outboxes.values()):
            if not self._queue_of(outbox).wait_idle(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def stats(self) -> TransportStats:
        with self._lock:
            self._stats.coalesced = sum(self._queue_of(o).stats.coalesced for o in self._outboxes.values())
            return self._stats

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for outbox in self._outboxes.values():
            self._queue_of(outbox).close()
        for thread in self._senders.values():
            thread.join(timeout=1.0)
