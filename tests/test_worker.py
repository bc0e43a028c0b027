"""The worker against trusted oracles: sequential SGD, exactly-once delivery, the drain."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dasgd.algorithms import DASGD
from dasgd.core.ledger import StalenessLedger
from dasgd.core.message import Kind, Message
from dasgd.core.topology import complete, parse_topology, ring
from dasgd.tasks import make_task
from dasgd.transport.inproc import InProcessNetwork
from dasgd.worker.worker import Worker


def quadratic_workers(n: int, topology=None, lr: float = 0.1, b: int = 1, dim: int = 20):
    task = make_task("quadratic", dim=dim, noise=1.0, condition=10.0, seed=3)
    topo = topology or complete(n)
    workers = []
    for r in range(n):
        sampler = task.sampler(100 + r, 8)
        workers.append(
            Worker(
                r,
                n,
                task.build_model(0),
                topo,
                DASGD(),
                lr,
                loss_fn=lambda m, s=sampler: task.loss(m, s.next()),
                grads_per_message=b,
            )
        )
    return task, workers


def deliver(net, workers, ranks=None):
    """Let the chosen workers apply everything that has arrived (and forward it)."""
    for r in ranks if ranks is not None else range(len(workers)):
        ep = net.endpoint(r)
        for peer, msg in workers[r].receive(ep.poll()):
            ep.send(peer, msg)


def zero_delay_run(n: int, steps: int, lr: float, lost: tuple[int, int] | None = None):
    """Workers 0..n-1 take turns with zero delay; return them and sequential SGD's parameters.

    The oracle is one model taking the same gradient sequence (worker k % n's k-th batch) in order.
    ``lost=(k, peer)`` drops the message of step k to ``peer`` (a fault injected to show the oracle fails).
    """
    task, workers = quadratic_workers(n, lr=lr)
    net = InProcessNetwork(n)
    ref = task.build_model(0)
    ref_samplers = [task.sampler(100 + r, 8) for r in range(n)]
    for k in range(steps):
        r = k % n
        deliver(net, workers)
        g = workers[r].compute()
        for peer, msg in workers[r].commit(g):
            if (k, peer) != lost:
                net.endpoint(r).send(peer, msg)
        ref.zero_grad()
        task.loss(ref, ref_samplers[r].next()).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= lr * p.grad
    deliver(net, workers)
    return workers, torch.cat([p.detach().reshape(-1) for p in ref.parameters()])


def test_zero_delay_complete_graph_equals_sequential_sgd():
    """Zero delay on a complete graph gives sequential SGD's parameters (a guarantee of the design)."""
    workers, expected = zero_delay_run(4, 60, 0.1)
    for w in workers:
        assert w.applied == 60
        torch.testing.assert_close(w.params, expected, atol=1e-6, rtol=0)


def test_the_sequential_sgd_oracle_fails_when_one_message_is_lost():
    """Negative control of the oracle above: the same comparison, with worker 3's last message (step 59)
    lost on its way to worker 2. Nothing is computed after it, so only worker 2 departs from the oracle."""
    workers, expected = zero_delay_run(4, 60, 0.1, lost=(59, 2))
    assert workers[2].clock[3] == 14  # worker 3 computed 15; its 15th never reached worker 2
    with pytest.raises(AssertionError):
        torch.testing.assert_close(workers[2].params, expected, atol=1e-6, rtol=0)
    for r in (0, 1, 3):  # the others still match it
        torch.testing.assert_close(workers[r].params, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("topo_name", ["complete", "ring", "torus:2x3", "random-regular:3"])
def test_random_asynchronous_schedule_drains_to_identical_gradient_sets(topo_name):
    n = 6
    topo = parse_topology(topo_name, n, seed=1)
    task, workers = quadratic_workers(n, topology=topo)
    net = InProcessNetwork(n)
    rng = np.random.default_rng(7)
    x0 = workers[0].params.clone()
    grads = torch.zeros_like(x0)
    for _ in range(200):
        r = int(rng.integers(n))
        deliver(net, workers, [int(x) for x in rng.choice(n, size=2, replace=False)])
        g = workers[r].compute()
        grads += g.grad
        for peer, msg in workers[r].commit(g):
            net.endpoint(r).send(peer, msg)
    for w in workers:
        for peer, msg in w.finish():
            net.endpoint(w.rank).send(peer, msg)
    for _ in range(4 * n):
        deliver(net, workers)
    counts = np.array([w.computed for w in workers])
    for w in workers:
        assert w.complete
        assert np.array_equal(w.clock, counts)  # exactly once: every gradient of every origin
        torch.testing.assert_close(w.params, x0 - 0.1 * grads, atol=1e-9, rtol=0)
        assert sum(w.rejected.values()) == 0


def test_duplicates_wrong_routes_bad_shapes_and_own_messages_are_rejected_and_counted():
    _, workers = quadratic_workers(3, topology=ring(3))
    w = workers[1]
    before = w.params.clone()
    good = Message(Kind.GRADIENT, 0, 0, 0, 1, torch.ones(20, dtype=torch.float64))
    w.receive([good])
    after_one = w.params.clone()
    w.receive(
        [
            good,  # duplicate
            Message(Kind.GRADIENT, 0, 0, 0, 1, torch.ones(20, dtype=torch.float64)),  # same ids again
            Message(Kind.GRADIENT, 0, 0, 1, 2, torch.ones(7, dtype=torch.float64)),  # wrong shape
            Message(Kind.GRADIENT, 1, 1, 0, 1, torch.ones(20, dtype=torch.float64)),  # own origin
            Message(
                Kind.GRADIENT, 2, 0, 1, 2, torch.ones(20, dtype=torch.float64)
            ),  # 0's gradients never come via 2
        ]
    )
    assert not torch.equal(before, after_one)
    assert torch.equal(w.params, after_one)
    assert w.rejected == {"duplicate": 2, "shape": 1, "own_message": 1, "wrong_route": 1}
    assert w.clock.tolist() == [1, 0, 0]


def test_ring_forwarding_reaches_everyone_once():
    n = 5
    _, workers = quadratic_workers(n, topology=ring(n))
    net = InProcessNetwork(n)
    g = workers[0].compute()
    out = workers[0].commit(g)
    assert sorted(p for p, _ in out) == [1, 4]
    for peer, msg in out:
        net.endpoint(0).send(peer, msg)
    for _ in range(n):
        deliver(net, workers)
    assert [w.clock[0] for w in workers] == [1] * n


def test_grads_per_message_sums_b_gradients_into_one_message():
    task, workers = quadratic_workers(2, b=3)
    w = workers[0]
    outs = [w.commit(w.compute()) for _ in range(7)]
    sent = [m for o in outs for _, m in o]
    assert [(m.lo, m.hi) for m in sent] == [(0, 3), (3, 6)]
    final = w.finish()
    assert [(m.kind, m.lo, m.hi) for _, m in final] == [(Kind.GRADIENT, 6, 7), (Kind.FINAL, 7, 7)]


def test_ledger_records_from_a_sequential_schedule_have_zero_staleness():
    n = 3
    _, workers = quadratic_workers(n)
    net = InProcessNetwork(n)
    ledger = StalenessLedger(n)
    for k in range(30):
        r = k % n
        deliver(net, workers)
        g = workers[r].compute()
        ledger.record(r, workers[r].computed, float(k), float(k) + 0.5, g.clock)
        for peer, msg in workers[r].commit(g):
            net.endpoint(r).send(peer, msg)
    stats = ledger.stats()
    assert (stats.s_max, stats.loose_max) == (0, 0)


def test_ledger_records_show_staleness_when_delivery_is_delayed():
    """Two workers that never exchange until the end: s_k equals the other worker's count so far."""
    n = 2
    _, workers = quadratic_workers(n)
    ledger = StalenessLedger(n)
    t = 0.0
    for _ in range(10):
        for r in range(n):
            g = workers[r].compute()
            t += 1.0
            ledger.record(r, workers[r].computed, t - 0.5, t, g.clock)
            workers[r].commit(g)
    stats = ledger.stats()
    # Global order alternates 0,1,0,1,...: gradient k misses the other worker's gradients before it.
    expected = [k // 2 + (k % 2) for k in range(20)]
    assert stats.per_gradient.tolist() == expected


def test_out_of_order_ranges_are_held_exactly_once_and_the_gap_closes():
    _, workers = quadratic_workers(2)
    w = workers[1]

    def g(lo, hi):
        return Message(Kind.GRADIENT, 0, 0, lo, hi, torch.ones(20, dtype=torch.float64))

    w.receive([g(2, 4)])  # ids 0, 1 not here yet: the clock (contiguous prefix) stays at 0
    assert w.clock[0] == 0
    w.receive([g(3, 5), g(2, 3)])  # both overlap what is held
    assert w.rejected["duplicate"] == 2
    w.receive([g(0, 2)])
    assert w.clock[0] == 4 and not w._gaps
    w.receive(
        [Message(Kind.FINAL, 0, 0, 4, 4), Message(Kind.FINAL, 0, 0, 4, 4), Message(Kind.FINAL, 0, 0, 9, 9)]
    )
    assert w.finals()[0] == 4
    assert w.rejected["duplicate"] == 3 and w.rejected["conflicting_final"] == 1
    torch.testing.assert_close(w.params, workers[0].params - 0.1 * 2)  # two messages were applied


@pytest.mark.parametrize(
    ("held", "lo", "hi"),
    [
        ([(0, 2)], 1, 4),  # starts inside the held prefix, ends beyond it
        ([(0, 2)], 0, 3),  # covers the prefix and more
        ([(0, 2)], 1, 2),  # inside the prefix
        ([(0, 2), (5, 7)], 4, 6),  # ends inside a held range past a gap
        ([(0, 2), (5, 7)], 1, 3),  # a gap state: starts inside the prefix, ends in the gap
        ([(0, 2), (5, 7)], 3, 8),  # covers a held range past the gap
    ],
)
def test_a_partially_overlapping_range_is_rejected_whole(held, lo, hi):
    """A message whose ids are partly held is a duplicate: applying it would apply some ids twice."""
    _, workers = quadratic_workers(2)
    w = workers[1]

    def g(a, b):
        return Message(Kind.GRADIENT, 0, 0, a, b, torch.full((20,), float(b - a), dtype=torch.float64))

    w.receive([g(a, b) for a, b in held])
    before, clock, gaps = w.params.clone(), w.clock.copy(), {o: len(s) for o, s in w._gaps.items()}
    w.receive([g(lo, hi)])
    assert w.rejected == {"duplicate": 1}
    assert torch.equal(w.params, before)
    assert w.clock.tolist() == clock.tolist() and {o: len(s) for o, s in w._gaps.items()} == gaps


# -- property: exactly once under any stream -------------------------------------------------------------
_K = 8  # gradient ids per origin
_PROP_TASK = make_task("quadratic", dim=6, noise=1.0, condition=10.0, seed=3)
_G = {o: np.random.default_rng(o).normal(size=(_K, 6)) for o in (1, 2)}  # origin -> its gradients


@st.composite
def message_streams(draw) -> list[tuple[int, int, int]]:  # noqa: ANN001
    """(origin, lo, hi) ranges of origins 1 and 2 in any order: each origin's ids cut into coalesced
    chunks, chunks repeated or missing (gaps), and arbitrary extra ranges (overlaps, merges)."""
    out = []
    for origin in (1, 2):
        cuts = sorted(draw(st.sets(st.integers(1, _K - 1))))
        bounds = [0, *cuts, _K]
        chunks = list(zip(bounds[:-1], bounds[1:], strict=True))
        kept = draw(st.lists(st.sampled_from(chunks), max_size=2 * len(chunks)))
        extra = draw(st.lists(st.tuples(st.integers(0, _K - 1), st.integers(1, _K)), max_size=4))
        out += [(origin, lo, hi) for lo, hi in kept + [(a, b) for a, b in extra if a < b]]
    return draw(st.permutations(out))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message_streams())
def test_any_stream_applies_each_id_at_most_once_and_the_parameters_follow(stream):
    """Whatever arrives, in whatever order: the ids applied are exactly those of the messages that held no
    applied id when they arrived, never one twice; the clock is each origin's contiguous prefix; and the
    parameters are x0 - lr * (the sum of the applied gradients), computed here from the gradients."""
    w = Worker(0, 3, _PROP_TASK.build_model(0), complete(3), DASGD(), 0.1)
    x0 = w.params.detach().numpy().copy()
    held = {1: set(), 2: set()}
    expected_rejects = 0
    for origin, lo, hi in stream:
        ids = set(range(lo, hi))
        if ids & held[origin]:
            expected_rejects += 1
        else:
            held[origin] |= ids
        payload = torch.from_numpy(_G[origin][lo:hi].sum(axis=0))
        w.receive([Message(Kind.GRADIENT, origin, origin, lo, hi, payload)])
    assert w.rejected["duplicate"] == expected_rejects
    for origin in (1, 2):
        prefix = next(i for i in range(_K + 1) if i not in held[origin])
        assert w.clock[origin] == prefix
    applied = sum(_G[o][sorted(held[o])].sum(axis=0) if held[o] else 0.0 for o in (1, 2))
    np.testing.assert_allclose(w.params.detach().numpy(), x0 - 0.1 * applied, rtol=0, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(message_streams())
def test_a_stream_holding_every_chunk_applies_the_whole_union_once(stream):
    """Add every id once (as singletons) at the end: whatever came before, each id ends applied once."""
    w = Worker(0, 3, _PROP_TASK.build_model(0), complete(3), DASGD(), 0.1)
    x0 = w.params.detach().numpy().copy()
    everything = stream + [(o, i, i + 1) for o in (1, 2) for i in range(_K)]
    for origin, lo, hi in everything:
        payload = torch.from_numpy(_G[origin][lo:hi].sum(axis=0))
        w.receive([Message(Kind.GRADIENT, origin, origin, lo, hi, payload)])
    assert w.clock.tolist() == [0, _K, _K] and not w._gaps
    np.testing.assert_allclose(
        w.params.detach().numpy(), x0 - 0.1 * (_G[1].sum(axis=0) + _G[2].sum(axis=0)), rtol=0, atol=1e-12
    )
