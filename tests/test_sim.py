"""The simulator: deterministic, drives the real Worker objects, batched gradients change nothing."""

from __future__ import annotations

import dataclasses
import io
import math
import resource
from pathlib import Path

import numpy as np
import pytest
import torch

from dasgd.algorithms import DASGD
from dasgd.algorithms.effects import Step
from dasgd.experiments.spec import resolve_spec
from dasgd.metrics.eventlog import read_event_log
from dasgd.metrics.plots import run_figures
from dasgd.runs.build import build_sampler, build_task, build_worker, resolve
from dasgd.runs.results import render_run_dir
from dasgd.runs.simulate import build_simulation, compute_model, network_model, simulate
from dasgd.sim.engine import Simulation, StopPolicy
from dasgd.sim.events import EventKind, EventQueue
from dasgd.sim.models import ComputeModel, FailurePlan, LinkModel, NetworkModel
from dasgd.worker.worker import Worker


def quad_spec(**kw):
    base = dict(task="quadratic", workers=6, max_gradients=300, dim=10, noise=0.5, seed=3)
    base.update(kw)
    return resolve_spec({}, simulate=True, **base)


def run_engine(spec, batched=False):
    engine, _, _ = build_simulation(
        dataclasses.replace(spec, simulation=dataclasses.replace(spec.simulation, batched=batched))
    )
    return engine, engine.run()


def test_event_queue_breaks_ties_by_scheduling_order():
    q = EventQueue()
    for w in (3, 1, 2):
        q.push(1.0, EventKind.WAKE, w)
    q.push(0.5, EventKind.WAKE, 9)
    assert [q.pop()[2] for _ in range(4)] == [9, 3, 1, 2]


def test_same_spec_and_seed_give_a_byte_identical_event_log(tmp_path):
    spec = quad_spec(
        simulation={"compute": "lognormal", "latency_sigma": 0.5, "straggler_share": 0.3, "slowdown": 4}
    )
    simulate(spec, tmp_path / "a")
    simulate(spec, tmp_path / "b")
    a = (tmp_path / "a" / "events.jsonl").read_bytes()
    assert a == (tmp_path / "b" / "events.jsonl").read_bytes()
    other = quad_spec(seed=4, simulation={"compute": "lognormal", "latency_sigma": 0.5})
    simulate(other, tmp_path / "c")
    assert a != (tmp_path / "c" / "events.jsonl").read_bytes()


def test_simulated_run_is_exactly_once_and_drains_to_agreeing_replicas(tmp_path):
    s = simulate(quad_spec(topology="ring", simulation={"latency": 0.003, "bandwidth": 5e3}), tmp_path / "r")
    assert s["time_unit"] == "virtual"
    assert s["gradients_lost"] == 0 and s["exactly_once"] and s["replicas_agree"] and s["drained"]
    assert s["gradients_applied"] == [s["gradients_computed"]] * 6
    # A slow link (5e3 B/s: 27 ms for a 136-byte message) is busy longer than a 10 ms step: coalescing.
    assert sum(w["coalesced"] for w in s["per_worker"]) > 0
    for name in ("events.jsonl", "metrics.csv", "summary.json", "report.md", "plots/staleness.png"):
        assert (tmp_path / "r" / name).exists()
    # The staleness figure is the one drawn from this run's own event log (tests/test_metrics.py checks what
    # such a figure shows).
    figure = run_figures(
        read_event_log(tmp_path / "r" / "events.jsonl"),
        time_label="virtual time (s)",
        title="dasgd on quadratic, 6 workers",
    )["staleness.png"]
    png = io.BytesIO()
    figure.savefig(png, format="png")
    assert (tmp_path / "r" / "plots" / "staleness.png").read_bytes() == png.getvalue()


def test_batched_and_one_by_one_gradients_give_the_same_run():
    spec = resolve_spec({}, simulate=True, task="digits-logreg", workers=5, max_gradients=200, seed=1)
    e1, o1 = run_engine(spec, batched=False)
    e2, o2 = run_engine(spec, batched=True)
    for x, y in zip(o1.records.arrays(), o2.records.arrays()):
        assert np.array_equal(x, y)  # same schedule, same clocks
    for w in range(5):
        torch.testing.assert_close(e1.workers[w].params, e2.workers[w].params, rtol=1e-4, atol=1e-5)


def run_plugin(algorithm: type, policy: StopPolicy, workers: int = 3):
    """Simulate ``workers`` quadratic workers, each running a fresh ``algorithm()`` plug-in, under ``policy``."""
    spec = quad_spec(workers=workers, max_gradients=60)
    task = build_task(spec)
    resolved = resolve(spec)
    samplers = [build_sampler(spec, r, task, resolved) for r in range(workers)]
    built = []
    for r in range(workers):
        w = build_worker(spec, r, task, resolved, send_clock=False, sampler=samplers[r])
        w.algorithm = algorithm()
        w.algorithm.bind(w)
        built.append(w)
    sim = Simulation(
        built, samplers, task, compute_model(spec), network_model(spec), FailurePlan(), policy, seed=0
    )
    return built, sim.run()


def test_the_simulator_drives_whatever_algorithm_the_worker_was_given():
    """No copy of the algorithm inside the simulator: a plug-in defined here runs unchanged."""
    calls = {"local": 0, "remote": 0}

    class HalfStepRemote(DASGD):
        name = "half-remote"
        faithful = False
        commutes = False  # its remote step is not plain SGD's, so the Worker must not sum arrivals for it

        def on_own(self, gradient, index):
            calls["local"] += 1
            return super().on_own(gradient, index)

        def on_gradient(self, msg):
            calls["remote"] += 1
            return [Step(msg.payload, self.worker.lr / 2)]

    workers, _ = run_plugin(HalfStepRemote, StopPolicy(max_gradients=60))
    assert calls["local"] == sum(w.computed for w in workers)
    assert calls["remote"] > 0
    assert isinstance(workers[0], Worker)


def test_a_straggler_computes_proportionally_less():
    spec = quad_spec(
        workers=4,
        max_seconds=2.0,
        max_gradients=None,
        stragglers=["2x4"],
        simulation={"compute_time": 0.01, "latency": 0.0},
    )
    engine, out = run_engine(spec)
    computed = [w.computed for w in engine.workers]
    fast = np.mean([computed[r] for r in (0, 1, 3)])
    assert math.isclose(computed[2] * 4, fast, rel_tol=0.05)
    assert all(out.drained)


def test_a_crash_is_survived_and_its_undelivered_gradients_are_reported(tmp_path):
    spec = quad_spec(
        workers=4, max_seconds=1.0, max_gradients=None, simulation={"crashes": ["1@0.5"], "latency": 0.02}
    )
    s = simulate(spec, tmp_path / "c")
    assert s["dead_workers"] == [1]
    assert s["drained"]
    assert s["simulation"]["crashed_workers"] == [1]
    assert all(w["computed"] > 60 for w in s["per_worker"])  # survivors trained to the end of the budget
    # As in a real run, whose workers stream their records, the dead worker's records stay in the log and
    # the staleness, and its computed count is exact.
    log = read_event_log(tmp_path / "c" / "events.jsonl")
    crashed = int((log.origin == 1).sum())
    assert crashed > 10 and set(log.index[log.origin == 1].tolist()) == set(range(crashed))
    assert log.num_gradients == s["staleness"]["count"] == s["gradients_computed"]
    assert s["gradients_computed"] == sum(w["computed"] for w in s["per_worker"]) + crashed
    assert log.staleness().to_dict() == s["staleness"]


def test_progress_reports_the_run_then_the_writing_phase(tmp_path):
    seen = []
    simulate(quad_spec(workers=3, max_gradients=6000), tmp_path / "p", on_progress=seen.append)
    assert any("computed" in p for p in seen[:-1])  # the engine's progress while it runs
    s = read_event_log(tmp_path / "p" / "events.jsonl", clocks=False)
    assert seen[-1] == {
        "phase": "summarising and writing the run directory",
        "computed": s.num_gradients,
        "time": pytest.approx(max(r["time"] for r in s.runs)),
    }


def test_the_quadratic_default_stepsize_converges_with_many_workers(tmp_path):
    """The sequential default 0.5 diverged from 4 workers on (16 reached a loss of 10^110)."""
    spec = resolve_spec({}, simulate=True, task="quadratic", workers=16, max_gradients=800, seed=1)
    s = simulate(spec, tmp_path / "q")
    start = read_event_log(tmp_path / "q" / "events.jsonl", clocks=False).evals[0]["loss"]
    assert s["lr"] == pytest.approx(0.5 / 16)
    assert s["final_metrics"]["loss"] < 0.1 * start


def test_a_run_rendered_from_memory_equals_one_rendered_from_its_event_log(tmp_path):
    """simulate() renders from the records it holds; `dasgd report` re-renders from events.jsonl."""
    spec = quad_spec(workers=5, max_gradients=300, simulation={"latency": 0.004, "compute": "lognormal"})
    run = tmp_path / "r"
    s = simulate(spec, run)
    first = {name: (run / name).read_text() for name in ("report.md", "metrics.csv")}
    render_run_dir(run)
    assert {name: (run / name).read_text() for name in first} == first
    assert read_event_log(run / "events.jsonl").staleness().to_dict() == s["staleness"]


def test_link_outage_delays_but_loses_nothing_and_loss_with_retransmission_loses_nothing(tmp_path):
    down = simulate(quad_spec(simulation={"link_down": ["0-1@0.1-0.6"]}), tmp_path / "d")
    lossy = simulate(quad_spec(simulation={"loss": 0.2}), tmp_path / "l")
    for s in (down, lossy):
        assert s["gradients_lost"] == 0 and s["replicas_agree"]
    assert lossy["simulation"]["retransmissions"] > 0
    base = simulate(quad_spec(), tmp_path / "b")
    assert down["staleness"]["s_max"] > base["staleness"]["s_max"]


def test_counted_loss_is_reported_as_lost_gradients(tmp_path):
    s = simulate(
        quad_spec(drain_timeout=1.0, simulation={"loss": 0.05, "loss_mode": "count"}), tmp_path / "x"
    )
    assert s["simulation"]["messages_lost"] > 0
    assert s["gradients_lost"] > 0
    assert not s["replicas_agree"]


def test_network_model_transfer_and_latency():
    link = LinkModel(latency=0.01, bandwidth=1000.0)
    assert link.transfer(500) == 0.5
    assert link.delay(np.random.default_rng(0)) == 0.01
    model = NetworkModel(link, {(0, 1): LinkModel(latency=0.5)})
    assert model.link(0, 1).latency == 0.5 and model.link(1, 0).latency == 0.01
    lognormal = ComputeModel("lognormal", mean=0.02, sigma=0.7)
    rng = np.random.default_rng(0)
    draws = [lognormal.duration(0, i, rng) for i in range(20000)]
    assert abs(np.mean(draws) - 0.02) < 0.001  # the mean, not the median, is the parameter


def test_trace_compute_model_replays_a_real_runs_step_times(tmp_path):
    from dasgd.sim.models import read_step_trace

    events = tmp_path / "events.jsonl"
    events.write_text(
        '{"type": "gradient", "origin": 0, "index": 0, "start": 0.0, "end": 0.5, "clock": [0, 0]}\n'
        '{"type": "gradient", "origin": 1, "index": 0, "start": 0.0, "end": 0.25, "clock": [0, 0]}\n'
        '{"type": "gradient", "origin": 0, "index": 1, "start": 0.5, "end": 0.6, "clock": [1, 0]}\n'
    )
    traces = read_step_trace(events)
    assert traces == ((0.5, 0.09999999999999998), (0.25,))
    model = ComputeModel("trace", traces=traces)
    rng = np.random.default_rng(0)
    assert [model.duration(0, i, rng) for i in range(3)] == [0.5, 0.09999999999999998, 0.5]


@pytest.mark.parametrize(
    "bad",
    [{"loss": 1.5}, {"compute": "weird"}, {"crashes": ["9@1"]}, {"bogus": 1}, {"link_down": ["0-1@3-2"]}],
)
def test_bad_simulation_values_name_their_key(bad):
    from dasgd.experiments.spec import SpecError

    with pytest.raises(SpecError):
        quad_spec(simulation=bad)


def test_path_of_run_dir_is_written(tmp_path: Path):
    # ru_maxrss (KiB on Linux) only grows: the peak the run reports, in MiB, lies between this process's
    # peak before the run and after it.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s = simulate(quad_spec(workers=2, max_gradients=20), tmp_path / "tiny")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert (tmp_path / "tiny" / "spec.yaml").read_text().count("simulation") == 1
    assert before <= s["simulation"]["peak_memory_mb"] <= after


def test_broadcast_log_delivers_exactly_what_per_peer_sends_deliver(monkeypatch):
    """The broadcast log is an implementation detail: same schedule, same clocks, same parameters."""
    from dasgd.sim.network import SimNetwork

    spec = quad_spec(workers=5, max_gradients=200, simulation={"crashes": ["4@0.05"]})
    e1, o1 = run_engine(spec)
    assert e1.net._log_base + len(e1.net._log_entry) > 100  # the broadcast path was taken
    monkeypatch.setattr(SimNetwork, "broadcast", lambda self, src, msg: False)
    e2, o2 = run_engine(spec)
    for x, y in zip(o1.records.arrays(), o2.records.arrays()):
        assert np.array_equal(x, y)
    for w in range(4):
        assert torch.equal(e1.workers[w].params, e2.workers[w].params)
        assert e1.net.stats[w].to_dict() == e2.net.stats[w].to_dict()


def test_bundled_arrivals_give_the_same_run_as_one_message_at_a_time(monkeypatch):
    """Arrivals summed into one bundle per poll (batched mode, DASGD) change nothing but rounding."""
    import dasgd.worker.worker as worker_module

    seen = {"bundles": 0, "parts": 0, "finals": 0}
    real = worker_module.Worker._receive_bundle

    def counting(self, bundle):
        seen["bundles"] += 1
        seen["parts"] += len(bundle.origin)
        seen["finals"] += len(bundle.final_origin)
        return real(self, bundle)

    monkeypatch.setattr(worker_module.Worker, "_receive_bundle", counting)
    spec = quad_spec(workers=12, max_gradients=600, simulation={"latency": 0.004})
    e1, o1 = run_engine(spec, batched=False)
    assert seen["bundles"] == 0
    e2, o2 = run_engine(spec, batched=True)
    assert seen["bundles"] > 50 and seen["parts"] > 5 * seen["bundles"] and seen["finals"] > 0
    assert all(o2.drained) and o1.drain_end == o2.drain_end  # the lazy drain ends exactly when it should
    for x, y in zip(o1.records.arrays(), o2.records.arrays()):
        assert np.array_equal(x, y)
    for w in range(12):
        assert np.array_equal(e1.workers[w].clock, e2.workers[w].clock)
        torch.testing.assert_close(e1.workers[w].params, e2.workers[w].params, rtol=1e-9, atol=1e-10)


def test_a_bundle_that_fails_a_check_goes_one_message_at_a_time():
    from dasgd.core.message import Kind, Message
    from dasgd.sim.bundles import GradientBundle

    spec = quad_spec(workers=3)
    task, resolved = build_task(spec), resolve(spec)
    w = build_worker(spec, 0, task, resolved)
    g = torch.ones_like(w.params)
    parts = [Message(Kind.GRADIENT, 1, 1, 0, 1, g), Message(Kind.GRADIENT, 2, 2, 0, 1, g)]
    before = w.params.clone()

    def bundle(msgs):
        return GradientBundle(
            np.array([m.origin for m in msgs]),
            np.array([m.lo for m in msgs]),
            np.array([m.hi for m in msgs]),
            sum(m.payload for m in msgs),
            np.array([], dtype=np.int64),
            np.array([], dtype=np.int64),
            False,
            lambda: list(msgs),
        )

    w.receive([bundle(parts)])
    assert w.clock.tolist() == [0, 1, 1]
    torch.testing.assert_close(w.params, before - 2 * w.lr * g)
    # Again: both are duplicates now; the one-by-one path rejects and counts them, nothing is applied.
    w.receive([bundle(parts)])
    assert w.rejected["duplicate"] == 2
    torch.testing.assert_close(w.params, before - 2 * w.lr * g)


@pytest.mark.parametrize("algorithm", ["sync", "local-sgd", "ps-asgd"])
def test_a_crash_does_not_stall_the_algorithms_that_wait_on_peers(tmp_path, algorithm):
    """A barrier (sync, local-sgd) or a client waiting for the server's reply (ps-asgd) notices the death when
    the dead worker's links close, as in a real run, and goes on over the live workers; before, the survivors
    waited forever while evaluations kept coming (the run never ended)."""
    spec = quad_spec(
        workers=4, algorithm=algorithm, max_gradients=400, simulation={"crashes": ["2@0.05"], "latency": 0.01}
    )
    s = simulate(spec, tmp_path / "c")
    assert s["dead_workers"] == [2]
    assert s["drained"]
    reasons = set(s["stop_reason"].split(","))
    assert "max_gradients" in reasons and reasons <= {"max_gradients", "stop_requested"}, reasons
    computing = [w for w in s["per_worker"] if w["rank"] != 0] if algorithm == "ps-asgd" else s["per_worker"]
    assert all(w["computed"] > 50 for w in computing)  # the survivors trained past the crash


def test_a_dead_parameter_server_stops_its_clients_and_says_why(tmp_path):
    spec = quad_spec(
        workers=4, algorithm="ps-asgd", max_gradients=400, simulation={"crashes": ["0@0.05"], "latency": 0.01}
    )
    s = simulate(spec, tmp_path / "c")
    assert s["dead_workers"] == [0]
    assert s["stop_reason"] == "server_died"
    assert s["drained"]
    assert s["gradients_computed"] < 100


def test_the_lowest_live_rank_takes_over_evaluation_and_the_accuracy_stop(tmp_path):
    """Worker 0 dies; worker 1 evaluates from then on, so a run whose only stop rule is the target stops."""
    spec = quad_spec(
        workers=4,
        max_gradients=None,
        target_loss=None,
        eval_every=0.05,
        simulation={"crashes": ["0@0.05"], "latency": 0.01},
    )
    engine, out = run_engine(dataclasses.replace(spec, max_seconds=3.0))
    evaluators = [int(ev["worker"]) for ev in out.evals]
    assert evaluators[0] == 0 and evaluators[-1] == 1 and sorted(set(evaluators)) == [0, 1]
    assert evaluators == sorted(evaluators)  # once worker 1 took over, worker 0 never comes back
    assert [ev["time"] for ev in out.evals] == sorted(ev["time"] for ev in out.evals)


def test_a_run_whose_workers_wait_on_each_other_forever_stops_as_stalled():
    """An algorithm that never lets its workers compute again: in virtual time nothing more would ever happen
    but evaluations; the engine stops the waiting workers with reason "stalled" instead of looping forever."""

    class WaitsForever(DASGD):
        name = "waits-forever"
        faithful = False

        def ready(self):
            return self.worker.computed < 3

    workers, out = run_plugin(WaitsForever, StopPolicy(max_gradients=60, eval_every=0.01))
    assert out.stop_reason == ["stalled"] * 3
    assert all(out.drained)
    assert [w.computed for w in workers] == [3, 3, 3]


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("t.jsonl", b"\xff\xfe\x00binary", "is not UTF-8 text"),
        ("t.jsonl", b'{"type": "gradient", "origin": 0}\n', "without a valid origin"),
        (
            "t.jsonl",
            b'{"type": "gradient", "origin": "x", "index": 0, "start": 0, "end": 1, "clock": [0]}\n',
            "without a valid origin",
        ),
        (
            "t.jsonl",
            b'{"type": "gradient", "origin": 0, "index": 0, "start": 0, "end": 1, "clock": 5}\n',
            "without a valid origin",
        ),
        ("t.txt", b"0.1\nnan\n", "not a finite number"),
        ("t.txt", b"0.1\ninf\n", "not a finite number"),
    ],
)
def test_a_bad_trace_file_is_refused_by_name(tmp_path, name, content, words):
    from dasgd.sim.models import ModelError, read_step_trace

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ModelError, match=words):
        read_step_trace(path)
    with pytest.raises(ModelError, match="not a regular file"):
        read_step_trace(tmp_path)
