"""`dasgd simulate`: build a run's workers exactly as a real run does, and drive them in virtual time.

The worker, algorithm, topology, task and stop rules are the real ones (runs/build.py, worker/rules.py);
only the clock, the transport and the scheduling come from dasgd.sim. The run directory has the same files
as a real run, with virtual time on every time axis.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dasgd.experiments.spec import RunSpec
from dasgd.metrics.shard import WorkerShard
from dasgd.runs.build import (
    Resolved,
    build_sampler,
    build_task,
    build_worker,
    resolve,
    stop_policy,
    with_task_defaults,
)
from dasgd.runs.results import (
    OutputOptions,
    PhaseCallback,
    run_log,
    summarize,
    worker_shard,
    write_run_outputs,
)
from dasgd.runs.summary import RunSummary
from dasgd.sim.engine import SimOutcome, Simulation
from dasgd.sim.models import ComputeModel, FailurePlan, LinkModel, NetworkModel, read_step_trace
from dasgd.tasks import Task

__all__ = ["build_simulation", "simulate", "compute_model", "network_model", "stragglers_of"]


def stragglers_of(spec: RunSpec) -> dict[int, float]:
    """Slowdown per worker: the spec's named stragglers, plus a seeded share of the others."""
    slow = dict(spec.stragglers)
    sim = spec.simulation
    k = int(round(sim.straggler_share * spec.workers))
    if k and sim.slowdown > 1:
        others = np.array([r for r in range(spec.workers) if r not in slow])
        rng = np.random.default_rng([spec.seed, 11])
        for r in rng.choice(others, size=min(k, len(others)), replace=False):
            slow[int(r)] = sim.slowdown
    return slow


def compute_model(spec: RunSpec) -> ComputeModel:
    sim = spec.simulation
    traces = read_step_trace(sim.trace) if sim.compute == "trace" and sim.trace else ()
    return ComputeModel(sim.compute, sim.compute_time, sim.compute_sigma, traces, stragglers_of(spec))


def network_model(spec: RunSpec) -> NetworkModel:
    sim = spec.simulation
    default = LinkModel(sim.latency, sim.latency_sigma, sim.bandwidth)
    overrides = {(s, d): LinkModel(lat, sim.latency_sigma, bw) for s, d, lat, bw in sim.links}
    return NetworkModel(default, overrides, sim.loss, sim.loss_mode, sim.retransmit_after)


def build_simulation(
    spec: RunSpec, on_progress: Callable[[dict], None] | None = None
) -> tuple[Simulation, Task, Resolved]:
    """The spec's workers (built as for a real run) inside a ready-to-run simulation engine."""
    task = build_task(spec)
    resolved = resolve(spec)
    samplers = [build_sampler(spec, r, task, resolved) for r in range(spec.workers)]
    # Message clocks cost world_size ints per message; the simulator's ledger does not need them.
    workers = [
        build_worker(spec, r, task, resolved, send_clock=False, sampler=samplers[r])
        for r in range(spec.workers)
    ]
    sim = spec.simulation
    policy = stop_policy(spec, task, simulated=True)
    failures = FailurePlan(sim.crashes, sim.crash_rate, sim.link_down)
    engine = Simulation(
        workers,
        samplers,
        task,
        compute_model(spec),
        network_model(spec),
        failures,
        policy,
        spec.seed,
        batched=sim.batched,
        on_progress=on_progress,
    )
    return engine, task, resolved


def simulate(
    spec: RunSpec,
    run_dir: Path,
    on_progress: Callable[[dict], None] | None = None,
    on_phase: PhaseCallback | None = None,
) -> RunSummary:
    """Run ``spec`` in the simulator and write its run directory; return the summary, ``simulation`` set.

    ``on_progress`` gets the engine's progress dicts while it runs, then one with a ``"phase"`` key (and the
    final ``computed`` and ``time``) when the run directory is being written. ``on_phase`` hears the
    end-of-run phases (summarising, plotting, estimating the theory's constants, ...) with their progress.
    """
    wall_start = time.perf_counter()
    engine, task, resolved = build_simulation(spec, on_progress)
    workers = engine.workers
    sim = spec.simulation
    if spec.audit:
        for w in workers:
            w.start_audit(run_dir / "audit")
    outcome = engine.run()
    if on_progress is not None:
        # Summarising and writing a large run takes a while (15 s for 1,000 workers x 176,000 gradients).
        computed = sum(w.computed for w in workers)
        on_progress(
            {
                "phase": "summarising and writing the run directory",
                "computed": computed,
                "time": outcome.end_time,
            }
        )
    if on_phase is not None:
        on_phase("summarising", 0, 1)
    live = [r for r in range(spec.workers) if not outcome.crashed[r]]
    if not live:
        # As a real run whose every worker died (launcher.RunFailed): there is no replica left to summarise.
        raise RuntimeError(
            f"every worker crashed by virtual time {outcome.end_time:.4g} s (--crash, --crash-rate): no replica "
            "is left to summarise; crash fewer workers or lower --crash-rate"
        )
    if spec.audit:
        for r in live:  # a crashed worker leaves only its gradients, as a killed process does
            workers[r].save_audit()
    evaluator = live[0] if live else 0
    final_metrics = task.evaluate(workers[evaluator].model, full=True) if live else {}
    outcome.evals.append(
        {
            "worker": evaluator,
            "time": outcome.end_time,
            "gradients": workers[evaluator].applied,
            "final": 1.0,
            **final_metrics,
        }
    )
    # The shards carry each worker's counters; the gradient records stay in one table (a clock of n integers
    # per gradient: at 1,000 workers x 10^5 gradients, hundreds of megabytes), never copied whole.
    shards = [_shard(engine, outcome, r, evaluator, final_metrics, task, resolved) for r in live]
    # A crashed worker's records stay in, as a real worker's streamed records do (metrics/stream.py).
    log = run_log(shards, spec.workers, outcome.records.take())
    crashed = {r: workers[r].computed for r in range(spec.workers) if outcome.crashed[r]}
    summary = summarize(
        spec,
        shards,
        task.describe(),
        resolved.batch_size,
        resolved.lr,
        time_unit="virtual",
        log=log,
        dead_computed=crashed,
    )
    simulation = {
        **sim.to_dict(),
        "events": outcome.events_processed,
        "virtual_end_s": outcome.end_time,
        "crashed_workers": [r for r in range(spec.workers) if outcome.crashed[r]],
        "messages_lost": outcome.lost_messages,
        "gradients_lost_in_network": outcome.lost_gradients,
        "retransmissions": outcome.retransmissions,
        "stragglers": {str(k): v for k, v in sorted(stragglers_of(spec).items())},
        "wall_time_s": time.perf_counter() - wall_start,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    summary = dataclasses.replace(summary, simulation=simulation)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(with_task_defaults(spec).to_yaml())  # the lr and batch size used
    write_run_outputs(run_dir, summary, log, options=OutputOptions.of(spec), on_phase=on_phase)
    return summary


def _shard(
    engine: Simulation,
    outcome: SimOutcome,
    r: int,
    evaluator: int,
    final_metrics: dict,
    task: Task,
    resolved: Resolved,
) -> WorkerShard:
    """Worker ``r``'s end-of-run shard (as a real worker process would write it)."""
    return worker_shard(
        engine.workers[r],
        None,
        stop_reason=outcome.stop_reason[r],
        drained=outcome.drained[r],
        train_end=outcome.train_end[r],
        drain_end=outcome.end_time if math.isnan(outcome.drain_end[r]) else outcome.drain_end[r],
        evals=outcome.evals if r == evaluator else [],
        transport=engine.net.stats[r].to_dict(),
        final_metrics=final_metrics if r == evaluator else {},
        task_info=task.describe(),
        batch_size=resolved.batch_size,
        lr=resolved.lr,
    )
