r"""The small interface every curvature representation implements.

A representation of a symmetric :math:`p\times p` matrix :math:`M` (F, F_MC, C or H) offers

* ``trace()``, ``diagonal()``, ``eigvals()`` (where it has them), ``to_dense()`` (small p),
* ``matvec(v)`` and ``solve(v, lam)`` :math:`= (M+\Lambda)^{-1}v`,
* ``soft_rank(lam)`` :math:`= \mathrm{Tr}\,M(M+\Lambda)^{-1}` and
  ``logdet_dim(lam)`` :math:`= \sum_j \log(1+\sigma_j/\lambda)`,
* ``tic_sum(rules, feats, lam)`` :math:`= \sum_i g_i^\top (M+\Lambda)^{-1} g_i` over a
  stream of per-sample gradients given as layer records (the TIC numerator).

``lam`` is anything :func:`softrank.regularization.as_lam` accepts.
"""
from __future__ import annotations

import torch

from ..layers import per_sample_gradients
from ..regularization import Lam, as_lam

__all__ = ["Curvature", "DenseCurvature"]


class Curvature:
    """Base class. Subclasses set ``matrix``, ``approximation``, ``names``, ``sizes``."""

    matrix: str = "fisher"
    approximation: str = "?"
    exact: bool = False

    def __init__(self, names: list[str], sizes: list[int], n_samples: int):
        self.names, self.sizes, self.n_samples = list(names), list(sizes), int(n_samples)
        self.n_params = sum(sizes)

    def __repr__(self):
        return (f"{type(self).__name__}(matrix={self.matrix!r}, approximation="
                f"{self.approximation!r}, p={self.n_params}, n_samples={self.n_samples})")

    # -- helpers ---------------------------------------------------------------------------
    def lam(self, lam) -> Lam:
        return as_lam(lam, self.names, self.sizes)

    def _unsupported(self, what):
        return NotImplementedError(f"{what} is not available for approximation="
                                   f"{self.approximation!r} ({self.matrix})")

    # -- interface -------------------------------------------------------------------------
    def trace(self) -> float:
        return float(self.diagonal().sum())

    def diagonal(self) -> torch.Tensor:
        raise self._unsupported("diagonal()")

    def eigvals(self) -> torch.Tensor:
        raise self._unsupported("eigvals()")

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        raise self._unsupported("matvec()")

    def solve(self, v: torch.Tensor, lam) -> torch.Tensor:
        raise self._unsupported("solve()")

    def soft_rank(self, lam) -> float:
        L = self.lam(lam)
        if L.scalar is None:
            raise self._unsupported("soft_rank() with a non-scalar lam")
        s = self.eigvals()
        return float((s / (s + L.scalar)).sum())

    def logdet_dim(self, lam) -> float:
        L = self.lam(lam)
        if L.scalar is None:
            raise self._unsupported("logdet_dim() with a non-scalar lam")
        return float(torch.log1p(self.eigvals() / L.scalar).sum())

    def frobenius_norm(self) -> float:
        return float(self.eigvals().pow(2).sum().sqrt())

    def spectral_norm(self) -> float:
        return float(self.eigvals().abs().max())

    def to_dense(self, max_params: int = 5000) -> torch.Tensor:
        if self.n_params > max_params:
            raise MemoryError(f"to_dense() of p={self.n_params} exceeds max_params={max_params}")
        eye = torch.eye(self.n_params, dtype=torch.float64)
        M = self.matvec(eye)
        return (M + M.T) / 2

    def tic_sum(self, rules, feats, lam) -> float:
        r""":math:`\sum_i g_i^\top(M+\Lambda)^{-1}g_i` over per-sample gradients given as a stream
        of :class:`~softrank.model.Batch` records; default: materialize them batch by batch, use ``solve``."""
        L = self.lam(lam)
        total = 0.0
        for b in feats:
            G = per_sample_gradients(rules, b.layers)
            G = G.reshape(-1, G.shape[-1]).cpu()
            total += float((G * self.solve(G.T, L).T).sum())
        return total


class DenseCurvature(Curvature):
    """An explicit float64 matrix (exact dense F, F_MC, C or H; small p)."""

    exact = True

    def __init__(self, M: torch.Tensor, names, sizes, n_samples, matrix, approximation="dense"):
        super().__init__(names, sizes, n_samples)
        self.M = (M + M.T) / 2
        self.matrix, self.approximation = matrix, approximation
        self._eig = None

    def diagonal(self):
        return self.M.diagonal().clone()

    def trace(self):
        return float(self.M.trace())

    def eigvals(self):
        if self._eig is None:
            self._eig = torch.linalg.eigvalsh(self.M)
        return self._eig

    def matvec(self, v):
        return self.M @ v.to(torch.float64)

    def solve(self, v, lam):
        L = self.lam(lam)
        return torch.linalg.solve(self.M + torch.diag(L.vector), v.to(torch.float64))

    def _scaled_eigvals(self, L: Lam):
        if L.scalar is not None:
            return self.eigvals() / L.scalar
        d = L.vector.rsqrt()
        return torch.linalg.eigvalsh(d[:, None] * self.M * d[None, :])

    def soft_rank(self, lam):
        s = self._scaled_eigvals(self.lam(lam))
        return float((s / (s + 1)).sum())

    def logdet_dim(self, lam):
        return float(torch.log1p(self._scaled_eigvals(self.lam(lam))).sum())

    def to_dense(self, max_params: int = 5000):
        return self.M.clone()

    def frobenius_norm(self):
        return float(torch.linalg.matrix_norm(self.M))

    def is_positive_definite_with(self, lam) -> bool:
        L = self.lam(lam)
        return bool(torch.linalg.cholesky_ex(self.M + torch.diag(L.vector)).info == 0)

