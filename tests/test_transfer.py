"""Transfer learning: a frozen extractor in a Pipeline measures the head exactly as the full
network restricted to the head's parameters; choosing between extractors by estimated test
loss."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from skorch import NeuralNetClassifier
from threadpoolctl import threadpool_limits
from torch import nn

from softrank import ModelData, SoftRankFIM
from softrank.influence import rank_samples
from softrank.measures import soft_rank_gap
from softrank.scoring import InSampleSplit
from softrank.transfer import FrozenFeatures, compare_feature_extractors

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(old)


def task(n=120, d=10, seed=0):
    """Labels from the first two input coordinates; the rest is noise."""
    rng = np.random.RandomState(seed)
    X = rng.randn(n, d)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64) + (X[:, 1] > 0.5)
    return X, y


def backbone(d=10, width=6, informative=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(d, width, dtype=F64)
    if not informative:  # looks only at the noise coordinates
        with torch.no_grad():
            lin.weight[:, :2] = 0
    return nn.Sequential(lin, nn.Tanh())


def head(n_features=6, max_epochs=30):
    return NeuralNetClassifier(nn.Linear, module__in_features=n_features, module__out_features=3,
                               module__dtype=F64, criterion=nn.CrossEntropyLoss,
                               optimizer=torch.optim.Adam, lr=0.05,
                               optimizer__weight_decay=1e-2, max_epochs=max_epochs,
                               train_split=None, verbose=0)


def test_frozen_features_transform_and_leave_the_module_alone():
    X, _ = task()
    bb = backbone().train()
    ff = FrozenFeatures(bb, batch_size=7).fit(X)
    with torch.no_grad():
        expected = bb(torch.as_tensor(X)).numpy()
    assert np.allclose(ff.transform(X), expected, rtol=0, atol=1e-14)
    assert bb.training and all(p.requires_grad for p in bb.parameters())
    unfitted = clone(ff)
    assert not hasattr(unfitted, "module_") and unfitted.module is not bb
    with pytest.raises(TypeError, match="nn.Module"):
        FrozenFeatures("resnet").fit(X)


def test_pipeline_measures_the_head_as_the_full_net_restricted_to_it():
    """∂z/∂θ_head does not depend on how the features were computed: the soft-rank gap of the
    head in Pipeline(FrozenFeatures, head) is that of Sequential(backbone, head) with
    params = the head's."""
    X, y = task()
    bb = backbone()
    torch.manual_seed(1)
    pipe = Pipeline([("features", FrozenFeatures(bb)), ("head", head())])
    est = SoftRankFIM(pipe, lam=1e-2).fit(X, y)
    full = nn.Sequential(bb, est.estimator_[-1].module_)
    md = ModelData(full, nn.CrossEntropyLoss(), torch.as_tensor(X), torch.as_tensor(y),
                   params=lambda name, p: name.startswith("1."))
    ref = soft_rank_gap(md, 1e-2, "dense")
    assert est.measure_ == pytest.approx(ref.value, rel=1e-9)
    assert est.gap_ == pytest.approx(ref.gap, rel=1e-9)
    # per-sample leverage of the head, through the fitted pipeline
    lev = rank_samples(est.estimator_, X, score="leverage", lam=1e-2, approximation="dense")
    assert lev.total == pytest.approx(ref.value, rel=1e-9)
    # choosing the extractor with GridSearchCV over the pipeline's parameter
    search = GridSearchCV(SoftRankFIM(pipe, random_state=0),
                          {"estimator__features__module": [backbone(informative=False), bb]},
                          cv=InSampleSplit()).fit(X, y)
    assert search.best_index_ == 1


def test_compare_feature_extractors():
    """An extractor that sees the informative coordinates against two that see only noise:
    the informative one has the lowest estimated and observed test loss."""
    X, y = task(n=160)
    Xt, yt = task(n=400, seed=1)
    extractors = {"noise-4": backbone(width=4, informative=False),
                  "informative-6": backbone(width=6),
                  "noise-12": backbone(width=12, informative=False, seed=2)}
    rows = compare_feature_extractors(extractors, head, X, y, X_test=Xt, y_test=yt)
    assert [r.name for r in rows][0] == "informative-6"
    assert [r.estimated_test_loss for r in rows] == sorted(r.estimated_test_loss for r in rows)
    by_name = {r.name: r for r in rows}
    assert {r.n_features for r in rows} == {4, 6, 12}
    assert min(rows, key=lambda r: r.test_loss).name == "informative-6"
    assert by_name["noise-12"].observed_gap == pytest.approx(
        by_name["noise-12"].test_loss - by_name["noise-12"].train_loss)
    with pytest.raises(TypeError, match="GapEstimator"):
        compare_feature_extractors(extractors, head, X, y, measure="soft_rank")


def test_frozen_features_dtype():
    X, _ = task(n=5)
    assert FrozenFeatures(backbone()).fit(X).transform(X).dtype == np.float64
    assert FrozenFeatures(backbone(), dtype=np.float32).fit(X).transform(X).dtype == np.float32


@pytest.mark.slow
def test_example_transfer_learning():
    """Measured (MNIST data present): the estimate picks the best observed extractor on both
    targets, Kendall tau +0.80 and +1.00."""
    from .test_examples import run_example

    out = run_example("transfer_learning.py")
    choices = re.findall(r"chosen by estimated test loss: (.+?) \(test .*?best observed: (.+?) "
                         r"\(test .*?= ([-+]\d\.\d+)", out)
    assert choices, out
    for chosen, best, tau in choices:
        assert chosen == best and float(tau) >= 0.6
