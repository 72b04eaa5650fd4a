"""Models and uses a skorch user brings that already work, pinned so they keep working.

Frozen parameters, BatchNorm (KFAC refuses it by name), multi-output MSE, binary
BCEWithLogits, a float64 net, GridSearchCV with n_jobs=2, pickling fitted estimators,
reproducible stochastic estimates, Conv1d + LayerNorm. Expected values are independent float64
references (tests/_float64_reference.py) of the same trained modules.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from skorch import NeuralNetBinaryClassifier, NeuralNetClassifier, NeuralNetRegressor
from sklearn.model_selection import GridSearchCV
from torch import nn

from softrank import TIC, ApproxLOO, HessianNorm, SoftRankFIM, TraceRatio
from softrank.layers import UnsupportedLayerError
from softrank.scoring import InSampleSplit

from ._float64_reference import Reference64, rel_err

LAM = 1e-2
RTOL = 1e-5  # float32 nets against float64 references of the same weights


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _fit(cls, module, X, y, epochs=20, **kw):
    torch.manual_seed(0)
    kw = {"criterion": nn.CrossEntropyLoss, "optimizer": torch.optim.SGD, "lr": 0.1,
          "optimizer__weight_decay": LAM, **kw}
    return cls(module, max_epochs=epochs, train_split=None, verbose=0, **kw).fit(X, y)


def _data(n=60, d=5, K=3, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randn(n, d).astype(np.float32), rng.randint(0, K, n)


class MLP(nn.Module):
    def __init__(self, d=5, h=8, k=3, squeeze=False):
        super().__init__()
        self.l1, self.l2, self.squeeze = nn.Linear(d, h), nn.Linear(h, k), squeeze

    def forward(self, X):
        z = self.l2(torch.tanh(self.l1(X)))
        return z[:, 0] if self.squeeze else z


# ------------------------------------------------------------------ frozen parameters
class Frozen(MLP):
    def __init__(self):
        super().__init__()
        for p in self.l1.parameters():
            p.requires_grad_(False)


def test_frozen_parameters_are_left_out_and_stay_frozen():
    X, y = _data()
    net = _fit(NeuralNetClassifier, Frozen, X, y)
    flags = {n: p.requires_grad for n, p in net.module_.named_parameters()}
    ref = Reference64(net.module_, X, y, "ce", names=["l2.weight", "l2.bias"])
    for approximation in ("exact", "gram"):
        est = SoftRankFIM(net, prefit=True, lam=LAM, approximation=approximation).fit(X, y)
        assert rel_err(est.measure_, ref.soft_rank(LAM)) < RTOL
    assert flags == {n: p.requires_grad for n, p in net.module_.named_parameters()}


# ------------------------------------------------------------------ BatchNorm
class WithBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.bn, self.l2 = nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, X):
        return self.l2(torch.relu(self.bn(self.l1(X))))


def test_batchnorm_exact_in_eval_mode_and_kfac_names_it():
    X, y = _data(n=64)
    net = _fit(NeuralNetClassifier, WithBN, X, y, batch_size=16)
    net.module_.train()
    state = {k: v.clone() for k, v in net.module_.state_dict().items()}
    modes = [m.training for m in net.module_.modules()]
    ref = Reference64(net.module_, X, y, "ce")  # eval mode: running statistics
    assert rel_err(SoftRankFIM(net, prefit=True, lam=LAM).fit(X, y).measure_,
                   ref.soft_rank(LAM)) < RTOL
    with pytest.raises(UnsupportedLayerError, match=r"layer 'bn' \(BatchNorm1d\).*or use "
                                                    r"approximation='exact'"):
        SoftRankFIM(net, prefit=True, lam=LAM, approximation="kfac").fit(X, y)
    assert all(torch.equal(v, state[k]) for k, v in net.module_.state_dict().items())
    assert modes == [m.training for m in net.module_.modules()]


# ------------------------------------------------------------------ other families
def test_multi_output_mse():
    rng = np.random.RandomState(0)
    X = rng.randn(50, 5).astype(np.float32)
    Y = (X[:, :3] + 0.3 * rng.randn(50, 3)).astype(np.float32)
    net = _fit(NeuralNetRegressor, MLP, X, Y, criterion=nn.MSELoss, lr=0.05)
    ref = Reference64(net.module_, X, Y, "mse")
    tr = TraceRatio(net, prefit=True).fit(X, Y).result_.diagnostics
    assert rel_err(tr["trace_F"], float(ref.F.trace())) < RTOL
    assert rel_err(tr["trace_C"], float(ref.C.trace())) < RTOL
    for approximation in ("exact", "gram"):
        est = SoftRankFIM(net, prefit=True, lam=LAM, approximation=approximation).fit(X, Y)
        assert rel_err(est.measure_, ref.soft_rank(LAM)) < RTOL
    assert rel_err(TIC(net, prefit=True, lam=LAM).fit(X, Y).measure_, ref.tic(LAM)) < RTOL


def test_binary_bce_with_logits():
    X, y = _data(K=2)
    net = _fit(NeuralNetBinaryClassifier, MLP, X, y.astype(np.float32),
               criterion=nn.BCEWithLogitsLoss, module__k=1, module__squeeze=True)
    ref = Reference64(net.module_, X, y, "bce")
    est = SoftRankFIM(net, prefit=True, lam=LAM).fit(X, y)
    assert rel_err(est.measure_, ref.soft_rank(LAM)) < RTOL
    assert rel_err(est.result_.diagnostics["trace_C"], float(ref.C.trace())) < RTOL


class MLP64(MLP):
    def __init__(self):
        super().__init__(h=6)
        self.double()


def test_float64_net_to_float64_precision():
    X, y = _data()
    net = _fit(NeuralNetClassifier, MLP64, X.astype(np.float64), y)
    ref = Reference64(net.module_, X, y, "ce")
    X64 = X.astype(np.float64)
    assert rel_err(SoftRankFIM(net, prefit=True, lam=LAM).fit(X64, y).measure_,
                   ref.soft_rank(LAM)) < 1e-9
    assert rel_err(HessianNorm(net, prefit=True).fit(X64, y).measure_,
                   float(ref.H().trace())) < 1e-9
    assert rel_err(TIC(net, prefit=True, lam=LAM).fit(X64, y).measure_, ref.tic(LAM)) < 1e-9
    # float32 X is cast to the net's float64
    assert rel_err(SoftRankFIM(net, prefit=True, lam=LAM).fit(X, y).measure_,
                   ref.soft_rank(LAM)) < 1e-9


# ------------------------------------------------------------------ Conv1d + LayerNorm
class Seq1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv1d(2, 4, 3, padding=1), nn.LayerNorm(8)
        self.pool, self.out = nn.AdaptiveAvgPool1d(1), nn.Linear(4, 3)

    def forward(self, X):
        return self.out(self.pool(torch.relu(self.norm(self.conv(X)))).squeeze(-1))


def test_conv1d_and_layernorm():
    rng = np.random.RandomState(0)
    X, y = rng.randn(40, 2, 8).astype(np.float32), rng.randint(0, 3, 40)
    net = _fit(NeuralNetClassifier, Seq1d, X, y)
    ref = Reference64(net.module_, X, y, "ce")
    for approximation in ("exact", "gram"):
        est = SoftRankFIM(net, prefit=True, lam=LAM, approximation=approximation).fit(X, y)
        assert rel_err(est.measure_, ref.soft_rank(LAM)) < RTOL
    tr = TraceRatio(net, prefit=True).fit(X, y).result_.diagnostics
    assert rel_err(tr["trace_F"], float(ref.F.trace())) < RTOL
    with pytest.raises(UnsupportedLayerError, match=r"layer 'conv' \(Conv1d\)"):
        SoftRankFIM(net, prefit=True, lam=LAM, approximation="kfac").fit(X, y)


# ------------------------------------------------------------------ scikit-learn behaviours
def test_pickled_fitted_estimators_give_the_same_numbers():
    X, y = _data(n=40)
    Xn = np.random.RandomState(1).randn(7, 5).astype(np.float32)
    net = NeuralNetClassifier(MLP, criterion=nn.CrossEntropyLoss, optimizer__weight_decay=LAM,
                              max_epochs=5, train_split=None, verbose=0)
    for est in (SoftRankFIM(net, random_state=0), SoftRankFIM(net, approximation="gram",
                                                              random_state=0),
                SoftRankFIM(net, approximation="kfac", random_state=0), TIC(net, random_state=0),
                ApproxLOO(net, random_state=0)):
        est.fit(X, y)
        back = pickle.loads(pickle.dumps(est))
        assert (back.measure_, back.gap_) == (est.measure_, est.gap_)
        assert back.score(X, y) == est.score(X, y)
        assert np.array_equal(back.predict(Xn), est.predict(Xn))
        if isinstance(est, SoftRankFIM):
            np.testing.assert_allclose(back.transform(Xn), est.transform(Xn), rtol=1e-12)


def test_stochastic_estimates_are_reproducible_and_covered_by_their_error_bar():
    X, y = _data(n=80, d=6, K=4)
    net = _fit(NeuralNetClassifier, MLP, X, y, module__d=6, module__h=16, module__k=4, lr=0.2)
    exact = SoftRankFIM(net, prefit=True, lam=LAM).fit(X, y).measure_
    state = torch.get_rng_state()
    a = SoftRankFIM(net, prefit=True, lam=LAM, approximation="matrix_free",
                    random_state=0).fit(X, y)
    assert torch.equal(state, torch.get_rng_state())
    b = SoftRankFIM(net, prefit=True, lam=LAM, approximation="matrix_free",
                    random_state=0).fit(X, y)
    assert a.measure_ == b.measure_
    assert abs(a.measure_ - exact) < 4 * a.stderr_
    h = HessianNorm(net, prefit=True, approximation="matrix_free", random_state=3).fit(X, y)
    h_exact = HessianNorm(net, prefit=True).fit(X, y).measure_
    assert abs(h.measure_ - h_exact) < 4 * h.stderr_


@pytest.mark.slow
def test_grid_search_with_two_jobs_matches_one_job():
    X, y = _data(n=60, d=4)
    net = NeuralNetClassifier(MLP, module__d=4, criterion=nn.CrossEntropyLoss, max_epochs=5,
                              train_split=None, verbose=0)
    grid = {"estimator__optimizer__weight_decay": [1e-3, 1e-1]}
    scores = [GridSearchCV(SoftRankFIM(net, random_state=0), grid, cv=InSampleSplit(),
                           n_jobs=jobs).fit(X, y).cv_results_["mean_test_score"]
              for jobs in (1, 2)]
    np.testing.assert_array_equal(scores[0], scores[1])
