"""Workloads: what the workers train. A registry of named tasks over one small :class:`Task` interface.

===============  =========================================  =============  ==========
name             workload                                   default lr     batch
===============  =========================================  =============  ==========
quadratic        noisy strongly convex quadratic (float64)  0.5 / workers  64
mnist-logreg     logistic regression on MNIST               0.05           64
digits-logreg    logistic regression on sklearn digits      0.5            64
fashion-cnn      small CNN on Fashion-MNIST                 0.05           64
===============  =========================================  =============  ==========

The defaults are for plain fixed-stepsize SGD; the tests check that they converge.
"""

from __future__ import annotations

from collections.abc import Callable

from dasgd.tasks.base import Batch, BatchSampler, DatasetMissing, Task, TaskError
from dasgd.tasks.classification import ClassificationTask, logistic_regression, small_cnn
from dasgd.tasks.datasets import load_digits, load_fashion_mnist, load_mnist
from dasgd.tasks.quadratic import QuadraticTask

__all__ = [
    "TASK_NAMES",
    "Batch",
    "BatchSampler",
    "DatasetMissing",
    "Task",
    "TaskError",
    "default_batch_size",
    "default_lr",
    "make_task",
]

TASK_NAMES: tuple[str, ...] = ("quadratic", "mnist-logreg", "digits-logreg", "fashion-cnn")

_DEFAULT_LR = {"quadratic": 0.5, "mnist-logreg": 0.05, "digits-logreg": 0.5, "fashion-cnn": 0.05}
_DEFAULT_BATCH_SIZE = {"quadratic": 64, "mnist-logreg": 64, "digits-logreg": 64, "fashion-cnn": 64}
_QUADRATIC_OPTIONS = ("dim", "noise", "condition", "seed")


def _check_name(name: str) -> None:
    if name not in TASK_NAMES:
        raise TaskError(f"unknown task {name!r}; choose one of: {', '.join(TASK_NAMES)}")


def default_lr(name: str, workers: int = 1) -> float:
    """A fixed SGD stepsize that converges for task ``name`` at its default batch size with ``workers``.

    The quadratic's is ``0.5 / workers``. Its curvature is known (``L = 1``), and with ``n`` workers each
    gradient misses about ``n`` others' (``S_avg`` close to ``n`` on a complete graph), while gradient descent
    with delays of ``S`` steps is stable only for ``eta * L * S`` below about 1: the sequential 0.5 diverges
    from 4 workers on (16 simulated workers reached a loss of 10^110). The other tasks keep one stepsize,
    chosen for a few workers; at hundreds of workers pass a smaller ``--lr`` (the report's theory section says
    when the stepsize is above the bounds' condition).

    Raises:
        TaskError: unknown task name.
    """
    _check_name(name)
    if name == "quadratic":
        return _DEFAULT_LR[name] / max(1, int(workers))
    return _DEFAULT_LR[name]


def default_batch_size(name: str) -> int:
    """The default mini-batch size of task ``name``.

    Raises:
        TaskError: unknown task name.
    """
    _check_name(name)
    return _DEFAULT_BATCH_SIZE[name]


def make_task(name: str, **options: object) -> Task:
    """Build the task called ``name``.

    Options whose value is None mean "not given" for every task. ``quadratic`` takes ``dim`` (100),
    ``noise`` (sigma, 1.0), ``condition`` (10.0) and ``seed`` (0, the problem instance); the classification
    tasks take no options. Datasets are read on the first build in a process and cached.

    Raises:
        TaskError: unknown task name, unknown option, or an option out of range.
        DatasetMissing: the task's dataset is not installed (the message names the install command).
    """
    _check_name(name)
    given = {key: value for key, value in options.items() if value is not None}
    allowed = _QUADRATIC_OPTIONS if name == "quadratic" else ()
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "none"
        raise TaskError(f"task {name!r} does not take option(s) {', '.join(unknown)}; it accepts: {accepted}")
    if name == "quadratic":
        return QuadraticTask(**given)  # type: ignore[arg-type]
    return _CLASSIFIERS[name]()


def _mnist_logreg() -> Task:
    return ClassificationTask("mnist-logreg", load_mnist(), lambda: logistic_regression(784, 10), "logreg")


def _digits_logreg() -> Task:
    return ClassificationTask("digits-logreg", load_digits(), lambda: logistic_regression(64, 10), "logreg")


def _fashion_cnn() -> Task:
    # A gradient over 8,192 samples would make each evaluation of the CNN about 8x dearer; 2,048 keeps it
    # within about 2x of the forward passes alone.
    return ClassificationTask(
        "fashion-cnn", load_fashion_mnist(), lambda: small_cnn(10), "cnn", train_subset_size=2_048
    )


_CLASSIFIERS: dict[str, Callable[[], Task]] = {
    "mnist-logreg": _mnist_logreg,
    "digits-logreg": _digits_logreg,
    "fashion-cnn": _fashion_cnn,
}
