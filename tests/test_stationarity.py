"""Stationarity r, finishing to the regularized minimum, and the estimators' use of both:
r against a float64 torch.func reference, r ≈ 0 at a tight L-BFGS minimizer and large after one
epoch, the user's net bit-identical, the warning (its fix, the user's line), GridSearchCV."""
from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from skorch import NeuralNetClassifier
from torch import nn

from softrank import (ApproxLOO, FinishTraining, InSampleSplit, NotStationaryWarning, SoftRankFIM,
                      TraceRatio, finish_training, relative_stationarity)
from tests.test_estimators import assert_same, snapshot, teacher_data

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class TanhMLP(nn.Module):
    """A smooth MLP (tanh): its objective has a proper minimizer where ∇ = 0."""

    def __init__(self, n_features=6, hidden=8, n_classes=3, dtype=F64):
        super().__init__()
        self.hidden = nn.Linear(n_features, hidden, dtype=dtype)
        self.out = nn.Linear(hidden, n_classes, dtype=dtype)

    def forward(self, X):
        return self.out(torch.tanh(self.hidden(X)))


def smooth_net(wd=1e-2, max_epochs=1, dtype=F64, lr=0.05, **kw):
    kw.setdefault("train_split", None)
    return NeuralNetClassifier(TanhMLP, module__dtype=dtype, criterion=nn.CrossEntropyLoss,
                               optimizer=torch.optim.Adam, lr=lr, optimizer__weight_decay=wd,
                               max_epochs=max_epochs, batch_size=16, verbose=0, **kw)


@pytest.fixture(scope="module")
def data():
    return teacher_data()


@pytest.fixture(scope="module")
def one_epoch(data):
    X, y = data
    torch.manual_seed(0)
    return smooth_net().fit(X, y)


def reference_r(net, X, y, lam: dict) -> float:
    """r from torch.func on the float64 module: ‖∇(mean ℓ + ½Σλ_k‖θ_k‖²)‖ / ‖Λθ‖."""
    module = net.module_
    params = {k: v.detach().double() for k, v in module.named_parameters()}
    Xt, yt = torch.as_tensor(X, dtype=F64), torch.as_tensor(y)

    def objective(p):
        z = torch.func.functional_call(module, p, (Xt,))
        loss = nn.functional.cross_entropy(z, yt)
        return loss + 0.5 * sum(lam[k] * (v ** 2).sum() for k, v in p.items())

    g = torch.func.grad(objective)(params)
    grad = torch.cat([g[k].reshape(-1) for k in params])
    pull = torch.cat([lam[k] * params[k].reshape(-1) for k in params])
    return float(grad.norm() / pull.norm())


def test_r_equals_a_float64_reference(one_epoch, data):
    X, y = data
    names = [n for n, _ in one_epoch.module_.named_parameters()]
    r = relative_stationarity(one_epoch, X, y)
    assert r == pytest.approx(reference_r(one_epoch, X, y, dict.fromkeys(names, 1e-2)),
                              rel=1e-10)
    lam = {n: (1e-2 if "weight" in n else 3e-3) for n in names}  # parameter groups
    assert relative_stationarity(one_epoch, X, y, lam=lam, batch_size=7) == pytest.approx(
        reference_r(one_epoch, X, y, lam), rel=1e-10)


def test_r_large_after_one_epoch_and_zero_at_a_tight_minimizer(one_epoch, data):
    X, y = data
    assert relative_stationarity(one_epoch, X, y) > 5
    res = finish_training(one_epoch, X, y, tol=1e-7, max_iter=1500)
    assert res.stationarity_after < 1e-6  # float64 objective values: a floor near 1e-8
    assert relative_stationarity(res.estimator, X, y) < 1e-6
    assert reference_r(res.estimator, X, y, {n: 1e-2 for n, _ in
                                             one_epoch.module_.named_parameters()}) < 1e-6


def test_finish_reaches_tol_and_leaves_the_net_bit_identical(data):
    X, y = data
    for dtype in (F64, torch.float32):
        torch.manual_seed(1)
        Xd = X.astype(np.float64 if dtype == F64 else np.float32)
        net = smooth_net(dtype=dtype, max_epochs=3).fit(Xd, y)
        net.module_.train()
        before = snapshot(net)
        res = finish_training(net, X, y)
        assert_same(before, snapshot(net))
        assert res.converged and res.stationarity_after <= 1e-3 < res.stationarity_before
        assert res.objective_after < res.objective_before
        with torch.no_grad():
            z = net.module_.eval()(torch.as_tensor(Xd))
        net.module_.train()
        assert res.loss_before == pytest.approx(
            nn.functional.cross_entropy(z, torch.as_tensor(y)).item(), rel=1e-6)
        finished = res.estimator
        assert finished is not net and finished.module_ is not net.module_
        assert next(finished.module_.parameters()).dtype == dtype
        assert finished.module_.training  # modes copied as they are
        assert len(finished.history) == len(net.history)
        assert relative_stationarity(finished, X, y) == pytest.approx(res.stationarity_after,
                                                                      rel=1e-9)


def test_finish_a_pipeline_with_batches(data):
    X, y = data
    torch.manual_seed(0)
    pipe = make_pipeline(StandardScaler(), smooth_net(max_epochs=2)).fit(X * 3 + 1, y)
    full = finish_training(pipe, X * 3 + 1, y, tol=1e-4)
    batched = finish_training(pipe, X * 3 + 1, y, tol=1e-4, batch_size=7)
    assert full.converged and batched.converged
    assert batched.loss_after == pytest.approx(full.loss_after, rel=1e-6)
    assert relative_stationarity(batched.estimator, X * 3 + 1, y) <= 1e-4


def test_bad_options(one_epoch, data):
    X, y = data
    with pytest.raises(ValueError, match="tol"):
        finish_training(one_epoch, X, y, tol=0)
    with pytest.raises(ValueError, match="max_iter"):
        finish_training(one_epoch, X, y, max_iter=0)
    with pytest.raises(ValueError, match="unknown options"):
        ApproxLOO(one_epoch, finish={"maxiter": 3}).fit(X, y)
    with pytest.raises(ValueError, match="finish must be"):
        ApproxLOO(one_epoch, finish="yes").fit(X, y)


def test_warning_names_the_fix_and_points_at_the_caller(one_epoch, data):
    X, y = data
    with pytest.warns(NotStationaryWarning, match="finish=True") as record:
        est = SoftRankFIM(one_epoch).fit(X, y)
    assert est.stationarity_ > 5 and est.finish_result_ is None
    assert all(w.filename == __file__ for w in record)
    assert est.stationarity_ == pytest.approx(relative_stationarity(one_epoch, X, y), rel=1e-12)


def test_no_warning_at_the_minimizer_and_r_without_lam(one_epoch, data):
    X, y = data
    finished = finish_training(one_epoch, X, y).estimator
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotStationaryWarning)
        est = TraceRatio(finished).fit(X, y)  # no lam: Λ from the optimizer
    assert est.stationarity_ <= 1e-3


def test_finish_option_measures_and_predicts_with_the_finished_net(one_epoch, data):
    X, y = data
    before = snapshot(one_epoch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotStationaryWarning)
        est = ApproxLOO(one_epoch, finish={"tol": 1e-5}).fit(X, y)
    assert_same(before, snapshot(one_epoch))
    res = est.finish_result_
    assert est.estimator_ is res.estimator and est.stationarity_ == res.stationarity_after <= 1e-5
    np.testing.assert_array_equal(est.predict_proba(X), res.estimator.predict_proba(X))
    ref = ApproxLOO(res.estimator).fit(X, y)
    assert est.gap_ == pytest.approx(ref.gap_, rel=1e-10)


def test_grid_search_clone_and_pickle_with_finish(data):
    X, y = data
    est = ApproxLOO(smooth_net(max_epochs=2), finish=True, random_state=0)
    assert clone(est).get_params()["finish"] is True
    gs = GridSearchCV(est, {"estimator__optimizer__weight_decay": [1e-2, 1e-1]},
                      cv=InSampleSplit()).fit(X, y)
    best = gs.best_estimator_
    assert best.finish_result_.converged and best.stationarity_ <= 1e-3
    again = pickle.loads(pickle.dumps(best))
    assert again.gap_ == best.gap_ and again.stationarity_ == best.stationarity_
    np.testing.assert_array_equal(again.predict(X), best.predict(X))


def test_finish_training_callback_changes_the_net(data):
    X, y = data
    torch.manual_seed(0)
    net = smooth_net(max_epochs=2, callbacks=[("finish", FinishTraining(tol=1e-4))]).fit(X, y)
    result = dict(net.callbacks_)["finish"].result_
    assert result.converged and result.stationarity_before > 1
    assert relative_stationarity(net, X, y) <= 1e-4


# -- the verdict: summary() ---------------------------------------------------------------------
def test_summary_states_each_regime_with_its_action(one_epoch, data):
    X, y = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotStationaryWarning)
        diag = SoftRankFIM(one_epoch, approximation="diagonal").fit(X, y).summary()
    assert diag.regimes == ("not_stationary", "upper_bound") and not diag.trustworthy
    assert "finish=True" in diag.statements[0] and "approximation='kfac'" in diag.statements[1]
    d = diag.as_dict()
    assert d["n"] == 60 and d["lam"] == 1e-2 and d["alpha"] == pytest.approx(
        SoftRankFIM(one_epoch).fit(X, y).result_.diagnostics["alpha"], rel=1e-8)
    text = str(diag)
    assert "SoftRankFIM: gap" in text and "n = 60" in text and "Upper bound" in text
    finished = ApproxLOO(one_epoch, finish=True).fit(X, y).summary()
    assert finished.trustworthy and finished.finished and finished.invalid_points == 0
    assert "No known failure regime applies" in str(finished)


def test_collapsed_gradients_regime():
    X, y = teacher_data(n=30)
    torch.manual_seed(0)
    net = smooth_net(wd=1e-5, max_epochs=400, lr=0.05).fit(X, y)  # memorizes 30 points
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotStationaryWarning)
        s = SoftRankFIM(net, lam=1e-5).fit(X, y).summary()
    assert s.alpha < 0.5 and "collapsed_gradients" in s.regimes
    assert "ApproxLOO" in s.statements[s.regimes.index("collapsed_gradients")]


def test_library_warnings_point_at_the_callers_line(data):
    X, y = data
    torch.manual_seed(0)
    net = smooth_net(wd=1e-4, max_epochs=200).fit(X, y)
    with pytest.warns(RuntimeWarning, match="invalid") as record:  # KFAC leave-one-out
        ApproxLOO(net, method="kfac", lam=1e-6).fit(X, y)
    assert record and all(w.filename == __file__ for w in record)


class _DeprecatedForward(TanhMLP):
    """A module whose forward raises a DeprecationWarning, as third-party code does."""

    def forward(self, X):
        warnings.warn("an old API", DeprecationWarning)  # the line the warning belongs to
        return super().forward(X)


def test_other_libraries_warnings_keep_their_origin(data):
    """Warnings raised outside softrank during fit are not re-attributed to the caller's line
    (which would make Python's default filters show a third party's DeprecationWarning)."""
    import inspect

    X, y = data
    torch.manual_seed(0)
    net = NeuralNetClassifier(_DeprecatedForward, module__dtype=F64,
                              criterion=nn.CrossEntropyLoss, optimizer__weight_decay=1e-2,
                              max_epochs=1, train_split=None, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net.fit(X, y)
    source, first = inspect.getsourcelines(_DeprecatedForward.forward)
    line = first + next(i for i, text in enumerate(source) if "warnings.warn" in text)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        SoftRankFIM(net, prefit=True).fit(X, y)
    deprecations = [w for w in record if w.category is DeprecationWarning]
    assert deprecations and all(w.lineno == line for w in deprecations)
    stationarity = [w for w in record if w.category is NotStationaryWarning]
    assert stationarity and stationarity[0].filename == __file__  # softrank's: the caller's


def test_no_lambda_no_stationarity(data):
    X, y = data
    torch.manual_seed(0)
    net = smooth_net(wd=0.0).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotStationaryWarning)
        est = TraceRatio(net).fit(X, y)
    assert est.stationarity_ is None and est.summary().stationarity is None
    assert "r not measured" in str(est.summary())
    with pytest.raises(ValueError, match="no weight decay"):
        relative_stationarity(net, X, y)
    assert relative_stationarity(net, X, y, lam=1e-2) > 0
