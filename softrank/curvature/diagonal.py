r"""Diagonal approximation :math:`M \approx \mathrm{diag}(M)`.

:math:`\mathrm{diag}(F)_k = \frac1n\sum_{i,c} (\partial v_{ic}^\top z_i/\partial\theta_k)^2`
from the exact columns of :math:`B_i` (or sampled residuals), layer by layer.
For PSD :math:`M`, :math:`\mathrm{rank}_\Lambda(\mathrm{diag}\,M) \ge \mathrm{rank}_\Lambda(M)`
(the soft rank is Schur-concave): the diagonal soft rank is an upper bound.
"""
from __future__ import annotations

import torch

from .base import Curvature

__all__ = ["DiagonalCurvature"]


class DiagonalCurvature(Curvature):
    approximation = "diagonal"

    def __init__(self, md, matrix="fisher", vectors="fisher", *, generator=None, mc_samples=1,
                 centered=False):
        super().__init__(md.param_names, md.sizes, md.n)
        self.matrix = matrix
        rules = md.rules
        d = [torch.zeros(r.numel, dtype=torch.float64) for r in rules]
        gsum = [torch.zeros(r.numel, dtype=torch.float64) for r in rules]
        for b in md.batches(vectors, generator, mc_samples):
            for k, (r, lb) in enumerate(zip(rules, b.layers)):
                d[k] += r.diag_sum(lb).cpu()
                if centered:
                    gsum[k] += r.grad_sum(lb).cpu()
        self.d = torch.cat(d) / md.n
        if centered:
            self.d -= (torch.cat(gsum) / md.n) ** 2

    def diagonal(self):
        return self.d.clone()

    def eigvals(self):
        return torch.sort(self.d).values

    def matvec(self, v):
        v = v.to(torch.float64)
        return self.d * v if v.ndim == 1 else self.d[:, None] * v

    def solve(self, v, lam):
        den = self.d + self.lam(lam).vector
        v = v.to(torch.float64)
        return v / den if v.ndim == 1 else v / den[:, None]

    def soft_rank(self, lam):
        return float((self.d / (self.d + self.lam(lam).vector)).sum())

    def logdet_dim(self, lam):
        return float(torch.log1p(self.d / self.lam(lam).vector).sum())

    def to_dense(self, max_params: int = 5000):
        return torch.diag(self.d)
