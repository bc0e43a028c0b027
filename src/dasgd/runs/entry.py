"""The body of one worker process, for `dasgd train` (its own launcher) and for torchrun alike.

Started with the torch.distributed environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), it builds the
worker from the spec, trains through the one loop, drains, and gathers every worker's result at rank 0,
which writes the run directory. Progress goes to ``progress/rank<r>.json`` files that the launcher reads
(``DASGD_PROGRESS_DIR``), or to a progress bar on rank 0 under torchrun.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dasgd.core.ledger import StalenessLedger
from dasgd.experiments.spec import RunSpec
from dasgd.metrics.shard import WorkerShard
from dasgd.metrics.stream import RecordStream, StreamedLedger, read_stream
from dasgd.runs.build import build_sampler, build_task, build_worker, resolve, secret_key, stop_policy
from dasgd.runs.checkpoints import (
    RESUME_DIR_ENV,
    RESUME_HISTORY_ENV,
    RESUME_TIME_ENV,
    PartWriter,
    checkpoint_identity,
)
from dasgd.runs.results import OutputOptions, run_log, summarize, worker_shard, write_run_outputs
from dasgd.runs.summary import RunSummary
from dasgd.runtime.clock import WallClock
from dasgd.runtime.loop import WorkerLoop
from dasgd.runtime.session import DistributedSession, StartupTimeout
from dasgd.transport.handshake import HandshakeError, agree_run_nonce, spec_digest
from dasgd.transport.torchdist import TorchDistTransport
from dasgd.worker.checkpoint import WorkerState, read_worker_checkpoint

__all__ = ["run_process", "PROGRESS_DIR_ENV", "RESULTS_DIR_ENV"]

PROGRESS_DIR_ENV = "DASGD_PROGRESS_DIR"
RESULTS_DIR_ENV = "DASGD_RESULTS_DIR"
EVAL_INLINE_ENV = "DASGD_EVAL_INLINE"
"""Set to 1: evaluate on the training thread, as before evaluation moved off it (for measurements)."""
EVAL_DELAY_ENV = "DASGD_EVAL_DELAY"
"""Seconds added to each evaluation during training (tests: an evaluation made expensive)."""


def _threads_per_worker() -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (os.cpu_count() or 1) // max(1, local))


def _file_progress(folder: Path, rank: int) -> Callable[[dict], None]:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"rank{rank}.json"
    tmp = folder / f".rank{rank}.json.tmp"

    def write(info: dict) -> None:
        tmp.write_text(json.dumps(info))
        os.replace(tmp, target)  # atomic: the launcher never reads half a file

    return write


def _device(spec: RunSpec) -> torch.device:
    if spec.device == "cpu":
        return torch.device("cpu")
    # One GPU per process, chosen by the local rank as torchrun and dasgd's launcher set it.
    index = int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _make_transport(spec: RunSpec, session: DistributedSession, worker, device: torch.device):
    key = secret_key(spec)
    n, dtype = worker.params.numel(), worker.params.dtype
    coalesce = worker.algorithm.coalesce_gradients
    # Every link opens with a handshake bound to this run's nonce and spec (the transport compares the world
    # size, model size and dtype itself); a worker that differs is refused by name (HandshakeError).
    links = {
        "nonce": agree_run_nonce(session.collective_group),
        "spec_digest": spec_digest(spec.task, spec.algorithm, spec.topology, spec.seed, spec.data),
        # A peer's HELLO is part of start-up: the same bound as the other start-up stages.
        "handshake_timeout": spec.startup_timeout,
    }
    if device.type == "cpu":
        return TorchDistTransport(
            session.rank, spec.workers, n, dtype, group=session.p2p_group, key=key, coalesce=coalesce, **links
        )
    from dasgd.transport.splitplane import SplitPlaneTransport, make_data_groups

    up, down = make_data_groups("nccl")
    group = session.p2p_group
    return SplitPlaneTransport(
        session.rank, spec.workers, n, dtype, device, group, up, down, key=key, coalesce=coalesce, **links
    )


def _carry_over(ledger: StalenessLedger, stream: RecordStream | None, state: WorkerState, history: str | None) -> None:
    """Take this worker's gradient records up to the cut (ids below ``state.computed``) from the interrupted
    run's stream into the new ledger (and stream), and its evaluations into the new stream: the resumed
    run's log covers the whole run. Records after the cut are dropped: those gradients are computed again."""
    old = read_stream(Path(history), state.rank, state.world_size) if history else None
    if old is not None:
        for i, t0, t1, c in zip(old.index, old.start, old.end, old.clock):
            if i < state.computed:
                ledger.record(state.rank, int(i), float(t0), float(t1), c)
    if stream is not None:
        for record in state.protocol.get("evals", []):
            stream.evaluation(record)


def run_process(
    spec: RunSpec, run_dir: Path, on_progress: Callable[[dict], None] | None = None
) -> RunSummary | None:
    """Run this process's worker to the end of the run. Returns the summary on rank 0, None elsewhere."""
    torch.set_num_threads(_threads_per_worker())
    # The default group is always Gloo: it carries the (CPU) message headers and the collectives. CUDA
    # replicas add two NCCL groups for the gradient payloads (the split-plane transport).
    session = DistributedSession("gloo", startup_timeout=spec.startup_timeout)
    results_dir = Path(os.environ[RESULTS_DIR_ENV]) if os.environ.get(RESULTS_DIR_ENV) else None
    try:
        if session.world_size != spec.workers:
            raise RuntimeError(
                f"the spec asks for {spec.workers} workers but {session.world_size} processes started"
            )
        rank = session.rank
        if on_progress is None and os.environ.get(PROGRESS_DIR_ENV):
            on_progress = _file_progress(Path(os.environ[PROGRESS_DIR_ENV]), rank)
        task = build_task(spec)
        resolved = resolve(spec)
        device = _device(spec)
        sampler = build_sampler(spec, rank, task, resolved)
        worker = build_worker(spec, rank, task, resolved, device=device, sampler=sampler)
        resumed: WorkerState | None = None
        if os.environ.get(RESUME_DIR_ENV):
            # A resume: this worker's part of the checkpoint (checked whole by the launcher; the protocol
            # loads the replica, clock and channel state), and the sampler goes on where it was.
            resumed = read_worker_checkpoint(Path(os.environ[RESUME_DIR_ENV]), rank, checkpoint_identity(spec))
            sampler.set_state(resumed.extra["sampler"])
        if spec.audit:
            worker.start_audit(run_dir / "audit")
        transport = _make_transport(spec, session, worker, device)
        # The time origin is agreed after every process has built its data and model, so start-up cost
        # (dataset loading) is not counted as training time.
        # Bounded: a worker that died while loading its data is named, instead of the others waiting for it.
        session.check_in("ready")
        session.barrier()  # every worker starts training together (a root's broadcast need not wait)
        clock = WallClock(session.shared_origin(time.time()))
        if resumed is not None:
            # The run's clock goes on from the checkpoint (the time it was down is not counted).
            clock = WallClock(clock.origin - float(os.environ.get(RESUME_TIME_ENV) or resumed.time))
        # Under the embedded launcher, records and evaluations are streamed next to the shard as they are
        # taken, so a worker killed mid-run still leaves its gradients and evaluations (metrics/stream.py).
        # Each record reaches the OS before its gradient is pushed (the ledger records, then the worker commits),
        # so every gradient a survivor holds has its record on disk: one small write per gradient (about a
        # microsecond, against a millisecond for the gradient itself) buys an exact account of a dead worker.
        stream = RecordStream(results_dir, rank, spec.workers, flush_every=0.0) if results_dir else None
        ledger = StalenessLedger(spec.workers) if stream is None else StreamedLedger(spec.workers, stream)
        if resumed is not None:
            _carry_over(ledger, stream, resumed, os.environ.get(RESUME_HISTORY_ENV))
        # Every worker can evaluate; the loop lets only the lowest live rank do it, so evaluation and the
        # target-accuracy stop survive the death of worker 0. It evaluates a snapshot of its replica on a
        # background thread, so evaluating does not make it a straggler (runtime/evaluation.py).
        delay = float(os.environ.get(EVAL_DELAY_ENV) or 0.0)

        def evaluate_model(model: torch.nn.Module) -> dict[str, float]:
            if delay > 0:
                time.sleep(delay)
            return task.evaluate(model, full=False)

        inline = os.environ.get(EVAL_INLINE_ENV) == "1"
        policy = stop_policy(spec, task, simulated=False)
        # Checkpoints are taken under the embedded launcher, which finalises them (runs/checkpoints.py).
        writer = PartWriter(run_dir, spec) if results_dir is not None and spec.checkpoint_every > 0 else None
        loop = WorkerLoop(
            worker,
            transport,
            clock,
            ledger,
            policy,
            (lambda: evaluate_model(worker.model)) if inline else None,
            on_progress,
            slowdown=spec.slowdown(rank),
            on_evaluation=stream.evaluation if stream is not None else None,
            evaluate_model=None if inline else evaluate_model,
            checkpoint_every=spec.checkpoint_every if writer is not None else 0.0,
            on_checkpoint=writer.submit if writer is not None else None,
            extra_state=lambda: {"sampler": sampler.state()},
            resume_from=resumed,
        )
        if writer is not None:
            # The launcher asks for a checkpoint now (it was interrupted) with SIGUSR1; Ctrl-C is its to handle.
            signal.signal(signal.SIGUSR1, lambda *_: setattr(loop, "checkpoint_requested", True))
        result = loop.run()
        if writer is not None:
            writer.close()
            refused = loop.checkpoint_errors
            more = f" (and {len(refused) - 1} more refused)" if len(refused) > 1 else ""
            for line in [*writer.errors, *([refused[0] + more] if refused else [])]:
                sys.stderr.write(f"dasgd worker {rank}: {line}\n")
        if worker.audit is not None:
            worker.save_audit()
        evaluates = loop.evaluates
        final_metrics = task.evaluate(worker.model, full=True) if evaluates else {}
        if evaluates:
            # Marked: this one is on the full test set after the drain, the others on a fixed subset.
            final = {"worker": rank, "time": clock.now(), "gradients": worker.applied, "final": 1.0}
            result.evals.append({**final, **final_metrics})
        shard = worker_shard(
            worker,
            ledger,
            stop_reason=result.stop_reason,
            drained=result.drained,
            train_end=result.train_end,
            drain_end=result.drain_end,
            evals=result.evals,
            transport=transport.stats().to_dict(),
            final_metrics=final_metrics,
            task_info=task.describe(),  # every shard: the run's description survives any one death
            batch_size=resolved.batch_size,
            lr=resolved.lr,
            eval_cost=result.eval_cost,
        )
        if results_dir is not None:
            # Embedded launcher: results go to files, so a dead worker cannot hang a collective; the
            # launcher summarises. Once drained and flushed, nobody has anything left to send us.
            results_dir.mkdir(parents=True, exist_ok=True)
            tmp = results_dir / f".rank{rank}.npz.tmp"
            tmp.write_bytes(shard.to_bytes())
            os.replace(tmp, results_dir / f"rank{rank}.npz")
            if stream is not None:
                stream.close()
            transport.close()
            return None
        gathered = session.gather_bytes(shard.to_bytes())
        summary: RunSummary | None = None
        if rank == 0:
            assert gathered is not None
            shards = [WorkerShard.from_bytes(b) for b in gathered]
            log = run_log(shards, spec.workers)  # merged once: the summary and the run directory both read it
            summary = summarize(spec, shards, task.describe(), resolved.batch_size, resolved.lr, log=log)
            write_run_outputs(run_dir, summary, log, options=OutputOptions.of(spec))
        # Everyone has drained and gathered: nothing is in flight any more, so the receivers can be released.
        # Each rank must expect the SHUTDOWN before any peer sends one (else it is refused as early).
        transport.expect_shutdown()
        session.barrier()
        transport.shutdown()
        session.close()
        return summary
    except BaseException:
        session.close()
        raise


def main(argv: list[str] | None = None) -> int:
    """``python -m dasgd.runs.entry RUN_DIR``: run one worker of the run whose spec is RUN_DIR/spec.yaml."""
    from dasgd.experiments.spec import load_spec_file, resolve_spec

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m dasgd.runs.entry RUN_DIR\n")
        return 2
    run_dir = Path(args[0])
    if os.environ.get(RESULTS_DIR_ENV):
        # Under dasgd's launcher a Ctrl-C reaches the whole process group: the launcher handles it (a final
        # checkpoint, then it stops the workers), so a worker does not die of it on its own.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a checkpoint request before training: nothing to save
    spec = resolve_spec(load_spec_file(run_dir / "spec.yaml"))
    try:
        run_process(spec, run_dir)
    except (StartupTimeout, HandshakeError) as exc:
        # Expected when a peer died at start-up, or was refused when the links opened (another key, spec or
        # version): one line in the log says which, no traceback.
        sys.stderr.write(f"dasgd worker {os.environ.get('RANK', '?')}: {exc}\n")
        sys.stderr.flush()
        os._exit(3)
    sys.stdout.flush()
    sys.stderr.flush()
    # The transport's receiver thread may still be blocked in a posted receive; tearing the process group
    # down under it can hang inside Gloo. Everything is written and flushed, so leave at once.
    os._exit(0)


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
