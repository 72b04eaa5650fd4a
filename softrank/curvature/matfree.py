r"""Matrix-free GGN products and conjugate gradients.

:math:`F V = \frac1n\sum_i J_i^\top A_i J_i V`, one data pass per product, batched over the
columns of V (``torch.func``: ``jvp`` for :math:`J_iV`, ``vjp`` back); no matrix is formed.
:func:`conjugate_gradients` solves :math:`(F+\Lambda)X = R` for many right-hand sides at once,
optionally preconditioned (e.g. by KFAC's ``solve``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .base import Curvature

__all__ = ["GGNOperator", "conjugate_gradients", "CGResult"]


@dataclass(frozen=True)
class CGResult:
    x: torch.Tensor  # (p, m)
    iterations: int
    n_matvec: int  # matrix-vector products counted per column
    converged: torch.Tensor  # (m,) bool
    relative_residual: torch.Tensor  # (m,)


def conjugate_gradients(matvec: Callable, rhs: torch.Tensor, *, shift: torch.Tensor | float = 0.0,
                        precondition: Callable | None = None, tol: float = 1e-8,
                        maxiter: int = 500) -> CGResult:
    r"""Solve :math:`(M + \mathrm{diag}(\text{shift}))X = R` column by column (all columns
    advance together; each stops updating once its relative residual is below ``tol``)."""
    R = rhs.to(torch.float64)
    single = R.ndim == 1
    if single:
        R = R[:, None]
    shift = torch.as_tensor(shift, dtype=torch.float64)
    shift = shift[:, None] if shift.ndim == 1 else shift

    def op(X):
        return matvec(X) + shift * X

    def prec(X):
        return X if precondition is None else precondition(X)

    X = torch.zeros_like(R)
    res = R.clone()
    Z = prec(res)
    P = Z.clone()
    rz = (res * Z).sum(0)
    norm_b = R.norm(dim=0).clamp_min(torch.finfo(torch.float64).tiny)
    active = torch.ones(R.shape[1], dtype=torch.bool)
    it = 0
    for it in range(1, maxiter + 1):
        AP = op(P)
        alpha = torch.where(active, rz / (P * AP).sum(0), torch.zeros_like(rz))
        X += alpha * P
        res -= alpha * AP
        active = active & (res.norm(dim=0) / norm_b > tol)
        if not active.any():
            break
        Z = prec(res)
        rz_new = (res * Z).sum(0)
        beta = torch.where(active, rz_new / rz, torch.zeros_like(rz))
        P = torch.where(active, Z + beta * P, P)
        rz = torch.where(active, rz_new, rz)
    rel = res.norm(dim=0) / norm_b
    return CGResult(X[:, 0] if single else X, it, it, rel <= tol, rel)


class GGNOperator(Curvature):
    """F (GGN) as an operator: ``matvec`` streams the data; ``solve`` runs CG."""

    approximation = "matrix-free"
    exact = True

    def __init__(self, md, *, tol: float = 1e-10, maxiter: int = 1000,
                 preconditioner: Curvature | None = None):
        super().__init__(md.param_names, md.sizes, md.n)
        self.md, self.tol, self.maxiter = md, tol, maxiter
        self.preconditioner = preconditioner
        self.matrix = "fisher"
        self.n_matvec = 0
        self.last_cg: CGResult | None = None

    def matvec(self, V):
        md = self.md
        outputs, _ = md.functional_loss()
        theta = md.flat_params()
        single = V.ndim == 1
        V = (V[:, None] if single else V).to(theta.dtype).to(md.device)
        out = torch.zeros(V.shape, dtype=torch.float64, device=md.device)
        for b in md.batches(None):
            xb = md.X[b.index].to(md.device)

            def f(th):
                return outputs(th, xb)

            JV = torch.func.vmap(lambda v: torch.func.jvp(f, (theta,), (v,))[1], in_dims=1)(V)
            Bf = md.family.factor(b.z, b.y).to(JV.dtype)  # (N, K, K')
            AJV = torch.einsum("nkc,nlc,mnl->mnk", Bf, Bf, JV)
            _, vjp = torch.func.vjp(f, theta)
            out += torch.func.vmap(lambda u: vjp(u)[0], in_dims=0, out_dims=1)(AJV).double()
        self.n_matvec += V.shape[1]
        out /= md.n
        return out[:, 0] if single else out

    def solve(self, v, lam):
        L = self.lam(lam)
        prec = None
        if self.preconditioner is not None:
            prec = lambda X: self.preconditioner.solve(X, L)  # noqa: E731
        res = conjugate_gradients(self.matvec, v, shift=L.vector, precondition=prec,
                                  tol=self.tol, maxiter=self.maxiter)
        self.last_cg = res
        return res.x
