"""Confident nets: float32 and float64 copies of the same model agree on every measure down to
training losses of 1e-10, and saturated nets (training loss 0) give defined values, not
ZeroDivisionError.

The cases are the registry's ``conf4-ce`` (training loss ~1e-10) and ``conf100-ce`` (curvature
~1e-240, loss 0 in the criterion's own float64 arithmetic): MLPs at 100 % training accuracy.
"""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier
from torch import nn

from softrank import ModelData, SoftRankFIM, TraceRatio
from softrank.families import Bernoulli, Categorical
from softrank.loo import approx_loo
from softrank.measures import (DegenerateCurvatureWarning, calibration_ratio, hessian_norms,
                               soft_rank, tic, trace_ratio)

from .cases import CONFIDENT_CASE_IDS, build_case

LAM = 1e-3

MEASURES = {
    "soft_rank_dense": lambda md: soft_rank(md, LAM, "dense").value,
    "soft_rank_gram": lambda md: soft_rank(md, LAM, "gram").value,
    "soft_rank_kfac": lambda md: soft_rank(md, LAM, "kfac").value,
    "soft_rank_ekfac": lambda md: soft_rank(md, LAM, "ekfac").value,
    "soft_rank_diagonal": lambda md: soft_rank(md, LAM, "diagonal").value,
    "soft_rank_gap": lambda md: soft_rank(md, LAM, "gram").gap,
    "tic_fisher_dense": lambda md: tic(md, LAM, "dense").value,
    "tic_fisher_gram": lambda md: tic(md, LAM, "gram").value,
    "tic_fisher_kfac": lambda md: tic(md, LAM, "kfac").value,
    "tic_fisher_diagonal": lambda md: tic(md, LAM, "diagonal").value,
    "tic_hessian": lambda md: tic(md, LAM, "dense", "hessian").value,
    "trace_ratio": lambda md: trace_ratio(md).value,
    "hessian_trace": lambda md: hessian_norms(md, "trace").value,
    "hessian_spectral": lambda md: hessian_norms(md, "spectral").value,
    "hessian_frobenius": lambda md: hessian_norms(md, "frobenius").value,
    "approx_loo_exact": lambda md: approx_loo(md, LAM, "exact").estimated_test_loss,
    "approx_loo_exact_gap": lambda md: approx_loo(md, LAM, "exact").gap,
    "approx_loo_kfac": lambda md: approx_loo(md, LAM, "kfac").estimated_test_loss,
    # stochastic: the same probes in both copies (random_state), so the estimates agree too
    "soft_rank_matrix_free": lambda md: soft_rank(md, LAM, "matrix_free", random_state=0).value,
    "tic_fisher_matrix_free": lambda md: tic(md, LAM, "matrix_free", random_state=0).value,
    "hessian_trace_matrix_free": lambda md: hessian_norms(
        md, "trace", approximation="matrix_free", random_state=0).value,
}


def _copies(case_id):
    case = build_case(case_id)
    out = {}
    for dtype in (torch.float64, torch.float32):
        model = copy.deepcopy(case.model).to(dtype)
        out[dtype] = ModelData(model, case.criterion, case.X.to(dtype), case.y, batch_size=3)
    return case, out


@pytest.fixture(scope="module")
def conf4():
    return _copies("conf4-ce")


def test_conf4_is_a_confident_net_at_a_training_loss_of_1e_10(conf4):
    case, _ = conf4
    z = case.model(case.X)
    assert torch.equal(z.argmax(1), case.y)
    loss = float(case.reference_criterion(z, case.y))
    assert 1e-11 < loss < 1e-9


@pytest.mark.parametrize("name", list(MEASURES))
def test_float32_and_float64_copies_agree(conf4, name):
    """Residuals and factors are formed in float64 from the outputs; a float32 softmax rounds
    π_y to 1 and the target-class residual to 0 (measures then lost up to 38 %)."""
    _, md = conf4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateCurvatureWarning)
        v64, v32 = MEASURES[name](md[torch.float64]), MEASURES[name](md[torch.float32])
    assert v64 > 0
    assert abs(v32 - v64) <= 1e-5 * abs(v64), (name, v32, v64)


def test_conf100_measures_are_defined_and_agree_across_dtypes():
    case, md = _copies("conf100-ce")
    for name, measure in MEASURES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DegenerateCurvatureWarning)
            v64, v32 = measure(md[torch.float64]), measure(md[torch.float32])
        assert math.isfinite(v64) and math.isfinite(v32), name
        # curvature ~1e-240: a count, a loss or a ratio of that size is 0 for every purpose
        assert abs(v32 - v64) <= 1e-12 + 1e-5 * abs(v64), (name, v32, v64)


@pytest.mark.parametrize("estimator", [SoftRankFIM, TraceRatio])
def test_saturated_net_gives_alpha_zero_with_a_warning_not_zero_division(estimator):
    case = build_case("conf100-ce")
    X = case.X.float().numpy()
    y = case.y.numpy()
    net = NeuralNetClassifier(copy.deepcopy(case.model).float(), criterion=nn.CrossEntropyLoss,
                              train_split=None).initialize()
    kw = {} if estimator is TraceRatio else {"lam": LAM}
    with pytest.warns(DegenerateCurvatureWarning, match="saturated.*ApproxLOO"):
        est = estimator(net, prefit=True, **kw).fit(X, y)
    assert est.result_.diagnostics["trace_C"] == 0.0
    assert est.gap_ == 0.0
    assert np.isfinite(est.measure_)


def test_calibration_ratio_conventions():
    assert calibration_ratio(2.0, 4.0) == 0.5
    with pytest.warns(DegenerateCurvatureWarning):
        assert calibration_ratio(0.0, 0.0) == 0.0
    with pytest.warns(DegenerateCurvatureWarning):
        assert calibration_ratio(0.0, 1e-300) == 0.0
    with pytest.warns(DegenerateCurvatureWarning, match="infinite"):
        assert calibration_ratio(1.0, 0.0) == math.inf


@pytest.mark.parametrize("margin", [10.0, 25.0, 35.0])
def test_categorical_residual_factor_and_loss_keep_their_digits(margin):
    """Against closed forms in s = Σ_{k≠y} e^{z_k − z_y} (no rounding of 1 − π)."""
    z = torch.tensor([[margin, 0.0, -1.0], [0.3, margin, 0.1]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    fam = Categorical()
    rel = z - z.gather(1, y[:, None])
    e = torch.exp(rel)
    s = e.masked_fill(rel == 0, 0.0).sum(1)  # Σ_{k≠y} e^{z_k − z_y}
    torch.testing.assert_close(fam.loss(z, y), torch.log1p(s), rtol=1e-14, atol=0)
    r = fam.residual(z, y)
    pi = e / (1 + s)[:, None]
    torch.testing.assert_close(r.gather(1, y[:, None])[:, 0], -s / (1 + s), rtol=1e-14, atol=0)
    B = fam.factor(z)
    A = B @ B.transpose(1, 2)
    one_minus = torch.where(rel == 0, (s / (1 + s))[:, None], 1 - pi)
    torch.testing.assert_close(A.diagonal(dim1=1, dim2=2), pi * one_minus, rtol=1e-12, atol=0)


def test_bernoulli_residual_and_factor_keep_their_digits():
    z = torch.tensor([[30.0], [-30.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    fam = Bernoulli()
    p_wrong = torch.exp(torch.tensor(-30.0, dtype=torch.float64)) / (
        1 + torch.exp(torch.tensor(-30.0, dtype=torch.float64)))
    torch.testing.assert_close(fam.residual(z, y)[:, 0], torch.stack([-p_wrong, p_wrong]),
                               rtol=1e-14, atol=0)
    torch.testing.assert_close(fam.factor(z)[:, 0, 0] ** 2, (p_wrong * (1 - p_wrong)).expand(2),
                               rtol=1e-13, atol=0)


def test_confident_cases_are_in_the_registry():
    assert set(CONFIDENT_CASE_IDS) == {"conf4-ce", "conf100-ce"}
