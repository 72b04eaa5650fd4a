r"""Train one configuration with skorch and return its result row.

The network is a skorch ``NeuralNetClassifier`` with ``CrossEntropyLoss`` on logits,
``train_split=None`` (so n = ``n_train``, every point is trained on), shuffled minibatches and
Adam or SGD (momentum 0.9) with ``weight_decay`` = λ: the objective is
:math:`\frac1n\sum_i\ell_i + \frac\lambda2\|\theta\|^2`. With ``measures.finish`` > 0
each net is also finished — full-batch L-BFGS on that objective until the relative stationarity
r ≤ 1e-3 or ``finish`` iterations (:func:`softrank.stationarity.finish_training`) — and measured
again (columns ``*_finished``).

Architectures (``arch``):

* ``mlp`` — ``depth`` hidden layers of ``width`` ReLU units on the flattened input;
* ``cnn`` — ``depth`` blocks Conv2d(3×3, ``width`` channels, padding 1) → ReLU → MaxPool(2),
  then one Linear layer on the flattened feature map.

:func:`run_config` is the job the runner sends to workers: it takes a plain dict (picklable,
no torch objects), sets the number of torch threads, and returns a flat dict (one row).
"""
from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from ..datasets import Dataset, load_dataset
from ..stationarity import finish_training
from .grid import TrainConfig, config_from_dict
from .measures import evaluate, measure_model

__all__ = ["MLP", "CNN", "build_module", "load_data", "train_model", "run_config",
           "IMAGE_SHAPES"]

#: (C, H, W) of the image data sets (the CNN reshapes flat rows to this)
IMAGE_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28),
                "cifar10": (3, 32, 32), "svhn": (3, 32, 32)}


class MLP(nn.Module):
    """``n_features → [width, ReLU] × depth → n_classes`` (logits)."""

    def __init__(self, n_features: int, n_classes: int, width: int, depth: int):
        super().__init__()
        sizes = [n_features] + [width] * depth
        layers: list[nn.Module] = [nn.Flatten()]
        for d_in, d_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], n_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, X):
        return self.layers(X)


class CNN(nn.Module):
    """``depth`` × [Conv2d(3×3, width) → ReLU → MaxPool(2)] → Linear (logits)."""

    def __init__(self, image_shape: tuple[int, int, int], n_classes: int, width: int,
                 depth: int):
        super().__init__()
        c, h, w = image_shape
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = width, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"depth={depth} pools a {image_shape} image below 1x1")
        layers += [nn.Flatten(), nn.Linear(c * h * w, n_classes)]
        self.layers = nn.Sequential(*layers)

    def forward(self, X):
        return self.layers(X)


def build_module(config: TrainConfig, n_features: int, n_classes: int) -> nn.Module:
    """The (untrained) network of ``config``; initialization draws from torch's global RNG."""
    if config.arch == "mlp":
        return MLP(n_features, n_classes, config.width, config.depth)
    if config.dataset not in IMAGE_SHAPES:
        raise ValueError(f"arch='cnn' needs an image data set {sorted(IMAGE_SHAPES)}; "
                         f"got {config.dataset!r}")
    return CNN(IMAGE_SHAPES[config.dataset], n_classes, config.width, config.depth)


@functools.lru_cache(maxsize=4)
def _load_cached(dataset: str, n_train: int, n_test: int, data_seed: int,
                 data_root: str | None) -> Dataset:
    if dataset == "digits":
        data = load_dataset("digits", random_state=data_seed)
        return _take(data, n_train, n_test, data_seed)
    if dataset == "teacher_student":
        return load_dataset("teacher_student", n_train=n_train, n_test=n_test,
                            random_state=data_seed)
    return load_dataset(dataset, root=data_root, n_train=n_train, n_test=n_test,
                        random_state=data_seed, download=data_root is None)


def _take(data: Dataset, n_train: int, n_test: int, seed: int) -> Dataset:
    """Random subsets (in original order) of a fixed split."""
    for what, n, total in (("n_train", n_train, len(data.X_train)),
                           ("n_test", n_test, len(data.X_test))):
        if n > total:
            raise ValueError(f"{data.name}: {what}={n} exceeds the {total} available samples")
    rng = np.random.default_rng(seed)
    i_tr = np.sort(rng.choice(len(data.X_train), n_train, replace=False))
    i_te = np.sort(rng.choice(len(data.X_test), n_test, replace=False))
    return Dataset(data.X_train[i_tr], data.y_train[i_tr], data.X_test[i_te], data.y_test[i_te],
                   name=data.name, n_classes=data.n_classes)


def load_data(config: TrainConfig, data_root: str | None = None) -> Dataset:
    """Training and test arrays of ``config`` (cached per process); images for the CNN,
    flat rows for the MLP (which flattens anyway)."""
    data = _load_cached(config.dataset, config.n_train, config.n_test, config.data_seed,
                        None if data_root is None else str(data_root))
    if config.arch != "cnn":
        return data
    shape = IMAGE_SHAPES[config.dataset]
    return Dataset(data.X_train.reshape(-1, *shape), data.y_train,
                   data.X_test.reshape(-1, *shape), data.y_test, name=data.name,
                   n_classes=data.n_classes)


def _optimizer(config: TrainConfig) -> tuple[type, dict]:
    if config.optimizer == "adam":
        return torch.optim.Adam, {"optimizer__weight_decay": config.weight_decay}
    return torch.optim.SGD, {"optimizer__weight_decay": config.weight_decay,
                             "optimizer__momentum": 0.9}


def train_model(config: TrainConfig, data: Dataset):
    """A fitted skorch ``NeuralNetClassifier`` (deterministic given ``config.seed`` on one
    thread)."""
    from skorch import NeuralNetClassifier

    torch.manual_seed(config.seed)
    n_features = int(np.prod(data.X_train.shape[1:]))
    module = build_module(config, n_features, data.n_classes)
    optimizer, options = _optimizer(config)
    net = NeuralNetClassifier(
        module, criterion=nn.CrossEntropyLoss, optimizer=optimizer, lr=config.lr,
        max_epochs=config.epochs, batch_size=config.batch_size, train_split=None,
        iterator_train__shuffle=True, verbose=0, **options)
    net.fit(data.X_train, data.y_train)
    return net


def _check_finite(net) -> None:
    for name, p in net.module_.named_parameters():
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"training diverged: parameter {name!r} is not finite "
                                     "(lower the learning rate)")


def run_config(config: TrainConfig | dict, torch_threads: int | None = 1,
               data_root: str | None = None) -> dict[str, Any]:
    """Train and measure one configuration; the result row (flat dict).

    ``torch_threads``: intra-op threads for this job (restored afterwards); None leaves torch's
    setting alone. ``data_root``: folder of the image data (else ``$SOFTRANK_DATA``).
    """
    cfg = config if isinstance(config, TrainConfig) else config_from_dict(config)
    previous = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(int(torch_threads))
    try:
        return _run(cfg, data_root)
    finally:
        torch.set_num_threads(previous)


def _run(cfg: TrainConfig, data_root: str | None) -> dict[str, Any]:
    start = time.perf_counter()
    data = load_data(cfg, data_root)
    t0 = time.perf_counter()
    net = train_model(cfg, data)
    _check_finite(net)
    row: dict[str, Any] = {"config_id": cfg.id, **cfg.hyperparameters(),
                           "n_params": sum(p.numel() for p in net.module_.parameters()),
                           "time_train": time.perf_counter() - t0}
    criterion = nn.CrossEntropyLoss()
    row.update(evaluate(net.module_, criterion, data, cfg.measures))
    row.update(measure_model(net.module_, criterion, data, cfg.weight_decay, cfg.measures,
                             seed=cfg.seed))
    if cfg.measures.finish:
        row.update(_finished_columns(net, criterion, data, cfg))
    row["time_total"] = time.perf_counter() - start
    return row


#: tolerance on the relative stationarity r of the study's finishing
FINISH_TOL = 1e-3


def _finished_columns(net, criterion, data: Dataset, cfg: TrainConfig) -> dict[str, Any]:
    """The net finished by full-batch L-BFGS (``cfg.measures.finish`` iterations at most) on
    its training objective, measured again: every column of :func:`evaluate` and
    :func:`measure_model` with the suffix ``_finished``, and ``finish_iterations``,
    ``finish_converged``, ``time_finish``."""
    t0 = time.perf_counter()
    res = finish_training(net, data.X_train, data.y_train, tol=FINISH_TOL,
                          max_iter=cfg.measures.finish)
    out: dict[str, Any] = {"finish_iterations": res.n_iter, "finish_converged": res.converged,
                           "time_finish": time.perf_counter() - t0}
    module = res.estimator.module_
    cols = evaluate(module, criterion, data, cfg.measures)
    cols.update(measure_model(module, criterion, data, cfg.weight_decay, cfg.measures,
                              seed=cfg.seed))
    out.update({f"{k}_finished": v for k, v in cols.items()})
    return out
