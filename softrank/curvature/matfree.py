r"""Matrix-free curvature: F, F_MC, C and H as operators, estimated from products only.

Products, streaming over batches and batched over the m columns of V (``torch.func``):

.. math::
    M V = \frac1n\sum_i J_i^\top B_i B_i^\top J_i V,\qquad
    B_i = \begin{cases} \text{factor of } A_i & F\ (\text{GGN})\\
          r_i(\hat y_{i1..s})/\sqrt s & F_{MC}\ (\text{labels drawn from the model})\\
          r_i(y_i) & C\ (\text{gradient second moment; centered: } C - \bar g\bar g^\top)
          \end{cases}

(``jvp`` gives :math:`J_iV`, ``vjp`` brings :math:`B_iB_i^\top J_iV` back), and
:math:`HV` by :func:`~softrank.curvature.hessian.hessian_vector_product`. One product = one
data pass per block of columns; no p×p matrix and no per-sample gradient of length p is formed.

:class:`MatrixFreeCurvature` (``approximation='matrix_free'``) implements the curvature
interface with :mod:`softrank.stochastic` and Krylov solvers:

=====================  ====================================================================
``trace()``            Hutch++ (Meyer et al., 2021)
``soft_rank(lam)``     SLQ of :math:`s/(s+\lambda)` (Ubaru, Chen, Saad, 2017); one Lanczos run
                       serves every scalar λ (``soft_rank_grid``); a non-scalar Λ runs SLQ on
                       :math:`\Lambda^{-1/2}M\Lambda^{-1/2}` with λ = 1
``logdet_dim(lam)``    SLQ of :math:`\log(1+s/\lambda)` (same run)
``eigvals(k)``         the k largest eigenvalues (Lanczos)
``spectral_norm()``    largest :math:`|\sigma|` (Lanczos)
``frobenius_norm()``   Hutch++ on :math:`M^2`
``solve(v, lam)``      CG on :math:`M+\Lambda` (optionally KFAC-preconditioned); MINRES for H
``tic_sum(...)``       :math:`\sum_i g_i^\top(M+\Lambda)^{-1}g_i`: one solve per sample when
                       n ≤ ``n_probes``, else Hutchinson in sample space,
                       :math:`\mathbb E_u[(G^\top u)^\top(M+\Lambda)^{-1}G^\top u]`
                       (u Rademacher in :math:`\mathbb R^n`: C's low rank)
=====================  ====================================================================

Each of them records a :class:`~softrank.stochastic.StochasticEstimate` (value, stderr,
n_matvec, converged) in ``last_estimate``; ``n_matvec`` counts every product. The products are
computed in the model's dtype: the error bars of the traces and extreme eigenvalues include
the rounding of a product (relative accuracy the dtype's machine epsilon), which for a float32
model is what separates two seeds once Lanczos has converged. An estimate whose method did not
converge (Lanczos Ritz bound above ``tol``, SLQ quadrature error above its sampling error, CG /
MINRES residual above ``tol``, a non-finite standard error) raises a
:class:`~sklearn.exceptions.ConvergenceWarning` that says which setting to raise.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state

from .._progress import bar
from ..layers import per_sample_gradients
from ..stochastic import (StochasticEstimate, hutchpp, lanczos_eigenvalues, logdet_function,
                          probes, slq, soft_rank_function, spectral_density)
from .base import Curvature
from .hessian import hessian_vector_product

__all__ = ["MatrixFreeCurvature", "GGNOperator", "conjugate_gradients", "minres", "CGResult",
           "outer_product_matvec", "MATRIX_FREE"]

MATRIX_FREE = "matrix_free"


# -- Krylov solvers ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CGResult:
    x: torch.Tensor  # (p, m)
    iterations: int
    n_matvec: int  # matrix-vector products counted per column
    converged: torch.Tensor  # (m,) bool
    relative_residual: torch.Tensor  # (m,)
    indefinite: torch.Tensor | None = None  # (m,) bool: CG met pᵀ(M+Λ)p ≤ 0


def _prepare_rhs(rhs, shift):
    R = rhs.to(torch.float64)
    single = R.ndim == 1
    if single:
        R = R[:, None]
    shift = torch.as_tensor(shift, dtype=torch.float64, device=R.device)
    shift = shift[:, None] if shift.ndim == 1 else shift
    return R, single, shift


def conjugate_gradients(matvec: Callable, rhs: torch.Tensor, *, shift: torch.Tensor | float = 0.0,
                        precondition: Callable | None = None, tol: float = 1e-8,
                        maxiter: int = 500) -> CGResult:
    r"""Solve :math:`(M + \mathrm{diag}(\text{shift}))X = R` column by column (all columns
    advance together; each stops updating once its relative residual is below ``tol``).
    A column that meets :math:`p^\top(M+\Lambda)p \le 0` is flagged ``indefinite`` and stopped."""
    R, single, shift = _prepare_rhs(rhs, shift)

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
    active = res.norm(dim=0) / norm_b > tol
    indefinite = torch.zeros_like(active)
    it = 0
    for it in bar(range(1, maxiter + 1), desc="CG", unit="iteration"):
        if not active.any():
            it -= 1
            break
        AP = op(P)
        pap = (P * AP).sum(0)
        indefinite |= active & (pap <= 0)
        active &= pap > 0
        alpha = torch.where(active, rz / torch.where(active, pap, torch.ones_like(pap)),
                            torch.zeros_like(rz))
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
    conv = (rel <= tol) & ~indefinite
    return CGResult(X[:, 0] if single else X, it, it, conv.cpu(), rel.cpu(), indefinite.cpu())


def minres(matvec: Callable, rhs: torch.Tensor, *, shift: torch.Tensor | float = 0.0,
           tol: float = 1e-8, maxiter: int = 500) -> CGResult:
    r"""MINRES (Paige & Saunders, 1975) for symmetric, possibly indefinite
    :math:`(M + \mathrm{diag}(\text{shift}))X = R`, all columns together. Minimizes the residual
    over the Krylov space, so it needs no positive definiteness (the Hessian TIC away from a
    minimum); ``relative_residual`` is MINRES's own residual norm estimate."""
    R, single, shift = _prepare_rhs(rhs, shift)
    zeros = torch.zeros(R.shape[1], dtype=torch.float64, device=R.device)
    tiny = torch.finfo(torch.float64).tiny
    beta1 = R.norm(dim=0)
    X = torch.zeros_like(R)
    r1, r2, y = R.clone(), R.clone(), R.clone()
    beta, oldb = beta1.clone(), zeros.clone()
    dbar, epsln, phibar = zeros.clone(), zeros.clone(), beta1.clone()
    cs, sn = -torch.ones_like(zeros), zeros.clone()
    w, w2 = torch.zeros_like(R), torch.zeros_like(R)
    norm_b = beta1.clamp_min(tiny)
    active = phibar / norm_b > tol
    it = 0
    for it in bar(range(1, maxiter + 1), desc="MINRES", unit="iteration"):
        if not active.any():
            it -= 1
            break
        safe_beta = torch.where(beta > 0, beta, torch.ones_like(beta))
        v = y / safe_beta
        y = matvec(v) + shift * v
        if it >= 2:
            y = y - (beta / torch.where(oldb > 0, oldb, torch.ones_like(oldb))) * r1
        alfa = (v * y).sum(0)
        y = y - (alfa / safe_beta) * r2
        r1, r2 = r2, y
        oldb, beta = beta, y.norm(dim=0)
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln, dbar = sn * beta, -cs * beta
        gamma = torch.sqrt(gbar ** 2 + beta ** 2).clamp_min(tiny)
        cs_new, sn_new = gbar / gamma, beta / gamma
        phi = cs_new * phibar
        w1, w2 = w2, w
        w_new = (v - oldeps * w1 - delta * w2) / gamma
        a = active.to(R.dtype)
        X = X + a * phi * w_new
        w = torch.where(active, w_new, w)
        cs, sn = torch.where(active, cs_new, cs), torch.where(active, sn_new, sn)
        phibar = torch.where(active, sn_new * phibar, phibar)
        active = active & (phibar / norm_b > tol) & (beta > 0)
    rel = phibar / norm_b
    return CGResult(X[:, 0] if single else X, it, it, (rel <= tol).cpu(), rel.cpu())


# -- products ----------------------------------------------------------------------------------
def outer_product_matvec(md, V: torch.Tensor, factor: Callable) -> torch.Tensor:
    r""":math:`\frac1n\sum_i J_i^\top B_iB_i^\top J_i V` (float64, on ``md.device``) for V (p, m);
    ``factor(z, y, start)`` gives the (N, K, c) :math:`B_i` of the batch starting at ``start``."""
    outputs, _ = md.functional_loss()
    theta = md.flat_params()
    V = V.to(device=md.device, dtype=theta.dtype)
    out = torch.zeros(V.shape, dtype=torch.float64, device=md.device)
    for start in range(0, md.n, md.batch_size):
        xb = md.X[start:start + md.batch_size].to(md.device)

        def f(th):
            return outputs(th, xb)

        z, vjp = torch.func.vjp(f, theta)
        yb = None if md.y is None else md.family.prepare_target(
            md.y[start:start + md.batch_size].to(md.device), z)
        B = factor(z.detach().double(), yb, start).to(theta.dtype)  # (N, K, c), formed in float64
        JV = torch.func.vmap(lambda v: torch.func.jvp(f, (theta,), (v,))[1], in_dims=1)(V)
        BJV = torch.einsum("nkc,nlc,mnl->mnk", B, B, JV)
        out += torch.func.vmap(lambda u: vjp(u)[0], in_dims=0, out_dims=1)(BJV).double()
    return out / md.n


def _gradient_mean(md) -> torch.Tensor:
    r""":math:`\bar g = \frac1n\sum_i\nabla\ell_i` (float64, on ``md.device``), one pass."""
    _, loss = md.functional_loss()
    theta = md.flat_params()
    g = torch.zeros(theta.shape, dtype=torch.float64, device=md.device)
    for start in range(0, md.n, md.batch_size):
        sl = slice(start, start + md.batch_size)
        g += torch.func.grad(loss)(theta, md.X[sl].to(md.device), md.y[sl].to(md.device)).double()
    return g / md.n


# -- the representation --------------------------------------------------------------------------
_VECTORS = {"fisher": "fisher", "fisher_mc": "sampled", "gsm": "residual"}
_SEED_OFFSETS = {"trace": 1, "slq": 2, "eig": 3, "frobenius": 4, "tic": 5, "smallest": 6}
_ADVICE = {"lanczos": "raise lanczos_steps", "slq": "raise lanczos_steps (the quadrature "
           "error exceeds the sampling error)", "hutch": "use more than one probe (n_probes)",
           "solve": "raise maxiter (CG / MINRES iterations) or use a preconditioner"}


class MatrixFreeCurvature(Curvature):
    r"""F, F_MC, C or H (``matrix``) known only through products; every estimate is stochastic
    or iterative and records its error bar in ``last_estimate``.

    Parameters
    ----------
    n_probes : int
        Random vectors per estimate (SLQ probes, Hutch++ budget / 3, TIC probes).
    lanczos_steps : int
        Lanczos steps per probe (SLQ) and for extreme eigenvalues.
    tol : float
        Relative residual tolerance of CG / MINRES.
    maxiter : int
        Iteration cap of CG / MINRES.
    preconditioner : None, 'kfac', 'diagonal' or a :class:`Curvature`
        Whose ``solve`` preconditions CG (for H: KFAC / diagonal of F, with CG instead of
        MINRES).
    block_size : int or None
        At most this many probe vectors per batched product (memory: the Lanczos basis
        holds lanczos_steps·p·block_size floats).
    random_state : int, RandomState or None
        Seeds the probes (each method its own stream: repeated calls give the same
        estimate) and, for ``fisher_mc``, the sampled labels (drawn alike in every product, as
        ``curvature(..., 'fisher_mc', 'dense', random_state=...)`` draws them).
    """

    approximation = MATRIX_FREE
    exact = False
    #: warn (ConvergenceWarning) when an estimate's method did not converge
    warn_not_converged = True

    def __init__(self, md, matrix: str = "fisher", *, random_state=None, mc_samples: int = 1,
                 centered: bool = False, n_probes: int = 30, lanczos_steps: int = 30,
                 tol: float = 1e-6, maxiter: int = 1000, preconditioner=None,
                 block_size: int | None = None):
        super().__init__(md.param_names, md.sizes, md.n)
        if matrix not in ("fisher", "fisher_mc", "gsm", "hessian"):
            raise ValueError(f"unknown matrix {matrix!r}")
        if matrix in ("gsm", "hessian"):
            md.require_labels(f"matrix={matrix!r}")
        if centered and matrix != "gsm":
            raise ValueError("centered=True applies to matrix='gsm' only")
        self.md, self.matrix, self.centered, self.mc_samples = md, matrix, centered, mc_samples
        self.n_probes, self.lanczos_steps = int(n_probes), int(lanczos_steps)
        self.tol, self.maxiter, self.block_size = tol, maxiter, block_size
        rs = check_random_state(random_state)
        self._mc_seed = int(rs.randint(np.iinfo(np.int32).max))  # = make_generator's seed
        self._probe_seed = int(rs.randint(np.iinfo(np.int32).max))
        self._preconditioner_spec = preconditioner
        self._preconditioner = None
        self._gbar = None
        self._slq_cache: dict = {}
        self.n_matvec = 0
        self.last_cg: CGResult | None = None
        self.last_estimate: StochasticEstimate | None = None

    # -- products ------------------------------------------------------------------------------
    def _factor(self, z, y, start):
        fam = self.md.family
        if self.matrix == "fisher":
            return fam.factor(z, y)
        if self.matrix == "gsm":
            return fam.residual(z, y).unsqueeze(2)
        gen = self._mc_generator
        return torch.stack([fam.sampled_residual(z, gen) for _ in range(self.mc_samples)],
                           2) / self.mc_samples ** 0.5

    def _product(self, V: torch.Tensor) -> torch.Tensor:
        """M V on ``md.device`` (float64), counted."""
        self.n_matvec += V.shape[1]
        if self.matrix == "hessian":
            return hessian_vector_product(self.md, V)
        if self.matrix == "fisher_mc":  # same labels in every product, drawn in batch order
            self._mc_generator = torch.Generator(device=self.md.device).manual_seed(self._mc_seed)
        out = outer_product_matvec(self.md, V, self._factor)
        if self.centered:
            g = self.gradient_mean()
            out -= torch.outer(g, g @ V.to(g))
        return out

    def gradient_mean(self) -> torch.Tensor:
        if self._gbar is None:
            self._gbar = _gradient_mean(self.md)
        return self._gbar

    def _on_device(self, fn):
        """Wrap an operator on ``md.device`` (float64) for inputs on any device."""
        dev = self.md.device

        def op(X):
            return fn(X.to(dev, torch.float64))
        return op

    def _scaled_product(self, d: torch.Tensor | None):
        """X ↦ D M D X with D = Λ^{-1/2} (None: M)."""
        if d is None:
            return self._product
        d = d.to(self.md.device)[:, None]
        return lambda X: d * self._product(d * X)

    def _generator(self, what, random_state):
        if random_state is not None:
            from ..stochastic.hutchinson import generator_from
            return generator_from(random_state)
        return torch.Generator().manual_seed(self._probe_seed + _SEED_OFFSETS[what])

    @property
    def matvec_rtol(self) -> float:
        """Relative accuracy of one product: the machine epsilon of the model's dtype."""
        return float(torch.finfo(self.md.dtype).eps)

    def _record(self, est: StochasticEstimate, warn: bool = True) -> float:
        self.last_estimate = est
        if warn and self.warn_not_converged and not est.converged:
            residual = est.diagnostics.get("max_relative_residual")
            key = "solve" if residual is not None else \
                next((k for k in _ADVICE if est.method.startswith(k)), None)
            detail = f" (relative residual {residual:.3g} > tol={self.tol:g})" \
                if residual is not None else ""
            warnings.warn(f"matrix_free {self.matrix}: {est.method} did not converge{detail}; "
                          f"{_ADVICE.get(key, 'raise its budget')} (estimate {est.value:.6g} ± "
                          f"{est.stderr:.3g})",
                          ConvergenceWarning, stacklevel=3)
        return est.value

    # -- interface -----------------------------------------------------------------------------
    def matvec(self, v):
        single = v.ndim == 1
        V = v[:, None] if single else v
        out = self._product(V.to(self.md.device, torch.float64)).to(v.device)
        return out[:, 0] if single else out

    def diagonal(self):
        """Exact diagonal (layer rules) for F, F_MC and C; not available for H."""
        if self.matrix == "hessian":
            raise self._unsupported("diagonal() of the Hessian")
        from .diagonal import DiagonalCurvature
        gen = torch.Generator(device=self.md.device).manual_seed(self._mc_seed) \
            if self.matrix == "fisher_mc" else None
        return DiagonalCurvature(self.md, self.matrix, _VECTORS[self.matrix], generator=gen,
                                 mc_samples=self.mc_samples, centered=self.centered).diagonal()

    def trace(self, n_matvec: int | None = None, random_state=None) -> float:
        r"""Hutch++ estimate of :math:`\mathrm{Tr}\,M` (default budget 3·``n_probes``)."""
        est = hutchpp(self._product, self.n_params, n_matvec or 3 * self.n_probes,
                      random_state=self._generator("trace", random_state),
                      block_size=self.block_size, device=self.md.device,
                      matvec_rtol=self.matvec_rtol)
        return self._record(est)

    def frobenius_norm(self, n_matvec: int | None = None, random_state=None) -> float:
        r""":math:`\|M\|_F = \sqrt{\mathrm{Tr}\,M^2}`, Hutch++ on :math:`M^2`; the stderr by the
        delta method, :math:`\mathrm{se}(\|M\|_F) = \mathrm{se}(\|M\|_F^2)/(2\|M\|_F)`."""
        sq = hutchpp(self._product, self.n_params, n_matvec or 3 * self.n_probes, square=True,
                     random_state=self._generator("frobenius", random_state),
                     block_size=self.block_size, device=self.md.device,
                     matvec_rtol=self.matvec_rtol)
        value = math.sqrt(max(sq.value, 0.0))
        est = StochasticEstimate(value, sq.stderr / (2 * value) if value > 0 else sq.stderr,
                                 sq.n_matvec, sq.converged, "hutch++ (M²)",
                                 diagnostics={"squared": sq.value, "squared_stderr": sq.stderr})
        return self._record(est)

    def _extreme(self, which, k, steps, random_state, what="eig") -> StochasticEstimate:
        return lanczos_eigenvalues(self._product, self.n_params, k=k,
                                   steps=steps or self.lanczos_steps, which=which,
                                   random_state=self._generator(what, random_state),
                                   tol=self.tol, device=self.md.device,
                                   matvec_rtol=self.matvec_rtol)

    def eigvals(self, k: int = 10, steps: int | None = None, random_state=None) -> torch.Tensor:
        """The k largest eigenvalues (Lanczos Ritz values), ascending like the other
        representations' ``eigvals`` — but only k of them."""
        est = self._extreme("largest", k, steps, random_state)
        self._record(est)
        return torch.as_tensor(np.sort(est.values), dtype=torch.float64)

    def largest_eigenvalue(self, steps: int | None = None, random_state=None) -> float:
        return self._record(self._extreme("largest", 1, steps, random_state))

    def smallest_eigenvalue(self, steps: int | None = None, random_state=None) -> float:
        """Lanczos' smallest Ritz value: an upper bound of λ_min that converges to it."""
        return self._record(self._extreme("smallest", 1, steps, random_state, "smallest"))

    def spectral_norm(self, steps: int | None = None, random_state=None) -> float:
        r""":math:`\|M\|_2 = \max_j|\sigma_j|` by Lanczos (``lanczos_steps`` products)."""
        est = self._extreme("magnitude", 1, steps, random_state)
        est = StochasticEstimate(abs(est.value), est.stderr, est.n_matvec, est.converged,
                                 est.method, values=np.abs(est.values), stderrs=est.stderrs,
                                 diagnostics=est.diagnostics)
        return self._record(est)

    # -- SLQ -----------------------------------------------------------------------------------
    def quadrature(self, lam=None, n_probes=None, steps=None, random_state=None):
        r"""The (cached) SLQ rules of M (``lam`` None or scalar) or of
        :math:`\Lambda^{-1/2}M\Lambda^{-1/2}` (non-scalar Λ)."""
        L = None if lam is None else self.lam(lam)
        d = None if L is None or L.scalar is not None else L.vector.rsqrt()
        n_probes, steps = n_probes or self.n_probes, steps or self.lanczos_steps
        key = (None if d is None else hash(d.numpy().tobytes()), n_probes, steps,
               None if random_state is None else repr(random_state))
        if key not in self._slq_cache:
            lower = None if self.matrix == "hessian" else 0.0
            self._slq_cache[key] = slq(self._scaled_product(d), self.n_params, n_probes=n_probes,
                                       steps=steps, lower=lower, block_size=self.block_size,
                                       random_state=self._generator("slq", random_state),
                                       device=self.md.device)
        return self._slq_cache[key]

    def _slq_estimate(self, phi, lam, what, **kw) -> StochasticEstimate:
        L = self.lam(lam)
        if L.scalar is None:  # Tr φ(Λ^{-1/2} M Λ^{-1/2}) with λ = 1
            return self.quadrature(L, **kw).estimate(phi, [1.0], what)
        return self.quadrature(None, **kw).estimate(phi, [L.scalar], what)

    def soft_rank(self, lam, **kw) -> float:
        r""":math:`\mathrm{Tr}\,M(M+\Lambda)^{-1}` by SLQ (``n_probes`` × ``lanczos_steps``
        products, shared by every scalar λ)."""
        return self._record(self._slq_estimate(soft_rank_function, lam, "slq soft rank", **kw))

    def logdet_dim(self, lam, **kw) -> float:
        r""":math:`\sum_j\log(1+\sigma_j/\lambda)` by SLQ (same Lanczos run as ``soft_rank``)."""
        return self._record(self._slq_estimate(logdet_function, lam, "slq logdet", **kw))

    def soft_rank_grid(self, lams, **kw) -> np.ndarray:
        """Soft ranks for a grid of scalar λ from one Lanczos run; per-λ stderrs in
        ``last_estimate.stderrs``."""
        grid = [self.lam(float(x)).scalar for x in np.atleast_1d(lams)]
        est = self.quadrature(None, **kw).estimate(soft_rank_function, grid, "slq soft rank")
        self._record(est)
        return est.values

    def logdet_grid(self, lams, **kw) -> np.ndarray:
        """Log-det dimensions for a grid of scalar λ from the same Lanczos run."""
        grid = [self.lam(float(x)).scalar for x in np.atleast_1d(lams)]
        est = self.quadrature(None, **kw).estimate(logdet_function, grid, "slq logdet")
        self._record(est)
        return est.values

    def spectral_density(self, grid, width: float | None = None, **kw) -> np.ndarray:
        """Smoothed eigenvalue density on ``grid`` (integrates to 1) from the SLQ rules."""
        return spectral_density(self.quadrature(None, **kw), grid, width)

    # -- solves --------------------------------------------------------------------------------
    def _precondition(self, L):
        spec = self._preconditioner_spec
        if spec is None:
            return None
        if self._preconditioner is None:
            if isinstance(spec, Curvature):
                self._preconditioner = spec
            elif spec in ("kfac", "diagonal"):
                from . import curvature
                base = "gsm" if self.matrix == "gsm" else "fisher"
                self._preconditioner = curvature(self.md, base, spec)
            else:
                raise ValueError(f"preconditioner must be None, 'kfac', 'diagonal' or a "
                                 f"Curvature; got {spec!r}")
        P = self._preconditioner
        return lambda X: P.solve(X.cpu(), L).to(X.device, torch.float64)

    def solve(self, v, lam):
        r""":math:`(M+\Lambda)^{-1}v` by CG (MINRES for the Hessian unless preconditioned).
        ``last_cg`` keeps the solver's result; ``last_estimate.value`` is the largest relative
        residual."""
        return self._solve(v, self.lam(lam), warn=True)

    def _solve(self, v, L, warn: bool):
        """``solve`` with a resolved Λ; ``warn=False`` inside a larger estimate (it warns)."""
        prec = self._precondition(L)
        rhs = v.to(self.md.device, torch.float64)
        shift = L.vector.to(self.md.device)
        if self.matrix == "hessian" and prec is None:
            res = minres(self._product, rhs, shift=shift, tol=self.tol, maxiter=self.maxiter)
            method = "minres"
        else:
            res = conjugate_gradients(self._product, rhs, shift=shift, precondition=prec,
                                      tol=self.tol, maxiter=self.maxiter)
            method = "cg" + (" (preconditioned)" if prec is not None else "")
        self.last_cg = res
        cols = res.relative_residual.numel()
        diag = {"iterations": res.iterations, "max_relative_residual":
                float(res.relative_residual.max())}
        if res.indefinite is not None and bool(res.indefinite.any()):
            diag["indefinite"] = True
        self._record(StochasticEstimate(float(res.relative_residual.max()), 0.0,
                                        res.iterations * cols, bool(res.converged.all()), method,
                                        diagnostics=diag), warn=warn)
        return res.x.to(v.device)

    def tic_sum(self, rules, feats, lam, n_probes: int | None = None, random_state=None) -> float:
        r""":math:`\sum_i g_i^\top(M+\Lambda)^{-1}g_i` over the per-sample gradients in ``feats``.

        n ≤ ``n_probes``: one solve per sample (exact up to the solver tolerance). Otherwise
        Hutchinson in sample space: with Rademacher :math:`u\in\mathbb R^n`,
        :math:`w = G^\top u = \sum_i u_i g_i` (one pass over ``feats``, all probes at once) and
        :math:`\mathbb E[w^\top (M+\Lambda)^{-1} w] = \mathrm{Tr}\,G(M+\Lambda)^{-1}G^\top`."""
        L = self.lam(lam)
        m = n_probes or self.n_probes
        if self.n_samples <= m:
            return self._tic_exact(rules, feats, L)
        gen = self._generator("tic", random_state)
        W = torch.zeros(self.n_params, m, dtype=torch.float64, device=self.md.device)
        for b in feats:
            V, N = b.layers[0].g.shape[:2]
            Ub = probes(V * N, m, gen).T.reshape(m, V, N).to(b.layers[0].g)
            W += torch.stack([torch.cat([r.vjp(lb, u) for r, lb in zip(rules, b.layers)])
                              for u in Ub], 1).to(W)
        X = self._solve(W, L, warn=False).to(W)
        cg = self.last_estimate
        samples = (W * X).sum(0).cpu()
        se = float(samples.std(unbiased=True)) / math.sqrt(m)
        est = StochasticEstimate(float(samples.mean()), se, m + cg.n_matvec, cg.converged,
                                 "hutchinson (sample space) + " + cg.method,
                                 samples=samples.numpy(), diagnostics={**cg.diagnostics,
                                                                       "n_probes": m})
        return self._record(est)

    def _tic_exact(self, rules, feats, L) -> float:
        total, n_matvec, converged, worst = 0.0, 0, True, 0.0
        for b in feats:
            G = per_sample_gradients(rules, b.layers)
            G = G.reshape(-1, G.shape[-1]).to(self.md.device, torch.float64)
            X = self._solve(G.T, L, warn=False)
            total += float((G * X.T).sum())
            n_matvec += self.last_estimate.n_matvec
            converged &= self.last_estimate.converged
            worst = max(worst, self.last_estimate.value)
        est = StochasticEstimate(total, 0.0, n_matvec, converged, "per-sample solves",
                                 diagnostics={"max_relative_residual": worst})
        return self._record(est)

    def is_positive_definite_with(self, lam) -> bool:
        """Lanczos check: False when the smallest Ritz value of M plus min Λ is ≤ 0 (then M+Λ
        is certainly indefinite); True otherwise (the Ritz value bounds λ_min from above)."""
        smallest = self._extreme("smallest", 1, None, None, "smallest").value
        return smallest + float(self.lam(lam).vector.min()) > 0


class GGNOperator(MatrixFreeCurvature):
    """F (GGN) as an operator: ``matvec`` streams the data; ``solve`` runs CG (preconditioned by
    the :class:`Curvature` ``preconditioner`` if given). Kept for ApproxLOO."""

    exact = True
    warn_not_converged = False  # ApproxLOO reads last_cg and reports convergence itself

    def __init__(self, md, *, tol: float = 1e-10, maxiter: int = 1000,
                 preconditioner: Curvature | None = None):
        super().__init__(md, "fisher", tol=tol, maxiter=maxiter, preconditioner=preconditioner)
