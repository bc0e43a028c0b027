"""Transport over torch.distributed point-to-point (Gloo for CPU tensors).

How it never blocks training (docs/design.md lists the measured Gloo behaviour this design follows):
- A posted Gloo send completes only once the receiver posted a matching receive, and a posted operation
  cannot be polled. So every peer gets its own *sender thread* that blocks in ``wait()``, fed by a bounded
  :class:`CoalescingQueue`: while a peer is slow, newer gradients for it are summed into the queued message
  (keeping its id range), so the training thread only ever does an in-memory add.
- One *receiver thread per peer* keeps a receive from that peer posted at all times into a buffer sized for
  the largest valid message, decodes and validates the bytes (they are untrusted; the sender field must name
  that peer), and puts accepted messages in one coalescing inbox that the training loop polls. (A single
  ``irecv(src=None)`` is not fair under load: see :mod:`dasgd.transport.threads`.)
- The process-group timeout is set long by the caller; a dead peer shows up as a failed send or receive
  ("Connection closed by peer"), after which that peer is marked dead and its queue is counted as
  undelivered.
- End of run: the runtime calls :meth:`shutdown` once every worker has drained (after its end-of-run
  collective); each worker sends a SHUTDOWN to every live peer, which ends that peer's receiver for us.
  A SHUTDOWN that arrives before :meth:`expect_shutdown` is rejected, so no peer can silence us early.
Collectives must not run on the same group as these threads: the runtime uses a separate group for them.
"""

from __future__ import annotations

from operator import attrgetter

import torch
import torch.distributed as dist

from dasgd.core.message import Kind, Message
from dasgd.core.wire import decode, encode_into, encoded_size
from dasgd.transport.queue import CoalescingQueue
from dasgd.transport.threads import PeerThreads

__all__ = ["TorchDistTransport"]

_TAG = 7  # one tag for all data-plane traffic; per-pair order is preserved by Gloo
_sender_of = attrgetter("sender")


class TorchDistTransport(PeerThreads):
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
        self._setup_threads(rank, world_size, coalesce)
        self._numel = numel
        self._dtype = dtype
        self._group = group
        self._key = key
        self._capacity = encoded_size(numel, dtype, world_size if send_clock else 0, key is not None)
        self._start_receivers(f"dasgd-recv-{rank}")

    # -- Transport protocol ---------------------------------------------------------------------------
    def send(self, peer: int, msg: Message) -> None:
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(f"worker {self.rank} cannot send to peer {peer} (world size {self.world_size})")
        box = self._outbox(peer, f"dasgd-send-{self.rank}-{peer}")
        if box is not None:
            box.put(msg)

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
                self._count_sent(n)
            except RuntimeError:
                self._peer_died(peer, box)
            finally:
                box.done()

    def _receive_loop(self, peer: int) -> None:
        for msg in self._decoded(peer, self._group, _TAG, decode, _sender_of):
            self._count_received(
                encoded_size(
                    0 if msg.payload is None else msg.payload.numel(),
                    None if msg.payload is None else msg.payload.dtype,
                    0 if msg.clock is None else len(msg.clock),
                    self._key is not None,
                )
            )
            if msg.kind == Kind.SHUTDOWN:
                if self._shutdown_expected.is_set():
                    return
                self._count_rejected("early_shutdown")
                continue
            self._inbox.put(msg)
