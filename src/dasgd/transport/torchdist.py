"""Transport over torch.distributed point-to-point (Gloo for CPU tensors).

How it never blocks training (see shared ENGINES.md for the measured Gloo behaviour this design follows):
- A posted Gloo send completes only once the receiver posted a matching receive, and a posted operation
  cannot be polled. So every peer gets its own *sender thread* that blocks in ``wait()``, fed by a bounded
  :class:`CoalescingQueue`: while a peer is slow, newer gradients for it are summed into the queued message
  (keeping its id range), so the training thread only ever does an in-memory add.
- One *receiver thread* keeps a receive posted at all times (``irecv(src=None)``) into a buffer sized for the
  largest valid message, decodes and validates the bytes (they are untrusted), and puts accepted messages in
  a coalescing inbox that the training loop polls.
- The process-group timeout is set long by the caller; a dead peer shows up as a failed send ("Connection
  closed by peer"), after which that peer is marked dead and its queue is counted as undelivered.
- End of run: the runtime calls :meth:`shutdown` once every worker has drained (after its end-of-run
  collective); each worker sends a SHUTDOWN to its ring successor, which ends that successor's receiver.
  A SHUTDOWN that arrives before :meth:`expect_shutdown` is rejected, so no peer can silence us early.
Collectives must not run on the same group as these threads: the runtime uses a separate group for them.
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from dasgd.core.message import Kind, Message
from dasgd.core.wire import WireError, decode, encode_into, encoded_size
from dasgd.transport.base import RingShutdown, TransportStats
from dasgd.transport.queue import CoalescingQueue

__all__ = ["TorchDistTransport"]

_TAG = 7  # one tag for all data-plane traffic; per-pair order is preserved by Gloo


class TorchDistTransport(RingShutdown):
    """A Transport endpoint on a torch.distributed (Gloo) process group.

    Args:
        rank: this process's rank in ``group``.
        world_size: ranks in ``group``.
        numel: elements of a gradient payload (the replica's parameter count).
        dtype: payload dtype.
        group: the process group for point-to-point traffic (None: the default group).
        key: shared secret; when set, every message carries an HMAC-SHA256 tag and untagged ones are refused.
        send_clock: messages carry the sender's vector clock.
        coalesce: sum queued contiguous gradients of one origin (False: keep every message separate).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        numel: int,
        dtype: torch.dtype,
        group: dist.ProcessGroup | None = None,
        key: bytes | None = None,
        send_clock: bool = True,
        coalesce: bool = True,
    ) -> None:
        self.rank = rank
        self._coalesce = coalesce
        self.world_size = world_size
        self._numel = numel
        self._dtype = dtype
        self._group = group
        self._key = key
        self._capacity = encoded_size(numel, dtype, world_size if send_clock else 0, key is not None)
        self._inbox = CoalescingQueue(coalesce)
        self._outboxes: dict[int, CoalescingQueue] = {}
        self._senders: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stats = TransportStats()
        self._shutdown_expected = threading.Event()
        self._closed = False
        self._receiver: threading.Thread | None = None
        if world_size > 1:
            self._receiver = threading.Thread(
                target=self._receive_loop, name=f"dasgd-recv-{rank}", daemon=True
            )
            self._receiver.start()

    # -- Transport protocol ---------------------------------------------------------------------------
    def send(self, peer: int, msg: Message) -> None:
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(f"worker {self.rank} cannot send to peer {peer} (world size {self.world_size})")
        with self._lock:
            if peer in self._stats.dead_peers:
                self._stats.undelivered += 1
                return
            box = self._outboxes.get(peer)
            if box is None:
                box = self._outboxes[peer] = CoalescingQueue(self._coalesce)
                thread = threading.Thread(
                    target=self._send_loop,
                    args=(peer, box),
                    name=f"dasgd-send-{self.rank}-{peer}",
                    daemon=True,
                )
                self._senders[peer] = thread
                thread.start()
        box.put(msg)

    def poll(self) -> list[Message]:
        return self._inbox.drain()

    def wait(self, timeout: float) -> bool:
        return self._inbox.wait_nonempty(timeout)

    def flush(self, timeout: float) -> bool:
        import time  # the transport is a real-time component; the deadline is wall time by nature

        deadline = time.monotonic() + timeout
        for box in list(self._outboxes.values()):
            if not box.wait_idle(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def stats(self) -> TransportStats:
        with self._lock:
            self._stats.coalesced = sum(b.stats.coalesced for b in self._outboxes.values())
            return self._stats

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for box in self._outboxes.values():
            box.close()
        for thread in self._senders.values():
            thread.join(timeout=1.0)

    # -- threads --------------------------------------------------------------------------------------
    def _send_loop(self, peer: int, box: CoalescingQueue) -> None:
        buf = torch.empty(self._capacity, dtype=torch.uint8)
        while True:
            msg = box.take()
            if msg is None:
                return
            try:
                n = encode_into(msg, buf, self._key)
                dist.isend(buf[:n], dst=peer, group=self._group, tag=_TAG).wait()
                with self._lock:
                    self._stats.sent_messages += 1
                    self._stats.sent_bytes += n
            except RuntimeError:
                # Gloo raises RuntimeError("... Connection closed by peer ...") when the peer died. The pair
                # is unusable for good: count what we could not deliver and stop sending to it.
                with self._lock:
                    self._stats.dead_peers.add(peer)
                    self._stats.undelivered += 1 + len(box.drain())
            finally:
                box.done()

    def _receive_loop(self) -> None:
        buf = torch.empty(self._capacity, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        while True:
            try:
                dist.irecv(buf, src=None, group=self._group, tag=_TAG).wait()
            except RuntimeError:
                if self._closed:
                    return
                # An oversized or broken message; the buffer cannot hold it. Count and keep listening.
                with self._lock:
                    self._stats.rejected["receive_error"] += 1
                continue
            try:
                msg = decode(view, world_size=self.world_size, key=self._key)
            except WireError as exc:
                with self._lock:
                    self._stats.rejected[exc.reason] += 1
                continue
            with self._lock:
                self._stats.received_messages += 1
                self._stats.received_bytes += encoded_size(
                    0 if msg.payload is None else msg.payload.numel(),
                    None if msg.payload is None else msg.payload.dtype,
                    0 if msg.clock is None else len(msg.clock),
                    self._key is not None,
                )
            if msg.kind == Kind.SHUTDOWN:
                if self._shutdown_expected.is_set():
                    return
                with self._lock:
                    self._stats.rejected["early_shutdown"] += 1
                continue
            self._inbox.put(msg)
