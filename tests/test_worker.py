"""The worker against trusted oracles: sequential SGD, exactly-once delivery, the drain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


def test_zero_delay_complete_graph_equals_sequential_sgd():
    """DESIGN.md guarantee: zero delay on a complete graph gives sequential SGD's parameters."""
    n, steps, lr = 4, 60, 0.1
    task, workers = quadratic_workers(n, lr=lr)
    net = InProcessNetwork(n)
    # The oracle: one model, the same gradient sequence (worker k % n's k-th batch) applied in order.
    ref = task.build_model(0)
    ref_samplers = [task.sampler(100 + r, 8) for r in range(n)]
    for k in range(steps):
        r = k % n
        deliver(net, workers)
        g = workers[r].compute()
        for peer, msg in workers[r].commit(g):
            net.endpoint(r).send(peer, msg)
        ref.zero_grad()
        task.loss(ref, ref_samplers[r].next()).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= lr * p.grad
    deliver(net, workers)
    expected = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    for w in workers:
        assert w.applied == steps
        torch.testing.assert_close(w.params, expected, atol=1e-6, rtol=0)


def test_zero_delay_oracle_fails_when_a_gradient_is_skipped():
    """The oracle above can fail: dropping one message breaks equality."""
    n, lr = 2, 0.1
    task, workers = quadratic_workers(n, lr=lr)
    net = InProcessNetwork(n)
    g = workers[0].compute()
    workers[0].commit(g)  # never sent
    deliver(net, workers)
    assert not torch.allclose(workers[0].params, workers[1].params)


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
