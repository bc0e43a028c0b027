"""Classification workloads: multinomial logistic regression and a small CNN over real datasets.

- ``mnist-logreg``: MNIST, ``Linear(784, 10)``, cross-entropy.
- ``digits-logreg``: scikit-learn's 8x8 digits, ``Linear(64, 10)``, cross-entropy.
- ``fashion-cnn``: Fashion-MNIST, conv(1->16, 5)-ReLU-maxpool(2)-conv(16->32, 5)-ReLU-maxpool(2)-
  Linear(512, 10), cross-entropy. No BatchNorm or dropout: running statistics and train/eval modes are
  outside the theory, and without them evaluation needs no mode switch, so it never touches the model.

Parameters are initialised from the model seed alone through a private ``torch.Generator`` (modules are built
on the meta device first, so the global torch RNG is neither read nor advanced): every weight and bias is
uniform in ``+-1/sqrt(fan_in)``, PyTorch's own default range for these layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dasgd.tasks.base import (
    Batch,
    BatchSampler,
    IndexSampler,
    Task,
    TaskError,
    check_sampler_args,
    shard_indices,
)
from dasgd.tasks.datasets import Dataset, load_digits, load_fashion_mnist, load_mnist
from dasgd.tasks.registry import TaskEntry

__all__ = [
    "DIGITS_LOGREG",
    "EVAL_SUBSET_SIZE",
    "FASHION_CNN",
    "MNIST_LOGREG",
    "TRAIN_SUBSET_SIZE",
    "ClassificationTask",
    "logistic_regression",
    "small_cnn",
]

EVAL_SUBSET_SIZE = 2_000
"""Size of the fixed test subset used when ``full=False``."""

TRAIN_SUBSET_SIZE = 8_192
"""Default size of the fixed training subset on which ``train_loss`` and ``grad_norm_sq`` are computed: the
training objective the convergence theory is checked on (the whole training split when it is smaller)."""

_EVAL_SUBSET_SEED = 0xE7A1
_EVAL_CHUNK = 1_000  # rows per forward pass in evaluate(): bounds the CNN's activation memory


def logistic_regression(inputs: int, classes: int) -> torch.nn.Module:
    """An uninitialised (meta-device) multinomial logistic regression: one linear layer to the logits."""
    return torch.nn.Linear(inputs, classes, device="meta")


def small_cnn(classes: int) -> torch.nn.Module:
    """An uninitialised (meta-device) two-layer CNN for 1x28x28 images (about 18k parameters)."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, kernel_size=5, device="meta"),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, kernel_size=5, device="meta"),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, classes, device="meta"),
    )


def _initialise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Materialise a meta-device module on the CPU with weights drawn from ``seed`` only."""
    module = module.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                fan_in = layer.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                torch.nn.init.uniform_(layer.weight, -bound, bound, generator=generator)
                if layer.bias is not None:
                    torch.nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return module


class ClassificationTask(Task):
    """Cross-entropy classification of a :class:`Dataset` by a model from ``model_factory``.

    Sampling is from the training split; :meth:`evaluate` reports ``test_loss`` and ``test_accuracy`` on the
    test split (or on a fixed subset of ``EVAL_SUBSET_SIZE`` test samples when ``full=False``), and the
    training objective ``train_loss`` with the squared norm of its gradient ``grad_norm_sq`` on a fixed subset
    of ``train_subset_size`` training samples (the whole split if smaller), whatever ``full`` is.
    """

    def __init__(
        self,
        name: str,
        dataset: Dataset,
        model_factory: Callable[[], torch.nn.Module],
        model_kind: str,
        train_subset_size: int = TRAIN_SUBSET_SIZE,
    ) -> None:
        """A task called ``name`` training ``model_factory()`` (a meta-device module) on ``dataset``.

        ``train_subset_size`` sets the training subset of ``train_loss`` and ``grad_norm_sq``; a gradient over
        it costs about three forward passes per sample, so a model that is costly to evaluate takes a smaller
        one.
        """
        if (
            isinstance(train_subset_size, bool)
            or not isinstance(train_subset_size, int)
            or train_subset_size < 1
        ):
            raise TaskError(f"train_subset_size must be a positive integer, got {train_subset_size!r}")
        self.name = name
        self._dataset = dataset
        self._model_factory = model_factory
        self._model_kind = model_kind
        self._train_subset = _fixed_subset(dataset.train_size, _EVAL_SUBSET_SEED, train_subset_size)
        self._test_subset = _fixed_subset(dataset.test_size, _EVAL_SUBSET_SEED + 1, EVAL_SUBSET_SIZE)
        self._train_count = dataset.train_size if self._train_subset is None else self._train_subset.numel()

    @property
    def dataset(self) -> Dataset:
        """The dataset this task trains and evaluates on (shared, read-only)."""
        return self._dataset

    @property
    def accuracy_metric(self) -> str | None:
        """``"test_accuracy"``."""
        return "test_accuracy"

    def build_model(self, seed: int) -> torch.nn.Module:
        """A fresh float32 CPU model whose parameters depend on ``seed`` only."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise TaskError(f"model seed must be a non-negative integer, got {seed!r}")
        return _initialise(self._model_factory(), int(seed))

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy of ``model``'s logits on ``batch`` (moved to the model's device)."""
        if batch.y is None:
            raise TaskError(f"task {self.name} needs labelled batches (batch.y is None)")
        device = next(model.parameters()).device
        return F.cross_entropy(model(batch.x.to(device)), batch.y.to(device))

    def sampler(self, seed: int, batch_size: int, shard: tuple[int, int] | None = None) -> BatchSampler:
        """An :class:`IndexSampler` over the training split, or over shard ``i`` of ``k`` of it."""
        check_sampler_args(seed, batch_size, shard, size=self._dataset.train_size)
        indices = shard_indices(self._dataset.train_size, shard)
        return IndexSampler(self._dataset.train_x, self._dataset.train_y, indices, batch_size, int(seed))

    def evaluate(self, model: torch.nn.Module, *, full: bool = True) -> dict[str, float]:
        """``{"test_loss", "test_accuracy", "train_loss", "grad_norm_sq"}``; ``full=False`` uses the fixed test
        subset. ``train_loss`` and ``grad_norm_sq`` are always on the fixed training subset."""
        data = self._dataset
        with torch.no_grad():
            test_rows = None if full else self._test_subset
            test_loss, test_accuracy = self._loss_and_accuracy(model, data.test_x, data.test_y, test_rows)
        train_loss, grad_norm_sq = self._objective(model)
        return {
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "train_loss": train_loss,
            "grad_norm_sq": grad_norm_sq,
        }

    def theory_constants(self, batch_size: int) -> dict[str, float]:
        """``{"f_star_lower": 0.0}``: cross-entropy is non-negative; nothing else is known exactly.

        Raises:
            TaskError: ``batch_size`` is not a positive integer.
        """
        check_sampler_args(0, batch_size, None, size=None)
        return {"f_star_lower": 0.0}

    @property
    def train_subset_size(self) -> int:
        """How many training samples ``train_loss`` and ``grad_norm_sq`` are computed on."""
        return self._train_count

    def describe(self) -> dict[str, object]:
        """Name, dataset, model kind, parameter count, split sizes, input shape and (no) options."""
        data = self._dataset
        parameters = sum(p.numel() for p in self._model_factory().parameters())
        return {
            "name": self.name,
            "dataset": data.name,
            "model": self._model_kind,
            "parameters": int(parameters),
            "train_size": data.train_size,
            "test_size": data.test_size,
            "num_classes": data.num_classes,
            "input_shape": list(data.train_x.shape[1:]),
            "train_subset_size": self._train_count,
            "options": {},
        }

    def _objective(self, model: torch.nn.Module) -> tuple[float, float]:
        """Mean cross-entropy on the fixed training subset and the squared norm of its gradient.

        ``torch.autograd.grad`` returns the gradient without touching the parameters' ``.grad``, so a worker's
        own gradient computation is unaffected.
        """
        data = self._dataset
        params = [p for p in model.parameters() if p.requires_grad]
        device = params[0].device
        rows = self._train_subset
        total = torch.zeros((), dtype=torch.float64)
        sums = [torch.zeros_like(p) for p in params]
        with torch.enable_grad():
            for start in range(0, self._train_count, _EVAL_CHUNK):
                if rows is None:
                    xs = data.train_x[start : start + _EVAL_CHUNK]
                    ys = data.train_y[start : start + _EVAL_CHUNK]
                else:
                    chunk = rows[start : start + _EVAL_CHUNK]
                    xs, ys = data.train_x[chunk], data.train_y[chunk]
                loss = F.cross_entropy(model(xs.to(device)), ys.to(device), reduction="sum")
                for acc, g in zip(sums, torch.autograd.grad(loss, params)):
                    acc.add_(g)
                total += loss.detach().to("cpu", torch.float64)
        count = self._train_count
        norm_sq = sum(float(torch.sum((acc.to(torch.float64) / count) ** 2)) for acc in sums)
        return float(total) / count, norm_sq

    @staticmethod
    def _loss_and_accuracy(
        model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None
    ) -> tuple[float, float]:
        """Mean cross-entropy and accuracy over ``rows`` of ``(x, y)`` (all rows if None), in chunks."""
        device = next(model.parameters()).device
        count = x.shape[0] if rows is None else rows.numel()
        total_loss = 0.0
        correct = 0
        for start in range(0, count, _EVAL_CHUNK):
            if rows is None:
                xs, ys = x[start : start + _EVAL_CHUNK], y[start : start + _EVAL_CHUNK]
            else:
                chunk = rows[start : start + _EVAL_CHUNK]
                xs, ys = x[chunk], y[chunk]
            logits = model(xs.to(device))
            ys = ys.to(device)
            total_loss += float(F.cross_entropy(logits, ys, reduction="sum"))
            correct += int((logits.argmax(dim=1) == ys).sum())
        return total_loss / count, correct / count


def _fixed_subset(size: int, seed: int, count: int) -> torch.Tensor | None:
    """Sorted indices of a fixed random subset of ``count`` rows, or None when that is all rows."""
    if size <= count:
        return None
    rows = np.random.default_rng(seed).choice(size, count, replace=False)
    return torch.from_numpy(np.sort(rows).astype(np.int64))


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


MNIST_LOGREG = TaskEntry(
    "mnist-logreg", _mnist_logreg, "logistic regression on MNIST", default_lr=0.05, default_budget=3000
)
DIGITS_LOGREG = TaskEntry(
    "digits-logreg",
    _digits_logreg,
    "logistic regression on sklearn digits",
    default_lr=0.5,
    default_budget=1500,
)
FASHION_CNN = TaskEntry(
    "fashion-cnn", _fashion_cnn, "small CNN on Fashion-MNIST", default_lr=0.05, default_budget=3000
)
