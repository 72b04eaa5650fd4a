"""score, scorers and the in-sample splitter in scikit-learn's model-selection tools: Pipeline,
GridSearchCV (loky processes), cross_validate, multi-metric refit, clone, pickle — and model
selection by estimated test loss on digits without a validation split."""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier
from sklearn.base import clone
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from softrank import HessianNorm, InSampleSplit, SoftRankFIM, TIC, gap_scorer, make_gap_scorer
from softrank.datasets import load_digits_split
from softrank.demo import MLP, make_mlp_classifier
from softrank.scoring import GapScorer

GRID = {"estimator__optimizer__weight_decay": [1e-4, 1e-2]}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


@pytest.fixture(scope="module")
def small(digits):
    return digits.X_train[:200], digits.y_train[:200]


def nll_net(wd=1e-3, max_epochs=15):
    """skorch's default classifier: softmax outputs, NLLLoss on log(p + eps), float32."""
    return NeuralNetClassifier(MLP, module__hidden=16, module__softmax=True, lr=0.01,
                               optimizer=torch.optim.Adam, optimizer__weight_decay=wd,
                               max_epochs=max_epochs, batch_size=64, train_split=None, verbose=0)


@pytest.fixture(scope="module")
def fitted_est(small):
    return SoftRankFIM(nll_net(), approximation="kfac", random_state=0).fit(*small)


def own_mean_loss(net, X, y) -> float:
    """NLL of log(p + eps), skorch's NeuralNetClassifier loss, recomputed in NumPy float64."""
    module = copy.deepcopy(net.module_).eval()
    with torch.no_grad():
        p = module(torch.as_tensor(X)).numpy()
    z = np.log(p.astype(np.float64) + np.finfo(np.float32).eps)
    return float(-z[np.arange(len(y)), y].mean())


# -- score ---------------------------------------------------------------------------------------
def test_score_is_negated_loss_plus_gap(fitted_est, small, digits):
    X, y = small
    net = fitted_est.estimator_
    train = own_mean_loss(net, X, y)
    assert fitted_est.train_loss_ == pytest.approx(train, rel=1e-6)
    assert fitted_est.score(X, y) == pytest.approx(-(train + fitted_est.gap_), rel=1e-6)
    test = own_mean_loss(net, digits.X_test, digits.y_test)
    assert fitted_est.score(digits.X_test, digits.y_test) == pytest.approx(
        -(test + fitted_est.gap_), rel=1e-6)
    assert 0 < fitted_est.gap_ < 1


def test_scorers(fitted_est, small):
    X, y = small
    assert gap_scorer(fitted_est, X, y) == fitted_est.score(X, y)
    assert make_gap_scorer()(fitted_est, X, y) == pytest.approx(fitted_est.score(X, y))
    assert make_gap_scorer("gap")(fitted_est, X, y) == -fitted_est.gap_
    assert make_gap_scorer("measure")(fitted_est, X, y) == -fitted_est.measure_
    # a plain fitted net is measured by the scorer's template (default SoftRankFIM, lam='auto')
    net = fitted_est.estimator_
    exact = SoftRankFIM(net, prefit=True).fit(X, y)
    assert gap_scorer(net, X, y) == pytest.approx(exact.score(X, y), rel=1e-12)
    tic = TIC(net, approximation="kfac", prefit=True).fit(X, y)
    assert make_gap_scorer("gap", TIC(None, approximation="kfac"))(net, X, y) == -tic.gap_
    hessian = HessianNorm(net, n_curvature_samples=50, random_state=0).fit(X, y)
    assert gap_scorer(hessian, X, y) == -hessian.measure_
    with pytest.raises(ValueError, match="HessianNorm has no gap estimate"):
        make_gap_scorer()(hessian, X, y)
    with pytest.raises(ValueError, match="kind must be one of"):
        make_gap_scorer("accuracy")
    with pytest.raises(TypeError, match="must be an .*GapEstimator"):
        make_gap_scorer(measure="soft_rank")
    for scorer in (gap_scorer, make_gap_scorer("gap", TIC(None))):
        again = pickle.loads(pickle.dumps(scorer))
        assert isinstance(again, GapScorer) or again is gap_scorer


def test_in_sample_split():
    X = np.zeros((7, 2))
    splits = list(InSampleSplit().split(X))
    assert len(splits) == 1 and InSampleSplit().get_n_splits() == 1
    train, test = splits[0]
    np.testing.assert_array_equal(train, np.arange(7))
    np.testing.assert_array_equal(test, np.arange(7))
    assert len(list(InSampleSplit(3).split(X))) == 3 == InSampleSplit(3).get_n_splits(X)
    assert repr(InSampleSplit()) == "InSampleSplit(n_splits=1)"
    with pytest.raises(ValueError, match="n_splits must be a positive integer"):
        list(InSampleSplit(0).split(X))


# -- scikit-learn model selection ------------------------------------------------------------------
def test_grid_search_in_sample_with_loky_processes(small):
    X, y = small
    est = SoftRankFIM(nll_net(), approximation="kfac", random_state=0)
    parallel = GridSearchCV(est, GRID, cv=InSampleSplit(), n_jobs=2).fit(X, y)
    serial = GridSearchCV(est, GRID, cv=InSampleSplit(), n_jobs=1).fit(X, y)
    np.testing.assert_allclose(parallel.cv_results_["mean_test_score"],
                               serial.cv_results_["mean_test_score"], rtol=1e-10)
    best = parallel.best_estimator_
    assert parallel.best_score_ == pytest.approx(-(best.train_loss_ + best.gap_), rel=1e-10)
    scores = parallel.cv_results_["mean_test_score"]
    assert parallel.best_index_ == int(np.argmax(scores))


def test_cross_validate_in_a_pipeline(small):
    X, y = small
    pipe = make_pipeline(StandardScaler(), nll_net())
    est = SoftRankFIM(pipe, approximation="kfac", random_state=0)
    out = cross_validate(est, X, y, cv=3, return_estimator=True,
                         scoring={"estimated": gap_scorer, "accuracy": "accuracy"})
    assert np.all(np.isfinite(out["test_estimated"])) and np.all(out["test_accuracy"] > 0.5)
    folds = list(__import__("sklearn.model_selection", fromlist=["StratifiedKFold"])
                 .StratifiedKFold(3).split(X, y))
    for fold_est, (_, test), score in zip(out["estimator"], folds, out["test_estimated"]):
        fitted = fold_est.estimator_
        Xt = fitted[0].transform(X[test])
        held_out = own_mean_loss(fitted[-1], Xt, y[test])
        assert score == pytest.approx(-(held_out + fold_est.gap_), rel=1e-6)


def test_multi_metric_refit(small):
    X, y = small
    scoring = {"estimated": gap_scorer, "gap": make_gap_scorer("gap"), "accuracy": "accuracy"}
    search = GridSearchCV(SoftRankFIM(nll_net(), approximation="kfac", random_state=0), GRID,
                          scoring=scoring, refit="estimated", cv=InSampleSplit()).fit(X, y)
    res = search.cv_results_
    assert search.best_index_ == int(np.argmax(res["mean_test_estimated"]))
    assert search.best_estimator_.gap_ == pytest.approx(-res["mean_test_gap"][search.best_index_])
    assert set(res["mean_test_accuracy"]) <= set(np.linspace(0, 1, 201))  # accuracies on 200
    assert search.best_estimator_.predict(X[:5]).shape == (5,)


def test_clone_is_unfitted(fitted_est):
    copy_ = clone(fitted_est)
    assert not hasattr(copy_, "measure_") and not hasattr(copy_, "estimator_")
    assert not hasattr(copy_.estimator, "module_")  # skorch's clone is an unfitted net
    assert copy_.get_params()["approximation"] == "kfac"
    frozen = SoftRankFIM(FrozenEstimator(fitted_est.estimator_), prefit=True)
    assert clone(frozen).estimator.estimator is fitted_est.estimator_  # stays fitted


def test_pickle_round_trip_gives_the_same_numbers(small):
    X, y = small
    for approx in ("kfac", "dense"):
        est = SoftRankFIM(nll_net(max_epochs=5), approximation=approx, random_state=0).fit(X, y)
        again = pickle.loads(pickle.dumps(est))
        for attr in ("measure_", "gap_", "train_loss_", "lam_", "n_train_"):
            assert getattr(again, attr) == getattr(est, attr)
        assert again.score(X, y) == est.score(X, y)
        np.testing.assert_array_equal(again.transform(X[:20]), est.transform(X[:20]))
        np.testing.assert_array_equal(again.predict_proba(X), est.predict_proba(X))


# -- selection by estimated test loss on digits ----------------------------------------------------
def test_in_sample_grid_search_selects_a_good_weight_decay(digits):
    """Measured (n = 300, 32 hidden units, 40 epochs, seed 0): test losses over weight decay
    1e-5..1e-1 are 0.1956, 0.1931, 0.1860, 0.2674, 1.3503; the in-sample search picks 1e-4
    (estimated test loss 0.087), whose test loss is 0.0070 above the best in the grid."""
    X, y = digits.X_train[:300], digits.y_train[:300]
    grid = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    base = SoftRankFIM(make_mlp_classifier(32, max_epochs=40), approximation="kfac",
                       random_state=0)
    test_losses = [clone(base).set_params(estimator__optimizer__weight_decay=wd).fit(X, y)
                   .loss(digits.X_test, digits.y_test) for wd in grid]
    search = GridSearchCV(base, {"estimator__optimizer__weight_decay": grid},
                          cv=InSampleSplit()).fit(X, y)
    chosen = search.best_estimator_.loss(digits.X_test, digits.y_test)
    assert chosen == test_losses[grid.index(search.best_params_[
        "estimator__optimizer__weight_decay"])]
    margin = chosen - min(test_losses)
    assert margin <= 0.015, (test_losses, search.best_params_)
    assert max(test_losses) - min(test_losses) > 0.5  # the grid holds really bad choices
