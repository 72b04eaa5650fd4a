"""One registry of tiny test cases: models × loss families, all float64.

A :class:`Case` is a fresh user model (eval mode, BatchNorm statistics already set by a few
train-mode forwards), its criterion, data X, y and the ``output_transform`` that turns the
module output into the natural parameter z (SPEC §3). Everything is seeded from the case id,
so building a case twice gives bit-identical objects.

Loss families (``LOSSES``)::

    ce            CrossEntropyLoss on logits, K=3
    nll           NLLLoss on a LogSoftmax head, K=3
    nll_skorch    NLLLoss on a Softmax head with output_transform = log(p + eps) (skorch)
    bce           BCEWithLogitsLoss, one logit
    mse1, mse3    MSELoss with 1 and 3 outputs
    poisson       PoissonNLLLoss(log_input=True), K=2
    huber         HuberLoss: not in the family table, its GGN uses A from autograd

Models (``MODELS``)::

    mlp    Linear(3,4)-ReLU-Linear(4,K)
    cnn    Conv2d(1,2,3,stride=2,padding=1)-ReLU-Flatten-Linear(18,K) on 1×5×5 inputs
    bn     Linear(3,4)-BatchNorm1d(4)-Tanh-Dropout(0.3)-Linear(4,K)
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as Fn

from softrank import ModelData

__all__ = ["LossCase", "Case", "LOSSES", "MODELS", "KRONECKER_MODELS", "CASE_IDS",
           "KRONECKER_CASE_IDS", "build_case", "skorch_log", "N_SAMPLES", "BATCH_SIZE"]

N_SAMPLES = 8
BATCH_SIZE = 3  # n = 8 streams as batches of 3, 3, 2: every cross-batch sum is exercised


def skorch_log(p: torch.Tensor) -> torch.Tensor:
    """What skorch's NeuralNetClassifier.get_loss applies to probabilities before NLLLoss."""
    return torch.log(p + torch.finfo(p.dtype).eps)


def _class_labels(K):
    def make(n, gen):
        return torch.randint(0, K, (n,), generator=gen)
    return make


def _gaussian_targets(K):
    def make(n, gen):
        return torch.randn(n, K, generator=gen, dtype=torch.float64)
    return make


def _binary_targets(n, gen):
    return torch.randint(0, 2, (n, 1), generator=gen).double()


def _count_targets(n, gen):
    return torch.poisson(torch.full((n, 2), 1.5, dtype=torch.float64), generator=gen)


def _criterion_on_one(criterion_factory):
    """Per-sample loss ℓ(z_i, y_i) = criterion(z_i[None], y_i[None]) with mean reduction."""
    crit = criterion_factory()

    def loss(z, y):
        return crit(z.unsqueeze(0), y.unsqueeze(0))
    return loss


def _categorical_on_log_probs(z, y):
    r"""NLLLoss on log-probabilities z is linear in z, so its Hessian in z is 0; its Fisher is
    that of the categorical with natural parameter z, i.e. the Hessian of
    :math:`-\log\mathrm{softmax}(z)_y` (equal to NLL(z) whenever z are log-probabilities)."""
    return Fn.cross_entropy(z.unsqueeze(0), y.unsqueeze(0))


@dataclass(frozen=True)
class LossCase:
    """A criterion and what the references need to know about it."""

    name: str
    n_out: int
    criterion: Callable[[], nn.Module]
    head: Callable[[], nn.Module]
    output_transform: Callable | None
    targets: Callable[[int, torch.Generator], torch.Tensor]
    natural_loss: Callable  # (z_i, y_i) -> scalar whose Hessian in z_i is A_i
    is_fisher: bool = True
    is_classifier: bool = False


LOSSES = {
    "ce": LossCase("ce", 3, nn.CrossEntropyLoss, nn.Identity, None, _class_labels(3),
                   _criterion_on_one(nn.CrossEntropyLoss), is_classifier=True),
    "nll": LossCase("nll", 3, nn.NLLLoss, lambda: nn.LogSoftmax(dim=1), None, _class_labels(3),
                    _categorical_on_log_probs, is_classifier=True),
    "nll_skorch": LossCase("nll_skorch", 3, nn.NLLLoss, lambda: nn.Softmax(dim=1), skorch_log,
                           _class_labels(3), _categorical_on_log_probs, is_classifier=True),
    "bce": LossCase("bce", 1, nn.BCEWithLogitsLoss, nn.Identity, None, _binary_targets,
                    _criterion_on_one(nn.BCEWithLogitsLoss)),
    "mse1": LossCase("mse1", 1, nn.MSELoss, nn.Identity, None, _gaussian_targets(1),
                     _criterion_on_one(nn.MSELoss)),
    "mse3": LossCase("mse3", 3, nn.MSELoss, nn.Identity, None, _gaussian_targets(3),
                     _criterion_on_one(nn.MSELoss)),
    "poisson": LossCase("poisson", 2, lambda: nn.PoissonNLLLoss(log_input=True), nn.Identity,
                        None, _count_targets,
                        _criterion_on_one(lambda: nn.PoissonNLLLoss(log_input=True))),
    "huber": LossCase("huber", 2, lambda: nn.HuberLoss(delta=0.7), nn.Identity, None,
                      _gaussian_targets(2), _criterion_on_one(lambda: nn.HuberLoss(delta=0.7)),
                      is_fisher=False),
}


def mlp(K):
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, K))


def cnn(K):
    return nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(18, K))


def bn(K):
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Dropout(0.3),
                         nn.Linear(4, K))


MODELS = {"mlp": (mlp, (3,)), "cnn": (cnn, (1, 5, 5)), "bn": (bn, (3,))}
KRONECKER_MODELS = ("mlp", "cnn")  # only Linear/Conv2d parameters: KFAC and EKFAC apply

CASE_IDS = [f"{m}-{l}" for m in MODELS for l in LOSSES]
KRONECKER_CASE_IDS = [c for c in CASE_IDS if c.split("-")[0] in KRONECKER_MODELS]


@dataclass
class Case:
    id: str
    loss: LossCase
    model: nn.Module
    criterion: nn.Module
    X: torch.Tensor
    y: torch.Tensor

    @property
    def output_transform(self):
        return self.loss.output_transform

    def model_data(self, **kw):
        kw.setdefault("batch_size", BATCH_SIZE)
        return ModelData(self.model, self.criterion, self.X, self.y,
                         output_transform=self.output_transform, **kw)


def _seed(case_id: str) -> int:
    return zlib.crc32(case_id.encode())


def _set_batchnorm_statistics(model, in_shape, gen):
    """A few train-mode forwards so that running statistics are far from (0, 1)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(2.0 * torch.randn(16, *in_shape, generator=gen, dtype=torch.float64) + 0.5)
    model.eval()


def build_case(case_id: str, n: int = N_SAMPLES) -> Case:
    """A fresh, deterministic case ``'<model>-<loss>'`` in eval mode."""
    model_name, loss_name = case_id.split("-", 1)
    loss = LOSSES[loss_name]
    make, in_shape = MODELS[model_name]
    gen = torch.Generator().manual_seed(_seed(case_id))
    torch.manual_seed(_seed(case_id))  # nn default initialization
    model = nn.Sequential(make(loss.n_out), loss.head()).double()
    _set_batchnorm_statistics(model, in_shape, gen)
    X = torch.randn(n, *in_shape, generator=gen, dtype=torch.float64)
    y = loss.targets(n, gen)
    return Case(case_id, loss, model, loss.criterion(), X, y)
