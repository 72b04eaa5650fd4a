"""Reference numbers from peer curvature libraries, in softrank's conventions.

Each function imports its library lazily, so importing this module never fails;
tests call ``pytest.importorskip("curvlinops")`` (etc.) before using them.

Conventions of every function here (SPEC §2, §3):

- curvature of the **mean** loss over the n samples;
- F = mean_i J_iᵀ A_i J_i with A = diag(π) − ππᵀ for ``CrossEntropyLoss`` and
  A = (2/d) I for ``MSELoss()`` (mean reduction, d outputs);
- parameter vector = concatenation of ``model.parameters()`` flattened row-major
  (weight then bias per layer);
- the user's model is never modified: every function works on a deep copy, cast
  to ``dtype`` (float64 by default), and the inputs (and float targets) are cast too;
- results are float64 tensors (or Python floats).

See tests/PEERS_NOTES.md for install commands and each library's own conventions.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
from torch import nn

__all__ = [
    "curvlinops_ggn_dense",
    "curvlinops_ggn_matvec",
    "curvlinops_kfac",
    "curvlinops_ekfac",
    "backpack_diag_ggn",
    "nngeometry_kfac",
    "nngeometry_kfac_trace",
]


# --------------------------------------------------------------------------- helpers
def _prepare(model, loss_fn, X, y, dtype):
    """Deep-copied model and loss in ``dtype``; X (and float y) cast to ``dtype``."""
    m = copy.deepcopy(model).to(dtype)
    m.eval()
    lf = copy.deepcopy(loss_fn)
    if getattr(lf, "reduction", "mean") != "mean":
        raise ValueError("softrank's convention is the mean loss: use reduction='mean'")
    X = X.detach().to(dtype)
    y = y.detach()
    if y.is_floating_point():
        y = y.to(dtype)
    return m, lf, X, y


def _batches(X, y, batch_size):
    if batch_size is None or batch_size >= len(X):
        return [(X, y)]
    return [(X[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(X), batch_size)]


# --------------------------------------------------------------------------- curvlinops
def _curvlinops_ggn_op(model, loss_fn, X, y, dtype, batch_size):
    from curvlinops import GGNLinearOperator

    m, lf, X, y = _prepare(model, loss_fn, X, y, dtype)
    params = list(m.parameters())
    # reduction='mean': curvlinops scales each batch by batch_size / N_data, so the
    # operator is (1/N) Σ_i J_iᵀ ∇²ℓ_i J_i, where ℓ_i is the per-sample loss as
    # torch's mean reduction defines it (MSE: averaged over the d outputs too).
    op = GGNLinearOperator(
        m, lf, params, _batches(X, y, batch_size), check_deterministic=False
    )
    return op, params


def curvlinops_ggn_dense(model, loss_fn, X, y, *, dtype=torch.float64, batch_size=None):
    """Exact GGN/Fisher F (p×p, float64) of the mean loss, via curvlinops."""
    op, params = _curvlinops_ggn_op(model, loss_fn, X, y, dtype, batch_size)
    p = sum(q.numel() for q in params)
    eye = torch.eye(p, dtype=dtype)
    F = op @ eye
    return F.to(torch.float64)


def curvlinops_ggn_matvec(model, loss_fn, X, y, v, *, dtype=torch.float64, batch_size=None):
    """F @ v (exact GGN of the mean loss) via curvlinops. ``v``: (p,) or (p, k)."""
    op, _ = _curvlinops_ggn_op(model, loss_fn, X, y, dtype, batch_size)
    return (op @ v.detach().to(dtype)).to(torch.float64)


def _curvlinops_kfac_like(cls, model, loss_fn, X, y, joint_bias, kfac_approx, fisher_type,
                          dtype, batch_size):
    m, lf, X, y = _prepare(model, loss_fn, X, y, dtype)
    params = list(m.parameters())
    op = cls(
        m,
        lf,
        params,
        _batches(X, y, batch_size),
        check_deterministic=False,
        fisher_type=fisher_type,
        kfac_approx=kfac_approx,
        separate_weight_and_bias=not joint_bias,
    )
    return m, op, params


def _layer_names(op):
    """Module names of the layers with parameters, in model.parameters() order."""
    return list(op._mapping.keys())


def curvlinops_kfac(model, loss_fn, X, y, joint_bias=True, *, kfac_approx="expand",
                    fisher_type="type-2", dtype=torch.float64, batch_size=None):
    """KFAC of the mean-loss Fisher via curvlinops' ``KFACLinearOperator``.

    Defaults match softrank's KFAC: exact per-class G (curvlinops ``fisher_type="type-2"``;
    ``"mc"`` samples one label per input, ``"empirical"`` uses the true labels),
    ``kfac_approx="expand"`` for Conv2d, bias folded into A when ``joint_bias``.

    Returns a dict with

    - ``"layers"``: list (model order) of dicts ``{"name", "A", "G"}``, float64:
        * ``A`` = (1/(nT)) Σ_{i,t} ã ãᵀ, ã = [a, 1] if joint_bias (and the layer has a
          bias) else a; a is the layer input (Conv2d: the unfolded patch, ordering
          (c_in, kh, kw) = weight.flatten(1)); T = number of output locations (1 for Linear);
        * ``G`` = (1/n) Σ_i Σ_c Σ_t g_ict g_ictᵀ, g_ict = gradient w.r.t. the layer's
          output at location t of z_i · B_i[:, c] (B_i Bᵢᵀ = A_i, softrank's scaling).
      In parameter order (W row-major, then b) the weight block is ``kron(G, A)``;
      with joint_bias the joint block of [W | b] (row-major) is ``kron(G, Ã)``;
      with separate bias the bias block is ``G`` (input factor 1, cross terms 0).
    - ``"trace"``: Σ_l tr(A_l) tr(G_l) (+ tr(G_l) per separate bias), a float;
    - ``"dense"``: the whole block-diagonal KFAC matrix (p×p, float64) in
      model.parameters() order (obtained as KFAC @ I from the operator).
    """
    from curvlinops import KFACLinearOperator

    m, op, params = _curvlinops_kfac_like(
        KFACLinearOperator, model, loss_fn, X, y, joint_bias, kfac_approx, fisher_type,
        dtype, batch_size,
    )
    op.compute_kronecker_factors()
    layers = []
    for name in _layer_names(op):
        A = op._input_covariances.get(name)
        G = op._gradient_covariances[name]
        layers.append({
            "name": name,
            "A": None if A is None else A.detach().clone().to(torch.float64),
            "G": G.detach().clone().to(torch.float64),
        })
    trace = float(op.trace)
    p = sum(q.numel() for q in params)
    dense = (op @ torch.eye(p, dtype=dtype)).to(torch.float64)
    return {"layers": layers, "trace": trace, "dense": dense}


def curvlinops_ekfac(model, loss_fn, X, y, joint_bias=True, *, kfac_approx="expand",
                     fisher_type="type-2", dtype=torch.float64, batch_size=None):
    """EKFAC of the mean-loss Fisher via curvlinops' ``EKFACLinearOperator``.

    Eigenbasis Q_G ⊗ Q_A of the KFAC factors (as in :func:`curvlinops_kfac`); the
    eigenvalue of basis vector (j, k) is re-fit as
    (1/n) Σ_i Σ_c (q_G,jᵀ (Σ_t g_ict ã_itᵀ) q_A,k)², i.e. the exact Fisher's diagonal
    in that basis (per-class backprop with ``fisher_type="type-2"``).

    Returns ``{"layers": [{"name", "QA", "QG", "eigenvalues"}], "trace", "dense"}``;
    ``eigenvalues`` has shape (d_out, d_in[+1]); for separate bias the bias entry is a
    dict {"weight": (d_out, d_in), "bias": (d_out,)} with QA None for the bias.
    ``dense`` is EKFAC @ I in model.parameters() order (p×p, float64).
    """
    from curvlinops import EKFACLinearOperator

    m, op, params = _curvlinops_kfac_like(
        EKFACLinearOperator, model, loss_fn, X, y, joint_bias, kfac_approx, fisher_type,
        dtype, batch_size,
    )
    op._maybe_compute_ekfac()
    layers = []
    for name in _layer_names(op):
        QA = op._input_covariances_eigenvectors.get(name)
        QG = op._gradient_covariances_eigenvectors[name]
        ev = op._corrected_eigenvalues[name]
        if isinstance(ev, dict):  # separate weight/bias: keys are parameter positions
            pos = op._mapping[name]
            ev = {pn: ev[i].detach().clone().to(torch.float64) for pn, i in pos.items()}
        else:
            ev = ev.detach().clone().to(torch.float64)
        layers.append({
            "name": name,
            "QA": None if QA is None else QA.detach().clone().to(torch.float64),
            "QG": QG.detach().clone().to(torch.float64),
            "eigenvalues": ev,
        })
    trace = float(op.trace)
    p = sum(q.numel() for q in params)
    dense = (op @ torch.eye(p, dtype=dtype)).to(torch.float64)
    return {"layers": layers, "trace": trace, "dense": dense}


# --------------------------------------------------------------------------- BackPACK
def backpack_diag_ggn(model, loss_fn, X, y, *, dtype=torch.float64):
    """Exact diagonal of F (p,), float64, via BackPACK's ``DiagGGNExact``.

    BackPACK backpropagates the symmetric factor of the loss Hessian of the batch loss
    as defined by the criterion: with reduction='mean' CrossEntropy it is divided by
    N, MSELoss by N·d (sqrt(2/(N d)) I per sample), which is softrank's mean
    convention. One batch holds all samples (BackPACK's quantities are per batch).
    """
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    m, lf, X, y = _prepare(model, loss_fn, X, y, dtype)
    m = extend(m)
    lf = extend(lf)
    loss = lf(m(X), y)
    with warnings.catch_warnings():
        # BackPACK's module hooks fire although X does not require grad: harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        with backpack(DiagGGNExact()):
            loss.backward()
    out = torch.cat([p.diag_ggn_exact.reshape(-1) for p in m.parameters()])
    return out.detach().to(torch.float64)


# --------------------------------------------------------------------------- nngeometry
@contextlib.contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def nngeometry_kfac(model, X, y, *, dtype=torch.float64, batch_size=None):
    """nngeometry's ``FIM(..., PMatKFAC, variant="classif_logits")`` for a classifier.

    Returns ``{"layers": [{"name", "A", "G"}], "trace"}`` with nngeometry's own factor
    scaling (Linear: A = sqrt(K−1)/n Σ ã ãᵀ, G = 1/(sqrt(K−1) n) Σ_{i,c} g gᵀ;
    Conv2d: A = sqrt(K−1)/n Σ_{i,t} ã ãᵀ, G = 1/(sqrt(K−1) n T) Σ_{i,c,t} g gᵀ); the
    products A⊗G, and so the trace, are softrank's KFAC (expand, joint bias).
    """
    from torch.utils.data import DataLoader, TensorDataset

    from nngeometry.metrics import FIM
    from nngeometry.object import PMatKFAC

    m, _, X, y = _prepare(model, nn.CrossEntropyLoss(), X, y, dtype)
    loader = DataLoader(TensorDataset(X.clone(), y.clone()),
                        batch_size=batch_size or len(X), shuffle=False)
    # classif_logits builds its Cholesky factor with tensors in the *default* dtype
    # (torch.ones, torch.tril, torch.finfo().eps): run it with the model's dtype.
    with _default_dtype(dtype):
        F = FIM(m, loader, PMatKFAC, variant="classif_logits")
        trace = float(F.trace())
    lc = F.generator.layer_collection
    layers = [
        {"name": lid, "A": F.data[lid][0].to(torch.float64), "G": F.data[lid][1].to(torch.float64)}
        for lid in lc.layers.keys()
    ]
    return {"layers": layers, "trace": trace}


def nngeometry_kfac_trace(model, X, y, *, dtype=torch.float64, batch_size=None):
    """Trace of nngeometry's KFAC Fisher (CrossEntropy classifier, mean convention).

    Equals Σ_l tr(A_l) tr(G_l) for softrank's KFAC with joint bias and expand.
    """
    return nngeometry_kfac(model, X, y, dtype=dtype, batch_size=batch_size)["trace"]
