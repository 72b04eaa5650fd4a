r"""Calibration: expected calibration error, reliability diagrams, temperature scaling, and
the calibration ratio :math:`\alpha = \mathrm{Tr}\,C/\mathrm{Tr}\,F`.

Reading α (SPEC §1): for a calibrated model C ≈ F and α ≈ 1, and the soft-rank gap estimate
reduces to :math:`\mathrm{rank}_\Lambda(F)/n`. α > 1: over-confident on this data — the
calibrated estimate rank/n *under*-estimates the gap and the α factor corrects for it;
α < 1: under-confident (or interpolating: training gradients vanish, α ≪ 1, and every
C-based estimate collapses — use ApproxLOO there).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["expected_calibration_error", "reliability_curve", "reliability_diagram",
           "fit_temperature", "ReliabilityCurve"]


def _as_proba(proba) -> np.ndarray:
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim == 1:  # binary: probability of class 1
        p = np.stack([1 - p, p], 1)
    if p.ndim != 2 or not np.all(np.isfinite(p)):
        raise ValueError("proba must be a finite (n_samples, n_classes) array of probabilities")
    return p


@dataclass(frozen=True)
class ReliabilityCurve:
    confidence: np.ndarray  # mean top-label confidence per non-empty bin
    accuracy: np.ndarray  # accuracy per non-empty bin
    counts: np.ndarray  # samples per non-empty bin
    edges: np.ndarray  # the bin edges (all bins)


def reliability_curve(proba, y, n_bins: int = 15) -> ReliabilityCurve:
    """Top-label confidence vs accuracy in ``n_bins`` equal-width bins on [0, 1]."""
    p = _as_proba(proba)
    y = np.asarray(y).reshape(-1)
    if len(y) != len(p):
        raise ValueError(f"proba has {len(p)} rows but y has {len(y)} labels")
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    keep = counts > 0
    sum_conf = np.bincount(which, conf, n_bins)
    sum_acc = np.bincount(which, correct, n_bins)
    return ReliabilityCurve(sum_conf[keep] / counts[keep], sum_acc[keep] / counts[keep],
                            counts[keep], edges)


def expected_calibration_error(proba, y, n_bins: int = 15) -> float:
    r"""Top-label ECE :math:`\sum_b \frac{|B_b|}{n}\,|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|`
    (Guo et al., 2017) with equal-width bins."""
    c = reliability_curve(proba, y, n_bins)
    return float(np.sum(c.counts * np.abs(c.accuracy - c.confidence)) / c.counts.sum())


def reliability_diagram(proba, y, n_bins: int = 15, ax=None, label: str | None = None):
    """Plot the reliability diagram (needs matplotlib: ``pip install softrank[plots]``)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reliability_diagram needs matplotlib: pip install matplotlib") from e
    c = reliability_curve(proba, y, n_bins)
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    ece = expected_calibration_error(proba, y, n_bins)
    ax.plot(c.confidence, c.accuracy, "o-", label=f"{label or 'model'} (ECE {ece:.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left")
    return ax


def fit_temperature(logits, y, *, max_iter: int = 200) -> float:
    r"""Temperature :math:`T>0` minimizing the NLL of :math:`\mathrm{softmax}(z/T)` on
    (logits, y) (Guo et al., 2017). For a binary model pass one logit per sample.
    Fitted on the training data by default in softrank; pass held-out data to fit there."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(y)).reshape(-1)
    if z.ndim == 1 or z.shape[1] == 1:
        z = z.reshape(-1, 1)
        z = torch.cat([torch.zeros_like(z), z], 1)
    y = y.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())
