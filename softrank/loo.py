r"""Approximate leave-one-out in output space.

For the objective :math:`\sum_i \ell_i + \frac n2\theta^\top\Lambda\theta` (Gauss–Newton
Hessian :math:`H = n(F+\Lambda)`), removing point i and taking one Newton step moves its output to

.. math::
    z_i^{(-i)} = z_i + Q_i r_i,\qquad
    Q_i = P_i (I - A_i P_i)^{-1} = J_i\,\big(H - J_i^\top A_i J_i\big)^{-1} J_i^\top,\qquad
    P_i = J_i H^{-1} J_i^\top\ (K\times K),

with :math:`r_i = \partial\ell_i/\partial z_i` at the true label. :math:`Q_i` is the *cavity*
covariance: the point's outputs seen by the Hessian of the other points. The estimated test loss
is :math:`\frac1n\sum_i \ell(y_i, z_i^{(-i)})`; the gap estimate subtracts the training loss.
Identities: :math:`\sum_i \mathrm{tr}(A_iP_i) = \mathrm{rank}_\Lambda(F)` and
:math:`\frac1n\sum_i r_i^\top P_i r_i` is the Fisher-TIC gap estimate (the first-order term).
For MSE the step is exact: the classical leave-one-out (PRESS) shortcut.

Λ may be a scalar, a dict {parameter name: value} or a (p,) tensor (the diagonal of Λ), for every
method. Ways to get :math:`P_i` (``method``):

* ``'exact'`` — Woodbury on the kernel :math:`J D^{-1} J^\top` with :math:`D = n\Lambda`:
  :math:`P_i = \Theta_{ii} - \Theta_{iS}\tilde B(I + \tilde B^\top\Theta_{SS}\tilde B)^{-1}
  \tilde B^\top\Theta_{Si}` with :math:`\Theta = J(n\Lambda)^{-1}J^\top`, one Cholesky of size
  n(K−1) (softmax) and no per-sample gradient of length p (the kernel is summed layer by layer);
  where p < nK, the same blocks in parameter space instead: the p × p Gauss–Newton Hessian
  plus nΛ, its Cholesky, and per sample :math:`P_i = J_iH^{-1}J_i^\top` by a triangular solve
  (time ∝ n·K·p², memory p², flat in n: within reach at any n for small nets);
* ``'cavity'`` — valid by construction at any n: ``n_points`` random points S are kept exactly
  and the other n − m points are replaced by the EKFAC approximation of the Fisher (George et al.,
  2018), shrunk self-consistently, :math:`\tilde H = \sum_{j\in S}J_j^\top A_jJ_j +
  s\,(n-m)\tilde F_{\mathrm{EKFAC}} + n\Lambda`. For i ∈ S the own term
  :math:`J_i^\top A_iJ_i` is exact, so the cavity :math:`Q_i = J_i(\tilde H - J_i^\top
  A_iJ_i)^{-1}J_i^\top` is positive semi-definite and bounded by :math:`J_i(s(n-m)\tilde F +
  n\Lambda)^{-1}J_i^\top`: no point can blow up or turn negative because of the
  approximation (the cavity / TAP leave-one-out of Opper & Winther, 2000, on top of an
  approximate curvature). The shrinkage 0 < s ≤ 1: the inverse of a sum of per-point terms is
  not the inverse of their mean — each other point enters shrunk by its own leverage
  :math:`I - M_j`, :math:`M_j = B_j^\top J_jH^{-1}J_j^\top B_j` — so s is the
  (:math:`\mathrm{tr}\,B_j^\top J_jJ_j^\top B_j`-weighted) mean of :math:`I - M_j` over the
  measured points, a fixed point since the :math:`M_j` depend on s (the deterministic
  equivalent of Silverstein & Bai, 1995). Without it (s = 1) the gap was 0.32–1.13× the exact
  one on the same points on MNIST MLPs, far too small at small λ, where each point's cavity
  depends on how little the other points' gradients explain its own; with it, 1.09–1.42×
  with 10–33 % of the points kept and 1.22–1.37× with 3.3 % (EKFAC's structure, a diagonal in
  the Kronecker eigenbasis, is what remains; it grows as fewer points are kept, then levels
  off; gap against gap, 0.98–1.75× with 8 % kept over the study's MLPs at n = 1,200).
  The estimate is not the plain mean over S: every curvature sample j also gets the cavity
  step with *all* the other points through the shrunk EKFAC,
  :math:`J_j(s(n-1)\tilde F + n\Lambda)^{-1}J_j^\top` (one pass over the data, no kernel),
  a control variate that follows the kept points' values closely, and the gap, the soft rank
  and the first-order term are regression estimates on it (Cochran, 1977) with
  heteroscedasticity-consistent standard errors (HC3; MacKinnon & White, 1985): the control
  variate's mean over every point, corrected by how the kept points differ from it. Memory is
  that of an m(K−1) kernel, flat in n. The standard error covers the sampling of points, not
  the approximation's bias, which the control variate does not remove (the benchmarks page
  has the tables);
* ``'nystrom'`` — ``n_points`` random points S kept exactly, as in ``'cavity'``, but the other
  points approximated in data space instead of through EKFAC: with
  :math:`G = U^\top(n\Lambda)^{-1}U` the kernel of every curvature sample's Fisher rows
  (:math:`U_j = J_j^\top B_j`), every entry of G that involves a kept point is exact, and
  between two other points only their projection on the span of the kept points' rows is
  kept, plus each one's own residual on the diagonal — the Nyström approximation with the
  diagonal kept exact (FITC of sparse Gaussian processes; Snelson & Ghahramani, 2006;
  Quiñonero-Candela & Rasmussen, 2005). The approximate kernel is positive semi-definite and
  each kept point's own term exact, so every step is valid by construction; with S every
  point it is ``'exact'``; no shrinkage, no EKFAC in the blocks (the control variate and the
  regression estimate are those of ``'cavity'``, its s the fixed point of the control
  variate's own leverages on the kept points). Its bias, measured on wide finished MNIST
  MLPs (many more parameters than nK; n = 1,000 and 3,000, λ from 1e-4 to 1e-1), is
  *downward* and shrinks as more points are kept: the gap was 4.2 % below to 5.3 % above
  the exact one with 300 kept, 5–12 % below with 100 and 15–67 % below with 30, where
  ``'cavity'`` on the same points was 10–142 % above — the two bracketed the exact value on
  those points on every such net (a measured property, not a bound). On a narrow one with
  fewer parameters than nK (784-8-10, n = 5,000) it was *upward*: +26 % with 300 points,
  +3.7 % with 600, its per-point values ranked as the exact ones: the direction depends on
  the net, and the standard error does not cover it. Time ∝ N·m² over N curvature samples
  (the kernel of S against every sample, and per batch a product of size m(K−1)), memory that of an m(K−1) square, flat in n. It
  uses ``softrank.memory.LOO_NYSTROM_SAMPLES_PER_POINT`` (10) curvature samples per point
  kept — its points and random others — where those are at most half of them, so that its
  time, ∝ m³ then, does not grow with n. On such a subsample (N of the n training points)
  each other sample stands for (n − m)/(N − m) points, and the inverse of that sampled sum is
  biased upward (on MNIST at n = 60,000, 300 points kept: +10 %, +21 % and +40 % with 10,000,
  6,000 and 3,000 samples, against all of them), so the method jackknifes it: the other
  samples in five groups, each point's values recomputed with each group left out, and
  G·(all) − (G − 1)·(mean with one left out) taken per point (the delete-a-group jackknife;
  Quenouille, 1956; Efron & Stein, 1981), its variance added to the standard error — on the
  same runs −3.3 %, −0.1 % and +3.3 % of the gap with every sample, within one standard error.
  At n = 60,000 on a small CNN (p = 9,098; the exact method in parameter space) the
  default's gap was 2.4 % below the exact one (31 % with 100 points); on an MLP 784-512-10,
  with no exact reference, it rose with the points kept (0.053 with 300, 0.064 with 600,
  0.066 with 1,000): there the default's is likely about 20 % low;
* ``'kfac'`` — :math:`P_i` from the Kronecker factors' eigenbases, one sample at a time, any n.
  Its failure mode: KFAC spreads each point's own curvature over the layer, so on wide or
  memorizing nets :math:`A_iP_i` reaches eigenvalues ≥ 1 for many points (invalid steps, counted
  in the diagnostics and warned about);
* ``'subsample'`` — ``n_points`` random points, :math:`P_i` from conjugate gradients (K
  right-hand sides per point) against the full-data Fisher, with a standard error over points;
* ``'auto'`` — ``'exact'`` while the memory of its data-space form (an n·K kernel, estimated
  with K columns per point) stays below ``softrank.memory.LOO_AUTO_EXACT_BYTES``, whichever
  form it then runs in; above it ``'nystrom'``.

A non-scalar Λ enters KFAC and EKFAC through its diagonal in their eigenbasis (exact when Λ is
constant on each layer); ``'exact'`` and ``'subsample'`` use it exactly.

References
----------
Cochran, W. G. (1977). *Sampling Techniques*, 3rd ed., ch. 7. Wiley. —
Snelson, E. & Ghahramani, Z. (2006). Sparse Gaussian processes using pseudo-inputs. *NeurIPS*.
— Quiñonero-Candela, J. & Rasmussen, C. E. (2005). A unifying view of sparse approximate
Gaussian process regression. *JMLR* 6. — MacKinnon, J. G. &
White, H. (1985). Some heteroskedasticity-consistent covariance matrix estimators with improved
finite sample properties. *Journal of Econometrics* 29(3). —
Opper, M. & Winther, O. (2000). Gaussian processes for classification: mean-field algorithms.
*Neural Computation* 12(11). — Silverstein, J. W. & Bai, Z. D. (1995). On the empirical
distribution of eigenvalues of a class of large dimensional random matrices. *Journal of
Multivariate Analysis* 54(2). — Rad, K. R. & Maleki, A. (2020). A scalable estimate of the
out-of-sample prediction error via approximate leave-one-out cross-validation. *JRSS B* 82(4).
— George, T., Laurent, C., Bouthillier, X., Ballas, N. & Vincent, P. (2018). Fast approximate
natural gradient descent in a Kronecker-factored eigenbasis. *NeurIPS*.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.utils import check_random_state

from . import memory
from .curvature import KroneckerCurvature, per_sample_jacobians
from .curvature.base import Curvature
from .curvature.kronecker import KroneckerSums, require_kfac_capable
from .curvature.matfree import GGNOperator
from ._symmetric_sum import SymmetricSum
from .layers import LayerBatch, per_sample_gradients
from .regularization import Lam, as_lam

__all__ = ["LOOResult", "approx_loo", "LOO_METHODS"]

LOO_METHODS = ("auto", "exact", "nystrom", "cavity", "kfac", "subsample")
#: the methods that measure a sample of points (``n_points``, ``indices``)
_SAMPLING = ("nystrom", "cavity", "subsample")
#: kernel elements per chunk of the general (rotated, per-element weighted) layer kernel
_CHUNK_ELEMENTS = 1 << 23
#: groups of the delete-a-group jackknife of method='nystrom' on a curvature subsample (each
#: other sample in one group of a fixed random partition; see _nystrom_blocks)
_JACKKNIFE_GROUPS = 5
#: how method='cavity' treats the points outside its subset (see _cavity_blocks)
_CAVITY_REST = "ekfac"
#: relative change of the shrinkage s at which its fixed-point iteration stops (_rest_shrinkage)
_SHRINK_RTOL = 1e-2
_SHRINK_MAXITER = 100
#: whether that iteration on all the points also stops once s changes by less than its
#: standard error over the points
_SHRINK_WITHIN_STDERR = True
#: 'subsample' reports its standard error while the conjugate-gradient error bound on the gap
#: stays below this share of it (then the solver's error is negligible beside the sampling's)
_SOLVER_SHARE = 0.1
#: how every warning of :func:`approx_loo` begins (callers that record the diagnostics instead,
#: such as the study, filter on it)
WARNING_PREFIX = "Approximate leave-one-out"


@dataclass(frozen=True)
class LOOResult:
    """Result of :func:`approx_loo`. Per-point arrays follow ``indices``."""

    estimated_test_loss: float
    train_loss: float
    gap: float
    stderr: float | None
    loo_losses: np.ndarray
    point_losses: np.ndarray
    loo_outputs: np.ndarray  # z_i^(-i), (m, K)
    indices: np.ndarray
    soft_rank: float
    first_order_gap: float
    method: str
    n: int
    lam: object
    diagnostics: dict = field(default_factory=dict)


# -- D^{-1} per layer, in a basis -------------------------------------------------------------
@dataclass(frozen=True)
class _Weights:
    r""":math:`D^{-1}` block diagonal over layers: per rule the elementwise weights ``W`` of the
    per-sample gradients in the basis ``(UG, UA)`` (None: the parameters themselves);
    ``W`` is (d_out, d_in~) for Linear/Conv2d rules (joint [W | b] block), (numel,) otherwise.
    ``per_tensor``: the values when ``W`` is constant on each parameter tensor and unrotated
    (the layer rules' own kernels apply)."""

    W: list
    UA: list | None = None
    UG: list | None = None
    per_tensor: tuple | None = None


def _lam_blocks(rules, L: Lam) -> list:
    """Λ per rule: (d_out, d_in~) for Kronecker rules, flat otherwise."""
    out, i = [], 0
    for r in rules:
        v = L.vector[i:i + r.numel]
        out.append(r.from_flat(v) if r.kfac_capable else v)
        i += r.numel
    return out


def _lam_weights(rules, L: Lam, scale: float) -> _Weights:
    """:math:`D = \\text{scale}\\cdot\\Lambda`."""
    W = [1.0 / (scale * b) for b in _lam_blocks(rules, L)]
    pt = None if L.per_tensor is None else tuple(1.0 / (scale * v) for v in L.per_tensor)
    return _Weights(W, per_tensor=pt)


def _eigenbasis_weights(F: KroneckerCurvature, L: Lam, rest: float, scale: float) -> _Weights:
    r""":math:`D = \text{rest}\cdot\tilde F + \text{scale}\cdot\Lambda` in the Kronecker
    eigenbasis of ``F``, with Λ replaced by its diagonal there,
    :math:`(U_G^{\circ 2})^\top\Lambda_l\,U_A^{\circ 2}` (exact when Λ is constant on the layer)."""
    W = []
    for lam_l, UA, UG, E in zip(_lam_blocks(F.rules, L), F.UA, F.UG, F.E):
        lam_rot = (UG ** 2).T @ lam_l @ (UA ** 2)
        W.append(1.0 / (rest * E + scale * lam_rot))
    return _Weights(W, list(F.UA), list(F.UG))


# -- kernels J_a D^{-1} J_bᵀ, layer by layer --------------------------------------------------
def _coords(r, lb, w: _Weights, k: int):
    """(x, y) with per-sample gradient rows Σ x yᵀ (T = 1: x (V, N, d_out), y (N, d_in~)), or
    (rotated per-sample matrices (V, N, d_out, d_in~), None)."""
    if w.UA is not None:
        return r.eigen_coords(lb, w.UA[k].to(lb.g.device), w.UG[k].to(lb.g.device))
    if lb.a.shape[1] == 1:
        return lb.g[:, :, 0], r.kfac_rows(lb)[0]
    return r.per_sample_matrices(lb), None


def _layer_kernel(r, lb1, lb2, w: _Weights, k: int) -> torch.Tensor:
    """(N1, V1, N2, V2) block of Θ for one layer."""
    W = w.W[k].to(lb1.g.device)
    if not r.kfac_capable:
        s1, s2 = r.per_sample_grads(lb1) * W, r.per_sample_grads(lb2)
        return torch.einsum("vnq,wmq->nvmw", s1, s2)
    x1, y1 = _coords(r, lb1, w, k)
    x2, y2 = _coords(r, lb2, w, k)
    if y1 is None:
        return torch.einsum("vnq,wmq->nvmw", (x1 * W).flatten(2), x2.flatten(2))
    (V1, N1, o), (N2, d) = x1.shape, y2.shape
    out = torch.empty(N1, V1, N2, x2.shape[0], dtype=torch.float64, device=x1.device)
    x1s = x1.transpose(0, 1).contiguous()  # (N1, V1, d_out)
    x2s = x2.permute(1, 2, 0).contiguous()  # (N2, d_out, V2)
    step = max(1, _CHUNK_ELEMENTS // (N2 * (d + o)))
    for s in range(0, N1, step):  # Σ_o x1_o x2_o Σ_k W_ok y1_k y2_k, per pair of samples
        U = (y1[s:s + step, None, :] * y2[None]) @ W.T  # (c, N2, d_out): the GEMM-bound part
        for i in range(U.shape[0]):  # then per sample one batch of small products, no (c, N2,
            # V, d_out) temporary (memory-bound: twice the time of the GEMM above)
            out[s + i] = torch.bmm(U[i, :, None, :] * x1s[s + i], x2s).transpose(0, 1)
    return out


def _kernel(rules, f1, f2, w: _Weights) -> torch.Tensor:
    """(N1·V1, N2·V2) kernel between two batches of layer records, rows sample-major."""
    blk = None
    if w.per_tensor is not None:
        i = 0
        for r, a, b in zip(rules, f1, f2):
            t = r.kernel(a, b, w.per_tensor[i:i + len(r.param_names)])
            blk = t if blk is None else blk.add_(t)
            i += len(r.param_names)
    else:
        for k, (r, a, b) in enumerate(zip(rules, f1, f2)):
            t = _layer_kernel(r, a, b, w, k)
            blk = t if blk is None else blk.add_(t)
    N1, V1, N2, V2 = blk.shape
    return blk.reshape(N1 * V1, N2 * V2)


def _own_blocks(rules, layers, w: _Weights) -> torch.Tensor:
    r"""(N, V, V) own blocks :math:`G_i D^{-1} G_i^\top` of the rows recorded in ``layers``."""
    out = 0.0
    for k, (r, lb) in enumerate(zip(rules, layers)):
        W = w.W[k].to(lb.g.device)
        if not r.kfac_capable:
            s = r.per_sample_grads(lb)
            out = out + torch.einsum("vnq,wnq->nvw", s * W, s)
            continue
        x, y = _coords(r, lb, w, k)
        if y is None:
            s = x.flatten(2)
            out = out + torch.einsum("vnq,wnq->nvw", s * W.flatten(), s)
        else:
            xw = x * ((y ** 2) @ W.T)
            out = out + torch.bmm(xw.transpose(0, 1), x.permute(1, 2, 0))
    return out


def _fisher_grads(g, B):
    """Output gradients of the Fisher vectors (columns of B, (N, K, K')) from the Jacobian ones
    g (K, N, *rest), sample-major: (N, K', *rest), Σ_k B[n, k, c] g[k, n]. Sample-major rather
    than (K', N, *rest): the factor sums run over both, and this order needs no copy."""
    V, N, rest = g.shape[0], g.shape[1], g.shape[2:]
    gj = g.reshape(V, N, -1).transpose(0, 1)  # (N, K, ·), a view if it can
    return torch.bmm(B.transpose(1, 2), gj).view(N, -1, *rest)


def _gram(rules, fis, w: _Weights, shift: float = 1.0) -> torch.Tensor:
    r""":math:`\text{shift}\cdot I + \tilde B^\top\Theta\tilde B` over the Fisher-row records
    ``fis`` (batches): one m·K' square (``shift`` 0: the bare Gram)."""
    sizes = [f[0].g.shape[0] * f[0].g.shape[1] for f in fis]
    offs = np.concatenate([[0], np.cumsum(sizes)])
    dev = fis[0][0].g.device
    G = torch.empty(int(offs[-1]), int(offs[-1]), dtype=torch.float64, device=dev)
    for i, fi in enumerate(fis):
        for j in range(i, len(fis)):
            blk = _kernel(rules, fi, fis[j], w)
            G[offs[i]:offs[i + 1], offs[j]:offs[j + 1]] = blk
            if j != i:
                G[offs[j]:offs[j + 1], offs[i]:offs[i + 1]] = blk.T
    if shift:
        G.diagonal().add_(shift)
    return G


def _cholesky_of_gram(rules, fis, w: _Weights, shift: float = 1.0) -> torch.Tensor:
    r"""Lower Cholesky factor of :func:`_gram`, factored in place: one m·K' square in memory."""
    return _factor_in_place(_gram(rules, fis, w, shift))


def _factor_in_place(G: torch.Tensor, what: str = "I + BᵀΘB",
                     upper: bool = False) -> torch.Tensor:
    """G's Cholesky factor, lower (or upper: then only G's upper triangle is read), in G's
    memory; a RuntimeError naming ``what`` if it fails."""
    info = torch.empty((), dtype=torch.int32, device=G.device)
    torch.linalg.cholesky_ex(G, upper=upper, out=(G, info))
    if info != 0:
        raise RuntimeError(f"Cholesky of {what} failed (non-finite outputs?)")
    return G


def _woodbury_blocks(md, w: _Weights, indices, weight: float = 1.0):
    r"""(m, K, K) blocks :math:`P_i = J_i\tilde H^{-1}J_i^\top` for the points ``indices`` (S),
    :math:`\tilde H = c\sum_{j\in S}J_j^\top A_jJ_j + D` (c = ``weight``), with the z and y of
    those points. Woodbury on the Fisher rows :math:`\tilde B_j^\top J_j`,
    :math:`\tilde B = \sqrt c\,B`: one Cholesky of :math:`I + \tilde B^\top\Theta\tilde B`
    (size m(K−1) for softmax) and, per batch of points,
    :math:`P_i = \Theta_{ii} - X_i(I+\tilde B^\top\Theta\tilde B)^{-1}X_i^\top`,
    :math:`X_i = \Theta_{iS}\tilde B`. Memory: the m(K−1) square and one batch of rows."""
    rules = md.rules
    jac, fis, zs, ys = [], [], [], []
    for b in md.batches("jacobian", indices=torch.as_tensor(indices)):
        B = md.family.factor(b.z, b.y) * weight ** 0.5  # (N, K, K')
        jac.append(b.layers)
        fis.append([LayerBatch(lb.a, _fisher_grads(lb.g, B).transpose(0, 1)) for lb in b.layers])
        zs.append(b.z.cpu())
        ys.append(b.y.cpu())
    G = _cholesky_of_gram(rules, fis, w)
    blocks = []
    for f in jac:
        X = torch.cat([_kernel(rules, f, fj, w) for fj in fis], 1)  # (N·K, m·K')
        N, K = f[0].g.shape[1], f[0].g.shape[0]
        Wt = torch.linalg.solve_triangular(G, X.T, upper=False).view(-1, N, K)
        del X
        blocks.append((_own_blocks(rules, f, w) - torch.einsum("xik,xil->ikl", Wt, Wt)).cpu())
    return torch.cat(blocks), torch.cat(zs), torch.cat(ys)


def _inverse_diagonal_blocks(L: torch.Tensor, k: int, leaf: int = 1024) -> torch.Tensor:
    r"""(N/k, k, k) diagonal k×k blocks of :math:`(LL^\top)^{-1}` for lower-triangular L.
    With :math:`L = [[A, 0], [B, C]]`, :math:`L^{-1} = [[A^{-1}, 0], [-C^{-1}BA^{-1}, C^{-1}]]`:
    two triangular solves per level (about N³/3 flops) and no N×N inverse in memory."""
    N = L.shape[0]
    if N <= leaf:
        V = torch.linalg.solve_triangular(
            L, torch.eye(N, dtype=L.dtype, device=L.device), upper=False).view(N, N // k, k)
        return torch.einsum("xbi,xbj->bij", V, V)
    h = (N // k // 2) * k
    A, B, C = L[:h, :h], L[h:, :h], L[h:, h:]
    Z = torch.linalg.solve_triangular(A, torch.linalg.solve_triangular(C, B, upper=False),
                                      upper=False, left=False).view(N - h, h // k, k)
    top = _inverse_diagonal_blocks(A, k, leaf).add_(torch.einsum("xbi,xbj->bij", Z, Z))
    del Z
    return torch.cat([top, _inverse_diagonal_blocks(C, k, leaf)])


def _fisher_records(md, indices, weight: float = 1.0):
    """Layer records of the Fisher rows (columns of B_i, scaled by √``weight``) of the points
    ``indices``, in batches, with their z and y."""
    fis, zs, ys = [], [], []
    for b in md.batches("fisher", indices=torch.as_tensor(indices)):
        fis.append([LayerBatch(lb.a, lb.g * weight ** 0.5) for lb in b.layers])
        zs.append(b.z.cpu())
        ys.append(b.y.cpu())
    return fis, torch.cat(zs), torch.cat(ys)


def _fisher_gram_blocks(rules, fis, w: _Weights, weight: float = 1.0) -> torch.Tensor:
    r"""(m, K', K') blocks :math:`M_i = B_i^\top P_i B_i` from the Fisher-row records ``fis``
    (already scaled by √c): with :math:`G = c\,B^\top\Theta B`,
    :math:`c\,M_i = I - [(I+G)^{-1}]_{ii}` (see :func:`_woodbury_fisher_blocks`)."""
    Kp = fis[0][0].g.shape[0]
    G = _cholesky_of_gram(rules, fis, w)
    inv = _inverse_diagonal_blocks(G, Kp).cpu()
    del G
    return (torch.eye(Kp, dtype=torch.float64) - inv) / weight


def _woodbury_fisher_blocks(md, w: _Weights, indices, weight: float = 1.0):
    r"""(m, K', K') blocks :math:`M_i = B_i^\top P_i B_i` for the points S = ``indices``, with
    :math:`P_i = J_i\tilde H^{-1}J_i^\top`, :math:`\tilde H = c\sum_{j\in S}J_j^\top A_jJ_j + D`
    (c = ``weight``), plus z and y. With :math:`G = c\,B^\top\Theta B` on the Fisher rows only,
    :math:`c\,M_i = [G(I+G)^{-1}]_{ii} = I - [(I+G)^{-1}]_{ii}`: one Cholesky of size m·K'
    (in place) and the diagonal blocks of its inverse. Enough for the step whenever
    :math:`r_i` lies in the range of :math:`B_i` (checked by the caller)."""
    fis, z, y = _fisher_records(md, indices, weight)
    return _fisher_gram_blocks(md.rules, fis, w, weight), z, y


def _in_range(B, r) -> bool:
    """Whether every r_i lies in the range of B_i (then only B_iᵀP_iB_i matters)."""
    s = torch.linalg.lstsq(B, r.unsqueeze(2)).solution
    res = (B @ s).squeeze(2) - r
    return bool((res.norm(dim=1) <= 1e-9 * r.norm(dim=1).clamp_min(1e-300)).all())


# -- methods ------------------------------------------------------------------------------------
def _outputs(md, indices):
    out = list(md.batches(None, indices=torch.as_tensor(indices)))
    return torch.cat([b.z for b in out]).cpu(), torch.cat([b.y for b in out]).cpu()


def _woodbury(md, w, indices, weight, fisher_space):
    if fisher_space:
        return _woodbury_fisher_blocks(md, w, indices, weight)
    return _woodbury_blocks(md, w, indices, weight)


def _exact_blocks(md, L, fisher_space):
    """P_i = J_i (n(F+Λ))⁻¹ J_iᵀ (or B_iᵀP_iB_i) for all curvature samples, F their mean
    Fisher: in parameter space when that is smaller (:func:`softrank.memory.exact_loo_space`),
    else in data space."""
    if memory.exact_loo_space(md) == "parameters":
        return _parameter_space_blocks(md, L, fisher_space)
    n = md.n_train
    return _woodbury(md, _lam_weights(md.rules, L, n), np.arange(md.n), n / md.n, fisher_space)


def _gradient_rows(rules, layers) -> torch.Tensor:
    """(N·V, p) per-sample gradient rows of a batch's layer records, sample-major."""
    g = per_sample_gradients(rules, layers)  # (V, N, p)
    return g.transpose(0, 1).reshape(-1, g.shape[2])


def _parameter_space_blocks(md, L, fisher_space):
    r"""The exact blocks in parameter space: :math:`\tilde H = \frac nN\sum_jU_jU_j^\top +
    n\Lambda` (p × p, :math:`U_j = J_j^\top B_j` the Fisher rows of the N curvature samples,
    summed one triangle at a time), its Cholesky factor :math:`\tilde H = R^\top R`, then per
    sample :math:`P_i = \|R^{-\top}J_i^\top\|^2` (or :math:`M_i = B_i^\top P_iB_i` from the
    Fisher rows): the blocks of the data-space Woodbury (the same matrix identity read the
    other way), with a p × p matrix instead of an N·K' one. Two passes over the samples; time
    ∝ N·K·p²."""
    rules, n = md.rules, md.n_train
    H = SymmetricSum()
    for b in md.batches("fisher"):
        H.add(_gradient_rows(rules, b.layers), n / md.n)
    H = H.upper()  # its upper triangle, all the Cholesky factor below reads
    H.diagonal().add_(n * L.vector.to(H))
    H = _factor_in_place(H, "the Gauss–Newton Hessian + nΛ", upper=True)
    blocks, zs, ys = [], [], []
    for b in md.batches("fisher" if fisher_space else "jacobian"):
        Z = torch.linalg.solve_triangular(H.mT, _gradient_rows(rules, b.layers).T, upper=False)
        Z = Z.view(Z.shape[0], len(b.z), -1)
        blocks.append(torch.einsum("xik,xil->ikl", Z, Z).cpu())
        zs.append(b.z.cpu())
        ys.append(b.y.cpu())
    return torch.cat(blocks), torch.cat(zs), torch.cat(ys)


def _cavity_blocks(md, L, indices, fisher_space, rest="ekfac"):
    r""":math:`\tilde P_i` (or :math:`B_i^\top\tilde P_iB_i`) of the ``'cavity'`` method for
    i ∈ S = ``indices``, the weight c of each point's own term in :math:`\tilde H`,
    diagnostics, the control variate of every curvature sample (:func:`_cavity_proxy`;
    None where no point is outside S, or ``rest`` is not 'ekfac'), and the blocks with each
    jackknife group left out (``rest='nystrom'`` on a subsample; else empty).
    ``rest='ekfac'``: the points of S once, the other n − m through
    :math:`s\,(n-m)\tilde F_{\mathrm{EKFAC}}` with the self-consistent shrinkage s of
    :func:`_rest_shrinkage` (c = 1);
    ``rest='ekfac_mean'``: the same with s = 1 (the mean curvature, unshrunk);
    ``rest='rescale'``: the points of S weighted
    c = (n − 1)/(m − 1), so that the cavity :math:`c\sum_{j\in S, j\ne i}J_j^\top A_jJ_j +
    n\Lambda` is unbiased for the Hessian without point i."""
    n, m = md.n_train, len(indices)
    if m >= n:  # no other points: D = nΛ, exactly
        return (*_woodbury(md, _lam_weights(md.rules, L, n), indices, 1.0, fisher_space), 1.0,
                {}, None, [])
    if rest == "rescale":
        c = (n - 1) / (m - 1)
        return (*_woodbury(md, _lam_weights(md.rules, L, n), indices, c, fisher_space), c, {},
                None, [])
    require_kfac_capable(md.rules, "approximate leave-one-out (method="
                         f"{'nystrom' if rest == 'nystrom' else 'cavity'!r}: EKFAC)",
                         "method='exact' (any layer; in parameter space where p < nK) or "
                         "method='subsample'")
    F = KroneckerCurvature(md, "fisher", "fisher", ekfac=True)
    if rest == "nystrom":
        if m >= md.n:
            raise ValueError(
                f"method='nystrom' keeps all {md.n} curvature samples, so the other {n - m} "
                f"of the {n} training points have no sample left to stand for them; keep "
                "fewer points (n_points below the curvature samples) or use method='cavity', "
                "whose EKFAC stands for them")
        records = _fisher_records(md, indices)  # one pass over S, for both
        M, z, y, jack = _nystrom_blocks(md, L, indices, fisher_space, records)
        s = _proxy_shrinkage(md, F, L, records[0])
        diag = {"proxy_shrinkage": s, "curvature_samples": md.n}
        return M, z, y, 1.0, diag, _cavity_proxy(md, F, L, s, fisher_space), jack
    if rest == "ekfac_mean":  # no shrinkage (s = 1): the alternative it was chosen against
        return (*_woodbury(md, _eigenbasis_weights(F, L, n - m, n), indices, 1.0, fisher_space),
                1.0, {}, None, [])
    s, M, z, y, diag = _rest_shrinkage(md, F, L, indices)
    if not fisher_space:  # the full K×K blocks at the solved s
        M, z, y = _woodbury_blocks(md, _eigenbasis_weights(F, L, (n - m) * s, n), indices)
    return M, z, y, 1.0, diag, _cavity_proxy(md, F, L, s, fisher_space), []


def _nystrom_blocks(md, L, indices, fisher_space, records=None, groups: int | None = None):
    r"""The ``'nystrom'`` blocks: the other points through a Nyström approximation on the
    kept points S plus each other point's exact own term (FITC: Snelson & Ghahramani, 2006;
    Quiñonero-Candela & Rasmussen, 2005), in data space. With :math:`G = U^\top D^{-1}U` the
    kernel of every curvature sample's Fisher rows (:math:`U_j = J_j^\top B_j`, D = nΛ) and
    :math:`G_{SS} = RR^\top`, the rows :math:`V = R^{-1}G_{S\cdot}` reproduce every
    entry of G that involves S; between two other points only their projection on the span of
    S's rows is kept, plus each one's own residual :math:`\Delta_j = G_{jj} - V_j^\top V_j`:
    :math:`\tilde G = V^\top V + \mathrm{blockdiag}(\Delta)`. Then for i ∈ S (rows R_i: its
    Fisher rows, or its Jacobian rows when ``fisher_space`` is False, with
    :math:`X_i = R_i^\top D^{-1}U`),
    :math:`P_i = \Theta_{ii} - X_i(I + \tilde G)^{-1}X_i^\top`, by Woodbury with
    :math:`E = I + \mathrm{blockdiag}(\Delta)` and :math:`C = I + VE^{-1}V^\top` (size m·K'):
    :math:`P_i = \Theta_{ii} - \sum_jX_{ij}E_j^{-1}X_{ij}^\top + Y_iC^{-1}Y_i^\top`,
    :math:`Y = XE^{-1}V^\top`. On the Fisher rows (``fisher_space``) S's own rows of V are
    :math:`V_S = R^\top` for :math:`G_{SS} = RR^\top`, and the same Woodbury reads
    :math:`B_i^\top P_iB_i = V_i^\top C^{-1}V_i - \varepsilon I`, ε the jitter that makes
    :math:`G_{SS} + \varepsilon I = RR^\top` factorable (the own block without it: a point the
    net gets confidently wrong has tiny Fisher rows, far below ε, and its step divides by
    :math:`B_i^\top B_i`); R is the upper-triangular (reversed-order) Cholesky factor, so
    that :math:`V_S` and :math:`C^{-1}`'s factor against it are lower triangular (half a
    solve). C is summed one triangle at a time,
    :math:`\sum_jW_jW_j^\top` with :math:`W_j = V_jL_j^{-\top}`, :math:`E_j = L_jL_j^\top`.
    One pass over the curvature samples (the kernel of S against
    each batch), memory that of C, flat in n; time ∝ n·m². Every entry of the curvature that
    involves a kept point is exact, so the approximation touches only the other points among
    themselves; with S every sample it is the exact method. When the curvature samples are a
    subsample of the training set, each other sample stands for c = (n − m)/(N − m) training
    points: c copies of its projection on S's rows, each with a residual of its own
    (:math:`E_j^{-1}` weighted by c). Then C is a sum over a sample, and its inverse is biased
    (upward in P_i, by about 1/(N − m)): the sums of the other samples are kept per group of a
    fixed random partition into ``groups`` (default :data:`_JACKKNIFE_GROUPS`), and the blocks
    returned also with each group left out, at weight (n − m)/(N − m − N_g): a delete-a-group
    jackknife (Quenouille, 1956; Efron & Stein, 1981), which :func:`approx_loo` applies to
    each point's values. ``records``: those of :func:`_fisher_records` on S, if already made.
    Returns (blocks, z, y, leave-a-group-out blocks: a list, empty with no subsample)."""
    rules, n = md.rules, md.n_train
    w = _lam_weights(rules, L, n)
    idx = torch.as_tensor(indices)
    fis_S, z, y = _fisher_records(md, idx) if records is None else records
    rows_S = fis_S if fisher_space else [b.layers for b in md.batches("jacobian", indices=idx)]
    m, Kp = len(z), fis_S[0][0].g.shape[0]
    dev = fis_S[0][0].g.device

    def kernel(rows, other):  # (m·K_R, N·K') kernel of S's rows against a batch
        return torch.cat([_kernel(rules, r, other, w) for r in rows], 0)

    # G_SS = RRᵀ with R upper triangular (the Cholesky factor of G_SS in reversed order), so
    # that V_S = Rᵀ is lower triangular and so is C's solve against it at the end
    G = _gram(rules, fis_S, w, shift=0.0)
    jitter = 1e-10 * float(G.diagonal().mean()) or 1e-300  # for points whose rows coincide
    G.diagonal().add_(jitter)
    R = _factor_in_place(G.flip(0, 1), "the kept points' Gram").flip(0, 1)
    del G
    # the sums below run per slot: on a subsample, one per group of the other samples (a fixed
    # random partition) and the last for S; else one slot, every sample at weight c = 1
    member = np.zeros(md.n, bool)
    member[np.asarray(indices)] = True
    groups = _JACKKNIFE_GROUPS if groups is None else groups
    n_other = md.n - m
    weighted = m < md.n < n  # each other sample stands for c ≠ 1 training points
    # the jackknife where the other samples are at most half of the other training points
    # (where it was measured); nearer all of them, the subsample's bias vanishes
    jackknife = weighted and n_other >= 2 * groups and 2 * n_other <= n - m
    n_groups = groups if jackknife else 1
    slot = np.random.RandomState(0).permutation(n_other) % n_groups  # the other samples'
    eye = torch.eye(Kp, dtype=torch.float64, device=dev)
    KR = Kp if fisher_space else rows_S[0][0].g.shape[0]

    def zeros(*shape):
        return torch.zeros(*shape, dtype=torch.float64, device=dev)

    # per slot the sums Σ VE⁻¹Vᵀ (one triangle: Σ WWᵀ with W_j = V_jL_j⁻ᵀ, E_j = L_jL_jᵀ) and,
    # for Jacobian rows, Σ XE⁻¹Xᵀ (its diagonal blocks) and Σ XE⁻¹Vᵀ; each E_j⁻¹ unweighted.
    # S's own: V_S = Rᵀ and E = I (Δ = 0)
    n_slots = n_groups + weighted
    Cs = [SymmetricSum() for _ in range(n_slots)]
    Cs[-1].add(R)
    diags = Ys = None
    if not fisher_space:
        X_S = torch.cat([kernel(rows_S, f) for f in fis_S], 1)  # (m·K, m·K')
        diags = [zeros(m, KR, KR) for _ in range(n_slots)]
        Ys = [zeros(m * KR, m * Kp) for _ in range(n_slots)]
        X4 = X_S.view(m, KR, m, Kp)
        diags[-1].add_(torch.einsum("ikjd,iljd->ikl", X4, X4))
        Ys[-1].add_(X_S @ R)
        del X_S, X4
    start, others = 0, torch.as_tensor(np.flatnonzero(~member))
    for b in md.batches("fisher", indices=others):
        N = len(b.z)
        Gb = kernel(fis_S, b.layers)  # (m·K', N·K')
        Vb = torch.linalg.solve_triangular(R, Gb, upper=True).view(m * Kp, N, Kp)
        del Gb
        delta = _own_blocks(rules, b.layers, w) - torch.einsum("xjk,xjl->jkl", Vb, Vb)
        # E_j = I + Δ_j ⪰ I (Δ_j a Schur complement); W_jᵀ = L_j⁻¹V_jᵀ, (N, K', m·K')
        LE, info = torch.linalg.cholesky_ex(eye + delta)
        if info.any():
            raise RuntimeError("Cholesky of I + Δ_j failed (non-finite outputs?)")
        Wt = torch.linalg.solve_triangular(LE, Vb.permute(1, 2, 0), upper=False)
        if not fisher_space:
            Einv = torch.cholesky_inverse(LE)
            Xb = kernel(rows_S, b.layers).view(m, KR, N, Kp)
        gb = torch.as_tensor(slot[start:start + N], device=dev)
        present = torch.unique(gb).tolist()
        for g in present:
            sel = None if len(present) == 1 else (gb == g).nonzero().squeeze(1)
            Cs[g].add((Wt if sel is None else Wt[sel]).reshape(-1, m * Kp))
            if fisher_space:
                continue
            Vg, Eg, Xg = (Vb, Einv, Xb) if sel is None else (Vb[:, sel], Einv[sel], Xb[:, :, sel])
            XE = torch.einsum("ikjc,jcd->ikjd", Xg, Eg)
            diags[g].add_(torch.einsum("ikjd,iljd->ikl", XE, Xg))
            Ys[g].add_(XE.reshape(m * KR, -1) @ Vg.reshape(m * Kp, -1).T)
        start += N
    # their upper triangles (every slot has samples): every operation below is elementwise
    # until C's Cholesky, which reads only that triangle (upper=True)
    Cs = [c.upper() for c in Cs]
    own = None if fisher_space else torch.cat([_own_blocks(rules, r, w) for r in rows_S])
    sizes = np.bincount(slot, minlength=n_groups)
    # the other samples' sums over every group, once: a group left out is subtracted from them
    total_of_groups = [None if parts is None else sum(parts[:n_groups])
                       for parts in (Cs, diags, Ys)]

    def blocks(left_out=None):  # the blocks with the other samples but group `left_out`
        kept = n_other - (0 if left_out is None else sizes[left_out])
        c = (n - m) / int(kept) if weighted else 1.0

        def total(k, parts):  # S at weight 1, the other samples at weight c
            out = total_of_groups[k]
            out = out.mul(c) if left_out is None else torch.sub(out, parts[left_out]).mul_(c)
            return out.add_(parts[-1]) if weighted else out

        C = total(0, Cs)  # a new tensor: factored in its place
        C.diagonal().add_(1.0)
        Cl = _factor_in_place(C, "I + VE⁻¹Vᵀ", upper=True).mT  # C = Cl Clᵀ
        if fisher_space:  # M_i = V_iᵀC⁻¹V_i, V_S = Rᵀ lower triangular, less the jitter
            Z = _lower_solve_lower(Cl, R.T).view(-1, m, Kp)
            M = torch.einsum("xik,xil->ikl", Z, Z)
            M.diagonal(dim1=1, dim2=2).sub_(jitter)
            return M.cpu()
        Z = torch.linalg.solve_triangular(Cl, total(2, Ys).T, upper=False).view(-1, m, KR)
        return (own - total(1, diags) + torch.einsum("xik,xil->ikl", Z, Z)).cpu()

    full = blocks()
    return full, z, y, [blocks(g) for g in range(n_groups)] if jackknife else []


def _lower_solve_lower(A: torch.Tensor, B: torch.Tensor, leaf: int = 512) -> torch.Tensor:
    """A⁻¹B for lower-triangular A and B (the result is lower triangular), by halves: about
    half the flops of a triangular solve against a full right-hand side."""
    N = A.shape[0]
    if N <= leaf:
        return torch.linalg.solve_triangular(A, B, upper=False)
    h = N // 2
    out = torch.empty_like(B)
    out[:h, h:] = 0.0
    out[:h, :h] = top = _lower_solve_lower(A[:h, :h], B[:h, :h], leaf)
    out[h:, h:] = _lower_solve_lower(A[h:, h:], B[h:, h:], leaf)
    out[h:, :h] = torch.linalg.solve_triangular(A[h:, h:], B[h:, :h] - A[h:, :h] @ top,
                                                upper=False)
    return out


def _proxy_shrinkage(md, F, L, fis):
    r"""The shrinkage s of the control variate (:func:`_cavity_proxy`) when the kept points do
    not solve it (rest 'nystrom'): the fixed point of :func:`_shrinkage_ratio` with each kept
    point's leverage that of the control variate itself (every other point through
    :math:`s(n-1)\tilde F`; no kernel, one own block per kept point per iteration). Any s
    gives a valid control variate; this one makes it follow the points best. ``fis``: the kept
    points' Fisher-row records (:func:`_fisher_records`)."""
    n, rules = md.n_train, md.rules
    K = _euclidean_fisher_blocks(md, fis)
    s = 1.0
    for _ in range(_SHRINK_MAXITER):
        w = _eigenbasis_weights(F, L, (n - 1) * s, n)
        Q = torch.cat([_own_blocks(rules, f, w).cpu() for f in fis])
        M = Q @ torch.linalg.inv(torch.eye(Q.shape[1], dtype=torch.float64) + Q)
        new, _ = _shrinkage_ratio(M, K)
        if np.isnan(new) or abs(new - s) <= _SHRINK_RTOL * s:
            return s if np.isnan(new) else new
        s = new
    return s


def _rest_shrinkage(md, F, L, indices):
    r"""The self-consistent shrinkage s of the other points' curvature in ``'cavity'``.

    Seen from a point i, the Hessian of the others is a finite sum of per-point terms, and the
    inverse of such a sum is not the inverse of its mean: each term enters the resolvent shrunk
    by its own leverage, :math:`J_j^\top B_j(I - M_j)B_j^\top J_j` with
    :math:`M_j = B_j^\top J_jH^{-1}J_j^\top B_j` (Sherman–Morrison; the deterministic equivalent
    of Silverstein & Bai, 1995; the self-consistent cavity of Opper & Winther, 2000).
    EKFAC estimates the mean term, so the other n − m points enter as
    :math:`s\,(n-m)\tilde F_{\mathrm{EKFAC}}` with s the trace-weighted mean of I − M_i over
    the measured points, :math:`s = \sum_i\mathrm{tr}((I-M_i)K_i)/\sum_i\mathrm{tr}K_i`,
    :math:`K_i = B_i^\top J_iJ_i^\top B_i`, where the M_i themselves depend on s: a fixed
    point, reached by iteration from s = 1 (f is increasing in s and f(1) < 1, so the
    iterates move monotonically to it), first on every fourth point of S (the others
    then counted among the n − m/4 through EKFAC; 1/16 of the kernel) to a relative change
    below ``_SHRINK_RTOL``, then on S from there until the change is below that or below the
    standard error of the ratio over the points (the sampling error of s: iterating further
    would refine noise; with the iterates' contraction ρ ≈ 0.1–0.2 measured, the remaining
    iteration error is a fraction ρ/(1 − ρ) of it). Each iteration on S costs a kernel and a
    Cholesky of size m·K'. Returns (s, M at s, z, y, diagnostics), the diagnostics with that
    standard error (the estimate's ``stderr`` does not include it)."""
    rules = md.rules
    n, m = md.n_train, len(indices)

    def solve(idx, s, within_stderr):
        """(s, M, z, y, standard error of s, iterations) on the points ``idx``, from ``s``."""
        fis, z, y = _fisher_records(md, idx)
        K = _euclidean_fisher_blocks(md, fis)
        for it in range(1, _SHRINK_MAXITER + 1):
            M = _fisher_gram_blocks(rules, fis, _eigenbasis_weights(F, L, (n - len(idx)) * s, n))
            new, se = _shrinkage_ratio(M, K)
            if np.isnan(new):  # no point has a gradient: nothing to shrink by
                return s, M, z, y, se, it
            if abs(new - s) <= max(_SHRINK_RTOL * s, se if within_stderr else 0.0):
                return s, M, z, y, se, it
            s, last = new, s
        warnings.warn(
            f"{WARNING_PREFIX} (method='cavity'): the shrinkage of the other points' "
            f"curvature did not settle in {_SHRINK_MAXITER} iterations (s = {last:.4g}, next "
            f"{s:.4g}); the estimate uses the last", RuntimeWarning, stacklevel=5)
        return last, M, z, y, se, _SHRINK_MAXITER

    s, pilot = 1.0, 0
    if m >= 8:
        s, *_, pilot = solve(indices[::4], s, False)
    s, M, z, y, se, full = solve(indices, s, _SHRINK_WITHIN_STDERR)
    return s, M, z, y, {"rest_shrinkage": s, "rest_shrinkage_stderr": se,
                        "rest_shrinkage_iterations": {"quarter of the points": pilot,
                                                      "all points": full}}


def _euclidean_fisher_blocks(md, fis) -> torch.Tensor:
    r"""(m, K', K') blocks :math:`K_i = B_i^\top J_iJ_i^\top B_i` (Euclidean metric) of the
    Fisher-row records ``fis`` (batches, as from :func:`_fisher_records`)."""
    ident = _lam_weights(md.rules, as_lam(1.0, md.param_names, md.sizes), 1.0)
    return torch.cat([_own_blocks(md.rules, f, ident).cpu() for f in fis])


def _shrinkage_ratio(M, K) -> tuple[float, float]:
    r"""The ratio :math:`\sum_i\mathrm{tr}((I-M_i)K_i)/\sum_i\mathrm{tr}K_i` of
    :func:`_rest_shrinkage` for leverages ``M`` and blocks ``K`` (both (m, K', K')), and its
    standard error over the points (delta method; NaN for one point). NaN ratio when no point
    has a gradient."""
    b = K.diagonal(dim1=1, dim2=2).sum(1)  # tr K_i
    if not b.sum() > 0:
        return float("nan"), float("nan")
    a = (K - M @ K).diagonal(dim1=1, dim2=2).sum(1)  # tr((I − M_i) K_i)
    ratio = float(a.sum() / b.sum())
    se = float((a - ratio * b).std() / (b.mean() * len(b) ** 0.5)) if len(b) > 1 else \
        float("nan")
    return ratio, se


def _lossless(t, dtype):
    """``dtype`` when ``t`` converts to it and back exactly (records are float64 copies of
    tensors in the layer's dtype), else ``t.dtype``."""
    return dtype if torch.equal(t.to(dtype).to(t.dtype), t) else t.dtype


def _kfac_blocks(md, L):
    r"""(m, K, K) blocks :math:`J_i (F_{\mathrm{KFAC}}+\Lambda)^{-1} J_i^\top`, plus the
    outputs z and targets y, from one backward pass of the K unit vectors per sample.

    Backpropagation is linear in the output vector, so the output gradients of the Fisher
    vectors (columns of :math:`B_i`) are :math:`\sum_k B_i[k, c]\, g^{(k)}`, combinations of
    the Jacobian ones :math:`g^{(k)}`: the same pass gives the Kronecker factors (as
    ``KroneckerCurvature(md, 'fisher', 'fisher')``) and, once they are eigendecomposed, the
    blocks, from records kept up to ``softrank.memory.KFAC_CACHE_BYTES`` (the rest is
    recomputed)."""
    rules = md.rules
    require_kfac_capable(rules)
    dtypes = None  # storage dtype of (inputs, output gradients) per layer, from the first batch
    sums = KroneckerSums(rules)
    cache, zs, ys, used, caching = [], [], [], 0, True
    limit = memory.KFAC_CACHE_BYTES
    for b in md.batches("jacobian"):
        zs.append(b.z.cpu())
        ys.append(b.y.cpu())
        B = md.family.factor(b.z, b.y)  # (N, K, K')
        sums.add([LayerBatch(lb.a, _fisher_grads(lb.g, B)) for lb in b.layers])
        if caching:
            if dtypes is None:
                dtypes = [(_lossless(lb.a, dt), _lossless(lb.g, dt)) for lb, dt in
                          zip(b.layers, (next(r.module.parameters()).dtype for r in rules))]
            rec = [(lb.a.to(da), lb.g.to(dg)) for lb, (da, dg) in zip(b.layers, dtypes)]
            size = sum(t.numel() * t.element_size() for pair in rec for t in pair)
            if used + size <= limit:
                cache.append(rec)
                used += size
            else:
                caching = False
        del b
    F = KroneckerCurvature.from_factors(md, *sums.factors(md.n))
    w = _eigenbasis_weights(F, L, 1.0, 1.0)

    def blocks(layers):
        return _own_blocks(rules, layers, w).cpu()

    out = [blocks([LayerBatch(a.double(), g.double()) for a, g in rec]) for rec in cache]
    done = len(cache) * md.batch_size
    if done < md.n:
        out += [blocks(b.layers) for b in md.batches("jacobian",
                                                     indices=torch.arange(done, md.n))]
    return torch.cat(out), torch.cat(zs), torch.cat(ys)


class _EigenbasisPreconditioner(Curvature):
    """Solves with fixed weights in the Kronecker eigenbasis (KFAC + Λ's diagonal there)."""

    approximation = "kfac"

    def __init__(self, md, L):
        super().__init__(md.param_names, md.sizes, md.n)
        self.F = KroneckerCurvature(md)
        self.w = _eigenbasis_weights(self.F, L, 1.0, 1.0)

    def solve(self, v, lam):
        return self.F._apply(v, lambda k: self.w.W[k])


def _cg_blocks(md, L, indices, tol, maxiter, preconditioner):
    r"""Blocks :math:`J_i(F+\Lambda)^{-1}J_i^\top` (m, K, K) by conjugate gradients, a bound
    on each entry's solver error (same shape; see :func:`_solve_error_bounds`), and the
    solver's diagnostics."""
    op = GGNOperator(md, tol=tol, maxiter=maxiter, preconditioner=preconditioner)
    xs = md.X[indices].to(md.device)
    J = per_sample_jacobians(md, xs).double().cpu()  # (m, K, p)
    m, K = J.shape[:2]
    X = op.solve(J.reshape(m * K, -1).T, L)  # (p, mK)
    blocks = torch.einsum("ikp,pil->ikl", J, X.view(-1, m, K))
    cg = op.last_cg
    residual = cg.relative_residual.double() * J.reshape(m * K, -1).norm(dim=1)
    bounds = _solve_error_bounds(blocks, X.norm(dim=0).view(m, K), residual.view(m, K),
                                 float(L.vector.min()))
    return blocks, bounds, {"cg_iterations": cg.iterations, "n_matvec": op.n_matvec,
                            "converged": bool(cg.converged.all()),
                            "max_relative_residual": float(cg.relative_residual.max())}


def _solve_error_bounds(blocks, x_norm, r_norm, mu):
    r"""Bounds on :math:`|b_k^\top A^{-1}b_l - b_k^\top x_l|` for the entries of ``blocks``
    (m, K, K), :math:`A = F + \Lambda \succeq \mu I` (μ = min Λ, F a GGN, positive
    semi-definite), from the conjugate-gradient iterates :math:`x_l` with residual norms
    ``r_norm`` and norms ``x_norm`` (both (m, K)). With :math:`e_l = A^{-1}b_l - x_l`,
    :math:`|b_k^\top e_l| = |x_k^{*\top}Ae_l| \le \|x_k^*\|_A\|e_l\|_A`,
    :math:`\|e_l\|_A \le \|r_l\|/\sqrt\mu` and :math:`\|x_k^*\|_A \le \|x_k\|_A +
    \|e_k\|_A`, :math:`\|x_k\|_A^2 = x_k^\top b_k - x_k^\top r_k`; the smaller of the two
    orders (k, l). Rigorous up to rounding (Cauchy–Schwarz in the A inner product)."""
    bx = blocks.diagonal(dim1=1, dim2=2).clamp_min(0.0)
    e = r_norm / mu ** 0.5  # ‖e_l‖_A
    x_a = (bx + x_norm * r_norm).sqrt() + e  # ‖x*_k‖_A
    b = x_a[:, :, None] * e[:, None, :]
    return torch.minimum(b, b.transpose(1, 2))


def _newton_shift(P, A, r, own_weight: float = 1.0):
    r"""The leave-one-out step of the outputs, :math:`P_i(I - cA_iP_i)^{-1}r_i` (m, K), from
    blocks P (m, K, K), output Hessians A (m, K, K) and residuals r (m, K); c = ``own_weight``."""
    eye = torch.eye(P.shape[1], dtype=torch.float64)
    return (P @ torch.linalg.solve(eye - own_weight * A @ P, r.unsqueeze(2))).squeeze(2)


def _steps(fam, P, z, y, fisher_space: bool, own_weight: float = 1.0):
    r"""The leave-one-out steps of points with blocks P: (z_loo, loo losses, own losses,
    first-order terms, M). ``fisher_space``: P holds :math:`M_i = B_i^\top P_iB_i` (m, K', K')
    and each :math:`r_i = B_is_i` lies in the range of :math:`B_i`; else P holds the (m, K, K)
    blocks :math:`P_i`. c = ``own_weight`` multiplies each point's own term (see
    :func:`_newton_shift`)."""
    Bf = fam.factor(z, y)  # (m, K, K')
    r = fam.residual(z, y)
    if fisher_space:
        M = P
        BtB = Bf.transpose(1, 2) @ Bf
        s = torch.linalg.solve(BtB, (Bf.transpose(1, 2) @ r.unsqueeze(2)))
        t = torch.linalg.solve(torch.eye(M.shape[1], dtype=torch.float64) - own_weight * M, s)
        shift = (Bf @ torch.linalg.solve(BtB, M @ t)).squeeze(2)  # the step in range(B_i)
        first = (s.transpose(1, 2) @ M @ s).reshape(-1)
    else:
        M = Bf.transpose(1, 2) @ P @ Bf
        shift = _newton_shift(P, Bf @ Bf.transpose(1, 2), r, own_weight)
        first = torch.einsum("ik,ikl,il->i", r, P, r)
    z_loo = z + shift
    return z_loo, fam.loss(z_loo, y).numpy(), fam.loss(z, y).numpy(), first, M


def _cavity_proxy(md, F, L, s: float, fisher_space: bool):
    r"""The control variate of ``'cavity'``: per curvature sample, its (gap term, soft-rank
    term, first-order term) with *every* other point through the shrunk EKFAC,
    :math:`Q_j = J_j(s(n-1)\tilde F + n\Lambda)^{-1}J_j^\top` — the method with no point kept
    exactly, at the s solved on the kept ones. Cheap (no kernel: one pass over the curvature
    samples, as EKFAC's second pass) and, like the method, valid by construction
    (:math:`Q_j \succeq 0`, so :math:`A_jP_j` has eigenvalues in [0, 1)). Also each sample's
    own loss (the same pass gives the training loss). Each is a shape (md.n,) float64 array."""
    n = md.n_train
    w = _eigenbasis_weights(F, L, (n - 1) * s, n)
    fam = md.family
    parts = []
    for b in md.batches("fisher" if fisher_space else "jacobian"):
        Q = _own_blocks(md.rules, b.layers, w).cpu()  # the cavity blocks themselves
        z, y = b.z.cpu(), b.y.cpu()
        eye = torch.eye(Q.shape[1], dtype=torch.float64)
        if fisher_space:  # Q is the cavity in the Fisher rows' coordinates (A = I there)
            P = Q @ torch.linalg.inv(eye + Q)
        else:  # the P whose cavity P(I − AP)⁻¹ is Q: P = Q(I + AQ)⁻¹
            B = fam.factor(z, y)
            P = Q @ torch.linalg.inv(eye + B @ B.transpose(1, 2) @ Q)
        _, loo, own, first, M = _steps(fam, P, z, y, fisher_space)
        parts.append((loo - own, M.diagonal(dim1=1, dim2=2).sum(1).numpy(), first.numpy(),
                      own))
    return tuple(np.concatenate(c) for c in zip(*parts))


def _regression_estimate(values, proxy_sampled, proxy_all, population: int | None = None):
    r"""The regression estimator of a population mean from a simple random sample
    (Cochran, 1977, *Sampling Techniques*, section 7.1): :math:`\bar y_S + b(\bar x - \bar x_S)`
    with b the least-squares slope of ``values`` (y) on the control variate ``proxy_sampled``
    (x, its values on the same points) and :math:`\bar x` the mean of ``proxy_all``, its
    values on every point. Returns (estimate, standard error, b, correlation of y and x).

    The estimate is linear in y, :math:`\sum_iw_iy_i` with
    :math:`w_i = 1/m + (\bar x - \bar x_S)(x_i - \bar x_S)/S_{xx}`; its standard error is the
    heteroscedasticity-consistent one, :math:`\sqrt{\sum_iw_i^2e_i^2/(1-h_i)^2}` with
    residuals :math:`e_i` and leverages :math:`h_i = 1/m + (x_i - \bar x_S)^2/S_{xx}` (HC3 of
    MacKinnon & White, 1985: per-point leave-one-out terms are heavy-tailed and their scatter
    grows with x, where the textbook formula that assumes a common residual variance is too
    small), like :func:`_mean_stderr` without the finite-population factor. When
    ``proxy_all`` is itself a random sample of a larger ``population`` (curvature samples
    drawn from the training set), :math:`\bar x` has its own sampling error, and
    :math:`b^2\,\mathrm{var}(x)/N'` is added to the variance (N' = ``len(proxy_all)``;
    double sampling, Cochran 1977, section 12.6). The estimator's bias is O(1/m). Falls back to the
    sample mean (b = 0) for fewer than three points or a constant x."""
    proxy_all = np.asarray(proxy_all, np.float64)
    proxy_mean = float(proxy_all.mean())
    y, x = np.asarray(values, np.float64), np.asarray(proxy_sampled, np.float64)
    m = len(y)
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy = float(dx @ dx), float(dy @ dy)
    if m < 3 or not sxx > 0:
        return float(y.mean()), _mean_stderr(y), 0.0, float("nan")
    b = float(dx @ dy) / sxx
    e = dy - b * dx
    w = 1.0 / m + (proxy_mean - x.mean()) * dx / sxx
    corr = float(dx @ dy) / float(np.sqrt(sxx * syy)) if syy > 0 else 1.0  # y constant
    u = w * e / np.maximum(1.0 - (1.0 / m + dx ** 2 / sxx), 1.0 / m)  # h_i = 1: one x apart
    var = float(u @ u)
    if population is not None and population > len(proxy_all) > 1:
        var += b * b * float(proxy_all.var(ddof=1)) / len(proxy_all)
    return float(w @ y), float(np.sqrt(var)), b, corr


def _solver_gap_bound(fam, z, y, P, P_bound) -> float:
    """First-order bound on the gap's change when each entry of the blocks P (m, K, K) moves
    by at most ``P_bound`` (same shape): mean over points of Σ |∂ loss_i/∂P_i| · bound."""
    B = fam.factor(z, y)
    A, r = B @ B.transpose(1, 2), fam.residual(z, y)
    P = P.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        shift = _newton_shift(P, A, r)
        (grad,) = torch.autograd.grad(fam.loss(z + shift, y).sum(), P)
    return float((grad.abs() * P_bound).sum() / len(z))


def _mean_stderr(values) -> float:
    """Standard error of the mean of ``values`` over the sampled points (NaN for one)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def _points(md, n_points, default, random_state, indices=None):
    if indices is not None:
        return _given_points(md, n_points, indices)
    m = min(default, md.n) if n_points is None else int(n_points)
    if not 1 <= m <= md.n:
        raise ValueError(f"n_points must be in 1..{md.n}; got {n_points}")
    return np.sort(check_random_state(random_state).choice(md.n, m, replace=False))


def _given_points(md, n_points, indices):
    """The points ``indices`` (into the curvature samples), checked and sorted."""
    idx = np.asarray(indices)
    if idx.size == 0:
        raise ValueError("indices must name at least one point; got an empty array")
    if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.dtype == bool):
        raise ValueError("indices must be a non-empty 1-D array of integer positions into the "
                         f"curvature samples; got {idx.dtype} of shape {idx.shape}")
    if idx.dtype == bool:
        raise ValueError("indices must be integer positions, not a boolean mask "
                         "(use np.flatnonzero(mask))")
    if idx.min() < 0 or idx.max() >= md.n:
        raise ValueError(f"indices must lie in 0..{md.n - 1} (the curvature samples); got "
                         f"{int(idx.min())}..{int(idx.max())}")
    idx = np.sort(idx.astype(np.int64))
    if (np.diff(idx) == 0).any():
        raise ValueError("indices must not repeat a point; got "
                         f"{int(idx[1:][np.diff(idx) == 0][0])} more than once")
    if n_points is not None and int(n_points) != len(idx):
        raise ValueError(f"n_points={n_points} contradicts the {len(idx)} given indices; pass "
                         "one of them")
    return idx


def approx_loo(md, lam, method: str = "auto", *, n_points: int | None = None,
               indices=None, random_state=None, tol: float = 1e-8, maxiter: int = 500,
               preconditioner: str | None = "kfac", memory_budget=None) -> LOOResult:
    r"""Approximate leave-one-out estimate of the test loss of ``md``'s network.

    Parameters
    ----------
    md : ModelData
        The training data (curvature samples) and the network; ``md.n_train`` is n of the
        objective :math:`\sum_i\ell_i + \frac n2\theta^\top\Lambda\theta`.
    lam : float, dict {parameter name: float} or tensor of shape (p,)
        Λ > 0: scalar, per parameter tensor, or its full diagonal.
    method : {'auto', 'exact', 'nystrom', 'cavity', 'kfac', 'subsample'}
        See the module docstring. 'auto' (default): 'exact' while its data-space memory
        stays below ``softrank.memory.LOO_AUTO_EXACT_BYTES``, else 'nystrom'.
    n_points : int or None
        Points of 'nystrom' (default ``softrank.memory.LOO_NYSTROM_POINTS``), 'cavity'
        (default ``softrank.memory.LOO_CAVITY_POINTS``), at most n, and 'subsample' (default
        all).
    indices : array-like of int, shape (m,), or None
        The points to measure, as positions into the curvature samples ('nystrom', 'cavity'
        and 'subsample' only), instead of ``n_points`` random ones; ``stderr`` then treats them
        as a random sample.
    random_state : int, RandomState or None
        Seeds the choice of points ('nystrom', 'cavity', 'subsample') when ``indices`` is
        None, then that of the curvature samples 'nystrom' runs over when it subsamples them
        (``softrank.memory.nystrom_samples``).
    tol, maxiter, preconditioner
        Conjugate gradients of 'subsample' (relative residual, iteration cap, 'kfac' or None).
    memory_budget : int, str or None
        Refuse with a :class:`MemoryError`, before any data pass, when
        :func:`softrank.memory.estimate_loo_memory` says the method needs more.

    Returns
    -------
    LOOResult
        ``gap`` and ``estimated_test_loss`` in loss units; ``stderr`` (a standard error over
        the sampled points for 'nystrom', 'cavity' and 'subsample'; None where every point is
        used; NaN for 'subsample' when the solver's error bound exceeds a tenth of it, since then it
        would not cover that error); ``diagnostics`` with ``invalid_points`` (points with max
        eig :math:`A_iP_i \ge 1`, whose step is meaningless) and ``max_point_leverage``; for
        'exact' also ``exact_space`` ('data' or 'parameters': the form that ran); for
        'subsample' also ``solver_error_bound`` (loss units: a first-order bound on the gap's
        conjugate-gradient error, from rigorous bounds on each block's entries,
        :math:`\|x_k^*\|_A\,\|r_l\|/\sqrt{\min\Lambda}`), ``converged`` (whether ``tol``
        was reached; the bound decides the stderr) and, when stderr is NaN,
        ``sampling_stderr``; for 'cavity' with
        ``n_points`` < n also ``rest_shrinkage`` (s, dimensionless, in (0, 1]),
        ``rest_shrinkage_stderr`` (its standard error over the points) and
        ``rest_shrinkage_iterations`` (a dict: the fixed-point iterations on a quarter of the
        points, ``'quarter of the points'``, then on all of them, ``'all points'``); for
        'nystrom', 'cavity' and 'subsample', where ``stderr`` is not None,
        ``soft_rank_stderr`` and ``first_order_gap_stderr``: ``soft_rank`` and
        ``first_order_gap`` are estimated from the same sampled points, and these are their
        standard errors. For 'nystrom' with
        points outside the kept ones also ``proxy_shrinkage`` (the control variate's s) and
        ``curvature_samples`` (``md.n``), and on a curvature subsample (``md.n`` below
        ``md.n_train``) ``jackknife``: a dict with ``'groups'``, ``'uncorrected_gap'`` (the
        gap before the correction, loss units), ``'left_out_gaps'`` (with each group left out)
        and ``'stderr'`` (the jackknife's standard error, included in ``stderr``, as its
        counterparts are in ``soft_rank_stderr`` and ``first_order_gap_stderr``); the
        per-point ``loo_losses`` and ``loo_outputs`` are then the jackknifed values. For
        'nystrom' and 'cavity' with points outside the kept ones, ``gap``, ``soft_rank`` and
        ``first_order_gap`` are regression estimates on the control variate (module
        docstring), and the diagnostics hold ``control_variate`` (a dict: ``'gap'``, its mean
        over every curvature sample in loss units; ``'slope'`` and ``'correlation'`` of the
        kept points' gap terms on it), ``sample_mean_gap`` and ``sample_mean_stderr`` (the
        plain mean over the kept points and its standard error, for comparison).

    Warns
    -----
    RuntimeWarning
        When some points' steps are invalid, or the conjugate-gradient error bound on the gap
        exceeds a tenth of the standard error ('subsample').

    Raises
    ------
    ValueError
        For an unknown method, ``n_points`` outside 1..n (the curvature samples), or
        ``indices`` that are not distinct positions in 0..n−1, that disagree with
        ``n_points``, or that are given to a method measuring every point ('exact', 'kfac');
        for 'nystrom' keeping every curvature sample when they are fewer than ``md.n_train``
        (no sample left to stand for the other training points).
    MemoryError
        When ``memory_budget`` is exceeded.

    References
    ----------
    .. [1] Rad & Maleki (2020). "A scalable estimate of the out-of-sample prediction error via
       approximate leave-one-out cross-validation." JRSS B 82(4).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from softrank import ModelData, approx_loo
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> X, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    >>> md = ModelData(net, nn.CrossEntropyLoss(), X, y)
    >>> exact = approx_loo(md, 0.1, "exact")
    >>> cavity = approx_loo(md, 0.1, "cavity", n_points=40)  # every point kept: exact
    >>> abs(cavity.gap - exact.gap) < 1e-8 * abs(exact.gap)
    True
    """
    md.require_labels("ApproxLOO")
    if method not in LOO_METHODS:
        raise ValueError(f"method must be one of {LOO_METHODS}; got {method!r}")
    resolved = memory.resolve_loo_method(md, method)
    if indices is not None and resolved not in _SAMPLING:
        how = f"method={method!r}" + (f" (resolved to {resolved!r})" if method != resolved else "")
        raise ValueError(f"indices selects the points of 'nystrom', 'cavity' and 'subsample'; "
                         f"{how} measures every point (take result.loo_losses[indices], or "
                         "pass method='nystrom')")
    method = resolved
    L = as_lam(lam, md.param_names, md.sizes)
    rng = check_random_state(random_state)
    if method in _SAMPLING:
        default = {"nystrom": memory.LOO_NYSTROM_POINTS, "cavity": memory.LOO_CAVITY_POINTS,
                   "subsample": md.n}[method]
        indices = _points(md, n_points, default, rng, indices)
    else:
        indices = np.arange(md.n)
    if memory_budget is not None:
        memory.check_loo_memory(md, method, memory_budget, n_points=len(indices),
                                preconditioner=preconditioner)
    md_all, positions = md, indices
    if method == "nystrom" and memory.nystrom_samples(md.n, len(indices)) < md.n:
        # its other points from a random subsample of the curvature samples, jackknifed
        others = np.setdiff1d(np.arange(md.n), indices)
        k = memory.nystrom_samples(md.n, len(indices)) - len(indices)
        used = np.sort(np.concatenate([indices, rng.choice(others, k, replace=False)]))
        md, positions = md.subset(used), np.searchsorted(used, indices)
    n = md.n_train
    diagnostics: dict = {"method": method}
    fam = md.family
    fisher_space, own_weight, proxy, jack = False, 1.0, None, []
    if method == "subsample":
        kfac = preconditioner == "kfac" and all(r.kfac_capable for r in md.rules)
        prec = _EigenbasisPreconditioner(md, L) if kfac else None  # no KFAC for the layers: plain CG
        blocks, bounds, cg_diag = _cg_blocks(md, L, torch.as_tensor(indices), tol, maxiter,
                                             prec)
        diagnostics.update(cg_diag)
        P = blocks / n
        z, y = _outputs(md, indices)
        diagnostics["solver_error_bound"] = _solver_gap_bound(fam, z, y, P, bounds / n)
    elif method == "kfac":
        blocks, z, y = _kfac_blocks(md, L)
        P = blocks / n
    else:
        z, y = _outputs(md, positions)
        fisher_space = _in_range(fam.factor(z, y), fam.residual(z, y))
        if method == "exact":
            P, z, y = _exact_blocks(md, L, fisher_space)
            diagnostics["exact_space"] = memory.exact_loo_space(md)
        else:
            rest = "nystrom" if method == "nystrom" else _CAVITY_REST
            P, z, y, own_weight, cav, proxy, jack = _cavity_blocks(md, L, positions,
                                                                   fisher_space, rest)
            diagnostics.update(cav)
    z_loo, loo, own, first, M = _steps(fam, P, z, y, fisher_space, own_weight)
    # the same steps with each jackknife group left out ('nystrom' on a curvature subsample)
    jack = [_steps(fam, Pg, z, y, fisher_space, own_weight) for Pg in jack]
    # spectrum of A_i P_i (= that of B_iᵀ P_i B_i): in [0, 1) for the exact P_i and by
    # construction for 'cavity'; a value ≥ 1 means the approximate curvature does not dominate
    # the point's own term, and the leave-one-out Newton step for that point is meaningless
    leverage = own_weight * torch.linalg.eigvalsh(M).max(1).values
    invalid = int((leverage >= 1).sum())
    diagnostics.update(max_point_leverage=float(leverage.max()), invalid_points=invalid)
    if invalid:
        warnings.warn(
            f"{WARNING_PREFIX} (method={method!r}): for {invalid} of {len(leverage)} "
            "points the approximate curvature does not dominate the point's own term (max "
            f"eigenvalue of A_i P_i = {float(leverage.max()):.3g} ≥ 1), so their leave-one-out "
            "step is invalid and the estimate is unreliable; use method='exact' or 'cavity'",
            RuntimeWarning, stacklevel=2)
    rank_terms, first = M.diagonal(dim1=1, dim2=2).sum(1).numpy(), first.numpy()
    if jack:  # per point, G·(all samples) − (G − 1)·(mean with a group left out)
        G = len(jack)
        jack = [(zg, lg, Mg.diagonal(dim1=1, dim2=2).sum(1).numpy(), fg.numpy())
                for zg, lg, _, fg, Mg in jack]
        z_loo = G * z_loo - (G - 1) * torch.stack([j[0] for j in jack]).mean(0)
        loo, rank_terms, first = (G * v - (G - 1) * np.mean([j[k] for j in jack], axis=0)
                                  for k, v in zip((1, 2, 3), (loo, rank_terms, first)))
    soft_rank, first_order = float(rank_terms.mean()) * n, float(first.mean())
    if method in _SAMPLING:
        diffs = loo - own
        train_loss = float(proxy[3].mean() if proxy is not None and md is md_all else
                           torch.cat([fam.loss(b.z, b.y) for b in md_all.batches(None)]).mean())
        gap, stderr = float(diffs.mean()), _mean_stderr(diffs)
        rank_se, first_se = n * _mean_stderr(rank_terms), _mean_stderr(first)
        if proxy is not None:  # the regression estimator on the control variate
            diagnostics.update(sample_mean_gap=gap, sample_mean_stderr=stderr)
            (gap, stderr, slope, corr), (rank_mean, rank_se, *_), (first_order, first_se, *_) = (
                _regression_estimate(v, x[positions], x, n)
                for v, x in zip((diffs, rank_terms, first), proxy))
            soft_rank, rank_se = n * rank_mean, n * rank_se
            diagnostics["control_variate"] = {"gap": float(proxy[0].mean()), "slope": slope,
                                              "correlation": corr}
        if jack:  # add the jackknife's variance of the curvature subsample to each
            left_out = np.array([[_regression_estimate(v, x[positions], x, n)[0]
                                  for v, x in zip((lg - own, rg, fg), proxy)]
                                 for _, lg, rg, fg in jack])  # (G, 3)
            var = (G - 1) / G * ((left_out - left_out.mean(0)) ** 2).sum(0)
            uncorrected = (gap + (G - 1) * left_out[:, 0].mean()) / G  # linear in the values
            diagnostics["jackknife"] = {"groups": G, "uncorrected_gap": float(uncorrected),
                                        "left_out_gaps": left_out[:, 0].tolist(),
                                        "stderr": float(np.sqrt(var[0]))}
            stderr, rank_se, first_se = (float(np.hypot(se, np.sqrt(v) * k)) for se, v, k
                                         in zip((stderr, rank_se, first_se), var, (1, n, 1)))
        if method != "subsample" and len(indices) == md_all.n == n:
            stderr = None  # every training point: nothing sampled
        else:  # the soft rank and the first-order term come from the same points
            diagnostics.update(soft_rank_stderr=rank_se, first_order_gap_stderr=first_se)
            if len(diffs) == 1:
                warnings.warn(
                    f"{WARNING_PREFIX} (method={method!r}): one point measured, so "
                    "the estimate has no standard error (stderr is NaN) and rests on that "
                    "point alone; measure at least two (n_points)", RuntimeWarning,
                    stacklevel=2)
    else:
        train_loss, gap, stderr = float(own.mean()), float(loo.mean() - own.mean()), None
    bound = diagnostics.get("solver_error_bound", 0.0)
    scale = stderr if stderr is not None and stderr > 0 else abs(gap)  # NaN: a single point
    if method == "subsample" and not bound <= _SOLVER_SHARE * scale:
        diagnostics["sampling_stderr"] = stderr
        stderr = float("nan")
        warnings.warn(
            f"{WARNING_PREFIX} (method='subsample'): after "
            f"{diagnostics['cg_iterations']} iterations of conjugate gradients (largest relative "
            f"residual {diagnostics['max_relative_residual']:.3g}, tol={tol:g}) the solver's "
            f"error in the gap may reach {bound:.3g} (first-order bound), more than "
            f"{_SOLVER_SHARE:g} of the standard error over the points "
            f"({diagnostics['sampling_stderr']:.3g}, in diagnostics['sampling_stderr'])"
            f"{'' if scale == stderr else f' or of the gap ({abs(gap):.3g})'}, so "
            "stderr is NaN; raise maxiter, or use method='cavity'", RuntimeWarning, stacklevel=2)
    return LOOResult(
        estimated_test_loss=train_loss + gap, train_loss=train_loss, gap=gap, stderr=stderr,
        loo_losses=loo, point_losses=own, loo_outputs=z_loo.numpy(), indices=indices,
        soft_rank=soft_rank, first_order_gap=first_order, method=method, n=n,
        lam=L.describe(), diagnostics=diagnostics)
