r"""Every measure of one trained model, as flat columns of its result row.

Column names (n = training-set size, λ = weight decay, α = Tr C / Tr F on the training data):

==========================  ========================================================================
``train_loss, test_loss``   mean cross-entropy; ``observed_gap`` = test − train loss
``train_acc, test_acc``     accuracies; ``error_gap`` = train acc − test acc
``ece_train, ece_test``     expected calibration error (equal-width confidence bins)
``alpha_train``             :math:`\alpha = \mathrm{Tr}\,C/\mathrm{Tr}\,F` on the training data
``alpha_test``              the same on ``test_samples`` test points
                            (α < 1: under-, α > 1: over-confident)
``rank_<a>``                :math:`\mathrm{rank}_\lambda(F)` with approximation ``a``
``est_softrank_<a>``        soft-rank gap estimate :math:`\alpha\,\mathrm{rank}_\lambda(F)/n`
``est_rank_n_<a>``          calibrated estimate :math:`\mathrm{rank}_\lambda(F)/n`
``est_tic_<a>``             Fisher TIC :math:`\mathrm{Tr}\,C(F+\lambda I)^{-1}/n`
``est_trace_ratio``         :math:`\alpha/n` (Thomas et al., 2020)
``est_loo_<m>``             ApproxLOO gap by method ``m``
``hessian_trace``           Tr H (dense, or matrix-free Hutch++ with ``hessian_trace_stderr``)
``hessian_spectral``        largest eigenvalue of H (dense, or matrix-free Lanczos)
``grad_norm``               ‖∇(mean loss + ½λ‖θ‖²)‖ on the training data
``grad_norm_relative``      the same divided by ‖λθ‖ (0 at the minimizer the estimates assume)
``loo_<m>_invalid_points``  points whose ApproxLOO step is invalid (max eig A_iP_i ≥ 1), and
``loo_<m>_max_leverage``    the largest such eigenvalue
``time_<step>``             seconds per step
``errors``                  ``step: error`` for each step that failed (its columns are absent)
``skipped``                 steps left out on purpose, with the reason
==========================  ========================================================================

Every ``est_*`` column is a gap estimate in loss units, comparable to ``observed_gap``.
``'gram'`` (exact) uses a random subsample of ``gram_samples`` training points when n is larger
(``n_curvature_gram``; n stays the training-set size): it is then the soft rank of the
subsample's Fisher, which misses the directions pinned by the other points (at most
m(K−1) of them), not the full one. ApproxLOO ``'exact'`` runs only when n ≤ ``gram_samples``:
on a subsample each point's own share of the Fisher would be n/m too large and its leave-one-out
step far too small, so above ``gram_samples`` the large-n method of ``ApproxLOO(method='auto')``,
``'nystrom'``, runs in its place as ``est_loo_nystrom``, with a standard error, keeping
``loo_points`` points (``skipped`` says so). The Hessian uses ``hessian_samples`` points.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable

import numpy as np
import torch

from .. import measures as core
from ..curvature import curvature
from ..loo import WARNING_PREFIX, approx_loo
from ..model import ModelData
from ..regularization import as_lam

__all__ = ["evaluate", "measure_model", "expected_calibration_error"]


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    r""":math:`\mathrm{ECE} = \sum_b \frac{|B_b|}{N}\,|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|`
    over ``n_bins`` equal-width bins of the top-class confidence (Guo et al., 2017).

    One bin holds both points (confidences 0.9 right, 0.6 wrong): |1/2 − 0.75|.

    >>> expected_calibration_error(np.array([[0.9, 0.1], [0.6, 0.4]]), np.array([0, 1]), 2)
    0.25
    """
    conf = probs.max(1)
    correct = (probs.argmax(1) == y).astype(float)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        mask = bins == b
        total += mask.sum() * abs(correct[mask].mean() - conf[mask].mean())
    return float(total / len(y))


def _outputs(md: ModelData) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(md.batches(None))
    return torch.cat([b.z for b in batches]), torch.cat([b.y for b in batches])


def _fit_statistics(md: ModelData, n_bins: int) -> tuple[float, float, float]:
    """(mean loss, accuracy, ECE) on the data of ``md``."""
    z, y = _outputs(md)
    loss = float(md.family.loss(z, y).mean())
    probs = torch.softmax(z, 1).numpy()
    labels = y.numpy()
    return loss, float((probs.argmax(1) == labels).mean()), \
        expected_calibration_error(probs, labels, n_bins)


def evaluate(module, criterion, data, options) -> dict[str, float]:
    """Train/test loss, accuracy, ECE, observed gap (``module`` is not changed)."""
    t0 = time.perf_counter()
    stats = {}
    for split, X, y in (("train", data.X_train, data.y_train), ("test", data.X_test, data.y_test)):
        md = ModelData(module, criterion, X, y, batch_size=options.batch_size)
        stats[split] = _fit_statistics(md, options.ece_bins)
    (tr_loss, tr_acc, tr_ece), (te_loss, te_acc, te_ece) = stats["train"], stats["test"]
    return {"train_loss": tr_loss, "test_loss": te_loss, "observed_gap": te_loss - tr_loss,
            "train_acc": tr_acc, "test_acc": te_acc, "error_gap": tr_acc - te_acc,
            "ece_train": tr_ece, "ece_test": te_ece, "time_eval": time.perf_counter() - t0}


def _subsample(module, criterion, X, y, m: int, n_train: int, seed: int, options) -> ModelData:
    """ModelData on ``m`` random rows of (X, y) (all when m ≥ len(X)); n stays ``n_train``."""
    if m < len(X):
        idx = np.sort(np.random.default_rng(seed).choice(len(X), m, replace=False))
        X, y = X[idx], y[idx]
    return ModelData(module, criterion, X, y, n_train=n_train, batch_size=options.batch_size)


class _Row:
    """Collects columns; each step is timed and its failure recorded, not raised."""

    def __init__(self):
        self.values: dict[str, Any] = {}
        self.errors: list[str] = []
        self.skipped: list[str] = []

    def step(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        try:
            self.values.update(fn())
        except Exception as e:  # one failed measure must not lose the model's other columns
            self.errors.append(f"{name}: {type(e).__name__}: {e}"[:300])
        self.values[f"time_{name}"] = time.perf_counter() - t0


def measure_model(module, criterion, data, lam: float, options, seed: int = 0
                  ) -> dict[str, Any]:
    """All measures of :mod:`softrank.study.measures` on the training data of ``data``."""
    n = len(data.X_train)
    md = ModelData(module, criterion, data.X_train, data.y_train, n_train=n,
                   batch_size=options.batch_size)
    md_gram = _subsample(module, criterion, data.X_train, data.y_train, options.gram_samples,
                         n, seed, options)
    row = _Row()
    row.values["n_curvature_gram"] = md_gram.n
    row.step("stationarity", lambda: _stationarity(md, lam))
    row.step("alpha_train", lambda: _alpha_train(md))
    alpha = row.values.get("alpha_train", float("nan"))
    row.step("alpha_test", lambda: _alpha_test(module, criterion, data, n, seed, options))
    for approx in dict.fromkeys(options.soft_rank + options.tic):
        md_a = md_gram if approx == "gram" else md
        row.step(approx, lambda: _fisher_measures(md_a, lam, approx, alpha, options))
    for method in options.loo:
        if method == "exact" and n > options.gram_samples:  # the large-n method instead
            method = "nystrom"
            row.skipped.append(f"loo_exact: n={n} > gram_samples={options.gram_samples}; "
                               f"loo_{method} instead")
        row.step(f"loo_{method}", lambda: _loo(md, lam, method, seed, options.loo_points))
    if options.hessian:
        md_h = _subsample(module, criterion, data.X_train, data.y_train,
                          options.hessian_samples, n, seed + 1, options)
        row.step("hessian", lambda: _hessian_norms(md_h, options, seed))
    row.values["errors"] = "; ".join(row.errors)
    row.values["skipped"] = "; ".join(row.skipped)
    return row.values


def _stationarity(md: ModelData, lam: float) -> dict[str, float]:
    r"""How far θ is from a minimizer of the objective the estimates assume:
    :math:`\|\nabla_\theta(\frac1n\sum_i\ell_i + \frac\lambda2\|\theta\|^2)\|`, and
    that norm relative to :math:`\|\lambda\theta\|` (0 at a stationary point)."""
    _, loss = md.functional_loss()
    theta = md.flat_params()
    grad = torch.func.grad(loss)
    g = sum(grad(theta, md.X[b.index].to(md.device), md.y[b.index].to(md.device)).double()
            for b in md.batches(None)) / md.n
    pull = lam * theta.double()
    norm = float((g + pull).norm())
    return {"grad_norm": norm, "grad_norm_relative": norm / float(pull.norm())}


def _alpha_train(md: ModelData) -> dict[str, float]:
    res = core.trace_ratio(md)
    return {"alpha_train": res.value, "trace_C": res.diagnostics["trace_C"],
            "trace_F": res.diagnostics["trace_F"], "est_trace_ratio": res.gap}


def _alpha_test(module, criterion, data, n: int, seed: int, options) -> dict[str, float]:
    md_test = _subsample(module, criterion, data.X_test, data.y_test, options.test_samples, n,
                         seed, options)
    return {"alpha_test": core.trace_ratio(md_test).value}


def _fisher_measures(md: ModelData, lam: float, approx: str, alpha: float, options
                     ) -> dict[str, float]:
    """Soft rank and/or Fisher TIC of one approximation, from one curvature object."""
    F = curvature(md, "fisher", approx)
    L = as_lam(lam, md.param_names, md.sizes)
    out: dict[str, float] = {}
    if approx in options.soft_rank:
        rank = F.soft_rank(L)
        out.update({f"rank_{approx}": rank, f"est_rank_n_{approx}": rank / md.n_train,
                    f"est_softrank_{approx}": alpha * rank / md.n_train})
    if approx in options.tic:
        # regularized TIC Tr C(F+Λ)⁻¹ = (1/m) Σ_i g_iᵀ(F+Λ)⁻¹g_i, as softrank.measures.tic
        value = F.tic_sum(md.rules, md.batches("residual"), L) / md.n
        out[f"est_tic_{approx}"] = value / md.n_train
    return out


def _loo(md: ModelData, lam: float, method: str, seed: int, points: int = 0
         ) -> dict[str, float]:
    n_points = (min(points, md.n) if points and method in ("nystrom", "cavity", "subsample")
                else None)
    with warnings.catch_warnings():  # the invalid points are recorded in the row instead
        warnings.filterwarnings("ignore", message=WARNING_PREFIX, category=RuntimeWarning)
        res = approx_loo(md, lam, method, n_points=n_points, random_state=seed)
    out = {f"est_loo_{method}": res.gap,
           f"loo_{method}_invalid_points": res.diagnostics.get("invalid_points"),
           f"loo_{method}_max_leverage": res.diagnostics.get("max_point_leverage")}
    if res.stderr is not None:
        out[f"est_loo_{method}_stderr"] = res.stderr
    return out


def _hessian_norms(md: ModelData, options, seed: int) -> dict[str, Any]:
    """Tr H and ‖H‖₂ = λ_max(H): dense for p ≤ ``dense_max_params``, else the core's
    matrix-free Hessian (Hutch++ with 3·``hessian_probes`` products, ``hessian_iterations``
    Lanczos steps; :func:`softrank.measures.hessian_norms`)."""
    if md.n_params <= options.dense_max_params:
        H = curvature(md, "hessian", "dense", max_params=options.dense_max_params)
        return {"hessian_trace": H.trace(), "hessian_spectral": float(H.eigvals().max()),
                "hessian_method": "dense", "n_hessian": md.n}
    kw = {"approximation": "matrix_free", "n_probes": options.hessian_probes,
          "lanczos_steps": options.hessian_iterations, "random_state": seed}
    trace = core.hessian_norms(md, "trace", **kw)
    top = core.hessian_norms(md, "max_eigenvalue", **kw)
    return {"hessian_trace": trace.value, "hessian_trace_stderr": trace.diagnostics["stderr"],
            "hessian_spectral": top.value, "hessian_method": "matrix_free", "n_hessian": md.n}
