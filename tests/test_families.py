r"""Loss families (SPEC §3): loss, residual, factor B with A = BBᵀ, sampling, label checks.

For every case of the registry, at outputs z of a batch: the family's per-sample loss is the
criterion's, :math:`r_i = \partial\ell_i/\partial z_i` and :math:`B_iB_i^\top = A_i`, the
autograd Hessian of the per-sample (natural-parameter) loss; the predictive distribution has
:math:`\mathbb E_{\hat y}[r(\hat y)r(\hat y)^\top] = A` (what makes the sampled Fisher unbiased).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as Fn

from softrank.families import (
    Bernoulli, Categorical, Gaussian, GenericGGN, Poisson, UnsupportedCriterionError, family_for,
)

from .cases import LOSSES
from .reference import assert_rel

N = 6


def outputs_and_targets(loss_name):
    """Outputs z (natural parameters: log-probabilities for the NLL cases) and labels."""
    case = LOSSES[loss_name]
    gen = torch.Generator().manual_seed(len(loss_name))
    z = torch.randn(N, case.n_out, generator=gen, dtype=torch.float64)
    if loss_name.startswith("nll"):
        z = torch.log_softmax(z, 1)
    return z, case.targets(N, gen)


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_loss_is_the_per_sample_criterion(loss_name):
    r""":math:`\ell_i` = criterion(reduction='none') averaged over non-batch dimensions."""
    z, y = outputs_and_targets(loss_name)
    crit = LOSSES[loss_name].criterion()
    fam = family_for(crit)
    crit.reduction = "none"
    expected = crit(z, y).reshape(N, -1).mean(1)
    assert_rel(fam.loss(z, fam.prepare_target(y, z)), expected)


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_residual_is_the_output_gradient(loss_name):
    z, y = outputs_and_targets(loss_name)
    case = LOSSES[loss_name]
    fam = family_for(case.criterion())
    expected = torch.func.vmap(torch.func.grad(case.natural_loss))(z, y)
    assert_rel(fam.residual(z, fam.prepare_target(y, z)), expected)


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_factor_squares_to_the_output_hessian(loss_name):
    r""":math:`B_iB_i^\top = \partial^2\ell_i/\partial z_i^2` (autograd)."""
    z, y = outputs_and_targets(loss_name)
    case = LOSSES[loss_name]
    fam = family_for(case.criterion())
    B = fam.factor(z, fam.prepare_target(y, z))
    expected = torch.func.vmap(torch.func.hessian(case.natural_loss))(z, y)
    assert_rel(B @ B.transpose(1, 2), expected)


def test_categorical_factor_closed_form():
    r""":math:`BB^\top = \mathrm{diag}\,\pi - \pi\pi^\top` with K−1 orthogonal columns in
    the column space of :math:`\mathrm{diag}(\sqrt\pi) - \pi\sqrt\pi^\top`, also for
    saturated softmax outputs (one class at probability 1, the others underflowing); and
    :math:`\sum_y \pi_y\,r(y)r(y)^\top = \mathrm{diag}\,\pi - \pi\pi^\top` over all labels."""
    z, _ = outputs_and_targets("ce")
    fam = Categorical()
    pi = torch.softmax(z, 1)
    A = torch.diag_embed(pi) - torch.einsum("nk,nl->nkl", pi, pi)
    B = fam.factor(z)
    assert B.shape == (N, 3, 2)
    assert_rel(B @ B.transpose(1, 2), A)
    B0 = torch.diag_embed(pi.sqrt()) - pi.unsqueeze(2) * pi.sqrt().unsqueeze(1)
    assert_rel(B0 @ torch.linalg.pinv(B0) @ B, B)  # B = B0 Q: columns in B0's column space
    saturated = torch.tensor([[800.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 900.0],
                              [1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    Bs = fam.factor(saturated)
    ps = torch.softmax(saturated, 1)
    assert torch.isfinite(Bs).all() and Bs.shape == (3, 4, 3)
    assert torch.allclose(Bs @ Bs.transpose(1, 2),
                          torch.diag_embed(ps) - torch.einsum("nk,nl->nkl", ps, ps), atol=1e-15)
    second_moment = sum(pi[:, c, None, None] * torch.einsum("nk,nl->nkl", r, r)
                        for c in range(3)
                        for r in [fam.residual(z, torch.full((N,), c, dtype=torch.long))])
    assert_rel(second_moment, torch.diag_embed(pi) - torch.einsum("nk,nl->nkl", pi, pi))


@pytest.mark.parametrize("loss_name", ["ce", "bce", "mse3", "poisson"])
def test_sampled_residual_second_moment_is_the_fisher(loss_name):
    r""":math:`\frac1S\sum_s r(\hat y_s)r(\hat y_s)^\top \to A` within 5 Monte-Carlo standard
    errors (Poisson with K=2 outputs: the mean over outputs needs the residual scaled by √K)."""
    z, _ = outputs_and_targets(loss_name)
    z = z[:2] * 0.5
    fam = family_for(LOSSES[loss_name].criterion())
    gen = torch.Generator().manual_seed(0)
    S = 20000
    zs = z.repeat(S, 1)
    r = fam.sampled_residual(zs, gen).reshape(S, 2, -1)
    outer = torch.einsum("snk,snl->snkl", r, r)
    mean, se = outer.mean(0), outer.std(0) / S ** 0.5
    B = fam.factor(z)
    A = B @ B.transpose(1, 2)
    assert bool(((mean - A).abs() <= 5 * se + 1e-12).all()), (mean, A, se)


@pytest.mark.parametrize("criterion, family", [
    (nn.CrossEntropyLoss(), Categorical), (nn.NLLLoss(), Categorical),
    (nn.BCEWithLogitsLoss(), Bernoulli), (nn.MSELoss(), Gaussian),
    (nn.PoissonNLLLoss(log_input=True), Poisson), (nn.HuberLoss(), GenericGGN),
    (nn.SmoothL1Loss(), GenericGGN), (nn.CrossEntropyLoss, Categorical),
])
def test_family_for(criterion, family):
    fam = family_for(criterion)
    assert type(fam) is family
    assert fam.is_fisher == (family is not GenericGGN)


@pytest.mark.parametrize("criterion", [nn.HuberLoss(), nn.SmoothL1Loss(), nn.L1Loss()])
def test_require_fisher_names_the_criterion(criterion):
    with pytest.raises(UnsupportedCriterionError, match=type(criterion).__name__):
        family_for(criterion, require_fisher=True)


@pytest.mark.parametrize("criterion, match", [
    (nn.CrossEntropyLoss(label_smoothing=0.1), "label_smoothing"),
    (nn.CrossEntropyLoss(weight=torch.ones(3)), "class or element weights"),
    (nn.BCEWithLogitsLoss(pos_weight=torch.ones(1)), "pos_weight"),
    (nn.PoissonNLLLoss(log_input=False), "log_input=False"),
])
def test_criterion_options_outside_the_table_take_the_generic_ggn(criterion, match):
    fam = family_for(criterion)
    assert isinstance(fam, GenericGGN) and not fam.is_fisher
    with pytest.raises(UnsupportedCriterionError, match=match) as err:
        family_for(criterion, require_fisher=True)
    assert "HessianNorm, TIC(variant='hessian') and ApproxLOO" in str(err.value)


def test_label_smoothing_ggn_matches_the_autograd_hessian_and_keeps_label_checks():
    crit = nn.CrossEntropyLoss(label_smoothing=0.2, weight=torch.tensor([1.0, 2.0, 0.5]))
    fam = family_for(crit)
    z = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2, 1, 2])
    B = fam.factor(z, y)
    for i in range(4):
        ref = torch.func.hessian(lambda t: Fn.cross_entropy(
            t[None], y[i:i + 1], weight=crit.weight.double(), label_smoothing=0.2,
            reduction="sum"))(z[i])
        torch.testing.assert_close(B[i] @ B[i].T, ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="labels outside the classes"):
        fam.check_target(torch.tensor([0, 3]), z)


def test_poisson_full_keeps_the_poisson_fisher_and_the_full_loss():
    fam = family_for(nn.PoissonNLLLoss(full=True))
    assert isinstance(fam, Poisson) and fam.is_fisher
    z = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    y = torch.tensor([[4.0, 0.0]], dtype=torch.float64)
    ref = nn.PoissonNLLLoss(full=True, reduction="none")(z, y).mean(1)
    torch.testing.assert_close(fam.loss(z, y), ref)


def test_generic_family_cannot_sample_and_needs_labels_for_its_factor():
    fam = family_for(nn.HuberLoss())
    z = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(UnsupportedCriterionError, match="HuberLoss"):
        fam.sample(z)
    with pytest.raises(ValueError, match="pass y"):
        fam.factor(z)


def test_generic_loss_leaves_the_criterion_unchanged():
    crit = nn.HuberLoss(reduction="sum")
    family_for(crit).loss(torch.zeros(2, 2, dtype=torch.float64), torch.ones(2, 2))
    assert crit.reduction == "sum"


@pytest.mark.parametrize("family, y, match", [
    (Categorical(), torch.tensor([0, 3]), "labels outside the classes"),
    (Categorical(), torch.tensor([-1, 0]), "labels outside the classes"),
    (Categorical(), torch.tensor([0.5, 1.0]), "integers"),
    (Bernoulli(), torch.tensor([[0.0], [2.0]]), "labels outside the classes"),
    (Bernoulli(), torch.tensor([0.0, 1.0, 1.0]), "one label"),
    (Gaussian(), torch.zeros(2, 2), "reshape y"),
    (Poisson(), -torch.ones(2, 3), "non-negative"),
])
def test_check_target_names_the_problem(family, y, match):
    z = torch.zeros(2, 3) if not isinstance(family, Bernoulli) else torch.zeros(2, 1)
    with pytest.raises(ValueError, match=match):
        family.check_target(y, z)
