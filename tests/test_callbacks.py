"""skorch callbacks: GapTracker records what a separate GapEstimator computes on the same epoch's
model, leaves training untouched, is clone/GridSearchCV/pickle safe; early stopping on the
estimated test loss."""
from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from skorch.callbacks import Callback, Checkpoint, EarlyStopping
from skorch.dataset import ValidSplit
from threadpoolctl import threadpool_limits

from softrank import SoftRankFIM, TIC
from softrank.callbacks import EstimatedLossEarlyStopping, GapTracker, training_arrays
from softrank.datasets import load_digits_split
from softrank.demo import make_mlp_classifier
from softrank.scoring import InSampleSplit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny nets: one torch thread, one BLAS thread (numpy's BLAS threads spin on busy cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def digits():
    d = load_digits_split()
    return d.X_train[:300], d.y_train[:300]


def small_net(**kw):
    kw.setdefault("max_epochs", 4)
    return make_mlp_classifier(hidden=16, weight_decay=1e-3, **kw)


TRACKED = [SoftRankFIM(None, approximation="kfac", n_curvature_samples=100, random_state=0),
           SoftRankFIM(None, approximation="diagonal", n_curvature_samples=100, random_state=3),
           TIC(None, approximation="exact", n_curvature_samples=60, random_state=1)]


@pytest.mark.parametrize("measure", TRACKED, ids=lambda m: f"{type(m).__name__}-"
                         f"{m.approximation}")
def test_recorded_values_equal_a_separate_estimator_on_each_epoch(digits, measure):
    """Run A trains with the tracker; run B (same seed) trains one epoch at a time and measures
    each epoch's model with a separate GapEstimator: same subsample, same seed, same numbers."""
    X, y = digits
    torch.manual_seed(0)
    tracked = small_net(callbacks=[GapTracker(measure)]).fit(X, y)

    torch.manual_seed(0)
    net = small_net()
    net.initialize()
    for epoch in range(4):
        net.partial_fit(X, y, epochs=1)
        est = clone(measure).set_params(estimator=net, prefit=True).fit(X, y)
        row = tracked.history[epoch]
        assert row["est_gap"] == pytest.approx(est.gap_, rel=1e-12)
        assert row["est_test_loss"] == pytest.approx(est.train_loss_ + est.gap_, rel=1e-12)
    best = np.minimum.accumulate(tracked.history[:, "est_test_loss"])
    assert tracked.history[:, "est_test_loss_best"] == list(
        np.r_[True, best[1:] < best[:-1]])


def test_tracking_does_not_change_training(digits):
    X, y = digits
    torch.manual_seed(0)
    plain = small_net().fit(X, y)
    torch.manual_seed(0)
    tracked = small_net(callbacks=[GapTracker()]).fit(X, y)
    for a, b in zip(plain.module_.parameters(), tracked.module_.parameters()):
        assert torch.equal(a, b)


def test_clone_is_unfitted_and_grid_search_works(digits):
    X, y = digits
    tracker = GapTracker(SoftRankFIM(None, approximation="diagonal", n_curvature_samples=50,
                                     random_state=0), every=2)
    torch.manual_seed(0)
    net = small_net(callbacks=[tracker]).fit(X, y)
    assert hasattr(tracker, "best_")  # skorch initializes the instance it was given

    copy = clone(net)
    assert not getattr(copy, "initialized_", False)
    cb = copy.callbacks[0]
    assert cb is not tracker and not hasattr(cb, "best_") and not hasattr(cb, "measure_")
    assert cb.get_params()["every"] == 2 and cb.measure.n_curvature_samples == 50
    assert not hasattr(cb.measure, "result_")

    search = GridSearchCV(small_net(callbacks=[GapTracker(every=2)], max_epochs=2),
                          {"lr": [0.01, 0.03]}, cv=2, scoring="accuracy").fit(X, y)
    hist = search.best_estimator_.history
    assert np.isnan(hist[0, "est_test_loss"]) and np.isfinite(hist[1, "est_test_loss"])

    # in-sample model selection of nets that carry a tracker
    sel = GridSearchCV(SoftRankFIM(small_net(callbacks=[GapTracker()], max_epochs=2),
                                   approximation="kfac", random_state=0),
                       {"estimator__lr": [0.01, 0.03]}, cv=InSampleSplit()).fit(X, y)
    assert np.isfinite(sel.best_score_)

    restored = pickle.loads(pickle.dumps(net))
    assert restored.history[:, "est_gap"][1] == net.history[:, "est_gap"][1]


def test_columns_name_and_bad_parameters(digits):
    X, y = digits
    torch.manual_seed(0)
    net = small_net(max_epochs=1, callbacks=[GapTracker(name="fim")]).fit(X, y)
    assert {"fim_gap", "fim_test_loss", "fim_test_loss_best"} <= set(net.history[-1])
    for bad, match in [({"every": 0}, "every"), ({"measure": "kfac"}, "GapEstimator")]:
        with pytest.raises((ValueError, TypeError), match=match):
            small_net(max_epochs=1, callbacks=[GapTracker(**bad)]).fit(X, y)


def test_training_arrays_of_a_train_split(digits):
    X, y = digits
    net = small_net(max_epochs=1, train_split=ValidSplit(4, stratified=False)).initialize()
    train, _ = net.get_split_datasets(X, y)
    Xt, yt = training_arrays(train)
    assert len(Xt) == len(train) == 225
    assert np.array_equal(Xt[5], train[5][0]) and yt[5] == train[5][1]


def test_early_stopping_counts_measured_epochs_only(digits):
    """With every=2 the monitored column is NaN on odd epochs: skorch's EarlyStopping would
    count them as misses; EstimatedLossEarlyStopping skips them."""
    X, y = digits

    class Scripted(GapTracker):  # a fixed sequence of estimates: best at epoch 4
        def measure_net(self, net, X, y):
            value = {2: 1.0, 4: 0.5, 6: 0.7, 8: 0.8, 10: 0.9}[len(net.history)]
            return type("E", (), {"gap_": value, "train_loss_": 0.0, "result_": None})()

    torch.manual_seed(0)
    stopper = EstimatedLossEarlyStopping(patience=2, warmup=0, sink=lambda *_: None)
    net = small_net(max_epochs=12, callbacks=[Scripted(every=2), stopper]).fit(X, y)
    assert len(net.history) == 8  # two measured epochs (6, 8) without improvement
    assert stopper.best_epoch_ == 4
    warm = EstimatedLossEarlyStopping(patience=2, warmup=4, sink=lambda *_: None)
    small_net(max_epochs=12, callbacks=[Scripted(every=2), warm]).fit(X, y)
    assert warm.best_epoch_ == 6  # epochs 1-4 not monitored
    torch.manual_seed(0)
    skorch_es = EarlyStopping(monitor="est_test_loss", patience=2, sink=lambda *_: None)
    assert len(small_net(max_epochs=12, callbacks=[Scripted(every=2), skorch_es]).fit(
        X, y).history) < 8

    with pytest.raises(KeyError, match="GapTracker"):
        small_net(max_epochs=1, callbacks=[EstimatedLossEarlyStopping()]).fit(X, y)
    with pytest.raises(ValueError, match="warmup"):
        small_net(max_epochs=1, callbacks=[GapTracker(), EstimatedLossEarlyStopping(
            warmup=-1)]).fit(X, y)


def test_checkpoint_on_the_best_estimate(digits, tmp_path):
    X, y = digits
    torch.manual_seed(0)
    cp = Checkpoint(monitor="est_test_loss_best", dirname=str(tmp_path), sink=lambda *_: None)
    net = small_net(max_epochs=3, callbacks=[GapTracker(), cp]).fit(X, y)
    assert net.history[:, "event_cp"] == net.history[:, "est_test_loss_best"]
    assert (tmp_path / "params.pt").exists()


# -- early stopping without a validation split -----------------------------------------------
def noisy_digits(n=400, rate=0.1, seed=0):
    """n digits training samples and the test split, each with a fraction ``rate`` of labels
    moved to another class (the test labels are noisy like the training labels: the estimated
    test loss is that of the training distribution)."""
    d = load_digits_split()
    rng = np.random.RandomState(seed)
    sel = rng.choice(len(d.y_train), n, replace=False)
    X, y = d.X_train[sel], d.y_train[sel].copy()
    out = []
    for labels in (y, d.y_test.copy()):
        idx = rng.choice(len(labels), int(rate * len(labels)), replace=False)
        labels[idx] = (labels[idx] + rng.randint(1, 10, len(idx))) % 10
        out.append(labels)
    return X, out[0], d.X_test, out[1]


def noisy_net(**kw):
    return make_mlp_classifier(hidden=64, weight_decay=1e-4, lr=0.01, batch_size=32, **kw)


def log_loss_of(net, X, y):
    p = net.predict_proba(X)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())


def test_early_stopping_on_the_estimated_test_loss_stops_in_time():
    """400 digits with 10 % flipped labels, weight decay 1e-4, all data for training. The real
    test loss is lowest at epoch 8 (0.904) and reaches 1.41 by epoch 40 as the net memorizes
    the flipped labels. Early stopping on the calibrated soft-rank estimate (patience 5) stops
    at epoch 12 and restores epoch 7 (test loss 0.911, 0.7 % above the minimum): measured margin
    1 epoch. Seeds 1 and 2: margins 4 and 4 epochs, test loss 6.5 % and 7.9 % above the minimum
    (more in docs/guide_training_loop.md)."""
    X, y, Xt, yt = noisy_digits()

    class TestLoss(Callback):
        def on_epoch_end(self, net, **kwargs):
            net.history.record("test_loss", log_loss_of(net, Xt, yt))

    torch.manual_seed(0)
    full = noisy_net(max_epochs=40, callbacks=[TestLoss()]).fit(X, y)
    test_curve = np.array(full.history[:, "test_loss"])
    best_epoch = int(test_curve.argmin()) + 1

    torch.manual_seed(0)
    stopper = EstimatedLossEarlyStopping(patience=5, sink=lambda *_: None)
    stopped = noisy_net(max_epochs=40, callbacks=[GapTracker(), stopper]).fit(X, y)

    assert len(stopped.history) < 20  # it did stop
    assert abs(stopper.best_epoch_ - best_epoch) <= 3
    chosen = log_loss_of(stopped, Xt, yt)  # the restored weights
    assert chosen == pytest.approx(test_curve[stopper.best_epoch_ - 1], rel=1e-6)
    assert chosen <= 1.05 * test_curve.min()
    assert test_curve[-1] >= 1.5 * test_curve.min()  # stopping mattered


# -- the examples ------------------------------------------------------------------------------
@pytest.mark.slow
def test_example_track_gap():
    """Measured: lowest estimate at epoch 11 (both), lowest real test loss at epoch 12."""
    from .test_examples import run_example

    out = run_example("track_gap.py")
    m = re.search(r"lowest estimate at epoch (\d+) \(calibrated\), (\d+) \(α-weighted\); "
                  r"lowest real test loss at epoch (\d+)", out)
    assert m, out
    calibrated, weighted, real = map(int, m.groups())
    assert abs(calibrated - real) <= 3 and abs(weighted - real) <= 3


@pytest.mark.slow
def test_example_early_stopping():
    """Measured: test loss 1.155 (60 epochs), 0.773 (80 %, validation), 0.721 (ours, epoch 4;
    lowest 0.708 at epoch 7)."""
    from .test_examples import run_example

    out = run_example("early_stopping.py")
    losses = {}
    for label in ("all data, 60 epochs", "80 %, EarlyStopping(valid_loss)",
                  "all data, EstimatedLossEarlyStopping"):
        line = next(line for line in out.splitlines() if line.startswith(label))
        losses[label] = float(line.split()[-2])
    ours = losses["all data, EstimatedLossEarlyStopping"]
    assert ours < losses["80 %, EarlyStopping(valid_loss)"] < losses["all data, 60 epochs"]
    margin = int(re.search(r"margin (\d+) epochs", out).group(1))
    assert margin <= 4
