"""Criteria as trained, from skorch: outputs that are not probabilities, options outside the
family table, ``ignore_index`` and summed losses.

Each test trains a tiny skorch net the way a user would and compares softrank with a float64
reference built here with torch.func on the same trained module (or expects a clear error).
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from sklearn.model_selection import StratifiedKFold
from skorch import NeuralNetClassifier, NeuralNetRegressor
from skorch.dataset import ValidSplit
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

from softrank import ApproxLOO, HessianNorm, ModelData, SoftRankFIM, TIC, TraceRatio, curvature
from softrank import NotStationaryWarning
from softrank.families import UnsupportedCriterionError

from .reference import assert_rel

TOL32 = 1e-5  # skorch nets are float32; the references are of their float64 copies


class Net(nn.Module):
    def __init__(self, d_in=4, K=3, head=None):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d_in, 6), nn.Linear(6, K)
        self.head = head if head is not None else nn.Identity()

    def forward(self, X):
        return self.head(self.l2(torch.tanh(self.l1(X))))


def _data(n, d=4, K=3, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randn(n, d).astype(np.float32), rng.randint(0, K, n)


def _classifier(X, y, **kw):
    torch.manual_seed(0)
    kw = {"optimizer": torch.optim.SGD, "lr": 0.2, "optimizer__weight_decay": 1e-2,
          "max_epochs": 20, "train_split": None, "verbose": 0, **kw}
    return NeuralNetClassifier(kw.pop("module", Net), **kw).fit(X, y)


class Functional:
    """float64 copy of a trained module as functions of its flat parameters."""

    def __init__(self, module):
        self.m = copy.deepcopy(module).double().eval()
        self.names = [k for k, _ in self.m.named_parameters()]
        self.shapes = [p.shape for _, p in self.m.named_parameters()]
        self.theta = torch.cat([p.detach().reshape(-1) for p in self.m.parameters()])

    def params(self, theta):
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = int(np.prod(s))
            out[n] = theta[i:i + k].reshape(s)
            i += k
        return out

    def z(self, theta, X):
        return functional_call(self.m, self.params(theta), (X,))

    def per_sample_grads(self, loss_one, X, y):
        def f(theta, x, t):
            return loss_one(self.z(theta, x[None]), t[None])
        return vmap(grad(f), in_dims=(None, 0, 0))(self.theta, X, y)

    def ggn(self, loss_one, X, y):
        """(1/n) Σ J_iᵀ A_i J_i with A_i the Hessian of the per-sample loss in z_i."""
        J = vmap(jacrev(lambda th, x: self.z(th, x[None])[0]), in_dims=(None, 0))(self.theta, X)
        Z = self.z(self.theta, X)
        A = vmap(hessian(lambda zi, t: loss_one(zi[None], t[None])))(Z, y)
        return torch.einsum("nkp,nkl,nlq->pq", J, A, J) / len(X)


def soft_rank(M, lam):
    s = torch.linalg.eigvalsh(M)
    return float((s / (s + lam)).sum())


# -- outputs that are not probabilities; non-finite outputs, losses and curvature ---------------
def test_logsoftmax_module_with_nllloss_is_refused_as_not_probabilities():
    X, y = _data(60, d=5)
    net = _classifier(X, y, module=Net, module__d_in=5, module__head=nn.LogSoftmax(dim=1),
                      criterion=nn.NLLLoss, max_epochs=3)
    assert np.isnan(net.history[-1, "train_loss"])  # what skorch trained on: log of log-probs
    for est in [SoftRankFIM(net, prefit=True), SoftRankFIM(net, prefit=True, approximation="kfac"),
                TIC(net, prefit=True, approximation="diagonal"), HessianNorm(net, prefit=True),
                ApproxLOO(net, prefit=True), TraceRatio(net, prefit=True)]:
        with pytest.raises(ValueError, match="not probabilities.*Softmax.*CrossEntropyLoss"):
            est.fit(X, y)


def test_softmax_module_with_nllloss_still_works():
    X, y = _data(40, d=5)
    net = _classifier(X, y, module=Net, module__d_in=5, module__head=nn.Softmax(dim=1),
                      criterion=nn.NLLLoss, max_epochs=3)
    est = SoftRankFIM(net, prefit=True).fit(X, y)
    assert np.isfinite(est.measure_) and np.isfinite(est.gap_)


def test_non_finite_outputs_are_refused_before_any_curvature():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1e30)
    X = torch.full((4, 3), 1e10)  # finite inputs, outputs overflow float32
    with pytest.raises(ValueError, match="outputs z .* NaN or inf .* 4 of 4"):
        ModelData(model, nn.CrossEntropyLoss(), X, torch.tensor([0, 1, 0, 1]))


def test_overflowing_curvature_is_refused_with_its_cause():
    model = nn.Linear(2, 1).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.fill_(800.0)  # log-rate 800: e^z overflows float64
    md = ModelData(model, nn.PoissonNLLLoss(), torch.zeros(3, 2, dtype=torch.float64),
                   torch.ones(3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="curvature vectors .* NaN or inf"):
        curvature(md, "gsm", "diagonal")


class SqrtAbsLoss(nn.Module):
    """Not twice differentiable where z = y (√|z − y|)."""

    reduction = "mean"

    def forward(self, z, y):
        out = (z - y).abs().sqrt()
        return out if self.reduction == "none" else out.mean()


def test_undefined_second_derivatives_are_refused_with_their_cause():
    model = nn.Linear(2, 1).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    md = ModelData(model, SqrtAbsLoss(), torch.ones(3, 2, dtype=torch.float64),
                   torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="dense 'hessian' matrix contains NaN or inf"):
        curvature(md, "hessian", "dense")
    with pytest.raises(ValueError, match="second derivative of SqrtAbsLoss .* 1 of 3"):
        curvature(md, "fisher", "diagonal")


# -- options outside the family table: the generic GGN ---------------------------------------------
def test_label_smoothing_takes_the_generic_ggn_path():
    X, y = _data(50)
    net = _classifier(X, y, criterion=nn.CrossEntropyLoss, criterion__label_smoothing=0.1,
                      max_epochs=30)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    f = Functional(net.module_)
    Xt, yt = torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(y)
    H = hessian(lambda th: crit(f.z(th, Xt), yt))(f.theta)
    G = f.per_sample_grads(crit, Xt, yt)
    C = G.T @ G / len(Xt)
    lam = 1e-2

    tol = TOL32
    hn = HessianNorm(net, prefit=True).fit(X, y)
    assert_rel(hn.measure_, float(torch.trace(H)), tol=tol, what="Tr H")
    assert_rel(hn.train_loss_, float(crit(f.z(f.theta, Xt), yt)), tol=tol, what="training loss")
    tic = TIC(net, prefit=True, variant="hessian").fit(X, y)
    I = torch.eye(len(f.theta), dtype=torch.float64)
    assert_rel(tic.measure_, float(torch.linalg.solve(H + lam * I, C).trace()), tol=tol,
               what="TIC(H)")
    loo = ApproxLOO(net, prefit=True).fit(X, y)  # Σ tr(A_i P_i) = rank_Λ(GGN)
    assert_rel(loo.soft_rank_, soft_rank(f.ggn(crit, Xt, yt), lam), tol=tol, what="rank GGN")
    assert np.isfinite(loo.gap_)
    with pytest.raises(UnsupportedCriterionError,
                       match="label_smoothing.*HessianNorm, TIC\\(variant='hessian'\\) and "
                             "ApproxLOO"):
        SoftRankFIM(net, prefit=True).fit(X, y)


@pytest.mark.parametrize("criterion", [
    nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 0.5])),
    nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0])),
])
def test_weighted_criteria_get_the_ggn_of_the_weighted_loss(criterion):
    torch.manual_seed(1)
    binary = isinstance(criterion, nn.BCEWithLogitsLoss)
    model = Net(K=1 if binary else 3).double()
    X = torch.randn(12, 4, dtype=torch.float64)
    y = torch.randint(0, 2 if binary else 3, (12,))
    y = y[:, None].double() if binary else y
    md = ModelData(model, criterion, X, y, batch_size=5)
    crit = copy.deepcopy(criterion).double()
    crit.reduction = "none"
    f = Functional(model)

    def loss_one(z, t):
        return crit(z, t).sum()
    F = f.ggn(loss_one, X, y)
    G = f.per_sample_grads(loss_one, X, y)
    assert_rel(curvature(md, "fisher", "dense").M, F, what="GGN")
    assert_rel(curvature(md, "fisher", "gram").soft_rank(1e-3), soft_rank(F, 1e-3),
               what="GGN soft rank (gram)")
    assert_rel(curvature(md, "gsm", "diagonal").trace(), float((G ** 2).sum() / 12), what="Tr C")


# -- ignore_index ----------------------------------------------------------------------------------
def test_ignore_index_samples_enter_neither_loss_nor_curvature_nor_n():
    X, y = _data(60)  # about a third of the labels are 0 = ignored
    wd = 1e-2
    net = _classifier(X, y, criterion=nn.CrossEntropyLoss, criterion__ignore_index=0,
                      max_epochs=30)
    f = Functional(net.module_)
    Xt, yt = torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(y)
    keep = yt != 0
    n_kept = int(keep.sum())
    ce = nn.CrossEntropyLoss()
    G = f.per_sample_grads(ce, Xt[keep], yt[keep])
    F = f.ggn(ce, Xt[keep], yt[keep])

    tr = TraceRatio(net, prefit=True).fit(X, y)
    # the criterion's mean as trained runs over the labelled samples only
    trained = nn.CrossEntropyLoss(ignore_index=0)(f.z(f.theta, Xt), yt)
    assert_rel(tr.train_loss_, float(trained), tol=TOL32, what="training loss")
    assert tr.n_train_ == n_kept
    assert_rel(tr.result_.diagnostics["trace_C"], float((G ** 2).sum() / n_kept), tol=TOL32,
               what="Tr C")
    assert_rel(tr.result_.diagnostics["trace_F"], float(torch.trace(F)), tol=TOL32, what="Tr F")
    sr = SoftRankFIM(net, prefit=True).fit(X, y)
    assert sr.lam_ == pytest.approx(wd)
    assert_rel(sr.measure_, soft_rank(F, wd), tol=TOL32, what="soft rank")
    assert_rel(sr.gap_, tr.measure_ * sr.measure_ / n_kept, what="gap")


def test_ignore_index_n_counts_the_labelled_samples_of_the_training_split():
    X, y = _data(60)
    net = _classifier(X, y, criterion=nn.CrossEntropyLoss, criterion__ignore_index=0,
                      max_epochs=2, train_split=ValidSplit(5))  # 48 trained, 12 validation
    train_idx, _ = next(StratifiedKFold(5).split(X, y))  # how ValidSplit(5) splits
    est = TraceRatio(net, prefit=True).fit(X, y)
    assert est.n_train_ == int((y[train_idx] != 0).sum())


def test_ignore_index_on_every_label_is_a_clear_error():
    with pytest.raises(ValueError, match="every label equals the criterion's ignore_index=1"):
        ModelData(nn.Linear(2, 3), nn.CrossEntropyLoss(ignore_index=1), torch.zeros(4, 2),
                  torch.ones(4, dtype=torch.long))


# -- reduction='sum' and lam='auto' ----------------------------------------------------------------
@pytest.mark.parametrize("batch_size, steps", [(80, 1), (20, 4), (30, 3)])
def test_summed_loss_lam_auto_is_weight_decay_per_sample_of_a_step(batch_size, steps):
    n, wd = 80, 0.1
    X, y = _data(n)
    net = _classifier(X, y, criterion=nn.CrossEntropyLoss, criterion__reduction="sum",
                      lr=0.01, optimizer__weight_decay=wd, max_epochs=10, batch_size=batch_size)
    f = Functional(net.module_)
    Xt, yt = torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(y)
    lam = wd * steps / n  # Σ_steps (Σ_B g_i + wd θ) = n (mean g + wd·steps/n · θ)
    est = SoftRankFIM(net, prefit=True).fit(X, y)
    assert est.lam_ == pytest.approx(lam, rel=1e-12)
    assert_rel(est.measure_, soft_rank(f.ggn(nn.CrossEntropyLoss(), Xt, yt), lam), tol=TOL32,
               what="soft rank")


def test_summed_mse_counts_every_output_element():
    n, d, wd = 30, 3, 0.05
    rng = np.random.RandomState(0)
    X, y = rng.randn(n, 4).astype(np.float32), rng.randn(n, d).astype(np.float32)
    torch.manual_seed(0)
    net = NeuralNetRegressor(Net, module__K=d, criterion=nn.MSELoss,
                             criterion__reduction="sum", optimizer=torch.optim.SGD, lr=1e-3,
                             optimizer__weight_decay=wd, max_epochs=5, batch_size=n,
                             train_split=None, verbose=0).fit(X, y)
    est = TIC(net, prefit=True).fit(X, y)  # Σ_i Σ_j (z_ij − y_ij)² = d Σ_i ℓ_i
    assert est.lam_ == pytest.approx(wd / (n * d), rel=1e-12)


def test_summed_loss_without_history_warns_and_uses_batch_size():
    n, wd = 40, 0.1
    X, y = _data(n)
    net = _classifier(X, y, criterion=nn.CrossEntropyLoss, criterion__reduction="sum",
                      optimizer__weight_decay=wd, max_epochs=2, batch_size=10)
    restored = copy.deepcopy(net)
    restored.history.clear()
    with pytest.warns(UserWarning, match="no training history.*4 optimizer step"):
        est = SoftRankFIM(restored, prefit=True).fit(X, y)
    assert est.lam_ == pytest.approx(wd * 4 / n)


def test_unknown_reduction_asks_for_lam():
    X, y = _data(20)
    net = _classifier(X, y, criterion=nn.CrossEntropyLoss, max_epochs=1)
    net.criterion_.reduction = "weird"
    with pytest.raises(ValueError, match="reduction='weird'; pass lam explicitly"):
        SoftRankFIM(net, prefit=True).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit lam: no warning about the reduction
        warnings.filterwarnings("ignore", category=NotStationaryWarning)  # a 1-epoch net
        SoftRankFIM(net, prefit=True, lam=1e-2).fit(X, y)
