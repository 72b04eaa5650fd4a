r"""Dataset loaders returning NumPy arrays.

Every loader returns a :class:`Dataset` with ``X`` as ``float32`` and ``y`` as ``int64``.

Image data sets (MNIST, Fashion-MNIST, CIFAR-10, SVHN) are read from a local folder given as
``root=`` or through the environment variable ``SOFTRANK_DATA``, in their standard
distribution formats (see each loader). When no local copy is found they are downloaded with
scikit-learn's :func:`~sklearn.datasets.fetch_openml`; when that fails too a
:class:`FileNotFoundError` names the folders and files that were looked for.

Pixels are scaled to :math:`[0, 1]`; ``standardize=True`` further maps
:math:`x \mapsto (x - \mu)/\sigma` with the mean and standard deviation of the returned
training images (one pair per channel).

:func:`make_teacher_student` draws a synthetic classification task whose labels are sampled
from a random teacher MLP, so that the Bayes-optimal predictor is known exactly.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import scipy.io
from sklearn.datasets import fetch_openml, load_digits
from sklearn.model_selection import train_test_split

__all__ = [
    "Dataset", "TeacherMLP", "DATA_ENV_VAR", "DATASET_NAMES", "read_idx",
    "load_digits_split", "load_mnist", "load_fashion_mnist", "load_cifar10", "load_svhn",
    "make_teacher_student", "load_dataset",
]

DATA_ENV_VAR = "SOFTRANK_DATA"
PathLike = str | os.PathLike
Seed = int | np.random.Generator | None

_IDX_LABELS, _IDX_IMAGES = 0x00000801, 0x00000803
_IDX_STEMS = ("train-images", "train-labels", "t10k-images", "t10k-labels")
_CIFAR_DIR, _CIFAR_TAR = "cifar-10-batches-py", "cifar-10-python.tar.gz"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


# --------------------------------------------------------------------------------------------
# Result objects
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TeacherMLP:
    r"""One-hidden-layer teacher: :math:`p(y \mid x) = \mathrm{softmax}(z(x)/T)` with
    :math:`z(x) = \tanh(x W_1 + b_1) W_2 + b_2`.

    Parameters are ``float64``; ``temperature`` is :math:`T`.
    """

    W1: np.ndarray
    b1: np.ndarray
    W2: np.ndarray
    b2: np.ndarray
    temperature: float

    def logits(self, X: np.ndarray) -> np.ndarray:
        """Tempered logits :math:`z(x)/T`, shape ``(N, n_classes)``, float64."""
        hidden = np.tanh(np.asarray(X, dtype=np.float64) @ self.W1 + self.b1)
        return (hidden @ self.W2 + self.b2) / self.temperature

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        r"""The true label distribution :math:`p(y \mid x)`, shape ``(N, n_classes)``."""
        z = self.logits(X)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, X: np.ndarray) -> np.ndarray:
        r"""Bayes-optimal class (0-1 loss): :math:`\arg\max_k p(k \mid x)`, int64."""
        return self.predict_proba(X).argmax(axis=1).astype(np.int64)

    def bayes_log_loss(self, X: np.ndarray) -> float:
        r"""Expected log loss of the Bayes predictor, :math:`\frac1N \sum_i H(p(\cdot\mid x_i))`."""
        p = self.predict_proba(X)
        return float(-(p * np.log(np.clip(p, 1e-300, None))).sum(axis=1).mean())


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split as NumPy arrays.

    Attributes
    ----------
    X_train, X_test : np.ndarray
        Inputs, ``float32``; images are ``(N, C, H, W)`` unless flattened to ``(N, C*H*W)``.
    y_train, y_test : np.ndarray
        Class labels in ``0 .. n_classes-1``, ``int64``, shape ``(N,)``.
    name : str
        Data set name as accepted by :func:`load_dataset`.
    n_classes : int
        Number of classes.
    teacher : TeacherMLP or None
        The labelling model for :func:`make_teacher_student`; ``None`` for real data.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    name: str
    n_classes: int
    teacher: TeacherMLP | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, n_classes={self.n_classes}, "
                f"X_train={self.X_train.shape}, X_test={self.X_test.shape})")


# --------------------------------------------------------------------------------------------
# Small data sets
# --------------------------------------------------------------------------------------------
def load_digits_split(test_size: float = 0.3, random_state: int | None = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits, split into train and test (stratified).

    Parameters
    ----------
    test_size : float, default 0.3
        Fraction of the 1797 samples put in the test set.
    random_state : int or None, default 0
        Seed of the split.

    Returns
    -------
    Dataset
        ``X`` of shape ``(N, 64)`` in ``[0, 1]`` (pixel value / 16), ``float32``; 10 classes.
    """
    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(
        (X / 16.0).astype(np.float32), y.astype(np.int64),
        test_size=test_size, random_state=random_state, stratify=y)
    return Dataset(X_tr, y_tr, X_te, y_te, name="digits", n_classes=10)


def make_teacher_student(
    n_train: int = 1000,
    n_test: int = 1000,
    n_features: int = 20,
    n_classes: int = 10,
    hidden: int = 32,
    temperature: float = 1.0,
    random_state: Seed = None,
) -> Dataset:
    r"""Synthetic classification labelled by sampling from a random teacher MLP.

    Inputs :math:`x \sim \mathcal N(0, I_d)`; teacher weights
    :math:`W_1 \sim \mathcal N(0, 1/d)`, :math:`b_1 \sim \mathcal N(0, 0.1^2)`,
    :math:`W_2 \sim \mathcal N(0, 25/h)`, :math:`b_2 = 0`; labels
    :math:`y \sim \mathrm{softmax}(z(x)/T)` (see :class:`TeacherMLP`). The teacher is returned
    in ``Dataset.teacher``, so the Bayes-optimal predictor and its risk are known.

    Parameters
    ----------
    n_train, n_test : int
        Number of training and test samples (``n_test`` may be 0).
    n_features : int, default 20
        Input dimension :math:`d`.
    n_classes : int, default 10
        Number of classes :math:`K`.
    hidden : int, default 32
        Teacher hidden width :math:`h`.
    temperature : float, default 1.0
        :math:`T > 0`; larger means noisier labels (:math:`T \to \infty`: uniform labels).
    random_state : int, Generator or None
        Seed; the same seed gives bit-identical data.

    Returns
    -------
    Dataset
        ``X`` ``float32`` of shape ``(N, n_features)``, ``y`` ``int64``, ``teacher`` set.
    """
    _check_sizes(n_train=n_train, n_features=n_features, hidden=hidden, n_classes=n_classes)
    if n_test < 0:
        raise ValueError(f"n_test must be >= 0, got {n_test}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rng = np.random.default_rng(random_state)
    teacher = TeacherMLP(
        W1=rng.normal(0.0, 1.0 / np.sqrt(n_features), (n_features, hidden)),
        b1=rng.normal(0.0, 0.1, hidden),
        W2=rng.normal(0.0, 5.0 / np.sqrt(hidden), (hidden, n_classes)),
        b2=np.zeros(n_classes),
        temperature=float(temperature),
    )
    X_tr, X_te = (rng.standard_normal((n, n_features)).astype(np.float32)
                  for n in (n_train, n_test))
    y_tr, y_te = (_sample_categorical(teacher.predict_proba(X), rng) for X in (X_tr, X_te))
    return Dataset(X_tr, y_tr, X_te, y_te, name="teacher_student", n_classes=n_classes,
                   teacher=teacher)


def _check_sizes(**sizes: int) -> None:
    for key, value in sizes.items():
        if int(value) != value or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def _sample_categorical(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of ``p`` by inverting the cumulative distribution."""
    u = rng.random((p.shape[0], 1))
    y = (np.cumsum(p, axis=1) < u).sum(axis=1)
    return np.minimum(y, p.shape[1] - 1).astype(np.int64)


# --------------------------------------------------------------------------------------------
# IDX format
# --------------------------------------------------------------------------------------------
def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file of unsigned bytes (raw or ``.gz``), as used by MNIST.

    The header is a big-endian 32-bit magic number ``0x00000803`` (3-D images) or
    ``0x00000801`` (1-D labels), then one big-endian 32-bit size per dimension.

    Parameters
    ----------
    path : str or PathLike
        File to read; a name ending in ``.gz`` is decompressed.

    Returns
    -------
    np.ndarray
        ``uint8`` array of the shape given in the header.

    Raises
    ------
    ValueError
        If the magic number, the sizes or the file length are wrong (the message names the file).
    """
    path = Path(path)
    data = _read_bytes(path)
    magic = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else None
    if magic not in (_IDX_LABELS, _IDX_IMAGES):
        shown = "none (file shorter than 4 bytes)" if magic is None else f"0x{magic:08X}"
        raise ValueError(
            f"{path}: not an IDX ubyte file: magic number {shown}, expected 0x00000803 "
            "(images) or 0x00000801 (labels). The file is corrupted or of another format.")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: IDX header announces shape {shape} "
                         f"({int(np.prod(shape))} bytes) but {len(data) - header} bytes follow")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _read_bytes(path: Path) -> bytes:
    if path.name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: cannot decompress ({exc})") from exc
    return path.read_bytes()


def _idx_candidates(folder: Path, stem: str) -> list[Path]:
    kind = "idx3" if stem.endswith("images") else "idx1"
    names = (f"{stem}-{kind}-ubyte", f"{stem}.{kind}-ubyte")
    return [folder / (name + gz) for name in names for gz in ("", ".gz")]


def _find_idx_set(folder: Path) -> list[Path] | None:
    """The four IDX files in ``folder`` (any accepted naming), or ``None`` if one is missing."""
    found = [next((p for p in _idx_candidates(folder, s) if p.is_file()), None)
             for s in _IDX_STEMS]
    return None if None in found else found


def _read_idx_set(paths: Sequence[Path]) -> tuple[np.ndarray, ...]:
    x_tr, y_tr, x_te, y_te = (read_idx(p) for p in paths)
    for images, labels, ip, lp in ((x_tr, y_tr, paths[0], paths[1]),
                                   (x_te, y_te, paths[2], paths[3])):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{ip} {images.shape} and {lp} {labels.shape} do not match: "
                             "expected images (N, H, W) and labels (N,)")
    return x_tr, y_tr, x_te, y_te


# --------------------------------------------------------------------------------------------
# Locating local copies
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Spec:
    """How one image data set is stored locally and on OpenML."""

    name: str
    subdirs: tuple[str, ...]          # folders under root tried besides root itself
    npz_names: tuple[str, ...]
    formats: str                      # human description of the standard files
    openml_name: str
    n_train: int                      # OpenML rows: first n_train are train, rest test
    image_shape: tuple[int, int, int]  # (C, H, W)


_MNIST = _Spec(
    "mnist", ("mnist", "MNIST", "MNIST/raw"), ("mnist.npz",),
    "mnist.npz (keys x_train, y_train, x_test, y_test) or the four IDX files "
    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte (optionally .gz, '-idx3-ubyte' or '.idx3-ubyte')",
    "mnist_784", 60000, (1, 28, 28))
_FASHION = _Spec(
    "fashion_mnist",
    ("fashion_mnist", "fashion-mnist", "FashionMNIST", "FashionMNIST/raw"),
    ("fashion_mnist.npz", "fashion-mnist.npz"),
    _MNIST.formats.replace("mnist.npz", "fashion_mnist.npz"),
    "Fashion-MNIST", 60000, (1, 28, 28))
_CIFAR10 = _Spec(
    "cifar10", ("cifar10", "cifar-10", "CIFAR10"), ("cifar10.npz",),
    f"{_CIFAR_DIR}/ with data_batch_1..5 and test_batch, or {_CIFAR_TAR}, or cifar10.npz",
    "CIFAR_10", 50000, (3, 32, 32))
_SVHN = _Spec(
    "svhn", ("svhn", "SVHN"), ("svhn.npz",),
    "train_32x32.mat and test_32x32.mat (cropped-digits format), or svhn.npz",
    "SVHN", 73257, (3, 32, 32))


def _resolve_root(root: PathLike | None) -> Path | None:
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(DATA_ENV_VAR)
    return Path(env).expanduser() if env else None


def _search_dirs(root: Path | None, spec: _Spec) -> list[Path]:
    if root is None:
        return []
    return [d for d in (root, *(root / s for s in spec.subdirs)) if d.is_dir()]


def _find_npz(dirs: Sequence[Path], spec: _Spec) -> Path | None:
    return next((d / n for d in dirs for n in spec.npz_names if (d / n).is_file()), None)


def _read_npz(path: Path) -> tuple[np.ndarray, ...]:
    keys = ("x_train", "y_train", "x_test", "y_test")
    with np.load(path, allow_pickle=False) as d:
        missing = [k for k in keys if k not in d.files]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}; expected {list(keys)}")
        return tuple(d[k] for k in keys)


def _find_local(root: Path | None, spec: _Spec,
                readers: Sequence[Callable[[Path], tuple | None]]) -> tuple | None:
    """First hit of ``reader(dir)`` over the search folders, else the npz, else ``None``."""
    dirs = _search_dirs(root, spec)
    for folder in dirs:
        for reader in readers:
            arrays = reader(folder)
            if arrays is not None:
                return arrays
    npz = _find_npz(dirs, spec)
    return None if npz is None else _read_npz(npz)


def _missing_message(root: Path | None, spec: _Spec, reason: str) -> str:
    where = ("no data folder was given (root=None and $%s is unset)" % DATA_ENV_VAR
             if root is None else
             "looked in " + ", ".join(str(d) for d in (root, *(root / s for s in spec.subdirs))))
    return (f"{spec.name}: no local copy found; {where}. Accepted files: {spec.formats}. "
            f"Download from OpenML ({spec.openml_name!r}) failed: {reason}. "
            f"Put the files in a folder and pass it as root=... or set {DATA_ENV_VAR}=<folder>.")


# --------------------------------------------------------------------------------------------
# OpenML fallback
# --------------------------------------------------------------------------------------------
def _fetch(spec: _Spec, root: Path | None, download: bool) -> tuple[np.ndarray, ...]:
    if not download:
        raise FileNotFoundError(_missing_message(root, spec, "download=False"))
    try:
        bunch = fetch_openml(spec.openml_name, version=1, as_frame=False, parser="auto")
    except Exception as exc:  # network, HTTP, cache or parsing errors alike
        raise FileNotFoundError(
            _missing_message(root, spec, f"{type(exc).__name__}: {exc}")) from exc
    X = np.asarray(bunch.data).astype(np.uint8).reshape(-1, *spec.image_shape)
    y = np.asarray(bunch.target).astype(np.int64)
    if len(X) <= spec.n_train:
        raise RuntimeError(f"OpenML {spec.openml_name!r} has {len(X)} rows; "
                           f"expected more than {spec.n_train} (train + test)")
    n = spec.n_train
    return X[:n], y[:n], X[n:], y[n:]


# --------------------------------------------------------------------------------------------
# Shared post-processing
# --------------------------------------------------------------------------------------------
def _subset(n: int | None, total: int, rng: np.random.Generator | None, what: str) -> np.ndarray:
    if n is None:
        return np.arange(total)
    if int(n) != n or not 1 <= n <= total:
        raise ValueError(f"{what} must be an integer in [1, {total}], got {n!r}")
    if rng is None:
        return np.arange(n)
    return np.sort(rng.choice(total, size=int(n), replace=False))


def _finish(arrays: tuple[np.ndarray, ...], spec: _Spec, *, flatten: bool, standardize: bool,
            n_train: int | None, n_test: int | None, random_state: Seed) -> Dataset:
    """uint8 images → subset → float32 in [0, 1] → (standardize) → (N, C, H, W) or flat."""
    x_tr, y_tr, x_te, y_te = arrays
    rng = None if random_state is None else np.random.default_rng(random_state)
    i_tr = _subset(n_train, len(x_tr), rng, "n_train")
    i_te = _subset(n_test, len(x_te), rng, "n_test")
    X_tr, X_te = (_to_nchw(x[i], spec) for x, i in ((x_tr, i_tr), (x_te, i_te)))
    if standardize:
        mean = X_tr.mean(axis=(0, 2, 3), keepdims=True)
        std = X_tr.std(axis=(0, 2, 3), keepdims=True)
        std[std == 0] = 1.0
        X_tr, X_te = (X_tr - mean) / std, (X_te - mean) / std
    if flatten:
        X_tr, X_te = X_tr.reshape(len(X_tr), -1), X_te.reshape(len(X_te), -1)
    y_tr, y_te = (_labels(y[i], spec) for y, i in ((y_tr, i_tr), (y_te, i_te)))
    return Dataset(np.ascontiguousarray(X_tr, dtype=np.float32), y_tr,
                   np.ascontiguousarray(X_te, dtype=np.float32), y_te,
                   name=spec.name, n_classes=10)


def _to_nchw(x: np.ndarray, spec: _Spec) -> np.ndarray:
    """Images as float32 ``(N, C, H, W)`` in [0, 1]; accepts NHW, NHWC, NCHW or flat rows."""
    c, h, w = spec.image_shape
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[1:] == (h, w, c) and x.shape[1:] != (c, h, w):
        x = x.transpose(0, 3, 1, 2)
    if x.size != len(x) * c * h * w:
        raise ValueError(f"{spec.name}: images of shape {x.shape[1:]} cannot be read as "
                         f"{(c, h, w)}")
    x = x.reshape(len(x), c, h, w)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    return x.astype(np.float32)


def _labels(y: np.ndarray, spec: _Spec) -> np.ndarray:
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if spec is _SVHN:
        y = np.where(y == 10, 0, y)
    if y.size and (y.min() < 0 or y.max() > 9):
        raise ValueError(f"{spec.name}: labels outside 0..9 (min {y.min()}, max {y.max()})")
    return y


def _load(spec: _Spec, readers: Sequence[Callable[[Path], tuple | None]],
          root: PathLike | None, download: bool, **options: Any) -> Dataset:
    resolved = _resolve_root(root)
    arrays = _find_local(resolved, spec, readers)
    if arrays is None:
        arrays = _fetch(spec, resolved, download)
    return _finish(arrays, spec, **options)


# --------------------------------------------------------------------------------------------
# Per-format readers: folder -> arrays or None
# --------------------------------------------------------------------------------------------
def _idx_reader(folder: Path) -> tuple | None:
    paths = _find_idx_set(folder)
    return None if paths is None else _read_idx_set(paths)


def _unpickle_batch(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    batch = pickle.loads(raw, encoding="bytes")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{source}: CIFAR batch without b'data' / b'labels'")
    return np.asarray(data, dtype=np.uint8), np.asarray(labels, dtype=np.int64)


def _stack_batches(batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple:
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def _cifar_dir_reader(folder: Path) -> tuple | None:
    for d in (folder / _CIFAR_DIR, folder):
        names = (*_CIFAR_TRAIN, "test_batch")
        if all((d / n).is_file() for n in names):
            batches = [_unpickle_batch((d / n).read_bytes(), str(d / n)) for n in names]
            return (*_stack_batches(batches[:5]), *batches[5])
    return None


def _cifar_tar_reader(folder: Path) -> tuple | None:
    path = folder / _CIFAR_TAR
    if not path.is_file():
        return None
    with tarfile.open(path, "r:gz") as tar:
        def member(name: str) -> tuple[np.ndarray, np.ndarray]:
            try:
                raw = tar.extractfile(f"{_CIFAR_DIR}/{name}").read()
            except KeyError as exc:
                raise ValueError(f"{path}: archive has no member {_CIFAR_DIR}/{name}") from exc
            return _unpickle_batch(raw, f"{path}:{name}")
        train = [member(n) for n in _CIFAR_TRAIN]
        return (*_stack_batches(train), *member("test_batch"))


def _svhn_reader(folder: Path) -> tuple | None:
    paths = [folder / n for n in _SVHN_FILES]
    if not all(p.is_file() for p in paths):
        return None
    out = []
    for p in paths:
        mat = scipy.io.loadmat(p)
        if "X" not in mat or "y" not in mat:
            raise ValueError(f"{p}: expected variables 'X' (32,32,3,N) and 'y' (N,1)")
        out += [np.asarray(mat["X"]).transpose(3, 2, 0, 1), mat["y"]]
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Public image loaders
# --------------------------------------------------------------------------------------------
_COMMON_DOC = """
    Parameters
    ----------
    root : str, PathLike or None
        Data folder; ``None`` uses ``$SOFTRANK_DATA``. The folder itself and its sub-folders
        {subdirs} are searched.
    flatten : bool, default {flatten}
        Return ``(N, {flat})`` rows instead of ``(N, {chw})`` images.
    standardize : bool, default False
        Subtract the per-channel mean and divide by the per-channel standard deviation of the
        returned training images (applied to train and test alike).
    n_train, n_test : int or None
        Keep only this many samples: the first ones, or a random subset (in original order)
        when ``random_state`` is given.
    random_state : int, Generator or None
        Seed for the subsets.
    download : bool, default True
        Fall back to ``fetch_openml({openml!r})`` when no local copy is found.

    Returns
    -------
    Dataset
        ``X`` float32 in ``[0, 1]`` (unless standardized), ``y`` int64 in ``0..9``.

    Raises
    ------
    FileNotFoundError
        No local copy and the download failed; the message lists the folders and file names.
    ValueError
        A local file is corrupted (the message names it) or a size option is out of range.
"""


def _document(spec: _Spec, flatten: bool) -> Callable[[Callable], Callable]:
    c, h, w = spec.image_shape
    text = _COMMON_DOC.format(subdirs=", ".join(spec.subdirs), flatten=flatten,
                              flat=c * h * w, chw=f"{c}, {h}, {w}", openml=spec.openml_name)

    def decorate(func: Callable) -> Callable:
        func.__doc__ = (func.__doc__ or "") + text
        return func
    return decorate


@_document(_MNIST, flatten=True)
def load_mnist(root: PathLike | None = None, flatten: bool = True, standardize: bool = False,
               n_train: int | None = None, n_test: int | None = None,
               random_state: Seed = None, download: bool = True) -> Dataset:
    """MNIST handwritten digits (60000 train, 10000 test, 28x28 grey).

    Local formats: ``mnist.npz`` with keys ``x_train, y_train, x_test, y_test`` or the four
    IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (``.gz`` and the
    ``.idx3-ubyte`` spelling accepted). Images come back as ``(N, 1, 28, 28)`` when not flat.
    """
    return _load(_MNIST, [_idx_reader], root, download, flatten=flatten,
                 standardize=standardize, n_train=n_train, n_test=n_test,
                 random_state=random_state)


@_document(_FASHION, flatten=True)
def load_fashion_mnist(root: PathLike | None = None, flatten: bool = True,
                       standardize: bool = False, n_train: int | None = None,
                       n_test: int | None = None, random_state: Seed = None,
                       download: bool = True) -> Dataset:
    """Fashion-MNIST clothing images (60000 train, 10000 test, 28x28 grey).

    Same local formats as :func:`load_mnist`, with ``fashion_mnist.npz`` as the archive name.
    """
    return _load(_FASHION, [_idx_reader], root, download, flatten=flatten,
                 standardize=standardize, n_train=n_train, n_test=n_test,
                 random_state=random_state)


@_document(_CIFAR10, flatten=False)
def load_cifar10(root: PathLike | None = None, flatten: bool = False,
                 standardize: bool = False, n_train: int | None = None,
                 n_test: int | None = None, random_state: Seed = None,
                 download: bool = True) -> Dataset:
    """CIFAR-10 colour images (50000 train, 10000 test, 3x32x32).

    Local formats: the python batches ``cifar-10-batches-py/data_batch_1..5`` and
    ``test_batch`` (pickled dicts with ``b'data'`` ``(N, 3072)`` uint8 channel-planar and
    ``b'labels'``), the archive ``cifar-10-python.tar.gz`` (read without extracting), or
    ``cifar10.npz`` (images NCHW, NHWC or flat). The batches are unpickled: load only files
    you trust.
    """
    return _load(_CIFAR10, [_cifar_dir_reader, _cifar_tar_reader], root, download,
                 flatten=flatten, standardize=standardize, n_train=n_train, n_test=n_test,
                 random_state=random_state)


@_document(_SVHN, flatten=False)
def load_svhn(root: PathLike | None = None, flatten: bool = False, standardize: bool = False,
              n_train: int | None = None, n_test: int | None = None,
              random_state: Seed = None, download: bool = True) -> Dataset:
    """SVHN cropped digits (73257 train, 26032 test, 3x32x32); label 10 (digit 0) → 0.

    Local formats: ``train_32x32.mat`` and ``test_32x32.mat`` (MATLAB, ``X`` of shape
    ``(32, 32, 3, N)``, ``y`` of shape ``(N, 1)`` in ``1..10``), or ``svhn.npz``.
    """
    return _load(_SVHN, [_svhn_reader], root, download, flatten=flatten,
                 standardize=standardize, n_train=n_train, n_test=n_test,
                 random_state=random_state)


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------
_LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits_split,
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "svhn": load_svhn,
    "teacher_student": make_teacher_student,
}
DATASET_NAMES: tuple[str, ...] = tuple(_LOADERS)
_ALIASES = {"fashionmnist": "fashion_mnist", "cifar_10": "cifar10", "teacher": "teacher_student"}


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """Load a data set by name.

    Parameters
    ----------
    name : str
        One of ``'digits', 'mnist', 'fashion_mnist', 'cifar10', 'svhn', 'teacher_student'``
        (case and ``-``/``_`` are ignored: ``'Fashion-MNIST'`` and ``'CIFAR-10'`` work).
    **kwargs
        Passed to the loader (:func:`load_digits_split`, :func:`load_mnist`,
        :func:`load_fashion_mnist`, :func:`load_cifar10`, :func:`load_svhn`,
        :func:`make_teacher_student`).

    Returns
    -------
    Dataset

    Raises
    ------
    ValueError
        For an unknown name; the message lists the valid ones.
    """
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return _LOADERS[key](**kwargs)
