r"""Randomized trace estimators from matrix-vector products only.

* Hutchinson (1989): :math:`\mathrm{Tr}\,M \approx \frac1m\sum_{j=1}^m z_j^\top M z_j` with
  :math:`\mathbb E[zz^\top] = I` (Rademacher or Gaussian probes).
* Hutch++ (Meyer, Musco, Musco, Woodruff, "Hutch++: Optimal Stochastic Trace Estimation",
  SOSA 2021): with :math:`Q = \mathrm{orth}(MS)` from k sketch products,

  .. math:: \mathrm{Tr}\,M \approx \mathrm{Tr}(Q^\top M Q)
            + \frac1m\sum_j z_j^\top (I-QQ^\top) M (I-QQ^\top) z_j,

  exact on the captured low-rank part, so its error falls like 1/budget instead of
  1/√budget for matrices with decaying spectra (curvature matrices of networks).
  ``square=True`` estimates :math:`\mathrm{Tr}\,M^2 = \|M\|_F^2` the same way, using
  :math:`\mathrm{Tr}(Q^\top M^2Q) = \|MQ\|_F^2` and :math:`z^\top PM^2Pz = \|MPz\|^2`.

The standard error is that of the Hutchinson part (sample standard deviation over √m); the
low-rank part is exact given Q, up to the accuracy of the products: with products accurate to a
relative ``matvec_rtol`` δ (the unit roundoff of a float32 model, say) it is within
:math:`\delta\sum_j\|MQ_j\|` (:math:`2\delta\|MQ\|_F^2` for the square), which is added
to the standard error. ``converged`` is False when the standard error is not finite (one probe)
or the value is not.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .result import StochasticEstimate

__all__ = ["probes", "hutchinson", "hutchpp", "generator_from"]


def generator_from(random_state) -> torch.Generator:
    """A CPU torch generator from an int, a numpy RandomState, a Generator or None."""
    if isinstance(random_state, torch.Generator):
        return random_state
    from sklearn.utils import check_random_state
    seed = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
    return torch.Generator().manual_seed(seed)


def probes(dim: int, m: int, generator: torch.Generator, kind: str = "rademacher",
           device=None) -> torch.Tensor:
    """(dim, m) float64 probe vectors with E[zzᵀ] = I, drawn on the CPU (device-independent)."""
    if kind == "rademacher":
        Z = torch.randint(0, 2, (dim, m), generator=generator, dtype=torch.float64) * 2 - 1
    elif kind == "gaussian":
        Z = torch.randn(dim, m, generator=generator, dtype=torch.float64)
    else:
        raise ValueError(f"probe kind must be 'rademacher' or 'gaussian'; got {kind!r}")
    return Z.to(device) if device is not None else Z


def apply_in_blocks(matvec: Callable, X: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """``matvec`` on the columns of X, at most ``block_size`` columns at a time."""
    if block_size is None or X.shape[1] <= block_size:
        return matvec(X)
    return torch.cat([matvec(X[:, i:i + block_size]) for i in range(0, X.shape[1], block_size)], 1)


def _mean_and_stderr(samples: torch.Tensor) -> tuple[float, float]:
    m = samples.numel()
    mean = float(samples.mean())
    se = float(samples.std(unbiased=True)) / math.sqrt(m) if m > 1 else math.inf
    return mean, se


def hutchinson(matvec: Callable, dim: int, n_probes: int, *, random_state=None,
               kind: str = "rademacher", block_size: int | None = None,
               device=None, matvec_rtol: float = 0.0) -> StochasticEstimate:
    r""":math:`\mathrm{Tr}\,M \approx \frac1m\sum_j z_j^\top M z_j` (Hutchinson, 1989).

    >>> M = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    >>> est = hutchinson(lambda X: M @ X, 5, 4, random_state=0)
    >>> round(est.value, 6), est.stderr  # Rademacher probes: exact for a diagonal matrix
    (15.0, 0.0)
    """
    gen = generator_from(random_state)
    Z = probes(dim, n_probes, gen, kind, device)
    MZ = apply_in_blocks(matvec, Z, block_size)
    samples = (Z * MZ).sum(0).double().cpu()
    value, se = _mean_and_stderr(samples)
    rounding = float(matvec_rtol) * float((MZ.norm(dim=0) * Z.norm(dim=0)).mean())
    return StochasticEstimate(value, math.hypot(se, rounding), n_probes, _finite(value, se),
                              "hutchinson", samples=samples.numpy(),
                              diagnostics={"probes": kind, "rounding_bound": rounding})


def _finite(value: float, se: float) -> bool:
    return math.isfinite(value) and math.isfinite(se)


def hutchpp(matvec: Callable, dim: int, n_matvec: int, *, random_state=None,
            kind: str = "rademacher", square: bool = False, block_size: int | None = None,
            device=None, matvec_rtol: float = 0.0) -> StochasticEstimate:
    r"""Hutch++ estimate of :math:`\mathrm{Tr}\,M` (or :math:`\mathrm{Tr}\,M^2` with
    ``square=True``) from about ``n_matvec`` products: k = ⌊n_matvec/3⌋ sketch columns (capped at
    ``dim``), k products with Q, the rest Hutchinson probes on the deflated matrix.

    >>> M = torch.diag(torch.tensor([10.0, 1.0, 0.1, 0.01], dtype=torch.float64))
    >>> round(hutchpp(lambda X: M @ X, 4, 12, random_state=0).value, 10)  # k = 4 = dim: exact
    11.11
    """
    if n_matvec < 3:
        raise ValueError(f"Hutch++ needs n_matvec >= 3; got {n_matvec}")
    gen = generator_from(random_state)
    k = min(n_matvec // 3, dim)
    m = max(n_matvec - 2 * k, 2) if k < dim else 0
    S = probes(dim, k, gen, kind, device)
    Q, _ = torch.linalg.qr(apply_in_blocks(matvec, S, block_size))
    MQ = apply_in_blocks(matvec, Q, block_size)
    low_rank = float((MQ * MQ).sum() if square else (Q * MQ).sum())
    rounding = float(matvec_rtol) * float(2 * (MQ * MQ).sum() if square else MQ.norm(dim=0).sum())
    if m == 0:  # Q spans the whole space: exact up to the products' rounding
        return StochasticEstimate(low_rank, rounding, 2 * k, math.isfinite(low_rank), "hutch++",
                                  diagnostics={"sketch": k, "probes": 0, "low_rank": low_rank,
                                               "rounding_bound": rounding})
    Z = probes(dim, m, gen, kind, device)
    PZ = Z - Q @ (Q.T @ Z)
    MPZ = apply_in_blocks(matvec, PZ, block_size)
    samples = ((MPZ * MPZ) if square else (PZ * MPZ)).sum(0).double().cpu()
    rest, se = _mean_and_stderr(samples)
    value = low_rank + rest
    return StochasticEstimate(value, math.hypot(se, rounding), 2 * k + m, _finite(value, se),
                              "hutch++", samples=samples.numpy(),
                              diagnostics={"sketch": k, "probes": m, "low_rank": low_rank,
                                           "residual_trace": rest, "rounding_bound": rounding})
