"""Turn the workers' end-of-run shards into a run directory: event log, metrics, summary, plots, report.

Everything written here is derived from the shards alone, and every figure can be regenerated from
``events.jsonl`` (``dasgd report RUN_DIR``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dasgd.experiments.spec import RunSpec
from dasgd.metrics.agreement import replica_tolerance
from dasgd.metrics.eventlog import EVAL_RESERVED_KEYS, EventLog
from dasgd.metrics.shard import WorkerShard
from dasgd.metrics.stream import StreamRead
from dasgd.runs.summary import UNSET, RunSummary, WorkerSummary

__all__ = [
    "OutputOptions",
    "PhaseCallback",
    "run_log",
    "summarize",
    "write_run_outputs",
    "render_run_dir",
    "worker_shard",
]


def worker_shard(
    worker: Any,
    ledger: Any | None,
    *,
    stop_reason: str,
    drained: bool,
    train_end: float,
    drain_end: float,
    evals: list[dict],
    transport: dict,
    final_metrics: dict,
    task_info: dict,
    batch_size: int,
    lr: float,
    eval_cost: dict | None = None,
) -> WorkerShard:
    """One worker's end-of-run result (real or simulated): its gradient records, replica and counters.

    ``ledger`` None leaves the records out (a simulation keeps every worker's records in one table).
    ``eval_cost``: what evaluating cost this worker (runtime/evaluation.py), for a worker that evaluated
    during the run; left out of the shard when empty.
    """
    from dasgd.worker.replica import checksum

    if ledger is None:
        origin, index = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        start, end = np.zeros(0), np.zeros(0)
        clocks = np.zeros((0, worker.world_size), dtype=np.int32)
    else:
        origin, index, start, end, clocks = ledger.arrays()
    return WorkerShard(
        origin=origin,
        index=index,
        start=start,
        end=end,
        clock=clocks,
        params=worker.params.detach().cpu().numpy().copy(),
        # The worker has finished: its clock no longer changes (no n x n copy), unless ids past a gap must be
        # counted too (gradients lost through a dead forwarder), which only a copy can hold.
        final_clock=worker.held() if worker.has_gaps else worker.clock,
        meta={
            "rank": worker.rank,
            "computed": worker.computed,
            "stop_reason": stop_reason,
            "drained": drained,
            "train_end": train_end,
            "drain_end": drain_end,
            "evals": evals,
            "rejected": dict(worker.rejected),
            "unreachable": sorted(worker.unreachable),
            "non_finite_from": {str(o): int(c) for o, c in sorted(worker.non_finite_origins.items())},
            "algorithm_counts": dict(getattr(worker.algorithm, "counts", {})),
            "transport": transport,
            "param_checksum": checksum(worker.params)[:16],
            "final_metrics": final_metrics,
            "task_info": task_info,
            "batch_size": batch_size,
            "lr": lr,
            **({"eval_cost": dict(eval_cost)} if eval_cost else {}),
        },
    )


def summarize(
    spec: RunSpec,
    shards: list[WorkerShard],
    task_info: dict[str, Any],
    batch_size: int,
    lr: float,
    time_unit: str = "wall",
    *,
    log: EventLog,
    streams: Mapping[int, StreamRead] | None = None,
    dead_computed: Mapping[int, int] | None = None,
) -> RunSummary:
    """The run's summary (``summary.json`` is its :meth:`~dasgd.runs.summary.RunSummary.to_dict`).

    ``shards`` holds one shard per worker that finished; a worker that died leaves none. Its gradient count
    is then known only as the most any survivor holds, and the gradients some survivors hold and others do
    not are counted as lost. ``log`` is the run's records (:func:`run_log`). ``streams`` holds what dead
    workers streamed before they died (metrics/stream.py): their computed counts are then exact.
    ``dead_computed``: the same counts known otherwise (the simulator keeps its crashed workers).
    """
    shards = sorted(shards, key=lambda s: s.meta["rank"])
    n = spec.workers
    live = [int(s.meta["rank"]) for s in shards]
    dead = sorted(set(range(n)) - set(live))
    # Per-worker clocks are n entries each: at 10,000 workers, n x n tables are 0.8 GB apiece, so they are
    # reduced one worker at a time rather than stacked.
    computed = np.zeros(n, dtype=np.int64)
    for s in shards:
        np.maximum(computed, s.final_clock, out=computed)  # dead workers: the most anyone got
    for s in shards:
        computed[s.meta["rank"]] = s.meta["computed"]
    known = {rank: stream.computed for rank, stream in (streams or {}).items()}
    known.update(dead_computed or {})
    for rank, count in known.items():
        if rank in dead:
            computed[rank] = max(int(computed[rank]), int(count))
    total = int(computed.sum())
    replicas = _replica_contract(spec.algorithm)
    # Which replicas must end holding every gradient: all of them (gradient-push algorithms), the server's
    # (parameter-server ASGD), or none (model averaging: no replica holds a gradient set).
    holders = [s.final_clock for s in shards if replicas != "server" or s.meta["rank"] == 0]
    if replicas == "none" or not holders:
        lost, duplicated, exactly_once = 0, 0, None
    else:
        # A gradient is lost when some live holder does not hold it at the end.
        least = holders[0].astype(np.int64)
        duplicated, exactly_once = 0, True
        for clock in holders:
            np.minimum(least, clock, out=least)
            duplicated += int(np.maximum(0, clock - computed).sum())
            exactly_once = exactly_once and bool(np.array_equal(clock, computed))
        lost = int(np.maximum(0, computed - least).sum())
    set_digests = [hashlib.sha256(s.final_clock.astype("<i8").tobytes()).hexdigest()[:16] for s in shards]
    applied = [int(s.final_clock.sum()) for s in shards]

    ref = shards[0].params.astype(np.float64)
    with np.errstate(invalid="ignore"):  # diverged replicas (inf - inf): the difference is NaN, never "agree"
        diffs = [float(np.max(np.abs(s.params.astype(np.float64) - ref))) if ref.size else 0.0 for s in shards]
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    max_diff = max(diffs)
    tol = replica_tolerance(shards[0].params.dtype, total)
    # Only algorithms whose replicas apply the same gradients with the same weights must agree; for the
    # others the difference is reported (max_replica_diff) but agreement is not expected (None).
    replicas_agree = bool(exactly_once and max_diff / scale <= tol) if replicas == "all" else None
    counts: dict[str, int] = {}
    for s in shards:
        for k, v in s.meta.get("algorithm_counts", {}).items():
            counts[k] = counts.get(k, 0) + int(v)

    stats = log.staleness()
    steps = _mean_steps(log, n)
    train_time = max(float(s.meta["train_end"]) for s in shards)
    drain_time = max(float(s.meta["drain_end"]) for s in shards)
    reasons = sorted({s.meta["stop_reason"] for s in shards} - {"stop_requested"})
    per_worker = []
    for s, digest, held in zip(shards, set_digests, applied, strict=True):
        tr = s.meta.get("transport", {})
        rejected = dict(tr.get("rejected", {}))
        for k, v in s.meta.get("rejected", {}).items():
            rejected[k] = rejected.get(k, 0) + v
        per_worker.append(
            WorkerSummary(
                rank=s.meta["rank"],
                computed=s.meta["computed"],
                applied=held,
                rejected=rejected,
                sent_messages=tr.get("sent_messages", 0),
                sent_bytes=tr.get("sent_bytes", 0),
                coalesced=tr.get("coalesced", 0),
                undelivered=tr.get("undelivered", 0),
                slowdown=spec.slowdown(s.meta["rank"]),
                drained=s.meta["drained"],
                gradient_set=digest,
                param_checksum=s.meta.get("param_checksum", ""),
                compute_s_per_gradient=float(steps[s.meta["rank"]]),
                unreachable=list(s.meta.get("unreachable", [])),
                non_finite_from=dict(s.meta.get("non_finite_from", {})),
                **_evaluation_cost(s.meta, train_time),
            )
        )
    target_accuracy, time_to_target, gradients_to_target = _to_target(
        spec, [e for s in shards for e in s.meta.get("evals", [])]
    )
    return RunSummary(
        task=spec.task,
        algorithm=spec.algorithm,
        workers=n,
        topology=spec.topology,
        stop_reason=",".join(reasons) or "stop_requested",
        time_unit=time_unit,
        lr=lr,
        batch_size=batch_size,
        wall_time_s=train_time,
        drain_time_s=drain_time - train_time,
        samples_per_s=total * batch_size / train_time if train_time > 0 else 0.0,
        final_metrics=next((s.meta["final_metrics"] for s in shards if s.meta.get("final_metrics")), {}),
        target_accuracy=target_accuracy,
        time_to_target_s=time_to_target,
        gradients_to_target=gradients_to_target,
        gradients_computed=total,
        gradients_applied=applied,
        gradients_lost=lost,
        gradients_duplicated=duplicated,
        exactly_once=exactly_once,
        dead_workers=dead,
        dead_gradients_held={
            str(d): {str(s.meta["rank"]): int(s.final_clock[d]) for s in shards} for d in dead
        },
        cut_apart=_survivor_groups(shards),
        drained=all(s.meta["drained"] for s in shards),
        staleness=stats.to_dict(),
        replicas=replicas,
        replicas_agree=replicas_agree,
        algorithm_counts=counts,
        max_replica_diff=max_diff,
        replica_tolerance=tol * scale,
        gradient_set_digests=set_digests,
        per_worker=per_worker,
        task_info=task_info,
        faithful=_faithful(spec.algorithm) and spec.data == "shared",
        notes=spec.notes,
    )


def _evaluation_cost(meta: Mapping[str, Any], train_time: float) -> dict[str, Any]:
    """``{"evaluation": ...}`` for a worker that evaluated during the run, else {} (the key stays absent)."""
    cost = meta.get("eval_cost")
    if not cost:
        return {}
    kinds = {"evaluations": int, "background": bool}
    out = {k: kinds.get(k, float)(v) for k, v in cost.items()}
    # The share of one core the evaluation thread took over the training time (the cores the workers share).
    out["eval_cpu_share"] = float(out.get("eval_cpu_s", 0.0)) / train_time if train_time > 0 else 0.0
    return {"evaluation": out}


def _survivor_groups(shards: list[WorkerShard]) -> list[list[int]]:
    """The live workers in groups that could still reach each other, when deaths cut the topology apart
    ([] when every survivor could reach every other)."""
    if not any(s.meta.get("unreachable") for s in shards):
        return []
    groups: list[list[int]] = []
    seen: set[int] = set()
    live = {int(s.meta["rank"]) for s in shards}
    for s in sorted(shards, key=lambda s: s.meta["rank"]):
        rank = int(s.meta["rank"])
        if rank in seen:
            continue
        group = sorted(live - set(s.meta.get("unreachable", [])))
        seen.update(group)
        groups.append(group)
    return groups


def _replica_contract(algorithm: str) -> str:
    from dasgd.algorithms import ALGORITHMS

    cls = ALGORITHMS.get(algorithm)
    return cls.replicas if cls is not None else "all"


def _faithful(algorithm: str) -> bool:
    from dasgd.algorithms import ALGORITHMS

    cls = ALGORITHMS.get(algorithm)
    return bool(cls is not None and cls.faithful)


def _to_target(spec: RunSpec, evals: list[dict]) -> tuple[Any, Any, Any]:
    """(target accuracy, time, gradients) at the first evaluation that reached the spec's target accuracy
    (time and gradients None if none did); all three UNSET, absent from the summary, without a target."""
    if spec.target_accuracy is None:
        return UNSET, UNSET, UNSET
    # The end-of-run evaluation (marked "final", after the drain) is left out: its time includes the drain.
    for e in sorted((e for e in evals if not e.get("final")), key=lambda e: e["time"]):
        acc = e.get("test_accuracy")
        if acc is not None and acc >= spec.target_accuracy:
            return spec.target_accuracy, e["time"], e["gradients"]
    return spec.target_accuracy, None, None


def _mean_steps(log: EventLog, n: int) -> np.ndarray:
    """Mean compute time of each worker's gradients (0 for a worker without any)."""
    count = np.bincount(log.origin, minlength=n).astype(np.float64)
    total = np.bincount(log.origin, weights=log.end - log.start, minlength=n)
    return np.divide(total, count, out=np.zeros(n), where=count > 0)


def run_log(
    shards: list[WorkerShard],
    n: int,
    records: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
    streams: Mapping[int, StreamRead] | None = None,
) -> EventLog:
    """The run's event log, in memory: the gradient records, the evaluations sorted by time, and each
    worker's stop and drain events.

    It holds what ``events.jsonl`` will hold, in the form :func:`read_event_log` returns, so summaries,
    plots and reports come out the same from memory as from the file. ``records`` are ``(origin, index,
    start, end, clock)`` in any order, used as they are (a simulation passes its own, in completion order);
    without them every shard's records are merged in global order (completion time, then origin, then id).
    ``streams``: what workers without a shard (they died) streamed; their records and evaluations join the
    log, and each gets a "died" event at its last record.
    """
    shards = sorted(shards, key=lambda s: s.meta["rank"])
    evals: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for s in shards:
        evals.extend(_as_logged(e) for e in s.meta.get("evals", []))
        rank = s.meta["rank"]
        runs.append(
            {"event": "stop", "time": s.meta["train_end"], "worker": rank, "reason": s.meta["stop_reason"]}
        )
        if s.meta["stop_reason"] == "diverged":
            runs.append(_divergence_event(rank, s.meta["train_end"], s.meta.get("evals", [])))
        event = "drained" if s.meta["drained"] else "drain_timeout"
        runs.append({"event": event, "time": s.meta["drain_end"], "worker": rank})
    sources: list[Any] = list(shards)
    live = {int(s.meta["rank"]) for s in shards}
    for rank, stream in sorted((streams or {}).items()):
        if rank in live:
            continue
        evals.extend(_as_logged({**e, "worker": rank}) for e in stream.evals)
        if stream.end.size:
            runs.append({"event": "died", "time": float(stream.end.max()), "worker": rank})
        sources.append(_StreamRecords(rank, stream))
    origin, index, start, end, clock = _merged_records(sources, n) if records is None else records
    return EventLog(
        origin=_readonly(origin.astype(np.int64, copy=False)),
        index=_readonly(index.astype(np.int64, copy=False)),
        start=_readonly(start.astype(np.float64, copy=False)),
        end=_readonly(end.astype(np.float64, copy=False)),
        clock=_readonly(clock),
        evals=sorted(evals, key=lambda e: e["time"]),
        runs=runs,
        world_size=n,
    )


def _divergence_event(rank: int, when: float, evals: list[dict[str, Any]]) -> dict[str, Any]:
    """The "diverged" run event that marks where worker ``rank`` stopped as diverged (time ``when``), with the
    loss of its first and last evaluation before that (an evaluating worker: the exploding rule's inputs)."""
    from dasgd.worker.rules import LOSS_KEYS

    event: dict[str, Any] = {"event": "diverged", "time": when, "worker": rank}
    before = [e for e in evals if not e.get("final") and e.get("time", 0.0) <= when]
    if before:
        first, last = before[0], before[-1]
        key = next((k for k in LOSS_KEYS if k in first), None)
        event["gradients"] = last.get("gradients")
        if key is not None:
            event.update({"metric": key, "first_loss": first.get(key), "loss": last.get(key)})
    return event


class _StreamRecords:
    """A dead worker's streamed records, in the shape :func:`_merged_records` reads from a shard."""

    def __init__(self, rank: int, stream: StreamRead) -> None:
        self.origin = np.full(stream.index.size, rank, dtype=np.int64)
        self.index, self.start, self.end, self.clock = stream.index, stream.start, stream.end, stream.clock


def _merged_records(
    shards: list[Any], n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every shard's records in global order; the clock table is built with one copy."""
    origin = np.concatenate([s.origin for s in shards]).astype(np.int64)
    index = np.concatenate([s.index for s in shards]).astype(np.int64)
    start = np.concatenate([s.start for s in shards]).astype(np.float64)
    end = np.concatenate([s.end for s in shards]).astype(np.float64)
    order = np.lexsort((index, origin, end))
    position = np.empty_like(order)
    position[order] = np.arange(order.size)
    dtype = np.result_type(*(s.clock.dtype for s in shards)) if shards else np.dtype(np.int64)
    clock = np.empty((order.size, n), dtype=dtype)
    at = 0
    for s in shards:
        rows = s.clock.reshape(-1, n)
        clock[position[at : at + len(rows)]] = rows  # each shard's rows straight to their global places
        at += len(rows)
    return origin[order], index[order], start[order], end[order], clock


def _as_logged(ev: dict[str, Any]) -> dict[str, Any]:
    """An evaluation as the event log stores it: integer worker and count, float time and metrics."""
    out: dict[str, Any] = {
        "worker": int(ev["worker"]),
        "time": float(ev["time"]),
        "gradients": int(ev["gradients"]),
    }
    out.update({str(k): float(v) for k, v in ev.items() if k not in EVAL_RESERVED_KEYS})
    return out


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


PhaseCallback = Callable[[str, int, int], None]
"""``on_phase(name, done, total)``: the end-of-run phase ``name`` ("plotting", "estimating constants", ...)
has ``done`` of its ``total`` steps behind it; called at the start of each phase and after each step."""


@dataclass(frozen=True)
class OutputOptions:
    """Which costly outputs the end of a run writes (the spec's ``plots``, ``theory`` and ``tensorboard``)."""

    plots: bool = True
    theory: bool = True
    tensorboard: bool = False

    @classmethod
    def of(cls, spec: RunSpec) -> OutputOptions:
        return cls(plots=spec.plots, theory=spec.theory, tensorboard=spec.tensorboard)


def write_run_outputs(
    run_dir: Path,
    summary: RunSummary,
    log: EventLog,
    render: bool = True,
    *,
    options: OutputOptions | None = None,
    on_phase: PhaseCallback | None = None,
) -> None:
    """Write events.jsonl (from ``log``, the run's records: :func:`run_log`) and summary.json (``summary``'s
    :meth:`~dasgd.runs.summary.RunSummary.to_dict`), then (unless ``render`` is False) metrics.csv, plots,
    report.md and what ``options`` ask for (default: plots and the theory section, no TensorBoard).
    ``on_phase`` hears each phase as it starts and advances."""
    from dasgd.metrics.eventlog import write_event_log

    phase = on_phase or (lambda name, done, total: None)
    phase("writing events.jsonl and summary.json", 0, 1)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_event_log(
        run_dir / "events.jsonl", log.origin, log.index, log.start, log.end, log.clock, log.evals, log.runs
    )
    (run_dir / "summary.json").write_text(
        json.dumps(summary.to_dict(), indent=2, default=_json_default) + "\n"
    )
    phase("writing events.jsonl and summary.json", 1, 1)
    if render:
        render_run_dir(run_dir, log=log, options=options, on_phase=on_phase)


def render_run_dir(
    run_dir: Path,
    log: EventLog | None = None,
    *,
    options: OutputOptions | None = None,
    on_phase: PhaseCallback | None = None,
) -> None:
    """(Re)build metrics.csv, plots, report.md (and TensorBoard files if ``options`` ask) from events.jsonl
    (or ``log``, the same records already in memory) and summary.json."""
    from dasgd.metrics.eventlog import read_event_log, write_metrics_csv
    from dasgd.metrics.plots import PLOT_FILES, plot_run
    from dasgd.runs.report import write_report

    options = options or OutputOptions()
    phase = on_phase or (lambda name, done, total: None)
    if log is None:
        log = read_event_log(run_dir / "events.jsonl")
    write_metrics_csv(log, run_dir / "metrics.csv")
    # A plain dict, every key optional: `dasgd report` re-renders directories of other dasgd versions too.
    summary = (
        json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    )
    time_label = "virtual time (s)" if summary.get("time_unit") == "virtual" else "wall time (s)"
    title = (
        f"{summary.get('algorithm', '')} on {summary.get('task', '')}, {summary.get('workers', '?')} workers"
    )
    if options.plots:
        total = len(PLOT_FILES)
        phase("plotting", 0, total)
        plot_run(
            log,
            run_dir / "plots",
            time_label=time_label,
            title=title,
            on_figure=lambda done: phase("plotting", min(done, total), total),
        )
    if options.tensorboard:
        from dasgd.metrics.tensorboard import write_run_scalars

        phase("writing TensorBoard scalars", 0, 1)
        write_run_scalars(log, run_dir / "tensorboard")
        phase("writing TensorBoard scalars", 1, 1)
    if options.theory:
        # The costly part on a large model: Hessian power iterations and mini-batch gradient variances.
        phase("estimating constants (theory)", 0, 1)
    else:
        phase("writing report.md", 0, 1)
    write_report(run_dir, log=log, theory=options.theory)  # the log already read: at scale it is gigabytes
    phase("estimating constants (theory)" if options.theory else "writing report.md", 1, 1)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
