r"""Loss families: from a criterion to the output-space quantities of the family table.

For a network output :math:`z_i` (the natural parameter of the predictive distribution) a
family gives

* the per-sample loss :math:`\ell_i` (criterion with ``reduction='none'``, averaged over
  non-batch dimensions),
* the residual :math:`r_i = \partial \ell_i / \partial z_i` at the true label,
* a factor :math:`B_i` with :math:`A_i = \partial^2 \ell_i / \partial z_i^2 = B_i B_i^\top`,
* samples :math:`\hat y \sim p(\cdot \mid z_i)` from the predictive distribution.

Outputs are always handled as 2-D ``(N, K)`` tensors. ``family_for(criterion)`` picks the
family; any other criterion gets :class:`GenericGGN`, whose :math:`A_i` comes from autograd and
which is flagged ``is_fisher = False``.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as Fn

__all__ = [
    "LossFamily", "Categorical", "Bernoulli", "Gaussian", "Poisson", "GenericGGN", "family_for",
    "UnsupportedCriterionError",
]


class UnsupportedCriterionError(TypeError):
    """A Fisher-based measure was asked of a criterion outside the family table
    (CrossEntropyLoss, NLLLoss, BCEWithLogitsLoss, MSELoss, PoissonNLLLoss(log_input=True))."""


class LossFamily:
    """Output-space curvature of one criterion. Subclasses implement the four methods."""

    name = "generic"
    is_fisher = True  # A is the Fisher of an exponential family in z (calibration readings hold)

    def prepare_target(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Bring labels into the form the loss needs (dtype, shape)."""
        return y

    def loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # (N,)
        raise NotImplementedError

    def residual(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # (N, K)
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            (r,) = torch.autograd.grad(self.loss(z, y).sum(), z)
        return r

    def factor(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(N, K, K') factor B with A = B B^T; y is used only by :class:`GenericGGN`."""
        raise NotImplementedError

    def sample(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def sampled_residual(self, z: torch.Tensor, generator: torch.Generator | None = None
                         ) -> torch.Tensor:
        r"""(N, K) residual at a label drawn from the model, scaled so that
        :math:`\mathbb E[r r^\top] = A` (the sampled Fisher is unbiased)."""
        return self.residual(z, self.prepare_target(self.sample(z, generator), z))

    def check_target(self, y: torch.Tensor, z: torch.Tensor) -> None:
        """Raise a clear error when labels cannot belong to this output."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Categorical(LossFamily):
    r"""Softmax cross-entropy on logits :math:`z`: :math:`A = \mathrm{diag}(\pi) - \pi\pi^\top`,
    :math:`B` (K × (K−1), see :meth:`factor`), :math:`r = \pi - e_y`.

    Also NLLLoss on log-probabilities (then :math:`\mathrm{softmax}(z) = \exp z`), the form of
    skorch's ``NeuralNetClassifier`` default.
    """

    name = "categorical"

    def __init__(self, label_smoothing: float = 0.0, weight: torch.Tensor | None = None):
        if label_smoothing or weight is not None:
            raise UnsupportedCriterionError(
                "CrossEntropyLoss with label_smoothing or class weights is not an exponential-family "
                "likelihood; use the plain criterion for Fisher-based measures.")

    def prepare_target(self, y, z):
        return y.reshape(-1).long()

    def check_target(self, y, z):
        y = y.reshape(-1)
        if y.is_floating_point() and not torch.equal(y, y.round()):
            raise ValueError("class labels must be integers 0..K-1; got non-integer values")
        K = z.shape[1]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= K):
            raise ValueError(
                f"labels outside the classes: the model has K={K} outputs, so labels must be in "
                f"0..{K - 1}; got values in {int(y.min())}..{int(y.max())}")

    def loss(self, z, y):
        return Fn.cross_entropy(z, y, reduction="none")

    def residual(self, z, y):
        r = torch.softmax(z, dim=1)
        r[torch.arange(len(y)), y] -= 1.0
        return r

    def factor(self, z, y=None):
        r"""(N, K, K−1): A has rank K−1 (:math:`A\sqrt\pi = 0`), so
        :math:`B_0 = \mathrm{diag}(\sqrt\pi) - \pi\sqrt\pi^\top` (:math:`B_0B_0^\top = A`,
        :math:`B_0\sqrt\pi = 0`) keeps its product with an orthonormal basis Q of
        :math:`\sqrt\pi^\perp`: :math:`B = B_0Q`, :math:`BB^\top = B_0QQ^\top B_0^\top = A`.
        Q is the first K−1 columns of the Householder reflection
        :math:`I - 2ww^\top/w^\top w`, :math:`w = \sqrt\pi + e_K` (:math:`w^\top w \ge 2`:
        stable for any π). One column fewer: K−1 backward passes and Gram rows per sample."""
        p = torch.softmax(z, dim=1)
        s = p.sqrt()
        B0 = torch.diag_embed(s) - p.unsqueeze(2) * s.unsqueeze(1)
        K = z.shape[1]
        if K == 1:
            return B0  # a single class: A = 0
        w = s.clone()
        w[:, -1] += 1.0
        Q = -(2.0 / (w * w).sum(1))[:, None, None] * w.unsqueeze(2) * w[:, None, :K - 1]
        Q[:, :K - 1].diagonal(dim1=1, dim2=2).add_(1.0)  # I − 2wwᵀ/wᵀw, first K−1 columns
        return B0 @ Q

    def sample(self, z, generator=None):
        return torch.multinomial(torch.softmax(z.double(), 1), 1, generator=generator).squeeze(1)


class Bernoulli(LossFamily):
    r"""BCEWithLogitsLoss on one logit per sample: :math:`A = \pi(1-\pi)`, :math:`r = \pi - y`."""

    name = "bernoulli"

    def prepare_target(self, y, z):
        return y.reshape(z.shape).to(z.dtype)

    def check_target(self, y, z):
        if y.numel() != z.numel():
            raise ValueError(
                f"BCEWithLogitsLoss: got {y.numel()} labels for {z.numel()} outputs; "
                "a binary model needs one label in {0, 1} per output")
        if y.numel() and (float(y.min()) < 0 or float(y.max()) > 1):
            raise ValueError("labels outside the classes: BCEWithLogitsLoss needs labels in [0, 1]")

    def loss(self, z, y):
        return Fn.binary_cross_entropy_with_logits(z, y, reduction="none").mean(1)

    def residual(self, z, y):
        return (torch.sigmoid(z) - y) / z.shape[1]

    def factor(self, z, y=None):
        p = torch.sigmoid(z)
        return torch.diag_embed((p * (1 - p) / z.shape[1]).sqrt())

    def sample(self, z, generator=None):
        return torch.bernoulli(torch.sigmoid(z.double()), generator=generator).to(z.dtype)

    def sampled_residual(self, z, generator=None):
        # ℓ is the mean of K independent NLLs: A = Fisher/K but E[r rᵀ] = Fisher/K²
        return super().sampled_residual(z, generator) * z.shape[1] ** 0.5


class Gaussian(LossFamily):
    r"""MSELoss (mean reduction) with ``d`` outputs: :math:`\ell = \frac1d\|z-y\|^2`,
    :math:`A = \frac2d I`, :math:`r = \frac2d(z-y)`. The predictive distribution is
    :math:`\mathcal N(z, \frac d2 I)`, for which this loss is the NLL up to a constant."""

    name = "gaussian"

    def prepare_target(self, y, z):
        return y.reshape(z.shape).to(z.dtype)

    def check_target(self, y, z):
        if y.numel() != z.numel():
            raise ValueError(
                f"MSELoss: targets have {y.numel() // max(len(z), 1)} values per sample but the "
                f"model has {z.shape[1]} outputs; reshape y to (n_samples, {z.shape[1]})")

    def loss(self, z, y):
        return ((z - y) ** 2).mean(1)

    def residual(self, z, y):
        return 2.0 * (z - y) / z.shape[1]

    def factor(self, z, y=None):
        N, d = z.shape
        eye = torch.eye(d, dtype=z.dtype, device=z.device) * math.sqrt(2.0 / d)
        return eye.expand(N, d, d)

    def sample(self, z, generator=None):
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        return z + math.sqrt(z.shape[1] / 2.0) * noise


class Poisson(LossFamily):
    r"""PoissonNLLLoss(log_input=True, full=False) on log-rates: :math:`\ell = e^z - yz`,
    :math:`A = \mathrm{diag}(e^z)`, :math:`r = e^z - y`."""

    name = "poisson"

    def prepare_target(self, y, z):
        return y.reshape(z.shape).to(z.dtype)

    def check_target(self, y, z):
        if y.numel() != z.numel():
            raise ValueError(f"PoissonNLLLoss: got {y.numel()} targets for {z.numel()} outputs")
        if y.numel() and float(y.min()) < 0:
            raise ValueError("PoissonNLLLoss needs non-negative count targets")

    def loss(self, z, y):
        return (torch.exp(z) - y * z).mean(1)

    def residual(self, z, y):
        return (torch.exp(z) - y) / z.shape[1]

    def factor(self, z, y=None):
        return torch.diag_embed((torch.exp(z) / z.shape[1]).sqrt())

    def sample(self, z, generator=None):
        return torch.poisson(torch.exp(z.double()), generator=generator).to(z.dtype)

    def sampled_residual(self, z, generator=None):
        # ℓ is the mean of K independent NLLs: A = Fisher/K but E[r rᵀ] = Fisher/K²
        return super().sampled_residual(z, generator) * z.shape[1] ** 0.5


class GenericGGN(LossFamily):
    r"""Any other twice-differentiable criterion: :math:`A_i` from autograd (the generalized
    Gauss–Newton factor). Not a Fisher: calibration readings (rank/n as a gap) do not apply.
    Negative curvature of :math:`A_i` is clipped to zero so that the GGN stays PSD."""

    name = "generic"
    is_fisher = False

    def __init__(self, criterion: nn.Module):
        self.criterion = criterion

    def prepare_target(self, y, z):
        return y

    def loss(self, z, y):
        crit = self.criterion
        old = getattr(crit, "reduction", None)
        try:
            if old is not None:
                crit.reduction = "none"
            out = crit(z, y)
        finally:
            if old is not None:
                crit.reduction = old
        return out.reshape(len(z), -1).mean(1)

    def factor(self, z, y=None):
        if y is None:
            raise ValueError(f"the GGN factor of {type(self.criterion).__name__} depends on the "
                             "labels; pass y")
        hess = torch.func.vmap(torch.func.hessian(
            lambda zi, yi: self.loss(zi.unsqueeze(0), yi.unsqueeze(0)).sum()))(z.detach(), y)
        evals, evecs = torch.linalg.eigh(hess)
        return evecs * evals.clamp_min(0).sqrt().unsqueeze(1)

    def sample(self, z, generator=None):
        raise UnsupportedCriterionError(
            f"{type(self.criterion).__name__} has no predictive distribution to sample from; "
            "use the exact Fisher (GGN) instead of a sampled one")


def family_for(criterion: nn.Module | type, *, require_fisher: bool = False) -> LossFamily:
    r"""The :class:`LossFamily` of a criterion (instance or class).

    Parameters
    ----------
    criterion : torch.nn.Module or type
        The loss, e.g. ``nn.CrossEntropyLoss()``.
    require_fisher : bool, default=False
        Raise for criteria outside the family table (the Fisher-based measures need one).

    Returns
    -------
    LossFamily
        Categorical, Bernoulli, Gaussian, Poisson, or GenericGGN (curvature from autograd, no
        Fisher) for any other criterion.

    Raises
    ------
    UnsupportedCriterionError
        With ``require_fisher=True``, for a criterion outside the family table
        (CrossEntropyLoss, NLLLoss, BCEWithLogitsLoss, MSELoss, PoissonNLLLoss(log_input=True)).

    Examples
    --------
    >>> from torch import nn
    >>> from softrank import family_for
    >>> type(family_for(nn.CrossEntropyLoss())).__name__, family_for(nn.L1Loss).is_fisher
    ('Categorical', False)
    """
    crit = criterion() if isinstance(criterion, type) else criterion
    if isinstance(crit, nn.CrossEntropyLoss):
        return Categorical(crit.label_smoothing, crit.weight)
    if isinstance(crit, nn.NLLLoss):
        return Categorical(0.0, crit.weight)
    if isinstance(crit, nn.BCEWithLogitsLoss):
        if crit.weight is not None or crit.pos_weight is not None:
            raise UnsupportedCriterionError(
                "BCEWithLogitsLoss with weight/pos_weight is not a Bernoulli likelihood")
        return Bernoulli()
    if isinstance(crit, nn.MSELoss):
        return Gaussian()
    if isinstance(crit, nn.PoissonNLLLoss):
        if not crit.log_input or crit.full:
            raise UnsupportedCriterionError(
                "PoissonNLLLoss is supported with log_input=True, full=False (z = log-rate)")
        return Poisson()
    if require_fisher:
        raise UnsupportedCriterionError(
            f"criterion {type(crit).__name__} is not in softrank's family table (CrossEntropyLoss, "
            "NLLLoss, BCEWithLogitsLoss, MSELoss, PoissonNLLLoss(log_input=True)); Fisher-based "
            "measures (soft rank, TIC-Fisher, trace ratio, ApproxLOO) need one. Use a supported "
            "criterion, or the Hessian-based measures (HessianNorm, TIC(variant='hessian')).")
    return GenericGGN(crit)
