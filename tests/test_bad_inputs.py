"""Bad-input sweep: every bad parameter, X, y and study grid gets a ValueError / TypeError /
MemoryError whose message names what is wrong (the parameter, X or y, the grid key) — never an
error from inside torch, never a silently wrong number. Tiny nets; the whole file runs in seconds.
"""
from __future__ import annotations

import inspect
import re
import warnings

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier, NeuralNetRegressor
from torch import nn

from softrank import TIC, ApproxLOO, HessianNorm, SoftRankFIM, TraceRatio
from softrank.study import expand_grid

ESTIMATORS = {"SoftRankFIM": SoftRankFIM, "TIC": TIC, "TraceRatio": TraceRatio,
              "HessianNorm": HessianNorm, "ApproxLOO": ApproxLOO}


class Linear(nn.Module):
    def __init__(self, k=3):
        super().__init__()
        self.l = nn.Linear(4, k)

    def forward(self, X):
        return self.l(X)


RNG = np.random.RandomState(0)
X = RNG.randn(24, 4).astype(np.float32)
Y = np.arange(24) % 3
Y_REG = RNG.randn(24, 2).astype(np.float32)


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return NeuralNetClassifier(Linear, criterion=nn.CrossEntropyLoss, max_epochs=2, lr=0.1,
                               optimizer__weight_decay=1e-2, train_split=None,
                               verbose=0).fit(X, Y)


@pytest.fixture(scope="module")
def regressor():
    torch.manual_seed(0)
    return NeuralNetRegressor(Linear, module__k=2, criterion=nn.MSELoss, max_epochs=2, lr=0.1,
                              optimizer__weight_decay=1e-2, train_split=None,
                              verbose=0).fit(X, Y_REG)


def _unfitted():
    return NeuralNetClassifier(Linear, criterion=nn.CrossEntropyLoss, max_epochs=1,
                               train_split=None, verbose=0)


def _raises(fit, kinds, name):
    """``fit()`` raises one of ``kinds`` and the message names ``name`` (a regex)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(kinds) as info:
            fit()
    assert re.search(name, str(info.value)), f"{type(info.value).__name__}: {info.value}"
    assert not _from_torch_internals(info.value), info.value


def _from_torch_internals(error) -> bool:
    """The error was raised inside torch or skorch, not by softrank's checks."""
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    where = tb.tb_frame.f_code.co_filename
    return ("/torch/" in where or "/skorch/" in where) and "softrank" not in where


# -- the estimators' parameters -------------------------------------------------------------
BAD_PARAMETERS = [
    ("lam", 0.0), ("lam", -1.0), ("lam", float("nan")), ("lam", float("inf")), ("lam", 1j),
    ("lam", np.array([1j])), ("lam", "big"), ("lam", None), ("lam", True), ("lam", [0.1, 0.2]),
    ("lam", {"nope": 0.1}), ("lam", {"l.weight": 0.1, "l.bias": -1.0}),
    ("approximation", "lanczos"), ("approximation", None), ("approximation", 3),
    ("n_curvature_samples", 0), ("n_curvature_samples", -1), ("n_curvature_samples", 2.5),
    ("n_curvature_samples", True), ("n_curvature_samples", "10"),
    ("batch_size", 0), ("batch_size", 2.5), ("batch_size", True), ("batch_size", None),
    ("batch_size", "8"),
    ("memory_budget", float("nan")), ("memory_budget", float("inf")), ("memory_budget", "lots"),
    ("memory_budget", -1), ("memory_budget", 0), ("memory_budget", True),
    ("memory_budget", "1XB"), ("memory_budget", 10), ("memory_budget", "1KB"),
    ("random_state", "seed"), ("random_state", 1.5), ("random_state", -1),
    ("random_state", 2 ** 40), ("random_state", [1]),
    ("params", "nope"), ("params", ["nope"]), ("params", []), ("params", 3),
    ("params", [1, 2]),
    ("device", "gpu"), ("device", 3), ("device", "nope"),
    ("prefit", "yes"),
]


def _takes(cls, name) -> bool:
    return name in inspect.signature(cls).parameters


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@pytest.mark.parametrize("name, value", BAD_PARAMETERS,
                         ids=[f"{n}={v!r}" for n, v in BAD_PARAMETERS])
def test_bad_parameter_is_named(classifier, estimator, name, value):
    cls = ESTIMATORS[estimator]
    if not _takes(cls, name):
        pytest.skip(f"{estimator} has no parameter {name}")
    kinds = (MemoryError,) if name == "memory_budget" and value in (10, "1KB") else \
        (ValueError, TypeError)
    _raises(lambda: cls(classifier, **{name: value}).fit(X, Y), kinds, name)


@pytest.mark.parametrize("estimator, name, value", [
    ("HessianNorm", "ord", "nuclear"), ("HessianNorm", "approximation", "kfac"),
    ("HessianNorm", "approximation", "gram"), ("TIC", "variant", "gauss"),
    ("ApproxLOO", "method", "gram"), ("ApproxLOO", "n_points", 0),
    ("ApproxLOO", "n_points", 1.5), ("SoftRankFIM", "prefit", None),
])
def test_bad_estimator_specific_parameter_is_named(classifier, estimator, name, value):
    _raises(lambda: ESTIMATORS[estimator](classifier, **{name: value}).fit(X, Y),
            (ValueError, TypeError), name)


# -- X --------------------------------------------------------------------------------------
def _with(value, at=(0, 0), dtype=np.float64):
    out = X.astype(dtype)
    out[at] = value
    return out


BAD_X = {
    "NaN": (_with(np.nan, at=(3, 1)), Y,
            r"X contains NaN in 1 of 24 rows \(first: row 3\).*drop or impute"),
    "inf": (_with(np.inf, at=(5, 0)), Y,
            r"X contains infinite values in 1 of 24 rows \(first: row 5\)"),
    "overflows float32": (_with(1e39), Y, "overflow.*float32"),
    "empty": (X[:0], Y[:0], "0 sample"),
    "1-D": (X[:, 0], Y, r"\bX\b.*2D"),
    "too few features": (X[:, :3], Y, r"\bX\b.*(features|shape)"),
    "an extra axis": (X[:, :, None], Y, r"\bX\b.*(features|shape)"),
    "strings": (X.astype(str), Y, r"\bX\b"),
    "objects": (np.array([["a"] * 4] * 24, dtype=object), Y, r"\bX\b"),
    "complex": (X.astype(np.complex64), Y, r"\bX\b|[Cc]omplex"),
}


@pytest.mark.parametrize("case", list(BAD_X))
@pytest.mark.parametrize("fitted", [True, False], ids=["prefit", "unfitted"])
def test_bad_X_is_named(classifier, case, fitted):
    Xb, yb, name = BAD_X[case]
    net = classifier if fitted else _unfitted()
    _raises(lambda: SoftRankFIM(net).fit(Xb, yb), (ValueError, TypeError), name)


# -- y --------------------------------------------------------------------------------------
BAD_Y = {
    "label unseen / beyond the outputs": (np.where(np.arange(24) == 0, 5, Y), r"label.*5|\[5\]"),
    "negative label": (Y - 1, "negative label"),
    "wrong length": (Y[:-1], "different numbers of samples|inconsistent"),
    "NaN": (np.where(np.arange(24) == 0, np.nan, Y.astype(float)), r"\by\b.*NaN|NaN"),
    "strings": (Y.astype(str), "LabelEncoder"),
    "2-D": (np.stack([Y, Y], 1), r"\by\b.*1d"),
    "continuous": (Y + 0.5, "continuous"),
    "None": (None, "requires y"),
}


@pytest.mark.parametrize("case", list(BAD_Y))
@pytest.mark.parametrize("fitted", [True, False], ids=["prefit", "unfitted"])
def test_bad_y_is_named(classifier, case, fitted):
    yb, name = BAD_Y[case]
    net = classifier if fitted else _unfitted()
    _raises(lambda: SoftRankFIM(net).fit(X, yb), (ValueError, TypeError), name)


@pytest.mark.parametrize("yb, name", [
    (Y_REG[:, :1], r"output|shape|target"),
    (np.where(np.eye(24, 2) > 0, np.nan, Y_REG), "NaN"),
    (Y_REG[:-1], "different numbers of samples|inconsistent"),
    (np.array([["a", "b"]] * 24), r"\by\b|string|numeric"),
])
def test_bad_regression_targets_are_named(regressor, yb, name):
    _raises(lambda: HessianNorm(regressor).fit(X, yb), (ValueError, TypeError), name)


# -- nothing silently wrong: the checks do not reject good input -----------------------------
@pytest.mark.parametrize("params", [
    {"lam": 0.1}, {"lam": np.float32(0.1)}, {"lam": {"l.weight": 0.1, "l.bias": 0.2}},
    {"lam": torch.full((15,), 0.1)}, {"random_state": np.random.RandomState(0)},
    {"random_state": np.int64(3)}, {"n_curvature_samples": np.int64(20)},
    {"memory_budget": "1GB"}, {"memory_budget": 2e9}, {"params": ["l.weight"]},
    {"params": "l.weight"},
    {"params": lambda name, p: name.endswith("weight")}, {"device": "cpu"},
])
def test_good_parameters_pass(classifier, params):
    est = SoftRankFIM(classifier, approximation="dense", **params).fit(X, Y)
    assert np.isfinite(est.measure_) and est.measure_ > 0


# -- study grids ----------------------------------------------------------------------------
_D = {"dataset": "digits"}
BAD_GRIDS = {
    "unknown key": ({"fixed": {**_D, "widht": 4}}, "widht"),
    "unknown approximation": ({"fixed": _D, "measures": {"soft_rank": ["kfc"]}}, "kfc"),
    "unknown LOO method": ({"fixed": _D, "measures": {"loo": ["gram"]}}, "loo.*gram"),
    "a string for a list": ({"fixed": _D, "measures": {"tic": "kfac"}}, "tic.*kfac"),
    "a string for a bool": ({"fixed": _D, "measures": {"hessian": "no"}}, "hessian.*no"),
    "a fraction for an int": ({"fixed": {**_D, "width": 8.7}}, r"width.*8\.7"),
    "a bool for an int": ({"fixed": {**_D, "epochs": True}}, "epochs.*True"),
    "a word for an int": ({"fixed": _D, "vary": {"width": ["wide"]}}, "width.*wide"),
    "infinite weight decay": ({"fixed": {**_D, "weight_decay": float("inf")}},
                              "weight_decay.*inf"),
    "zero learning rate": ({"fixed": {**_D, "lr": 0}}, "lr.*0"),
    "unknown data set": ({"fixed": {"dataset": "cifar100"}}, "dataset.*cifar100"),
    "unknown architecture": ({"fixed": {**_D, "arch": "rnn"}}, "arch.*rnn"),
    "no dataset": ({"fixed": {"width": 4}}, "dataset"),
    "empty vary": ({"fixed": _D, "vary": {"width": []}}, "width.*non-empty"),
    "vary not a list": ({"fixed": _D, "vary": {"width": 4}}, "width.*list"),
    "measures not an object": ({"fixed": _D, "measures": [1]}, "measures"),
    "negative seed": ({"fixed": {**_D, "seed": -1}}, "seed.*-1"),
}


@pytest.mark.parametrize("case", list(BAD_GRIDS))
def test_bad_grid_is_named(case):
    spec, name = BAD_GRIDS[case]
    _raises(lambda: expand_grid(spec), (ValueError, TypeError), name)
