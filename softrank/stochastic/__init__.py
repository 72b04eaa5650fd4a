r"""Stochastic and Krylov estimators built on matrix-vector products only.

* :mod:`.hutchinson` — Hutchinson and Hutch++ traces (of M or M²);
* :mod:`.lanczos` — Lanczos with full reorthogonalization: extreme eigenvalues, stochastic
  Lanczos quadrature for :math:`\mathrm{Tr}\,\varphi(M)` over a grid of λ, spectral density;
* :class:`StochasticEstimate` — value, standard error, number of products, convergence flag.

Every routine takes ``random_state`` (int, RandomState, torch.Generator or None).
"""
from .hutchinson import hutchinson, hutchpp, probes
from .lanczos import (SLQ, LanczosRun, lanczos, lanczos_eigenvalues, logdet_function, slq,
                      soft_rank_function, spectral_density)
from .result import StochasticEstimate

__all__ = ["StochasticEstimate", "hutchinson", "hutchpp", "probes", "lanczos", "LanczosRun",
           "slq", "SLQ", "lanczos_eigenvalues", "spectral_density", "soft_rank_function",
           "logdet_function"]
