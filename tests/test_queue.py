"""The coalescing queue: bounded, exact, ordered (the outbox and inbox of every transport)."""

from __future__ import annotations

import threading

import torch

from dasgd.core.message import Kind, Message
from dasgd.transport.queue import CoalescingQueue


def grad(origin: int, lo: int, hi: int, value: float, n: int = 4) -> Message:
    return Message(Kind.GRADIENT, origin, origin, lo, hi, torch.full((n,), value))


def test_contiguous_gradients_of_one_origin_are_summed_with_their_range():
    q = CoalescingQueue()
    for i in range(5):
        q.put(grad(0, i, i + 1, float(i + 1)))
    out = q.drain()
    assert len(out) == 1
    assert (out[0].lo, out[0].hi) == (0, 5)
    assert torch.equal(out[0].payload, torch.full((4,), 15.0))
    assert q.stats.coalesced == 4


def test_origins_are_kept_apart_and_bounded_by_origin_count():
    q = CoalescingQueue()
    for i in range(50):
        for o in range(3):
            q.put(grad(o, i, i + 1, 1.0))
    out = q.drain()
    assert sorted((m.origin, m.lo, m.hi) for m in out) == [(0, 0, 50), (1, 0, 50), (2, 0, 50)]
    assert q.stats.max_depth == 3


def test_final_is_never_overtaken_and_blocks_merging_across_it():
    q = CoalescingQueue()
    q.put(grad(0, 0, 1, 1.0))
    q.put(Message(Kind.FINAL, 0, 0, 1, 1))
    q.put(grad(0, 1, 2, 2.0))  # must not merge into the entry before the FINAL
    out = q.drain()
    assert [(m.kind, m.lo, m.hi) for m in out] == [
        (Kind.GRADIENT, 0, 1),
        (Kind.FINAL, 1, 1),
        (Kind.GRADIENT, 1, 2),
    ]


def test_non_contiguous_ranges_are_not_merged():
    q = CoalescingQueue()
    q.put(grad(0, 0, 1, 1.0))
    q.put(grad(0, 5, 6, 1.0))  # a gap: only under faults; the worker must see both to deduplicate
    q.put(grad(0, 0, 1, 1.0))  # a duplicate is not contiguous either
    assert [(m.lo, m.hi) for m in q.drain()] == [(0, 1), (5, 6), (0, 1)]


def test_copy_on_write_keeps_a_shared_payload_intact():
    shared = torch.ones(4)
    a, b = CoalescingQueue(), CoalescingQueue()
    a.put(Message(Kind.GRADIENT, 0, 0, 0, 1, shared))
    b.put(Message(Kind.GRADIENT, 0, 0, 0, 1, shared))
    a.put(grad(0, 1, 2, 10.0))
    assert torch.equal(shared, torch.ones(4))
    assert torch.equal(a.drain()[0].payload, torch.full((4,), 11.0))
    assert torch.equal(b.drain()[0].payload, torch.ones(4))


def test_taken_entry_is_not_merged_into_and_idle_waits_for_done():
    q = CoalescingQueue()
    q.put(grad(0, 0, 1, 1.0))
    first = q.take(timeout=1)
    assert first is not None and not q.idle  # in flight
    q.put(grad(0, 1, 2, 1.0))
    second = q.take(timeout=1)
    assert (second.lo, second.hi) == (1, 2)
    assert torch.equal(first.payload, torch.ones(4))
    q.done()
    q.done()
    assert q.idle


def test_threaded_producer_consumer_delivers_every_id_once():
    q = CoalescingQueue()
    n = 2000
    seen: list[tuple[int, int]] = []
    total = torch.zeros(1)

    def consume():
        while True:
            m = q.take(timeout=5)
            if m is None:
                return
            seen.append((m.lo, m.hi))
            total.add_(m.payload)
            q.done()

    t = threading.Thread(target=consume)
    t.start()
    for i in range(n):
        q.put(Message(Kind.GRADIENT, 0, 0, i, i + 1, torch.ones(1)))
    assert q.wait_idle(10)
    q.close()
    t.join(5)
    ids = sorted(i for lo, hi in seen for i in range(lo, hi))
    assert ids == list(range(n))
    assert total.item() == n
