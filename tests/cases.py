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

Confident nets (``CONFIDENT_CASE_IDS``, cross-entropy, K=3): an MLP
Linear(8,16)-Tanh-Linear(16,K) whose output layer fits balanced labels with a logit margin of
5.8 on every sample (100 % training accuracy), then scaled ×4 (``conf4``: training loss
1e-10) or ×100 (``conf100``: training loss 0 in float64). Weights and inputs are float32
numbers, so ``.float()`` copies are the same model.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as Fn

from softrank import ModelData

__all__ = ["LossCase", "Case", "LOSSES", "MODELS", "KRONECKER_MODELS", "CASE_IDS",
           "KRONECKER_CASE_IDS", "CONFIDENT_CASE_IDS", "CONFIDENT_SCALES", "build_case",
           "skorch_log", "N_SAMPLES", "BATCH_SIZE"]

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


def confident_mlp(K):
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, K))


MODELS = {"mlp": (mlp, (3,)), "cnn": (cnn, (1, 5, 5)), "bn": (bn, (3,)),
          "conf4": (confident_mlp, (8,)), "conf100": (confident_mlp, (8,))}
KRONECKER_MODELS = ("mlp", "cnn", "conf4", "conf100")  # Linear/Conv2d only: KFAC, EKFAC apply
CONFIDENT_SCALES = {"conf4": 4.0, "conf100": 100.0}  # output layer × scale of a margin-5.8 net
CONFIDENT_MARGIN = 5.8
CONFIDENT_CASE_IDS = [f"{m}-ce" for m in CONFIDENT_SCALES]

# conf100's curvature is ~1e-240: relative comparisons there measure rounding of formulas
# (n − Σ(1 − ε_i)), so it is checked with absolute tolerances in test_confident.py instead
CASE_IDS = [f"{m}-{l}" for m in MODELS if m not in CONFIDENT_SCALES for l in LOSSES
            ] + ["conf4-ce"]
KRONECKER_CASE_IDS = [c for c in CASE_IDS if c.split("-")[0] in KRONECKER_MODELS]


class AccurateCrossEntropy(nn.Module):
    r"""Mean cross-entropy as :math:`\mathrm{softplus}(\log\sum_{k\ne y}e^{z_k-z_y})`: the
    reference criterion of the confident cases. ``nn.CrossEntropyLoss`` rounds
    :math:`\pi_y = 1 - 10^{-10}` before subtracting 1 (its gradient is off by ~1e-7
    relative there); this form keeps every digit of the loss and its derivatives."""

    def forward(self, z, y):
        target = torch.arange(z.shape[-1], device=z.device) == y.unsqueeze(-1)
        rel = z - z.gather(-1, y.unsqueeze(-1))
        others = torch.logsumexp(torch.where(target, float("-inf"), rel), dim=-1)
        return Fn.softplus(others).mean()


def _accurate_ce_on_one(z, y):
    return AccurateCrossEntropy()(z.unsqueeze(0), y.unsqueeze(0))


@dataclass
class Case:
    id: str
    loss: LossCase
    model: nn.Module
    criterion: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    reference_criterion: nn.Module | None = None  # what the float64 references differentiate

    def __post_init__(self):
        if self.reference_criterion is None:
            self.reference_criterion = self.criterion

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
    seed = _seed("confident-ce" if model_name in CONFIDENT_SCALES else case_id)  # one base net
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn default initialization
    model = nn.Sequential(make(loss.n_out), loss.head()).double()
    _set_batchnorm_statistics(model, in_shape, gen)
    X = torch.randn(n, *in_shape, generator=gen, dtype=torch.float64)
    y = loss.targets(n, gen)
    if model_name in CONFIDENT_SCALES:
        X, y = _make_confident(model, X, CONFIDENT_SCALES[model_name])
        loss = replace(loss, natural_loss=_accurate_ce_on_one)
        return Case(case_id, loss, model, loss.criterion(), X, y, AccurateCrossEntropy())
    return Case(case_id, loss, model, loss.criterion(), X, y)


def _make_confident(model, X, scale):
    """Balanced labels and an output layer that fits them with one logit margin
    :data:`CONFIDENT_MARGIN` on every sample (least squares on the hidden features: exact for
    n ≤ 17; otherwise the labels become the net's predictions, rescaled to that smallest
    margin), then × ``scale``. Weights and X are
    float32 numbers. 100 % training accuracy."""
    head = model[0][-1]
    K = head.out_features
    with torch.no_grad():
        model[0][0].weight.mul_(3.0)  # distinct hidden features: a moderate head fits them
        for p in model.parameters():
            p.copy_(p.float().double())
        X = X.float().double()
        y = torch.arange(len(X)) % K
        h = model[0][:-1](X)
        target = CONFIDENT_MARGIN * (Fn.one_hot(y, K).double() - 1.0 / K)
        W = torch.linalg.lstsq(torch.cat([h, torch.ones(len(X), 1, dtype=h.dtype)], 1),
                               target).solution  # (hidden + 1, K)
        head.weight.copy_(W[:-1].T)
        head.bias.copy_(W[-1])
        z = model(X)
        y = z.argmax(1)  # = the balanced labels when the fit is exact (n ≤ 17)
        others = z.masked_fill(Fn.one_hot(y, K).bool(), float("-inf")).max(1).values
        margin = float((z.gather(1, y[:, None])[:, 0] - others).min())
        assert margin > 0, "the confident case does not classify its data correctly"
        head.weight.mul_(CONFIDENT_MARGIN * scale / margin)
        head.bias.mul_(CONFIDENT_MARGIN * scale / margin)
        for p in head.parameters():
            p.copy_(p.float().double())
    return X, y
