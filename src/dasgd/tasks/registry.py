"""The task registry: one entry per task, holding everything the rest of dasgd needs to know about it.

A task is one file that builds it (a :class:`~dasgd.tasks.base.Task` subclass or a factory) and one
:class:`TaskEntry` line in :data:`TASKS`. Nothing elsewhere names a task: the spec's default budget, the
stepsize and batch-size defaults, which spec settings the task takes, and whether a target accuracy means
anything for it are all read from its entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dasgd.tasks.base import Task, TaskError

__all__ = ["TaskEntry", "TASKS", "task_entry"]


@dataclass(frozen=True)
class TaskEntry:
    """What dasgd knows about one task."""

    name: str
    build: Callable[..., Task]
    """``build(**options) -> Task``: reads the dataset (DatasetMissing names the install command)."""
    summary: str
    """One line for tables and help."""
    default_lr: float
    """A fixed SGD stepsize that converges at the default batch size (see ``lr_scales_with_workers``)."""
    default_batch_size: int = 64
    default_budget: int = 2000
    """Gradients to train when a spec gives no stop rule: a few epochs."""
    options: tuple[str, ...] = ()
    """The spec settings the task takes, passed to ``build`` by name (the quadratic's dim, noise, ...)."""
    lr_scales_with_workers: bool = False
    """The default stepsize is ``default_lr / workers``: a task whose curvature is known and whose stale
    gradients (about ``workers`` of them on a complete graph) make the sequential stepsize diverge."""
    has_accuracy: bool = True
    """Whether evaluations report an accuracy (a target accuracy can stop the run)."""

    def lr(self, workers: int = 1) -> float:
        """The default stepsize with ``workers`` workers."""
        return self.default_lr / max(1, int(workers)) if self.lr_scales_with_workers else self.default_lr


def _entries() -> tuple[TaskEntry, ...]:
    # Imported here: the task modules pull in torch and dataset readers, which the spec's validation only
    # needs once it looks a task up.
    from dasgd.tasks.classification import DIGITS_LOGREG, FASHION_CNN, MNIST_LOGREG
    from dasgd.tasks.quadratic import QUADRATIC

    return (QUADRATIC, MNIST_LOGREG, DIGITS_LOGREG, FASHION_CNN)


TASKS: dict[str, TaskEntry] = {e.name: e for e in _entries()}
"""Every task by name, in the order they are listed to users."""


def task_entry(name: str) -> TaskEntry:
    """The entry of task ``name``.

    Raises:
        TaskError: unknown task name (the message lists the known ones).
    """
    entry = TASKS.get(name)
    if entry is None:
        raise TaskError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return entry
