"""One conformance suite for every Transport: the same scenario, checked against truth computed here.

The scenario (tests/scripts/transport_conformance.py, ``run_scenario``) runs on a world of three ranks:
in three threads of this process for the in-process reference, and under torchrun for the Gloo
(``torchdist``) and split-plane transports. It only records what each rank saw; this file computes what it
should have seen from K, D and the payload formula (element j of gradient i of origin o is
``o * 1000 + i + (j % 5)``), never from a transport's output.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from dasgd.core.message import Kind, Message
from dasgd.transport.inproc import InProcessNetwork

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "transport_conformance.py"


def _load_scenario() -> ModuleType:
    # tests/scripts is not a package; load the worker script as a module so the in-process run uses the
    # very function the torchrun workers use.
    spec = importlib.util.spec_from_file_location("transport_conformance", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


scenario = _load_scenario()

# Chosen here, and checked against the script's own constants, so that truth does not come from the script.
WORLD, K, D = 3, 60, 50
TIMEOUT_S = 90  # one torchrun start is 5-8 s here; the scenario itself takes about a second


def test_scenario_constants_are_the_ones_this_file_assumes() -> None:
    assert (scenario.WORLD, scenario.K, scenario.D) == (WORLD, K, D)


def truth(origin: int, lo: int, hi: int) -> np.ndarray:
    """The sum of gradients ``lo..hi-1`` of ``origin``, from the formula, in float64."""
    j = np.arange(D)
    return np.sum([origin * 1000 + i + (j % 5) for i in range(lo, hi)], axis=0, dtype=np.float64)


# -- running the scenario ------------------------------------------------------------------------------
def _run_inproc() -> dict[int, dict[str, Any]]:
    net = InProcessNetwork(WORLD)
    barrier = threading.Barrier(WORLD, timeout=TIMEOUT_S)
    results: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def one(rank: int) -> None:
        try:
            results[rank] = scenario.run_scenario(net.endpoint(rank), barrier.wait)
        except BaseException as exc:  # re-raised in the test thread
            errors.append(exc)
            barrier.abort()  # wake the others instead of letting them wait out the timeout

    threads = [threading.Thread(target=one, args=(r,), daemon=True) for r in range(WORLD)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(TIMEOUT_S)
    if errors:
        raise errors[0]
    assert not any(th.is_alive() for th in threads), "the in-process scenario did not finish in time"
    # Through JSON like the torchrun results, so both are checked in exactly the same form.
    return {r: json.loads(json.dumps(res)) for r, res in results.items()}


def _run_torchrun(name: str, out: Path) -> dict[int, dict[str, Any]]:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [torchrun, "--standalone", "--nproc-per-node", str(WORLD), str(SCRIPT)]
    # Own session, so that on a timeout the workers die with their torchrun agent, not only the agent.
    proc = subprocess.Popen(
        [*cmd, "--transport", name, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=out,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{name}: torchrun did not finish in {TIMEOUT_S} s\n{stderr[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    lines = [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]
    assert sorted(ln["rank"] for ln in lines) == list(range(WORLD)), stdout[-3000:]
    return {ln["rank"]: json.loads(Path(ln["file"]).read_text()) for ln in lines}


TRANSPORTS = [
    "inproc",
    pytest.param("torchdist", marks=pytest.mark.multiprocess),
    pytest.param("splitplane", marks=pytest.mark.multiprocess),
]


@pytest.fixture(scope="module", params=TRANSPORTS)
def run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[int, dict[str, Any]]:
    """The scenario's record per rank, for one transport (run once per transport, shared by the tests)."""
    name = request.param
    if name == "inproc":
        res = _run_inproc()
    else:
        res = _run_torchrun(name, tmp_path_factory.mktemp(name))
    assert sorted(res) == list(range(WORLD))
    return res


def _peers(rank: int) -> list[int]:
    return [p for p in range(WORLD) if p != rank]


def _gradients(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in r["received"] if m["kind"] == Kind.GRADIENT]


# -- the checks ----------------------------------------------------------------------------------------
def test_every_id_of_every_peer_arrives_exactly_once(run: dict[int, dict[str, Any]]) -> None:
    for rank, r in run.items():
        assert {m["origin"] for m in r["received"]} == set(_peers(rank)), rank
        for origin in _peers(rank):
            got = sorted(i for m in _gradients(r) if m["origin"] == origin for i in range(m["lo"], m["hi"]))
            assert got == list(range(K)), (rank, origin)


def test_each_payload_is_the_exact_sum_of_its_ids(run: dict[int, dict[str, Any]]) -> None:
    for rank, r in run.items():
        for m in _gradients(r):
            assert m["lo"] < m["hi"], (rank, m["origin"], m["lo"], m["hi"])
            assert m["payload"] is not None and len(m["payload"]) == D
            want = truth(m["origin"], m["lo"], m["hi"])
            np.testing.assert_array_equal(np.asarray(m["payload"]), want, err_msg=f"{rank} {m['origin']}")


def test_each_clock_is_the_clock_of_the_last_id_it_holds(run: dict[int, dict[str, Any]]) -> None:
    for r in run.values():
        for m in _gradients(r):
            want = [0] * WORLD
            want[m["origin"]] = m["hi"]  # gradient i carries clock[origin] = i + 1
            assert m["clock"] == want


def test_ranges_of_an_origin_arrive_in_order_and_final_comes_last(run: dict[int, dict[str, Any]]) -> None:
    for rank, r in run.items():
        for origin in _peers(rank):
            seq = [m for m in r["received"] if m["origin"] == origin]
            # contiguous and in order: each range starts where the previous ended
            nxt = 0
            for m in seq[:-1]:
                assert m["kind"] == Kind.GRADIENT, (rank, origin, m)
                assert m["lo"] == nxt, (rank, origin, [(x["lo"], x["hi"]) for x in seq])
                nxt = m["hi"]
            assert nxt == K
            final = seq[-1]
            assert final["kind"] == Kind.FINAL and final["lo"] == K and final["hi"] == K, (rank, final)
            assert final["payload"] is None


def test_sender_is_the_peer_it_came_from(run: dict[int, dict[str, Any]]) -> None:
    for rank, r in run.items():
        for m in r["received"]:
            # every message in the scenario is sent directly by its origin
            assert m["sender"] == m["origin"] != rank


def test_idle_wait_times_out_and_flush_succeeds(run: dict[int, dict[str, Any]]) -> None:
    for r in run.values():
        assert r["idle_wait"] is False
        assert r["idle_wait_s"] >= 0.04  # it waited (not an immediate False), within timer slack
        assert r["idle_poll"] == 0
        assert r["flushed"] is True
        assert r["flushed_alone"] == [True] * scenario.ALONE


def test_stats_show_no_trouble_and_plausible_counts(run: dict[int, dict[str, Any]]) -> None:
    for rank, r in run.items():
        s = r["stats"]
        assert s["rejected"] == {} and s["dead_peers"] == [] and s["undelivered"] == 0, rank
        # at least the ALONE flushed ones, one burst message and a FINAL per peer went out; never more
        # messages than send() calls (K gradients and a FINAL per peer)
        assert 2 * (scenario.ALONE + 2) <= s["sent_messages"] <= 2 * (K + 1), (rank, s)
        assert 0 < s["received_messages"] <= 2 * (K + 1), (rank, s)


def test_messages_sent_equal_messages_received_over_the_world(run: dict[int, dict[str, Any]]) -> None:
    sent = sum(r["stats"]["sent_messages"] for r in run.values())
    received = sum(r["stats"]["received_messages"] for r in run.values())
    assert sent == received, {rank: r["stats"] for rank, r in run.items()}


def test_every_send_went_out_alone_or_merged_into_another_message(
    run: dict[int, dict[str, Any]], request: pytest.FixtureRequest
) -> None:
    """Each rank called send() 2 (K + 1) times (K gradients and a FINAL to each peer), and each call either
    became a message of its own or was merged into a queued one; ``coalesced`` counts the merges."""
    calls = 2 * (K + 1)
    for rank, r in run.items():
        s = r["stats"]
        if request.node.callspec.params["run"] == "inproc":
            # Delivery is immediate (one message per call); the merges happen in the receiver's inbox, so
            # what this rank polled plus what its inbox merged is every call its peers made to it. Nobody
            # polls during the burst, so the inbox always merges some of it.
            assert s["sent_messages"] == calls, (rank, s)
            assert len(r["received"]) + s["coalesced"] == calls and s["coalesced"] > 0, (rank, s)
        else:
            # Threaded transports merge in the sender's outboxes: what went out plus what was merged.
            assert s["sent_messages"] + s["coalesced"] == calls, (rank, s)


def test_bytes_sent_equal_bytes_received_over_the_world(run: dict[int, dict[str, Any]]) -> None:
    sent = sum(r["stats"]["sent_bytes"] for r in run.values())
    received = sum(r["stats"]["received_bytes"] for r in run.values())
    assert sent == received > 0, {rank: r["stats"] for rank, r in run.items()}


def test_send_to_an_invalid_peer_raises_value_error(run: dict[int, dict[str, Any]]) -> None:
    for rank, r in run.items():
        assert [m["peer"] for m in r["misuse"]] == [rank, -1, WORLD]
        for m in r["misuse"]:
            assert m["is_value_error"], (rank, m)


def test_the_end_is_clean(run: dict[int, dict[str, Any]]) -> None:
    for r in run.values():
        assert r["ended"] is True  # shutdown(30) returned True (threaded) / close() returned (in-process)
        assert r["late"] == []  # nothing arrived after the drain, in particular no misdirected send


# -- coalescing, in-process ----------------------------------------------------------------------------
def _ten_gradients_of_origin_1() -> list[Message]:
    return [scenario.gradient(1, i, 2) for i in range(10)]


def test_contiguous_gradients_coalesce_into_one_exact_message() -> None:
    net = InProcessNetwork(2, coalesce=True)
    grads = _ten_gradients_of_origin_1()
    for g in grads:
        net.endpoint(1).send(0, g)
    got = net.endpoint(0).poll()
    assert [(m.kind, m.origin, m.lo, m.hi) for m in got] == [(Kind.GRADIENT, 1, 0, 10)]
    # hand-worked: sum over i < 10 of (1000 + i + j % 5) = 10045 + 10 * (j % 5)
    assert got[0].payload is not None
    want = torch.tensor([10045.0 + 10 * (j % 5) for j in range(D)])
    assert torch.equal(got[0].payload, want)
    assert got[0].clock is not None and got[0].clock.tolist() == [0, 10]
    # the merge copied: the first gradient's own tensor still holds gradient 0 (1000 + j % 5)
    assert torch.equal(grads[0].payload, torch.tensor([1000.0 + j % 5 for j in range(D)]))
    assert net.endpoint(0).stats().coalesced + net.endpoint(1).stats().coalesced == 9


def test_without_coalescing_each_gradient_arrives_alone() -> None:
    net = InProcessNetwork(2, coalesce=False)
    for g in _ten_gradients_of_origin_1():
        net.endpoint(1).send(0, g)
    got = net.endpoint(0).poll()
    assert [(m.lo, m.hi) for m in got] == [(i, i + 1) for i in range(10)]
    for i, m in enumerate(got):
        assert m.payload is not None
        assert torch.equal(m.payload, torch.tensor([1000.0 + i + j % 5 for j in range(D)]))
    assert net.endpoint(0).stats().coalesced + net.endpoint(1).stats().coalesced == 0
