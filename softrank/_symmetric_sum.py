"""Running sums of xᵀx in float64 that compute one triangle, not both.

The KFAC factors are sums of xᵀx over batches (accumulated in float64), and float64
products run at half the float32 rate. A matrix product computes both triangles of each
(symmetric) term; BLAS ``syrk`` would compute one, but torch exposes none, and calling another
library's BLAS from Python puts a second thread pool next to torch's, whose idle threads spin
while torch works (measured: two-thread KFAC runs twice as slow). So the sum is kept by block
rows of the upper triangle, one torch product each — the same kernels, the same thread pool,
on every device — which does d(d+b)/2 instead of d² multiply-adds per row of x; the triangle
is mirrored once, at the end.
"""
from __future__ import annotations

import torch

__all__ = ["SymmetricSum"]

#: factors narrower than this are summed with one product (blocks would not pay off)
MIN_BLOCKED_WIDTH = 256


def block_size(d: int) -> int:
    """Block-row height for width d: about 8 block rows (64 for d ≤ 512, 128 up to 1024…)."""
    return 64 * -(-d // 512)


class SymmetricSum:
    """Σ_b w_b x_bᵀx_b over float64 (N_b, d) tensors ``x_b``, added with :meth:`add`;
    :meth:`value` is the symmetric (d, d) float64 sum, on the device of the inputs."""

    def __init__(self):
        self._acc = None  # (d, d): the upper block triangle (wide factors) or everything

    def add(self, x: torch.Tensor, weight: float = 1.0) -> None:
        if x.dtype != torch.float64:
            raise TypeError(f"SymmetricSum needs float64 rows, got {x.dtype}")
        d = x.shape[1]
        if self._acc is None:
            self._acc = torch.zeros(d, d, dtype=x.dtype, device=x.device)
        if d < MIN_BLOCKED_WIDTH:
            self._acc.addmm_(x.T, x, alpha=weight)
            return
        b = block_size(d)
        for i in range(0, d, b):  # block row i: x[:, i:i+b]ᵀ x[:, i:] (diagonal block whole)
            self._acc[i:i + b, i:].addmm_(x[:, i:i + b].T, x[:, i:], alpha=weight)

    def upper(self) -> torch.Tensor:
        """The running sum itself, without a copy: its upper triangle (diagonal included) is
        that of the sum, the rest is not — for a reader of one triangle (a Cholesky factor
        with ``upper=True`` reads only that one)."""
        if self._acc is None:
            raise ValueError("SymmetricSum.upper() before any add()")
        return self._acc

    def value(self) -> torch.Tensor:
        if self._acc is None:
            raise ValueError("SymmetricSum.value() before any add()")
        upper = self._acc.triu()
        return upper.add_(upper.T.tril(-1))

