r"""Approximate leave-one-out in output space.

For the objective :math:`\sum_i \ell_i + \frac n2\theta^\top\Lambda\theta` (Gauss–Newton
Hessian :math:`n(F+\Lambda)`), removing point i and taking one Newton step moves its output to

.. math::
    z_i^{(-i)} = z_i + P_i (I - A_i P_i)^{-1} r_i,\qquad
    P_i = J_i\,\big(n(F+\Lambda)\big)^{-1} J_i^\top\ (K\times K),

with :math:`r_i = \partial\ell_i/\partial z_i` at the true label. The estimated test loss is
:math:`\frac1n\sum_i \ell(y_i, z_i^{(-i)})`; the gap estimate subtracts the training loss.
Identities: :math:`\sum_i \mathrm{tr}(A_iP_i) = \mathrm{rank}_\Lambda(F)` and
:math:`\frac1n\sum_i r_i^\top P_i r_i` is the Fisher-TIC gap estimate (the first-order term).
For MSE the step is exact: the classical leave-one-out (PRESS) shortcut.

Three ways to get :math:`P_i` (``method``):

* ``'exact'`` — from the empirical NTK :math:`\Theta = J\Lambda^{-1}J^\top` (nK×nK, built layer by
  layer, no per-sample gradient of length p) and one Cholesky of size nK (Woodbury):
  :math:`J(F+\Lambda)^{-1}J^\top = m\,[\Theta_m - \Theta_m B (I + B^\top\Theta_m B)^{-1}
  B^\top\Theta_m]`, :math:`\Theta_m = \Theta/m`, m = samples in the curvature;
* ``'kfac'`` — :math:`P_i` from the Kronecker factors' eigenbases, one sample at a time, any n;
* ``'subsample'`` — the estimate is a mean over points: compute it on ``n_points`` random points,
  with :math:`P_i` from conjugate gradients (K right-hand sides per point) against the
  full-data Fisher, and report a standard error.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.utils import check_random_state

from .curvature import GramCurvature, KroneckerCurvature, per_sample_jacobians
from .curvature.kronecker import KroneckerSums, require_kfac_capable
from .curvature.matfree import GGNOperator
from .layers import LayerBatch
from .regularization import as_lam

__all__ = ["LOOResult", "approx_loo", "LOO_METHODS"]

LOO_METHODS = ("exact", "kfac", "subsample")


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


def _exact_blocks(md, L):
    """(m, K, K) blocks J_i (F+Λ)⁻¹ J_iᵀ for all curvature samples, by Woodbury on the NTK."""
    w = tuple(1.0 / v for v in L.tensor_values("ApproxLOO(method='exact')"))
    ntk = GramCurvature(md, "ntk", "jacobian")
    theta = ntk.kernel(w)  # Θ/m, rows (i, k)
    m, K = md.n, ntk.V
    Bs = torch.cat([md.family.factor(b.z, b.y) for b in md.batches(None)])  # (m, K, K')
    Kp = Bs.shape[2]
    idx = torch.arange(m)
    diag_theta = theta.view(m, K, m, K)[idx, :, idx, :].clone()  # (m, K, K)
    M1 = torch.einsum("ikc,ikx->icx", Bs, theta.view(m, K, m * K)).reshape(m * Kp, m * K)
    ntk._kernels.clear()
    del theta
    inner = torch.einsum("xjl,jld->xjd", M1.view(m * Kp, m, K), Bs).reshape(m * Kp, m * Kp)
    inner.diagonal().add_(1.0)
    chol, info = torch.linalg.cholesky_ex(inner)
    del inner
    if info != 0:
        raise RuntimeError("Cholesky of I + BᵀΘB failed (non-finite outputs?)")
    W = torch.linalg.solve_triangular(chol, M1, upper=False).view(m * Kp, m, K)
    del M1, chol
    corr = torch.einsum("xik,xil->ikl", W, W)
    return m * (diag_theta - corr)


#: bytes of layer records (Jacobian output gradients and layer inputs, kept in the layers' own
#: dtype) that ``method='kfac'`` holds from its factor pass for its block pass; batches beyond
#: it are recomputed (one more forward and K backward vectors each), so memory stays bounded
KFAC_CACHE_BYTES = 512 * 2 ** 20


def _lossless(t, dtype):
    """``dtype`` when ``t`` converts to it and back exactly (records are float64 copies of
    tensors in the layer's dtype), else ``t.dtype``."""
    return dtype if torch.equal(t.to(dtype).to(t.dtype), t) else t.dtype


def _fisher_grads(g, B):
    """(N, K', T, d) output gradients of the Fisher vectors (columns of B, (N, K, K')) from the
    Jacobian ones g (K, N, T, d): Σ_k B[n, k, c] g[k, n]. Sample-major rather than (K', N, T, d):
    the factor sums run over both, and this order needs no copy."""
    V, N, T, d = g.shape
    gj = g.reshape(V, N, T * d).transpose(0, 1)  # (N, K, T·d), a view if it can
    return torch.bmm(B.transpose(1, 2), gj).view(N, -1, T, d)


def _kfac_blocks(md, L):
    r"""(m, K, K) blocks :math:`J_i (F_{\mathrm{KFAC}}+\Lambda)^{-1} J_i^\top`, plus the
    outputs z and targets y, from one backward pass of the K unit vectors per sample.

    Backpropagation is linear in the output vector, so the output gradients of the Fisher
    vectors (columns of :math:`B_i`) are :math:`\sum_k B_i[k, c]\, g^{(k)}`, combinations of
    the Jacobian ones :math:`g^{(k)}`: the same pass gives the Kronecker factors (as
    ``KroneckerCurvature(md, 'fisher', 'fisher')``) and, once they are eigendecomposed, the
    blocks, from records kept up to :data:`KFAC_CACHE_BYTES` (the rest is recomputed)."""
    rules = md.rules
    require_kfac_capable(rules)
    dtypes = None  # storage dtype of (inputs, output gradients) per layer, from the first batch
    sums = KroneckerSums(rules)
    cache, zs, ys, used, caching = [], [], [], 0, True
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
            if used + size <= KFAC_CACHE_BYTES:
                cache.append(rec)
                used += size
            else:
                caching = False
        del b
    F = KroneckerCurvature.from_factors(md, *sums.factors(md.n))

    def blocks(layers):
        return F.output_blocks(layers, L).cpu()

    out = [blocks([LayerBatch(a.double(), g.double()) for a, g in rec]) for rec in cache]
    done = len(cache) * md.batch_size
    if done < md.n:
        out += [blocks(b.layers) for b in md.batches("jacobian",
                                                     indices=torch.arange(done, md.n))]
    return torch.cat(out), torch.cat(zs), torch.cat(ys)


def _cg_blocks(md, L, indices, tol, maxiter, preconditioner):
    op = GGNOperator(md, tol=tol, maxiter=maxiter, preconditioner=preconditioner)
    xs = md.X[indices].to(md.device)
    J = per_sample_jacobians(md, xs).double()  # (m, K, p)
    mK = J.shape[0] * J.shape[1]
    X = op.solve(J.reshape(mK, -1).T.cpu(), L)  # (p, mK)
    blocks = torch.einsum("ikp,pil->ikl", J.cpu(), X.view(-1, J.shape[0], J.shape[1]))
    cg = op.last_cg
    return blocks, {"cg_iterations": cg.iterations, "n_matvec": op.n_matvec,
                    "converged": bool(cg.converged.all()),
                    "max_relative_residual": float(cg.relative_residual.max())}


def approx_loo(md, lam, method: str = "exact", *, n_points: int | None = None,
               random_state=None, tol: float = 1e-8, maxiter: int = 500,
               preconditioner: str | None = "kfac", memory_budget=None) -> LOOResult:
    r"""Approximate leave-one-out estimate of the test loss of ``md``'s network.

    One Newton step of the objective without each point, in output space (see
    :class:`softrank.ApproxLOO`, which wraps this function for a skorch net).

    Parameters
    ----------
    md : ModelData
        The training data (curvature samples); ``md.n_train`` is n of the objective.
    lam : float, dict or torch.Tensor
        Λ, the weight decay of the objective.
    method : {'exact', 'kfac', 'subsample'}, default='exact'
        'exact': empirical NTK and one Cholesky factorization of size nK; 'kfac': Kronecker
        factors; 'subsample': ``n_points`` random points, conjugate gradients against the
        full-data Fisher (KFAC-preconditioned unless ``preconditioner=None`` or a
        measured layer has no Kronecker factorization).
    n_points : int or None, default=None
        Points for 'subsample' (None: all).
    random_state : int or None, default=None
        Seeds the points of 'subsample'.
    tol, maxiter : float, int, default=1e-8, 500
        Conjugate-gradient tolerance (relative residual) and iteration limit.
    preconditioner : {'kfac', None}, default='kfac'
        Preconditioner of the conjugate gradients.
    memory_budget : int, str or None, default=None
        Refuse with a MemoryError, before any data pass, when
        :func:`softrank.memory.estimate_loo_memory` says the method needs more.

    Returns
    -------
    LOOResult
        ``estimated_test_loss``, ``train_loss``, ``gap`` (loss units), ``stderr``
        ('subsample'), per-point ``loo_losses``, ``soft_rank``, ``first_order_gap`` (the TIC
        term) and ``diagnostics``.

    Raises
    ------
    ValueError
        For an unknown method, or ``n_points`` outside 1..m.
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
    >>> from softrank import ModelData
    >>> _ = torch.manual_seed(0)
    >>> X, y = torch.randn(100, 5), torch.randint(0, 3, (100,))
    >>> md = ModelData(nn.Linear(5, 3), nn.CrossEntropyLoss(), X, y)
    >>> from softrank import approx_loo
    >>> res = approx_loo(md, 1e-2, "exact")
    >>> res.loo_losses.shape, bool(res.estimated_test_loss > res.train_loss)
    ((100,), True)
    """
    md.require_labels("ApproxLOO")
    if method not in LOO_METHODS:
        raise ValueError(f"method must be one of {LOO_METHODS}; got {method!r}")
    if memory_budget is not None:
        from .memory import check_loo_memory
        check_loo_memory(md, method, memory_budget, n_points=n_points,
                         preconditioner=preconditioner)
    L = as_lam(lam, md.param_names, md.sizes)
    n = md.n_train
    diagnostics: dict = {"method": method}
    if method == "subsample":
        m_pts = md.n if n_points is None else int(n_points)
        if not 1 <= m_pts <= md.n:
            raise ValueError(f"n_points must be in 1..{md.n}; got {n_points}")
        rng = check_random_state(random_state)
        indices = np.sort(rng.choice(md.n, m_pts, replace=False))
        kfac = preconditioner == "kfac" and all(r.kfac_capable for r in md.rules)
        prec = KroneckerCurvature(md) if kfac else None  # no KFAC for the layers: plain CG
        blocks, cg_diag = _cg_blocks(md, L, torch.as_tensor(indices), tol, maxiter, prec)
        diagnostics.update(cg_diag)
    else:
        indices = np.arange(md.n)
        if method == "kfac":
            blocks, z, y = _kfac_blocks(md, L)
        else:
            blocks = _exact_blocks(md, L)
    P = blocks / n
    if method != "kfac":
        out = [b for b in md.batches(None, indices=torch.as_tensor(indices))]
        z = torch.cat([b.z for b in out])
        y = torch.cat([b.y for b in out])
    fam = md.family
    Bf = fam.factor(z, y)
    A = Bf @ Bf.transpose(1, 2)
    r = fam.residual(z, y)
    eye = torch.eye(z.shape[1], dtype=torch.float64)
    step = torch.linalg.solve(eye - A @ P, r.unsqueeze(2))
    z_loo = z + (P @ step).squeeze(2)
    loo = fam.loss(z_loo, y).numpy()
    own = fam.loss(z, y).numpy()
    # spectrum of A_i P_i (= that of B_iᵀ P_i B_i): in [0, 1) for the exact P_i; a value ≥ 1
    # means the approximate curvature does not dominate the point's own term, and the
    # leave-one-out Newton step for that point is meaningless
    leverage = torch.linalg.eigvalsh(Bf.transpose(1, 2) @ P @ Bf).max(1).values
    invalid = int((leverage >= 1).sum())
    diagnostics.update(max_point_leverage=float(leverage.max()), invalid_points=invalid)
    if invalid:
        warnings.warn(
            f"ApproxLOO(method={method!r}): for {invalid} of {len(leverage)} points the "
            f"approximate curvature does not dominate the point's own term (max eigenvalue of "
            f"A_i P_i = {float(leverage.max()):.3g} ≥ 1), so their leave-one-out step is "
            "invalid and the estimate is unreliable; use method='exact' or 'subsample'",
            RuntimeWarning, stacklevel=2)
    rank_terms = torch.einsum("ikl,ilk->i", A, P)
    first = torch.einsum("ik,ikl,il->i", r, P, r)
    if method == "subsample":
        diffs = loo - own
        train_loss = float(torch.cat([fam.loss(b.z, b.y) for b in md.batches(None)]).mean())
        gap = float(diffs.mean())
        stderr = float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
    else:
        train_loss, gap, stderr = float(own.mean()), float(loo.mean() - own.mean()), None
    return LOOResult(
        estimated_test_loss=train_loss + gap, train_loss=train_loss, gap=gap, stderr=stderr,
        loo_losses=loo, point_losses=own, loo_outputs=z_loo.numpy(), indices=indices,
        soft_rank=float(rank_terms.mean()) * n, first_order_gap=float(first.mean()),
        method=method, n=n, lam=L.describe(), diagnostics=diagnostics)
