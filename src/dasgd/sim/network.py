"""The simulated network: FIFO links with latency, bandwidth, loss and outages, and Transport endpoints.

A link that is free sends a message at once: it is busy for ``bytes / bandwidth`` and the message arrives a
latency later, never before the message ahead of it (FIFO, as a TCP connection). While a link is busy or
down, new messages wait in the same :class:`CoalescingQueue` the real transport uses, so a slow link gets
gradients summed exactly as a slow peer does in a real run. Arrivals wait in each receiver's inbox until
the worker polls, at the start of its next step.

Endpoints implement the Transport protocol, so the worker and the loop policy cannot tell this from Gloo.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections.abc import Callable

import numpy as np

from dasgd.core.message import Message
from dasgd.core.wire import encoded_size
from dasgd.sim.bundles import LogIndex, bundled_window
from dasgd.sim.events import EventKind, EventQueue
from dasgd.sim.models import NetworkModel
from dasgd.transport.base import TransportStats
from dasgd.transport.queue import CoalescingQueue

__all__ = ["SimNetwork", "SimTransport"]


_TRIM_EVERY = 256
"""Broadcast-log entries between trims. An entry holds a gradient and its prefix sum (12 bytes a parameter
together): trimming rarely would keep thousands of read entries alive, trimming each time costs a scan."""


class _Link:
    __slots__ = ("free_at", "last_arrival", "queue", "event_pending", "down_until", "rng", "model")

    def __init__(self, rng: np.random.Generator, model) -> None:
        self.free_at = 0.0
        self.last_arrival = 0.0
        self.queue: CoalescingQueue | None = None  # created only while the link is busy or down
        self.event_pending = False
        self.down_until = 0.0
        self.rng = rng
        self.model = model


class SimNetwork:
    """All links between ``n`` simulated workers.

    Args:
        n: number of workers.
        model: latency, bandwidth, loss.
        events: the engine's event queue (for LINK_FREE events of busy links).
        now: the virtual clock's ``now``.
        on_arrival: called as ``on_arrival(dst, time)`` when a message is scheduled to reach ``dst``.
        seed: the run seed (each link draws from its own generator derived from it).
    """

    def __init__(
        self,
        n: int,
        model: NetworkModel,
        events: EventQueue,
        now: Callable[[], float],
        on_arrival: Callable[[int, float], None],
        seed: int,
        on_broadcast: Callable[[int, float], None] | None = None,
        coalesce: bool = True,
        bundle: bool = False,
    ) -> None:
        self.n = n
        self._coalesce = coalesce
        self.model = model
        self._events = events
        self._now = now
        self._on_arrival = on_arrival
        self._seed = seed
        self._links: dict[tuple[int, int], _Link] = {}
        self._inboxes: list[list[tuple[float, int, Message]]] = [[] for _ in range(n)]
        self._seq = 0
        self.crashed = np.zeros(n, dtype=bool)
        self.stats = [TransportStats() for _ in range(n)]
        self.lost_messages = 0
        self.lost_gradients = 0
        self.retransmissions = 0
        self._outages: dict[tuple[int, int], list[tuple[float, float]]] = {}
        self._sizes: dict[tuple, int] = {}
        self._last_msg: Message | None = None
        self._last_size = 0
        # Broadcast log (simple network only): one entry per message sent to every peer at once, instead of
        # n - 1 inbox entries. Arrival times never decrease (send times never do, latency is constant), so
        # each receiver just keeps a cursor into it. Entries every live receiver has read are trimmed.
        self._on_broadcast = on_broadcast
        self._log_time: list[float] = []
        self._log_entry: list[tuple[float, int, int, Message]] = []  # (arrival, seq, src, msg)
        self._log_base = 0  # log position of _log_time[0]
        self._cursor = [0] * n
        self.arrivals: list[list[tuple[float, int]]] | None = None
        """With :meth:`track_arrivals`: per receiver, ``(arrival time, order)`` of each message of its last poll."""
        self._retired = [False] * n
        self._retired_count = 0
        # Bundled polls (bundles.py): only for algorithms whose updates commute, chosen by the engine.
        self._index: LogIndex | None = LogIndex() if bundle else None
        d = model.default
        self._simple = (
            not model.overrides and model.loss == 0 and d.latency_sigma == 0 and d.bandwidth == float("inf")
        )

    def track_arrivals(self) -> None:
        """From now on each poll notes when its messages arrived and their order (``arrivals``): what a
        checkpoint saves of its channel state so that a resumed run delivers it at the same moments."""
        self.arrivals = [[] for _ in range(self.n)]

    def inject(self, dst: int, msg: Message, arrival: float, order: int) -> None:
        """Queue ``msg`` for ``dst`` at ``arrival``, ahead of anything sent with the same arrival time when
        ``order`` is negative (a checkpoint's channel state on resume: it was sent before the cut)."""
        heapq.heappush(self._inboxes[dst], (arrival, order, msg))
        self._on_arrival(dst, arrival)

    def endpoint(self, rank: int) -> SimTransport:
        return SimTransport(self, rank)

    # -- links ------------------------------------------------------------------------------------------
    def _link(self, src: int, dst: int) -> _Link:
        link = self._links.get((src, dst))
        if link is None:
            # Per-link generators: a link's draws do not depend on what other links did before.
            rng = np.random.default_rng([self._seed, 7, src, dst])  # only links that need state get one
            link = self._links[(src, dst)] = _Link(rng, self.model.link(src, dst))
        return link

    def send(self, src: int, dst: int, msg: Message) -> None:
        """Put ``msg`` on the link src -> dst now (or queue it while the link is busy or down)."""
        if self.crashed[dst]:
            # A real sender sees "connection closed by peer" on its next send to a dead process.
            self.stats[src].dead_peers.add(dst)
            self.stats[src].undelivered += 1
            return
        t = self._now()
        if self._simple and (src, dst) not in self._outages:
            # Unlimited bandwidth, constant latency, no loss: a link never queues, and FIFO holds because
            # send times never decrease. No per-link state is needed (thousands of workers: millions of links).
            self._deliver(src, dst, msg, t, t + self.model.default.latency)
            return
        link = self._link(src, dst)
        link.down_until = self._up_at(src, dst, t)
        if link.queue is None and t >= link.free_at and t >= link.down_until:
            self._transmit(src, dst, link, msg, t)
            return
        if link.queue is None:
            link.queue = CoalescingQueue(self._coalesce)
        link.queue.put(msg)
        self._schedule_link(src, dst, link)

    def _schedule_link(self, src: int, dst: int, link: _Link) -> None:
        if not link.event_pending:
            link.event_pending = True
            self._events.push(max(link.free_at, link.down_until, self._now()), EventKind.LINK_FREE, src, dst)

    def link_free(self, src: int, dst: int) -> None:
        """A LINK_FREE event: send the next queued message if the link is usable now."""
        link = self._links[(src, dst)]
        link.event_pending = False
        t = self._now()
        if link.queue is None:
            return
        link.down_until = self._up_at(src, dst, t)
        if t < link.free_at or t < link.down_until:
            self._schedule_link(src, dst, link)
            return
        if self.crashed[dst]:
            for _ in link.queue.drain():
                self.stats[src].undelivered += 1
            self.stats[src].dead_peers.add(dst)
            link.queue = None
            return
        msg = link.queue.take(timeout=0)
        link.queue.done()
        if msg is not None:
            self._transmit(src, dst, link, msg, t)
        if len(link.queue):
            self._schedule_link(src, dst, link)
        else:
            self.stats[src].coalesced += link.queue.stats.coalesced
            link.queue = None

    def add_outage(self, a: int, b: int, start: float, end: float) -> None:
        """Both directions of link a-b are down in [start, end)."""
        for s, d in ((a, b), (b, a)):
            self._outages.setdefault((s, d), []).append((start, end))

    def _up_at(self, src: int, dst: int, t: float) -> float:
        """The first time >= t at which link src -> dst is up."""
        spans = self._outages.get((src, dst))
        if not spans:
            return t
        moved = True
        while moved:
            moved = False
            for start, end in spans:
                if start <= t < end:
                    t, moved = end, True
        return t

    def _transmit(self, src: int, dst: int, link: _Link, msg: Message, t: float) -> None:
        nbytes = self._size(msg)
        busy = link.model.transfer(nbytes)
        link.free_at = t + busy
        extra = 0.0
        if self.model.loss > 0:
            while link.rng.random() < self.model.loss:
                if self.model.loss_mode == "count":
                    self.stats[src].sent_messages += 1
                    self.stats[src].sent_bytes += nbytes
                    self.lost_messages += 1
                    self.lost_gradients += msg.count
                    return
                self.retransmissions += 1
                extra += self.model.retransmit_after + busy
        arrival = max(link.last_arrival, t + busy + link.model.delay(link.rng) + extra)
        link.last_arrival = arrival
        self._deliver(src, dst, msg, t, arrival, nbytes)

    def _size(self, msg: Message) -> int:
        # A worker sends one message object to every peer: remember the last one's size.
        if msg is self._last_msg:
            return self._last_size
        key = (
            0 if msg.payload is None else msg.payload.numel(),
            None if msg.payload is None else msg.payload.dtype,
            0 if msg.clock is None else len(msg.clock),
        )
        size = self._sizes.get(key)
        if size is None:
            size = self._sizes[key] = encoded_size(*key, False)
        self._last_msg, self._last_size = msg, size
        return size

    def _deliver(
        self, src: int, dst: int, msg: Message, t: float, arrival: float, nbytes: int | None = None
    ) -> None:
        """Count the transmission and queue ``msg`` in ``dst``'s inbox for ``arrival``."""
        st = self.stats[src]
        st.sent_messages += 1
        st.sent_bytes += self._size(msg) if nbytes is None else nbytes
        heapq.heappush(self._inboxes[dst], (arrival, self._seq, msg))
        self._seq += 1
        self._on_arrival(dst, arrival)

    # -- inboxes ----------------------------------------------------------------------------------------
    def broadcast(self, src: int, msg: Message) -> bool:
        """Send ``msg`` from ``src`` to every other worker at once. False (nothing sent) unless the network is
        simple (no per-link state needed); the caller then sends peer by peer."""
        if not self._simple or self._outages or self._on_broadcast is None:
            return False
        t = self._now()
        arrival = t + self.model.default.latency
        st = self.stats[src]
        live = self.n - 1
        if self.crashed.any():
            for dst in np.flatnonzero(self.crashed):
                if dst != src:
                    st.dead_peers.add(int(dst))
                    st.undelivered += 1
                    live -= 1
        st.sent_messages += live
        st.sent_bytes += live * self._size(msg)
        self._log_time.append(arrival)
        self._log_entry.append((arrival, self._seq, src, msg))
        if self._index is not None:
            self._index.append(src, msg)
        self._seq += 1
        if len(self._log_time) % _TRIM_EVERY == 0:
            self._trim()
        self._on_broadcast(src, arrival)
        return True

    def _trim(self) -> None:
        live = [c for c, gone in zip(self._cursor, self._retired) if not gone]
        upto = min(live) if live else self._log_base + len(self._log_time)
        drop = upto - self._log_base
        if drop > 0:
            del self._log_time[:drop]
            del self._log_entry[:drop]
            if self._index is not None:
                self._index.trim(drop)
            self._log_base = upto

    def retire(self, rank: int) -> None:
        """``rank`` will never poll again (drained or dead): it no longer holds the broadcast log back."""
        if not self._retired[rank]:
            self._retired[rank] = True
            self._retired_count += 1
            if self._retired_count == self.n:
                self._trim()  # nobody reads the log any more: its gradients and prefix sums can go

    def poll(self, rank: int) -> list[Message]:
        """Messages that have reached ``rank`` by now, in arrival order."""
        inbox, t = self._inboxes[rank], self._now()
        direct = []
        while inbox and inbox[0][0] <= t:
            direct.append(heapq.heappop(inbox))
        start = self._cursor[rank] - self._log_base
        end = bisect_right(self._log_time, t, lo=start)
        self._cursor[rank] = end + self._log_base
        if self._index is not None and not direct and end - start > 1:
            out, parts = bundled_window(self._index, self._log_entry, rank, start, end)
            self.stats[rank].received_messages += parts
            return out  # type: ignore[return-value]  # bundles stand in for runs of messages
        broadcast = [e for e in self._log_entry[start:end] if e[2] != rank]
        if self.arrivals is not None:
            merged = list(heapq.merge(direct, broadcast, key=lambda e: (e[0], e[1])))
            self.arrivals[rank] = [(e[0], e[1]) for e in merged]
            self.stats[rank].received_messages += len(merged)
            return [e[-1] for e in merged]
        if broadcast and direct:
            out = [e[-1] for e in heapq.merge(direct, broadcast, key=lambda e: (e[0], e[1]))]
        else:
            out = [e[-1] for e in (broadcast or direct)]
        self.stats[rank].received_messages += len(out)
        return out

    @property
    def simple(self) -> bool:
        """Constant latency, unlimited bandwidth, no loss, no outages: messages to all go through one log."""
        return self._simple and not self._outages

    @property
    def bundles(self) -> bool:
        """Polls hand out bundles (sim/bundles.py)."""
        return self._index is not None

    def last_arrival(self, rank: int) -> float | None:
        """When the last message now on its way to ``rank`` arrives (None if none is)."""
        inbox = self._inboxes[rank]
        best = max(e[0] for e in inbox) if inbox else None
        start = self._cursor[rank] - self._log_base
        for entry in reversed(self._log_entry[start:]):
            if entry[2] != rank:
                best = entry[0] if best is None else max(best, entry[0])
                break
        return best

    def next_arrival(self, rank: int) -> float | None:
        """When the next queued message reaches ``rank`` (None if none is on its way)."""
        inbox = self._inboxes[rank]
        best = inbox[0][0] if inbox else None
        for entry in self._log_entry[self._cursor[rank] - self._log_base :]:
            if entry[2] != rank:
                best = entry[0] if best is None else min(best, entry[0])
                break
        return best

    def crash(self, rank: int) -> None:
        """``rank`` dies: its inbox is dropped and nothing more reaches it."""
        self.crashed[rank] = True
        self._inboxes[rank].clear()
        self.retire(rank)


class SimTransport:
    """One simulated worker's endpoint (the Transport protocol)."""

    def __init__(self, network: SimNetwork, rank: int) -> None:
        self._net = network
        self.rank = rank
        self.world_size = network.n

    def send(self, peer: int, msg: Message) -> None:
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(f"worker {self.rank} cannot send to peer {peer} (world size {self.world_size})")
        self._net.send(self.rank, peer, msg)

    def poll(self) -> list[Message]:
        return self._net.poll(self.rank)

    def wait(self, timeout: float) -> bool:
        raise RuntimeError("the simulator drives workers by events; nothing waits on a simulated transport")

    def flush(self, timeout: float) -> bool:
        return True  # queued messages leave by LINK_FREE events

    def stats(self) -> TransportStats:
        return self._net.stats[self.rank]

    def close(self) -> None:
        pass
