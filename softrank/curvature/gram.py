r"""Exact curvature through the :math:`nV\times nV` Gram matrix.

With rows :math:`S_{ic} = v_{ic}^\top J_i` (:math:`v_{ic}`: columns of :math:`B_i` for F,
:math:`r_i` for C), :math:`M = \frac1n S^\top S` has the nonzero spectrum of
:math:`\frac1n S S^\top`. The kernel is summed layer by layer from the recorded inputs and output
gradients (for ``nn.Linear``: :math:`(\tilde a_i\cdot\tilde a_j)(g_{ic}\cdot g_{jd})`), so
neither :math:`S` nor any per-sample gradient of length p is formed.

With :math:`\tilde S = S\Lambda^{-1/2}/\sqrt n` and :math:`\tilde K = \tilde S\tilde S^\top`:

.. math::
    \mathrm{rank}_\Lambda(M) = \mathrm{Tr}\,\tilde K(\tilde K + I)^{-1},\qquad
    (M+\Lambda)^{-1} = \Lambda^{-1/2}\big(I - \tilde S^\top(I+\tilde K)^{-1}\tilde S\big)
    \Lambda^{-1/2}

(Woodbury), which gives the TIC :math:`\mathrm{Tr}\,C(F+\Lambda)^{-1}` from the cross kernel of
the residual rows with :math:`S`. Dense linear algebra is float64 and uses ``torch.linalg``.
"""
from __future__ import annotations

import torch

from .._progress import bar
from ..regularization import Lam
from .base import Curvature

__all__ = ["GramCurvature"]


def _inverse_column_norms(L: torch.Tensor, leaf: int = 512) -> torch.Tensor:
    r"""Squared column norms of :math:`L^{-1}` for lower-triangular L: the diagonal of
    :math:`(LL^\top)^{-1}`. With :math:`L = [[A, 0], [B, C]]`,
    :math:`L^{-1} = [[A^{-1}, 0], [-C^{-1}BA^{-1}, C^{-1}]]`: two triangular solves per level,
    about n³/3 flops in all (``cholesky_inverse``: 2n³/3) and no n×n inverse in memory."""
    n = L.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=L.dtype, device=L.device)
        return torch.linalg.solve_triangular(L, eye, upper=False).square_().sum(0)
    h = n // 2
    A, B, C = L[:h, :h], L[h:, :h], L[h:, h:]
    Z = torch.linalg.solve_triangular(A, torch.linalg.solve_triangular(C, B, upper=False),
                                      upper=False, left=False)  # C⁻¹ B A⁻¹
    return torch.cat([_inverse_column_norms(A, leaf) + Z.square_().sum(0),
                      _inverse_column_norms(C, leaf)])


class GramCurvature(Curvature):
    approximation = "gram"
    exact = True

    def __init__(self, md, matrix="fisher", vectors="fisher", *, generator=None,
                 mc_samples=1, centered=False, max_rows=20000):
        super().__init__(md.param_names, md.sizes, md.n)
        self.md, self.matrix, self.centered = md, matrix, centered
        self.rules = md.rules
        self.feats = [b.layers for b in md.batches(vectors, generator, mc_samples)]
        self.V = self.feats[0][0].g.shape[0]
        self.n_rows = md.n * self.V
        if self.n_rows > max_rows:
            raise MemoryError(
                ("ApproxLOO(method='exact')" if matrix == "ntk" else "approximation='gram'") +
                f" needs a {self.n_rows}x{self.n_rows} float64 kernel "
                f"(n·K = {md.n}·{self.V}; {8 * self.n_rows ** 2 / 2 ** 30:.1f} GiB); above "
                f"max_rows={max_rows}. Subsample with n_curvature_samples, or use " + (
                    "method='kfac' or 'subsample'." if matrix == "ntk" else
                    "'kfac', 'ekfac', 'diagonal' or 'matrix_free'."))
        self._kernels: dict = {}
        self._eig = None
        self._chol: dict = {}

    # -- kernels ---------------------------------------------------------------------------
    def _layer_w(self, w):
        if w is None:
            return [None] * len(self.rules)
        out, i = [], 0
        for r in self.rules:
            out.append(w[i:i + len(r.param_names)])
            i += len(r.param_names)
        return out

    def _block(self, f1, f2, lw):
        blk = None
        for r, a, b, w in zip(self.rules, f1, f2, lw):
            k = r.kernel(a, b, w)  # a fresh tensor: summed in place
            blk = k if blk is None else blk.add_(k)
        N1, V1, N2, V2 = blk.shape
        return blk.reshape(N1 * V1, N2 * V2)

    def cross_kernel(self, feats1, feats2, w=None) -> torch.Tensor:
        """Unnormalized kernel between two lists of batches (rows sample-major)."""
        lw = self._layer_w(w)
        return torch.cat([torch.cat([self._block(f1, f2, lw) for f2 in feats2], 1)
                          for f1 in feats1], 0)

    def kernel(self, w: tuple | None = None) -> torch.Tensor:
        r"""Normalized kernel :math:`\frac1n S W S^\top` (``w``: per-tensor weights), cached."""
        key = None if w is None else tuple(w)
        if key not in self._kernels:
            lw = self._layer_w(w)
            R = self.n_rows
            K = torch.empty(R, R, dtype=torch.float64)
            offs = [0]
            for f in self.feats:
                offs.append(offs[-1] + f[0].g.shape[1] * self.V)
            for i, fi in bar(enumerate(self.feats), desc="Gram kernel", total=len(self.feats),
                             unit="layer"):
                for j in range(i, len(self.feats)):
                    blk = self._block(fi, self.feats[j], lw)
                    K[offs[i]:offs[i + 1], offs[j]:offs[j + 1]] = blk
                    if j != i:
                        K[offs[j]:offs[j + 1], offs[i]:offs[i + 1]] = blk.T
            if self.centered:  # C - ḡḡᵀ  <->  (I - 11ᵀ/n) K (I - 11ᵀ/n) for V = 1
                K -= K.mean(0, keepdim=True)
                K -= K.mean(1, keepdim=True)
            K /= self.md.n
            self._kernels[key] = K
        return self._kernels[key]

    def _scaled(self, L: Lam):
        """(K̃, shift): K̃ = S Λ^{-1} Sᵀ / n is K/λ for scalar λ."""
        if L.scalar is not None:
            return self.kernel(), L.scalar
        return self.kernel(tuple(1.0 / v for v in L.tensor_values("approximation='gram'"))), 1.0

    def _cholesky(self, L: Lam):
        key = L.describe()
        if key not in self._chol:
            K, s = self._scaled(L)
            A = K / s
            A.diagonal().add_(1.0)
            chol, info = torch.linalg.cholesky_ex(A)
            if info != 0:
                raise RuntimeError("Cholesky of I + K/λ failed; the kernel is not PSD "
                                   "(non-finite values in the model outputs?)")
            self._chol = {key: chol}  # keep one at a time (memory)
        return self._chol[key]

    # -- interface -------------------------------------------------------------------------
    def eigvals(self):
        """The n·V eigenvalues of F that can be nonzero (the other p − n·V are zero)."""
        if self._eig is None:
            self._eig = torch.linalg.eigvalsh(self.kernel()).clamp_min(0.0)
        return self._eig

    def trace(self):
        return float(self.kernel().diagonal().sum())

    def diagonal(self):
        d = torch.cat([sum(r.diag_sum(lb) for lb in layer)
                       for r, layer in zip(self.rules, zip(*self.feats))])
        if self.centered:
            d -= (self.gradient_mean() ** 2) * self.md.n
        return d / self.md.n

    def gradient_mean(self) -> torch.Tensor:
        return torch.cat([sum(r.grad_sum(lb) for lb in layer)
                          for r, layer in zip(self.rules, zip(*self.feats))]) / self.md.n

    def _split(self, v):
        return list(v.split([r.numel for r in self.rules]))

    def _S(self, v):  # (R,) = S v, rows sample-major
        parts = self._split(v)
        out = [sum(r.jvp(lb, vp) for r, lb, vp in zip(self.rules, f, parts)).T.reshape(-1)
               for f in self.feats]
        u = torch.cat(out)
        if self.centered:
            u = u - u.mean()
        return u

    def _St(self, u):  # (p,) = Sᵀ u
        if self.centered:
            u = u - u.mean()
        out, i = [], 0
        chunks = []
        for f in self.feats:
            N = f[0].g.shape[1]
            chunks.append(u[i:i + N * self.V].reshape(N, self.V).T)
            i += N * self.V
        for k, r in enumerate(self.rules):
            out.append(sum(r.vjp(f[k], c) for f, c in zip(self.feats, chunks)))
        return torch.cat(out)

    def matvec(self, v):
        v = v.to(torch.float64)
        if v.ndim == 2:
            return torch.stack([self.matvec(c) for c in v.T], 1)
        return self._St(self._S(v)) / self.md.n

    def solve(self, v, lam):
        L = self.lam(lam)
        v = v.to(torch.float64)
        if v.ndim == 2:
            return torch.stack([self.solve(c, L) for c in v.T], 1)
        chol = self._cholesky(L)
        winv = 1.0 / L.vector
        x = winv * v
        t = torch.cholesky_solve((self._S(x) / self.md.n).unsqueeze(1), chol).squeeze(1)
        return x - winv * self._St(t)

    def soft_rank(self, lam):
        L = self.lam(lam)
        if L.scalar is not None and self._eig is not None:
            return super().soft_rank(L)
        chol = self._cholesky(L)
        inv_diag = _inverse_column_norms(chol)  # diag (I + K̃)⁻¹
        value = float(self.n_rows - inv_diag.sum())
        if value < 0.5 * self.n_rows:  # small K̃: Tr K̃ − Tr K̃(I+K̃)⁻¹K̃ keeps its digits
            K, s = self._scaled(L)
            K = K / s
            value = float(K.diagonal().sum()
                          - torch.linalg.solve_triangular(chol, K, upper=False).square().sum())
        return value

    def leverage(self, lam) -> torch.Tensor:
        r"""Per-sample :math:`\mathrm{Tr}\,F_i(F+\Lambda)^{-1}/n` (sums to the soft rank)."""
        L = self.lam(lam)
        inv_diag = _inverse_column_norms(self._cholesky(L))
        return (1.0 - inv_diag).reshape(self.md.n, self.V).sum(1)

    def logdet_dim(self, lam):
        L = self.lam(lam)
        if L.scalar is not None:
            return super().logdet_dim(L)
        K, s = self._scaled(L)  # Σ log1p(σ(K̃)): 2 Σ log diag chol(I + K̃) rounds 1 + σ first
        return float(torch.log1p(torch.linalg.eigvalsh(K / s).clamp_min(0.0)).sum())

    def tic_sum(self, rules, feats, lam) -> float:
        r"""Σ_i g_iᵀ(F+Λ)⁻¹g_i for the per-sample gradients in ``feats`` (Woodbury)."""
        residual_feats = [b.layers for b in feats]
        L = self.lam(lam)
        w = tuple(1.0 / v for v in L.tensor_values("approximation='gram'"))
        chol = self._cholesky(L)
        own = sum(float(self._block(f, f, self._layer_w(w)).diagonal().sum())
                  for f in residual_feats)
        cross = self.cross_kernel(residual_feats, self.feats, w) / self.md.n ** 0.5
        sol = torch.cholesky_solve(cross.T.contiguous(), chol)
        return own - float((cross * sol.T).sum())
