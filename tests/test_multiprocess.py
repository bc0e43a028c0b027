"""Real processes on loopback: the straggler guarantee, a dead worker, two torchrun nodes, the example script.

Every test bounds its time and cleans up the processes it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from oracle import check_run

import dasgd
from dasgd.metrics.eventlog import read_event_log
from dasgd.runs.launcher import host_store

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def rates(run_dir: Path) -> dict[int, float]:
    """Gradients per second of each worker while it trained."""
    log = read_event_log(run_dir / "events.jsonl")
    out = {}
    for w in np.unique(log.origin):
        sel = log.origin == w
        span = log.end[sel].max() - log.start[sel].min()
        out[int(w)] = sel.sum() / span
    return out


def test_a_5x_straggler_loses_nothing_and_does_not_slow_the_others(tmp_path):
    common = dict(task="mnist-logreg", workers=4, max_seconds=4.0, eval_every=10.0, seed=1)
    base = dasgd.train(common, run_dir=str(tmp_path / "base"))
    slow = dasgd.train(common, run_dir=str(tmp_path / "slow"), stragglers=["3x5"])
    for s in (base, slow):
        assert s["gradients_lost"] == 0
        assert s["exactly_once"]
        assert s["gradients_applied"] == [s["gradients_computed"]] * 4
        assert s["replicas_agree"], s["max_replica_diff"]
        assert len(set(s["gradient_set_digests"])) == 1
    computed = {w["rank"]: w["computed"] for w in slow["per_worker"]}
    # No barrier: each fast worker computes several times what the straggler does (a barrier would equalise).
    assert min(computed[r] for r in (0, 1, 2)) >= 2.5 * computed[3]
    # The fast workers' own pace is not dragged down by the straggler.
    r_base, r_slow = rates(tmp_path / "base"), rates(tmp_path / "slow")
    for r in (0, 1, 2):
        assert r_slow[r] >= 0.8 * r_base[r], (r, r_slow[r], r_base[r])
    assert r_slow[3] <= 0.5 * r_base[3]


def _worker_pids(run_dir: Path) -> dict[int, int]:
    pids = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"dasgd.runs.entry" in cmd and str(run_dir).encode() in cmd:
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank:
                pids[int(rank[0][5:])] = int(proc.name)
    return pids


def train_and_kill(run_dir: Path, args: list[str], rank: int, after: int | None, timeout: float):  # noqa: ANN201
    """Start ``dasgd train ARGS`` and SIGKILL worker ``rank`` once it computed more than ``after`` gradients
    (None: as soon as its process exists, before it can join). Returns (return code, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dasgd", "train", *args, "--run-dir", str(run_dir), "--no-progress", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if after is None:
                if rank in _worker_pids(run_dir):
                    break
            else:
                progress = run_dir / "progress" / f"rank{rank}.json"
                if progress.exists() and json.loads(progress.read_text() or "{}").get("computed", 0) > after:
                    break
            time.sleep(0.01 if after is None else 0.05)
        pids = _worker_pids(run_dir)
        assert rank in pids, pids
        os.kill(pids[rank], signal.SIGKILL)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_a_dead_worker_does_not_stall_the_survivors(tmp_path):
    run_dir = tmp_path / "run"
    # Small gradients (20 floats), so the audit trail stays a few MB.
    args = ["--task", "quadratic", "--dim", "20", "--workers", "3", "--max-seconds", "8", "--audit"]
    returncode, _ = train_and_kill(run_dir, args, rank=2, after=20, timeout=120)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dead_workers"] == [2]
    assert summary["failed_workers"] == {"2": -9}
    assert summary["drained"]  # survivors finished their drain without the dead worker
    assert summary["stop_reason"] == "max_seconds"  # they trained to the end of the budget
    survivors = [w for w in summary["per_worker"] if w["rank"] in (0, 1)]
    assert all(w["computed"] > 100 for w in survivors)
    assert returncode == 1  # the run reports that it is not a clean one
    # The independent oracle: both survivors recomputed from the gradients (the dead worker's as far as it
    # wrote them) and their histories; no id applied twice, every survivor's gradient held by both.
    report = check_run(run_dir)
    assert report.errors == [], report
    assert report.live == [0, 1] and report.dead == [2]
    # Lost: the dead worker's gradients that not both survivors hold (one of them, or neither), counted here
    # from the histories and the gradients it wrote, and compared with the summary's own count.
    # The summary counts the dead worker's gradients from its streamed records, the oracle from its audit rows;
    # the record is written just before the row, so a kill between the two leaves one more record.
    assert summary["gradients_lost"] - report.lost in (0, 1), (report.lost, summary["gradients_lost"])


def test_two_torchrun_nodes_of_two_processes(tmp_path):
    # The rendezvous store is hosted here, on a port the OS picked and held until both agents are done, and
    # both agents join it as clients (is_host=0): no agent binds a port that was only free a moment ago.
    # The agent that becomes node 0 then hosts the workers' store on a port the OS picks (at 127.0.0.1).
    rdzv_store = host_store()
    run_dir = tmp_path / "run"
    cmd = [
        "torchrun",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{rdzv_store.port}",
        "--rdzv-conf",
        "is_host=0",
        "--local-addr",
        "127.0.0.1",
        "--rdzv-id",
        "dasgd-test",
        "-m",
        "dasgd",
        "train",
        "--task",
        "digits-logreg",
        "--max-gradients",
        "4000",
        "--lr",
        "0.05",
        # Every worker paced (sleeps twice its compute time after each gradient), so that 4 processes and two
        # torchrun agents do not saturate the 2 cores. Measured unpaced (8 runs): the OS let one process
        # compute 93 gradients at 5.4 ms each while another computed 1,755 at 0.2 ms, the starved replica
        # applied others' gradients up to the whole run late (S_avg 210-520, S_max 1,800-3,700) and the
        # final accuracy hung on scheduling (0.87 in one CI run). Paced (6 runs): S_avg 5-6, S_max 60-116,
        # accuracy 0.956-0.964.
        # What this test checks is the two-node launch, exactly-once delivery and replica agreement.
        *[arg for rank in range(4) for arg in ("--straggler", f"{rank}x3")],
        "--audit",
        "--run-dir",
        str(run_dir),
    ]
    cmd[0] = str(Path(sys.executable).parent / "torchrun")
    nodes = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        for _ in range(2)
    ]
    try:
        outs = [n.communicate(timeout=240)[0] for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    assert all(n.returncode == 0 for n in nodes), outs
    s = json.loads((run_dir / "summary.json").read_text())
    # This test has failed about once in 20 runs on a loaded 2-core machine; say enough to tell why.
    brief = {
        "final_metrics": s["final_metrics"],
        "staleness": {k: v for k, v in s["staleness"].items() if k != "histogram"},
        "stop_reason": s["stop_reason"],
        "computed": [w["computed"] for w in s["per_worker"]],
        "wall_time_s": s["wall_time_s"],
    }
    assert s["workers"] == 4
    assert s["gradients_lost"] == 0 and s["exactly_once"] and s["replicas_agree"], (
        brief,
        s["gradients_lost"],
    )
    assert s["final_metrics"]["test_accuracy"] >= 0.9, brief
    assert (run_dir / "plots" / "staleness.png").exists()
    report = check_run(run_dir)  # the independent oracle, on the replicas of both nodes
    assert report.errors == [], report
    assert report.applied == {r: s["gradients_computed"] for r in range(4)}


def test_example_script_under_torchrun(tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc-per-node",
            "2",
            str(ROOT / "examples" / "torchrun_dasgd.py"),
            "--steps",
            "300",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=ENV,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("workers=")][0]
    fields = dict(kv.split("=") for kv in line.split())
    assert fields["T"] == "600" and fields["applied"] == "600" and fields["lost"] == "0"
    assert fields["replicas_agree"] == "True"
    assert float(fields["test_accuracy"]) >= 0.85


def test_gloo_transport_rejects_untrusted_bytes_and_delivers_valid_ones(tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc-per-node",
            "2",
            str(ROOT / "tests" / "scripts" / "transport_check.py"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][0])
    assert result["ids"] == list(range(20))
    assert result["payload_sum"] == sum(range(20)) * 1000
    assert sum(result["rejected"].values()) == 7, result["rejected"]
    assert result["rejected"].get("unknown_sender") == 1
    assert result["rejected"].get("wrong_sender") == 1
    assert result["receiver_ended"]


@pytest.mark.parametrize(
    ("task", "extra", "check"),
    [
        ("quadratic", {"lr": 0.05}, lambda m: m["loss"] < 5.0),
        ("digits-logreg", {}, lambda m: m["test_accuracy"] > 0.8),
        ("mnist-logreg", {}, lambda m: m["test_accuracy"] > 0.7),
        ("fashion-cnn", {}, lambda m: m["test_accuracy"] > 0.4),
    ],
)
def test_every_task_trains_end_to_end_with_real_processes(tmp_path, task, extra, check):
    from dasgd.tasks import DatasetMissing, make_task

    try:
        make_task(task)
    except DatasetMissing as exc:
        pytest.skip(str(exc))
    s = dasgd.train(task=task, workers=2, max_gradients=300, run_dir=str(tmp_path / task), **extra)
    assert s["gradients_lost"] == 0 and s["replicas_agree"]
    assert check(s["final_metrics"]), s["final_metrics"]
    assert (tmp_path / task / "report.md").exists()
