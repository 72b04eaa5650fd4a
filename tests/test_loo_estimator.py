"""ApproxLOO as a GapEstimator: same contract as the others (SPEC §6), numbers equal the
functional core, score = −(train loss + gap_), the net untouched, clear errors."""
import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

from softrank import ApproxLOO, InSampleSplit, ModelData, approx_loo
from softrank.skorch_adapter import output_transform
from tests.test_estimators import assert_same, classifier, snapshot, teacher_data


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def fitted():
    X, y = teacher_data()
    return classifier(wd=1e-2).fit(X, y), X, y


@pytest.mark.parametrize("method", ["exact", "kfac"])
def test_equals_the_functional_core(fitted, method):
    net, X, y = fitted
    est = ApproxLOO(net, method=method).fit(X, y)
    md = ModelData(net.module_, net.criterion_, X, y, output_transform=output_transform(net))
    ref = approx_loo(md, 1e-2, method)
    assert est.gap_ == pytest.approx(ref.gap, rel=1e-10)
    assert est.measure_ == pytest.approx(ref.estimated_test_loss, rel=1e-10)
    assert est.soft_rank_ == pytest.approx(ref.soft_rank, rel=1e-10)
    np.testing.assert_allclose(est.loo_losses_, ref.loo_losses, rtol=1e-10)
    assert est.score(X, y) == pytest.approx(-(est.train_loss_ + est.gap_), rel=1e-12)
    assert est.lam_ == pytest.approx(1e-2) and est.n_train_ == len(X)


def test_subsample_reports_stderr_and_net_untouched(fitted):
    net, X, y = fitted
    before = snapshot(net)
    est = ApproxLOO(net, method="subsample", n_points=20, random_state=0).fit(X, y)
    assert est.stderr_ > 0 and len(est.loo_losses_) == 20
    est.score(X, y)
    assert_same(before, snapshot(net))


def _sampled_and_core(fitted, method, n_points):
    """ApproxLOO(method, n_points) on the fitted net, its data's ModelData, and approx_loo on
    it with the same points: (est, md, ref)."""
    net, X, y = fitted
    est = ApproxLOO(net, method=method, n_points=n_points, random_state=0).fit(X, y)
    assert est.stderr_ > 0 and len(est.loo_indices_) == n_points
    md = ModelData(net.module_, net.criterion_, X, y, output_transform=output_transform(net))
    ref = approx_loo(md, 1e-2, method, n_points=n_points, random_state=0)
    assert est.gap_ == pytest.approx(ref.gap, rel=1e-10)
    return est, md, ref


def test_cavity_and_auto(fitted):
    net, X, y = fitted
    est, md, ref = _sampled_and_core(fitted, "cavity", 25)
    auto = ApproxLOO(net).fit(X, y)  # small n·K: 'auto' is 'exact'
    assert auto.gap_ == pytest.approx(approx_loo(md, 1e-2, "exact").gap, rel=1e-10)
    # the summary says how far to trust the cavity estimate, with its numbers; not for exact
    s = est.summary()
    assert "approximate_loo" in s.regimes and not s.trustworthy
    text = s.statements[s.regimes.index("approximate_loo")]
    shrink = est.result_.diagnostics["rest_shrinkage"]
    assert f"25 of {len(X)} points" in text and f"s = {shrink:.3g}" in text
    corr = est.result_.diagnostics["control_variate"]["correlation"]
    assert f"(correlation {corr:.3f})" in text and "not this bias, which is the larger" in text
    assert "Here only" not in text  # 42 % kept: inside the measured range
    few = ApproxLOO(net, method="cavity", n_points=2, random_state=0).fit(X, y).summary()
    assert "Here only" not in few.statements[few.regimes.index("approximate_loo")]  # 3.3 %
    from softrank.summary import _cavity_statement
    assert "Here only 1.7 % are kept" in _cavity_statement(1000, 60000, 0.8)  # the defaults
    # the soft rank and the first-order term are means over the same points: with errors
    d = est.result_.diagnostics
    assert d["soft_rank_stderr"] > 0 and d["first_order_gap_stderr"] > 0
    assert "approximate_loo" not in auto.summary().regimes
    # n_points above the samples is clipped (one setting for folds of any size): every point
    clipped = ApproxLOO(net, method="cavity", n_points=10 ** 6).fit(X, y)
    assert len(clipped.loo_indices_) == len(X) and clipped.stderr_ is None
    assert clipped.gap_ == pytest.approx(auto.gap_, rel=1e-8)
    # ApproxLOO computes no α = Tr C/Tr F: the printout says so rather than a bare dash
    assert s.alpha is None and "α not computed by this estimator" in str(s)
    assert "α = —" not in str(s)


def test_nystrom_estimator_and_its_summary(fitted):
    net, X, y = fitted
    est, md, ref = _sampled_and_core(fitted, "nystrom", 20)
    assert est.result_.diagnostics["invalid_points"] == 0
    s = est.summary()
    assert "approximate_loo" in s.regimes and not s.trustworthy
    text = s.statements[s.regimes.index("approximate_loo")]
    assert f"20 of {len(X)} points" in text and "Nyström" in text and "{" not in text
    assert "Here 20 points are kept" in text and "fewer than in any comparison" in text
    assert "not this bias" in text and "covers only" not in text
    assert "of the points are kept" not in text  # a third: above the measured shares
    from softrank.summary import _nystrom_statement
    assert "Here" not in _nystrom_statement(300, 3000)
    far = _nystrom_statement(300, 60000)  # 0.5 %: below every share it was compared at
    assert "Only 0.5 % of the points are kept, below the 10 %" in far
    assert "curvature samples" not in far
    assert "Here" not in _nystrom_statement(300, 3000, None, 3000)  # all samples: no note
    assert "Only" not in _nystrom_statement(300, 3000, None, 3000)
    # on a curvature subsample the summary states that subsample's measured upward bias
    sub = ApproxLOO(net, method="nystrom", n_points=20, n_curvature_samples=len(X) // 2,
                    random_state=0).fit(X, y)
    assert sub.result_.diagnostics["curvature_samples"] == len(X) // 2
    text = sub.summary().statements[sub.summary().regimes.index("approximate_loo")]
    assert f"from {len(X) // 2:,} curvature samples (the 20 kept points and" in text
    assert "+40 % → +3.3 % with 3,000" in text and "of the curvature samples" in text
    jk = sub.result_.diagnostics["jackknife"]
    assert sub.gap_ != pytest.approx(jk["uncorrected_gap"], rel=1e-6)
    assert f"here from {jk['uncorrected_gap']:.3g} to {sub.gap_:.3g}" in text
    # more than half of the samples: weighted, not jackknifed, and the summary says so
    most = _nystrom_statement(300, 60000, None, 40000, jackknife=None)
    assert "more than half of them, so not jackknifed" in most
    assert "curvature samples (the jackknife's)" not in most
    # every point kept: the exact computation, nothing sampled, no caveat
    full = ApproxLOO(net, method="nystrom", n_points=10 ** 6).fit(X, y)
    assert full.stderr_ is None and "approximate_loo" not in full.summary().regimes
    assert full.gap_ == pytest.approx(approx_loo(md, 1e-2, "exact").gap, rel=1e-8)


def test_clone_pickle_and_grid_search(fitted):
    X, y = teacher_data()
    est = ApproxLOO(classifier(max_epochs=15), random_state=0)
    assert not hasattr(clone(est), "gap_")
    gs = GridSearchCV(est, {"estimator__optimizer__weight_decay": [1e-3, 1e-1]},
                      cv=InSampleSplit()).fit(X, y)
    best = gs.best_estimator_
    assert gs.best_score_ == pytest.approx(-(best.train_loss_ + best.gap_), rel=1e-10)
    again = pickle.loads(pickle.dumps(best))
    assert again.score(X, y) == pytest.approx(best.score(X, y), rel=1e-12)


def test_bad_input(fitted):
    net, X, y = fitted
    with pytest.raises(ValueError, match="method must be one of"):
        ApproxLOO(net, method="bogus").fit(X, y)
    with pytest.raises(ValueError, match="n_points"):
        ApproxLOO(net, method="subsample", n_points=0).fit(X, y)
    with pytest.raises(ValueError, match="lam must be > 0"):
        ApproxLOO(net, lam=-1.0).fit(X, y)
    with pytest.raises(ValueError, match="labels outside the classes|not seen"):
        ApproxLOO(net).fit(X, np.full(len(y), 7))


def test_loo_indices_are_rows_of_the_fit_data_with_a_curvature_subsample(fitted):
    """With n_curvature_samples, loo_indices_ point into X (not into the subsample): each
    point's own loss there is the one the estimate measured."""
    net, X, y = fitted
    est = ApproxLOO(net, method="cavity", n_points=15, n_curvature_samples=40,
                    random_state=0).fit(X, y)
    rows = np.sort(np.random.RandomState(0).choice(len(X), 40, replace=False))
    assert set(est.loo_indices_) <= set(rows)  # rows of X, from the curvature subsample
    sub = ModelData(net.module_, net.criterion_, X[rows], y[rows], n_train=len(X),
                    output_transform=output_transform(net))
    ref = approx_loo(sub, 1e-2, "cavity", indices=np.searchsorted(rows, est.loo_indices_))
    np.testing.assert_allclose(est.loo_losses_, ref.loo_losses, rtol=1e-10)
    full = ModelData(net.module_, net.criterion_, X, y, output_transform=output_transform(net))
    own = torch.cat([full.family.loss(b.z, b.y) for b in full.batches(None)]).numpy()
    np.testing.assert_allclose(own[est.loo_indices_], ref.point_losses, rtol=1e-10)
    assert est.stderr_ > 0
