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

import copy
import math

import torch
from torch import nn
from torch.nn import functional as Fn

__all__ = [
    "LossFamily", "Categorical", "Bernoulli", "Gaussian", "Poisson", "GenericGGN", "family_for",
    "UnsupportedCriterionError", "ANY_CRITERION_MEASURES",
]


def _top_mask(z: torch.Tensor) -> torch.Tensor:
    """(N, K) bool: one True per row, at the (first) largest entry."""
    return torch.arange(z.shape[1], device=z.device) == z.argmax(1, keepdim=True)


def _cross_entropy(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`\log\sum_k e^{z_k} - z_y` per row, accurate when one logit dominates:
    :math:`(m - z_y) + \operatorname{log1p}(\sum_{k\ne a} e^{z_k-m})` with :math:`m = z_a` the
    largest, so a cross-entropy of 1e-12 keeps its digits (``torch.logsumexp`` rounds
    :math:`1 + 10^{-12}`, and adding :math:`m` before subtracting :math:`z_y` rounds to the
    spacing of floats near :math:`z_y`)."""
    top = _top_mask(z)
    m = z.max(1, keepdim=True).values
    rest = torch.where(top, torch.expm1(z - m), torch.exp(z - m)).sum(1)
    return (m - z.gather(1, y.unsqueeze(1))).squeeze(1) + torch.log1p(rest)


def _one_minus_softmax(z: torch.Tensor) -> torch.Tensor:
    r""":math:`1 - \pi_k` per entry, for the largest class as :math:`\sum_{j\ne a}\pi_j`
    (no cancellation when :math:`\pi_a \approx 1`)."""
    top = _top_mask(z)
    e = torch.exp(z - z.max(1, keepdim=True).values)
    total = e.sum(1, keepdim=True)
    return torch.where(top, e.masked_fill(top, 0.0).sum(1, keepdim=True) / total, 1.0 - e / total)


class UnsupportedCriterionError(TypeError):
    """A Fisher-based measure was asked of a criterion outside the family table."""


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
        return _cross_entropy(z, y)

    def residual(self, z, y):
        p = torch.softmax(z, dim=1)
        target = torch.arange(z.shape[1], device=z.device) == y.unsqueeze(1)
        # π_y − 1 = −Σ_{k≠y} π_k: no cancellation when π_y ≈ 1 (confident nets)
        return torch.where(target, -p.masked_fill(target, 0.0).sum(1, keepdim=True), p)

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
        B0 = -p.unsqueeze(2) * s.unsqueeze(1)
        B0.diagonal(dim1=1, dim2=2).copy_(s * _one_minus_softmax(z))  # √π_k(1 − π_k)
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
        # σ(z) − y = (1 − y)σ(z) − yσ(−z): no cancellation when σ(z) ≈ y
        return ((1 - y) * torch.sigmoid(z) - y * torch.sigmoid(-z)) / z.shape[1]

    def factor(self, z, y=None):
        return torch.diag_embed((torch.sigmoid(z) * torch.sigmoid(-z) / z.shape[1]).sqrt())

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
    r"""PoissonNLLLoss(log_input=True) on log-rates: :math:`\ell = e^z - yz` (``full=True``
    adds Stirling's approximation of :math:`\log y!`, constant in z),
    :math:`A = \mathrm{diag}(e^z)`, :math:`r = e^z - y`."""

    name = "poisson"

    def __init__(self, full: bool = False):
        self.full = bool(full)

    def prepare_target(self, y, z):
        return y.reshape(z.shape).to(z.dtype)

    def check_target(self, y, z):
        if y.numel() != z.numel():
            raise ValueError(f"PoissonNLLLoss: got {y.numel()} targets for {z.numel()} outputs")
        if y.numel() and float(y.min()) < 0:
            raise ValueError("PoissonNLLLoss needs non-negative count targets")

    def loss(self, z, y):
        if self.full:
            return Fn.poisson_nll_loss(z, y, log_input=True, full=True, reduction="none").mean(1)
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
    Negative curvature of :math:`A_i` is clipped to zero so that the GGN stays PSD.

    Parameters
    ----------
    criterion : nn.Module
        The loss as trained (options such as ``label_smoothing``, class ``weight`` or
        ``pos_weight`` included); evaluated with ``reduction='none'`` in the dtype of z.
    targets : LossFamily, optional
        The family whose label handling (``prepare_target``, ``check_target``) applies, e.g.
        :class:`Categorical` for a ``CrossEntropyLoss`` with label smoothing.
    reason : str, optional
        Why the criterion is outside the family table (used in error messages).
    """

    name = "generic"
    is_fisher = False

    def __init__(self, criterion: nn.Module, targets: LossFamily | None = None,
                 reason: str | None = None):
        self.criterion = criterion
        self.targets = targets
        self.reason = reason or (f"criterion {type(criterion).__name__} is not in the family "
                                 "table")
        # copies made here, not on first use: one made inside a torch.func transform (the
        # factor's vmap(hessian)) would carry that transform's tensors out of it
        self._by_dtype = {dt: self._copy(dt) for dt in (torch.float32, torch.float64)}

    def prepare_target(self, y, z):
        return y if self.targets is None else self.targets.prepare_target(y, z)

    def check_target(self, y, z):
        if self.targets is not None:
            self.targets.check_target(y, z)

    def _copy(self, dtype):
        """A private copy with reduction='none' and its buffers (weights) in ``dtype``."""
        crit = copy.deepcopy(self.criterion)
        if hasattr(crit, "reduction"):
            crit.reduction = "none"
        return crit.to(dtype)

    def _criterion(self, dtype):
        if dtype not in self._by_dtype:
            self._by_dtype[dtype] = self._copy(dtype)
        return self._by_dtype[dtype]

    def loss(self, z, y):
        if y.is_floating_point():
            y = y.to(z.dtype)
        out = self._criterion(z.dtype)(z, y)
        return out.reshape(len(z), -1).mean(1)

    def factor(self, z, y=None):
        if y is None:
            raise ValueError(f"the GGN factor of {type(self.criterion).__name__} depends on the "
                             "labels; pass y")
        hess = torch.func.vmap(torch.func.hessian(
            lambda zi, yi: self.loss(zi.unsqueeze(0), yi.unsqueeze(0)).sum()))(z.detach(), y)
        bad = ~torch.isfinite(hess).flatten(1).all(1)
        if bool(bad.any()):
            raise ValueError(
                f"the second derivative of {type(self.criterion).__name__} in the network "
                f"outputs is NaN or inf for {int(bad.sum())} of {len(z)} samples (first: "
                f"{int(bad.nonzero()[0, 0])} of the batch): the criterion is not twice "
                "differentiable there, so its GGN is undefined")
        evals, evecs = torch.linalg.eigh(hess)
        return evecs * evals.clamp_min(0).sqrt().unsqueeze(1)

    def sample(self, z, generator=None):
        raise UnsupportedCriterionError(
            f"{type(self.criterion).__name__} has no predictive distribution to sample from "
            f"({self.reason}); use the exact Fisher (GGN) instead of a sampled one")

    def __repr__(self) -> str:
        return f"GenericGGN({self.criterion!r})"


#: the measures that work for any twice-differentiable criterion, named in refusals
ANY_CRITERION_MEASURES = ("HessianNorm, TIC(variant='hessian') and ApproxLOO (and the GGN "
                          "curvature itself: softrank.curvature(md, 'fisher', ...))")


def _outside_table(crit: nn.Module) -> str | None:
    """Why a criterion of a table class is not that family's likelihood (None if it is)."""
    opts = []
    if getattr(crit, "label_smoothing", 0.0):
        opts.append(f"label_smoothing={crit.label_smoothing}")
    if getattr(crit, "weight", None) is not None:
        opts.append("weight=... (class or element weights)")
    if getattr(crit, "pos_weight", None) is not None:
        opts.append("pos_weight=...")
    if isinstance(crit, nn.PoissonNLLLoss) and not crit.log_input:
        opts.append("log_input=False")
    if not opts:
        return None
    return f"{type(crit).__name__}({', '.join(opts)}) is not an exponential-family likelihood"


def family_for(criterion: nn.Module | type, *, require_fisher: bool = False) -> LossFamily:
    r"""The :class:`LossFamily` of a criterion (instance or class).

    Criteria of the family table with their plain likelihood get their family; every other
    criterion — other classes, and table classes with options that change the likelihood
    (``label_smoothing``, class ``weight``, ``pos_weight``, ``PoissonNLLLoss(log_input=False)``)
    — gets :class:`GenericGGN`. ``require_fisher=True`` raises
    :class:`UnsupportedCriterionError` for those instead, naming the measures that still work.
    ``ignore_index`` is handled by :class:`~softrank.model.ModelData` (ignored samples are
    dropped) and ``reduction`` does not change the per-sample loss.

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
    table = {nn.CrossEntropyLoss: Categorical, nn.NLLLoss: Categorical,
             nn.BCEWithLogitsLoss: Bernoulli, nn.MSELoss: Gaussian, nn.PoissonNLLLoss: Poisson}
    kind = next((fam for cls, fam in table.items() if isinstance(crit, cls)), None)
    reason = None if kind is None else _outside_table(crit)
    if kind is Poisson and reason is None:
        return Poisson(full=crit.full)
    if kind is not None and reason is None:
        return kind()
    if reason is None:
        reason = (f"criterion {type(crit).__name__} is not in softrank's family table "
                  "(CrossEntropyLoss, NLLLoss, BCEWithLogitsLoss, MSELoss, "
                  "PoissonNLLLoss(log_input=True))")
    if require_fisher:
        raise UnsupportedCriterionError(
            f"{reason}, and the Fisher-based measures (SoftRankFIM, TraceRatio, "
            "TIC(variant='fisher'), the sampled Fisher) need a likelihood of that table. "
            f"Measures that work for any twice-differentiable criterion: {ANY_CRITERION_MEASURES}"
            "; or train with the plain criterion.")
    targets = kind() if kind is not None else None
    return GenericGGN(crit, targets, reason)
