"""The worker protocol (worker/protocol.py) on its own, and the real-time driver under a fake clock."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from dasgd.algorithms import DASGD, SynchronousSGD
from dasgd.core.ledger import StalenessLedger
from dasgd.core.topology import complete
from dasgd.runtime.loop import WorkerLoop, send_all
from dasgd.tasks import make_task
from dasgd.transport.inproc import InProcessNetwork
from dasgd.worker.protocol import Compute, Finished, Phase, ProtocolError, StopPolicy, Wait, WorkerProtocol
from dasgd.worker.worker import Worker

TASK = make_task("quadratic", dim=6, noise=1.0, condition=10.0, seed=3)


def workers(n: int, algorithm=DASGD) -> list[Worker]:  # noqa: ANN001
    out = []
    for r in range(n):
        sampler = TASK.sampler(100 + r, 4)
        out.append(
            Worker(
                r,
                n,
                TASK.build_model(0),
                complete(n),
                algorithm(),
                0.1,
                lambda m, s=sampler: TASK.loss(m, s.next()),
            )
        )
    return out


def test_a_worker_trains_stops_on_its_budget_and_drains():
    w0, w1 = workers(2)
    p0 = WorkerProtocol(w0, StopPolicy(max_gradients=3), StalenessLedger(2))
    p1 = WorkerProtocol(w1, StopPolicy(max_gradients=3), StalenessLedger(2))
    sent0: list = []
    for t in range(3):
        out, action = p0.step(float(t), [])
        assert action == Compute() and p0.phase is Phase.TRAINING
        sent0 += p0.gradient_done(w0.compute(), float(t), t + 0.5)
    out, action = p0.step(3.0, [])  # the replica holds 3 gradients: the budget is spent
    assert p0.phase is Phase.DRAINING and p0.stop_reason == "max_gradients" and p0.train_end == 3.0
    assert isinstance(action, Wait) and action.until == 3.0 + p0.policy.drain_timeout
    kinds = [m.kind.name for _, m in out]
    assert kinds == ["STOP", "FINAL"]  # everyone is told to stop, then the final count
    # Worker 1 gets everything, stops on the peer's request (no STOP echoed), and drains.
    out1, action1 = p1.step(3.5, [m for _, m in sent0 + out])
    assert p1.stop_reason == "stop_requested" and [m.kind.name for _, m in out1] == ["FINAL"]
    # Worker 0 is owed worker 1's final count (0 gradients) before it is done.
    _, action = p0.drain(4.0, [], ())
    assert isinstance(action, Wait) and p0.phase is Phase.DRAINING
    _, action = p0.drain(4.5, [m for _, m in out1], ())
    assert action == Finished(True) and p0.phase is Phase.DONE and p0.drained and p0.drain_end == 4.5
    assert p0.ledger.stats().count == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_own_gradient_is_not_applied_or_sent_and_stops_every_worker_as_diverged(bad):
    import torch

    from dasgd.worker.worker import Gradient

    w0, w1 = workers(2)
    ledger = StalenessLedger(2)
    p0 = WorkerProtocol(w0, StopPolicy(max_gradients=100), ledger)
    p1 = WorkerProtocol(w1, StopPolicy(max_gradients=100))
    p0.step(0.0, [])
    before = w0.params.clone()
    g = w0.compute()
    poisoned = Gradient(torch.where(torch.arange(g.grad.numel()) == 2, bad, g.grad), g.clock, g.loss)
    assert p0.gradient_done(poisoned, 0.0, 0.5) == []
    assert torch.equal(w0.params, before) and w0.computed == 0 and ledger.arrays()[0].size == 0
    out, action = p0.step(1.0, [])
    assert p0.stop_reason == "diverged" and isinstance(action, Wait)
    assert [m.kind.name for _, m in out] == ["STOP", "FINAL"] and out[1][1].hi == 0
    p1.step(1.5, [m for _, m in out])
    assert p1.stop_reason == "stop_requested"


def test_a_dead_peer_ends_the_wait_for_its_final_count():
    w0, _ = workers(2)
    p0 = WorkerProtocol(w0, StopPolicy(max_gradients=0))
    p0.step(0.0, [])
    _, action = p0.drain(1.0, [], ())
    assert isinstance(action, Wait)  # worker 1's final count never comes...
    _, action = p0.drain(2.0, [], {1})  # ...until its driver sees it die
    assert action == Finished(True)


def test_an_algorithm_that_waits_on_peers_makes_the_protocol_wait_until_the_time_budget():
    w0, _ = workers(2, SynchronousSGD)
    p0 = WorkerProtocol(w0, StopPolicy(max_seconds=10.0), start=5.0)
    p0.step(5.0, [])
    p0.gradient_done(w0.compute(), 5.0, 5.1)
    _, action = p0.step(5.2, [])  # step 0 needs worker 1's gradient first
    assert p0.phase is Phase.WAITING and action == Wait(15.0)
    _, action = p0.step(15.0, [])
    assert p0.stop_reason == "max_seconds"


def test_calls_that_do_not_fit_the_phase_are_refused_with_the_phase_named():
    w0, _ = workers(2)
    p0 = WorkerProtocol(w0, StopPolicy())
    with pytest.raises(ProtocolError, match="worker 0 is training; this step needs draining"):
        p0.drain(0.0, [], ())
    with pytest.raises(ProtocolError, match="worker 0 is training; this step needs draining"):
        p0.give_up(0.0)
    p0.stop(1.0, "finished", tell_peers=False)
    with pytest.raises(ProtocolError, match="worker 0 is draining; this step needs training or waiting"):
        p0.step(2.0, [])
    with pytest.raises(ProtocolError, match="worker 0 is draining; this step needs training"):
        p0.gradient_done(None, 0.0, 1.0)  # type: ignore[arg-type]
    assert p0.give_up(3.0) == Finished(False) and p0.phase is Phase.DONE and not p0.drained


def test_evaluations_are_due_every_eval_every_after_the_last_one_ended():
    w0, _ = workers(2)
    p0 = WorkerProtocol(w0, StopPolicy(eval_every=2.0, target_accuracy=0.5), start=1.0)
    assert p0.evaluation_due(1.0) and not p0.evaluation_due(0.5)
    p0.evaluated(1.0, {"test_accuracy": 0.2}, finished=1.5)
    assert not p0.evaluation_due(3.4) and p0.evaluation_due(3.5)
    assert p0.evals == [{"worker": 0, "time": 1.0, "gradients": 0, "test_accuracy": 0.2}]
    p0.evaluated(3.5, {"test_accuracy": 0.6})
    p0.step(3.6, [])
    assert p0.stop_reason == "target_accuracy"  # the stop rule sees the last evaluation


class FakeClock:
    """Time that moves only when read (a tick per read) or slept: no wall-clock wait anywhere."""

    def __init__(self, tick: float) -> None:
        self.t = 0.0
        self.tick = tick
        self.slept = 0.0

    def now(self) -> float:
        self.t += self.tick
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.t += seconds


def test_the_real_time_driver_runs_the_protocol_under_a_fake_clock_and_an_in_process_transport():
    """Two WorkerLoops in threads over an in-process network, each on its own fake clock: a straggler's
    emulated slowness, the time budget and the evaluation cadence all live in fake time."""
    n = 2
    ws = workers(n)
    net = InProcessNetwork(n)
    clocks = [FakeClock(0.001) for _ in range(n)]
    ledgers = [StalenessLedger(n) for _ in range(n)]
    policy = StopPolicy(max_seconds=2.0, eval_every=0.25, accuracy_metric=None)
    loops = [
        WorkerLoop(
            ws[r],
            net.endpoint(r),
            clocks[r],
            ledgers[r],
            policy,
            evaluator=(lambda: TASK.evaluate(ws[0].model)) if r == 0 else None,
            slowdown=5.0 if r == 1 else 1.0,
        )
        for r in range(n)
    ]
    results: dict[int, object] = {}
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, loops[r].run())) for r in range(n)]
    wall = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    # 2 fake seconds with a straggler sleeping 4x each compute: no real sleep happened.
    assert time.monotonic() - wall < 30 and clocks[1].slept > 0
    for r in range(n):
        assert results[r].drained, r
        assert results[r].stop_reason in ("max_seconds", "stop_requested")
    assert {results[0].stop_reason, results[1].stop_reason} & {"max_seconds"}
    assert ws[0].clock.tolist() == ws[1].clock.tolist() == [ws[0].computed, ws[1].computed]
    np.testing.assert_allclose(ws[0].params.numpy(), ws[1].params.numpy(), rtol=0, atol=1e-12)
    # The straggler's records, in fake time: its compute spans one tick (two clock reads), the emulation
    # sleeps (5 - 1) x that, and reading the clock after the sleep is one more tick: 6 ticks per gradient.
    _, _, start, end, _ = ledgers[1].arrays()
    assert len(end) > 10 and np.allclose(end - start, 6 * 0.001, atol=1e-9)
    assert clocks[1].slept == pytest.approx(len(end) * 4 * 0.001)
    # Evaluations every 0.25 fake seconds after the previous one ended, until worker 0 stops (the
    # straggler, whose sleeps move its clock fastest, spends the budget first and asks everyone to stop).
    times = [e["time"] for e in results[0].evals]
    # How many fit before the stop depends on thread scheduling; the cadence does not.
    assert times[0] < 0.01 and all(b - a >= 0.25 for a, b in zip(times, times[1:], strict=False))
    send_all(net.endpoint(0), [])  # the transport is still usable: nothing was closed under the loops
