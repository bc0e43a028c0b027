"""The thread plumbing the torch.distributed transports share: a sender thread and a receiver thread per peer.

Both :class:`~dasgd.transport.torchdist.TorchDistTransport` and
:class:`~dasgd.transport.splitplane.SplitPlaneTransport` keep a coalescing outbox per peer, drained by that
peer's own sender thread (a posted Gloo/NCCL send blocks until the peer receives, so training must never wait
on one), and one receiver thread per peer, each keeping a receive from that peer posted and feeding one
coalescing inbox that the training loop polls. What differs is what a sender and a receiver do with the bytes
(``_send_loop``, ``_receive_loop``) and what an outbox holds (the split plane also keeps CUDA events next to
its queue): subclasses provide those.

Why a receiver per peer rather than one ``irecv(src=None)``: a receive from any source is not fair. When a
receiver is saturated, Gloo may keep matching the same senders and leave one peer's messages waiting until
the end of the run. Measured under two torchrun agents (4 processes on 2 cores, digits-logreg, 8 runs each):
S_avg 455-1,168 with one receive from any source, 210-517 with a receive per peer; the rest of that
staleness is the OS starving whole processes of CPU (docs/design.md). A receive per peer also tells us who
really sent each message (the link's source), so a header that claims another sender is refused
(``wrong_sender``) even without a key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dasgd.core.message import Kind, Message
from dasgd.core.wire import WireError
from dasgd.transport.base import TransportStats
from dasgd.transport.queue import CoalescingQueue

__all__ = ["PeerThreads"]

# How long a posted receive may wait for its peer. Gloo otherwise uses the process group's timeout, after
# which the receive fails; a peer that has nothing to send us (a sparse topology, a long quiet phase) is not
# a broken one, and a timed-out receive cannot safely be posted again (the abandoned one may still match).
_RECEIVE_PATIENCE = timedelta(days=365)


class PeerThreads:
    """Per-peer sender and receiver threads, and the Transport methods that only touch the queues.

    Subclasses call :meth:`_setup_threads` in their constructor, :meth:`_start_receivers` once ready, get a
    peer's outbox with :meth:`_outbox` in ``send``, and implement ``_send_loop(peer, outbox)`` and
    ``_receive_loop(peer)``. Override :meth:`_new_outbox` and :meth:`_queue_of` when an outbox is more than a
    :class:`CoalescingQueue`. Subclasses also set ``_capacity`` (bytes of the largest valid message) and
    ``_key`` (the HMAC key or None) before the receivers start.

    End of run: :meth:`expect_shutdown` once the drain is complete everywhere, then :meth:`shutdown`, which
    sends a SHUTDOWN to every peer it can still reach; the receiver for that peer ends on it, and accepts it
    only after :meth:`expect_shutdown`, so no peer can silence a worker before its drain is complete. A
    receiver whose peer is gone ends on the closed link.

    Memory: each receiver owns a buffer of ``_capacity`` bytes (a whole message on the Gloo transport, a
    header on the split plane), so an endpoint holds ``world_size - 1`` of them, as many as its senders.
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
        self._receivers: dict[int, threading.Thread] = {}

    def _start_receivers(self, name: str) -> None:
        """Start one receiver thread per peer, named ``{name}-{peer}``."""
        for peer in range(self.world_size):
            if peer != self.rank:
                thread = threading.Thread(
                    target=self._receive_loop, args=(peer,), name=f"{name}-{peer}", daemon=True
                )
                self._receivers[peer] = thread
                thread.start()

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
            self._mark_dead(peer)
            self._stats.undelivered += 1 + len(queue.drain())

    def _link_lost(self, peer: int) -> None:
        """A receive from ``peer`` failed: the pair is closed (the peer exited or died; Gloo does not recover
        a pair). Everything the peer sent before is already in the inbox, since this receiver put it there
        first, so a loop that reads ``dead_peers`` before polling never stops waiting too early."""
        with self._lock:
            self._mark_dead(peer)

    def _mark_dead(self, peer: int) -> None:
        # A new set, never a change in place: the training thread reads stats().dead_peers without our lock.
        self._stats.dead_peers = self._stats.dead_peers | {peer}

    def _decoded(
        self,
        peer: int,
        group: dist.ProcessGroup | None,
        tag: int,
        decode: Callable[..., Any],
        sender_of: Callable[[Any], int],
    ) -> Iterator[Any]:
        """What ``peer`` sends on ``group``, decoded by ``decode(view, world_size=..., key=...)``, until the
        transport is closed or the link is lost. One receive from ``peer`` is always posted, into a buffer
        of ``self._capacity`` bytes (the largest valid message). The bytes are untrusted: what fails to
        decode is counted as rejected (the wire's reason), and so is a message whose sender field
        (``sender_of(item)``) is not ``peer`` (``wrong_sender``); both are skipped.

        Gloo caveat (measured, torch 2.13): a message *longer* than the posted buffer makes Gloo's I/O
        thread abort the whole process ("Received data size doesn't match expected size"); no transport
        can catch that. Every well-formed message fits, so only a broken or hostile peer can trigger it.
        """
        buf = torch.empty(self._capacity, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        while True:
            try:
                dist.irecv(buf, src=peer, group=group, tag=tag).wait(_RECEIVE_PATIENCE)
            except RuntimeError:
                if not self._closed:
                    self._link_lost(peer)
                return
            try:
                item = decode(view, world_size=self.world_size, key=self._key)
            except WireError as exc:
                self._count_rejected(exc.reason)
                continue
            if sender_of(item) != peer:
                self._count_rejected("wrong_sender")
                continue
            yield item

    def join_receivers(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds in all for every receiver thread to end; True if all did."""
        import time  # the transport is a real-time component; the deadline is wall time by nature

        deadline = time.monotonic() + timeout
        for thread in self._receivers.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._receivers.values())

    def send(self, peer: int, msg: Message) -> None:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    def _send_loop(self, peer: int, outbox: Any) -> None:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    def _receive_loop(self, peer: int) -> None:  # pragma: no cover - provided by subclasses
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

    def expect_shutdown(self) -> None:
        """From now on a SHUTDOWN message ends the receiver it arrives on (call once the drain is complete
        everywhere)."""
        self._shutdown_expected.set()

    def shutdown(self, timeout: float = 30.0) -> bool:
        """End-of-run: tell every peer to stop listening to us, wait for our receivers to be told, close.

        Every worker must call this after the end-of-run collective. Returns False if a thread did not end
        in time (the caller may still exit: the threads are daemons).
        """
        self.expect_shutdown()
        ok = True
        if self.world_size > 1:
            dead = set(self.stats().dead_peers)
            for peer in range(self.world_size):
                if peer != self.rank and peer not in dead:
                    self.send(peer, Message(Kind.SHUTDOWN, self.rank, self.rank))
            ok = self.flush(timeout)
            ok = self.join_receivers(timeout) and ok
        self.close()
        return ok

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for outbox in self._outboxes.values():
            self._queue_of(outbox).close()
        for thread in self._senders.values():
            thread.join(timeout=1.0)
