"""A bounded, coalescing message queue: the per-peer outbox and the inbox of every transport.

Why coalescing instead of a plain queue: a slow receiver must neither block the sender (DASGD never waits)
nor make a queue grow without bound. Fixed-stepsize SGD updates commute, so gradients of one origin with
contiguous id ranges can be summed into one message that keeps the id range ``[lo, hi)`` of what it holds;
the receiver applies the sum and records the whole range. Nothing is dropped.

Ordering rules that keep this exact:
- a gradient of origin ``o`` merges only into the *latest* queued entry of ``o``, only if that entry is a
  gradient whose ``hi`` equals the new ``lo``; a control message of ``o`` (FINAL, STOP) after it blocks the
  merge, so a FINAL never overtakes the gradients it counts;
- entries of different origins commute, so merging into an entry that is not last in the queue is fine;
- a checkpoint MARKER is a barrier for every origin: nothing queued after it merges into an entry queued
  before it, so a message sent after a checkpoint never joins one that belongs to it (worker/checkpoint.py).
The queue therefore holds at most one gradient entry per origin plus control messages, unless ids arrive
out of order (only under faults), which it keeps as separate entries for the worker to deduplicate.

Payloads are copy-on-write: the first merge into an entry clones its payload, because the same gradient
tensor is usually queued for several peers at once and must not be changed under the others.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from dasgd.core.message import MAX_GRADIENTS_PER_MESSAGE, Kind, Message

__all__ = ["CoalescingQueue", "QueueStats"]


@dataclass
class QueueStats:
    """Counters of one queue."""

    put: int = 0
    """Messages put."""
    coalesced: int = 0
    """Messages merged into an entry already queued (not sent on their own)."""
    max_depth: int = 0
    """Largest number of entries ever queued at once."""


class _Entry:
    __slots__ = ("msg", "owned")

    def __init__(self, msg: Message) -> None:
        self.msg = msg
        self.owned = False


class CoalescingQueue:
    """Thread-safe FIFO of messages that sums contiguous gradients of one origin.

    ``put`` never blocks. ``take`` blocks until an entry is there (or ``close``/timeout). ``drain`` takes
    everything at once without blocking. ``coalesce=False`` keeps every message separate (for algorithms
    that must see each gradient on its own, such as synchronous mini-batch SGD's per-step averages).
    """

    def __init__(self, coalesce: bool = True) -> None:
        self._coalesce = coalesce
        self._entries: deque[_Entry] = deque()
        self._latest: dict[int, _Entry] = {}  # origin -> its most recent queued entry
        self._cond = threading.Condition()
        self._closed = False
        self._in_flight = 0
        self.stats = QueueStats()

    def __len__(self) -> int:
        with self._cond:
            return len(self._entries)

    def put(self, msg: Message) -> None:
        """Queue ``msg``, merging it into a queued gradient of the same origin when ranges are contiguous."""
        with self._cond:
            self.stats.put += 1
            last = self._latest.get(msg.origin)
            if (
                self._coalesce
                and msg.kind == Kind.GRADIENT
                and last is not None
                and last.msg.kind == Kind.GRADIENT
                and last.msg.hi == msg.lo
                and msg.hi - last.msg.lo <= MAX_GRADIENTS_PER_MESSAGE  # receivers refuse wider ranges
                and last.msg.payload is not None
                and msg.payload is not None
            ):
                payload = last.msg.payload
                if not last.owned:
                    payload = payload.clone()
                    last.owned = True
                payload.add_(msg.payload)
                # Keep the newer clock: the merged message leaves later, so it may describe the later state.
                clock = msg.clock if msg.clock is not None else last.msg.clock
                last.msg = Message(Kind.GRADIENT, msg.sender, msg.origin, last.msg.lo, msg.hi, payload, clock)
                self.stats.coalesced += 1
                return
            entry = _Entry(msg)
            self._entries.append(entry)
            if msg.kind == Kind.MARKER:
                self._latest.clear()  # the barrier: later gradients start entries of their own
            self._latest[msg.origin] = entry
            self.stats.max_depth = max(self.stats.max_depth, len(self._entries))
            self._cond.notify_all()

    def _pop(self) -> Message:
        entry = self._entries.popleft()
        if self._latest.get(entry.msg.origin) is entry:
            del self._latest[entry.msg.origin]
        return entry.msg

    def take(self, timeout: float | None = None) -> Message | None:
        """Remove and return the oldest entry; None on timeout or when closed and empty.

        The taken message counts as in flight until ``done()`` is called, so ``idle`` stays false while a
        sender thread is still pushing it onto the network.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._entries or self._closed, timeout):
                return None
            if not self._entries:
                return None
            self._in_flight += 1
            return self._pop()

    def done(self) -> None:
        """Mark the message returned by the last ``take`` as handed to the network (or abandoned)."""
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def drain(self) -> list[Message]:
        """Remove and return every queued message, oldest first, without blocking."""
        with self._cond:
            out = [self._pop() for _ in range(len(self._entries))]
            self._cond.notify_all()
            return out

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing in flight."""
        with self._cond:
            return not self._entries and self._in_flight == 0

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until ``idle`` (True) or the timeout passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._entries and self._in_flight == 0, timeout)

    def wait_nonempty(self, timeout: float | None = None) -> bool:
        """Block until an entry is queued or the queue is closed; True if an entry is there."""
        with self._cond:
            self._cond.wait_for(lambda: self._entries or self._closed, timeout)
            return bool(self._entries)

    def close(self) -> None:
        """Wake every waiter; ``take`` returns None once the queue is empty."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
