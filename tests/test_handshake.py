"""Every link opens with a handshake; a peer that differs is refused by name and nobody crashes (issue 12, item 8).

Three real processes join a Gloo process group on 127.0.0.1 (a c10d store hosted by the test, as the
launcher does) and run one scenario after another, each on a fresh process group: ranks 0 and 1 always
agree, rank 2 differs in one way (its key, having no key, its spec digest, its dtype, its model size, its
wire version, its run nonce, its transport) or never builds a transport at all. Every rank records what its
constructor did; the test checks that ranks 0 and 1 refused exactly peer 2, and why, that rank 2 refused both
of them, that a silent peer is given up on within the handshake timeout, and that every process ended
normally (no Gloo abort). This file is also the worker script: ``python tests/test_handshake.py --child``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORLD = 3
NUMEL = 300
KEY = b"the shared secret"
SILENT_TIMEOUT_S = 2.0
TIMEOUT_S = 120


# -- the test side ---------------------------------------------------------------------------------------
def spawn(script: Path, args: list[str], world: int, timeout: float) -> tuple[list[int], list[Any], str]:
    """Run ``python script --child ARGS --out FILE`` as ``world`` ranks on loopback; return their exit codes,
    their JSON results (None where a rank wrote none) and their logs. Every process is killed at the end."""
    from dasgd.runs.launcher import host_store, store_env

    store = host_store()  # held until the ranks are done
    with tempfile.TemporaryDirectory(prefix="dasgd-links-") as tmp:
        folder = Path(tmp)
        procs: list[subprocess.Popen[bytes]] = []
        logs = []
        try:
            for rank in range(world):
                env = dict(
                    os.environ,
                    **store_env(store),
                    RANK=str(rank),
                    LOCAL_RANK=str(rank),
                    WORLD_SIZE=str(world),
                    LOCAL_WORLD_SIZE=str(world),
                    GLOO_SOCKET_IFNAME="lo",
                    OMP_NUM_THREADS="1",
                )
                log = open(folder / f"rank{rank}.log", "wb")  # noqa: SIM115 - closed in finally
                logs.append(log)
                cmd = [
                    sys.executable,
                    str(script),
                    "--child",
                    *args,
                    "--out",
                    str(folder / f"rank{rank}.json"),
                ]
                procs.append(
                    subprocess.Popen(
                        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
            deadline = time.monotonic() + timeout
            codes = []
            for proc in procs:
                try:
                    codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    codes.append(-999)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            for log in logs:
                log.close()
        text = "\n".join(
            f"--- rank {r}\n" + (folder / f"rank{r}.log").read_text(errors="replace")[-3000:]
            for r in range(world)
        )
        results = []
        for rank in range(world):
            path = folder / f"rank{rank}.json"
            results.append(json.loads(path.read_text()) if path.exists() else None)
        return codes, results, text


@pytest.fixture(scope="module")
def outcomes() -> list[dict[str, Any]]:
    codes, results, logs = spawn(Path(__file__), [], WORLD, TIMEOUT_S)
    # Nobody crashed: no SIGABRT from Gloo, no exception, no hang (the refusals were all caught as errors).
    assert codes == [0] * WORLD, logs
    assert all(r is not None for r in results), logs
    return results  # type: ignore[return-value]


@pytest.mark.multiprocess
def test_agreeing_peers_open_their_links_and_talk(outcomes: list[dict[str, Any]]) -> None:
    for rank, res in enumerate(outcomes):
        rec = res["agree"]
        assert rec["ok"], (rank, rec)
        assert rec["received"] == sorted(p for p in range(WORLD) if p != rank)  # a STOP from every peer
        assert rec["rejected"] == {}


# scenario -> (reason ranks 0 and 1 give for peer 2, words in their detail, reason rank 2 gives, its words)
REFUSALS = {
    "key_differs": ("auth", "HMAC tag does not match", "auth", "HMAC tag does not match"),
    "no_key": (
        "auth",
        "unsigned message but a shared secret is set",
        "auth",
        "this worker has no shared secret",
    ),
    "spec_differs": ("spec_mismatch", "spec digest", "spec_mismatch", "spec digest"),
    "float64_peer": (
        "spec_mismatch",
        "300 x torch.float64 there, 300 x torch.float32 here",
        "spec_mismatch",
        "300 x torch.float32 there, 300 x torch.float64 here",
    ),
    "bigger_model": (
        "spec_mismatch",
        "301 x torch.float32 there",
        "spec_mismatch",
        "300 x torch.float32 there",
    ),
    "wire_version_3": ("bad_version", "wire version 3, this build speaks 2", "bad_version", "wire version 2"),
    "other_run": ("wrong_run", "run nonce differs", "wrong_run", "run nonce differs"),
    "splitplane_peer": ("spec_mismatch", "spec digest", "spec_mismatch", "spec digest"),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("scenario", sorted(REFUSALS))
def test_a_peer_that_differs_is_refused_by_name_on_both_sides(
    outcomes: list[dict[str, Any]], scenario: str
) -> None:
    reason, words, reason_2, words_2 = REFUSALS[scenario]
    for rank in (0, 1):
        rec = outcomes[rank][scenario]
        assert not rec["ok"], (rank, rec)
        # only the peer that differs is refused: the link between 0 and 1 opened
        assert list(rec["problems"]) == ["2"], (rank, rec)
        got_reason, detail = rec["problems"]["2"]
        assert got_reason == reason and words in detail, (rank, rec)
        assert f"worker {rank} refused to open its links: peer 2: " in rec["text"]
    rec = outcomes[2][scenario]
    assert not rec["ok"] and sorted(rec["problems"]) == ["0", "1"], rec
    for peer in ("0", "1"):
        got_reason, detail = rec["problems"][peer]
        assert got_reason == reason_2 and words_2 in detail, rec


@pytest.mark.multiprocess
def test_a_silent_peer_is_given_up_on_within_the_handshake_timeout(outcomes: list[dict[str, Any]]) -> None:
    for rank in (0, 1):
        rec = outcomes[rank]["silent_peer"]
        assert not rec["ok"] and list(rec["problems"]) == ["2"], rec
        assert rec["problems"]["2"][0] == "timeout" and "no HELLO within 2 s" in rec["problems"]["2"][1]
        assert SILENT_TIMEOUT_S - 0.1 <= rec["elapsed"] <= SILENT_TIMEOUT_S + 5.0, rec


# -- the worker side -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _wire_version(version: int | None) -> Iterator[None]:
    """Make this process speak another wire version for a while (a build from another release)."""
    import dasgd.core.wire as wire

    if version is None:
        yield
        return
    old = wire.WIRE_VERSION
    wire.WIRE_VERSION = version
    try:
        yield
    finally:
        wire.WIRE_VERSION = old


def _settings(scenario: str, rank: int) -> dict[str, Any] | None:
    """The transport rank ``rank`` builds in ``scenario`` (None: it builds none)."""
    import torch

    from dasgd.transport.handshake import spec_digest

    base: dict[str, Any] = {
        "key": KEY,
        "dtype": torch.float32,
        "numel": NUMEL,
        "nonce": b"n" * 16,
        "spec_digest": spec_digest("digits-logreg", "dasgd", "complete", 0),
        "version": None,
        "transport": "torchdist",
    }
    if rank != 2 or scenario == "agree":
        return base
    changes: dict[str, dict[str, Any] | None] = {
        "key_differs": {"key": b"another secret"},
        "no_key": {"key": None},
        "spec_differs": {"spec_digest": spec_digest("mnist-logreg", "dasgd", "complete", 0)},
        "float64_peer": {"dtype": torch.float64},
        "bigger_model": {"numel": NUMEL + 1},
        "wire_version_3": {"version": 3},
        "other_run": {"nonce": b"m" * 16},
        "splitplane_peer": {"transport": "splitplane"},
        "silent_peer": None,
    }
    change = changes[scenario]
    return None if change is None else {**base, **change}


SCENARIOS = ["agree", *sorted(REFUSALS), "silent_peer"]


def child(out: Path) -> None:
    import torch.distributed as dist

    from dasgd.core.message import Kind, Message
    from dasgd.transport.handshake import HandshakeError
    from dasgd.transport.splitplane import SplitPlaneTransport, make_data_groups
    from dasgd.transport.torchdist import TorchDistTransport

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    coll = dist.new_group(backend="gloo")
    results: dict[str, Any] = {}
    for scenario in SCENARIOS:
        # A fresh group per scenario: a refused handshake leaves receives posted on its group for good.
        group = dist.new_group(backend="gloo")
        up, down = make_data_groups("gloo") if scenario == "splitplane_peer" else (None, None)
        mine = _settings(scenario, rank)
        rec: dict[str, Any] = {}
        start = time.monotonic()
        if mine is not None:
            common = {"key": mine["key"], "nonce": mine["nonce"], "spec_digest": mine["spec_digest"]}
            timeout = SILENT_TIMEOUT_S if scenario == "silent_peer" else 60.0
            try:
                with _wire_version(mine["version"]):
                    if mine["transport"] == "splitplane":
                        t: Any = SplitPlaneTransport(
                            rank, world, mine["numel"], mine["dtype"], "cpu", group, up, down,
                            handshake_timeout=timeout, **common,
                        )  # fmt: skip
                    else:
                        t = TorchDistTransport(
                            rank,
                            world,
                            mine["numel"],
                            mine["dtype"],
                            group,
                            handshake_timeout=timeout,
                            **common,
                        )
            except HandshakeError as exc:
                rec = {
                    "ok": False,
                    "problems": {str(p): list(v) for p, v in exc.problems.items()},
                    "text": str(exc),
                }
            else:
                rec = {"ok": True}
                for peer in range(world):
                    if peer != rank:
                        t.send(peer, Message(Kind.STOP, rank, rank))
                got: list[int] = []
                deadline = time.monotonic() + 30
                while len(got) < world - 1 and time.monotonic() < deadline:
                    t.wait(0.1)
                    got += [m.origin for m in t.poll()]
                rec["received"] = sorted(got)
                t.flush(30)
            rec["elapsed"] = time.monotonic() - start
            if rec["ok"]:
                rec["rejected"] = dict(t.stats().rejected)
        results[scenario] = rec
        dist.barrier(group=coll)
    out.write_text(json.dumps(results))
    os._exit(0)


if __name__ == "__main__":
    import faulthandler

    # A hang shows every thread's stack in the log.
    faulthandler.dump_traceback_later(TIMEOUT_S - 20, exit=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    child(parser.parse_args().out)
