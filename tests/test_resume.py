"""Checkpoints and resume of real runs: a run killed (SIGKILL of its whole process tree) or stopped (SIGTERM)
after a checkpoint goes on with `dasgd train --resume RUN_DIR` to the same end, exactly-once; bad resumes are
refused with one line, leaving the run directory as it was.

Real processes on loopback (4 workers, digits-logreg); every test bounds its time and cleans up its processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dasgd.metrics.eventlog import read_event_log

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(300)]

ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
GRADIENTS = 12000
RUN = [
    "--task", "digits-logreg", "--workers", "4", "--max-gradients", str(GRADIENTS), "--checkpoint-every", "0.5",
    "--no-theory", "--no-plots", "--no-progress",
]  # fmt: skip
ACCURACY_TOLERANCE = 0.03
"""A resumed run's final test accuracy is within this of an uninterrupted run's (digits: ~0.97 either way;
asynchronous runs differ by their interleaving, so the two are not bit-identical)."""


def dasgd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dasgd", *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def _start(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dasgd", "train", *RUN, "--run-dir", str(run_dir)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the launcher and its workers, killed together
    )


def _wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(run_dir.glob("checkpoints/*/MANIFEST.json")):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("no checkpoint was completed in time")


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate(timeout=30)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> Path:
    """A run whose whole process tree was SIGKILLed after its first complete checkpoint."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    proc = _start(run_dir)
    try:
        _wait_for_checkpoint(run_dir, proc)
    finally:
        _kill_tree(proc)
    assert not (run_dir / "summary.json").exists()
    return run_dir


def _check_whole_run(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["gradients_computed"] >= GRADIENTS
    assert summary["gradients_lost"] == 0 and summary["gradients_duplicated"] == 0
    assert summary["exactly_once"] is True
    assert summary["replicas_agree"] is True
    assert summary["gradients_applied"] == [summary["gradients_computed"]] * 4
    assert summary["recomputed_after_resume"] >= 0
    # The event log covers the whole run: every (origin, id) once, ids 0..computed-1 of each origin.
    log = read_event_log(run_dir / "events.jsonl", clocks=False)
    assert log.origin.size == summary["gradients_computed"]
    for w in summary["per_worker"]:
        ids = np.sort(log.index[log.origin == w["rank"]])
        assert np.array_equal(ids, np.arange(w["computed"])), w["rank"]
    return summary


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_end(killed_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(killed_run, run_dir)
    done = dasgd("train", "--resume", str(run_dir), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "recomputed after resume:" in done.stdout
    resumed = _check_whole_run(run_dir)
    assert json.loads((run_dir / "resumes.json").read_text())[0]["recomputed"] == resumed["recomputed_after_resume"]
    # The same spec, uninterrupted.
    plain = dasgd("train", *RUN, "--run-dir", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr
    uninterrupted = json.loads((tmp_path / "plain" / "summary.json").read_text())
    acc = resumed["final_metrics"]["test_accuracy"]
    assert abs(acc - uninterrupted["final_metrics"]["test_accuracy"]) <= ACCURACY_TOLERANCE
    # The other commands read the resumed directory as any run's.
    report = dasgd("report", str(run_dir), "--no-plots", "--no-theory")
    assert report.returncode == 0, report.stderr
    theory = dasgd("theory", str(run_dir))
    assert theory.returncode == 0, theory.stderr


def test_sigterm_takes_a_final_checkpoint_exits_143_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    try:
        _wait_for_checkpoint(run_dir, proc)
        proc.send_signal(signal.SIGTERM)  # the launcher only, as a service manager would
        _, err = proc.communicate(timeout=60)
    finally:
        _kill_tree(proc)
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM" in err and "--resume" in err
    assert len(list(run_dir.glob("checkpoints/*/MANIFEST.json"))) >= 1
    done = dasgd("train", "--resume", str(run_dir), "--no-progress")
    assert done.returncode == 0, done.stderr
    _check_whole_run(run_dir)


def test_ctrl_c_takes_a_final_checkpoint_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    try:
        _wait_for_checkpoint(run_dir, proc)
        started = {p.name for p in run_dir.glob("checkpoints/*")}
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        _kill_tree(proc)
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT" in err
    # The final checkpoint is one begun after the signal, and complete.
    final = sorted(run_dir.glob("checkpoints/*/MANIFEST.json"))[-1].parent.name
    assert final > max(started)


def _listing(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def _no_checkpoints(d: Path) -> None:
    shutil.rmtree(d / "checkpoints")


def _partial(d: Path) -> None:
    for manifest in d.glob("checkpoints/*/MANIFEST.json"):
        manifest.unlink()


def _corrupt(d: Path) -> None:
    newest = sorted(d.glob("checkpoints/*/MANIFEST.json"))[-1].parent
    part = newest / "worker-00001.safetensors"
    data = bytearray(part.read_bytes())
    data[-5] ^= 0xFF
    part.write_bytes(bytes(data))


def _finished(d: Path) -> None:
    (d / "summary.json").write_text("{}")


def _not_a_run(d: Path) -> None:
    (d / "spec.yaml").unlink()


@pytest.mark.parametrize(
    "damage, flags, says",
    [
        (_no_checkpoints, [], "no checkpoint"),
        (_partial, [], "partial checkpoint"),
        (_corrupt, [], "checksum"),
        (None, ["--workers", "3"], "another run"),
        (None, ["--task", "quadratic"], "another run"),
        (_not_a_run, [], "not a run directory"),
        (_finished, [], "the run finished"),
    ],
)
def test_a_bad_resume_is_refused_with_one_line_and_changes_nothing(killed_run, tmp_path, damage, flags, says):
    run_dir = tmp_path / "run"
    shutil.copytree(killed_run, run_dir)
    if damage is not None:
        damage(run_dir)
    before = _listing(run_dir)
    out = dasgd("train", "--resume", str(run_dir), *flags, "--no-progress", timeout=60)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], out.stderr
    assert _listing(run_dir) == before
