"""Tests for softrank.datasets: small files in the standard formats, written here, read back."""
from __future__ import annotations

import dataclasses
import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from softrank import datasets
from softrank.datasets import (
    DATASET_NAMES, Dataset, load_cifar10, load_dataset, load_digits_split, load_fashion_mnist,
    load_mnist, load_svhn, make_teacher_student, read_idx,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


# ------------------------------------------------------------------ fixtures and writers
@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test touches the network or a user's data folder."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")
    monkeypatch.setattr(datasets, "fetch_openml", refuse)
    monkeypatch.delenv(datasets.DATA_ENV_VAR, raising=False)


def fake_images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def fake_labels(n: int, seed: int, low: int = 0, high: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, n, dtype=np.uint8)


@pytest.fixture
def mnist_arrays():
    return (fake_images(12, (28, 28), 0), fake_labels(12, 1),
            fake_images(5, (28, 28), 2), fake_labels(5, 3))


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()


def write_idx_set(folder: Path, arrays, gz: bool = False, sep: str = "-") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = ("train-images", "train-labels", "t10k-images", "t10k-labels")
    for name, array in zip(names, arrays):
        kind = "idx3" if name.endswith("images") else "idx1"
        path = folder / f"{name}{sep}{kind}-ubyte{'.gz' if gz else ''}"
        raw = idx_bytes(array)
        path.write_bytes(gzip.compress(raw) if gz else raw)


def write_npz(path: Path, arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **dict(zip(("x_train", "y_train", "x_test", "y_test"), arrays)))


def assert_matches(ds: Dataset, arrays, shape: tuple[int, ...]) -> None:
    x_tr, y_tr, x_te, y_te = arrays
    assert ds.X_train.dtype == ds.X_test.dtype == np.float32
    assert ds.y_train.dtype == ds.y_test.dtype == np.int64
    assert ds.X_train.shape == (len(x_tr), *shape) and ds.X_test.shape == (len(x_te), *shape)
    for X, x in ((ds.X_train, x_tr), (ds.X_test, x_te)):
        np.testing.assert_array_equal(X, (x.astype(np.float32) / 255).reshape(X.shape))
    np.testing.assert_array_equal(ds.y_train, y_tr)
    np.testing.assert_array_equal(ds.y_test, y_te)
    assert ds.n_classes == 10


# ------------------------------------------------------------------ IDX
def test_read_idx_raw_and_gz(tmp_path):
    images = fake_images(3, (4, 5), 7)
    (tmp_path / "a").write_bytes(idx_bytes(images))
    (tmp_path / "b.gz").write_bytes(gzip.compress(idx_bytes(images)))
    for name in ("a", "b.gz"):
        out = read_idx(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (3, 4, 5)
        np.testing.assert_array_equal(out, images)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("sep", ["-", "."])
def test_mnist_from_idx(tmp_path, mnist_arrays, gz, sep):
    write_idx_set(tmp_path, mnist_arrays, gz=gz, sep=sep)
    assert_matches(load_mnist(tmp_path), mnist_arrays, (784,))
    assert_matches(load_mnist(tmp_path, flatten=False), mnist_arrays, (1, 28, 28))


def test_idx_in_subfolder_and_fashion_name(tmp_path, mnist_arrays):
    write_idx_set(tmp_path / "fashion_mnist", mnist_arrays, gz=True)
    ds = load_fashion_mnist(tmp_path)
    assert ds.name == "fashion_mnist"
    assert_matches(ds, mnist_arrays, (784,))


def test_bad_idx_magic_names_file(tmp_path, mnist_arrays):
    write_idx_set(tmp_path, mnist_arrays)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x09\x03" + bad.read_bytes()[4:])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*magic number 0x00000903"):
        load_mnist(tmp_path)


def test_truncated_idx_names_file(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(fake_labels(10, 0))[:-3])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.*7 bytes follow"):
        read_idx(path)


def test_idx_labels_count_mismatch(tmp_path, mnist_arrays):
    x_tr, y_tr, x_te, y_te = mnist_arrays
    write_idx_set(tmp_path, (x_tr, y_tr[:-1], x_te, y_te))
    with pytest.raises(ValueError, match="do not match"):
        load_mnist(tmp_path)


# ------------------------------------------------------------------ npz, env var, options
@pytest.mark.parametrize("relpath", ["mnist/mnist.npz", "mnist.npz"])
def test_mnist_from_npz(tmp_path, mnist_arrays, relpath):
    write_npz(tmp_path / relpath, mnist_arrays)
    assert_matches(load_mnist(tmp_path), mnist_arrays, (784,))


def test_env_var_folder(tmp_path, mnist_arrays, monkeypatch):
    write_npz(tmp_path / "fashion_mnist" / "fashion_mnist.npz", mnist_arrays)
    monkeypatch.setenv(datasets.DATA_ENV_VAR, str(tmp_path))
    assert_matches(load_fashion_mnist(), mnist_arrays, (784,))
    assert_matches(load_dataset("fashion-mnist"), mnist_arrays, (784,))


def test_root_argument_wins_over_env_var(tmp_path, mnist_arrays, monkeypatch):
    write_npz(tmp_path / "arg" / "mnist.npz", mnist_arrays)
    other = tuple(a[::-1].copy() for a in mnist_arrays)
    write_npz(tmp_path / "env" / "mnist.npz", other)
    monkeypatch.setenv(datasets.DATA_ENV_VAR, str(tmp_path / "env"))
    assert_matches(load_mnist(tmp_path / "arg"), mnist_arrays, (784,))
    assert_matches(load_mnist(), other, (784,))


def test_first_n_and_seeded_subset(tmp_path, mnist_arrays):
    write_npz(tmp_path / "mnist.npz", mnist_arrays)
    x_tr, y_tr, x_te, y_te = mnist_arrays
    first = load_mnist(tmp_path, n_train=4, n_test=2)
    assert_matches(first, (x_tr[:4], y_tr[:4], x_te[:2], y_te[:2]), (784,))
    a, b = (load_mnist(tmp_path, n_train=4, n_test=2, random_state=3) for _ in range(2))
    np.testing.assert_array_equal(a.X_train, b.X_train)
    flat = x_tr.reshape(12, -1).astype(np.float32) / 255
    rows = [np.flatnonzero((flat == r).all(1)) for r in a.X_train]
    idx = np.concatenate(rows)
    assert len(np.unique(idx)) == 4 and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(a.y_train, y_tr[idx])
    with pytest.raises(ValueError, match=r"n_train must be an integer in \[1, 12\]"):
        load_mnist(tmp_path, n_train=13)


def test_standardize_uses_train_statistics(tmp_path, mnist_arrays):
    write_npz(tmp_path / "mnist.npz", mnist_arrays)
    raw, std = load_mnist(tmp_path), load_mnist(tmp_path, standardize=True)
    mu, sigma = raw.X_train.mean(), raw.X_train.std()
    assert abs(std.X_train.mean()) < 1e-5 and abs(std.X_train.std() - 1) < 1e-5
    np.testing.assert_allclose(std.X_test, (raw.X_test - mu) / sigma, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ missing files, no internet
def test_missing_files_error_lists_folder_and_names(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(tmp_path)
    msg = str(info.value)
    for part in (str(tmp_path), "mnist.npz", "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
                 "SOFTRANK_DATA", "root=", "network disabled"):
        assert part in msg


def test_missing_folder_without_root_or_env(monkeypatch):
    with pytest.raises(FileNotFoundError, match="SOFTRANK_DATA is unset"):
        load_cifar10()
    with pytest.raises(FileNotFoundError, match="download=False"):
        load_svhn(download=False)


def test_openml_fallback_split(monkeypatch):
    X = np.arange(7 * 784).reshape(7, 784) % 256
    y = np.array(list("0123456"), dtype=object)
    calls = []

    def fake_fetch(name, **kwargs):
        calls.append(name)
        return type("Bunch", (), {"data": X.astype(float), "target": y})()
    monkeypatch.setattr(datasets, "fetch_openml", fake_fetch)
    monkeypatch.setattr(datasets, "_MNIST", dataclasses.replace(datasets._MNIST, n_train=5))
    ds = load_mnist()
    assert calls == ["mnist_784"]
    assert ds.X_train.shape == (5, 784) and ds.X_test.shape == (2, 784)
    np.testing.assert_array_equal(ds.y_train, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(ds.X_test, (X[5:] / 255).astype(np.float32))


# ------------------------------------------------------------------ CIFAR-10
@pytest.fixture
def cifar_arrays():
    train = [(fake_images(3, (3072,), 10 + i), fake_labels(3, 20 + i)) for i in range(5)]
    test = (fake_images(4, (3072,), 30), fake_labels(4, 31))
    return train, test


def cifar_pickles(cifar_arrays) -> dict[str, bytes]:
    train, test = cifar_arrays
    batches = {f"data_batch_{i + 1}": b for i, b in enumerate(train)} | {"test_batch": test}
    return {name: pickle.dumps({b"data": d, b"labels": [int(v) for v in lab]})
            for name, (d, lab) in batches.items()}


def cifar_expected(cifar_arrays):
    train, (x_te, y_te) = cifar_arrays
    return (np.concatenate([d for d, _ in train]), np.concatenate([lab for _, lab in train]),
            x_te, y_te)


def test_cifar10_from_pickle_batches(tmp_path, cifar_arrays):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, raw in cifar_pickles(cifar_arrays).items():
        (folder / name).write_bytes(raw)
    ds = load_cifar10(tmp_path)
    assert_matches(ds, cifar_expected(cifar_arrays), (3, 32, 32))
    # channel-planar rows: the first 1024 bytes are the red plane
    x0 = cifar_arrays[0][0][0][0]
    np.testing.assert_array_equal(ds.X_train[0, 0], x0[:1024].reshape(32, 32) / np.float32(255))
    assert load_cifar10(tmp_path, flatten=True).X_train.shape == (15, 3072)


def test_cifar10_from_tar_gz(tmp_path, cifar_arrays):
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name, raw in cifar_pickles(cifar_arrays).items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    ds = load_dataset("CIFAR-10", root=tmp_path)
    assert ds.name == "cifar10"
    assert_matches(ds, cifar_expected(cifar_arrays), (3, 32, 32))


def test_cifar10_npz_hwc(tmp_path):
    x_tr, x_te = fake_images(2, (32, 32, 3), 0), fake_images(1, (32, 32, 3), 1)
    write_npz(tmp_path / "cifar10.npz", (x_tr, np.array([1, 2]), x_te, np.array([3])))
    ds = load_cifar10(tmp_path)
    np.testing.assert_array_equal(ds.X_train, x_tr.transpose(0, 3, 1, 2) / np.float32(255))


# ------------------------------------------------------------------ SVHN
def test_svhn_from_mat_maps_label_10_to_0(tmp_path):
    x_tr, x_te = fake_images(6, (32, 32, 3), 0), fake_images(3, (32, 32, 3), 1)
    y_tr, y_te = np.array([10, 1, 2, 9, 10, 5]), np.array([3, 10, 7])
    folder = tmp_path / "svhn"
    folder.mkdir()
    for name, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        scipy.io.savemat(folder / f"{name}_32x32.mat",
                         {"X": x.transpose(1, 2, 3, 0), "y": y.reshape(-1, 1).astype(np.uint8)})
    ds = load_svhn(tmp_path)
    assert ds.X_train.shape == (6, 3, 32, 32) and ds.X_train.dtype == np.float32
    np.testing.assert_array_equal(ds.X_train, x_tr.transpose(0, 3, 1, 2) / np.float32(255))
    np.testing.assert_array_equal(ds.X_test, x_te.transpose(0, 3, 1, 2) / np.float32(255))
    np.testing.assert_array_equal(ds.y_train, [0, 1, 2, 9, 0, 5])
    np.testing.assert_array_equal(ds.y_test, [3, 0, 7])
    assert ds.y_train.dtype == np.int64


# ------------------------------------------------------------------ teacher-student, digits
def test_teacher_student_deterministic_and_labelled_by_teacher():
    a = make_teacher_student(200, 50, n_features=5, n_classes=4, hidden=8, random_state=1)
    b = make_teacher_student(200, 50, n_features=5, n_classes=4, hidden=8, random_state=1)
    c = make_teacher_student(200, 50, n_features=5, n_classes=4, hidden=8, random_state=2)
    for field in ("X_train", "y_train", "X_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.X_train, c.X_train)
    assert a.X_train.shape == (200, 5) and a.X_train.dtype == np.float32
    assert a.y_train.dtype == np.int64 and set(a.y_train) <= set(range(4))
    p = a.teacher.predict_proba(a.X_train)
    np.testing.assert_allclose(p.sum(1), 1.0)
    assert p.shape == (200, 4)


def test_teacher_labels_follow_teacher_distribution():
    ds = make_teacher_student(20000, 0, n_features=3, n_classes=3, hidden=4, random_state=0)
    p = ds.teacher.predict_proba(ds.X_train)
    freq = np.bincount(ds.y_train, minlength=3) / len(ds.y_train)
    np.testing.assert_allclose(freq, p.mean(0), atol=0.015)
    # the Bayes predictor beats chance, and noisier teachers are less predictable
    acc = (ds.teacher.predict(ds.X_train) == ds.y_train).mean()
    hot = make_teacher_student(20000, 0, n_features=3, n_classes=3, hidden=4,
                               temperature=100.0, random_state=0)
    assert acc > 0.5 > (hot.teacher.predict(hot.X_train) == hot.y_train).mean()
    assert hot.teacher.bayes_log_loss(hot.X_train) > ds.teacher.bayes_log_loss(ds.X_train)


def test_teacher_student_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        make_teacher_student(10, 10, temperature=0.0)
    with pytest.raises(ValueError, match="n_train"):
        make_teacher_student(0, 10)


def test_digits_split():
    ds = load_digits_split(test_size=0.3, random_state=0)
    assert ds.X_train.shape == (1257, 64) and ds.X_test.shape == (540, 64)
    assert ds.X_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.X_train.min() >= 0 and ds.X_train.max() == 1.0
    assert ds.n_classes == 10 and ds.name == "digits"
    again = load_dataset("digits", random_state=0)
    np.testing.assert_array_equal(again.X_test, ds.X_test)
    with pytest.raises(AttributeError):
        ds.name = "other"


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet")
    for name in DATASET_NAMES:
        assert name in str(info.value)
    assert set(DATASET_NAMES) == {"digits", "mnist", "fashion_mnist", "cifar10", "svhn",
                                  "teacher_student"}


# ------------------------------------------------------------------ real data (../shared/data)
def require_shared(subdir: str) -> Path:
    if not (SHARED_DATA / subdir).is_dir():
        pytest.skip(f"real data folder {SHARED_DATA / subdir} is absent")
    return SHARED_DATA


@pytest.mark.data
def test_real_mnist_label_counts():
    ds = load_mnist(require_shared("mnist"))
    assert ds.X_train.shape == (60000, 784) and ds.X_test.shape == (10000, 784)
    np.testing.assert_array_equal(np.bincount(ds.y_train), MNIST_TRAIN_COUNTS)
    assert abs(ds.X_train.mean() - 0.1307) < 1e-3 and abs(ds.X_train.std() - 0.3081) < 1e-3


@pytest.mark.data
def test_real_fashion_mnist_label_counts():
    ds = load_fashion_mnist(require_shared("fashion_mnist"))
    assert ds.X_train.shape == (60000, 784) and ds.X_test.shape == (10000, 784)
    np.testing.assert_array_equal(np.bincount(ds.y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.y_test), [1000] * 10)
