r"""Exact dense matrices from whole-model ``torch.func`` transforms (small p only).

Per batch: per-sample Jacobians :math:`J_i` (``vmap(jacrev)``), then

* :math:`F = \frac1n\sum_i J_i^\top B_i B_i^\top J_i`, :math:`F_{MC}` with sampled residuals,
* :math:`C = \frac1n\sum_i g_i g_i^\top`, :math:`g_i = J_i^\top r_i` (optionally centered),
* :math:`H = \nabla^2_\theta \frac1n\sum_i\ell_i` (``torch.func.hessian``).

This path does not use the layer rules, so it also covers weight sharing and any layer type.
Where torch.func cannot batch a module over samples (``nn.LSTM`` in float64) or has no
forward-mode rule for it, the Jacobians and the Hessian fall back to reverse mode, one sample
(one Hessian row) at a time.
"""
from __future__ import annotations

import torch

from .base import DenseCurvature

__all__ = ["dense_curvature", "per_sample_jacobians", "DEFAULT_MAX_PARAMS"]

DEFAULT_MAX_PARAMS = 5000


def _check_size(md, max_params, matrix="fisher"):
    if md.n_params > max_params:
        other = ("approximation='matrix_free' (Hessian-vector products; the other "
                 "representations are of F and C and have no Hessian)" if matrix == "hessian"
                 else "approximation='gram' (exact, for moderate n·K), 'kfac', 'ekfac', "
                 "'diagonal' or 'matrix_free'")
        raise MemoryError(
            f"approximation='dense' builds a {md.n_params}x{md.n_params} matrix; that is above "
            f"max_params={max_params}. Use {other}, or count fewer parameters with params.")


def per_sample_jacobians(md, xb) -> torch.Tensor:
    """(N, K, p) Jacobians of the outputs z_i with respect to the selected parameters
    (:meth:`softrank.model.ModelData.jacobians`)."""
    return md.jacobians(xb)


def _batch_hessian(loss, theta, xb, yb) -> torch.Tensor:
    """Hessian of ``loss(θ, xb, yb)``: forward-over-reverse (``torch.func.hessian``), or
    reverse-over-reverse, one row per backward pass, for modules without forward-mode AD
    (``nn.LSTM``)."""
    try:
        return torch.func.hessian(loss)(theta, xb, yb)
    except (RuntimeError, NotImplementedError):
        return torch.autograd.functional.hessian(lambda th: loss(th, xb, yb), theta)


def dense_curvature(md, matrix: str, *, generator=None, mc_samples: int = 1,
                    centered: bool = False, max_params: int = DEFAULT_MAX_PARAMS
                    ) -> DenseCurvature:
    """Exact dense ``matrix`` in {'fisher', 'fisher_mc', 'gsm', 'hessian'} of ``md``."""
    _check_size(md, max_params, matrix)
    p = md.n_params
    M = torch.zeros(p, p, dtype=torch.float64, device=md.device)
    gbar = torch.zeros(p, dtype=torch.float64, device=md.device)
    fam = md.family
    if matrix == "hessian":
        md.require_labels("the Hessian")
        _, loss = md.functional_loss()
        theta = md.flat_params()
        for start in range(0, md.n, md.batch_size):
            xb = md.X[start:start + md.batch_size].to(md.device)
            yb = md.y[start:start + md.batch_size].to(md.device)
            M += _batch_hessian(loss, theta, xb, yb).double()
    else:
        if matrix == "gsm":
            md.require_labels("the gradient second moment C")
        for b in md.batches(None):
            xb = md.X[b.index].to(md.device)
            J = per_sample_jacobians(md, xb).double()
            z, y = b.z, b.y
            if matrix == "fisher":
                V = fam.factor(z, y)  # (N, K, K')
            elif matrix == "gsm":
                V = fam.residual(z, y).unsqueeze(2)
            elif matrix == "fisher_mc":
                V = torch.stack([fam.sampled_residual(z, generator)
                                 for _ in range(mc_samples)], 2) / mc_samples ** 0.5
            else:
                raise ValueError(f"unknown matrix {matrix!r}")
            S = torch.einsum("nkc,nkp->ncp", V.double(), J)
            M += torch.einsum("ncp,ncq->pq", S, S)
            if centered:
                gbar += S.sum((0, 1))
    M /= md.n
    if centered:
        gbar /= md.n
        M -= torch.outer(gbar, gbar)
    return DenseCurvature(M.cpu(), md.param_names, md.sizes, md.n, matrix)
