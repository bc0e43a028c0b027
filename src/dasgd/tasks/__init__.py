"""Workloads: what the workers train. A registry of named tasks over one small :class:`Task` interface.

Each task has one :class:`TaskEntry` in :data:`TASKS` (tasks/registry.py): how to build it, its default
stepsize, batch size and budget, the spec settings it takes, whether it reports an accuracy. Adding a task is
one file that builds it and one line in the registry. ``dasgd train --help`` lists them; the defaults are for
plain fixed-stepsize SGD, and the tests check that they converge.
"""

from __future__ import annotations

from dasgd.tasks.base import Batch, BatchSampler, DatasetMissing, Task, TaskError
from dasgd.tasks.registry import TASKS, TaskEntry, task_entry

__all__ = [
    "TASKS",
    "TASK_NAMES",
    "Batch",
    "BatchSampler",
    "DatasetMissing",
    "Task",
    "TaskEntry",
    "TaskError",
    "default_batch_size",
    "default_lr",
    "make_task",
    "task_entry",
]

TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def default_lr(name: str, workers: int = 1) -> float:
    """A fixed SGD stepsize that converges for task ``name`` at its default batch size with ``workers``.

    Most tasks keep one stepsize, chosen for a few workers; at hundreds of workers pass a smaller ``--lr``
    (the report's theory section says when the stepsize is above the bounds' condition). The quadratic's is
    ``0.5 / workers`` (see its registry entry).

    Raises:
        TaskError: unknown task name.
    """
    return task_entry(name).lr(workers)


def default_batch_size(name: str) -> int:
    """The default mini-batch size of task ``name``.

    Raises:
        TaskError: unknown task name.
    """
    return task_entry(name).default_batch_size


def make_task(name: str, **options: object) -> Task:
    """Build the task called ``name``.

    Options whose value is None mean "not given" for every task. ``quadratic`` takes ``dim`` (100),
    ``noise`` (sigma, 1.0), ``condition`` (10.0) and ``seed`` (0, the problem instance); the classification
    tasks take no options. Datasets are read on the first build in a process and cached.

    Raises:
        TaskError: unknown task name, unknown option, or an option out of range.
        DatasetMissing: the task's dataset is not installed (the message names the install command).
    """
    entry = task_entry(name)
    given = {key: value for key, value in options.items() if value is not None}
    unknown = sorted(set(given) - set(entry.options))
    if unknown:
        accepted = ", ".join(entry.options) if entry.options else "none"
        raise TaskError(f"task {name!r} does not take option(s) {', '.join(unknown)}; it accepts: {accepted}")
    return entry.build(**given)
