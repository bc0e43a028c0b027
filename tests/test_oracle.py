"""The independent oracle (tests/oracle.py) on in-process runs: it passes honest replicas and catches each
kind of defect it exists for. Real processes use it in test_algorithms.py and test_multiprocess.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from oracle import check_audits, check_folder

from dasgd.algorithms import ALGORITHMS
from dasgd.algorithms.effects import AverageModel, MergeClock, Step
from dasgd.core.message import Kind, Message
from dasgd.experiments.spec import resolve_spec
from dasgd.runs.build import build_task, build_worker, resolve
from dasgd.runtime.loop import send_all
from dasgd.transport.inproc import InProcessNetwork
from dasgd.worker.worker import Worker

SUITE = [
    ("dasgd", {}),
    ("dasgd", {"grads_per_message": 3}),
    ("sync", {}),
    ("ps-asgd", {}),
    ("local-sgd", {"local_steps": 3}),
    ("gossip", {}),
    ("dasgd-cap", {"staleness_bound": 2}),
    ("dasgd-cap", {"staleness_bound": 2, "cap_scale": 0.5}),
    ("dasgd-damped", {"staleness_bound": 2}),
]


def run_in_process(folder: Path, name: str, n: int = 3, steps: int = 40, seed: int = 0, **kw) -> list[Worker]:
    """An asynchronous schedule: at random, a worker computes (when its algorithm lets it) or takes what
    has arrived; then every worker finishes and drains. Each replica keeps an audit trail in ``folder``."""
    spec = resolve_spec({}, task="digits-logreg", workers=n, algorithm=name, seed=5, **kw)
    task, resolved = build_task(spec), resolve(spec)
    workers = [build_worker(spec, r, task, resolved) for r in range(n)]
    for w in workers:
        w.start_audit(folder)
    net = InProcessNetwork(n, coalesce=ALGORITHMS[name].coalesce_gradients)
    ends = [net.endpoint(r) for r in range(n)]
    rng = np.random.default_rng(seed)
    while sum(w.computed for w in workers) < steps:
        r = int(rng.integers(n))
        w = workers[r]
        if rng.random() < 0.6 and w.computes and w.ready:
            send_all(ends[r], w.commit(w.compute()))
        else:
            send_all(ends[r], w.receive(ends[r].poll()))
    for w, t in zip(workers, ends, strict=True):
        send_all(t, w.finish())
    for _ in range(20):
        for w, t in zip(workers, ends, strict=True):
            send_all(t, w.receive(t.poll()))
        if all(w.complete for w in workers):
            break
    assert all(w.complete for w in workers)
    for w in workers:
        w.save_audit()
    return workers


@pytest.mark.parametrize(
    ("name", "extra"), SUITE, ids=[f"{n}{'-' if e else ''}{'-'.join(map(str, e.values()))}" for n, e in SUITE]
)
def test_the_oracle_passes_honest_replicas_of_every_algorithm(tmp_path, name, extra):
    workers = run_in_process(tmp_path, name, **extra)
    report = check_folder(tmp_path, len(workers))
    assert report.errors == [], report
    assert report.live == [0, 1, 2] and report.dead == []
    assert max(report.param_error.values()) <= report.tolerance


def test_the_schedule_makes_staleness_so_the_weighted_rules_are_exercised(tmp_path):
    workers = run_in_process(tmp_path, "dasgd-cap", staleness_bound=2)
    # Without stale messages the cap and damping rules would never be tested: some must have been capped.
    assert sum(w.algorithm.counts.get("capped", 0) for w in workers) > 0


def _load(folder: Path, n: int) -> tuple[dict, dict]:
    from dasgd.worker.audit import load_audit

    audits = {r: load_audit(folder, r) for r in range(n)}
    return audits, {r: a["grads"] for r, a in audits.items()}


def test_a_partially_overlapping_range_accepted_by_a_broken_worker_is_caught(tmp_path, monkeypatch):
    """The bug class the oracle is for: ids [0, 2) held, [1, 4) accepted, so id 1 lands twice."""
    # The broken rule: only a range entirely held counts as a duplicate.
    monkeypatch.setattr(Worker, "_holds_any", lambda self, origin, lo, hi: hi <= self.clock[origin])
    spec = resolve_spec({}, task="digits-logreg", workers=2, seed=5)
    task, resolved = build_task(spec), resolve(spec)
    w0, w1 = (build_worker(spec, r, task, resolved) for r in range(2))
    for w in (w0, w1):
        w.start_audit(tmp_path)
    sent = [m for _ in range(4) for _, m in w1.commit(w1.compute())]
    w0.receive(sent[:2])  # ids 0 and 1
    merged = sent[1].payload + sent[2].payload + sent[3].payload
    w0.receive([Message(Kind.GRADIENT, 1, 1, 1, 4, merged, sent[3].clock)])  # 1 again, 2 and 3
    # The broken worker took it (its clock does not even move: its id set refuses the overlap silently).
    assert sum(w0.rejected.values()) == 0 and w0.clock.tolist() == [0, 2]
    for w in (w0, w1):
        w.save_audit()
    report = check_folder(tmp_path, 2)
    assert any("worker 0 applied gradient 1 of worker 1 2 times" in e for e in report.errors), report.errors


def test_tampered_parameters_and_histories_are_caught(tmp_path):
    run_in_process(tmp_path, "dasgd")
    audits, grads = _load(tmp_path, 3)
    assert check_audits(audits, grads).errors == []
    # One replica's parameters moved by a tenth of one gradient's step in one coordinate.
    g = grads[1][0]
    k = int(np.argmax(np.abs(g)))
    audits[2]["params"] = audits[2]["params"].copy()
    audits[2]["params"][k] += 0.1 * audits[2]["meta"]["lr"] * g[k]
    errors = check_audits(audits, grads).errors
    assert any(e.startswith("worker 2: its parameters are") for e in errors), errors
    assert any(e.startswith("replicas disagree") for e in errors), errors
    # A remote gradient left out of one history: missing, and the replay no longer matches.
    audits, grads = _load(tmp_path, 3)
    history = audits[0]["history"]
    i = next(i for i, e in enumerate(history) if e[0] == "gradient")
    origin, lo = history[i][1], history[i][2]
    del history[i]
    errors = check_audits(audits, grads).errors
    assert any(f"worker 0 never applied gradient {lo} of live worker {origin}" in e for e in errors), errors
    assert any(e.startswith("worker 0: its parameters are") for e in errors), errors
    # An id its origin never computed.
    audits, grads = _load(tmp_path, 3)
    audits[0]["history"].append(["gradient", 1, len(grads[1]), len(grads[1]) + 1, [0, 0, 0], None])
    errors = check_audits(audits, grads).errors
    assert any("were applied, but it computed" in e for e in errors), errors


def test_a_model_average_with_the_wrong_weights_is_caught(tmp_path, monkeypatch):
    from dasgd.algorithms.gossip import GossipAveraging

    def lopsided(self, msg):  # noqa: ANN001, ANN202 - averages twice: keeps 1/4 of its replica, not half
        return [AverageModel(msg.payload), AverageModel(msg.payload), MergeClock(msg.clock)]

    monkeypatch.setattr(GossipAveraging, "_average", lopsided)
    run_in_process(tmp_path, "gossip")
    errors = check_folder(tmp_path, 3).errors
    assert any("its parameters are" in e for e in errors), errors


def test_a_stale_gradient_applied_at_full_weight_by_damped_dasgd_is_caught(tmp_path, monkeypatch):
    from dasgd.algorithms.dasgd import DASGD
    from dasgd.algorithms.staleness_policies import DampedDASGD

    monkeypatch.setattr(DampedDASGD, "on_gradient", DASGD.on_gradient)  # no damping at all
    run_in_process(tmp_path, "dasgd-damped", staleness_bound=2)
    errors = check_folder(tmp_path, 3).errors
    assert any("its parameters are" in e for e in errors), errors


def test_sync_that_divides_by_the_wrong_count_is_caught(tmp_path, monkeypatch):
    from dasgd.algorithms.sync import SynchronousSGD

    def advance(self):  # noqa: ANN001, ANN202 - sums the step instead of averaging it
        w = self.worker
        steps = []
        while self._steps.count(self._applied_steps) >= w.world_size:
            total, _ = self._steps.pop(self._applied_steps)
            steps.append(Step(total, w.lr))
            self._applied_steps += 1
        return steps

    monkeypatch.setattr(SynchronousSGD, "_advance", advance)
    run_in_process(tmp_path, "sync")
    errors = check_folder(tmp_path, 3).errors
    assert any("its parameters are" in e for e in errors), errors


@pytest.mark.parametrize("batched", [True, False])
def test_simulated_runs_with_latency_and_a_crash_pass_the_oracle(tmp_path, batched):
    """The simulator drives the same workers (bundled arrivals included): their audit trails pass too."""
    from dasgd.runs.simulate import simulate

    spec = resolve_spec(
        {},
        simulate=True,
        task="quadratic",
        dim=10,
        workers=5,
        max_gradients=600,
        audit=True,
        simulation={"latency": 0.003, "crashes": ["4@0.02"], "batched": batched},
    )
    summary = simulate(spec, tmp_path)
    report = check_folder(tmp_path / "audit", 5)
    assert report.errors == [], report
    assert report.dead == [4] and report.live == [0, 1, 2, 3]
    assert report.lost == summary["gradients_lost"]
    # Every live replica applied every live worker's gradients plus what it got of the crashed one's.
    live_computed = sum(w["computed"] for w in summary["per_worker"])
    assert all(report.applied[r] >= live_computed for r in report.live)
