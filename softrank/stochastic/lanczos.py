r"""Lanczos with full reorthogonalization: extreme eigenvalues, stochastic Lanczos quadrature
(SLQ) for :math:`\mathrm{Tr}\,\varphi(M)`, and the spectral density.

Lanczos on a symmetric M from a start vector z gives the tridiagonal
:math:`T_k = Q_k^\top M Q_k` (k products). With :math:`T_k = S\,\mathrm{diag}(\theta)S^\top`,

.. math:: z^\top \varphi(M) z \approx \|z\|^2 \sum_{i=1}^k S_{1i}^2\,\varphi(\theta_i)
          \quad\text{(k-point Gauss quadrature of the spectral measure of z)},

and averaging over random probes z (Rademacher) gives
:math:`\mathrm{Tr}\,\varphi(M)` (Ubaru, Chen, Saad, "Fast estimation of tr(f(A)) via
stochastic Lanczos quadrature", SIMAX 2017). One Lanczos run serves every φ, so the soft rank
:math:`\varphi_\lambda(s) = s/(s+\lambda)` and the log-det dimension
:math:`\log(1+s/\lambda)` come for a whole grid of λ at the cost of one.

**Error bars.** Both φ are Bernstein functions (their derivatives alternate in sign). For a PSD
M the Gauss rule then over-estimates :math:`z^\top\varphi(M)z` and the Gauss–Radau rule with a
node fixed at a ≤ λ_min(M) (here a = 0) under-estimates it (Golub & Meurant, "Matrices, Moments
and Quadrature", 2010): the quadrature error of each probe is bracketed. The estimate is the
midpoint of the bracket; its ``stderr`` combines the sampling error over probes with the mean
half-width of the brackets (a bound on the bias). For indefinite M (the Hessian) there is no
bracket, and the change of the Gauss value over the last Lanczos step stands in for it.

Top eigenvalues: Ritz values :math:`\theta_i` with residual norms
:math:`\rho_i = \beta_k |S_{ki}|` bound the distance to an eigenvalue by :math:`\rho_i`, and
by :math:`\rho_i^2/\mathrm{gap}_i` once the Ritz value is separated from the rest.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .._progress import bar
from .hutchinson import generator_from, probes
from .result import StochasticEstimate

__all__ = ["LanczosRun", "lanczos", "SLQ", "slq", "lanczos_eigenvalues", "spectral_density",
           "soft_rank_function", "logdet_function"]


def soft_rank_function(s: torch.Tensor, lam: float) -> torch.Tensor:
    r""":math:`\varphi_\lambda(s) = s/(s+\lambda)`: :math:`\mathrm{Tr}\,\varphi_\lambda(M)` is the
    soft rank."""
    return s / (s + lam)


def logdet_function(s: torch.Tensor, lam: float) -> torch.Tensor:
    r""":math:`\log(1+s/\lambda)`: :math:`\mathrm{Tr}` of it is the log-det effective dimension."""
    return torch.log1p(s / lam)


@dataclass(frozen=True)
class LanczosRun:
    """Lanczos coefficients of m independent runs (columns), float64 on the CPU.

    ``alpha[c, j]``, ``beta[c, j]`` (norm of the j-th residual, ``beta[c, L-1]`` the last one);
    ``lengths[c]``: steps taken before the column found an invariant subspace (or all steps).
    """

    alpha: torch.Tensor  # (m, k)
    beta: torch.Tensor  # (m, k)
    lengths: torch.Tensor  # (m,)
    start_norms: torch.Tensor  # (m,)
    n_matvec: int

    def tridiagonal(self, c: int, steps: int | None = None) -> torch.Tensor:
        L = int(self.lengths[c]) if steps is None else steps
        T = torch.diag(self.alpha[c, :L])
        off = self.beta[c, :L - 1]
        return T + torch.diag(off, 1) + torch.diag(off, -1)

    def exhausted(self, c: int) -> bool:
        """The column found an invariant subspace: its quadrature is exact."""
        L = int(self.lengths[c])
        return L < self.alpha.shape[1] or bool(self.beta[c, L - 1] == 0)


def _orthogonalize(w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """w − Q(Qᵀw) per column, twice ("twice is enough"); Q: (j, p, m), w: (p, m)."""
    for _ in range(2):
        w = w - torch.einsum("jpm,jm->pm", Q, torch.einsum("jpm,pm->jm", Q, w))
    return w


def lanczos(matvec: Callable, V0: torch.Tensor, steps: int, *, reorthogonalize: bool = True
            ) -> LanczosRun:
    r"""``steps`` Lanczos steps from each column of ``V0`` (p, m), all columns advancing together
    (one batched product per step), with full reorthogonalization against the stored basis
    (memory: steps·p·m floats)."""
    V0 = V0.to(torch.float64)
    p, m = V0.shape
    steps = min(int(steps), p)
    norms = V0.norm(dim=0)
    Q = torch.zeros(steps, p, m, dtype=torch.float64, device=V0.device)
    alpha = torch.zeros(m, steps, dtype=torch.float64)
    beta = torch.zeros(m, steps, dtype=torch.float64)
    lengths = torch.full((m,), steps, dtype=torch.long)
    active = torch.ones(m, dtype=torch.bool)
    q, prev = V0 / norms, torch.zeros_like(V0)
    b_prev = torch.zeros(m, dtype=torch.float64, device=V0.device)
    scale = torch.zeros(m, dtype=torch.float64)
    n_matvec = 0
    for j in bar(range(steps), desc="Lanczos", unit="step"):
        Q[j] = q
        act = active.to(V0.device)
        w = torch.zeros_like(q)
        w[:, act] = matvec(q[:, act]).to(torch.float64)
        n_matvec += int(active.sum())
        a = (q * w).sum(0)
        w = w - a * q - b_prev * prev
        if reorthogonalize:
            w = _orthogonalize(w, Q[:j + 1])
        b = w.norm(dim=0)
        a, b_cpu = a.cpu(), b.cpu()
        alpha[active, j], beta[active, j] = a[active], b_cpu[active]
        scale = torch.maximum(scale, a.abs() + b_cpu)
        broken = active & (b_cpu <= 1e-13 * scale.clamp_min(torch.finfo(torch.float64).tiny))
        lengths[broken] = j + 1
        beta[broken, j] = 0.0
        active &= ~broken
        if not active.any():
            break
        keep = active.to(V0.device)
        prev, b_prev = q, torch.where(keep, b, torch.zeros_like(b))
        q = torch.where(keep, w / torch.where(keep, b, torch.ones_like(b)), torch.zeros_like(w))
    return LanczosRun(alpha, beta, lengths, norms.cpu(), n_matvec)


# -- quadrature ------------------------------------------------------------------------------
def _gauss(T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    theta, S = torch.linalg.eigh(T)
    return theta, S[0] ** 2


def _radau(T: torch.Tensor, beta_last: float, a: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Gauss–Radau rule with one node fixed at ``a``: extend :math:`T_k` by
    :math:`\tilde\alpha = a + \delta_k`, :math:`(T_k - aI)\delta = \beta_k^2 e_k`."""
    L = T.shape[0]
    e = torch.zeros(L, dtype=T.dtype)
    e[-1] = beta_last ** 2
    delta = torch.linalg.solve(T - a * torch.eye(L, dtype=T.dtype), e)
    Tr = torch.zeros(L + 1, L + 1, dtype=T.dtype)
    Tr[:L, :L] = T
    Tr[L, L - 1] = Tr[L - 1, L] = beta_last
    Tr[L, L] = a + delta[-1]
    return _gauss(Tr)


@dataclass(frozen=True)
class SLQ:
    """Quadrature rules of the spectral measures of m probes (one Lanczos run each).

    ``gauss[c]`` = (nodes, weights) with weights summing to ‖z_c‖²; ``lower[c]`` the Gauss–Radau
    rule at the lower bound (PSD matrices) or None; ``previous[c]`` the Gauss rule one step
    earlier (the error proxy when there is no bracket).
    """

    gauss: list
    lower: list | None
    previous: list
    dim: int
    steps: int
    n_matvec: int

    @property
    def n_probes(self) -> int:
        return len(self.gauss)

    def _per_probe(self, rules, phi, lam) -> torch.Tensor:
        return torch.stack([(w * (phi(t) if lam is None else phi(t, lam))).sum()
                            for t, w in rules])

    def estimate(self, phi: Callable, lams=None, method: str = "slq") -> StochasticEstimate:
        r""":math:`\mathrm{Tr}\,\varphi(M)` (``lams`` None) or
        :math:`\mathrm{Tr}\,\varphi(M;\lambda)` for each λ of ``lams`` (per-λ arrays in the
        result; value/stderr of the first λ)."""
        grid = [None] if lams is None else [float(x) for x in np.atleast_1d(lams)]
        values, stderrs, sampling, bias, per_probe = [], [], [], [], []
        for lam in grid:
            g = self._per_probe(self.gauss, phi, lam)
            if self.lower is not None:
                r = self._per_probe(self.lower, phi, lam)
                samples, half = (g + r) / 2, (g - r).abs() / 2
            else:
                samples, half = g, (g - self._per_probe(self.previous, phi, lam)).abs()
            m = samples.numel()
            se = float(samples.std(unbiased=True)) / math.sqrt(m) if m > 1 else math.inf
            b = float(half.mean())
            values.append(float(samples.mean()))
            sampling.append(se)
            bias.append(b)
            stderrs.append(math.hypot(se, b))
            per_probe.append(samples.numpy())
        converged = all(b <= max(s, 1e-12 * abs(v)) and math.isfinite(s)
                        for b, s, v in zip(bias, sampling, values))
        diag = {"n_probes": self.n_probes, "lanczos_steps": self.steps,
                "stderr_sampling": np.array(sampling), "quadrature_error": np.array(bias),
                "quadrature_error_kind": "bracket" if self.lower is not None else "last step"}
        arrays = {} if lams is None else {"lams": np.array(grid), "values": np.array(values),
                                          "stderrs": np.array(stderrs)}
        return StochasticEstimate(values[0], stderrs[0], self.n_matvec, converged, method,
                                  samples=per_probe[0], diagnostics=diag, **arrays)


def _rules(run: LanczosRun, lower: float | None):
    gauss, radau, previous = [], [] if lower is not None else None, []
    for c in range(run.alpha.shape[0]):
        z2 = float(run.start_norms[c]) ** 2
        T = run.tridiagonal(c)
        t, w = _gauss(T)
        gauss.append((t, w * z2))
        L = T.shape[0]
        previous.append((t, w * z2) if L == 1 or run.exhausted(c) else
                        (lambda tw: (tw[0], tw[1] * z2))(_gauss(T[:L - 1, :L - 1])))
        if radau is not None:
            if run.exhausted(c):
                radau.append((t, w * z2))
            else:
                a = lower - 1e-12 * float(t.abs().max())
                tr, wr = _radau(T, float(run.beta[c, L - 1]), a)
                radau.append((tr, wr * z2))
    return gauss, radau, previous


def slq(matvec: Callable, dim: int, *, n_probes: int = 10, steps: int = 20, random_state=None,
        lower: float | None = 0.0, block_size: int | None = None, device=None,
        kind: str = "rademacher") -> SLQ:
    r"""Run Lanczos from ``n_probes`` random probes (``block_size`` at a time, default all) and
    return their quadrature rules. ``lower``: a lower bound of the spectrum (0 for PSD matrices:
    enables the Gauss–Radau bracket), or None (indefinite matrices).

    >>> M = torch.diag(torch.linspace(0.0, 2.0, 50, dtype=torch.float64))
    >>> q = slq(lambda X: M @ X, 50, n_probes=4, steps=50, random_state=0)
    >>> est = q.estimate(soft_rank_function, lams=[0.1, 1.0])
    >>> [round(float(v), 6) for v in est.values]  # diagonal M + Rademacher probes: exact
    [41.983702, 22.414309]
    """
    gen = generator_from(random_state)
    Z = probes(dim, n_probes, gen, kind, device)
    bs = n_probes if block_size is None else max(1, int(block_size))
    runs = [lanczos(matvec, Z[:, i:i + bs], steps) for i in range(0, n_probes, bs)]
    gauss, radau, previous = [], [] if lower is not None else None, []
    for run in runs:
        g, r, p = _rules(run, lower)
        gauss += g
        previous += p
        if radau is not None:
            radau += r
    return SLQ(gauss, radau, previous, dim, min(steps, dim), sum(r.n_matvec for r in runs))


# -- extreme eigenvalues ---------------------------------------------------------------------
def lanczos_eigenvalues(matvec: Callable, dim: int, *, k: int = 1, steps: int = 30,
                        which: str = "largest", random_state=None, tol: float = 1e-6,
                        device=None, matvec_rtol: float = 0.0) -> StochasticEstimate:
    r"""The k extreme eigenvalues of M (``which``: 'largest', 'smallest' or 'magnitude') from
    ``steps`` Lanczos steps on one Gaussian start vector. ``values``: the k Ritz values (most
    extreme first); ``stderrs``: error bounds

    .. math:: \min(\rho_i, \rho_i^2/\mathrm{gap}_i) + \delta\,\max_j|\theta_j|,

    the Ritz bound of the operator as computed plus, by Weyl's inequality, the distance
    between its eigenvalues and M's when each product is only accurate to a relative
    ``matvec_rtol`` δ (e.g. the unit roundoff of a float32 model: the Ritz residuals do not
    see rounding in the products). Converged when every Ritz bound is ≤ ``tol``·max|θ| (more
    steps cannot remove the rounding term).

    >>> M = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    >>> est = lanczos_eigenvalues(lambda X: M @ X, 100, k=2, steps=60, random_state=0)
    >>> [round(float(v), 8) for v in est.values], est.converged
    ([100.0, 99.0], True)
    """
    if which not in ("largest", "smallest", "magnitude"):
        raise ValueError(f"which must be 'largest', 'smallest' or 'magnitude'; got {which!r}")
    gen = generator_from(random_state)
    z = probes(dim, 1, gen, "gaussian", device)
    run = lanczos(matvec, z, steps)
    T = run.tridiagonal(0)
    theta, S = torch.linalg.eigh(T)
    L = T.shape[0]
    rho = (float(run.beta[0, L - 1]) * S[L - 1].abs()) if not run.exhausted(0) else \
        torch.zeros(L, dtype=torch.float64)
    key = {"largest": -theta, "smallest": theta, "magnitude": -theta.abs()}[which]
    order = torch.argsort(key)[:k]
    gaps = torch.stack([(theta[i] - theta[torch.arange(L) != i]).abs().min() if L > 1 else
                        torch.tensor(math.inf, dtype=torch.float64) for i in order])
    ritz = torch.minimum(rho[order], rho[order] ** 2 / gaps.clamp_min(1e-300))
    scale = float(theta.abs().max())
    converged = bool((ritz <= tol * max(scale, 1e-300)).all()) and math.isfinite(scale)
    err = ritz + float(matvec_rtol) * scale
    vals = theta[order]
    return StochasticEstimate(float(vals[0]), float(err[0]), run.n_matvec, converged,
                              f"lanczos ({which})", values=vals.numpy(), stderrs=err.numpy(),
                              diagnostics={"ritz_residuals": rho[order].numpy(),
                                           "ritz_bounds": ritz.numpy(),
                                           "rounding_bound": float(matvec_rtol) * scale,
                                           "lanczos_steps": L, "ritz_values": theta.numpy()})


def spectral_density(q: SLQ, grid, width: float | None = None) -> np.ndarray:
    r"""Gaussian-smoothed spectral density from SLQ nodes and weights (Lin, Saad, Yang,
    "Approximating spectral densities of large matrices", SIAM Rev. 2016):

    .. math:: \rho(t) \approx \frac1m\sum_{c=1}^m\sum_i \frac{w_{ci}}{\|z_c\|^2}
              \,\mathcal N(t;\theta_{ci},\sigma^2),

    normalized to integrate to 1 (multiply by the dimension for eigenvalue counts).
    ``width`` σ defaults to 1% of the spread of the nodes."""
    t = torch.as_tensor(np.asarray(grid, dtype=np.float64))
    nodes = torch.cat([n for n, _ in q.gauss])
    weights = torch.cat([w / w.sum() for _, w in q.gauss]) / q.n_probes
    sigma = width if width is not None else 0.01 * float(nodes.max() - nodes.min() or 1.0)
    kern = torch.exp(-0.5 * ((t[:, None] - nodes[None, :]) / sigma) ** 2)
    return (kern @ weights / (sigma * math.sqrt(2 * math.pi))).numpy()
