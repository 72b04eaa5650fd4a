"""Curvature representations behind one interface, chosen by ``approximation=``.

=============  ==============================================================  ============
approximation  how                                                             matrices
=============  ==============================================================  ============
``dense``      explicit p×p float64 matrix from torch.func (p ≤ max_params)    F, F_MC, C, H
``gram``       exact, through the nK×nK kernel; no per-sample gradients        F, F_MC, C
``diagonal``   exact diagonal from the K columns of B (or sampled)             F, F_MC, C
``kfac``       Kronecker factors per Linear/Conv2d layer, eigendecomposed      F, F_MC, C
``ekfac``      KFAC eigenbasis, eigenvalues re-fitted to per-sample gradients  F, F_MC, C
``exact``      ``dense`` when p ≤ max_params, else ``gram``                    as those
=============  ==============================================================  ============

``matrix_free``: products only (F, F_MC, C, H) — SLQ, Hutch++, Lanczos, CG/MINRES, each estimate
with its standard error (:mod:`.matfree`).

Matrices: ``fisher`` (F = GGN), ``fisher_mc`` (sampled Fisher), ``gsm`` (C, the gradient second
moment at the true labels; ``centered=True`` subtracts ḡḡᵀ) and ``hessian`` (H).
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.utils import check_random_state

from .base import Curvature, DenseCurvature
from .dense import DEFAULT_MAX_PARAMS, dense_curvature, per_sample_jacobians
from .diagonal import DiagonalCurvature
from .gram import GramCurvature
from .hessian import hessian_vector_product
from .kronecker import KroneckerCurvature
from .matfree import MatrixFreeCurvature

__all__ = ["curvature", "Curvature", "DenseCurvature", "GramCurvature", "DiagonalCurvature",
           "KroneckerCurvature", "MatrixFreeCurvature", "hessian_vector_product",
           "per_sample_jacobians",
           "APPROXIMATIONS", "MATRICES", "make_generator"]

APPROXIMATIONS = ("exact", "dense", "gram", "diagonal", "kfac", "ekfac", "matrix_free")
MATRICES = ("fisher", "fisher_mc", "gsm", "hessian")
_VECTORS = {"fisher": "fisher", "fisher_mc": "sampled", "gsm": "residual"}


def make_generator(random_state, device="cpu") -> torch.Generator:
    """A torch generator seeded from an int, a RandomState or None (fresh entropy)."""
    seed = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
    return torch.Generator(device=device).manual_seed(seed)


def curvature(md, matrix: str = "fisher", approximation: str = "exact", *,
              random_state=None, mc_samples: int = 1, centered: bool = False,
              max_params: int = DEFAULT_MAX_PARAMS, max_rows: int = 20000,
              memory_budget=None, **options) -> Curvature:
    r"""Build the representation of a curvature matrix of a :class:`ModelData`.

    Parameters
    ----------
    md : ModelData
        The network and its training data.
    matrix : {'fisher', 'fisher_mc', 'gsm', 'hessian'}, default='fisher'
        F (the Fisher = GGN), the sampled Fisher, C (the gradient second moment) or H.
    approximation : {'exact', 'dense', 'gram', 'diagonal', 'kfac', 'ekfac', 'matrix_free'}, default='exact'
        The representation ('exact': dense for p ≤ ``max_params``, else Gram).
    random_state : int or None, default=None
        Seeds the labels drawn for 'fisher_mc' and the probes of 'matrix_free'.
    mc_samples : int, default=1
        Labels drawn per input for 'fisher_mc'.
    centered : bool, default=False
        Subtract the mean gradient's outer product from C.
    max_params, max_rows : int, default=5000, 20000
        Limits of the dense (p) and Gram (n·K) representations for 'exact'.
    memory_budget : int, str or None, default=None
        Refuse with a MemoryError, before any data pass, when
        :func:`softrank.memory.estimate_memory` says the representation needs more.
    **options
        Passed to the matrix-free representation (``n_probes``, ``lanczos_steps``, ``tol``,
        ``maxiter``, ``preconditioner``, ``block_size``).

    Returns
    -------
    Curvature
        With ``trace()``, ``diagonal()``, ``eigvals()``, ``matvec(v)``, ``solve(v, lam)``,
        ``soft_rank(lam)``, ``logdet_dim(lam)``... (matrices of the mean loss).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from softrank import ModelData
    >>> _ = torch.manual_seed(0)
    >>> X, y = torch.randn(100, 5), torch.randint(0, 3, (100,))
    >>> md = ModelData(nn.Linear(5, 3), nn.CrossEntropyLoss(), X, y)
    >>> from softrank import curvature
    >>> F = curvature(md, "fisher", "dense")
    >>> 0 < F.soft_rank(1e-2) <= 18  # p = 18 parameters
    True
    """
    if matrix not in MATRICES:
        raise ValueError(f"matrix must be one of {MATRICES}; got {matrix!r}")
    if approximation not in APPROXIMATIONS:
        raise ValueError(f"approximation must be one of {APPROXIMATIONS}; got {approximation!r}")
    if centered and matrix != "gsm":
        raise ValueError("centered=True applies to the gradient second moment (matrix='gsm') only")
    if matrix == "fisher_mc":
        md.require_fisher("the sampled Fisher (matrix='fisher_mc')")
    if approximation == "exact":
        approximation = "dense" if md.n_params <= max_params or matrix == "hessian" else "gram"
    if options and approximation != "matrix_free":
        raise TypeError(f"options {sorted(options)} apply to approximation='matrix_free' only")
    if memory_budget is not None:
        from ..memory import check_memory
        check_memory(md, approximation, matrix, memory_budget, max_params=max_params,
                     mc_samples=mc_samples, **options)
    if approximation == "matrix_free":
        return MatrixFreeCurvature(md, matrix, random_state=random_state, mc_samples=mc_samples,
                                   centered=centered, **options)
    gen = make_generator(random_state, md.device) if matrix == "fisher_mc" else None
    if approximation == "dense":
        M = dense_curvature(md, matrix, generator=gen, mc_samples=mc_samples,
                            centered=centered, max_params=max_params)
        if not bool(torch.isfinite(M.M).all()):  # e.g. a criterion whose Hessian is NaN there
            raise ValueError(f"the dense {matrix!r} matrix contains NaN or inf at finite network "
                             "outputs: the criterion's second derivatives are undefined or "
                             "overflow at these parameters")
        return M
    if matrix == "hessian":
        raise ValueError(f"the Hessian has no {approximation!r} representation (it is not a sum "
                         "of outer products); use approximation='dense' (small p)")
    vec = _VECTORS[matrix]
    if approximation == "gram":
        return GramCurvature(md, matrix, vec, generator=gen, mc_samples=mc_samples,
                             centered=centered, max_rows=max_rows)
    if approximation == "diagonal":
        return DiagonalCurvature(md, matrix, vec, generator=gen, mc_samples=mc_samples,
                                 centered=centered)
    if centered:
        raise ValueError(f"centered=True is not available with approximation={approximation!r}")
    return KroneckerCurvature(md, matrix, vec, ekfac=approximation == "ekfac", generator=gen,
                              mc_samples=mc_samples)
