"""The conformance suite every algorithm passes, and each baseline checked against an independent oracle.

Adding an algorithm: one file in src/dasgd/algorithms/, one line in its registry, one line in SUITE below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import check_run

from dasgd.algorithms import ALGORITHMS, AlgorithmParams, make_algorithm
from dasgd.algorithms.staleness_policies import receiver_staleness
from dasgd.core.message import Kind, Message
from dasgd.experiments.spec import SpecError, resolve_spec
from dasgd.runs.build import build_sampler, build_task, build_worker, resolve
from dasgd.runs.launcher import host_store, store_env
from dasgd.runs.simulate import simulate
from dasgd.runtime.loop import send_all
from dasgd.transport.inproc import InProcessNetwork

# (algorithm, spec keys it needs in the suite). One line per algorithm.
SUITE: list[tuple[str, dict]] = [
    ("dasgd", {}),
    ("sync", {}),
    ("ps-asgd", {}),
    ("local-sgd", {"local_steps": 4}),
    ("gossip", {}),
    ("dasgd-cap", {"staleness_bound": 3}),
    ("dasgd-damped", {"staleness_bound": 3}),
]
NAMES = [name for name, _ in SUITE]
SCRIPTS = Path(__file__).parent / "scripts"


def test_the_suite_covers_every_registered_algorithm():
    assert sorted(NAMES) == sorted(ALGORITHMS)


def _sim(tmp_path: Path, name: str, extra: dict, **kw) -> dict:
    values = dict(workers=4, algorithm=name, seed=1, **extra)
    values.update(kw)
    spec = resolve_spec({}, simulate=True, **values)
    run_dir = tmp_path / f"{name}-{spec.task}-{spec.seed}"
    return simulate(spec, run_dir) | {"run_dir": str(run_dir)}


@pytest.mark.parametrize(("name", "extra"), SUITE, ids=NAMES)
def test_converges_on_the_quadratic(tmp_path, name, extra):
    s = _sim(tmp_path, name, extra, task="quadratic", dim=20, noise=0.1, lr=0.1, max_gradients=1500)
    evals = [json.loads(line) for line in open(Path(s["run_dir"]) / "events.jsonl")]
    losses = [e["loss"] for e in evals if e.get("type") == "eval" and "loss" in e]
    assert losses, "no evaluation recorded"
    # From f(x0) to a small fraction of it: the noise floor at this stepsize is far below 5%.
    assert s["final_metrics"]["loss"] < 0.05 * losses[0], (losses[0], s["final_metrics"])


@pytest.mark.parametrize(("name", "extra"), SUITE, ids=NAMES)
def test_converges_on_digits_logistic_regression(tmp_path, name, extra):
    s = _sim(tmp_path, name, extra, task="digits-logreg", max_gradients=1200)
    assert s["final_metrics"]["test_accuracy"] >= 0.9, s["final_metrics"]


@pytest.mark.parametrize(("name", "extra"), SUITE, ids=NAMES)
def test_deterministic_in_the_simulator(tmp_path, name, extra):
    kw = dict(
        task="quadratic",
        dim=8,
        max_gradients=300,
        simulation={"compute": "lognormal", "latency_sigma": 0.5, "straggler_share": 0.25, "slowdown": 3},
    )
    a = _sim(tmp_path / "a", name, extra, **kw)
    b = _sim(tmp_path / "b", name, extra, **kw)
    log_a = (Path(a["run_dir"]) / "events.jsonl").read_bytes()
    assert log_a == (Path(b["run_dir"]) / "events.jsonl").read_bytes()
    c = _sim(tmp_path / "c", name, extra, **{**kw, "seed": 2})
    assert log_a != (Path(c["run_dir"]) / "events.jsonl").read_bytes()


@pytest.mark.parametrize(("name", "extra"), SUITE, ids=NAMES)
def test_drains_cleanly_and_reports_its_counts(tmp_path, name, extra):
    s = _sim(tmp_path, name, extra, task="quadratic", dim=8, max_gradients=400, simulation={"latency": 0.002})
    assert s["drained"]
    assert s["algorithm"] == name
    per_worker = s["per_worker"]
    assert sum(w["computed"] for w in per_worker) == s["gradients_computed"] >= 400
    assert s["gradients_lost"] == 0
    contract = ALGORITHMS[name].replicas
    assert s["replicas"] == contract
    if contract in ("all", "ids", "server"):
        assert s["exactly_once"] is True
    if contract == "all":
        assert s["replicas_agree"] is True
    assert all(w["sent_messages"] > 0 for w in per_worker if w["computed"] or name == "ps-asgd")


@pytest.mark.multiprocess
@pytest.mark.parametrize(("name", "extra"), SUITE, ids=NAMES)
def test_runs_in_real_processes(tmp_path, name, extra):
    import dasgd

    s = dasgd.train(
        task="digits-logreg",
        workers=3,
        algorithm=name,
        max_gradients=1200,
        run_dir=str(tmp_path / name),
        drain_timeout=30,
        stragglers=["2x3"],  # unequal paces make stale messages, so every algorithm's rule is exercised
        audit=True,
        **extra,
    )
    assert s["drained"] and s["gradients_lost"] == 0
    assert s["gradients_computed"] >= 1200
    assert s["final_metrics"]["test_accuracy"] > 0.8
    # The independent oracle: every replica recomputed from the gradients and its own history under the
    # algorithm's stated rule, ids checked for exactly-once, agreement checked on the parameters themselves.
    report = check_run(tmp_path / name)
    assert report.errors == [], report
    assert report.live == [0, 1, 2]
    if ALGORITHMS[name].replicas in ("all", "ids"):
        assert report.applied == {r: s["gradients_computed"] for r in range(3)}


# -- oracles ---------------------------------------------------------------------------------------------
def _workers(name: str, n: int, **kw):
    spec = resolve_spec({}, task="digits-logreg", workers=n, algorithm=name, seed=5, **kw)
    task = build_task(spec)
    resolved = resolve(spec)
    return spec, task, resolved, [build_worker(spec, r, task, resolved) for r in range(n)]


def _lockstep(workers, steps: int) -> None:
    """Each worker computes and commits in turn, then everything sent is delivered (zero delay)."""
    net = InProcessNetwork(len(workers), coalesce=False)
    ends = [net.endpoint(r) for r in range(len(workers))]
    for _ in range(steps):
        for w, t in zip(workers, ends):
            if w.computes:
                assert w.ready
                send_all(t, w.commit(w.compute()))
        for _ in range(3):  # replies to replies (a server's model) need more than one round
            for w, t in zip(workers, ends):
                send_all(t, w.receive(t.poll()))


def test_sync_equals_mean_gradient_sgd_and_local_sgd_with_h1_equals_sync():
    _, task, _, sync = _workers("sync", 3)
    _lockstep(sync, 20)
    # Independent oracle: one model, each step the mean of the three workers' batch gradients.
    spec, task, resolved, _ = _workers("sync", 3)
    model = task.build_model(spec.seed)
    samplers = [build_sampler(spec, r, task, resolved) for r in range(3)]
    with torch.no_grad():
        x = torch.nn.utils.parameters_to_vector(model.parameters()).clone()
    for _ in range(20):
        grads = []
        for s in samplers:
            torch.nn.utils.vector_to_parameters(x, model.parameters())
            model.zero_grad()
            task.loss(model, s.next()).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        x = x - resolved.lr * torch.stack(grads).mean(0)
    for w in sync:
        torch.testing.assert_close(w.params, x.to(w.params.dtype), rtol=1e-5, atol=1e-6)
    _, _, _, local = _workers("local-sgd", 3, local_steps=1)
    _lockstep(local, 20)
    for w in local:
        torch.testing.assert_close(w.params, x.to(w.params.dtype), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sync", "local-sgd"])
def test_a_barrier_completes_over_the_live_workers_and_averages_what_it_holds(name):
    """Worker 2 sends its part of a step (sync: its gradient; local-sgd: its model) to worker 0 only, then
    dies, and both survivors declare it dead. Worker 0 holds 2's part and its own: the step is not complete
    until worker 1's part is in too (a dead worker's part never stands in for a live one's), and then it
    averages the three. Worker 1 never got 2's part and averages two. Each divides by the parts it holds, not
    by the number of live workers (that would scale worker 0's step by 3/2)."""
    _, _, _, ws = _workers(name, 3, local_steps=1)
    _lockstep(ws, 3)
    net = InProcessNetwork(3, coalesce=False)
    ends = [net.endpoint(r) for r in range(3)]
    before = [w.params.clone() for w in ws]
    parts = {}

    def commit(r: int) -> list:
        out = ws[r].commit(ws[r].compute())
        payloads = {id(m): m for _, m in out}
        assert len(payloads) == 1  # the same part goes to both peers
        parts[r] = next(iter(payloads.values())).payload.clone()
        return out

    send_all(ends[2], [(p, m) for p, m in commit(2) if p == 0])
    send_all(ends[0], ws[0].receive(ends[0].poll()))
    for r in (0, 1):
        send_all(ends[r], ws[r].declare_dead(2))
    send_all(ends[0], commit(0))
    assert not ws[0].ready  # holds its own part and the dead worker's; worker 1's is missing
    send_all(ends[1], commit(1))
    for r in (0, 1):
        send_all(ends[r], ws[r].receive(ends[r].poll()))
        assert ws[r].ready
    if name == "sync":
        expect0 = before[0] - ws[0].lr * (parts[0] + parts[1] + parts[2]) / 3
        expect1 = before[1] - ws[1].lr * (parts[0] + parts[1]) / 2
    else:
        expect0 = (parts[0] + parts[1] + parts[2]) / 3
        expect1 = (parts[0] + parts[1]) / 2
    torch.testing.assert_close(ws[0].params, expect0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ws[1].params, expect1, rtol=1e-5, atol=1e-6)


def test_a_barrier_waiting_only_on_a_dead_worker_completes_when_it_is_declared_dead():
    _, _, _, ws = _workers("sync", 3)
    _lockstep(ws, 2)
    net = InProcessNetwork(3, coalesce=False)
    ends = [net.endpoint(r) for r in range(3)]
    for r in (0, 1):
        send_all(ends[r], ws[r].commit(ws[r].compute()))
    for r in (0, 1):
        send_all(ends[r], ws[r].receive(ends[r].poll()))
        assert not ws[r].ready  # waiting for worker 2's step
    for r in (0, 1):
        send_all(ends[r], ws[r].declare_dead(2))
        assert ws[r].ready
    torch.testing.assert_close(ws[0].params, ws[1].params)


def test_ps_asgd_with_one_worker_is_sequential_sgd():
    spec, task, resolved, ws = _workers("ps-asgd", 2)
    assert not ws[0].computes and ws[1].computes
    _lockstep(ws, 25)
    model = task.build_model(spec.seed)
    sampler = build_sampler(spec, 1, task, resolved)
    opt = torch.optim.SGD(model.parameters(), lr=resolved.lr)
    for _ in range(25):
        opt.zero_grad()
        task.loss(model, sampler.next()).backward()
        opt.step()
    expect = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    for w in ws:  # the server applied them; the worker pulled the server's model back
        torch.testing.assert_close(w.params, expect, rtol=1e-5, atol=1e-6)
    assert ws[0].clock.tolist() == [0, 25] == ws[1].clock.tolist()


def test_gossip_keeps_replicas_closer_than_no_communication(tmp_path):
    gossip = _sim(tmp_path, "gossip", {}, task="quadratic", dim=20, max_gradients=800, lr=0.05)
    alone = _sim(
        tmp_path, "local-sgd", {"local_steps": 10_000}, task="quadratic", dim=20, max_gradients=800, lr=0.05
    )
    assert gossip["algorithm_counts"]["exchanges"] > 50
    assert gossip["max_replica_diff"] < 0.5 * alone["max_replica_diff"]


def test_receiver_staleness_counts_what_the_receiver_holds_beyond_the_senders_model():
    held = np.array([5, 3, 7])
    msg = Message(Kind.GRADIENT, 1, 1, 2, 3, torch.zeros(1), np.array([4, 2, 1]))
    # Held beyond the model: 1 of worker 0, 1 of worker 1 (its own id 2, excluded), 6 of worker 2.
    assert receiver_staleness(held, msg) == 1 + 6
    assert receiver_staleness(held, Message(Kind.GRADIENT, 1, 1, 2, 3, torch.zeros(1), None)) == 0


def test_cap_drops_and_counts_stale_gradients_and_damping_shrinks_the_step(tmp_path):
    cap = _sim(tmp_path, "dasgd-cap", {"staleness_bound": 1}, task="quadratic", dim=8, max_gradients=400)
    assert cap["algorithm_counts"]["capped"] > 0
    assert cap["algorithm_counts"]["dropped"] == cap["algorithm_counts"]["capped"]
    # Damping: a gradient of staleness s = bound is applied with half the stepsize.
    spec, _, _, ws = _workers("dasgd-damped", 3, staleness_bound=4)
    w = ws[0]
    w.clock[:] = [0, 1, 4]  # holds one gradient of worker 1 and four of worker 2
    before = w.params.clone()
    g = torch.ones_like(w.params)
    w.receive([Message(Kind.GRADIENT, 1, 1, 1, 2, g, np.array([0, 1, 0]))])  # the model lacked 4
    torch.testing.assert_close(w.params, before - (w.lr / 2) * g)


def test_setups_an_algorithm_cannot_use_are_refused_with_a_clear_error():
    for name in ("sync", "ps-asgd", "local-sgd"):
        with pytest.raises(SpecError, match="complete"):
            resolve(resolve_spec({}, task="quadratic", workers=4, algorithm=name, topology="ring"))
    with pytest.raises(SpecError, match="grads-per-message"):
        resolve(resolve_spec({}, task="quadratic", workers=4, algorithm="sync", grads_per_message=2))
    with pytest.raises(SpecError, match="workers 2"):
        resolve(resolve_spec({}, task="quadratic", workers=1, algorithm="ps-asgd"))
    assert make_algorithm("gossip", AlgorithmParams(seed=3)).params.seed == 3


@pytest.mark.multiprocess
def test_sync_matches_pytorch_ddp_parameter_for_parameter(tmp_path):
    """Same seeds, same data order: dasgd's sync and DDP hold the same parameters after N steps."""
    n, steps = 2, 15
    _, _, _, sync = _workers("sync", n)
    _lockstep(sync, steps)
    # The c10d store is hosted here on a port the OS picked, held until both ranks exit; they join it as
    # clients (a port picked free, closed and bound later by rank 0 could be taken in between).
    store = host_store()
    env = {
        **os.environ,
        **store_env(store),
        "WORLD_SIZE": str(n),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    logs = [open(tmp_path / f"rank{r}.log", "wb") for r in range(n)]  # noqa: SIM115 (closed below)
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPTS / "ddp_reference.py"), str(steps), str(tmp_path / f"r{r}.npy")],
            env={**env, "RANK": str(r)},
            stdout=logs[r],
            stderr=subprocess.STDOUT,
        )
        for r in range(n)
    ]
    try:
        for r, p in enumerate(procs):
            code = p.wait(timeout=120)
            logs[r].close()
            assert code == 0, (tmp_path / f"rank{r}.log").read_text()[-3000:]
    finally:
        for f in logs:
            f.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r in range(n):
        ddp = torch.from_numpy(np.load(tmp_path / f"r{r}.npy"))
        torch.testing.assert_close(sync[r].params, ddp.to(sync[r].params.dtype), rtol=1e-5, atol=1e-6)


def test_algorithms_never_write_the_replica_or_its_clock_themselves():
    """Plug-ins return effects and the Worker carries them out, so the exactly-once bookkeeping has one owner.
    Their worker is a read-only view (tests/test_worker_rules.py); a write in an algorithm module fails here too."""
    import re

    writes = re.compile(
        r"params\.(add_|sub_|mul_|div_|copy_|zero_|fill_)\(|clock\[[^\]]*\]\s*=[^=]|out=[^)]*clock|\.clock\s*=[^=]"
        r"|rejected\[|\._worker\.|\.worker\._"
    )
    folder = Path(__file__).resolve().parent.parent / "src" / "dasgd" / "algorithms"
    found = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(folder.glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if writes.search(line)
    ]
    assert found == [], found
    # The scan itself can fail: the forms it looks for are the ones the algorithms used to write.
    assert writes.search("w.params.add_(msg.payload, alpha=-w.lr)")
    assert writes.search("w.clock[:] = msg.clock")
    assert writes.search("np.maximum(self.worker.clock, other, out=self.worker.clock)")
    assert writes.search('w.rejected["not_server"] += 1')
    assert writes.search("self.worker._worker.params")


def test_every_algorithm_setting_comes_from_the_spec_field_of_its_name():
    """AlgorithmParams is filled from the spec by field name: each of its fields is a spec setting, and a
    non-default spec value reaches the algorithm."""
    import dataclasses

    from dasgd.algorithms import AlgorithmParams
    from dasgd.runs.build import algorithm_params

    names = [f.name for f in dataclasses.fields(AlgorithmParams)]
    spec = resolve_spec({}, task="quadratic", seed=9, local_steps=3, staleness_bound=5, cap_scale=0.25)
    params = algorithm_params(spec)
    assert {n: getattr(params, n) for n in names} == {
        "seed": 9,
        "local_steps": 3,
        "staleness_bound": 5,
        "cap_scale": 0.25,
    }
