"""The link machinery the torch.distributed transports share: handshake, sequence numbers, two-phase receive,
and a sender thread and a receiver thread per peer.

Both :class:`~dasgd.transport.torchdist.TorchDistTransport` and
:class:`~dasgd.transport.splitplane.SplitPlaneTransport` keep a coalescing outbox per peer, drained by that
peer's own sender thread (a posted Gloo/NCCL send blocks until the peer receives, so training must never wait
on one), and one receiver thread per peer, each keeping a receive from that peer posted and feeding one
coalescing inbox that the training loop polls. What differs is where a detached payload travels
(``_send_message``, ``_receive_payload``) and what an outbox holds (the split plane also keeps CUDA events
next to its queue): subclasses provide those.

A link's life (see :mod:`dasgd.core.wire` for the bytes):

1. **Handshake.** Each side sends one HELLO (wire version, run nonce, link, world size, payload numel and
   dtype, spec digest, proof of the key) and checks the peer's before anything else moves. The constructor
   waits for every peer's HELLO, at most ``handshake_timeout`` seconds, and raises
   :class:`~dasgd.transport.handshake.HandshakeError` naming every peer it refused and why.
2. **Messages.** Every message gets the link's next sequence number when its sender thread puts it on the
   wire (so a coalesced entry is one message with one number), and the receiver accepts exactly the number
   it expects next (Gloo keeps a pair's messages on one tag in order): a replayed or reordered message is
   refused (``replay``), and so is one bound to another run, link or key.
3. **Two-phase receive.** The receiver keeps a *slot* receive posted: a fixed size it chose itself (a
   header, a full vector clock and, for the Gloo transport, a payload small enough to ride along). A larger
   payload is *detached*: the header announces its element count and dtype and carries its digest, and the
   receiver posts a receive for it (on another tag or group) only after the header passed every check and
   announced exactly the transport's payload. So no byte count chosen by a peer reaches a posted receive,
   which matters because a Gloo receive that gets more bytes than it posted aborts the whole process.

Keeping the payload transfers in step: the k-th payload from a peer belongs to the k-th detached header the
receiver accepted. If it refuses a header that may have a payload behind it (a detached one, or one it
could not authenticate, which could say anything), the sender may still send that payload and nobody
receives it; the peer's payload channel is then out of step, so the peer is *unsynced* from then on: its
later detached headers are refused (``unsynced_peer``) without a receive, while its messages that fit the
slot still count. A well-behaved peer never causes this; a peer that does hurts only its own link.

Why a receiver per peer rather than one ``irecv(src=None)``: a receive from any source is not fair. When a
receiver is saturated, Gloo may keep matching the same senders and leave one peer's messages waiting until
the end of the run. Measured under two torchrun agents (4 processes on 2 cores, digits-logreg, 8 runs each):
S_avg 455-1,168 with one receive from any source, 210-517 with a receive per peer; the rest of that
staleness is the OS starving whole processes of CPU (docs/design.md). A receive per peer also tells us who
really sent each message (the link's source), so a header that claims another sender is refused
(``wrong_sender``) even without a key.

Rejection reasons beyond :data:`dasgd.core.wire.REJECT_REASONS`: ``early_shutdown`` (SHUTDOWN before
:meth:`PeerThreads.expect_shutdown`), ``inline_payload`` (a payload inside the slot where the transport
always detaches), ``unsynced_peer`` (see above) and ``payload_receive_error`` (the payload receive failed;
the peer becomes unsynced).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dasgd.core.message import Kind, Message
from dasgd.core.wire import (
    HEADER_SIZE,
    NONCE_SIZE,
    Decoded,
    Link,
    WireError,
    check_hello,
    decode_detached,
    encode_hello,
    verify_payload,
)
from dasgd.transport.base import TransportStats
from dasgd.transport.handshake import HandshakeError, link_spec_digest
from dasgd.transport.queue import CoalescingQueue

__all__ = ["DEFAULT_HANDSHAKE_TIMEOUT", "PAYLOAD_TAG", "PeerThreads", "SLOT_TAG"]

SLOT_TAG = 11
"""Tag of HELLOs and headers (with their clock and inline payload). Wire version 1 used tag 7, so its
traffic never matches a version-2 receive."""
PAYLOAD_TAG = 12
"""Tag of detached payloads (on the control group for the Gloo transport, on the data groups for the split
plane)."""
DEFAULT_HANDSHAKE_TIMEOUT = 120.0
"""Seconds a transport's constructor waits for every peer's HELLO. Peers build their transports after the
rendezvous, so this only has to cover the difference in their start-up work (loading data, building the
model); a peer that answers with a HELLO we refuse is refused at once."""

# How long a posted receive may wait for its peer. Gloo otherwise uses the process group's timeout, after
# which the receive fails; a peer that has nothing to send us (a sparse topology, a long quiet phase) is not
# a broken one, and a timed-out receive cannot safely be posted again (the abandoned one may still match).
_RECEIVE_PATIENCE = timedelta(days=365)


class PeerThreads:
    """Per-peer sender and receiver threads, the link handshake, and the Transport methods that only touch
    the queues.

    Subclasses call :meth:`_setup_threads` in their constructor, then :meth:`_open_links` once ready (it
    starts the receivers and runs the handshake), get a peer's outbox with :meth:`_outbox` in ``send``, and
    implement ``_send_message`` (put one message, with its sequence number, on the wire) and
    ``_receive_payload`` (receive a detached payload the header announced). Override :meth:`_new_outbox` and
    :meth:`_queue_of` when an outbox is more than a :class:`CoalescingQueue`, :meth:`_thread_context` to run
    the transport's threads in a context (a CUDA side stream), and :meth:`_deliver` to hand a message to the
    inbox differently.

    End of run: :meth:`expect_shutdown` once the drain is complete everywhere, then :meth:`shutdown`, which
    sends a SHUTDOWN to every peer it can still reach; the receiver for that peer ends on it, and accepts it
    only after :meth:`expect_shutdown`, so no peer can silence a worker before its drain is complete. A
    receiver whose peer is gone ends on the closed link.

    Memory: each receiver owns a slot buffer of ``_slot_capacity`` bytes, so an endpoint holds
    ``world_size - 1`` of them; a detached payload is received into a fresh tensor that becomes the
    message's payload (no copy).
    """

    _slot_capacity: int
    """Bytes of the slot receive: a header, a full clock and the largest inline payload."""
    _inline_payloads: bool = True
    """Whether a payload may ride in the slot (False: every payload is detached, ``inline_payload``)."""
    _transport_name: str = "torchdist"

    def _setup_threads(
        self,
        rank: int,
        world_size: int,
        coalesce: bool,
        *,
        numel: int,
        dtype: torch.dtype,
        control_group: dist.ProcessGroup | None,
        key: bytes | None,
        nonce: bytes | None,
        spec_digest: bytes | None,
    ) -> None:
        if nonce is not None and len(nonce) != NONCE_SIZE:
            raise ValueError(
                f"nonce must be {NONCE_SIZE} bytes (dasgd.transport.handshake.agree_run_nonce), got {len(nonce)}"
            )
        if key is not None and len(key) == 0:
            raise ValueError("the shared secret is empty; pass key=None to disable authentication")
        self.rank = rank
        self.world_size = world_size
        self._coalesce = coalesce
        self._numel = numel
        self._dtype = dtype
        self._control = control_group
        self._key = None if key is None else bytes(key)
        # Without a nonce the links are bound to no run: every run looks alike (the runtime always passes one).
        self._nonce = bytes(NONCE_SIZE) if nonce is None else bytes(nonce)
        self._spec = link_spec_digest(spec_digest, self._transport_name)
        self._inbox = CoalescingQueue(coalesce)
        self._outboxes: dict[int, Any] = {}
        self._senders: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()  # guards the outboxes, the senders, the sequence numbers and the stats
        self._stats = TransportStats()
        self._shutdown_expected = threading.Event()
        self._closed = False
        self._receivers: dict[int, threading.Thread] = {}
        self._next_seq: dict[int, int] = {}
        self._hello_done: dict[int, threading.Event] = {}
        self._hello_problem: dict[int, tuple[str, str]] = {}
        self._hello_sends: dict[int, tuple[Any, torch.Tensor]] = {}
        self._unsynced: set[int] = set()  # peers whose payload channel is out of step (module docstring)
        self._failure: tuple[str, BaseException] | None = None  # the first thread that died, and why

    # -- links ----------------------------------------------------------------------------------------
    def _link_in(self, peer: int) -> Link:
        return Link(self._nonce, peer, self.rank)

    def _link_out(self, peer: int) -> Link:
        return Link(self._nonce, self.rank, peer)

    def _take_seq(self, peer: int) -> int:
        """The next sequence number on the link to ``peer`` (1 for the first message after the HELLO)."""
        with self._lock:
            seq = self._next_seq.get(peer, 0) + 1
            self._next_seq[peer] = seq
            return seq

    def _hello_for(self, peer: int) -> bytes:
        return encode_hello(
            link=self._link_out(peer),
            key=self._key,
            world_size=self.world_size,
            numel=self._numel,
            dtype=self._dtype,
            spec_digest=self._spec,
        )

    def _open_links(self, name: str, handshake_timeout: float) -> None:
        """Start one receiver thread per peer (named ``{name}-{peer}``), send every peer our HELLO and wait
        until every peer's HELLO has been checked; raise :class:`HandshakeError` if any peer was refused,
        stayed silent for ``handshake_timeout`` seconds or was lost."""
        peers = [p for p in range(self.world_size) if p != self.rank]
        for peer in peers:
            self._hello_done[peer] = threading.Event()
            thread = threading.Thread(
                target=self._receive_loop, args=(peer,), name=f"{name}-{peer}", daemon=True
            )
            self._receivers[peer] = thread
            thread.start()
        sends: dict[int, tuple[Any, torch.Tensor]] = {}
        problems: dict[int, tuple[str, str]] = {}
        for peer in peers:
            hello = torch.frombuffer(bytearray(self._hello_for(peer)), dtype=torch.uint8)
            try:
                sends[peer] = (dist.isend(hello, group=self._control, group_dst=peer, tag=SLOT_TAG), hello)
            except RuntimeError as exc:
                problems[peer] = ("lost", str(exc).splitlines()[0])
        deadline = time.monotonic() + handshake_timeout
        for peer in peers:
            if not self._hello_done[peer].wait(max(0.0, deadline - time.monotonic())):
                problems.setdefault(
                    peer,
                    (
                        "timeout",
                        f"no HELLO within {handshake_timeout:g} s (not started, stuck, or a dasgd that speaks "
                        "wire version 1)",
                    ),
                )
            elif peer in self._hello_problem:
                problems.setdefault(peer, self._hello_problem[peer])
        # Kept for the transport's life: a Gloo send whose Work is dropped before the peer received it may
        # never arrive, and a peer we refuse must still get our HELLO, to name the difference from its side.
        self._hello_sends = sends
        for peer, (work, _) in sends.items():
            if problems.get(peer, ("",))[0] in ("timeout", "lost"):
                continue  # nobody is receiving it
            try:
                # The peer's receiver posted its HELLO receive when it started, so this completes at once.
                work.wait(timedelta(seconds=max(0.001, deadline - time.monotonic())))
            except RuntimeError as exc:
                problems.setdefault(peer, ("lost", str(exc).splitlines()[0]))
        if problems:
            self.close()
            raise HandshakeError(self.rank, problems)

    def _receive_hello(self, peer: int, slot: torch.Tensor) -> bool:
        """Receive and check ``peer``'s HELLO; record the outcome for :meth:`_open_links`. True if accepted."""
        try:
            try:
                dist.irecv(slot, group=self._control, group_src=peer, tag=SLOT_TAG).wait(_RECEIVE_PATIENCE)
            except RuntimeError as exc:
                self._hello_problem[peer] = ("lost", str(exc).splitlines()[0])
                return False
            try:
                check_hello(
                    memoryview(slot.numpy()),
                    link=self._link_in(peer),
                    key=self._key,
                    world_size=self.world_size,
                    numel=self._numel,
                    dtype=self._dtype,
                    spec_digest=self._spec,
                )
            except WireError as exc:
                self._count_rejected(exc.reason)
                self._hello_problem[peer] = (exc.reason, str(exc).split(": ", 1)[-1])
                return False
            return True
        finally:
            self._hello_done[peer].set()

    # -- outboxes and counters ------------------------------------------------------------------------
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

    # -- threads --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _thread_context(self) -> Iterator[None]:
        """The context every transport thread runs in (the split plane selects a CUDA side stream)."""
        yield

    @property
    def failure(self) -> tuple[str, BaseException] | None:
        """The first sender or receiver thread that died of an unexpected exception (its name and the
        exception), or None. A broken link is not a failure (the peer is marked dead); this is anything else
        (a bug, a payload that cannot be encoded), which would otherwise end the thread without a word and
        leave the training loop waiting for messages that never go out. Drivers check it and raise."""
        return self._failure

    def _thread_died(self, exc: BaseException) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = (threading.current_thread().name, exc)

    def _send_loop(self, peer: int, outbox: Any) -> None:
        try:
            self._send_messages(peer, outbox)
        except BaseException as exc:  # noqa: BLE001 - recorded for the driver, which raises it
            self._thread_died(exc)

    def _send_messages(self, peer: int, outbox: Any) -> None:
        box = self._queue_of(outbox)
        link = self._link_out(peer)
        with self._thread_context():
            slot = torch.empty(self._slot_capacity, dtype=torch.uint8)
            while True:
                msg = box.take()
                if msg is None:
                    return
                try:
                    # Numbered here, as it goes on the wire: what the queue merged is one message.
                    n = self._send_message(peer, msg, slot, link, self._take_seq(peer), outbox)
                    self._count_sent(n)
                except RuntimeError:
                    self._peer_died(peer, box)
                finally:
                    box.done()

    def _send_message(
        self, peer: int, msg: Message, slot: torch.Tensor, link: Link, seq: int, outbox: Any
    ) -> int:  # pragma: no cover - provided by subclasses
        """Put ``msg`` on the link to ``peer`` as message ``seq``; return the bytes sent (header, clock and
        payload). Raise RuntimeError when the link is broken."""
        raise NotImplementedError

    def _receive_payload(
        self, peer: int, numel: int, dtype: torch.dtype
    ) -> torch.Tensor:  # pragma: no cover - provided by subclasses
        """Receive the detached payload of ``numel`` x ``dtype`` a verified header from ``peer`` announced;
        RuntimeError if the receive fails."""
        raise NotImplementedError

    def _deliver(self, msg: Message) -> None:
        self._inbox.put(msg)

    def _receive_loop(self, peer: int) -> None:
        """``peer``'s receiver: the HELLO, then every message, until SHUTDOWN, close or a lost link."""
        try:
            self._receive_messages(peer)
        except BaseException as exc:  # noqa: BLE001 - recorded for the driver, which raises it
            self._thread_died(exc)
            self._hello_done.get(peer, threading.Event()).set()

    def _receive_messages(self, peer: int) -> None:
        with self._thread_context():
            slot = torch.empty(max(self._slot_capacity, HEADER_SIZE), dtype=torch.uint8)
            if not self._receive_hello(peer, slot):
                return
            for head in self._headers(peer, slot):
                if not self._handle(peer, head):
                    return

    def _headers(self, peer: int, slot: torch.Tensor) -> Iterator[Decoded]:
        """The verified headers ``peer`` sends (refusals counted, and their consequences for the link's
        sequence and payload channel applied), until the transport is closed or the link is lost."""
        view = memoryview(slot.numpy())
        link = self._link_in(peer)
        expected = 1
        while True:
            try:
                dist.irecv(slot, group=self._control, group_src=peer, tag=SLOT_TAG).wait(_RECEIVE_PATIENCE)
            except RuntimeError:
                if not self._closed:
                    self._link_lost(peer)
                return
            try:
                head = decode_detached(
                    view,
                    world_size=self.world_size,
                    link=link,
                    key=self._key,
                    seq=expected,
                    expected_numel=self._numel,
                    expected_dtype=self._dtype,
                )
            except WireError as exc:
                self._count_rejected(exc.reason)
                if exc.in_sequence:
                    expected += 1  # the sender used this number up; the next message has the next one
                if exc.header is None or exc.header.detached:
                    # A payload may follow that nobody will receive: the payload channel is out of step.
                    self._unsynced.add(peer)
                continue
            expected += 1
            yield head

    def _handle(self, peer: int, head: Decoded) -> bool:
        """Receive ``head``'s payload if it is detached, check it, and deliver the message. False: the
        receiver is done (an expected SHUTDOWN arrived, or the transport closed)."""
        msg = head.message
        nbytes = head.header.total_length
        if head.detached:
            if peer in self._unsynced:
                self._count_rejected("unsynced_peer")
                return True
            assert head.dtype is not None  # a detached header always has one
            try:
                payload = self._receive_payload(peer, head.numel, head.dtype)
            except RuntimeError:
                if self._closed:
                    return False
                self._count_rejected("payload_receive_error")
                self._unsynced.add(peer)
                return True
            try:
                verify_payload(head.header, payload)
            except WireError as exc:
                self._count_rejected(exc.reason)  # the payload was received: the channel is still in step
                return True
            msg = dataclasses.replace(msg, payload=payload)
            nbytes += payload.numel() * payload.element_size()
        elif msg.payload is not None and not self._inline_payloads:
            self._count_rejected("inline_payload")  # this transport's peers always detach their payloads
            return True
        self._count_received(nbytes)
        if msg.kind == Kind.SHUTDOWN:
            if self._shutdown_expected.is_set():
                return False
            self._count_rejected("early_shutdown")
            return True
        self._deliver(msg)
        return True

    def join_receivers(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds in all for every receiver thread to end; True if all did."""
        deadline = time.monotonic() + timeout  # a real-time component: the deadline is wall time by nature
        for thread in self._receivers.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._receivers.values())

    def send(self, peer: int, msg: Message) -> None:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    # -- Transport protocol (the parts that only touch queues) ------------------------------------------
    def poll(self) -> list[Any]:
        return self._inbox.drain()

    def wait(self, timeout: float) -> bool:
        return self._inbox.wait_nonempty(timeout)

    def flush(self, timeout: float) -> bool:
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
