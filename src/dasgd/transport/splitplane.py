"""Split-plane transport: headers over a Gloo control group, payload tensors over a data group (NCCL on GPUs).

Why two planes: GPU replicas should exchange gradients GPU to GPU over NCCL, without a copy to the host.
NCCL point-to-point, however, cannot receive from "any source" (there is no ``irecv(src=None)``), so a
receiver could not know whom to listen to next. The split:

- **Control plane** (a Gloo group, exactly as :class:`~dasgd.transport.torchdist.TorchDistTransport`, with
  the same handshake, sequence numbers and slot receive: :mod:`dasgd.transport.threads`): every message goes
  as a wire-encoded header with its clock. A message with a payload (GRADIENT, MODEL) is always encoded with
  the *detached* flag (:mod:`dasgd.core.wire`, flags bit 1): numel and dtype announce the payload, whose
  bytes are not in the header.
- **Data plane**: right after a header's send completes, the same sender thread sends the payload tensor
  itself (``isend``) to the same peer on a data group; that peer's receiver thread, having verified the
  header, knows the element count and dtype, and posts the matching ``irecv`` into a fresh buffer on the
  data device. Per pair both planes are FIFO and each pair's data operations are issued by one thread on
  each side, so the k-th payload received from a peer belongs to the k-th detached header accepted from it.
  For CUDA tensors the data groups are NCCL; for CPU tensors Gloo (how the tests run this code on a CPU).

Two data groups, ``up`` (lower rank -> higher rank) and ``down`` (higher -> lower), made by
:func:`make_data_groups`: ProcessGroupNCCL runs all point-to-point traffic of a pair on one communicator and
one stream, and NCCL sends are rendezvous operations, so if both ranks of a pair sent at once on the same
communicator each send would wait for a receive queued behind the other's send: a deadlock. With one group
per direction, a pair's communicator in ``up`` only ever carries a -> b and the one in ``down`` only b -> a.
What remains is NCCL's general caveat for several communicators in use at once: a rank may run a send kernel
(one communicator) while it has a receive pending on another, so the GPU must be able to run the two kernels
side by side; every transfer here is posted only once its counterpart is imminent, which keeps that short.

Untrusted headers: a detached header must announce exactly the constructor's ``numel`` and ``dtype``;
otherwise it is rejected and counted (``shape`` / ``bad_dtype``) and NO data receive is posted for it (that
is what keeps a hostile header from making us allocate or wait). The pair's data plane is then out of step,
so that peer is *unsynced* from then on (``unsynced_peer``; :mod:`dasgd.transport.threads`). Each receiver
listens to one peer, so a header claiming another sender is refused (``wrong_sender``, without a data
receive): no peer can spend another's data plane, with or without a key. A peer that sends a valid header
and then never the payload stalls its own receiver here until the data group's timeout (Gloo raises,
counted as ``payload_receive_error``; NCCL's watchdog aborts the process).

Authentication: with a key, the header's HMAC covers the header, the clock and the payload's SHA-256
digest, which the sender computes on a host copy of the payload and the receiver checks on a host copy of
what arrived, before delivering it (``bad_digest`` otherwise). For CUDA payloads that is one device-to-host
copy and one SHA-256 per gradient on each side: the price of authenticating the data plane. Without a key
a CPU payload carries a crc32 (cheap, accidental corruption only) and a CUDA payload carries no digest: its
integrity is left to the data fabric, as a crc would cost the same host copy.

CUDA stream discipline (see the comments at each use; none of it runs for CPU tensors):
- ``send`` records a CUDA event on the caller's current stream after queuing the payload (the queue may
  have added it into a pending one there), and the sender thread makes its own side stream wait for those
  events before hashing or sending: NCCL orders its stream after the *calling thread's* current stream only.
- Each transport thread issues its NCCL work from a private side stream, never the default one: NCCL's
  ``work.wait()`` makes the current stream wait for the transfer, and if the training stream waited on a
  receive while the peer's send waited on *its* training stream, which waited on a receive from us, the GPUs
  would deadlock. After ``work.wait()`` the thread synchronises its side stream, so a sent payload stays
  alive (referenced) until the transfer is done and a received one is complete before the inbox sees it.
- A received tensor is marked (``record_stream``) as used by the *consumer stream* (the stream current when
  the transport was built, normally the device's default stream), and the inbox's coalescing ``add_`` runs
  on that stream, so a training loop on the consumer stream sees finished values and the caching allocator
  does not hand the memory out again while the consumer still reads it. A loop that works on another stream
  must synchronise with the consumer stream before reading polled payloads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from dasgd.core.message import Message
from dasgd.core.wire import Link, encode_into, encoded_size
from dasgd.transport.queue import CoalescingQueue
from dasgd.transport.threads import DEFAULT_HANDSHAKE_TIMEOUT, PAYLOAD_TAG, SLOT_TAG, PeerThreads

__all__ = ["SplitPlaneTransport", "SplitPlaneUsageError", "make_data_groups"]


class SplitPlaneUsageError(ValueError):
    """The transport was built or called wrongly (a bug on this side, not bad bytes from a peer)."""


def make_data_groups(
    backend: str,
    ranks: Sequence[int] | None = None,
    timeout: timedelta | None = None,
) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """Create the two data-plane groups ``(up, down)``: up carries lower -> higher rank, down the reverse.

    Like every ``torch.distributed.new_group``, every process of the default group must call this at the
    same point, in the same order relative to its other ``new_group`` calls, with the same arguments.

    Args:
        backend: ``"nccl"`` for CUDA payloads, ``"gloo"`` for CPU payloads.
        ranks: members (default: every process). Must be the control group's members, in the same order,
            so that a rank means the same process on the three groups.
        timeout: the groups' operation timeout (default: torch's). Data operations are posted only once
            their header arrived, so they never wait long unless a peer dies mid-message.

    Returns:
        ``(up, down)``, two distinct groups over the same ranks.
    """
    if backend not in ("nccl", "gloo"):
        raise SplitPlaneUsageError(
            f"data-plane backend {backend!r} is not supported; use 'nccl' (CUDA tensors) or 'gloo' (CPU)"
        )
    members = None if ranks is None else list(ranks)
    # Two separate new_group calls give two ProcessGroup objects, hence two NCCL communicators per pair.
    up = dist.new_group(ranks=members, backend=backend, timeout=timeout)
    down = dist.new_group(ranks=members, backend=backend, timeout=timeout)
    return up, down


class _Outbox:
    """One peer's queue plus the CUDA events that say when queued payloads are ready on their streams."""

    __slots__ = ("box", "lock", "ready")

    def __init__(self, coalesce: bool = True) -> None:
        self.box = CoalescingQueue(coalesce)
        # Held around "put + record the event" in send() and while the sender thread reads the events, so
        # a message the sender took is covered by an event recorded after its last change (see _send_loop).
        self.lock = threading.Lock()
        # Latest event per CUDA stream that queued work for this peer. Work on one stream is ordered, so
        # the latest event of a stream covers everything earlier on it; one entry per stream bounds this.
        self.ready: dict[torch.cuda.Stream, torch.cuda.Event] = {}


def _normalise_device(device: torch.device | str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        # CUDA-only: "cuda" means the current device; tensors report an explicit index, so pin it here.
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type not in ("cpu", "cuda"):
        raise SplitPlaneUsageError(f"data device {dev} is not supported; use 'cpu' (Gloo) or 'cuda:N' (NCCL)")
    return dev


class SplitPlaneTransport(PeerThreads):
    """A Transport endpoint whose headers travel on a Gloo control group and payloads on data groups.

    Implements the :class:`dasgd.transport.base.Transport` protocol, plus :meth:`expect_shutdown` and
    :meth:`shutdown` with the same end-of-run semantics as ``TorchDistTransport``, and the same handshake:
    every peer must build its endpoint at about the same time (within ``handshake_timeout``). The module
    docstring explains the design, the NCCL constraints it follows and what a hostile header can and cannot
    do.

    Args:
        rank: this process's rank in the three groups.
        world_size: ranks in each group.
        numel: elements of every payload (the replica's parameter count).
        dtype: payload dtype.
        device: the data device; every payload given to :meth:`send` must be on it, and received payloads
            are allocated there. ``cuda`` devices need NCCL data groups, ``cpu`` Gloo ones.
        control_group: Gloo group for the headers (None: the default group). Run no collectives on it
            while the transport is open.
        up_group: data group for traffic from lower to higher rank (from :func:`make_data_groups`).
        down_group: data group for traffic from higher to lower rank.
        key: shared secret; when set, every header carries an HMAC-SHA256 tag over the header, the clock
            and the payload's SHA-256, and unsigned headers are refused.
        send_clock: messages carry the sender's vector clock.
        coalesce: sum queued contiguous gradients of one origin (False: keep every message separate).
        nonce: the run's nonce (see :class:`~dasgd.transport.torchdist.TorchDistTransport`).
        spec_digest: 32 bytes that identify the run's spec (as for ``TorchDistTransport``).
        handshake_timeout: seconds to wait for every peer's HELLO.

    Raises:
        SplitPlaneUsageError: inconsistent ranks or groups, an unsupported device, or ``up_group`` and
            ``down_group`` being the same group.
        HandshakeError: a peer was refused at the handshake, sent no HELLO in time, or was lost.
    """

    _transport_name = "splitplane"
    _inline_payloads = False

    def __init__(
        self,
        rank: int,
        world_size: int,
        numel: int,
        dtype: torch.dtype,
        device: torch.device | str,
        control_group: dist.ProcessGroup | None,
        up_group: dist.ProcessGroup,
        down_group: dist.ProcessGroup,
        key: bytes | None = None,
        send_clock: bool = True,
        coalesce: bool = True,
        *,
        nonce: bytes | None = None,
        spec_digest: bytes | None = None,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        if not 0 <= rank < world_size:
            raise SplitPlaneUsageError(f"rank {rank} is outside a world of {world_size} workers")
        if numel < 0:
            raise SplitPlaneUsageError(f"numel must be >= 0, got {numel}")
        if up_group is None or down_group is None or up_group is down_group:
            raise SplitPlaneUsageError(
                "up_group and down_group must be two distinct groups (one per direction); "
                "create them with make_data_groups(backend) on every rank"
            )
        if world_size > 1:
            for name, group in (("control", control_group), ("up", up_group), ("down", down_group)):
                if dist.get_world_size(group) != world_size or dist.get_rank(group) != rank:
                    raise SplitPlaneUsageError(
                        f"the {name} group has size {dist.get_world_size(group)} and rank "
                        f"{dist.get_rank(group)} here, but the transport was given world_size={world_size} "
                        f"and rank={rank}; all three groups must span the same ranks in the same order"
                    )
        self._device = _normalise_device(device)
        self._setup_threads(
            rank,
            world_size,
            coalesce,
            numel=numel,
            dtype=dtype,
            control_group=control_group,
            key=key,
            nonce=nonce,
            spec_digest=spec_digest,
        )
        self._cuda = self._device.type == "cuda"
        self._up = up_group
        self._down = down_group
        self._send_clock = send_clock
        # Headers only: sized for a full clock whatever we send, since a peer may be configured to send one.
        self._slot_capacity = encoded_size(numel, dtype, world_size, detached=True)
        self._payload_bytes = numel * dtype.itemsize
        # A digest needs the payload's bytes on the host. With a key it is the data plane's authentication,
        # so it is always there; without one, a CPU payload gets a cheap crc and a CUDA payload none (its
        # host copy would cost what the split plane exists to avoid).
        self._digest = key is not None or not self._cuda
        # CUDA-only: the stream consumers of received tensors work on (see the module docstring).
        self._consumer_stream = torch.cuda.current_stream(self._device) if self._cuda else None
        self._open_links(f"dasgd-splitrecv-{rank}", handshake_timeout)

    # -- Transport protocol ---------------------------------------------------------------------------
    def send(self, peer: int, msg: Message) -> None:
        """Queue ``msg`` for ``peer``; never blocks. A payload must be on the data device with the
        transport's numel and dtype, and must not be modified afterwards (it is sent asynchronously).

        Raises:
            SplitPlaneUsageError: bad peer, or a payload of the wrong size, dtype or device.
        """
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise SplitPlaneUsageError(
                f"worker {self.rank} cannot send to peer {peer} (world size {self.world_size})"
            )
        payload = msg.payload
        if payload is not None:
            # Checked here, on the caller's side, because a receiver refuses such a header and stops
            # listening to our data plane for good: better a clear error now than a silent partition.
            if payload.numel() != self._numel or payload.dtype != self._dtype:
                raise SplitPlaneUsageError(
                    f"payload has {payload.numel()} {payload.dtype} elements but the transport carries "
                    f"{self._numel} {self._dtype}; build it with the replica's parameter count and dtype"
                )
            if payload.device != self._device:
                raise SplitPlaneUsageError(
                    f"payload is on {payload.device} but the data device is {self._device}; "
                    f"move it with .to({str(self._device)!r}) before sending"
                )
        out = self._outbox(peer, f"dasgd-splitsend-{self.rank}-{peer}")
        if out is None:
            return
        with out.lock:
            out.box.put(msg)
            if payload is not None and payload.is_cuda:
                # CUDA-only. put() may have run clone()/add_() on the current stream, and the payload was
                # produced on it: an event recorded now marks the point the sender thread must wait for.
                stream = torch.cuda.current_stream(payload.device)
                event = torch.cuda.Event()
                event.record(stream)
                out.ready[stream] = event

    def _new_outbox(self) -> _Outbox:
        return _Outbox(self._coalesce)

    @staticmethod
    def _queue_of(outbox: _Outbox) -> CoalescingQueue:
        return outbox.box

    # -- plumbing -------------------------------------------------------------------------------------
    def _data_group(self, src: int, dst: int) -> dist.ProcessGroup:
        # One group per direction, so that a pair's NCCL communicator never carries both ways at once.
        return self._up if src < dst else self._down

    @contextlib.contextmanager
    def _thread_context(self) -> Iterator[None]:
        """Run the body with a private CUDA stream current (CUDA only; a no-op on the CPU).

        CUDA-only: the current device and stream are per thread, so each transport thread selects the
        data device and its own stream once, for its whole life (see the module docstring for why).
        """
        if not self._cuda:
            yield
            return
        torch.cuda.set_device(self._device)
        with torch.cuda.stream(torch.cuda.Stream(self._device)):
            yield

    def _send_message(
        self, peer: int, msg: Message, slot: torch.Tensor, link: Link, seq: int, out: _Outbox
    ) -> int:
        payload = msg.payload
        flat = None
        if payload is not None:
            flat = self._ready_payload(payload, out)
            msg = dataclasses.replace(msg, payload=flat)
        n = encode_into(
            msg, slot, self._key, link=link, seq=seq, detached=flat is not None, digest=self._digest
        )
        # Header first (Gloo): the receiver learns who sends what before the data arrives, which NCCL needs
        # because it cannot receive from an unknown source.
        dist.isend(slot[:n], group=self._control, group_dst=peer, tag=SLOT_TAG).wait()
        if flat is not None and flat.numel():  # the receiver posts nothing for an empty payload either
            dist.isend(flat, group=self._data_group(self.rank, peer), group_dst=peer, tag=PAYLOAD_TAG).wait()
            if flat.is_cuda:
                # CUDA-only: NCCL's wait() only made our side stream wait for the transfer; block until it
                # has really happened, so neither ``flat`` nor the payload is freed or reused before. Only
                # then may the caller mark the message done (the message keeps the payload alive).
                torch.cuda.current_stream(flat.device).synchronize()
            n += flat.numel() * flat.element_size()
        return n

    def _ready_payload(self, payload: torch.Tensor, out: _Outbox) -> torch.Tensor:
        """``payload`` flat and contiguous in C order (as the receiver's buffer expects), once every change
        queued to it on a CUDA stream is done as far as this thread's stream is concerned."""
        if payload.is_cuda:
            # CUDA-only. The message was taken from the queue before this lock is acquired, and send()
            # holds the lock from put() until its event is recorded, so the events read here cover every
            # change made to this payload. Waiting is on the GPU (stream to event), not on the host; the
            # digest's host copy and the send both run on this stream, after the waits.
            with out.lock:
                events = list(out.ready.values())
            stream = torch.cuda.current_stream(payload.device)
            for event in events:
                stream.wait_event(event)
        return payload.detach().reshape(-1).contiguous()

    def _receive_payload(self, peer: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """Receive the payload announced by a verified header from ``peer``; RuntimeError if it fails."""
        tensor = torch.empty(numel, dtype=dtype, device=self._device)
        if numel:
            # An explicit source (NCCL has no "any source"): the header said who sends the payload.
            group = self._data_group(peer, self.rank)
            # No timeout argument: the data group's own timeout applies (and a NCCL wait with one would block
            # this thread on the host instead of making its stream wait).
            dist.irecv(tensor, group=group, group_src=peer, tag=PAYLOAD_TAG).wait()
            if tensor.is_cuda:
                # CUDA-only: wait() made only our side stream wait; synchronise so the values are final
                # before they are hashed or handed out, then tell the allocator the consumer stream uses them.
                torch.cuda.current_stream(tensor.device).synchronize()
                tensor.record_stream(self._consumer_stream)
        return tensor

    def _deliver(self, msg: Message) -> None:
        if self._consumer_stream is None:
            self._inbox.put(msg)
            return
        # CUDA-only: the inbox may clone()/add_() this payload into a queued one; do that on the consumer
        # stream, so a consumer working there is ordered after it.
        with torch.cuda.stream(self._consumer_stream):
            self._inbox.put(msg)
