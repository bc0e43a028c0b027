"""Every rule of the Worker (worker/worker.py) on its own, against hand-worked truth.

Pure logic, no processes: a worker is built around a three-number model and fed messages, bundles and
gradients written out by hand. Payloads and the stepsize are small dyadic numbers, so every expected
parameter vector below is exact in float64 and compared with ``torch.equal``. What each test pins:

- the constructor's validation (exact messages, the boundaries of each range) and defaults;
- which graphs count as complete, and where a worker's own messages go on each;
- the drain: final counts, dead workers, ``holds_every_final``, ``complete`` and ``on_complete`` once;
- ``receive``: every rejection reason with its exact key and count, FINAL/STOP/SHUTDOWN, forwarding along
  a ring's broadcast trees, models;
- ``_receive_bundle``: the vectorised path against the one-by-one path, and every check that makes it fall
  back to the one-by-one path;
- dtype/device conversion of payloads, ``_AllBut``, and the audit trail's history.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dasgd.algorithms import DASGD, AlgorithmParams
from dasgd.algorithms.gossip import GossipAveraging
from dasgd.algorithms.local_sgd import LocalSGD
from dasgd.algorithms.ps import ParameterServerASGD
from dasgd.algorithms.staleness_policies import StalenessCappedDASGD
from dasgd.core.message import Kind, Message
from dasgd.core.topology import complete, ring, torus
from dasgd.sim.bundles import GradientBundle
from dasgd.worker.audit import load_audit
from dasgd.worker.worker import Gradient, Worker, _AllBut

F64 = torch.float64
X0 = [1.0, -2.0, 4.0]
LR = 0.5


class Vec(nn.Module):
    """A model that is one parameter vector (its flat replica is that vector)."""

    def __init__(self, values: list[float], dtype: torch.dtype = F64) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(values, dtype=dtype))


class Recording(DASGD):
    """DASGD that keeps what reaches its hooks (the messages it is handed, its on_complete calls);
    ``apply=False``: remote gradients are only recorded, not applied."""

    def __init__(self, apply: bool = True) -> None:
        super().__init__()
        self.apply = apply

    def bind(self, worker) -> None:  # noqa: ANN001
        super().bind(worker)
        self.seen: list = []
        self.completions = 0

    def on_gradient(self, msg):  # noqa: ANN001, ANN201
        self.seen.append(msg)
        return super().on_gradient(msg) if self.apply else []

    def on_complete(self):  # noqa: ANN201
        self.completions += 1
        return []


def make(rank: int = 0, n: int = 3, topology=None, algorithm=None, **kwargs) -> Worker:  # noqa: ANN001
    return Worker(
        rank,
        n,
        Vec(X0),
        topology if topology is not None else complete(n),
        algorithm or DASGD(),
        LR,
        **kwargs,
    )


def vec(*values: float, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def grad(origin: int, lo: int, hi: int, payload=None, sender: int | None = None, clock=None) -> Message:  # noqa: ANN001
    """A gradient message; the payload defaults to (hi - lo) * (origin + 1) in every coordinate."""
    if payload is None:
        payload = torch.full((3,), float((hi - lo) * (origin + 1)), dtype=F64)
    return Message(Kind.GRADIENT, origin if sender is None else sender, origin, lo, hi, payload, clock)


def final(origin: int, count: int, sender: int | None = None) -> Message:
    return Message(Kind.FINAL, origin if sender is None else sender, origin, count, count)


def model(origin: int, tag: int, payload, sender: int | None = None, clock=None) -> Message:  # noqa: ANN001
    return Message(Kind.MODEL, origin if sender is None else sender, origin, tag, tag, payload, clock)


def expected_params(*payloads: torch.Tensor) -> torch.Tensor:
    """x0 - lr * (sum of the payloads): DASGD's replica after applying them."""
    out = vec(*X0)
    for p in payloads:
        out = out - LR * p
    return out


def own_gradient(w: Worker, values: list[float]) -> Gradient:
    """A gradient 'computed' at the worker's current replica (its clock copied now)."""
    return Gradient(vec(*values), w.clock.copy(), 0.0)


def message_error(excinfo) -> str:  # noqa: ANN001
    return str(excinfo.value)


# -- the constructor ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("rank", "n"), [(3, 3), (4, 3), (-1, 3), (1, 1)])
def test_a_rank_outside_zero_to_world_size_is_refused(rank, n):
    with pytest.raises(ValueError) as e:
        make(rank, n)
    assert message_error(e) == f"rank {rank} is outside [0, {n})"


def test_the_last_rank_is_accepted_and_pushes_to_every_other_worker():
    w = make(2, 3)
    assert [peer for peer, _ in w.commit(own_gradient(w, [1, 1, 1]))] == [0, 1]


def test_a_topology_for_another_number_of_workers_is_refused():
    with pytest.raises(ValueError) as e:
        Worker(0, 3, Vec(X0), complete(4), DASGD(), LR)
    assert message_error(e) == "topology has 4 nodes but the run has 3 workers"


@pytest.mark.parametrize("b", [0, -2])
def test_grads_per_message_below_one_is_refused(b):
    with pytest.raises(ValueError) as e:
        make(grads_per_message=b)
    assert message_error(e) == f"grads_per_message must be at least 1, got {b}"


def test_by_default_each_gradient_is_one_message_carrying_the_clock_it_was_computed_at():
    w = make(0, 3)
    w.receive([grad(1, 0, 2), grad(2, 0, 1)])
    g = own_gradient(w, [1, 2, 3])  # computed at clock [0, 2, 1]
    out = w.commit(g)
    assert [(p, m.kind, m.sender, m.origin, m.lo, m.hi) for p, m in out] == [
        (1, Kind.GRADIENT, 0, 0, 0, 1),
        (2, Kind.GRADIENT, 0, 0, 0, 1),
    ]
    for _, m in out:
        assert torch.equal(m.payload, vec(1, 2, 3))
        assert m.clock.tolist() == [0, 2, 1]  # the clock at the computation's start, not [1, 2, 1]
    assert w.clock.tolist() == [1, 2, 1]
    assert w.send_clock is True and w.stopped is False and w.stop_requested is False


@pytest.mark.parametrize(
    ("algorithm", "send_clock", "clocked"),
    [
        (DASGD, True, True),
        (DASGD, False, False),
        (StalenessCappedDASGD, False, True),  # it reads the clocks: attached whatever send_clock says
        (StalenessCappedDASGD, True, True),
    ],
)
def test_send_clock_attaches_the_clock_unless_off_and_the_algorithm_does_not_need_it(
    algorithm, send_clock, clocked
):
    w = make(1, 3, algorithm=algorithm(), send_clock=send_clock)
    out = w.commit(own_gradient(w, [1, 1, 1])) + w.request_stop() + w.finish()
    assert [(p, m.kind) for p, m in out] == [
        (0, Kind.GRADIENT),
        (2, Kind.GRADIENT),
        (0, Kind.STOP),
        (2, Kind.STOP),
        (0, Kind.FINAL),
        (2, Kind.FINAL),
    ]
    for _, m in out:
        if clocked:
            assert m.clock is not None
        else:
            assert m.clock is None
    if clocked:
        assert [m.clock.tolist() for _, m in out[::2]] == [[0, 0, 0], [0, 1, 0], [0, 1, 0]]


# -- complete graphs and own children ------------------------------------------------------------------
@pytest.mark.parametrize("n", [3, 4, 5, 6])
def test_on_a_complete_graph_own_messages_go_to_every_other_worker_through_a_view(n):
    for rank in range(n):
        w = make(rank, n)
        assert w._complete
        # A view, not a tuple: at n = 10,000 a tuple would hold n ints per worker.
        assert isinstance(w._own_children, _AllBut)
        assert [p for p, _ in w.request_stop()] == [r for r in range(n) if r != rank]


def test_a_triangle_ring_is_a_complete_graph():
    w = make(1, 3, topology=ring(3))  # three edges: every pair is linked
    assert w._complete
    assert [p for p, _ in w.request_stop()] == [0, 2]


@pytest.mark.parametrize(
    ("topology", "rank", "neighbours"),
    [
        (ring(4), 0, [1, 3]),
        (ring(4), 2, [1, 3]),
        (ring(5), 0, [1, 4]),
        (ring(6), 3, [2, 4]),
        (torus(2, 2), 1, [0, 3]),
        (torus(2, 3), 0, [1, 2, 3]),  # (0,0): (0,1), (0,2) and (1,0); up and down are the same worker
        (torus(2, 3), 4, [1, 3, 5]),
    ],
)
def test_on_a_sparse_graph_own_messages_go_to_the_neighbours_only(topology, rank, neighbours):
    w = make(rank, topology.n, topology=topology)
    assert not w._complete
    assert [p for p, _ in w.request_stop()] == neighbours
    assert [p for p, _ in w.commit(own_gradient(w, [1, 1, 1]))] == neighbours


def test_on_a_four_ring_a_message_from_a_non_neighbour_is_a_wrong_route():
    """On a ring of 4 (not complete), worker 2 is two hops from worker 0: it never sends to 0 directly."""
    w = make(0, 4, topology=ring(4))
    assert w.receive([grad(2, 0, 1), grad(2, 0, 1)]) == []
    assert w.rejected == {"wrong_route": 2}
    assert w.clock.tolist() == [0, 0, 0, 0]


# -- the drain: finals, dead workers, completion ---------------------------------------------------------
def test_a_fresh_worker_is_not_complete_and_knows_no_finals():
    w = make(0, 3, algorithm=Recording())
    assert w.finals() == {}
    assert not w.holds_every_final()
    assert not w.complete
    assert w.algorithm.completions == 0


def test_holds_every_final_needs_every_count_known_and_held_and_completion_runs_once():
    w = make(0, 3, algorithm=Recording())
    assert w.finish() != []
    assert w.finals() == {0: 0}  # a final count of 0 is a count
    w.receive([final(1, 0), final(2, 2)])
    assert w.finals() == {0: 0, 1: 0, 2: 2}
    assert not w.holds_every_final()  # every count known, worker 2's two gradients not held
    assert not w.complete
    w.receive([grad(2, 0, 1)])
    assert not w.holds_every_final()
    w.receive([grad(2, 1, 2)])
    assert w.holds_every_final()
    assert w.algorithm.completions == 0  # complete not asked yet
    assert w.complete and w.complete
    assert w.algorithm.completions == 1


def test_every_final_zero_is_complete_at_once():
    w = make(1, 3)
    w.finish()
    w.receive([final(0, 0), final(2, 0)])
    assert w.holds_every_final() and w.complete


def test_a_dead_worker_is_not_waited_for_but_the_own_rank_is_never_dead():
    w = make(0, 3)
    w.declare_dead(0)
    assert w.dead == set()
    w.finish()
    w.receive([final(1, 1), grad(1, 0, 1)])
    assert not w.holds_every_final()  # worker 2's final count is unknown
    w.declare_dead(2)
    assert w.dead == {2}
    assert w.holds_every_final()
    assert w.finals() == {0: 0, 1: 1}


def test_a_gap_of_a_live_origin_blocks_completion_and_one_of_a_dead_origin_does_not():
    w = make(0, 3)
    w.finish()
    w.receive([final(1, 0), final(2, 0)])
    assert w.holds_every_final()
    w2 = make(0, 3)
    w2.finish()
    w2.receive([grad(1, 2, 3), final(1, 0), final(2, 0)])  # ids 2 of worker 1 held with a gap before them
    assert w2.clock.tolist() == [0, 0, 0] and set(w2._gaps) == {1}
    assert not w2.holds_every_final()
    w2.declare_dead(1)
    assert w2.holds_every_final()


# -- stop and finish -----------------------------------------------------------------------------------
def test_request_stop_sets_the_flag_and_sends_a_stop_with_a_copy_of_the_clock():
    w = make(1, 3)
    w.receive([grad(0, 0, 3)])
    out = w.request_stop()
    assert w.stop_requested is True
    assert [p for p, _ in out] == [0, 2]
    msg = out[0][1]
    assert (msg.kind, msg.sender, msg.origin, msg.lo, msg.hi, msg.payload) == (Kind.STOP, 1, 1, 0, 0, None)
    assert msg.clock.tolist() == [3, 0, 0]
    w.receive([grad(0, 3, 4)])
    assert msg.clock.tolist() == [3, 0, 0]  # a queued message does not change with the replica


def test_finish_flushes_the_pending_sum_announces_the_count_once_and_stops():
    w = make(0, 2, grads_per_message=2)
    sent = []
    for values in ([1, 0, 0], [0, 2, 0], [0, 0, 4]):
        sent += w.commit(own_gradient(w, values))
    assert [(p, m.lo, m.hi) for p, m in sent] == [(1, 0, 2)]
    assert torch.equal(sent[0][1].payload, vec(1, 2, 0))
    assert torch.equal(w.params, expected_params(vec(1, 2, 4)))
    out = w.finish()
    assert [(p, m.kind, m.lo, m.hi) for p, m in out] == [(1, Kind.GRADIENT, 2, 3), (1, Kind.FINAL, 3, 3)]
    assert torch.equal(out[0][1].payload, vec(0, 0, 4))
    assert out[1][1].payload is None
    assert w.stopped is True
    assert w.finals() == {0: 3}
    assert w.finish() == []  # once
    with pytest.raises(RuntimeError) as e:
        w.commit(own_gradient(w, [1, 1, 1]))
    assert message_error(e) == "the worker has finished; it accepts no more gradients"
    assert w.computed == 3


def test_finish_with_nothing_pending_sends_only_the_final():
    w = make(0, 2, grads_per_message=2)
    for values in ([1, 0, 0], [0, 2, 0]):
        w.commit(own_gradient(w, values))
    assert [(m.kind, m.lo, m.hi) for _, m in w.finish()] == [(Kind.FINAL, 2, 2)]


def test_push_gradient_sends_to_explicit_peers_with_the_gradient_clock():
    w = make(0, 4)
    g = Gradient(vec(1, 2, 3), np.array([0, 5, 6, 7]), 0.0)
    out = w.push_gradient(4, g, peers=(2,))
    assert [(p, m.kind, m.lo, m.hi) for p, m in out] == [(2, Kind.GRADIENT, 4, 5)]
    assert out[0][1].clock.tolist() == [0, 5, 6, 7]
    assert [p for p, _ in w.push_gradient(5, g)] == [1, 2, 3]


def test_push_gradient_with_b_three_sends_one_sum_per_three_gradients():
    w = make(1, 3, grads_per_message=3)
    counts = []
    for k in range(7):
        counts.append(len(w.commit(own_gradient(w, [k, 1, 0]))))
    assert counts == [0, 0, 2, 0, 0, 2, 0]


# -- compute -------------------------------------------------------------------------------------------
class TwoParts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor([1.0, 2.0], dtype=F64))
        self.y = nn.Parameter(torch.tensor([3.0], dtype=F64))


def test_compute_returns_the_gradient_zeros_for_untouched_parameters_the_loss_and_the_start_clock():
    # loss = 0.5 * |x|^2 does not involve y: gradient (x, 0), loss 0.5 * (1 + 4).
    w = Worker(0, 2, TwoParts(), complete(2), DASGD(), LR, loss_fn=lambda m: 0.5 * (m.x**2).sum())
    w.receive([grad(1, 0, 1, payload=vec(0, 0, 2))])
    g = w.compute()
    assert torch.equal(g.grad, vec(1, 2, 0))
    assert g.loss == 2.5 and isinstance(g.loss, float)
    assert g.clock.tolist() == [0, 1] and g.clock is not w.clock
    w.commit(g)
    assert torch.equal(w.params, vec(1, 2, 2) - LR * vec(1, 2, 0))
    g2 = w.compute()  # gradients of the previous batch do not accumulate
    assert torch.equal(g2.grad, vec(0.5, 1, 0))
    assert g2.loss == 0.625


def test_each_batch_starts_with_the_model_gradients_cleared_to_none():
    """PyTorch's set_to_none semantics: the loss function sees no gradient tensor of the previous batch,
    and a parameter the batch does not use is left with ``.grad`` None (an optimizer built on the module's
    parameters skips it, where a zero tensor would still get weight decay or momentum)."""
    at_entry = []

    def loss(m):  # noqa: ANN001, ANN202
        at_entry.append((m.x.grad is None, m.y.grad is None))
        return (m.x.sum() * m.y.sum()) if len(at_entry) == 1 else m.x.sum()

    w = Worker(0, 2, TwoParts(), complete(2), DASGD(), LR, loss_fn=loss)
    g1 = w.compute()  # d/dx = y = 3, d/dy = x1 + x2 = 3
    assert torch.equal(g1.grad, vec(3, 3, 3))
    g2 = w.compute()
    assert torch.equal(g2.grad, vec(1, 1, 0))
    assert at_entry == [(True, True), (True, True)]
    assert w.model.y.grad is None


def test_compute_is_refused_without_a_loss_after_finish_and_on_a_server():
    with pytest.raises(RuntimeError) as e:
        make(0, 2).compute()
    assert message_error(e) == (
        "this worker has no loss function; use commit_external() with your own gradients"
    )
    w = make(0, 2, loss_fn=lambda m: m.x.sum())
    w.finish()
    with pytest.raises(RuntimeError) as e:
        w.compute()
    assert message_error(e) == "the worker has finished; it computes no more gradients"
    server = make(0, 3, algorithm=ParameterServerASGD(), loss_fn=lambda m: m.x.sum())
    with pytest.raises(RuntimeError) as e:
        server.compute()
    assert message_error(e) == "worker 0 computes no gradients under ps-asgd"


# -- receive: rejections -------------------------------------------------------------------------------
def test_unknown_origins_and_senders_are_rejected_and_counted():
    w = make(0, 3)
    w.receive(
        [
            grad(3, 0, 1, sender=1),  # origin == world_size
            grad(-1, 0, 1, sender=1),
            grad(1, 0, 1, sender=3),  # sender == world_size
            grad(1, 0, 1, sender=-1),
            final(3, 0, sender=1),
        ]
    )
    assert w.rejected == {"unknown_sender": 5}
    assert w.clock.tolist() == [0, 0, 0] and w.finals() == {}
    assert torch.equal(w.params, vec(*X0))


def test_own_messages_are_rejected_and_counted():
    w = make(1, 3)
    w.receive([grad(1, 0, 1, sender=0), final(1, 9, sender=2)])
    assert w.rejected == {"own_message": 2}
    assert w.finals() == {} and w.clock.tolist() == [0, 0, 0]


def test_wrong_routes_on_a_complete_graph_are_rejected_and_counted():
    w = make(0, 3)
    assert w.receive([grad(1, 0, 1, sender=2), final(2, 1, sender=1)]) == []
    assert w.rejected == {"wrong_route": 2}
    assert w.finals() == {}


def test_gradients_of_the_wrong_size_or_without_payload_are_shape_rejections():
    w = make(0, 3)
    w.receive([grad(1, 0, 1, payload=vec(1, 2)), Message(Kind.GRADIENT, 1, 1, 0, 1, None)])
    assert w.rejected == {"shape": 2}
    assert w.clock.tolist() == [0, 0, 0]


@pytest.mark.parametrize(("lo", "hi"), [(-1, 1), (-2, 0), (2, 2), (0, 0), (3, 1)])
def test_an_empty_reversed_or_negative_range_is_a_bad_range(lo, hi):
    w = make(0, 3)
    w.receive([grad(1, lo, hi, payload=vec(1, 1, 1)), grad(1, lo, hi, payload=vec(1, 1, 1))])
    assert w.rejected == {"bad_range": 2}
    assert w.clock.tolist() == [0, 0, 0]
    assert torch.equal(w.params, vec(*X0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_gradient_or_model_is_refused_and_its_origin_flagged(bad):
    w = make(0, 3)
    w.receive([grad(1, 0, 1, payload=vec(1, bad, 1)), grad(1, 0, 1)])
    assert w.rejected == {"non_finite": 1}
    assert w.non_finite_origins == {1: 1}
    assert w.clock.tolist() == [0, 1, 0]  # the finite retry of the same id is applied
    assert torch.equal(w.params, expected_params(vec(2, 2, 2)))
    g = make(0, 3, algorithm=GossipAveraging())
    g.receive([model(2, 0, vec(bad, 0, 0), clock=np.array([0, 0, 4]))])
    assert g.rejected == {"non_finite": 1} and g.non_finite_origins == {2: 1}
    assert torch.equal(g.params, vec(*X0)) and g.clock.tolist() == [0, 0, 0]


@pytest.mark.parametrize("algorithm", [GossipAveraging, LocalSGD])
def test_an_algorithm_that_moves_models_refuses_gradients_before_recording_them(algorithm):
    w = make(0, 3, algorithm=algorithm())
    w.receive([grad(1, 0, 5), grad(2, 0, 1)])
    assert w.rejected == {"unexpected_gradient": 2}
    assert w.clock.tolist() == [0, 0, 0] and torch.equal(w.params, vec(*X0))


def test_ids_up_to_the_clock_limit_are_accepted_and_beyond_it_refused():
    from dasgd.core.message import MAX_GRADIENT_ID, MAX_GRADIENTS_PER_MESSAGE

    w = make(0, 3)
    top = MAX_GRADIENT_ID
    w.receive([grad(1, top - 1, top), grad(1, top, top + 1), grad(2, 2**63, 2**63 + 1), final(2, 2**64)])
    assert w.rejected == {"bad_range": 3}
    assert w.clock.tolist() == [0, 0, 0] and 1 in w._gaps  # the last legal id is held, in a gap
    w.receive([grad(2, 0, MAX_GRADIENTS_PER_MESSAGE, payload=vec(0, 0, 0))])
    w.receive([grad(2, MAX_GRADIENTS_PER_MESSAGE, 2 * MAX_GRADIENTS_PER_MESSAGE + 1, payload=vec(0, 0, 0))])
    assert w.rejected == {"bad_range": 3, "range_too_wide": 1}
    assert w.clock.tolist() == [0, 0, MAX_GRADIENTS_PER_MESSAGE]


def test_a_final_below_what_is_held_is_refused_and_later_gradients_still_land():
    w = make(0, 3)
    w.receive([grad(1, 0, 2), final(1, 1), final(2, 0)])
    assert w.rejected == {"final_below_held": 1}
    assert w.finals() == {2: 0}
    w.receive([grad(1, 2, 3), final(1, 3)])
    assert w.clock.tolist() == [0, 3, 0] and w.finals() == {1: 3, 2: 0}
    w = make(0, 3)
    w.receive([grad(1, 3, 5), final(1, 4)])  # held in a gap above the count
    assert w.rejected == {"final_below_held": 1}


def test_gradients_up_to_the_final_count_are_applied_and_those_past_it_rejected():
    w = make(0, 3)
    w.receive([final(1, 0), final(2, 3)])
    w.receive([grad(1, 0, 1), grad(1, 0, 1)])  # worker 1 computed nothing
    w.receive([grad(2, 0, 2), grad(2, 2, 3), grad(2, 3, 4)])  # ends exactly at 3, then one past it
    assert w.rejected == {"after_final": 3}
    assert w.clock.tolist() == [0, 0, 3]
    assert torch.equal(w.params, expected_params(vec(6, 6, 6), vec(3, 3, 3)))


def test_finals_repeated_are_duplicates_and_different_ones_conflicts():
    w = make(0, 3)
    w.receive([final(1, 0), final(1, 0), final(2, 3), final(2, 5), final(2, 2), final(2, 3)])
    assert w.rejected == {"duplicate": 2, "conflicting_final": 2}
    assert w.finals() == {1: 0, 2: 3}


def test_a_duplicate_gradient_is_rejected_and_counted():
    w = make(0, 3)
    w.receive([grad(1, 0, 2), grad(1, 1, 2), grad(1, 0, 1)])
    assert w.rejected == {"duplicate": 2}
    assert w.clock.tolist() == [0, 2, 0]


def test_stop_sets_the_flag_and_shutdown_is_ignored_without_ending_the_batch():
    w = make(0, 3)
    shutdown = Message(Kind.SHUTDOWN, 1, 1)
    assert w.receive([shutdown, grad(1, 0, 1)]) == []
    assert w.stop_requested is False
    assert w.clock.tolist() == [0, 1, 0]
    w.receive([Message(Kind.STOP, 2, 2), grad(2, 0, 1)])
    assert w.stop_requested is True
    assert w.clock.tolist() == [0, 1, 1]
    assert sum(w.rejected.values()) == 0


def test_a_bundle_then_a_message_in_one_batch_are_both_applied():
    w = make(0, 3)
    b, calls = bundle_of([grad(1, 0, 1), grad(2, 0, 1)])
    w.receive([b, grad(1, 1, 2)])
    assert w.clock.tolist() == [0, 2, 1] and calls == []


# -- receive: forwarding along a ring's broadcast trees --------------------------------------------------
def test_messages_are_forwarded_to_the_children_of_their_origins_tree_on_a_ring():
    # ring(5): origin 2's tree is 2 -> {1, 3}, 1 -> 0, 3 -> 4 (distances are unique on an odd ring).
    w1 = make(1, 5, topology=ring(5))
    g = grad(2, 0, 1, clock=np.array([0, 0, 1, 0, 0]))
    out = w1.receive([g, final(2, 1), Message(Kind.STOP, 2, 2)])
    assert [(p, m.kind, m.sender, m.origin, m.lo, m.hi) for p, m in out] == [
        (0, Kind.GRADIENT, 1, 2, 0, 1),
        (0, Kind.FINAL, 1, 2, 1, 1),
        (0, Kind.STOP, 1, 2, 0, 0),
    ]
    assert out[0][1].payload is g.payload and out[0][1].clock is g.clock
    assert w1.stop_requested and w1.finals() == {2: 1} and w1.clock.tolist() == [0, 0, 1, 0, 0]
    # Worker 0 is a leaf of 2's tree: it applies, forwards nothing; it must hear 2 from 1, not from 4.
    w0 = make(0, 5, topology=ring(5))
    assert w0.receive([out[0][1]]) == []
    assert w0.receive([grad(2, 1, 2, sender=4)]) == []
    assert w0.rejected == {"wrong_route": 1}
    assert w0.clock.tolist() == [0, 0, 1, 0, 0]
    # Worker 3 forwards 2's messages to 4; a shutdown is never forwarded.
    w3 = make(3, 5, topology=ring(5))
    out = w3.receive([Message(Kind.SHUTDOWN, 2, 2), grad(2, 0, 1)])
    assert [(p, m.sender) for p, m in out] == [(4, 3)]


def test_nothing_is_forwarded_on_a_complete_graph():
    w = make(1, 4)
    assert w.receive([grad(0, 0, 1), final(0, 1), Message(Kind.STOP, 0, 0)]) == []


# -- receive: models -------------------------------------------------------------------------------------
def test_a_gossip_request_is_answered_with_the_replica_before_averaging_and_the_batch_goes_on():
    w = make(0, 3, algorithm=GossipAveraging())
    first = model(1, 0, vec(3, 0, 0), clock=np.array([0, 4, 0]))
    second = model(2, 0, vec(1, 1, 1), clock=np.array([0, 0, 5]))
    out = w.receive([first, second])
    assert [(p, m.kind, m.sender, m.origin, m.lo, m.hi) for p, m in out] == [
        (1, Kind.MODEL, 0, 0, 1, 1),
        (2, Kind.MODEL, 0, 0, 1, 1),
    ]
    # Each reply holds the replica before its request is merged: x0, then (x0 + m1) / 2 = (2, -1, 2).
    assert torch.equal(out[0][1].payload, vec(*X0))
    assert torch.equal(out[1][1].payload, vec(2, -1, 2))
    assert torch.equal(w.params, (vec(2, -1, 2) + vec(1, 1, 1)) / 2)
    assert w.clock.tolist() == [0, 4, 5]  # the union of the merged models' gradient sets
    assert sum(w.rejected.values()) == 0


def test_models_on_a_sparse_graph_travel_one_hop_between_neighbours():
    # ring(5), worker 0: neighbours 1 and 4. Origin 2 is two hops away (its tree reaches 0 through 1).
    w = make(0, 5, topology=ring(5), algorithm=GossipAveraging())
    forwarded = model(2, 0, vec(1, 1, 1), sender=1)
    direct_far = model(2, 0, vec(1, 1, 1))
    assert w.receive([forwarded, forwarded, direct_far]) == []
    assert w.rejected == {"wrong_route": 3}
    assert torch.equal(w.params, vec(*X0))
    out = w.receive([model(4, 0, vec(3, 0, 0))])  # a neighbour's request is answered
    assert [(p, m.kind, m.lo) for p, m in out] == [(4, Kind.MODEL, 1)]
    assert torch.equal(w.params, (vec(*X0) + vec(3, 0, 0)) / 2)


def test_models_of_the_wrong_size_or_without_payload_are_shape_rejections():
    w = make(0, 3, algorithm=GossipAveraging())
    assert w.receive([model(1, 0, vec(1, 2)), model(2, 0, None)]) == []
    assert w.rejected == {"shape": 2}
    assert torch.equal(w.params, vec(*X0))


def test_a_model_in_the_other_dtype_is_merged_in_the_replica_dtype():
    # Local SGD sums the models of a round in the dtype of the first one to arrive: a float32 model
    # arriving before the worker's own would make the round's average a float32 one if not converted.
    w = make(1, 2, algorithm=LocalSGD(AlgorithmParams(local_steps=1)))
    third = 1.0 / 3.0
    w.receive([model(0, 0, vec(third, 0, 0, dtype=torch.float32))])
    w.commit(own_gradient(w, [0, 0, 0]))  # round 0 of worker 1: its model is x0
    f32_third = float(torch.tensor(third, dtype=torch.float32))
    assert w.params.dtype == F64
    assert torch.equal(w.params, (vec(*X0) + vec(f32_third, 0, 0)) / 2)


# -- _as_local ----------------------------------------------------------------------------------------
def on_meta(w: Worker) -> None:
    """Put the worker's replica on the meta device, which stands in here for an accelerator: a payload
    that arrives on the CPU must be moved to it. (Swapped in after construction, and never updated: the
    first concatenation or addition on meta tensors costs torch a second of lazy imports.)"""
    w.params = torch.empty(w.params.shape, dtype=w.params.dtype, device="meta")


def test_a_float32_payload_is_converted_and_the_message_keeps_everything_else():
    w = make(0, 4)
    clock = np.array([1, 2, 3, 4])
    msg = Message(Kind.MODEL, 2, 1, 3, 5, vec(0.1, 0.2, 0.3, dtype=torch.float32), clock)
    out = w._as_local(msg)
    assert out.payload.dtype == F64 and out.payload.device == w.params.device
    assert torch.equal(out.payload, msg.payload.double())
    assert (out.kind, out.sender, out.origin, out.lo, out.hi) == (Kind.MODEL, 2, 1, 3, 5)
    assert out.kind is Kind.MODEL
    assert out.clock is clock


def test_a_payload_in_the_replica_dtype_and_device_passes_unchanged():
    w = make(0, 3)
    msg = grad(1, 0, 1)
    assert w._as_local(msg) is msg  # no copy, no rebuilt message per arrival


def test_a_payload_on_another_device_is_moved_to_the_replica_device():
    w = make(0, 3)
    on_meta(w)
    out = w._as_local(grad(1, 0, 1))
    assert out.payload.device.type == "meta" and out.payload.dtype == F64
    out32 = w._as_local(grad(1, 0, 1, payload=vec(1, 1, 1, dtype=torch.float32)))
    assert out32.payload.device.type == "meta" and out32.payload.dtype == F64


# -- _receive_bundle -----------------------------------------------------------------------------------
def bundle_of(messages: list[Message], payload=None, stop: bool = False):  # noqa: ANN001
    """A GradientBundle of ``messages`` (as the simulator builds one) and the list its expand() logs to."""
    grads = [m for m in messages if m.kind == Kind.GRADIENT]
    finals = [m for m in messages if m.kind == Kind.FINAL]
    if payload is None and grads:
        payload = grads[0].payload.clone()
        for m in grads[1:]:
            payload = payload + m.payload
    calls: list[int] = []

    def expand() -> list[Message]:
        calls.append(1)
        return list(messages)

    bundle = GradientBundle(
        np.array([m.origin for m in grads], dtype=np.int64),
        np.array([m.lo for m in grads], dtype=np.int64),
        np.array([m.hi for m in grads], dtype=np.int64),
        payload,
        np.array([m.origin for m in finals], dtype=np.int64),
        np.array([m.hi for m in finals], dtype=np.int64),
        stop or any(m.kind == Kind.STOP for m in messages),
        expand,
    )
    return bundle, calls


def twin_after(prefix: list[Message], messages: list[Message], **kwargs) -> Worker:  # noqa: ANN003
    """A worker of the same setup that received ``prefix`` then ``messages`` one by one."""
    w = make(**kwargs)
    w.receive(list(prefix))
    w.receive(list(messages))
    return w


CLEAN = [
    grad(3, 0, 1, payload=vec(1, 0, 0)),
    grad(1, 2, 3, payload=vec(0, 2, 0)),
    grad(0, 0, 2, payload=vec(0, 0, 4)),
    grad(3, 1, 3, payload=vec(8, 0, 0)),
    grad(1, 3, 4, payload=vec(0, 16, 0)),
    grad(3, 3, 4, payload=vec(0, 0, 32)),
    final(0, 2),
    final(3, 4),
]
"""Worker 2 of a complete graph of 4, holding ids 0, 1 of worker 1: three origins, parts interleaved."""


def test_a_clean_bundle_is_applied_at_once_like_its_messages_one_by_one():
    w = make(2, 4, algorithm=Recording())
    w.receive([grad(1, 0, 2, payload=vec(0, 0, 64))])
    b, calls = bundle_of(CLEAN)
    assert w.receive([b]) == []
    assert calls == []  # the vectorised path
    # The Worker applies the whole bundle as one step (DASGD commutes): the algorithm sees only the message.
    assert len(w.algorithm.seen) == 1
    assert w.clock.tolist() == [2, 4, 0, 4]
    assert w.finals() == {0: 2, 3: 4}
    expected = expected_params(vec(0, 0, 64), vec(1, 0, 0), vec(0, 2, 0), vec(0, 0, 4), vec(8, 0, 0))
    expected = expected - LR * vec(0, 16, 32)
    assert torch.equal(w.params, expected)
    twin = twin_after([grad(1, 0, 2, payload=vec(0, 0, 64))], CLEAN, rank=2, n=4)
    assert torch.equal(w.params, twin.params)
    assert w.clock.tolist() == twin.clock.tolist() and w.finals() == twin.finals()
    assert sum(w.rejected.values()) == 0 and not w.stop_requested


@pytest.mark.parametrize(
    "messages",
    [
        [grad(0, 0, 1), grad(3, 0, 1)],  # the lowest and the highest origin other than the rank
        [grad(0, 0, 3)],
        [grad(3, 0, 1), grad(3, 1, 2), grad(3, 2, 3), grad(0, 0, 1)],
        [grad(1, 0, 1), grad(0, 0, 2), final(0, 2), final(1, 1)],  # each ending exactly at its final
        [final(0, 0), final(1, 0), final(3, 0)],  # finals only, no payload
        [grad(0, 0, 1), Message(Kind.STOP, 3, 3)],
        [],
    ],
)
def test_bundles_that_pass_every_check_take_the_vectorised_path(messages):
    w = make(2, 4)
    b, calls = bundle_of(messages)
    w.receive([b])
    assert calls == []
    twin = twin_after([], messages, rank=2, n=4)
    assert torch.equal(w.params, twin.params)
    assert w.clock.tolist() == twin.clock.tolist()
    assert w.finals() == twin.finals()
    assert w.stop_requested == twin.stop_requested == any(m.kind == Kind.STOP for m in messages)
    assert sum(w.rejected.values()) == 0


def test_a_bundle_of_many_interleaved_parts_is_vectorised_and_keeps_each_origins_order():
    """The simulator's bundles hold dozens of parts; each origin's parts must be checked in arrival order
    (a sort that is not stable would see a valid bundle as out of order, or an invalid one as in order)."""
    messages = []
    for k in range(8):
        for origin in (0, 1, 3):
            messages.append(grad(origin, k, k + 1, payload=torch.full((3,), float(k + origin), dtype=F64)))
    w = make(2, 4)
    b, calls = bundle_of(messages)
    w.receive([b])
    assert calls == []
    assert w.clock.tolist() == [8, 8, 0, 8]
    twin = twin_after([], messages, rank=2, n=4)
    assert torch.equal(w.params, twin.params)
    # The same parts with two of worker 1's swapped: not contiguous in arrival order, so one by one.
    swapped = list(messages)
    swapped[1], swapped[4] = swapped[4], swapped[1]
    w2 = make(2, 4)
    b2, calls2 = bundle_of(swapped)
    w2.receive([b2])
    assert calls2 == [1]
    assert w2.clock.tolist() == [8, 8, 0, 8] and sum(w2.rejected.values()) == 0


def test_a_finals_only_bundle_at_the_held_counts_is_vectorised():
    w = make(2, 4)
    w.receive([grad(1, 0, 2), grad(3, 0, 1)])
    b, calls = bundle_of([final(1, 2), final(3, 1), final(0, 0)])
    w.receive([b])
    assert calls == [] and w.finals() == {0: 0, 1: 2, 3: 1}


@pytest.mark.parametrize(
    ("prefix", "messages", "rejected"),
    [
        ([], [grad(0, 0, 1), grad(4, 0, 1, sender=0)], {"unknown_sender": 1}),  # origin == world_size
        ([], [grad(0, 0, 1), grad(-1, 0, 1, sender=0)], {"unknown_sender": 1}),
        ([], [grad(0, 0, 1), final(4, 0, sender=0)], {"unknown_sender": 1}),
        ([], [grad(2, 0, 1), grad(0, 0, 1)], {"own_message": 1}),
        ([], [grad(0, 0, 1), final(2, 5)], {"own_message": 1}),
        ([grad(1, 3, 4)], [grad(0, 0, 1)], {}),  # a gap held before
        ([], [grad(0, 1, 2)], {}),  # does not start at the held prefix
        ([grad(0, 0, 2)], [grad(0, 1, 3)], {"duplicate": 1}),
        ([], [grad(0, 0, 1), grad(0, 2, 3)], {}),  # not contiguous within the bundle
        ([], [grad(0, 0, 2), grad(0, 1, 3)], {"duplicate": 1}),
        ([], [grad(0, 0, 1), grad(1, 1, 1)], {"bad_range": 1}),
        ([], [grad(0, 0, 1), grad(1, 1, 0)], {"bad_range": 1}),
        ([], [grad(0, 0, 1), grad(1, 0, 0, payload=vec(1, 1, 1))], {"bad_range": 1}),  # empty, at the prefix
        ([final(0, 0)], [grad(0, 0, 1)], {"after_final": 1}),  # worker 0 computed nothing
        ([], [grad(0, 0, 1), final(0, 0)], {"final_below_held": 1}),
        ([final(0, 1)], [grad(0, 0, 2)], {"after_final": 1}),  # past a final known before
        ([], [grad(0, 0, 2), final(0, 1)], {"final_below_held": 1}),  # a count below what it sent before
        ([], [grad(0, 0, 1), final(3, 0), final(3, 0)], {"duplicate": 1}),
        ([final(3, 0)], [grad(0, 0, 1), final(3, 0)], {"duplicate": 1}),
        ([final(0, 0)], [final(0, 1)], {"conflicting_final": 1}),
        ([grad(1, 0, 2)], [final(1, 1)], {"final_below_held": 1}),  # a count below what is held
        ([], [grad(0, 0, 1), grad(1, 0, 1, payload=vec(1, float("nan"), 1))], {"non_finite": 1}),
        ([], [grad(0, 0, 1), grad(1, 0, 1 << 17, payload=vec(1, 1, 1))], {"range_too_wide": 1}),
        ([], [grad(0, 0, 1), grad(1, 2**62, 2**62 + 1)], {"bad_range": 1}),
        ([], [grad(0, 0, 1), final(1, 2**62 + 1)], {"bad_range": 1}),
    ],
)
def test_bundles_failing_a_check_go_one_message_at_a_time(prefix, messages, rejected):
    w = make(2, 4)
    w.receive(list(prefix))
    b, calls = bundle_of(messages)
    w.receive([b])
    assert calls == [1]
    assert w.rejected == rejected
    twin = twin_after(prefix, messages, rank=2, n=4)
    assert torch.equal(w.params, twin.params)
    assert w.clock.tolist() == twin.clock.tolist() and w.finals() == twin.finals()


def test_a_bundle_whose_payload_has_the_wrong_size_goes_one_by_one():
    w = make(2, 4)
    messages = [grad(0, 0, 1, payload=vec(1, 1)), grad(1, 0, 1, payload=vec(2, 2))]
    b, calls = bundle_of(messages)
    w.receive([b])
    assert calls == [1] and w.rejected == {"shape": 2}
    assert w.clock.tolist() == [0, 0, 0, 0]


def test_a_bundle_for_a_non_commuting_algorithm_goes_one_by_one():
    w = make(2, 4, algorithm=StalenessCappedDASGD())
    b, calls = bundle_of(CLEAN[:3])
    w.receive([b])
    assert calls == [1]
    assert sum(w.rejected.values()) == 0
    assert w.clock.tolist() == [2, 0, 0, 1]  # worker 1's part starts at 2: held in a gap
    assert set(w._gaps) == {1}


def test_a_bundle_on_a_sparse_graph_goes_one_by_one_and_forwards():
    w = make(1, 5, topology=ring(5))
    b, calls = bundle_of([grad(2, 0, 1), grad(0, 0, 1)])
    out = w.receive([b])
    assert calls == [1]
    assert [(p, m.origin) for p, m in out] == [(0, 2), (2, 0)]
    assert w.clock.tolist() == [1, 0, 1, 0, 0]


def test_a_bundle_on_a_four_ring_is_not_vectorised():
    w = make(0, 4, topology=ring(4))
    b, calls = bundle_of([grad(1, 0, 1)])
    w.receive([b])
    assert calls == [1] and w.clock.tolist() == [0, 1, 0, 0]


def test_a_float32_bundle_is_applied_in_the_replica_dtype():
    w = make(2, 4, algorithm=Recording())
    messages = [grad(0, 0, 1, payload=vec(0.1, 0, 0, dtype=torch.float32))]
    b, calls = bundle_of(messages)
    w.receive([b])
    assert calls == [] and w.algorithm.seen == []  # applied by the Worker, as one step
    assert w.params.dtype == F64
    # The float32 payload, widened exactly, times the stepsize: what a float64 replica must hold.
    assert torch.equal(w.params, vec(*X0) - LR * vec(0.1, 0, 0, dtype=torch.float32).double())
    assert w.clock.tolist() == [1, 0, 0, 0]


def test_a_bundle_on_another_device_is_moved_to_the_replica_device():
    w = make(2, 4, algorithm=Recording(apply=False))
    on_meta(w)
    applied = []
    w._step = lambda vector, scale: applied.append((vector.device.type, vector.dtype, scale))
    b, calls = bundle_of([grad(0, 0, 1)])
    w.receive([b])
    assert calls == [] and applied == [("meta", F64, LR)]  # moved to the replica's device before the step
    assert w.clock.tolist() == [1, 0, 0, 0]


# -- effects: what a hook asks for, carried out by the Worker -------------------------------------------
class Scripted(DASGD):
    """An algorithm whose hooks return whatever the test set in ``effects`` (one list per call)."""

    def bind(self, worker) -> None:  # noqa: ANN001
        super().bind(worker)
        self.effects: list = []
        self.shared: list = []

    def on_own(self, gradient, index):  # noqa: ANN001, ANN201
        return self.effects.pop(0)

    def on_gradient(self, msg):  # noqa: ANN001, ANN201
        return self.effects.pop(0)

    def on_model_shared(self, msg):  # noqa: ANN001, ANN201
        self.shared.append(msg)
        return []


def test_an_algorithm_sees_a_read_only_worker():
    w = make(0, 3)
    view = w.algorithm.worker
    assert not isinstance(view, Worker)
    for name in ("params", "model", "receive", "commit", "_carry_out", "_step", "declare_dead", "_hold"):
        assert not hasattr(view, name), name
    with pytest.raises(ValueError, match="read-only"):
        view.clock[1] = 5
    w.receive([grad(1, 0, 2)])
    assert view.clock.tolist() == [0, 2, 0]  # follows the worker's own clock
    assert (view.rank, view.world_size, view.lr, view.computed, view.stopped) == (0, 3, LR, 0, False)
    with pytest.raises(AttributeError):
        view.lr = 1.0


def test_effects_are_carried_out_in_order_and_a_shared_model_is_the_replica_at_its_place():
    w = make(0, 3, algorithm=Scripted())
    from dasgd.algorithms.effects import AverageModel, Reject, ShareModel, Step

    w.algorithm.effects = [
        [ShareModel((1,), 7, 7), Step(vec(1, 1, 1), 0.5), ShareModel((1, 2), 8, 9), Reject("mine")],
        [AverageModel(vec(0, 0, 0))],
    ]
    out = w.commit(own_gradient(w, [0, 0, 0]))
    assert [(p, m.kind, m.lo, m.hi) for p, m in out] == [
        (1, Kind.MODEL, 7, 7),
        (1, Kind.MODEL, 8, 9),
        (2, Kind.MODEL, 8, 9),
    ]
    assert torch.equal(out[0][1].payload, vec(*X0))  # before the step
    assert torch.equal(out[1][1].payload, vec(*X0) - 0.5)  # after it
    assert out[1][1] is out[2][1] and w.algorithm.shared == [out[0][1], out[1][1]]
    assert out[0][1].clock.tolist() == [1, 0, 0]
    assert w.rejected["mine"] == 1
    w.receive([grad(1, 0, 1)])
    assert torch.equal(w.params, (vec(*X0) - 0.5) / 2)
    assert torch.equal(out[1][1].payload, vec(*X0) - 0.5)  # the copy sent is not the replica


def test_merge_and_adopt_clock_keep_the_own_count_and_ignore_a_clock_of_another_length():
    from dasgd.algorithms.effects import AdoptClock, MergeClock

    w = make(0, 3, algorithm=Scripted())
    w.algorithm.effects = [[], [MergeClock(np.array([0, 1, 5])), MergeClock(np.array([9, 9])), MergeClock(None)]]
    w.commit(own_gradient(w, [0, 0, 0]))
    w.receive([grad(1, 0, 3)])
    assert w.clock.tolist() == [1, 3, 5]
    w.algorithm.effects = [[AdoptClock(np.array([0, 2, 1])), AdoptClock(None)]]
    w.receive([grad(2, 5, 6)])
    assert w.clock.tolist() == [1, 2, 1]  # the server's set, with the own count kept


@pytest.mark.parametrize(
    ("effects", "message"),
    [
        (None, "returned NoneType"),
        ("Step", "returned str"),
        ([("step", 1.0)], "is not an effect"),
        (["Step-4"], "a vector of 4 values; the replica has 3"),
        (["Model-2"], "SetModel with a vector of 2 values"),
        (["Push-5"], "pushed own gradient 5, but the one being committed is 0"),
    ],
)
def test_an_effect_the_worker_must_not_carry_out_is_refused_with_the_plug_in_named(effects, message):
    from dasgd.algorithms.effects import PushGradient, SetModel, Step
    from dasgd.worker.worker import AlgorithmEffectError

    w = make(0, 3, algorithm=Scripted())
    g = own_gradient(w, [0, 0, 0])
    built = {
        "Step-4": Step(torch.zeros(4, dtype=F64), 1.0),
        "Model-2": SetModel(torch.zeros(2, dtype=F64)),
        "Push-5": PushGradient(5, g),
    }
    w.algorithm.effects = [[built.get(e, e) for e in effects] if isinstance(effects, list) else effects]
    with pytest.raises(AlgorithmEffectError, match=message) as excinfo:
        w.commit(g)
    assert "dasgd" in str(excinfo.value)
    assert torch.equal(w.params, vec(*X0))


def test_on_complete_may_change_the_replica_but_not_send():
    from dasgd.algorithms.effects import ShareModel, Step
    from dasgd.worker.worker import AlgorithmEffectError

    class Finisher(DASGD):
        last: list = []

        def on_complete(self):  # noqa: ANN201
            return self.last

    w = make(0, 2, algorithm=Finisher())
    w.algorithm.last = [Step(vec(1, 1, 1), 1.0)]
    w.finish()
    w.receive([final(1, 0)])
    assert w.complete and torch.equal(w.params, vec(*X0) - 1.0)
    w = make(0, 2, algorithm=Finisher())
    w.algorithm.last = [ShareModel((1,), 0, 0)]
    w.finish()
    w.receive([final(1, 0)])
    with pytest.raises(AlgorithmEffectError, match="may only change the replica"):
        _ = w.complete


# -- _AllBut ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "skip"), [(1, 0), (2, 1), (4, 0), (4, 2), (4, 3), (6, 5), (7, 3)])
def test_all_but_is_the_ranks_without_one(n, skip):
    ref = [r for r in range(n) if r != skip]
    view = _AllBut(n, skip)
    assert len(view) == len(ref)
    assert list(view) == ref
    assert [view[i] for i in range(len(ref))] == ref
    assert [view[-k] for k in range(1, len(ref) + 1)] == [ref[-k] for k in range(1, len(ref) + 1)]
    for s in (slice(None), slice(1, 3), slice(None, None, -1), slice(-2, None), slice(0, None, 2)):
        assert view[s] == ref[s]
    with pytest.raises(IndexError) as e:
        view[len(ref)]
    assert e.value.args == (len(ref),)
    with pytest.raises(IndexError):
        view[-len(ref) - 1]
    assert list(reversed(view)) == ref[::-1]
    assert (skip in view) is False


# -- the audit trail -----------------------------------------------------------------------------------
def test_start_audit_is_refused_once_the_replica_holds_a_gradient(tmp_path):
    w = make(0, 3)
    w.commit(own_gradient(w, [1, 1, 1]))
    with pytest.raises(RuntimeError) as e:
        w.start_audit(tmp_path)
    assert message_error(e) == "start the audit before the first gradient, so it sees the whole history"
    w2 = make(0, 3)
    w2.receive([grad(1, 0, 1)])  # computed nothing, holds a remote gradient
    with pytest.raises(RuntimeError):
        w2.start_audit(tmp_path)
    assert w2.audit is None


def test_save_audit_without_start_is_refused():
    with pytest.raises(RuntimeError) as e:
        make(0, 3).save_audit()
    assert message_error(e) == "no audit was started on this worker; call start_audit() first"


def test_the_audit_records_own_and_remote_gradients_the_setup_and_the_final_replica(tmp_path):
    params = AlgorithmParams(seed=7, local_steps=3, staleness_bound=5, cap_scale=0.25)
    w = make(0, 3, algorithm=DASGD(params))
    trail = w.start_audit(tmp_path)
    assert w.audit is trail
    w.commit(own_gradient(w, [1, 2, 3]))
    w.receive([grad(1, 0, 2, payload=vec(4, 4, 4), clock=np.array([1, 1, 0])), grad(2, 0, 1)])
    w.commit(own_gradient(w, [0, 0, 8]))
    w.finish()
    w.declare_dead(2)
    w.save_audit()
    audit = load_audit(tmp_path, 0)
    assert audit["history"] == [
        ["own", 0],
        ["gradient", 1, 0, 2, [1, 0, 0], [1, 1, 0]],
        ["gradient", 2, 0, 1, [1, 2, 0], None],
        ["own", 1],
    ]
    assert audit["computed"] == 2
    assert audit["meta"] == {
        "algorithm": "dasgd",
        "world_size": 3,
        "lr": LR,
        "grads_per_message": 1,
        "dead": [2],
        "seed": 7,
        "local_steps": 3,
        "staleness_bound": 5,
        "cap_scale": 0.25,
    }
    assert audit["grads"].tolist() == [[1, 2, 3], [0, 0, 8]]
    assert audit["x0"].tolist() == X0
    expected = expected_params(vec(1, 2, 3), vec(4, 4, 4), vec(3, 3, 3), vec(0, 0, 8))
    assert audit["params"].tolist() == expected.tolist() == w.params.tolist()


def test_the_audit_of_a_bundle_records_each_part_with_the_clock_held_before_it(tmp_path):
    w = make(2, 4)
    w.start_audit(tmp_path)
    b, calls = bundle_of([grad(3, 0, 1), grad(0, 0, 2), grad(3, 1, 2)])
    w.receive([b])
    assert calls == []
    assert w.audit.history == [
        ["gradient", 3, 0, 1, [0, 0, 0, 0], None],
        ["gradient", 0, 0, 2, [0, 0, 0, 0], None],
        ["gradient", 3, 1, 2, [0, 0, 0, 0], None],
    ]


def test_the_audit_records_models_used_or_not_and_models_sent(tmp_path):
    w = make(0, 3, algorithm=GossipAveraging())
    w.start_audit(tmp_path)
    out = w.commit(own_gradient(w, [1, 1, 1]))  # opens an exchange: a request to one partner
    assert len(out) == 1 and out[0][1].kind == Kind.MODEL
    partner = out[0][0]
    other = 3 - partner
    w.receive([model(other, 0, vec(1, 1, 1))])  # a request: answered with the replica before merging
    w.receive([model(other, 1, vec(1, 1, 1))])  # a reply from a worker we did not ask: not used
    w.receive([model(partner, 1, vec(1, 1, 1))])  # the partner's reply: used
    assert w.rejected == {"unexpected_model": 1}
    assert w.audit.history == [
        ["own", 0],
        ["sent", partner, 1],
        ["sent", other, 1],
        ["model", other, 0, True],
        ["model", other, 1, False],
        ["model", partner, 1, True],
    ]


def test_the_audit_records_models_a_server_sends_back_for_gradients(tmp_path):
    server = make(0, 3, algorithm=ParameterServerASGD())
    server.start_audit(tmp_path)
    out = server.receive([grad(1, 0, 1, clock=np.array([0, 0, 0])), grad(2, 0, 1)])
    assert [(p, m.kind, m.lo) for p, m in out] == [(1, Kind.MODEL, 1), (2, Kind.MODEL, 1)]
    assert server.audit.history == [
        ["gradient", 1, 0, 1, [0, 0, 0], [0, 0, 0]],
        ["sent", 1, 1],
        ["gradient", 2, 0, 1, [0, 1, 0], None],
        ["sent", 2, 2],
    ]
