"""Bad input gets an error whose message names the problem (SPEC §6)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from softrank import ModelData, curvature
from softrank.families import UnsupportedCriterionError
from softrank.layers import UnsupportedLayerError
from softrank.measures import soft_rank, soft_rank_gap, tic, trace_ratio

from .cases import build_case


@pytest.fixture
def case():
    return build_case("mlp-ce")


@pytest.fixture
def md(case):
    return case.model_data()


# ------------------------------------------------------------------ λ
@pytest.mark.parametrize("lam", [0.0, -0.1, math.nan, math.inf])
@pytest.mark.parametrize("approximation", ["dense", "gram", "diagonal", "kfac", "ekfac"])
def test_lam_must_be_positive_and_finite(md, approximation, lam):
    M = curvature(md, "fisher", approximation)
    with pytest.raises(ValueError, match="lam must be"):
        M.soft_rank(lam)


@pytest.mark.parametrize("measure", [soft_rank, soft_rank_gap, tic])
def test_measures_reject_nonpositive_lam(md, measure):
    with pytest.raises(ValueError, match=r"lam must be > 0"):
        measure(md, 0.0, "dense")


def test_lam_dict_entries_are_checked(md):
    names = md.param_names
    with pytest.raises(ValueError, match=r"lam\['0.0.bias'\] must be > 0"):
        soft_rank(md, {n: (0.0 if n == "0.0.bias" else 0.1) for n in names}, "dense")
    with pytest.raises(ValueError, match="unknown parameters"):
        soft_rank(md, {**{n: 0.1 for n in names}, "nope": 0.1}, "dense")
    with pytest.raises(ValueError, match="no value for parameters"):
        soft_rank(md, {names[0]: 0.1}, "dense")
    with pytest.raises(TypeError, match="lam must be"):
        soft_rank(md, None, "dense")


def test_kfac_needs_one_lam_per_layer_block(md):
    lam = {n: 0.1 if n.endswith("weight") else 0.2 for n in md.param_names}
    with pytest.raises(ValueError, match="same lam"):
        curvature(md, "fisher", "kfac").soft_rank(lam)


# ------------------------------------------------------------------ model and data
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_parameters(case, bad):
    with torch.no_grad():
        case.model[0][2].weight[0, 0] = bad
    with pytest.raises(ValueError, match=r"parameter '0.2.weight' contains NaN or inf"):
        case.model_data()


@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_nonfinite_inputs(case, bad):
    X = case.X.clone()
    X[1, 2] = bad
    with pytest.raises(ValueError, match="X contains NaN or inf"):
        ModelData(case.model, case.criterion, X, case.y)


def test_nonfinite_targets():
    case = build_case("mlp-mse1")
    y = case.y.clone()
    y[0] = math.nan
    with pytest.raises(ValueError, match="y contains NaN or inf"):
        ModelData(case.model, case.criterion, case.X, y)


def test_empty_data(case):
    with pytest.raises(ValueError, match="empty dataset"):
        ModelData(case.model, case.criterion, case.X[:0], case.y[:0])


def test_inputs_that_do_not_fit_the_module(case):
    X = torch.randn(8, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cannot process X of shape \(8, 5\)"):
        ModelData(case.model, case.criterion, X, case.y)


def test_x_and_y_of_different_lengths(case):
    with pytest.raises(ValueError, match="different numbers of samples: 8 vs 7"):
        ModelData(case.model, case.criterion, case.X, case.y[:7])


@pytest.mark.parametrize("label", [3, -1])
def test_labels_outside_the_classes(case, label):
    y = case.y.clone()
    y[0] = label
    with pytest.raises(ValueError, match="labels outside the classes: the model has K=3"):
        ModelData(case.model, case.criterion, case.X, y)


def test_binary_labels_outside_the_classes():
    case = build_case("mlp-bce")
    y = case.y.clone()
    y[0] = 2.0
    with pytest.raises(ValueError, match="labels outside the classes"):
        ModelData(case.model, case.criterion, case.X, y)


def test_regression_targets_of_the_wrong_width():
    case = build_case("mlp-mse3")
    with pytest.raises(ValueError, match=r"reshape y to \(n_samples, 3\)"):
        ModelData(case.model, case.criterion, case.X, case.y[:, :2])


def test_unknown_parameter_names(case):
    with pytest.raises(ValueError, match=r"params names \['nope'\] are not parameters"):
        case.model_data(params=["0.0.weight", "nope"])


def test_no_parameter_selected(case):
    with pytest.raises(ValueError, match="no parameters selected"):
        case.model_data(params=lambda name, p: False)


def test_not_a_module_or_not_a_criterion(case):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ModelData(lambda x: x, case.criterion, case.X, case.y)
    with pytest.raises(TypeError, match="loss module"):
        ModelData(case.model, "cross_entropy", case.X, case.y)


# ------------------------------------------------------------------ layers and criteria
def test_kfac_names_the_unsupported_layer():
    case = build_case("bn-ce")
    md = case.model_data()
    for approximation in ("kfac", "ekfac"):
        with pytest.raises(UnsupportedLayerError, match=r"layer '0.1' \(BatchNorm1d\)"):
            curvature(md, "fisher", approximation)


@pytest.mark.parametrize("what", ["trace_ratio", "soft_rank_gap", "fisher_mc"])
def test_fisher_based_measures_reject_a_criterion_outside_the_table(what):
    md = build_case("mlp-huber").model_data()
    run = {"trace_ratio": lambda: trace_ratio(md),
           "soft_rank_gap": lambda: soft_rank_gap(md, 0.1),
           "fisher_mc": lambda: curvature(md, "fisher_mc", "dense", random_state=0)}[what]
    with pytest.raises(UnsupportedCriterionError, match="HuberLoss is not in softrank's family"):
        run()


def test_labels_needed(case):
    md = ModelData(case.model, case.criterion, case.X)
    with pytest.raises(ValueError, match="needs labels"):
        tic(md, 0.1)
    with pytest.raises(ValueError, match="needs labels"):
        curvature(md, "hessian", "dense")
    with pytest.raises(ValueError, match="needs labels"):
        curvature(md, "gsm", "gram")
    assert curvature(md, "fisher", "gram").trace() > 0  # F needs no labels


# ------------------------------------------------------------------ sizes and names
def test_dense_above_the_size_limit(md):
    with pytest.raises(MemoryError, match=f"{md.n_params}x{md.n_params}.*max_params=10"):
        curvature(md, "fisher", "dense", max_params=10)


def test_gram_above_max_rows(md):
    # 8 samples × (K − 1 = 2) columns of the softmax factor: a 16 × 16 kernel
    with pytest.raises(MemoryError, match="16x16 .*above max_rows=10"):
        curvature(md, "fisher", "gram", max_rows=10)


def test_unknown_approximation_and_matrix(md):
    with pytest.raises(ValueError, match="approximation must be one of .*'kfca'"):
        curvature(md, "fisher", "kfca")
    with pytest.raises(ValueError, match="matrix must be one of .*'fischer'"):
        curvature(md, "fischer", "dense")
    with pytest.raises(ValueError, match="variant must be"):
        tic(md, 0.1, variant="empirical")


def test_hessian_has_no_layerwise_representation(md):
    with pytest.raises(ValueError, match="Hessian has no 'kfac' representation"):
        curvature(md, "hessian", "kfac")


def test_centered_only_for_the_gradient_second_moment(md):
    with pytest.raises(ValueError, match="centered=True applies to"):
        curvature(md, "fisher", "dense", centered=True)
    with pytest.raises(ValueError, match="centered=True is not available"):
        curvature(md, "gsm", "kfac", centered=True)


def test_batch_size_must_be_positive(case):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        case.model_data(batch_size=0)


def test_weight_sharing_is_refused_by_kfac_only():
    lin = nn.Linear(3, 3).double()
    model = nn.Sequential(lin, nn.Tanh(), lin)
    X = torch.randn(4, 3, dtype=torch.float64)
    md = ModelData(model, nn.MSELoss(), X, torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(UnsupportedLayerError, match=r"module '0' \(Linear\) is called 2 times"):
        curvature(md, "fisher", "kfac")
    assert curvature(md, "fisher", "gram").trace() > 0


def test_the_finiteness_check_sees_every_block():
    """X is checked for NaN/inf in blocks of rows (bounded temporaries): a bad value in the
    last block, or in a non-contiguous view, is still found."""
    from softrank.model import _all_finite
    t = torch.zeros(50, 7)
    assert _all_finite(t, chunk=10)
    t[49, 6] = float("nan")
    assert not _all_finite(t, chunk=10)
    assert not _all_finite(t.T, chunk=10)
    t[49, 6] = float("-inf")
    assert not _all_finite(t[::7], chunk=3)
    assert _all_finite(torch.zeros(0, 3)) and not _all_finite(torch.tensor(float("inf")))
