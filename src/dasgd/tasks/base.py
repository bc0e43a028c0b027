"""The task interface every workload implements, and the index sampler the dataset tasks share.

A :class:`Task` is what a worker trains: it builds the model, computes the loss on a :class:`Batch`, hands out
per-worker :class:`BatchSampler` streams and evaluates a model. It owns no model and no optimizer, so one task
object serves every worker of a process (datasets are loaded once per process and shared read-only).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "Batch",
    "BatchSampler",
    "DatasetMissing",
    "IndexSampler",
    "Task",
    "TaskError",
    "check_sampler_args",
    "shard_indices",
]

_SHARD_SEED = 0x5A4D
"""Fixed seed of the partition into shards: every worker must agree on it whatever its own sampling seed."""


class TaskError(ValueError):
    """A task was asked for with a bad name, option or argument; the message says which and what is valid."""


class DatasetMissing(ValueError):
    """A dataset a task needs is not installed (or is damaged); the message names the command to fix it."""


@dataclass(frozen=True)
class Batch:
    """What one stochastic gradient is computed on.

    Attributes:
        x: the inputs (for the quadratic task, the noise draws; see :mod:`dasgd.tasks.quadratic`).
        y: the integer class labels, or None for tasks without labels.
    """

    x: torch.Tensor
    y: torch.Tensor | None


class BatchSampler(ABC):
    """An endless, deterministic stream of mini-batches for one worker."""

    @abstractmethod
    def next(self) -> Batch:
        """The next mini-batch of the stream."""

    def state(self) -> dict:
        """Where the stream is, as JSON-able data (for a checkpoint): :meth:`set_state` on a sampler built
        with the same arguments makes it go on with exactly the batches this one would draw next."""
        raise NotImplementedError(f"{type(self).__name__} cannot save its position; a checkpoint needs it")

    def set_state(self, state: dict) -> None:
        """Go on from ``state`` (:meth:`state` of a sampler built with the same arguments)."""
        raise NotImplementedError(f"{type(self).__name__} cannot restore its position")


class Task(ABC):
    """A workload: model, loss, data stream and evaluation.

    Attributes:
        name: the registry name of the task (``make_task(name)`` builds it).
    """

    name: str

    @abstractmethod
    def build_model(self, seed: int) -> torch.nn.Module:
        """A freshly initialised model; the same seed gives bit-identical initial parameters."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The scalar mean loss of ``model`` on ``batch``, differentiable with respect to its parameters."""

    @abstractmethod
    def sampler(self, seed: int, batch_size: int, shard: tuple[int, int] | None = None) -> BatchSampler:
        """A batch stream of ``batch_size`` samples drawn with its own generator seeded by ``seed``.

        Args:
            seed: the stream's seed (non-negative); equal seeds give equal streams.
            batch_size: samples per batch (at least 1).
            shard: ``(i, k)`` (a tuple or list) restricts the stream to part ``i`` of a fixed partition of the
                training set into ``k`` disjoint parts; None samples the whole training set (homogeneous
                data).
        """

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, *, full: bool = True) -> dict[str, float]:
        """Metrics of ``model``, computed without modifying the model (no parameter or ``.grad`` changes).

        ``full=False`` allows a cheaper estimate on fixed subsets (for checks during training). Besides its own
        metrics, every task reports what the convergence theory needs (dasgd.runs.theory_report):
        ``grad_norm_sq``, the squared norm of the full gradient of the training objective at ``model``, and
        the training objective itself, as ``train_loss`` (or ``loss`` where that is the training objective,
        as for the quadratic). Both are computed on the same fixed data whatever ``full`` is.
        """

    def theory_constants(self, batch_size: int) -> dict[str, float]:
        """Constants of the convergence theory this task knows exactly, for gradients of ``batch_size``.

        Keys (each optional): ``"L"`` (smoothness), ``"sigma_sq"`` (``E ||g - grad f||^2`` of one mini-batch
        gradient), ``"f_star"`` (the minimum), ``"f_star_lower"`` (a lower bound on the minimum, e.g. 0 for a
        non-negative loss). The default knows nothing: ``{}``.
        """
        return {}

    @property
    @abstractmethod
    def accuracy_metric(self) -> str | None:
        """The key of :meth:`evaluate`'s accuracy, or None when the task has no accuracy."""

    @abstractmethod
    def describe(self) -> dict[str, object]:
        """A JSON-ready summary: name, parameter count, dataset sizes and options."""


def check_sampler_args(seed: int, batch_size: int, shard: tuple[int, int] | None, size: int | None) -> None:
    """Validate :meth:`Task.sampler` arguments; ``size`` is the training-set size (None: unbounded)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TaskError(f"sampler seed must be a non-negative integer, got {seed!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise TaskError(f"batch_size must be a positive integer, got {batch_size!r}")
    if shard is None:
        return
    if (
        not isinstance(shard, (tuple, list))
        or len(shard) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in shard)
    ):
        raise TaskError(f"shard must be a pair (i, k) of integers, got {shard!r}")
    part, parts = shard
    if parts < 1 or not 0 <= part < parts:
        raise TaskError(f"shard (i, k) needs k >= 1 and 0 <= i < k, got {shard!r}")
    if size is not None and parts > size:
        raise TaskError(f"cannot split {size} training samples into {parts} non-empty shards")


def shard_indices(size: int, shard: tuple[int, int] | None) -> np.ndarray:
    """The training-set indices a sampler with ``shard`` draws from, sorted.

    Shards are the near-equal parts of one fixed random permutation (seeded by a constant, not by the worker),
    so every process computes the same partition, parts are disjoint, their union is the whole set, and
    each part has roughly the overall class balance (i.i.d. shards, not label-skewed ones).
    """
    if shard is None:
        return np.arange(size, dtype=np.int64)
    part, parts = shard
    permutation = np.random.default_rng(_SHARD_SEED).permutation(size)
    return np.sort(np.array_split(permutation, parts)[part]).astype(np.int64)


class IndexSampler(BatchSampler):
    """Epoch-wise shuffled mini-batches from a fixed set of rows of in-memory tensors.

    Each epoch is a fresh permutation of ``indices`` drawn from the sampler's own ``numpy`` Generator. Batches
    always hold exactly ``batch_size`` rows: when an epoch runs out mid-batch, the batch is completed from the
    next epoch's permutation, so every sample is visited exactly once per epoch and none is dropped.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        indices: np.ndarray,
        batch_size: int,
        seed: int,
    ) -> None:
        """Sample rows ``indices`` of ``x`` (and ``y``), ``batch_size`` at a time, with generator ``seed``."""
        if len(indices) == 0:
            raise TaskError("a sampler needs at least one sample to draw from")
        self._x = x
        self._y = y
        self._indices = np.asarray(indices, dtype=np.int64)
        # The whole training set needs no index array per sampler: a simulation holds thousands of samplers.
        self._full = bool(np.array_equal(self._indices, np.arange(len(self._indices))))
        if self._full:
            self._indices = _shared_arange(len(self._indices))
        self._batch_size = int(batch_size)
        self._rng = np.random.default_rng(seed)
        # The current epoch's permutation in the narrowest dtype that holds the row numbers, and the position
        # of the next row to take from it: 1,000 simulated workers on MNIST hold 1,000 of these.
        self._dtype = np.min_scalar_type(int(self._indices[-1]))
        self._epoch = np.empty(0, dtype=self._dtype)
        self._pos = 0
        self._epochs = 0
        # The generator's state before the current epoch's permutation: a checkpoint saves it (and the
        # position) instead of the permutation, and draws the permutation again on restore.
        self._epoch_rng = self._rng.bit_generator.state

    @property
    def indices(self) -> np.ndarray:
        """The rows this sampler draws from (a copy)."""
        return self._indices.copy()

    @property
    def epochs_started(self) -> int:
        """How many epoch permutations have been drawn so far."""
        return self._epochs

    def state(self) -> dict:
        return {"epoch_rng": self._epoch_rng, "epochs": self._epochs, "pos": self._pos}

    def set_state(self, state: dict) -> None:
        self._rng.bit_generator.state = state["epoch_rng"]
        self._epoch_rng = self._rng.bit_generator.state
        self._epochs = int(state["epochs"])
        self._epoch = (
            self._rng.permutation(self._indices).astype(self._dtype) if self._epochs else np.empty(0, self._dtype)
        )
        self._pos = int(state["pos"])

    def next(self) -> Batch:
        """The next ``batch_size`` rows, in this sampler's deterministic order."""
        take = self._epoch[self._pos : self._pos + self._batch_size].astype(np.int64)
        self._pos += len(take)
        while len(take) < self._batch_size:
            # The epoch ran out mid-batch: complete the batch from the next epoch's permutation.
            self._epoch_rng = self._rng.bit_generator.state
            self._epoch = self._rng.permutation(self._indices).astype(self._dtype)
            self._epochs += 1
            more = self._epoch[: self._batch_size - len(take)].astype(np.int64)
            self._pos = len(more)
            take = np.concatenate([take, more])
        rows = torch.from_numpy(take)
        return Batch(self._x[rows], None if self._y is None else self._y[rows])


@functools.lru_cache(maxsize=8)
def _shared_arange(size: int) -> np.ndarray:
    """``arange(size)``, read-only and shared by every sampler over a whole training set of that size."""
    rows = np.arange(size, dtype=np.int64)
    rows.setflags(write=False)
    return rows
