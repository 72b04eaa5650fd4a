"""Measures (SPEC §4) against the float64 references: values, gap estimates, n_train, results."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from softrank import ModelData, curvature
from softrank.measures import (
    IndefiniteWarning, MeasureResult, effective_dimension, hessian_norms, soft_rank,
    soft_rank_gap, tic, trace_ratio,
)

from .cases import CASE_IDS, KRONECKER_CASE_IDS, LOSSES
from .reference import assert_rel, logdet_dim
from .reference import soft_rank as ref_soft_rank
from .reference import tic as ref_tic

LAM = 0.05
MLP_CASES = [c for c in CASE_IDS if c.startswith("mlp-")]
FISHER_CASES = [c for c in CASE_IDS if LOSSES[c.split("-", 1)[1]].is_fisher]


def per_tensor_lam(ref):
    return {name: 0.02 * (1 + k) for k, name in enumerate(ref.names)}


@pytest.mark.parametrize("approximation", ["dense", "gram"])
@pytest.mark.parametrize("case_id", FISHER_CASES)
def test_soft_rank_and_its_gap_estimate(store, case_id, approximation):
    r"""value :math:`\mathrm{rank}_\Lambda(F)`; gap :math:`\frac{\mathrm{Tr}\,C}{\mathrm{Tr}\,F}\,
    \mathrm{rank}_\Lambda(F)/n_{train}`; calibrated gap
    :math:`\mathrm{rank}_\Lambda(F)/n_{train}`."""
    ref = store.reference(case_id)
    md = store.case(case_id).model_data(n_train=50)
    res = soft_rank_gap(md, LAM, approximation)
    rank = ref_soft_rank(ref.F, ref.lam(LAM))
    alpha = float(ref.C.trace() / ref.F.trace())
    assert_rel(res.value, rank, what="soft rank")
    assert_rel(res.gap, alpha * rank / 50, what="gap")
    assert_rel(res.diagnostics["calibrated_gap"], rank / 50, what="calibrated gap")
    assert_rel(res.diagnostics["alpha"], alpha, what="alpha")
    assert (res.name, res.n, res.lam, res.approximation) == ("soft_rank", 50, LAM, approximation)


@pytest.mark.parametrize("case_id", MLP_CASES)
def test_soft_rank_with_per_tensor_lam(store, case_id):
    ref = store.reference(case_id)
    lam = per_tensor_lam(ref)
    res = soft_rank(store.model_data(case_id), lam, "gram")
    assert_rel(res.value, ref_soft_rank(ref.F, ref.lam(lam)))
    assert res.lam == tuple(lam[n] for n in ref.names)


def test_soft_rank_of_generic_criterion_has_no_gap(store):
    """HuberLoss: the GGN soft rank is computed, but no calibration-based gap estimate."""
    ref = store.reference("mlp-huber")
    res = soft_rank(store.model_data("mlp-huber"), LAM, "dense")
    assert_rel(res.value, ref_soft_rank(ref.F, ref.lam(LAM)))
    assert res.gap is None


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("approximation", ["dense", "gram"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_tic_fisher(store, case_id, approximation, centered):
    r""":math:`\mathrm{Tr}\,C(F+\Lambda)^{-1}` (centered: :math:`C-\bar g\bar g^\top`);
    gap value/n."""
    ref = store.reference(case_id)
    res = tic(store.model_data(case_id), LAM, approximation, centered=centered)
    expected = ref_tic(ref.C_centered if centered else ref.C, ref.F, ref.lam(LAM))
    assert_rel(res.value, expected, what="TIC")
    assert_rel(res.gap, expected / ref.n, what="TIC gap")


@pytest.mark.parametrize("approximation", ["dense", "gram"])
@pytest.mark.parametrize("case_id", ["mlp-ce", "cnn-poisson", "bn-mse3"])
def test_tic_fisher_per_tensor_lam(store, case_id, approximation):
    ref = store.reference(case_id)
    lam = per_tensor_lam(ref)
    res = tic(store.model_data(case_id), lam, approximation)
    assert_rel(res.value, ref_tic(ref.C, ref.F, ref.lam(lam)))


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("approximation", ["kfac", "ekfac", "diagonal"])
@pytest.mark.parametrize("case_id", ["mlp-ce", "cnn-mse3", "mlp-bce"])
def test_tic_with_an_approximate_fisher(store, case_id, approximation, centered):
    r""":math:`\mathrm{Tr}\,C(F_{approx}+\lambda I)^{-1}` with :math:`F_{approx}` = to_dense()."""
    ref = store.reference(case_id)
    md = store.model_data(case_id)
    Fa = curvature(md, "fisher", approximation).to_dense()
    res = tic(md, LAM, approximation, centered=centered)
    C = ref.C_centered if centered else ref.C
    assert_rel(res.value, ref_tic(C, Fa, ref.lam(LAM)), what="TIC")


@pytest.mark.parametrize("case_id", ["mlp-ce", "cnn-mse1", "bn-poisson", "mlp-huber"])
def test_tic_hessian(store, case_id):
    ref = store.reference(case_id)
    lam = 0.5 + max(0.0, -float(torch.linalg.eigvalsh(ref.H).min()))  # H + λI is PD
    res = tic(store.model_data(case_id), lam, variant="hessian")
    assert_rel(res.value, ref_tic(ref.C, ref.H, ref.lam(lam)))
    assert "indefinite" not in res.diagnostics


def test_tic_hessian_warns_when_h_plus_lambda_is_indefinite(store):
    ref = store.reference("mlp-ce")
    lowest = float(torch.linalg.eigvalsh(ref.H).min())
    assert lowest < 0, "the test needs an indefinite Hessian"
    lam = -lowest / 2
    with pytest.warns(IndefiniteWarning):
        res = tic(store.model_data("mlp-ce"), lam, variant="hessian")
    assert res.diagnostics["indefinite"] is True
    assert_rel(res.value, ref_tic(ref.C, ref.H, ref.lam(lam)), tol=1e-6)


@pytest.mark.parametrize("case_id", FISHER_CASES)
def test_trace_ratio(store, case_id):
    ref = store.reference(case_id)
    md = store.case(case_id).model_data(n_train=20)
    res = trace_ratio(md)
    alpha = float(ref.C.trace() / ref.F.trace())
    assert_rel(res.value, alpha)
    assert_rel(res.gap, alpha / 20)


@pytest.mark.parametrize("case_id", ["mlp-ce", "cnn-bce", "bn-mse3", "bn-huber"])
def test_hessian_norms(store, case_id):
    """Tr H, ‖H‖₂ = max|σ|, the largest eigenvalue of H, and ‖H‖_F; baselines without a gap
    estimate."""
    H = store.reference(case_id).H
    md = store.model_data(case_id)
    expected = {"trace": H.trace(), "spectral": torch.linalg.matrix_norm(H, 2),
                "max_eigenvalue": torch.linalg.eigvalsh(H).max(),
                "frobenius": torch.linalg.matrix_norm(H)}
    for ord, value in expected.items():
        res = hessian_norms(md, ord)
        assert_rel(res.value, value, what=ord)
        assert res.gap is None and res.name == f"hessian_{ord}"


@pytest.mark.parametrize("approximation", ["dense", "gram", "diagonal", "kfac"])
@pytest.mark.parametrize("case_id", ["mlp-ce", "cnn-poisson"])
def test_effective_dimension(store, case_id, approximation):
    r""":math:`\sum_j\log(1+\sigma_j/\lambda)` of the representation's matrix."""
    ref = store.reference(case_id)
    md = store.model_data(case_id)
    M = ref.F if approximation in ("dense", "gram") else \
        curvature(md, "fisher", approximation).to_dense()
    res = effective_dimension(md, LAM, approximation)
    assert_rel(res.value, logdet_dim(M, ref.lam(LAM)))


@pytest.mark.parametrize("approximation", ["diagonal", "kfac", "ekfac"])
@pytest.mark.parametrize("case_id", KRONECKER_CASE_IDS[:8])
def test_approximate_soft_rank_is_that_of_its_matrix(store, case_id, approximation):
    ref = store.reference(case_id)
    md = store.model_data(case_id)
    Fa = curvature(md, "fisher", approximation).to_dense()
    res = soft_rank(md, LAM, approximation)
    assert_rel(res.value, ref_soft_rank(Fa, ref.lam(LAM)))
    assert res.approximation == approximation


@pytest.mark.parametrize("case_id", ["mlp-ce", "cnn-mse3", "bn-nll_skorch"])
def test_gram_leverage_is_per_sample_and_sums_to_the_soft_rank(store, case_id):
    r"""leverage_i = :math:`\mathrm{Tr}\,F_i(F+\Lambda)^{-1}/n`,
    :math:`F_i = J_i^\top A_i J_i`."""
    ref = store.reference(case_id)
    G = store.curvature(case_id, "fisher", "gram")
    inv = torch.linalg.inv(ref.F + torch.diag(ref.lam(LAM)))
    expected = torch.stack([(ref.F_i(i) @ inv).trace() / ref.n for i in range(ref.n)])
    lev = G.leverage(LAM)
    assert_rel(lev, expected, what="leverage")
    assert math.isclose(float(lev.sum()), G.soft_rank(LAM), rel_tol=1e-10)


def test_measure_result_is_frozen(store):
    res = trace_ratio(store.model_data("mlp-ce"))
    assert isinstance(res, MeasureResult) and float(res) == res.value
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.value = 0.0


def test_measures_on_held_out_data(store):
    """Measures also run on data the model was not trained on (SPEC §2), n_train kept apart."""
    case = store.case("mlp-ce")
    gen = torch.Generator().manual_seed(7)
    X = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    md = ModelData(case.model, case.criterion, X, y, n_train=100)
    res = soft_rank_gap(md, LAM, "dense")
    assert md.n == 5 and res.n == 100
    assert_rel(res.diagnostics["calibrated_gap"], res.value / 100)
