"""The split-plane transport (headers on a Gloo control group, payloads on up/down data groups).

The real test runs tests/scripts/splitplane_check.py under torchrun with three CPU processes (Gloo on every
plane: the code path NCCL takes, minus the CUDA stream calls) and checks its JSON against truth computed
here by hand: which ids exist, how many bytes a header and a payload take, which rejections the hostile
headers (forged, replayed, from another run, with an altered data-plane payload) must cause. The argument checks that need no process group run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dasgd.transport.splitplane import SplitPlaneTransport, SplitPlaneUsageError, make_data_groups

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}

D = 2048  # the script's payload elements (float32)
N = 200  # gradients each rank sends to each peer
WORLD = 3


def _run_check(tmp_path: Path, *args: str) -> dict[int, dict]:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc-per-node",
            str(WORLD),
            str(ROOT / "tests" / "scripts" / "splitplane_check.py"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    by_rank = {r["rank"]: r for r in lines}
    assert sorted(by_rank) == list(range(WORLD)), proc.stdout[-3000:]
    return by_rank


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "hmac"])
def test_three_ranks_exchange_gradients_over_split_planes(tmp_path: Path, keyed: bool) -> None:
    res = _run_check(tmp_path, *(["--key"] if keyed else []))
    grad_bytes = 152 + 8 * WORLD + 4 * D  # header (tag field included, keyed or not), 3-entry clock, payload
    final_bytes = 152  # FINAL: no clock, no payload
    for rank, r in res.items():
        peers = [p for p in range(WORLD) if p != rank]
        assert r["keyed"] == keyed
        # every id of every peer arrived, exactly once in total, with the right values and clocks
        assert r["ids"] == {str(p): True for p in peers}
        assert r["id_counts"] == {str(p): N for p in peers}
        assert r["payload_errors"] == 0 and r["clock_errors"] == 0
        assert r["finals_after_all_ids"] == {str(p): True for p in peers}
        assert r["flushed"] and r["shutdown_ok"]
        traffic = r["traffic"]
        assert traffic["dead_peers"] == [] and traffic["undelivered"] == 0 and traffic["rejected"] == {}
        # 100 flushed one by one + at least one for the burst + a FINAL, per peer
        assert traffic["sent_messages"] >= 2 * (N // 2 + 2)
        assert traffic["sent_bytes"] == (traffic["sent_messages"] - 2) * grad_bytes + 2 * final_bytes
        assert traffic["received_bytes"] == (traffic["received_messages"] - 2) * grad_bytes + 2 * final_bytes
        # data plane: one send per gradient message, always on the group of its direction
        assert r["direction_errors"] == 0
        assert sum(r["data_ops"]["send"].values()) == traffic["sent_messages"] - 2
        assert sum(r["data_ops"]["recv"].values()) == traffic["received_messages"] - 2
        for p in peers:
            assert r["data_ops"]["send"][str(p)] == res[p]["data_ops"]["recv"][str(rank)]
        assert r["misuses_refused"] == 6
        assert r["leaked"] == 0
    assert sum(r["traffic"]["sent_messages"] for r in res.values()) == sum(
        r["traffic"]["received_messages"] for r in res.values()
    )
    # the burst was coalesced somewhere (100 sends in a tight loop outrun a round trip each)
    assert sum(r["traffic"]["coalesced"] for r in res.values()) > 0
    # hostile headers: counted by reason at rank 1, none anywhere else; no data receive was posted for any
    # of them (but the one whose payload was altered), or rank 1's receiver would still be waiting and
    # shutdown_ok would be False; and the SHUTDOWNs after them still held the numbers rank 1 expected
    want = {
        "shape": 2,
        "bad_dtype": 1,
        "unsynced_peer": 1,
        "wrong_sender": 1,
        "replay": 1,
        "wrong_run": 1,
        "bad_digest": 1,
    }
    if keyed:
        want["auth"] = 1
    assert res[1]["rejected"] == want
    assert res[0]["rejected"] == {} and res[2]["rejected"] == {}


def test_make_data_groups_refuses_unknown_backends() -> None:
    with pytest.raises(SplitPlaneUsageError, match="'nccl'"):
        make_data_groups("mpi")


def test_constructor_refuses_bad_arguments_before_touching_groups() -> None:
    up, down = object(), object()  # never used: every check below fails before any group call
    with pytest.raises(SplitPlaneUsageError, match="distinct"):
        SplitPlaneTransport(0, 2, 4, torch.float32, "cpu", None, up, up)  # type: ignore[arg-type]
    with pytest.raises(SplitPlaneUsageError, match="outside"):
        SplitPlaneTransport(2, 2, 4, torch.float32, "cpu", None, up, down)  # type: ignore[arg-type]
    with pytest.raises(SplitPlaneUsageError, match="numel"):
        SplitPlaneTransport(0, 1, -1, torch.float32, "cpu", None, up, down)  # type: ignore[arg-type]
    with pytest.raises(SplitPlaneUsageError, match="not supported"):
        SplitPlaneTransport(0, 1, 4, torch.float32, "meta", None, up, down)  # type: ignore[arg-type]
    assert issubclass(SplitPlaneUsageError, ValueError)


def test_single_worker_has_no_threads_and_shuts_down() -> None:
    t = SplitPlaneTransport(0, 1, 4, torch.float32, "cpu", None, object(), object())  # type: ignore[arg-type]
    assert t.poll() == [] and not t.wait(0.0) and t.flush(0.0)
    with pytest.raises(SplitPlaneUsageError):
        t.send(0, None)  # type: ignore[arg-type]
    assert t.shutdown(0.1)
    assert t.stats().to_dict()["sent_messages"] == 0
