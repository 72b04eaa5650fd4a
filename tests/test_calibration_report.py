"""Temperature-scaled measures and the calibration report: the tempered measures equal those of
an equivalent re-scaled net, and temperature scaling of an over-confident digits net lowers
its ECE and moves α toward 1."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier, NeuralNetRegressor
from threadpoolctl import threadpool_limits
from torch import nn

from softrank import SoftRankFIM
from softrank.calibration import (calibration_report, expected_calibration_error,
                                  fit_net_temperature, net_logits, read_alpha,
                                  temperature_measures, temperature_transform)
from softrank.datasets import load_digits_split
from softrank.demo import MLP, make_mlp_classifier

FIRST_LAYER = ["hidden.weight", "hidden.bias"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


def test_temperature_transform():
    z = torch.randn(5, 3, dtype=torch.float64)
    T = 2.5
    assert torch.equal(temperature_transform(nn.CrossEntropyLoss(), T)(z), z / T)
    logp = torch.log_softmax(z, 1)
    assert torch.allclose(temperature_transform(nn.NLLLoss(), T)(logp),
                          torch.log_softmax(z / T, 1), atol=1e-14)
    with pytest.raises(ValueError, match="criterion is MSELoss"):
        temperature_transform(nn.MSELoss(), T)
    with pytest.raises(ValueError, match="positive"):
        temperature_transform(nn.CrossEntropyLoss(), 0.0)


def _scaled_last_layer(net, T):
    """A copy of the net whose last layer is divided by T: its outputs are the logits / T."""
    other = copy.deepcopy(net)
    with torch.no_grad():
        other.module_.out.weight.div_(T)
        other.module_.out.bias.div_(T)
    return other


@pytest.mark.parametrize("softmax", [False, True], ids=["ce-logits", "nll-skorch"])
def test_tempered_measures_equal_those_of_the_rescaled_net(digits, softmax):
    """Dividing the last layer by T gives z/T; the Jacobian w.r.t. the first layer is then the
    tempered one, so F, C, α, the soft rank and the losses restricted to it must agree."""
    X, y = digits.X_train[:150].astype(np.float64), digits.y_train[:150]
    torch.manual_seed(0)
    net = NeuralNetClassifier(
        MLP, module__n_features=64, module__hidden=8, module__softmax=softmax,
        module__dtype=torch.float64, criterion=nn.NLLLoss if softmax else nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam, lr=0.02, optimizer__weight_decay=1e-3, max_epochs=10,
        train_split=None, verbose=0).fit(X, y)
    T = 1.7
    tm = temperature_measures(net, X, y, T, X, y, approximation="exact", params=FIRST_LAYER)
    ref = SoftRankFIM(_scaled_last_layer(net, T), approximation="exact", params=FIRST_LAYER,
                      prefit=True).fit(X, y)
    tol = 1e-6 if softmax else 1e-9  # skorch's log(p + eps) vs exact log-softmax
    assert tm.soft_rank == pytest.approx(ref.measure_, rel=tol)
    assert tm.gap == pytest.approx(ref.gap_, rel=tol)
    assert tm.alpha_train == pytest.approx(ref.result_.diagnostics["alpha"], rel=tol)
    assert tm.train_loss == pytest.approx(ref.train_loss_, rel=tol)
    assert tm.test_loss == pytest.approx(tm.train_loss, rel=1e-12)
    proba = ref.predict_proba(X)
    assert tm.train_ece == pytest.approx(expected_calibration_error(proba, y), abs=1e-6)
    untempered = temperature_measures(net, X, y, 1.0, approximation="exact",
                                      params=FIRST_LAYER)
    assert untempered.soft_rank == pytest.approx(
        SoftRankFIM(net, approximation="exact", params=FIRST_LAYER).fit(X, y).measure_,
        rel=1e-12)
    assert net_logits(net, X).shape == (150, 10)


def test_temperature_scaling_an_over_confident_net(digits):
    """200 digits, weight decay 1e-5, 100 epochs: the net memorizes its training set and is
    over-confident on unseen data. T fitted on half of the test split, measured on the other
    half. Measured: T = 1.40, test ECE 0.048 → 0.021, α_test 1.75 → 1.03, α_train 0.006 → 0.024;
    a T fitted on the training data itself is < 1 (the memorized training set asks for
    sharper predictions)."""
    X, y = digits.X_train[:200], digits.y_train[:200]
    Xc, yc, Xt, yt = digits.X_test[::2], digits.y_test[::2], digits.X_test[1::2], \
        digits.y_test[1::2]
    torch.manual_seed(0)
    net = make_mlp_classifier(hidden=64, weight_decay=1e-5, max_epochs=100).fit(X, y)
    report = calibration_report(net, X, y, Xt, yt, X_cal=Xc, y_cal=yc)
    before, after = report.before, report.after
    assert 1.2 < report.temperature < 1.6
    assert after.test_ece < 0.6 * before.test_ece
    assert before.alpha_test > 1.5 and abs(after.alpha_test - 1) < 0.5 * abs(
        before.alpha_test - 1)
    assert after.test_loss < before.test_loss
    assert before.alpha_train < 0.05 < before.alpha_test  # memorized training set
    assert "over-confident on unseen data" in str(report)
    assert report.temperature_source == "the calibration data"
    assert fit_net_temperature(net, X, y) < 1.0


def test_report_with_a_given_temperature_and_errors(digits):
    X, y = digits.X_train[:100], digits.y_train[:100]
    torch.manual_seed(0)
    net = make_mlp_classifier(hidden=8, weight_decay=1e-2, max_epochs=5).fit(X, y)
    report = calibration_report(net, X, y, temperature=2.0, approximation="diagonal")
    assert report.temperature == 2.0 and report.before.test_loss is None
    assert report.after.train_loss > report.before.train_loss  # softer than the fitted T
    assert "observed gap" not in str(report) and "(T given)" in str(report)
    with pytest.raises(ValueError, match="'fit' or a positive"):
        calibration_report(net, X, y, temperature="auto")
    reg = NeuralNetRegressor(nn.Linear, module__in_features=64, module__out_features=1,
                             optimizer__weight_decay=1e-2, max_epochs=1, train_split=None,
                             verbose=0).fit(X, y[:, None].astype(np.float32))
    with pytest.raises(ValueError, match="classifiers"):
        fit_net_temperature(reg, X, y[:, None].astype(np.float32))


@pytest.mark.parametrize("alpha, where, words", [
    (1.05, "train", "agree"), (1.8, "train", "underestimates"), (0.5, "train", "overestimates"),
    (0.01, "train", "ApproxLOO"), (1.8, "test", "T > 1"), (0.6, "test", "T < 1"),
    (0.95, "test", "calibrated")])
def test_reading_of_alpha(alpha, where, words):
    assert words in read_alpha(alpha, where)
