"""Evaluation off the training path (runtime/evaluation.py): a snapshot of the replica is evaluated on a
background thread, so the evaluating worker is not an unlabelled straggler.

The issue: worker 0 evaluated on its training thread; on the Fashion-MNIST CNN (an evaluation about 0.6 s, a
gradient about 10 ms, an evaluation every 0.25 s) it computed 392 gradients while the others computed 1,353.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_protocol import TASK, FakeClock, workers
from torch import nn

from dasgd.core.ledger import StalenessLedger
from dasgd.runtime.evaluation import BackgroundEvaluator, Snapshot
from dasgd.runtime.loop import WorkerLoop
from dasgd.transport.inproc import InProcessNetwork
from dasgd.worker.protocol import StopPolicy
from dasgd.worker.replica import flatten_parameters


class _Net(nn.Module):
    """A parameter vector and a buffer, so a snapshot must copy both."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.register_buffer("seen", torch.zeros(1))


def _replica() -> tuple[_Net, torch.Tensor]:
    model = _Net()
    return model, flatten_parameters(model)


def test_a_snapshot_is_a_copy_the_replica_can_change_under():
    model, flat = _replica()
    snap = Snapshot.take(flat, model, now=1.5, gradients=7)
    flat.add_(1.0)
    model.seen.fill_(5.0)
    assert snap.params.tolist() == [0.0, 0.0, 0.0] and snap.buffers[0].tolist() == [0.0]
    assert (snap.time, snap.gradients) == (1.5, 7)


def test_the_background_evaluation_sees_the_snapshot_not_the_replica_changed_meanwhile():
    """The replica keeps training while its snapshot is evaluated: the metrics are those of the snapshot, and
    the evaluation (which may compute gradients) leaves the replica and its .grad alone."""
    model, flat = _replica()
    flat.copy_(torch.tensor([1.0, 2.0, 3.0]))
    model.seen.fill_(1.0)
    go = threading.Event()

    def evaluate(m: nn.Module) -> dict[str, float]:
        assert go.wait(10)  # the replica changes while this evaluation waits to start
        loss = (m.w**2).sum()
        loss.backward()  # lands in the evaluator's own copy
        return {
            "sum": float(m.w.detach().sum()),
            "seen": float(m.seen),
            "thread": float(threading.get_ident()),
        }

    ev = BackgroundEvaluator(evaluate, model, clock=time.monotonic)
    snap = ev.submit(flat, now=0.5, gradients=4)
    assert ev.busy
    with pytest.raises(RuntimeError, match="already in flight"):
        ev.submit(flat, now=0.6, gradients=5)
    flat.add_(100.0)
    model.seen.fill_(9.0)
    go.set()
    done = ev.wait(10)
    assert done is not None and not ev.busy
    got, metrics, finished = done
    assert got is snap and (got.time, got.gradients) == (0.5, 4) and finished > 0
    assert metrics["sum"] == 6.0 and metrics["seen"] == 1.0
    assert metrics["thread"] != threading.get_ident()  # not on the caller's thread
    assert flat.tolist() == [101.0, 102.0, 103.0] and model.w.grad is None and float(model.seen) == 9.0
    # A second snapshot sees the replica as it is then.
    ev.submit(flat, now=1.0, gradients=6)
    _, metrics, _ = ev.wait(10)
    assert metrics["sum"] == 306.0 and metrics["seen"] == 9.0
    assert ev.cost.evaluations == 2 and ev.cost.eval_s > 0 and ev.cost.background
    ev.close()


def test_an_evaluation_that_fails_raises_in_the_thread_that_collects_it():
    model, flat = _replica()

    def evaluate(m: nn.Module) -> dict[str, float]:
        raise ValueError("broken metric")

    ev = BackgroundEvaluator(evaluate, model, clock=time.monotonic)
    ev.submit(flat, now=0.0, gradients=0)
    with pytest.raises(ValueError, match="broken metric"):
        ev.wait(10)
    assert not ev.busy


def _run_loops(policy: StopPolicy, evaluate_model, n: int = 2):  # noqa: ANN001, ANN202
    ws = workers(n)
    net = InProcessNetwork(n)
    clocks = [FakeClock(0.001) for _ in range(n)]
    loops = [
        WorkerLoop(
            ws[r], net.endpoint(r), clocks[r], StalenessLedger(n), policy, evaluate_model=evaluate_model
        )
        for r in range(n)
    ]
    streamed: list[dict] = []
    loops[0].on_evaluation = streamed.append
    results: dict[int, object] = {}
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, loops[r].run())) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return ws, loops, results, streamed


def test_the_loop_records_background_evaluations_in_order_with_the_count_held_at_the_snapshot():
    """Only worker 0 evaluates; its records come in snapshot order, each with the gradients its replica held
    when the snapshot was taken (fewer than it holds once the slow evaluation is over), streamed as taken."""

    def evaluate_model(model: nn.Module) -> dict[str, float]:
        time.sleep(0.02)  # real time: the replica goes on training meanwhile
        return {"test_accuracy": 0.0, "loss": TASK.evaluate(model)["loss"]}

    policy = StopPolicy(max_seconds=1.0, eval_every=0.05, accuracy_metric="test_accuracy")
    ws, loops, results, streamed = _run_loops(policy, evaluate_model)
    evals = results[0].evals
    assert results[1].evals == [] and loops[1].background is None  # worker 1 never evaluates
    assert len(evals) >= 3 and streamed == evals
    times = [e["time"] for e in evals]
    counts = [e["gradients"] for e in evals]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert counts == sorted(counts) and counts[0] == 0  # the first snapshot is taken at the start
    assert counts[-1] <= ws[0].applied
    cost = results[0].eval_cost
    assert cost["background"] is True and cost["evaluations"] == len(evals)
    assert cost["eval_s"] >= 0.02 * len(evals)
    assert results[1].eval_cost == {}


def test_the_target_accuracy_stop_fires_from_background_evaluations_and_only_from_them():
    def reached(model: nn.Module) -> dict[str, float]:
        return {"test_accuracy": 1.0}

    policy = StopPolicy(max_seconds=30.0, target_accuracy=0.9, eval_every=0.05)
    _, _, results, _ = _run_loops(policy, reached)
    assert results[0].stop_reason == "target_accuracy" and results[1].stop_reason == "stop_requested"
    first = results[0].evals[0]
    assert first["test_accuracy"] == 1.0 and results[0].train_end >= first["time"]

    def never(model: nn.Module) -> dict[str, float]:
        return {"test_accuracy": 0.5}

    policy = StopPolicy(max_seconds=0.5, target_accuracy=0.9, eval_every=0.05)
    _, _, results, _ = _run_loops(policy, never)
    assert "target_accuracy" not in {results[0].stop_reason, results[1].stop_reason}
    assert results[0].evals and all(e["test_accuracy"] == 0.5 for e in results[0].evals)


# -- real processes ---------------------------------------------------------------------------------------


def _train(run_dir: Path, extra_env: dict[str, str]) -> dict:
    from test_multiprocess import ENV

    args = [
        "--task",
        "quadratic",
        "--dim",
        "20",
        "--workers",
        "3",
        "--max-seconds",
        "3",
        "--eval-every",
        "0.05",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "dasgd", "train", *args, "--run-dir", str(run_dir), "--no-progress"],
        env={**ENV, **extra_env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["_stdout"] = proc.stdout
    return summary


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_an_expensive_evaluation_no_longer_makes_the_evaluating_worker_a_straggler(tmp_path):
    """Each evaluation made to take 0.2 s, one due every 0.05 s. On the training thread (the old placement,
    kept behind DASGD_EVAL_INLINE=1) worker 0 computes a fifth of what the others do, and the run now says
    why; on a snapshot in the background it keeps pace (within 2x of the slowest other worker)."""
    delay = {"DASGD_EVAL_DELAY": "0.2"}
    inline = _train(tmp_path / "inline", {**delay, "DASGD_EVAL_INLINE": "1"})
    counts = {w["rank"]: w["computed"] for w in inline["per_worker"]}
    assert counts[0] < 0.5 * min(counts[1], counts[2]), counts  # the original failure
    cost = inline["per_worker"][0]["evaluation"]
    assert cost["background"] is False and cost["eval_pause_s"] == cost["eval_s"] >= 0.2 * cost["evaluations"]
    assert "evaluations on its training thread" in inline["_stdout"]

    background = _train(tmp_path / "background", delay)
    counts = {w["rank"]: w["computed"] for w in background["per_worker"]}
    assert counts[0] >= 0.5 * min(counts[1], counts[2]), counts
    workers = {w["rank"]: w for w in background["per_worker"]}
    cost = workers[0]["evaluation"]
    assert "evaluation" not in workers[1] and "evaluation" not in workers[2]
    assert cost["background"] is True and cost["evaluations"] >= 3
    assert cost["eval_s"] >= 0.2 * cost["evaluations"]
    # Training stopped only to copy the replica (microseconds each; generous for a loaded machine), and
    # after the drain the worker waited at most one evaluation for the last one.
    assert cost["eval_pause_s"] < 0.1 * cost["eval_s"] and cost["eval_wait_s"] <= cost["eval_s"]
    report = (tmp_path / "background" / "report.md").read_text()
    assert "evaluations of snapshots on a background thread" in report
    events = [
        json.loads(line) for line in (tmp_path / "background" / "events.jsonl").read_text().splitlines()
    ]
    evals = [e for e in events if e.get("type") == "eval"]
    during = [e for e in evals if not e.get("final")]
    assert len(during) == cost["evaluations"] and evals[-1].get("final")
    times = [e["time"] for e in during]
    counts_held = [e["gradients"] for e in during]
    assert times == sorted(times) and counts_held == sorted(counts_held)
