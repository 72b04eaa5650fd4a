r"""Closed forms (SPEC §5, §7): ridge regression and multinomial logistic regression.

Ridge. One ``nn.Linear(d, 1)`` trained with MSE (mean over samples) and weight decay λ on all
parameters minimizes :math:`\frac1n\|y-\tilde X\theta\|^2 + \frac\lambda2\|\theta\|^2` with
:math:`\tilde X = [X, 1]`. Its Hessian is :math:`H = F = \frac2n\tilde X^\top\tilde X`, so with
the singular values :math:`s_j` of :math:`\tilde X`

.. math:: \mathrm{rank}_\lambda(H) = \sum_j \frac{2s_j^2/n}{2s_j^2/n+\lambda}
          = \sum_j \frac{s_j^2}{s_j^2 + n\lambda/2},

the ridge effective degrees of freedom. Multiplying the objective by n gives sklearn's
``Ridge(alpha, fit_intercept=False)`` on :math:`\tilde X` (intercept column penalized like the
other weights) with :math:`\alpha = n\lambda/2`, i.e. :math:`\lambda = 2\alpha/n`.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from torch import nn

from softrank import ModelData, curvature
from softrank.measures import soft_rank_gap, tic

from .reference import assert_rel

BETA = torch.tensor([1.0, -0.5, 0.25, 0.5], dtype=torch.float64)  # 3 weights, then the bias


def with_ones(X):
    return torch.cat([X, torch.ones(*X.shape[:-1], 1, dtype=X.dtype)], -1)


def ridge_solution(X, y, lam):
    r""":math:`\hat\theta = (\tilde X^\top\tilde X + \tfrac{n\lambda}2 I)^{-1}\tilde X^\top y`
    (batched over leading dimensions)."""
    Xt = with_ones(X)
    n, p = Xt.shape[-2:]
    eye = torch.eye(p, dtype=torch.float64)
    return torch.linalg.solve(Xt.transpose(-1, -2) @ Xt + n * lam / 2 * eye,
                              Xt.transpose(-1, -2) @ y)


def linear_model_at(theta):
    d = len(theta) - 1
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(theta[:d].reshape(1, d))
        model.bias.copy_(theta[d:])
    return model


def linear_gaussian_data(gen, shape, sigma=1.0):
    """x ~ N(0, I_3), y = x̃ᵀβ + σε."""
    X = torch.randn(*shape, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return X, with_ones(X) @ BETA + sigma * eps, eps


@pytest.fixture
def ridge():
    gen = torch.Generator().manual_seed(0)
    X, y, _ = linear_gaussian_data(gen, (30,))
    lam = 0.4
    return X, y, lam, linear_model_at(ridge_solution(X, y, lam))


def test_trained_linear_is_the_sklearn_ridge_solution(ridge):
    """sklearn Ridge(alpha = nλ/2, fit_intercept=False) on [X, 1] gives the same weights, and
    the gradient of mean MSE + ½λ‖θ‖² vanishes there."""
    X, y, lam, model = ridge
    n = len(X)
    sk = Ridge(alpha=n * lam / 2, fit_intercept=False, solver="cholesky")
    sk.fit(with_ones(X).numpy(), y.numpy())
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    np.testing.assert_allclose(theta.numpy(), sk.coef_, rtol=1e-10, atol=1e-12)
    objective = nn.functional.mse_loss(model(X).squeeze(1), y) + lam / 2 * sum(
        p.pow(2).sum() for p in model.parameters())
    grads = torch.autograd.grad(objective, list(model.parameters()))
    assert max(float(g.abs().max()) for g in grads) < 1e-12


@pytest.mark.parametrize("matrix, approximation", [
    ("hessian", "dense"), ("fisher", "dense"), ("fisher", "gram"), ("fisher", "kfac"),
    ("fisher", "ekfac"),
])
def test_soft_rank_is_ridge_degrees_of_freedom(ridge, matrix, approximation):
    r""":math:`\mathrm{rank}_\lambda(H) = \sum_j s_j^2/(s_j^2+n\lambda/2)` = Tr of sklearn's hat
    matrix :math:`\tilde X(\tilde X^\top\tilde X+\alpha I)^{-1}\tilde X^\top`."""
    X, y, lam, model = ridge
    n = len(X)
    s = torch.linalg.svdvals(with_ones(X))
    dof = float((s ** 2 / (s ** 2 + n * lam / 2)).sum())
    Xt = with_ones(X)
    hat = Xt @ torch.linalg.solve(Xt.T @ Xt + n * lam / 2 * torch.eye(4, dtype=torch.float64),
                                  Xt.T)
    assert_rel(float(hat.trace()), dof, what="hat matrix trace")
    md = ModelData(model, nn.MSELoss(), X, y.unsqueeze(1), batch_size=7)
    M = curvature(md, matrix, approximation)
    assert_rel(M.to_dense(), 2 / n * Xt.T @ Xt, what="H = (2/n) X̃ᵀX̃")
    assert_rel(M.soft_rank(lam), dof, what="soft rank")


def test_tic_gap_estimate_matches_the_monte_carlo_gap():
    r"""Expected gap E[test − train] of ridge on a known linear-Gaussian model vs the mean TIC
    gap estimate :math:`\mathrm{Tr}\,C(H+\lambda I)^{-1}/n` (and the soft-rank gap estimate).

    Test loss in closed form: :math:`\sigma^2 + \|\theta-\beta\|^2`
    (as :math:`E\,\tilde x\tilde x^\top = I`).
    Control variate: subtracting :math:`\sigma^2 - \frac1n\sum_i\sigma^2\varepsilon_i^2` (mean 0)
    from each gap removes the train-loss noise. Gaps from 4000 training sets, estimates from 60.
    Agreement within 3 Monte-Carlo standard errors (≈ 10% of the gap; the first-order
    remainder is O(p/n) = 2%).
    """
    n, lam, sigma = 200, 0.5, 1.0
    gen = torch.Generator().manual_seed(1)
    X, y, eps = linear_gaussian_data(gen, (4000, n), sigma)
    theta = ridge_solution(X, y.unsqueeze(-1), lam).squeeze(-1)
    train = (y - (with_ones(X) @ theta.unsqueeze(-1)).squeeze(-1)).pow(2).mean(1)
    test = sigma ** 2 + (theta - BETA).pow(2).sum(1)
    gaps = (test - sigma ** 2) - (train - (sigma * eps).pow(2).mean(1))
    estimates = {"tic": [], "soft_rank_gap": []}
    for r in range(60):
        md = ModelData(linear_model_at(theta[r]), nn.MSELoss(), X[r], y[r].unsqueeze(1))
        estimates["tic"].append(tic(md, lam, "dense", variant="hessian").gap)
        estimates["soft_rank_gap"].append(soft_rank_gap(md, lam, "dense").gap)
    se_gap = float(gaps.std()) / len(gaps) ** 0.5
    for name, values in estimates.items():
        e = torch.tensor(values)
        se = (se_gap ** 2 + float(e.std()) ** 2 / len(e)) ** 0.5
        assert abs(float(e.mean() - gaps.mean())) <= 3 * se, (name, float(e.mean()),
                                                               float(gaps.mean()), se)


# ------------------------------------------------------------------ multinomial logistic
@pytest.fixture
def softmax_regression():
    d, K, n = 3, 4, 30
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    model = nn.Linear(d, K).double()
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, K, (n,), generator=gen)
    return ModelData(model, nn.CrossEntropyLoss(), X, y), d, K


@pytest.mark.parametrize("approximation", ["dense", "gram", "kfac", "ekfac"])
def test_softmax_regression_rank_saturates_at_k_minus_1_times_d_plus_1(
        softmax_regression, approximation):
    r"""The softmax is invariant to adding a constant to all logits, so F has exactly
    :math:`(K-1)(d+1)` nonzero eigenvalues: :math:`\mathrm{rank}_\lambda(F)\uparrow (K-1)(d+1)<p`
    as :math:`\lambda\to0`."""
    md, d, K = softmax_regression
    limit, p = (K - 1) * (d + 1), K * (d + 1)
    F = curvature(md, "fisher", approximation)
    ranks = [F.soft_rank(lam) for lam in (1e-2, 1e-4, 1e-6, 1e-8)]
    assert ranks == sorted(ranks) and ranks[0] < limit - 0.05
    assert abs(ranks[-1] - limit) < 1e-5  # deficit Σ_j λ/σ_j ≈ 1e-6 at λ = 1e-8
    ev = F.eigvals()
    assert int((ev > 1e-10 * float(ev.max())).sum()) == limit < p


def test_diagonal_fisher_does_not_see_the_redundant_direction(softmax_regression):
    """The diagonal soft rank goes to p = K(d+1): the overestimate of SPEC §1."""
    md, d, K = softmax_regression
    assert abs(curvature(md, "fisher", "diagonal").soft_rank(1e-8) - K * (d + 1)) < 1e-5
