r"""Per-sample contributions to the measures: which training samples the estimates rest on.

For a curvature :math:`F` (the Fisher of the training data) and per-sample vectors
:math:`s_{ic}`, every score here is a sum of quadratic forms
:math:`\sum_c s_{ic}^\top(F+\Lambda)^{-1}s_{ic}`:

* **leverage** (no labels): :math:`s_{ic} = J_i^\top b_{ic}` (columns of :math:`B_i`),
  :math:`\mathrm{lev}_i = \mathrm{Tr}\,F_i(F+\Lambda)^{-1}/m`, which sum over the m samples of F to
  :math:`\mathrm{rank}_\Lambda(F)`;
* **TIC contribution** (labels): :math:`s_i = g_i = \nabla_\theta\ell_i`,
  :math:`t_i = g_i^\top(F+\Lambda)^{-1}g_i/m`, which sum to the TIC
  :math:`\mathrm{Tr}\,C(F+\Lambda)^{-1}`. With F of all n training samples, :math:`t_i` is, to
  first order, how much sample i's loss rises when it is left out
  (:math:`r_i^\top P_i r_i`): large for samples the net cannot explain from the
  others — mislabelled ones.

The quadratic forms come from the representation: Woodbury rows against the Gram kernel
(``gram``), the Kronecker eigenbasis (``kfac``, ``ekfac``), or solves (``dense``, ``diagonal``).
:func:`rank_samples` ranks the training samples of a fitted skorch net by any of these scores
(or by the leave-one-out loss increase of :func:`softrank.loo.approx_loo`, or the plain loss).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import skorch_adapter as sk
from .curvature import DenseCurvature, GramCurvature, KroneckerCurvature, curvature
from .loo import approx_loo

__all__ = ["quadratic_rows", "per_sample_quadratic", "fisher_leverage", "leverage_scores",
           "tic_contributions", "rank_samples", "SampleRanking", "precision_at_k", "SCORES"]

SCORES = ("tic", "leverage", "loo", "loss")


# -- quadratic forms s^T (F + Λ)^-1 s --------------------------------------------------------
def _gram_rows(F: GramCurvature, layers, L) -> torch.Tensor:
    r"""Rows :math:`s^\top(F+\Lambda)^{-1}s` by Woodbury against the Gram of F:
    :math:`s^\top\Lambda^{-1}s - k^\top(I+\tilde K)^{-1}k`, :math:`k = S\Lambda^{-1}s/\sqrt n`."""
    w = tuple(1.0 / v for v in L.tensor_values("approximation='gram'"))
    own = F.cross_kernel([layers], [layers], w).diagonal()
    cross = F.cross_kernel([layers], F.feats, w) / F.md.n ** 0.5
    sol = torch.cholesky_solve(cross.T.contiguous(), F._cholesky(L))
    return own - (cross * sol.T).sum(1)


def _solver(F, L):
    """v -> (F + Λ)⁻¹ v; a dense F is factored once, not once per batch."""
    if isinstance(F, DenseCurvature):
        chol = torch.linalg.cholesky(F.M + torch.diag(L.vector))
        return lambda v: torch.cholesky_solve(v.to(torch.float64), chol)
    return lambda v: F.solve(v, L)


def quadratic_rows(F, rules, layers, L, solve=None) -> torch.Tensor:
    r"""(N, V) :math:`s_{ic}^\top(F+\Lambda)^{-1}s_{ic}` for the per-sample vectors recorded in
    one batch's ``layers`` (V vectors per sample), with the representation's own solver."""
    N, V = layers[0].g.shape[1], layers[0].g.shape[0]
    if isinstance(F, GramCurvature):
        return _gram_rows(F, layers, L).reshape(N, V)
    if isinstance(F, KroneckerCurvature):
        return F.output_blocks(layers, L).diagonal(dim1=1, dim2=2).cpu()
    G = torch.cat([r.per_sample_grads(lb) for r, lb in zip(rules, layers)], -1)
    rows = G.transpose(0, 1).reshape(N * V, -1).cpu()  # sample-major rows (i, c)
    solve = solve or _solver(F, L)
    return (rows * solve(rows.T).T).sum(1).reshape(N, V)


def per_sample_quadratic(F, md, L, vectors: str = "fisher") -> torch.Tensor:
    r"""(N,) :math:`\sum_c s_{ic}^\top(F+\Lambda)^{-1}s_{ic}` for the samples of ``md``:
    ``vectors='fisher'``: :math:`\mathrm{Tr}\,F_i(F+\Lambda)^{-1}`; ``'residual'``:
    :math:`g_i^\top(F+\Lambda)^{-1}g_i` (labels needed)."""
    solve = _solver(F, L)
    return torch.cat([quadratic_rows(F, md.rules, b.layers, L, solve).sum(1).cpu()
                      for b in md.batches(vectors)])


def fisher_leverage(F, md, L) -> torch.Tensor:
    r"""(N,) :math:`\mathrm{Tr}\,F_i(F+\Lambda)^{-1} = \sum_c s_{ic}^\top(F+\Lambda)^{-1}s_{ic}`
    for the samples of ``md``, :math:`s_{ic} = J_i^\top b_{ic}` (columns of :math:`B_i`)."""
    return per_sample_quadratic(F, md, L, "fisher")


def _fisher(md, approximation, F, random_state):
    return F if F is not None else curvature(md, "fisher", approximation,
                                             random_state=random_state)


def leverage_scores(md, lam, approximation: str = "exact", *, F=None,
                    random_state=None) -> torch.Tensor:
    r"""Per-sample leverage :math:`\mathrm{Tr}\,F_i(F+\Lambda)^{-1}/m` of the m samples of ``md``.

    F is the Fisher of ``md`` (or the given ``F``, for example of other data). With F of ``md``
    and an exact representation the scores sum to :math:`\mathrm{rank}_\Lambda(F)`. No labels
    needed.

    Parameters
    ----------
    md : ModelData
        The network and the samples to score.
    lam : float, dict or torch.Tensor
        Λ, the weight decay of the objective.
    approximation : str, default='exact'
        Representation of F (see :func:`softrank.curvature`).
    F : Curvature or None, default=None
        A Fisher built already (skips building it).
    random_state : int or None, default=None
        Seeds a stochastic representation.

    Returns
    -------
    torch.Tensor of shape (m,), float64
        The scores (parameter directions per sample).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from softrank import ModelData
    >>> _ = torch.manual_seed(0)
    >>> X, y = torch.randn(100, 5), torch.randint(0, 3, (100,))
    >>> md = ModelData(nn.Linear(5, 3), nn.CrossEntropyLoss(), X, y)
    >>> from softrank import curvature, leverage_scores
    >>> scores = leverage_scores(md, 1e-2, "dense")
    >>> bool(abs(scores.sum() - curvature(md, "fisher", "dense").soft_rank(1e-2)) < 1e-5)
    True
    """
    F = _fisher(md, approximation, F, random_state)
    return fisher_leverage(F, md, F.lam(lam)) / md.n


def tic_contributions(md, lam, approximation: str = "exact", *, F=None,
                      random_state=None) -> torch.Tensor:
    r"""Per-sample TIC terms :math:`g_i^\top(F+\Lambda)^{-1}g_i/m`, :math:`g_i=\nabla_\theta\ell_i` at the true labels.

    With F of ``md`` they sum to the TIC :math:`\mathrm{Tr}\,C(F+\Lambda)^{-1}`; to first
    order, each is how much the sample's own loss rises when it is left out.

    Parameters
    ----------
    md : ModelData
        The network and the labelled samples to score.
    lam : float, dict or torch.Tensor
        Λ, the weight decay of the objective.
    approximation : str, default='exact'
        Representation of F.
    F : Curvature or None, default=None
        A Fisher built already.
    random_state : int or None, default=None
        Seeds a stochastic representation.

    Returns
    -------
    torch.Tensor of shape (m,), float64
        The scores (loss units times n).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from softrank import ModelData
    >>> _ = torch.manual_seed(0)
    >>> X, y = torch.randn(100, 5), torch.randint(0, 3, (100,))
    >>> md = ModelData(nn.Linear(5, 3), nn.CrossEntropyLoss(), X, y)
    >>> from softrank import tic_contributions
    >>> tic_contributions(md, 1e-2, "dense").shape
    torch.Size([100])
    """
    md.require_labels("the per-sample TIC contributions")
    F = _fisher(md, approximation, F, random_state)
    return per_sample_quadratic(F, md, F.lam(lam), "residual") / md.n


# -- ranking the training samples of a fitted net ----------------------------------------------
@dataclass(frozen=True)
class SampleRanking:
    """Per-sample scores (in the order of X): each sample's contribution to the measure, so
    ``total`` = Σ scores is the measure (soft rank, TIC, LOO gap, mean loss); ``order``: the
    indices by decreasing score."""

    scores: np.ndarray
    order: np.ndarray
    score: str
    total: float
    lam: object
    approximation: str

    def top(self, k: int) -> np.ndarray:
        """Indices of the k highest-scoring samples."""
        return self.order[:k]

    def precision_at(self, flagged, k: int | None = None) -> float:
        """Fraction of the top k that are ``flagged`` (a boolean mask or indices); k defaults
        to the number flagged."""
        return precision_at_k(self.scores, flagged, k)


def precision_at_k(scores, flagged, k: int | None = None) -> float:
    """Fraction of the k highest ``scores`` whose index is in ``flagged`` (mask or indices);
    k defaults to the number flagged (then precision = recall)."""
    scores = np.asarray(scores)
    mask = np.zeros(len(scores), bool)
    flagged = np.asarray(flagged)
    mask[np.flatnonzero(flagged) if flagged.dtype == bool else flagged] = True
    k = int(mask.sum()) if k is None else int(k)
    if not 1 <= k <= len(scores):
        raise ValueError(f"k must be in 1..{len(scores)}; got {k}")
    top = np.argsort(-scores, kind="stable")[:k]
    return float(mask[top].mean())


def _contributions(md, score, lam, approximation, random_state) -> torch.Tensor:
    """(m,) per-sample contributions, summing to the measure (rank, TIC, mean loss, LOO gap)."""
    if score == "leverage":
        return leverage_scores(md, lam, approximation, random_state=random_state)
    if score == "tic":
        return tic_contributions(md, lam, approximation, random_state=random_state)
    if score == "loss":
        return sk.per_sample_loss(md) / md.n
    method = {"exact": "exact", "gram": "exact", "kfac": "kfac"}.get(approximation)
    if method is None:
        raise ValueError("score='loo' uses ApproxLOO: approximation must be 'exact' (or "
                         f"'gram') or 'kfac'; got {approximation!r}")
    res = approx_loo(md, lam, method, random_state=random_state)
    return torch.as_tensor(res.loo_losses - res.point_losses) / md.n


def rank_samples(estimator, X, y=None, *, score: str = "tic", lam="auto",
                 approximation: str = "kfac", params=None, batch_size: int = 256,
                 device=None, random_state=None) -> SampleRanking:
    r"""Rank the training samples by their contribution to a measure of a fitted net.

    The scores are divided by the number of samples m, so that they sum to the measure:

    * ``'tic'`` — :math:`g_i^\top(F+\Lambda)^{-1}g_i/m` (labels; sum: the TIC): samples the
      rest of the data does not explain — mislabelled ones;
    * ``'leverage'`` — :math:`\mathrm{Tr}\,F_i(F+\Lambda)^{-1}/m` (no labels; sum: the soft
      rank): samples that pin down their own directions of parameter space (atypical inputs);
    * ``'loo'`` — :math:`(\ell(y_i, z_i^{(-i)}) - \ell_i)/m`, the approximate leave-one-out
      loss increase (``approximation`` 'exact' or 'kfac'; sum: the leave-one-out gap);
    * ``'loss'`` — :math:`\ell_i/m` (a baseline; sum: the training loss).

    Parameters
    ----------
    estimator : skorch net or Pipeline ending in one
        Fitted; it is not changed.
    X : array-like of shape (m, ...)
        The training data.
    y : array-like of shape (m,) or None, default=None
        Targets (needed except for ``score='leverage'``).
    score : {'tic', 'leverage', 'loo', 'loss'}, default='tic'
        Which contribution.
    lam : 'auto', float, dict or torch.Tensor, default='auto'
        Λ; 'auto' reads the optimizer's weight decay.
    approximation : str, default='kfac'
        Representation of F ('exact' is the dense or Gram Fisher).
    params : None, list of str or callable, default=None
        Which parameters count.
    batch_size : int, default=256
        Samples per batch.
    device : str, torch.device or None, default=None
        Where to compute.
    random_state : int or None, default=None
        Seeds stochastic parts.

    Returns
    -------
    SampleRanking
        ``scores`` (m,) in the order of X, ``order`` (indices by decreasing score), ``total``
        (the measure), ``top(k)``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skorch import NeuralNetClassifier
    >>> from softrank.datasets import load_digits_split
    >>> data = load_digits_split()
    >>> X, y = data.X_train[:200], data.y_train[:200]
    >>> _ = torch.manual_seed(0)
    >>> net = NeuralNetClassifier(
    ...     nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)),
    ...     criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam, lr=0.01,
    ...     optimizer__weight_decay=1e-3, max_epochs=20, train_split=None, verbose=0)
    >>> from softrank import rank_samples
    >>> _ = net.fit(X, y)
    >>> ranking = rank_samples(net, X, y, score="tic")
    >>> ranking.top(3).shape, bool(ranking.scores[ranking.order[0]] >= ranking.scores.max())
    ((3,), True)
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}; got {score!r}")
    if score != "leverage" and y is None:
        raise ValueError(f"score={score!r} needs the labels y; score='leverage' needs none")
    md, net = sk.model_data(estimator, X, y, params=params, batch_size=batch_size, device=device)
    if lam == "auto":
        lam = sk.weight_decay_lam(net, md.param_names, md)
    s = _contributions(md, score, lam, approximation, random_state).double().numpy()
    return SampleRanking(scores=s, order=np.argsort(-s, kind="stable"), score=score,
                         total=float(s.sum()), lam=lam, approximation=approximation)
