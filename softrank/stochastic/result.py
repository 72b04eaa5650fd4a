"""The frozen result every stochastic or iterative estimator returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["StochasticEstimate"]


@dataclass(frozen=True)
class StochasticEstimate:
    r"""An estimate with its error bar and its cost.

    ``value`` and ``stderr``: the estimate and its standard error — the sample standard deviation
    of the per-probe values over :math:`\sqrt{m}`, combined with a bound on the deterministic
    (quadrature / truncation) error where the method has one (see ``diagnostics``).
    ``n_matvec``: matrix-vector products used (one per column of a batched product).
    ``converged``: the method's own stopping criterion held (CG residual, Ritz residual,
    quadrature error within the sampling error, a finite standard error: at least two probes). Per-λ estimates (one Lanczos run, a grid of λ) fill ``lams``,
    ``values`` and ``stderrs``; ``value``/``stderr`` are then those of the first λ.
    """

    value: float
    stderr: float
    n_matvec: int
    converged: bool
    method: str = ""
    lams: np.ndarray | None = None
    values: np.ndarray | None = None
    stderrs: np.ndarray | None = None
    samples: np.ndarray | None = None  # per-probe values (first λ), where the method has them
    diagnostics: dict = field(default_factory=dict)

    def __float__(self):
        return float(self.value)
