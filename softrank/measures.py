r"""Measures as plain functions of a :class:`~softrank.model.ModelData`.

Each returns a frozen :class:`MeasureResult` — the value, the generalization-gap estimate in
loss units where the measure defines one, n, λ, the approximation and diagnostics.

=================  ======================================  =====================================
measure            value                                   gap estimate
=================  ======================================  =====================================
soft rank of F     :math:`\mathrm{rank}_\Lambda(F)`        :math:`\alpha\,\mathrm{rank}_\Lambda(F)/n`,
                                                           :math:`\alpha = \mathrm{Tr}\,C/\mathrm{Tr}\,F`
                                                           (calibrated: :math:`\mathrm{rank}/n`)
TIC (Fisher)       :math:`\mathrm{Tr}\,C(F+\Lambda)^{-1}`  value / n
TIC (Hessian)      :math:`\mathrm{Tr}\,C(H+\Lambda)^{-1}`  value / n
trace ratio        :math:`\mathrm{Tr}\,C/\mathrm{Tr}\,F`   value / n  (Thomas et al., 2020)
Hessian norms      Tr H, ‖H‖₂, λ_max(H), ‖H‖_F            — (baselines)
log-det dimension  :math:`\sum_j\log(1+\sigma_j/\lambda)`  —
=================  ======================================  =====================================

Curvature matrices are of the mean loss over the m samples measured on; n is the number of
samples the model was **trained** on (``ModelData.n_train``).

Every measure takes ``memory_budget`` (bytes or a string such as ``"2GB"``; None: no check) and
passes it to each :func:`~softrank.curvature.curvature` it builds, which refuses with a
:class:`MemoryError` before any data pass when :mod:`softrank.memory` estimates more.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from .curvature import Curvature, DenseCurvature, curvature
from .curvature.dense import DEFAULT_MAX_PARAMS

__all__ = ["MeasureResult", "soft_rank", "soft_rank_gap", "tic", "trace_ratio",
           "calibration_ratio", "hessian_norms", "effective_dimension", "IndefiniteWarning",
           "DegenerateCurvatureWarning", "HESSIAN_ORDS"]


class IndefiniteWarning(RuntimeWarning):
    """H + Λ is not positive definite: the Hessian TIC is not a valid penalty there."""


@dataclass(frozen=True)
class MeasureResult:
    """What a measure returns: ``value``; ``gap``, the generalization-gap estimate in loss
    units (None for the baselines); ``n``, the number of samples the model was trained on;
    ``lam`` (Λ as described by :meth:`~softrank.regularization.Lam.describe`);
    ``approximation``; ``diagnostics`` (e.g. ``alpha``, ``trace_C``, ``trace_F``,
    ``calibrated_gap``, and ``stderr``, ``n_matvec``, ``converged`` for stochastic estimates).
    ``float(result)`` is ``value``."""

    name: str
    value: float
    gap: float | None
    n: int
    lam: object
    approximation: str
    diagnostics: dict = field(default_factory=dict)

    def __float__(self):
        return float(self.value)


def _lam_repr(L):
    return L.describe()


class DegenerateCurvatureWarning(RuntimeWarning):
    """Tr C or Tr F is exactly zero, so the trace ratio α = Tr C / Tr F is set by convention."""


def traces(md, *, memory_budget=None) -> tuple[float, float]:
    """Exact (Tr C, Tr F) from the diagonals (one pass each)."""
    tr_c = curvature(md, "gsm", "diagonal", memory_budget=memory_budget).trace()
    tr_f = curvature(md, "fisher", "diagonal", memory_budget=memory_budget).trace()
    return tr_c, tr_f


def calibration_ratio(tr_c: float, tr_f: float) -> float:
    r""":math:`\alpha = \mathrm{Tr}\,C/\mathrm{Tr}\,F`, defined where a trace vanishes.

    A net that fits every training label with saturated outputs (training loss 0 in floating
    point) has C = 0: no gradient, so every C-based estimate (α, the soft-rank gap, TIC) is 0,
    and α = 0 is returned, also when F = 0 too. Tr F = 0 with Tr C > 0 (saturated outputs on
    wrong labels) gives α = inf. Both warn (:class:`DegenerateCurvatureWarning`): on such nets
    the C-based estimates collapse, and :func:`softrank.loo.approx_loo` (``ApproxLOO``) is the
    estimate that keeps working.
    """
    if tr_f > 0 and tr_c > 0:
        return tr_c / tr_f
    alpha = 0.0 if tr_c == 0 else float("inf")
    warnings.warn(
        f"Tr C = {tr_c:.3g} and Tr F = {tr_f:.3g}: the network's outputs are saturated on the "
        f"data (training loss 0 in floating point), so α = Tr C / Tr F is set to {alpha} and "
        "the C-based gap estimates (soft-rank gap, TIC, trace ratio) are "
        f"{'0' if alpha == 0 else 'infinite'}; on such interpolating nets use ApproxLOO",
        DegenerateCurvatureWarning, stacklevel=3)
    return alpha


def soft_rank(md, lam, approximation: str = "exact", matrix: str = "fisher", *,
              F: Curvature | None = None, memory_budget=None, **kw) -> MeasureResult:
    r"""Soft rank :math:`\mathrm{Tr}\,M(M+\Lambda)^{-1} = \sum_j \sigma_j/(\sigma_j+\lambda)`.

    For ``matrix='fisher'`` with labels, the gap estimate is
    :math:`\alpha\cdot\mathrm{rank}_\Lambda(F)/n` with :math:`\alpha=\mathrm{Tr}\,C/\mathrm{Tr}\,F`
    (exact traces); ``diagnostics['calibrated_gap']`` is :math:`\mathrm{rank}_\Lambda(F)/n`.
    For the Hessian, eigenvalues below zero are allowed and each contributes
    :math:`\sigma/(\sigma+\lambda)`, which is negative for :math:`-\lambda<\sigma<0`.
    """
    M = F if F is not None else curvature(md, matrix, approximation,
                                          memory_budget=memory_budget, **kw)
    L = M.lam(lam)
    value = M.soft_rank(L)
    diag = {"matrix": matrix, "n_curvature_samples": md.n}
    _add_error_bar(diag, M)
    gap = None
    if matrix == "fisher":
        diag["calibrated_gap"] = value / md.n_train
        if md.y is not None and md.family.is_fisher:
            tr_c, tr_f = traces(md, memory_budget=memory_budget)
            alpha = calibration_ratio(tr_c, tr_f)
            diag.update(trace_C=tr_c, trace_F=tr_f, alpha=alpha)
            gap = alpha * value / md.n_train if alpha < float("inf") else alpha
    return MeasureResult("soft_rank", value, gap, md.n_train, _lam_repr(L), M.approximation, diag)


def soft_rank_gap(md, lam, approximation: str = "exact", **kw) -> MeasureResult:
    r"""The soft-rank gap estimate :math:`\alpha\,\mathrm{rank}_\Lambda(F)/n`; same as
    :func:`soft_rank` on F, labels required."""
    md.require_labels("the soft-rank gap estimate")
    md.require_fisher("the soft-rank gap estimate")
    return soft_rank(md, lam, approximation, "fisher", **kw)


def tic(md, lam, approximation: str = "exact", variant: str = "fisher", *,
        centered: bool = False, max_params: int = DEFAULT_MAX_PARAMS, memory_budget=None,
        **kw) -> MeasureResult:
    r"""Regularized TIC :math:`\mathrm{Tr}\,C(M+\Lambda)^{-1}`, M = F (``variant='fisher'``) or
    H (``'hessian'``); gap estimate value / n. ``centered`` uses :math:`C-\bar g\bar g^\top`."""
    md.require_labels("the TIC")
    if variant not in ("fisher", "hessian"):
        raise ValueError(f"variant must be 'fisher' or 'hessian'; got {variant!r}")
    matrix = "fisher" if variant == "fisher" else "hessian"
    if variant == "hessian" and approximation not in ("exact", "dense", "matrix_free"):
        raise ValueError("TIC(variant='hessian') needs the Hessian: approximation='dense' "
                         f"(small p) or 'matrix_free'; got approximation={approximation!r}")
    dense = approximation == "dense" or (approximation == "exact" and (
        md.n_params <= max_params or matrix == "hessian"))
    if memory_budget is not None and dense:  # C (dense too) is checked before M is computed
        from .memory import check_memory
        check_memory(md, "dense", "gsm", memory_budget, max_params=max_params)
    M = curvature(md, matrix, approximation, max_params=max_params, memory_budget=memory_budget,
                  **kw)
    L = M.lam(lam)
    diag = {"variant": variant, "centered": centered}
    if variant == "hessian" and not M.is_positive_definite_with(L):
        warnings.warn("H + Λ is not positive definite at these parameters; the Hessian TIC "
                      "is unreliable (use variant='fisher')", IndefiniteWarning, stacklevel=2)
        diag["indefinite"] = True
    if isinstance(M, DenseCurvature):
        C = curvature(md, "gsm", "dense", centered=centered, max_params=max_params,
                      memory_budget=memory_budget)
        value = float(torch.linalg.solve(M.M + torch.diag(L.vector), C.M).trace())
    else:
        value = M.tic_sum(md.rules, md.batches("residual"), L) / md.n
        _add_error_bar(diag, M, 1.0 / md.n)
        if centered:  # Tr (C − ḡḡᵀ)(M+Λ)⁻¹ = Tr C(M+Λ)⁻¹ − ḡᵀ(M+Λ)⁻¹ḡ
            g = _gradient_mean(md)
            value -= float(g @ M.solve(g, L))
    return MeasureResult("tic", value, value / md.n_train, md.n_train, _lam_repr(L),
                         M.approximation, diag)


def _gradient_mean(md) -> torch.Tensor:
    sums = [0.0] * len(md.rules)
    for b in md.batches("residual"):
        for k, (r, lb) in enumerate(zip(md.rules, b.layers)):
            sums[k] = sums[k] + r.grad_sum(lb).cpu()
    return torch.cat(sums) / md.n


def _add_error_bar(diag: dict, M, scale: float = 1.0) -> None:
    """stderr (scaled like the value), n_matvec and converged of a stochastic estimate."""
    est = getattr(M, "last_estimate", None)
    if est is not None:
        diag.update(stderr=est.stderr * scale, n_matvec=est.n_matvec, converged=est.converged)


def trace_ratio(md, *, memory_budget=None) -> MeasureResult:
    r""":math:`\alpha = \mathrm{Tr}\,C/\mathrm{Tr}\,F` (exact traces); gap estimate α/n.
    α > 1: over-confident, α < 1: under-confident, α = 1 when calibrated."""
    md.require_labels("the trace ratio")
    md.require_fisher("the trace ratio")
    tr_c, tr_f = traces(md, memory_budget=memory_budget)
    value = calibration_ratio(tr_c, tr_f)
    return MeasureResult("trace_ratio", value, value / md.n_train, md.n_train, None, "exact",
                         {"trace_C": tr_c, "trace_F": tr_f})


HESSIAN_ORDS = ("trace", "spectral", "max_eigenvalue", "frobenius")


def hessian_norms(md, ord: str = "trace", *, max_params: int = DEFAULT_MAX_PARAMS,
                  approximation: str = "dense", **kw) -> MeasureResult:
    r"""Hessian baselines of the mean training loss:

    ====================  ===============================================================
    ``ord``               value
    ====================  ===============================================================
    ``'trace'``           :math:`\mathrm{Tr}\,H = \sum_j\sigma_j`
    ``'spectral'``        the spectral norm :math:`\|H\|_2 = \max_j|\sigma_j|`
    ``'max_eigenvalue'``  the largest eigenvalue :math:`\sigma_{\max}(H)` (differs from
                          :math:`\|H\|_2` when H is indefinite with
                          :math:`|\sigma_{\min}| > \sigma_{\max}`, away from a minimum)
    ``'frobenius'``       :math:`\|H\|_F = (\sum_j\sigma_j^2)^{1/2}`
    ====================  ===============================================================

    Dense (small p), or ``approximation='matrix_free'`` (Hutch++ for the trace and for
    :math:`\mathrm{Tr}\,H^2`; Lanczos, which resolves both ends of the spectrum, for the
    other two; ``kw``: n_probes, lanczos_steps, random_state, ...) with
    ``diagnostics['stderr']``. Baselines: no gap estimate.
    """
    if ord not in HESSIAN_ORDS:
        raise ValueError(f"ord must be one of {HESSIAN_ORDS}; got {ord!r}")
    if approximation == "exact":
        approximation = "dense"
    H = curvature(md, "hessian", approximation, max_params=max_params, **kw)
    largest = getattr(H, "largest_eigenvalue", lambda: float(H.eigvals().max()))
    value = {"trace": H.trace, "spectral": H.spectral_norm, "max_eigenvalue": largest,
             "frobenius": H.frobenius_norm}[ord]()
    diag = {"ord": ord}
    _add_error_bar(diag, H)
    return MeasureResult(f"hessian_{ord}", float(value), None, md.n_train, None,
                         H.approximation, diag)


def effective_dimension(md, lam, approximation: str = "exact", matrix: str = "fisher",
                        **kw) -> MeasureResult:
    r"""Log-det effective dimension :math:`\sum_j \log(1+\sigma_j/\lambda)` (a concave
    trace function of the spectrum)."""
    M = curvature(md, matrix, approximation, **kw)
    L = M.lam(lam)
    value = M.logdet_dim(L)
    diag = {"matrix": matrix}
    _add_error_bar(diag, M)
    return MeasureResult("effective_dimension", value, None, md.n_train,
                         _lam_repr(L), M.approximation, diag)
