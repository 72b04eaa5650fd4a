r"""Brute-force float64 references, built with ``torch.func`` and independent of softrank.

For a case with parameters :math:`\theta` (all of them, in ``named_parameters()`` order, each
flattened row-major), outputs :math:`z_i = f(x_i;\theta)` and per-sample loss :math:`\ell_i`:

* :math:`J_i = \partial z_i/\partial\theta` (``vmap(jacrev)``),
* :math:`A_i = \partial^2 \ell_i/\partial z_i^2` (``vmap(hessian)`` of the case's natural loss),
* :math:`F = \frac1n\sum_i J_i^\top A_i J_i`,
* :math:`g_i = \nabla_\theta \ell_i` (``vmap(grad)`` of the criterion on one sample),
  :math:`C = \frac1n\sum_i g_i g_i^\top`, centered :math:`C - \bar g\bar g^\top`,
* :math:`H = \nabla^2_\theta\,\mathrm{criterion}(f(X;\theta), Y)` (``hessian`` of the mean loss),

and the measures :math:`\mathrm{rank}_\Lambda(M) = \mathrm{Tr}\,(M+\Lambda)^{-1}M`,
:math:`\mathrm{TIC} = \mathrm{Tr}\,(M+\Lambda)^{-1}C`,
:math:`\log\det(I + \Lambda^{-1/2}M\Lambda^{-1/2})`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = ["Reference", "lam_vector", "soft_rank", "tic", "logdet_dim", "assert_rel"]


def lam_vector(lam, names, sizes) -> torch.Tensor:
    """(p,) diagonal of Λ from a float or a dict {parameter name: value}."""
    if isinstance(lam, dict):
        return torch.cat([torch.full((s,), float(lam[n]), dtype=torch.float64)
                          for n, s in zip(names, sizes)])
    return torch.full((sum(sizes),), float(lam), dtype=torch.float64)


def soft_rank(M, lam_vec):
    return float(torch.linalg.solve(M + torch.diag(lam_vec), M).trace())


def tic(C, M, lam_vec):
    return float(torch.linalg.solve(M + torch.diag(lam_vec), C).trace())


def logdet_dim(M, lam_vec):
    """log det(I + Λ^-½ M Λ^-½) as Σ log1p(σ): slogdet rounds 1 + σ first (tiny M)."""
    d = lam_vec.rsqrt()
    return float(torch.log1p(torch.linalg.eigvalsh(d[:, None] * M * d[None, :])).sum())


def assert_rel(actual, expected, tol=1e-8, what=""):
    """max |actual - expected| <= tol · max(|expected|) (scalars or tensors)."""
    a = torch.as_tensor(actual, dtype=torch.float64)
    e = torch.as_tensor(expected, dtype=torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    scale = float(e.abs().max()) if e.numel() else 0.0
    err = float((a - e).abs().max()) if e.numel() else 0.0
    assert err <= tol * max(scale, 1e-300), (
        f"{what}: max abs error {err:.3e} > {tol:.0e} × scale {scale:.3e}")


@dataclass
class Reference:
    """Dense float64 matrices of a case (a :class:`tests.cases.Case`), computed lazily."""

    case: object

    # -- functional view of the model ------------------------------------------------------
    @cached_property
    def _net(self):
        return copy.deepcopy(self.case.model).double().eval()

    @cached_property
    def names(self):
        return [n for n, _ in self._net.named_parameters()]

    @cached_property
    def sizes(self):
        return [p.numel() for _, p in self._net.named_parameters()]

    @cached_property
    def theta(self):
        return torch.cat([p.detach().reshape(-1) for p in self._net.parameters()])

    def outputs(self, theta, X):
        params, i = {}, 0
        for (n, p) in self._net.named_parameters():
            params[n] = theta[i:i + p.numel()].reshape(p.shape)
            i += p.numel()
        buffers = dict(self._net.named_buffers())
        out = torch.func.functional_call(self._net, {**params, **buffers}, (X,))
        if self.case.output_transform is not None:
            out = self.case.output_transform(out)
        return out.reshape(X.shape[0], -1)

    @property
    def X(self):
        return self.case.X.double()

    @property
    def y(self):
        return self.case.y

    @property
    def n(self):
        return len(self.case.X)

    def lam(self, lam):
        return lam_vector(lam, self.names, self.sizes)

    # -- building blocks -------------------------------------------------------------------
    @cached_property
    def Z(self):
        return self.outputs(self.theta, self.X).detach()

    @cached_property
    def J(self):
        """(n, K, p) per-sample Jacobians."""
        def z_one(theta, x):
            return self.outputs(theta, x.unsqueeze(0)).squeeze(0)
        return torch.func.vmap(torch.func.jacrev(z_one), in_dims=(None, 0))(self.theta, self.X)

    @cached_property
    def A(self):
        """(n, K, K) output-space Hessians of the per-sample loss."""
        natural = self.case.loss.natural_loss
        return torch.func.vmap(torch.func.hessian(natural))(self.Z, self.y)

    @cached_property
    def G(self):
        """(n, p) per-sample gradients of the criterion at the true labels."""
        crit = self.case.reference_criterion

        def loss_one(theta, x, y):
            return crit(self.outputs(theta, x.unsqueeze(0)), y.unsqueeze(0))
        return torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(
            self.theta, self.X, self.y)

    # -- matrices --------------------------------------------------------------------------
    @cached_property
    def F(self):
        return torch.einsum("nkp,nkl,nlq->pq", self.J, self.A, self.J) / self.n

    @cached_property
    def C(self):
        return self.G.T @ self.G / self.n

    @cached_property
    def C_centered(self):
        gbar = self.G.mean(0)
        return self.C - torch.outer(gbar, gbar)

    @cached_property
    def H(self):
        crit = self.case.reference_criterion
        return torch.func.hessian(lambda th: crit(self.outputs(th, self.X), self.y))(self.theta)

    def matrix(self, name: str, centered: bool = False) -> torch.Tensor:
        if name == "gsm":
            return self.C_centered if centered else self.C
        return {"fisher": self.F, "hessian": self.H}[name]

    def F_i(self, i):
        """Per-sample Fisher J_iᵀ A_i J_i."""
        return self.J[i].T @ self.A[i] @ self.J[i]
