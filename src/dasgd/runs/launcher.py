"""The one-machine launcher behind `dasgd train --workers N`: N worker processes on loopback.

Unlike torchrun's agent or mp.spawn, this launcher never kills the survivors when one worker dies: DASGD is
meant to go on without it (no barrier: a dead worker never stalls the others). It starts the
processes with the same environment torchrun would give them, follows their progress files, and collects
the summary rank 0 writes. Ctrl-C stops every worker it started.

Like torchrun's agent, the launcher hosts the run's c10d store itself and the workers join it as clients
(``TORCHELASTIC_USE_AGENT_STORE=True``): the store listens on a port the OS picks and the launcher holds it
for the whole run. Picking a "free" port, closing it and letting rank 0 bind it later was a race: any other
process could take the port in between (EADDRINUSE, or worse, workers joining a stranger's store).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.distributed import TCPStore

from dasgd.errors import DasgdError
from dasgd.experiments.spec import RunSpec
from dasgd.metrics.shard import WorkerShard
from dasgd.metrics.stream import read_stream
from dasgd.runs.build import secret_key, with_task_defaults
from dasgd.runs.checkpoints import (
    RESUME_DIR_ENV,
    RESUME_HISTORY_ENV,
    RESUME_TIME_ENV,
    checkpoint_dir,
    checkpoint_ids,
    complete_checkpoints,
    finalize_ready,
)
from dasgd.runs.results import OutputOptions, PhaseCallback, run_log, summarize, write_run_outputs
from dasgd.runs.summary import RunSummary
from dasgd.worker.checkpoint import WorkerState

__all__ = ["Interrupted", "RunFailed", "launch_local", "host_store", "store_env"]


class RunFailed(DasgdError, RuntimeError):
    """A worker process failed; the message holds the tail of its log."""


def host_store() -> TCPStore:
    """A c10d store served by this process on 127.0.0.1, on a port the OS picked (``store.port``).

    The listening socket is bound here, to loopback only (a TCPStore left to bind by itself listens on every
    interface), and handed to the store, which serves it from its own thread until it is garbage collected:
    keep the returned object for as long as any process may still connect to it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = int(sock.getsockname()[1])
        # The store takes the descriptor it is given and closes it when it is collected: hand it a duplicate,
        # so that this socket object still closes its own (the listening socket lives on in the store's).
        fd = os.dup(sock.fileno())
        return TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, master_listen_fd=fd)


def store_env(store: TCPStore) -> dict[str, str]:
    """The environment that makes ``init_process_group`` (env://) join ``store`` as a client.

    With ``TORCHELASTIC_USE_AGENT_STORE=True`` (what torchrun's agent sets) no rank hosts a store of its own,
    so no rank binds a port chosen by somebody else (torch/distributed/rendezvous.py, ``_create_c10d_store``).
    """
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(store.port),
        "TORCHELASTIC_USE_AGENT_STORE": "True",
    }


def _exit_status(code: int) -> str:
    """How a worker process ended, in words (a negative code is the signal that killed it)."""
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def launch_local(
    spec: RunSpec,
    run_dir: Path,
    on_progress: Callable[[list[dict]], None] | None = None,
    stall_timeout: float = 600.0,
    on_phase: PhaseCallback | None = None,
    resume: tuple[Path, list[WorkerState]] | None = None,
) -> RunSummary:
    """Run ``spec`` with ``spec.workers`` local processes; return the run's summary, ``failed_workers`` set.

    Args:
        spec: a validated spec.
        run_dir: the run directory (created; spec.yaml is written there).
        on_progress: called about 5 times a second with the latest progress of every worker.
        stall_timeout: seconds without any progress after which the run is declared hung and stopped.
        on_phase: hears the end-of-run phases once the workers are done (summarising, plotting, estimating
            the theory's constants, ...; :data:`~dasgd.runs.results.PhaseCallback`).
        resume: the checkpoint to continue ``run_dir``'s run from and its parts
            (:func:`~dasgd.runs.checkpoints.resume_point`): the workers load their parts; each one's
            gradient records up to the cut are carried over from the interrupted run's streams, and the
            gradients computed after the cut (discarded, computed again) are counted in the summary's
            ``recomputed_after_resume``.
    """
    secret_key(spec)  # an unset --secret-env variable is reported here (SpecError), not by every worker
    run_dir.mkdir(parents=True, exist_ok=True)
    # The stepsize and batch size actually used are written in: the workers read them back from this file.
    (run_dir / "spec.yaml").write_text(with_task_defaults(spec).to_yaml())
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    progress_dir = run_dir / "progress"
    progress_dir.mkdir(exist_ok=True)
    for old in progress_dir.glob("rank*.json"):
        old.unlink()
    shard_dir = run_dir / "shards"
    resume_env: dict[str, str] = {}
    if resume is not None:
        resume_env = _prepare_resume(run_dir, shard_dir, resume)
    shard_dir.mkdir(exist_ok=True)
    for pattern in ("rank*.npz", "rank*.records", "rank*.evals.jsonl"):
        for old in shard_dir.glob(pattern):
            old.unlink()  # a worker that dies before writing its own must not leave an earlier run's
    store = host_store()  # held until every worker has exited (the function's end)
    base_env = dict(os.environ)
    base_env.update(
        {
            **store_env(store),
            "WORLD_SIZE": str(spec.workers),
            "LOCAL_WORLD_SIZE": str(spec.workers),
            "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1",
            "DASGD_PROGRESS_DIR": str(progress_dir),
            "DASGD_RESULTS_DIR": str(shard_dir),
            **resume_env,
        }
    )
    procs: list[subprocess.Popen] = []
    log_files = []
    stop = _Signals()
    stop.install()
    try:
        for rank in range(spec.workers):
            env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank))
            # A resume appends to the interrupted run's logs.
            log = open(logs / f"rank{rank}.log", "a" if resume else "w")  # noqa: SIM115 - closed in finally
            log_files.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "dasgd.runs.entry", str(run_dir)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
        written = with_task_defaults(spec)

        def on_tick() -> None:
            if spec.checkpoint_every > 0:
                finalize_ready(run_dir, written)
            if stop.signum is not None:
                raise _StopRequested

        try:
            failures = _watch(procs, progress_dir, on_progress, stall_timeout, on_tick)
            stop.signum = None  # too late to matter: the run ended
            on_tick()  # parts written just before the workers exited
        except _StopRequested:
            signum = stop.signum
            assert signum is not None
            saved = _final_checkpoint(procs, run_dir, written)
            _stop_all(procs)
            raise Interrupted(signum, saved) from None
    except BaseException:
        _stop_all(procs)
        raise
    finally:
        stop.restore()
        for f in log_files:
            f.close()
    return _collect(spec, run_dir, shard_dir, logs, failures, on_phase, _recomputed(run_dir))


def _collect(
    spec: RunSpec,
    run_dir: Path,
    shard_dir: Path,
    logs: Path,
    failures: dict[int, int],
    on_phase: PhaseCallback | None = None,
    recomputed: int | None = None,
) -> RunSummary:
    """Summarise the shards the workers left. A worker that died left no shard, but what it streamed as it
    went (its gradient records and evaluations, metrics/stream.py) joins the run's log and summary."""
    if on_phase is not None:
        on_phase("summarising", 0, 1)
    shards = []
    streams = {}
    for rank in range(spec.workers):
        path = shard_dir / f"rank{rank}.npz"
        if path.exists():
            shards.append(WorkerShard.from_bytes(path.read_bytes()))
        else:
            stream = read_stream(shard_dir, rank, spec.workers)
            if stream is not None:
                streams[rank] = stream
    if not shards:
        # Lead with what happened to each worker; a killed one leaves no log, so the first worker that
        # wrote an error usually says why (e.g. which rank never arrived at start-up).
        states = ", ".join(f"worker {r} {_exit_status(c)}" for r, c in sorted(failures.items()))
        told = [r for r in sorted(failures) if _tail(logs / f"rank{r}.log", 1).strip() not in ("", "(no log)")]
        rank = told[0] if told else (min(failures) if failures else 0)
        raise RunFailed(
            f"no worker finished ({states or 'all exited without a result'}). The end of worker {rank}'s log "
            f"({logs}/rank{rank}.log):\n{_tail(logs / f'rank{rank}.log', 3)}"
        )
    meta0 = shards[0].meta
    log = run_log(shards, spec.workers, streams=streams)  # merged once: the summary and run directory read it
    summary = summarize(
        spec,
        shards,
        meta0.get("task_info", {}),
        int(meta0["batch_size"]),
        float(meta0["lr"]),
        log=log,
        streams=streams,
    )
    summary = dataclasses.replace(summary, failed_workers={str(r): c for r, c in sorted(failures.items())})
    if recomputed is not None:
        summary = dataclasses.replace(summary, recomputed_after_resume=recomputed)
    write_run_outputs(run_dir, summary, log, options=OutputOptions.of(spec), on_phase=on_phase)
    return summary


FINAL_CHECKPOINT_TIMEOUT = 30.0
"""Seconds an interrupted launcher waits for the final checkpoint before it stops the workers anyway."""


class Interrupted(DasgdError):
    """The launcher was interrupted (SIGINT, SIGTERM): it took a final checkpoint where it could, and stopped."""

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        saved = f"last complete checkpoint: {checkpoint}" if checkpoint else "no complete checkpoint"
        super().__init__(f"interrupted by {name}; workers stopped; {saved}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _StopRequested(Exception):
    pass


class _Signals:
    """SIGINT and SIGTERM on the launcher: the first asks for a final checkpoint and a clean stop (noted here,
    acted on by the watch loop), a second stops everything at once (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only; a launcher elsewhere keeps the caller's handling
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _final_checkpoint(procs: list[subprocess.Popen], run_dir: Path, spec: RunSpec) -> Path | None:
    """Ask the workers for a checkpoint now (SIGUSR1) and wait for it to complete (bounded); the newest
    complete checkpoint's directory, or None."""
    # The final one has an id above every checkpoint begun so far (one whose parts are on the way included).
    started = checkpoint_ids(run_dir)
    if spec.checkpoint_every > 0:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + FINAL_CHECKPOINT_TIMEOUT
        while time.monotonic() < deadline:
            finalize_ready(run_dir, spec)
            now = complete_checkpoints(run_dir)
            if now and (not started or now[-1] > started[-1]):
                break
            if all(p.poll() is not None for p in procs):
                break
            time.sleep(0.05)
        finalize_ready(run_dir, spec)
    done = complete_checkpoints(run_dir)
    return checkpoint_dir(run_dir, done[-1]) if done else None


def _stop_all(procs: list[subprocess.Popen]) -> None:
    """Terminate every worker still running; kill those that do not end within 10 s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


RESUMES = "resumes.json"
"""RUN_DIR/resumes.json: one entry per resume of the run (checkpoint, time, gradients recomputed)."""


def _prepare_resume(run_dir: Path, shard_dir: Path, resume: tuple[Path, list[WorkerState]]) -> dict[str, str]:
    """Set ``run_dir`` up to continue from checkpoint ``resume``; return the workers' environment for it.

    The interrupted run's streams move to ``shards-before-resume/`` (each worker carries its records up to
    the cut over into its new stream); checkpoints after the one resumed from are removed (never completed:
    their ids come again); the gradients computed after the cut are counted in ``resumes.json``."""
    path, states = resume
    history = run_dir / "shards-before-resume"
    if shard_dir.is_dir():
        if history.exists():
            shutil.rmtree(history)
        shard_dir.rename(history)
    recomputed = 0
    for state in states:
        old = read_stream(history, state.rank, state.world_size)
        if old is not None:
            recomputed += max(0, old.computed - state.computed)
    cid = states[0].checkpoint
    for other in sorted(path.parent.iterdir()):
        if other.is_dir() and other.name.isdigit() and int(other.name) > cid:
            shutil.rmtree(other, ignore_errors=True)
    entries = _resumes(run_dir)
    entries.append({"checkpoint": cid, "time": max(s.time for s in states), "recomputed": recomputed})
    (run_dir / RESUMES).write_text(json.dumps(entries, indent=1))
    return {
        RESUME_DIR_ENV: str(path),
        RESUME_TIME_ENV: repr(max(s.time for s in states)),
        RESUME_HISTORY_ENV: str(history),
    }


def _resumes(run_dir: Path) -> list[dict]:
    try:
        entries = json.loads((run_dir / RESUMES).read_text())
    except (OSError, ValueError):
        return []
    return entries if isinstance(entries, list) else []


def _recomputed(run_dir: Path) -> int | None:
    """Gradients recomputed over every resume of the run (None: it was never resumed)."""
    entries = _resumes(run_dir)
    if not entries:
        return None
    return sum(int(e.get("recomputed", 0)) for e in entries if isinstance(e, dict))


def _read_progress(progress_dir: Path, n: int) -> list[dict]:
    out = []
    for rank in range(n):
        try:
            out.append(json.loads((progress_dir / f"rank{rank}.json").read_text()))
        except (OSError, ValueError):
            out.append({"rank": rank, "phase": "starting", "computed": 0, "applied": 0})
    return out


def _watch(
    procs: list[subprocess.Popen],
    progress_dir: Path,
    on_progress: Callable[[list[dict]], None] | None,
    stall_timeout: float,
    on_tick: Callable[[], None] | None = None,
) -> dict[int, int]:
    """Follow the workers until all have exited; return {rank: exit code} of those that failed.

    A failed worker does not stop the others: they detect it (its connections close), stop waiting for it
    and finish their drain without it.
    """
    last_change = time.monotonic()
    last_seen: list[dict] = []
    while True:
        codes = [p.poll() for p in procs]
        seen = _read_progress(progress_dir, len(procs))
        if seen != last_seen:
            last_seen = seen
            last_change = time.monotonic()
            if on_progress is not None:
                on_progress(seen)
        if on_tick is not None:
            on_tick()
        if all(c is not None for c in codes):
            return {r: c for r, c in enumerate(codes) if c != 0}
        if time.monotonic() - last_change > stall_timeout:
            raise RunFailed(
                f"no progress for {stall_timeout:.0f} s; the run looks hung. Logs: {progress_dir.parent / 'logs'}"
            )
        time.sleep(0.2)
