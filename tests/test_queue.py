"""The coalescing queue: bounded, exact, ordered (the outbox and inbox of every transport)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dasgd.core.message import Kind, Message
from dasgd.transport.queue import CoalescingQueue


def grad(origin: int, lo: int, hi: int, value: float, n: int = 4, clock: np.ndarray | None = None) -> Message:
    return Message(Kind.GRADIENT, origin, origin, lo, hi, torch.full((n,), value), clock)


def returns_within(seconds: float, call: Callable[[], Any]) -> Any:
    """``call()``'s result, run in a daemon thread; fails if the call is still blocked after ``seconds``.

    Blocking calls are tested this way so that a queue that ignores a timeout or misses a wake-up fails the
    test instead of hanging it.
    """
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    return out[0]


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


def test_merged_gradients_carry_the_newer_messages_clock():
    # Negative control of the merge: the merged message leaves when the newer one would have, so it must
    # describe the sender's later state; keeping the older (staler) clock fails here.
    q = CoalescingQueue()
    older, newer = np.array([1, 0, 0]), np.array([2, 1, 0])
    q.put(grad(0, 0, 1, 1.0, clock=older))
    q.put(grad(0, 1, 2, 2.0, clock=newer))
    [merged] = q.drain()
    assert (merged.lo, merged.hi) == (0, 2)
    assert merged.clock is not None and np.array_equal(merged.clock, newer)
    assert torch.equal(merged.payload, torch.full((4,), 3.0))


def test_a_merge_without_a_newer_clock_keeps_the_older_one():
    q = CoalescingQueue()
    older = np.array([1, 0])
    q.put(grad(0, 0, 1, 1.0, clock=older))
    q.put(grad(0, 1, 2, 1.0))  # no clock: the older one is still the best description of the sender
    q.put(grad(1, 0, 1, 1.0))
    q.put(grad(1, 1, 2, 1.0))  # neither has a clock
    first, second = q.drain()
    assert np.array_equal(first.clock, older)
    assert second.clock is None


def test_stats_count_every_put_merge_and_the_deepest_queue():
    q = CoalescingQueue()
    for i in range(3):
        q.put(grad(0, i, i + 1, 1.0))  # 1 entry, 2 merges
    q.put(Message(Kind.FINAL, 0, 0, 3, 3))  # a second entry
    q.put(grad(1, 0, 1, 1.0))  # a third
    assert (q.stats.put, q.stats.coalesced, q.stats.max_depth) == (5, 2, 3)


class CountingTensor(torch.Tensor):
    """A tensor that counts the clones made of it (or of tensors derived from it)."""

    clones = 0

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func is torch.Tensor.clone:
            CountingTensor.clones += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_an_entry_clones_its_payload_once_then_sums_in_place():
    # Copy-on-write: the first merge takes a private copy of the (possibly shared) payload, later merges
    # add into that copy; a clone per merge would cost a full payload copy per gradient.
    CountingTensor.clones = 0
    q = CoalescingQueue()
    shared = torch.ones(4).as_subclass(CountingTensor)
    q.put(Message(Kind.GRADIENT, 0, 0, 0, 1, shared))
    for i in range(1, 5):
        q.put(grad(0, i, i + 1, 1.0))
    [merged] = q.drain()
    assert CountingTensor.clones == 1
    assert torch.equal(merged.payload.as_subclass(torch.Tensor), torch.full((4,), 5.0))
    assert torch.equal(shared.as_subclass(torch.Tensor), torch.ones(4))


def test_take_on_an_empty_queue_times_out_with_none():
    q = CoalescingQueue()
    assert returns_within(5.0, lambda: q.take(timeout=0.05)) is None
    q.close()  # wakes a take that ignored its timeout


def test_close_wakes_a_take_that_waits_without_timeout():
    q = CoalescingQueue()
    threading.Timer(0.05, q.close).start()
    assert returns_within(5.0, q.take) is None


def test_wait_idle_waits_for_queued_and_in_flight_messages_with_a_timeout():
    q = CoalescingQueue()
    q.put(grad(0, 0, 1, 1.0))
    assert returns_within(5.0, lambda: q.wait_idle(timeout=0.05)) is False  # queued
    assert q.take(timeout=1) is not None
    assert returns_within(5.0, lambda: q.wait_idle(timeout=0.05)) is False  # in flight
    q.done()
    assert returns_within(5.0, lambda: q.wait_idle(timeout=0.05)) is True


def test_wait_nonempty_wakes_on_put_and_on_close_and_times_out():
    q = CoalescingQueue()
    assert returns_within(5.0, lambda: q.wait_nonempty(timeout=0.05)) is False  # empty: times out
    threading.Timer(0.05, lambda: q.put(grad(0, 0, 1, 1.0))).start()
    assert returns_within(5.0, lambda: q.wait_nonempty(timeout=30)) is True  # woken by the put
    assert q.drain() and q.wait_nonempty(timeout=0.01) is False
    threading.Timer(0.05, q.close).start()
    assert returns_within(5.0, lambda: q.wait_nonempty(timeout=30)) is False  # woken by close, empty
