"""Transport over torch.distributed point-to-point (Gloo for CPU tensors).

How it never blocks training (docs/design.md lists the measured Gloo behaviour this design follows):
- A posted Gloo send completes only once the receiver posted a matching receive, and a posted operation
  cannot be polled. So every peer gets its own *sender thread* that blocks in ``wait()``, fed by a bounded
  :class:`CoalescingQueue`: while a peer is slow, newer gradients for it are summed into the queued message
  (keeping its id range), so the training thread only ever does an in-memory add.
- One *receiver thread per peer* keeps a receive from that peer posted at all times. (A single
  ``irecv(src=None)`` is not fair under load: see :mod:`dasgd.transport.threads`.)
- Every link opens with a handshake, and every message is bound to the run, the link and its sequence
  number (:mod:`dasgd.transport.threads`, :mod:`dasgd.core.wire`).
- Two-phase receive: the posted receive is a *slot* of a size this worker chose: the header, a full vector
  clock, and the payload when it is at most :data:`INLINE_PAYLOAD_LIMIT` bytes (one transfer per message
  for models up to 16,384 float32 parameters and for control messages). A larger payload is detached: the header announces it and
  carries its digest, and it follows on :data:`~dasgd.transport.threads.PAYLOAD_TAG` straight from the
  sender's tensor into a fresh tensor on the receiver (no copy on either side), received only once the
  header was verified and announced exactly this transport's payload.
- The process-group timeout is set long by the caller; a dead peer shows up as a failed send or receive
  ("Connection closed by peer"), after which that peer is marked dead and its queue is counted as
  undelivered.
- End of run: the runtime calls :meth:`shutdown` once every worker has drained (after its end-of-run
  collective); each worker sends a SHUTDOWN to every live peer, which ends that peer's receiver for us.
  A SHUTDOWN that arrives before :meth:`expect_shutdown` is rejected, so no peer can silence us early.
Collectives must not run on the same group as these threads: the runtime uses a separate group for them.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dasgd.core.message import Message
from dasgd.core.wire import Link, encode_into, encoded_size
from dasgd.transport.threads import DEFAULT_HANDSHAKE_TIMEOUT, PAYLOAD_TAG, SLOT_TAG, PeerThreads

__all__ = ["INLINE_PAYLOAD_LIMIT", "TorchDistTransport"]

INLINE_PAYLOAD_LIMIT = 65536
"""Payloads of at most this many bytes (16,384 float32) travel in the slot with their header, in one transfer
(copied into the send buffer and out of the receive buffer, as wire version 1 did with every payload);
larger ones are detached: a second transfer, straight from the sender's tensor into a fresh one on the
receiver. A second transfer costs a round trip, which dominates below some tens of KiB and is noise above
(benchmarks/bench_transport.py). Part of the protocol: every endpoint sizes its slot receive by it, so a
slot never holds more than one message of wire version 1 did."""

# The header arrived, so the payload is on its way; a peer that never sends it stalls only its own link.
_RECEIVE_PATIENCE = timedelta(days=365)


class TorchDistTransport(PeerThreads):
    """A Transport endpoint on a torch.distributed (Gloo) process group.

    Every peer must build its endpoint at about the same time (within ``handshake_timeout``): the
    constructor opens every link with a handshake and returns once every peer's HELLO was accepted.

    Args:
        rank: this process's rank in ``group``.
        world_size: ranks in ``group``.
        numel: elements of a gradient payload (the replica's parameter count).
        dtype: payload dtype.
        group: the process group for point-to-point traffic (None: the default group).
        key: shared secret; when set, every message carries an HMAC-SHA256 tag that also covers its
            detached payload (through the header's SHA-256 digest), and unsigned messages are refused.
        send_clock: messages carry the sender's vector clock.
        coalesce: sum queued contiguous gradients of one origin (False: keep every message separate).
        nonce: the run's nonce (16 bytes, the same on every worker: use
            :func:`dasgd.transport.handshake.agree_run_nonce`); every message is bound to it. None: an
            all-zero nonce, which binds nothing to the run.
        spec_digest: 32 bytes that identify the run's spec
            (:func:`dasgd.transport.handshake.spec_digest`); a peer whose digest differs is refused at the
            handshake. The world size, numel and dtype are compared whatever is given here.
        handshake_timeout: seconds to wait for every peer's HELLO.

    Raises:
        HandshakeError: a peer was refused at the handshake (another wire version, key, run, world size,
            payload or spec), sent no HELLO in time, or was lost; the message names each peer and why.
    """

    _transport_name = "torchdist"

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
        *,
        nonce: bytes | None = None,
        spec_digest: bytes | None = None,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        self._setup_threads(
            rank,
            world_size,
            coalesce,
            numel=numel,
            dtype=dtype,
            control_group=group,
            key=key,
            nonce=nonce,
            spec_digest=spec_digest,
        )
        self._group = group
        self._send_clock = send_clock
        payload_bytes = numel * dtype.itemsize
        self._inline = payload_bytes <= INLINE_PAYLOAD_LIMIT
        # The slot fits a full clock whatever we send (a peer may be configured to send one), and the payload
        # when it rides along.
        self._slot_capacity = encoded_size(numel, dtype, world_size, detached=not self._inline)
        self._open_links(f"dasgd-recv-{rank}", handshake_timeout)

    # -- Transport protocol ---------------------------------------------------------------------------
    def send(self, peer: int, msg: Message) -> None:
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(f"worker {self.rank} cannot send to peer {peer} (world size {self.world_size})")
        box = self._outbox(peer, f"dasgd-send-{self.rank}-{peer}")
        if box is not None:
            box.put(msg)

    # -- threads --------------------------------------------------------------------------------------
    def _send_message(
        self, peer: int, msg: Message, slot: torch.Tensor, link: Link, seq: int, outbox: Any
    ) -> int:
        payload = msg.payload
        detached = payload is not None and not self._inline
        if detached:
            assert payload is not None
            # C order, contiguous (a view when it already is): the bytes the digest covers are the bytes sent.
            flat = payload.detach().reshape(-1).contiguous()
            msg = dataclasses.replace(msg, payload=flat)
        n = encode_into(msg, slot, self._key, link=link, seq=seq, detached=detached)
        head = dist.isend(slot[:n], group=self._group, group_dst=peer, tag=SLOT_TAG)
        body = None
        if detached and flat.numel():  # the receiver posts nothing for an empty payload either
            # Posted at once, not after the header's send completed: Gloo sends nothing before the receiver
            # posts the matching receive (which it does only for a header it accepted), and the payload then
            # flows as soon as it does, instead of one more round trip later.
            body = dist.isend(flat, group=self._group, group_dst=peer, tag=PAYLOAD_TAG)
            n += flat.numel() * flat.element_size()
        head.wait()
        if body is not None:
            body.wait()
        return n

    def _receive_payload(self, peer: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        # Sized from the verified header, which announced exactly this transport's numel and dtype.
        tensor = torch.empty(numel, dtype=dtype)
        if numel:
            dist.irecv(tensor, group=self._group, group_src=peer, tag=PAYLOAD_TAG).wait(_RECEIVE_PATIENCE)
        return tensor
