"""Figures of a study (matplotlib, the optional ``plots`` extra; imported only when called).

* :func:`plot_estimate_vs_observed` — one panel per estimator: estimated vs observed gap on
  log–log axes with the line y = x, models coloured by regime;
* :func:`plot_tau_bars` — Kendall τ of each measure against the gap, one bar per measure and
  group (all models, each regime);
* :func:`plot_error_vs_calibration` — estimate / observed against α = Tr C / Tr F on the
  training data (the calibration the α-corrected estimates rest on);
* :func:`plot_comparison` — one key comparison (:data:`KEY_COMPARISONS`: the estimators, the
  approximations, soft rank against the Hessian baselines, the calibration) as one figure of
  at most four panels that reads at page width; :func:`plot_key_comparisons` writes them all.

Figures are built on :class:`matplotlib.figure.Figure` (no pyplot state, no display needed)
and saved to ``path`` (PNG at :data:`DPI` dots per inch, labels at :data:`FONT_SIZE` points);
each function returns the path. The function names and their arguments are stable: new
figures get new functions.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from .analysis import (REGIME_THRESHOLD, TARGET, estimate_columns, measure_columns, ratios,
                       regime, split_regimes, tau_table)

__all__ = ["plot_estimate_vs_observed", "plot_tau_bars", "plot_error_vs_calibration",
           "plot_all", "plot_comparison", "plot_key_comparisons", "KEY_COMPARISONS"]

_COLORS = {"overfit": "tab:red", "not overfit": "tab:blue", "unknown": "tab:gray"}
#: resolution of the saved figures, and the font size of their labels (points)
DPI = 150
FONT_SIZE = 12

#: The key comparisons of a study, one figure each: name -> (kind, title, columns). ``kind``
#: is 'estimate' (estimate vs observed gap), 'tau' (Kendall τ bars) or 'calibration'
#: (estimate / observed against α); columns absent from the rows are left out.
KEY_COMPARISONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "estimators": ("estimate", "Gap estimators (exact curvature) against the observed gap",
                   ("est_softrank_gram", "est_rank_n_gram", "est_tic_gram", "est_loo_exact",
                    "est_trace_ratio")),
    "approximations": ("estimate", "Soft-rank gap estimate α·rank/n by approximation",
                       ("est_softrank_gram", "est_softrank_kfac", "est_softrank_ekfac",
                        "est_softrank_diagonal")),
    "softrank_vs_hessian": ("tau", "Ranking models by their gap: soft rank against Hessian "
                            "norms", ("est_softrank_gram", "est_softrank_kfac",
                                      "est_rank_n_gram", "est_tic_gram", "est_loo_exact",
                                      "hessian_trace", "hessian_spectral", "hessian_frobenius")),
    "calibration": ("calibration", "Error of the estimate against the calibration ratio α",
                    ("est_softrank_gram", "est_rank_n_gram", "est_tic_gram", "est_loo_exact")),
}


def _figure(n_panels: int, ncols: int = 3, size: float = 4.0):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("softrank.study.plots needs matplotlib: "
                          "pip install 'softrank[plots]'") from e
    ncols = min(ncols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(size * ncols, size * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _log_axes(ax) -> None:
    """Log–log axes with labels on the decades only (minor labels overlap on short ranges)."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def _positive(rows, column, target):
    pts = [(r.get(target), r.get(column), regime(r)) for r in rows]
    return [(g, e, k) for g, e, k in pts
            if isinstance(g, (int, float)) and isinstance(e, (int, float)) and g > 0 and e > 0
            and math.isfinite(g) and math.isfinite(e)]


def plot_estimate_vs_observed(rows: list[dict], path, columns: Sequence[str] | None = None,
                              target: str = TARGET, title: str = "", *, ncols: int = 3) -> Path:
    """Estimated vs observed gap per estimator, log–log, with y = x (missing and non-positive
    values are left out and counted in the panel title); ``ncols`` panels per row."""
    columns = estimate_columns(rows) if columns is None else list(columns)
    fig, axes = _figure(len(columns), ncols=ncols)
    for ax, c in zip(axes, columns):
        pts = _positive(rows, c, target)
        for k in _COLORS:
            sel = [(g, e) for g, e, kk in pts if kk == k]
            if sel:
                g, e = np.array(sel).T
                ax.scatter(g, e, s=20, color=_COLORS[k], label=k)
        if pts:
            lo = min(min(g, e) for g, e, _ in pts) / 1.5
            hi = max(max(g, e) for g, e, _ in pts) * 1.5
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            _log_axes(ax)
        present = sum(isinstance(r.get(c), (int, float)) and math.isfinite(r[c]) for r in rows)
        notes = [f"{len(rows) - present} missing"] if present < len(rows) else []
        notes += [f"{present - len(pts)} ≤ 0"] if present > len(pts) else []
        ax.set_title(c + (f" ({', '.join(notes)})" if notes else ""), fontsize=FONT_SIZE)
        ax.set_xlabel("observed gap", fontsize=FONT_SIZE)
        ax.set_ylabel("estimate", fontsize=FONT_SIZE)
        ax.tick_params(labelsize=FONT_SIZE - 1)
    axes[0].legend(fontsize=FONT_SIZE - 1)
    if title:
        fig.suptitle(title, fontsize=FONT_SIZE + 2)
    return _save(fig, path)


def plot_tau_bars(rows: list[dict], path, columns: Sequence[str] | None = None,
                  threshold: float = REGIME_THRESHOLD, title: str = "") -> Path:
    """Kendall τ per measure: all models and each regime side by side."""
    columns = measure_columns(rows) if columns is None else list(columns)
    groups = {"all": rows, **{k: v for k, v in split_regimes(rows, threshold).items() if v}}
    fig, (ax,) = _figure(1, size=1.0)
    fig.set_size_inches(max(8.0, 0.3 * len(columns) * len(groups) + 2.0), 5.5)
    width = 0.8 / len(groups)
    x = np.arange(len(columns))
    for j, (name, g) in enumerate(groups.items()):
        taus = tau_table(g, columns)
        ax.bar(x + j * width, [taus[c] for c in columns], width,
               label=f"{name} ({len(g)})", color=_COLORS.get(name, "tab:green"))
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(x + width * (len(groups) - 1) / 2, columns, rotation=45, ha="right",
                  fontsize=FONT_SIZE - 1)
    ax.tick_params(axis="y", labelsize=FONT_SIZE - 1)
    ax.set_ylabel("Kendall τ vs observed gap", fontsize=FONT_SIZE)
    ax.set_ylim(-1, 1)
    ax.legend(fontsize=FONT_SIZE - 1)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_error_vs_calibration(rows: list[dict], path, columns: Sequence[str] | None = None,
                              target: str = TARGET, calibration: str = "alpha_train",
                              title: str = "", *, ncols: int = 3) -> Path:
    """estimate / observed (log) against α on the training data (log), per estimator;
    ``ncols`` panels per row."""
    columns = estimate_columns(rows) if columns is None else list(columns)
    fig, axes = _figure(len(columns), ncols=ncols)
    alpha = np.array([r.get(calibration, np.nan) for r in rows], dtype=float)
    for ax, c in zip(axes, columns):
        ratio = ratios(rows, c, target)
        ok = np.isfinite(ratio) & np.isfinite(alpha) & (ratio > 0) & (alpha > 0)
        ax.scatter(alpha[ok], ratio[ok], s=20,
                   c=[_COLORS[regime(r)] for r, k in zip(rows, ok) if k])
        ax.axhline(1.0, color="k", ls="--", lw=0.8)
        if ok.any():
            _log_axes(ax)
        ax.set_title(c, fontsize=FONT_SIZE)
        ax.set_xlabel(f"{calibration} (Tr C / Tr F)", fontsize=FONT_SIZE)
        ax.set_ylabel("estimate / observed", fontsize=FONT_SIZE)
        ax.tick_params(labelsize=FONT_SIZE - 1)
    if title:
        fig.suptitle(title, fontsize=FONT_SIZE + 2)
    return _save(fig, path)


def plot_all(rows: list[dict], folder, prefix: str = "", title: str = "") -> list[Path]:
    """The three figures into ``folder`` as ``<prefix>estimate_vs_observed.png``, ``...tau.png``,
    ``...error_vs_calibration.png``."""
    folder = Path(folder)
    return [plot_estimate_vs_observed(rows, folder / f"{prefix}estimate_vs_observed.png",
                                      title=title),
            plot_tau_bars(rows, folder / f"{prefix}tau.png", title=title),
            plot_error_vs_calibration(rows, folder / f"{prefix}error_vs_calibration.png",
                                      title=title)]


def plot_comparison(rows: list[dict], path, name: str, title: str | None = None) -> Path | None:
    """One key comparison of :data:`KEY_COMPARISONS` as one figure (at most four panels, two
    per row, so that it reads at page width); None when none of its columns is in ``rows``."""
    if name not in KEY_COMPARISONS:
        raise ValueError(f"name must be one of {sorted(KEY_COMPARISONS)}; got {name!r}")
    kind, default_title, wanted = KEY_COMPARISONS[name]
    present = {k for r in rows for k in r}
    columns = [c for c in wanted if c in present]
    if not columns:
        return None
    title = default_title if title is None else title
    if kind == "tau":
        return plot_tau_bars(rows, path, columns=columns, title=title)
    columns = columns[:4]
    plot = plot_estimate_vs_observed if kind == "estimate" else plot_error_vs_calibration
    return plot(rows, path, columns=columns, title=title, ncols=2)


def plot_key_comparisons(rows: list[dict], folder, prefix: str = "",
                         title_prefix: str = "") -> list[Path]:
    """Every key comparison of :data:`KEY_COMPARISONS` present in ``rows`` into ``folder`` as
    ``<prefix><name>.png``; returns the paths written."""
    folder = Path(folder)
    out = []
    for name, (_, title, _) in KEY_COMPARISONS.items():
        path = plot_comparison(rows, folder / f"{prefix}{name}.png", name,
                               title=f"{title_prefix}{title}")
        if path is not None:
            out.append(path)
    return out
