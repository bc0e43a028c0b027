"""From a validated spec to the objects a worker process needs (shared by real runs and the simulator)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from dasgd.algorithms import AlgorithmError, AlgorithmParams, make_algorithm
from dasgd.core.topology import Topology, parse_topology
from dasgd.experiments.spec import RunSpec, SpecError
from dasgd.tasks import BatchSampler, Task, default_batch_size, default_lr, make_task, task_entry
from dasgd.worker.protocol import StopPolicy
from dasgd.worker.worker import Worker

__all__ = [
    "Resolved",
    "algorithm_params",
    "build_sampler",
    "build_task",
    "build_worker",
    "resolve",
    "secret_key",
    "sampler_seed",
    "stop_policy",
    "with_task_defaults",
]


@dataclass(frozen=True)
class Resolved:
    """The spec's choices with task defaults filled in."""

    lr: float
    batch_size: int
    topology: Topology


def build_task(spec: RunSpec) -> Task:
    """The spec's task (reads its dataset; raises DatasetMissing naming the install command)."""
    options = {name: getattr(spec, name) for name in task_entry(spec.task).options}
    return make_task(spec.task, **options)


def stop_policy(spec: RunSpec, task: Task, simulated: bool) -> StopPolicy:
    """The spec's stop rules, evaluation cadence and drain timeout (the same for real and simulated runs)."""
    return StopPolicy(
        max_gradients=spec.max_gradients,
        max_seconds=spec.max_seconds,
        target_accuracy=spec.target_accuracy,
        accuracy_metric=task.accuracy_metric,
        eval_every=spec.evaluation_interval(simulated=simulated),
        drain_timeout=spec.drain_timeout,
        diverge_factor=spec.diverge_factor or None,
    )


def with_task_defaults(spec: RunSpec) -> RunSpec:
    """``spec`` with the stepsize and batch size it runs with written in (the task's defaults where it gave
    none), so a run's spec.yaml records the values actually used rather than ``null``."""
    resolved = resolve(spec)
    return dataclasses.replace(spec, lr=resolved.lr, batch_size=resolved.batch_size)


def resolve(spec: RunSpec) -> Resolved:
    """Fill task defaults and parse the topology (raises SpecError for a bad topology)."""
    from dasgd.core.topology import TopologyError

    try:
        topo = parse_topology(spec.topology, spec.workers, seed=spec.seed)
    except TopologyError as exc:
        raise SpecError("--topology", str(exc)) from None
    try:
        make_algorithm(spec.algorithm, algorithm_params(spec)).check(
            spec.workers, topo, spec.grads_per_message
        )
    except AlgorithmError as exc:
        raise SpecError("--algorithm", str(exc)) from None
    return Resolved(
        lr=spec.lr if spec.lr is not None else default_lr(spec.task, spec.workers),
        batch_size=spec.batch_size if spec.batch_size is not None else default_batch_size(spec.task),
        topology=topo,
    )


def algorithm_params(spec: RunSpec) -> AlgorithmParams:
    """The spec's settings that algorithms read: every field of AlgorithmParams, taken from the spec field of
    the same name (so an algorithm's setting is one spec field plus one AlgorithmParams field)."""
    return AlgorithmParams(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(AlgorithmParams)})


def sampler_seed(spec: RunSpec, rank: int) -> int:
    """Each worker's own data-order seed: distinct per worker, fixed by the run seed."""
    return spec.seed * 1_000_003 + 7919 * (rank + 1)


def build_sampler(spec: RunSpec, rank: int, task: Task, resolved: Resolved) -> BatchSampler:
    """Worker ``rank``'s data stream: the whole training set in its own order, or its shard."""
    shard = (rank, spec.workers) if spec.data == "shards" else None
    return task.sampler(sampler_seed(spec, rank), resolved.batch_size, shard)


def build_worker(
    spec: RunSpec,
    rank: int,
    task: Task,
    resolved: Resolved,
    send_clock: bool = True,
    device: torch.device | None = None,
    sampler: BatchSampler | None = None,
) -> Worker:
    """Worker ``rank`` with its replica (identical x0 on every worker: same model seed) and data stream."""
    model = task.build_model(spec.seed)
    if device is not None:
        model = model.to(device)
    batches = sampler if sampler is not None else build_sampler(spec, rank, task, resolved)

    def loss_fn(m):
        return task.loss(m, batches.next())

    return Worker(
        rank,
        spec.workers,
        model,
        resolved.topology,
        make_algorithm(spec.algorithm, algorithm_params(spec)),
        resolved.lr,
        loss_fn=loss_fn,
        grads_per_message=spec.grads_per_message,
        send_clock=send_clock,
    )


def secret_key(spec: RunSpec) -> bytes | None:
    """The shared HMAC secret from the environment variable the spec names, if any."""
    if spec.secret_env is None:
        return None
    value = os.environ.get(spec.secret_env)
    if not value:
        raise SpecError(
            "--secret-env",
            f"environment variable {spec.secret_env} is not set or empty; "
            f"export {spec.secret_env}=<shared secret> on every machine",
        )
    return value.encode()
