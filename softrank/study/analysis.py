r"""How well does each measure rank models by their generalization gap, and how close is it?

* :func:`kendall_tau` — Kendall's :math:`\tau_b` between a measure and the observed gap over the
  models (pairs with a missing value dropped);
* :func:`granulated_tau` — the granulated Kendall coefficient of Jiang et al. (2019),
  "Fantastic Generalization Measures and Where to Find Them", eq. (4):

  .. math::
      \psi_i = \frac{1}{|\Theta_{-i}|}\sum_{\theta_{-i}\in\Theta_{-i}}
               \tau\big(\{(\mu(\theta), g(\theta)) : \theta_i \in \Theta_i\}\big),\qquad
      \Psi = \frac1{m}\sum_{i=1}^m \psi_i ,

  i.e. for each hyperparameter i, the mean τ over the groups of models in which only
  :math:`\theta_i` varies (all other hyperparameters, the seed included, equal), then the mean
  over the m hyperparameters that vary. Groups where τ is undefined (fewer than two models, or a
  constant measure or gap) are left out of the mean, and counted.
* :func:`ratios` — estimate / observed gap per model, and :func:`ratio_summary`.
* :func:`finished_view` — the rows of the finished nets (columns ``*_finished`` under their
  plain names), and :func:`stationarity_report` — estimates as trained against finished;
* :func:`split_regimes` — the models that are over-fit on their training set
  (α = Tr C / Tr F < threshold on the training data: the gradients at the true labels have
  collapsed) and the others.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
from scipy.stats import kendalltau

from .grid import HYPERPARAMETERS

__all__ = ["kendall_tau", "tau_table", "granulated_tau", "GranulatedTau", "ratios",
           "ratio_summary", "estimate_columns", "measure_columns", "varying_hyperparameters",
           "regime", "split_regimes", "group_rows", "markdown_report", "TARGET", "BASELINES",
           "REGIME_THRESHOLD", "finished_view", "stationarity_report"]

TARGET = "observed_gap"
#: measures without a gap estimate that the study compares against
BASELINES = ("hessian_trace", "hessian_spectral", "alpha_train")
#: α on the training data below which a model counts as over-fit (interpolating)
REGIME_THRESHOLD = 0.5
ESTIMATE_PREFIX = "est_"
#: suffix of the columns measured again on the finished nets
FINISHED = "_finished"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) \
        and math.isfinite(float(v))


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    r"""Kendall :math:`\tau_b` over the pairs where both values are finite; NaN when fewer than
    two remain or either side is constant.

    >>> round(kendall_tau([1, 2, 3], [1, 3, 2]), 12)  # 2 concordant, 1 discordant pair
    0.333333333333
    """
    pairs = [(float(a), float(b)) for a, b in zip(x, y) if _finite(a) and _finite(b)]
    if len(pairs) < 2:
        return float("nan")
    a, b = np.array(pairs).T
    if np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(kendalltau(a, b).statistic)


def estimate_columns(rows: Iterable[dict]) -> list[str]:
    """The gap-estimate columns (``est_*``) present, without standard errors (also those of
    finished nets, ``*_stderr_finished``)."""
    cols = dict.fromkeys(k for r in rows for k in r)
    return [c for c in cols if c.startswith(ESTIMATE_PREFIX)
            and not c.removesuffix(FINISHED).endswith("_stderr")]


def measure_columns(rows: list[dict]) -> list[str]:
    """Gap estimates, then the baselines present."""
    present = {k for r in rows for k in r}
    return estimate_columns(rows) + [c for c in BASELINES if c in present]


def tau_table(rows: list[dict], columns: Sequence[str] | None = None,
              target: str = TARGET) -> dict[str, float]:
    """{column: Kendall τ of that column against ``target``} over ``rows``."""
    columns = measure_columns(rows) if columns is None else columns
    gap = [r.get(target) for r in rows]
    return {c: kendall_tau([r.get(c) for r in rows], gap) for c in columns}


def varying_hyperparameters(rows: list[dict],
                            candidates: Sequence[str] = HYPERPARAMETERS) -> list[str]:
    """The hyperparameters that take more than one value in ``rows``."""
    return [h for h in candidates if len({r.get(h) for r in rows}) > 1]


@dataclass(frozen=True)
class GranulatedTau:
    """Ψ and, per hyperparameter i, ψ_i and the number of groups it averages."""

    value: float
    per_hyperparameter: dict[str, float]
    n_groups: dict[str, int]


def _group_key(row: dict, keys: Sequence[str]) -> tuple:
    return tuple(row.get(k) for k in keys)


def _psi(rows: list[dict], column: str, varied: str, fixed: Sequence[str],
         target: str) -> tuple[float, int]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[_group_key(r, fixed)].append(r)
    taus = [kendall_tau([r.get(column) for r in g], [r.get(target) for r in g])
            for g in groups.values() if len({r.get(varied) for r in g}) > 1]
    taus = [t for t in taus if not math.isnan(t)]
    return (float(np.mean(taus)) if taus else float("nan")), len(taus)


def granulated_tau(rows: list[dict], column: str, hyperparameters: Sequence[str] | None = None,
                   target: str = TARGET, group_also_by: Sequence[str] = ("dataset", "seed",
                                                                            "data_seed")
                   ) -> GranulatedTau:
    r"""Granulated Kendall coefficient Ψ of ``column`` (Jiang et al., 2019).

    ``hyperparameters``: the axes i averaged in Ψ (default: those of :data:`HYPERPARAMETERS`
    that vary). Inside a group every other varying hyperparameter is held fixed, and so are
    the columns ``group_also_by`` (not axes themselves).
    """
    varying = varying_hyperparameters(rows)
    axes = varying if hyperparameters is None else list(hyperparameters)
    held = list(dict.fromkeys(varying + axes)) + [k for k in group_also_by
                                                  if k not in varying + axes]
    psi, counts = {}, {}
    for h in axes:
        fixed = [a for a in held if a != h]
        psi[h], counts[h] = _psi(rows, column, h, fixed, target)
    valid = [v for v in psi.values() if not math.isnan(v)]
    return GranulatedTau(float(np.mean(valid)) if valid else float("nan"), psi, counts)


def ratios(rows: list[dict], column: str, target: str = TARGET) -> np.ndarray:
    """estimate / observed gap per model (NaN where either is missing or the gap is 0)."""
    out = []
    for r in rows:
        e, g = r.get(column), r.get(target)
        out.append(float(e) / float(g) if _finite(e) and _finite(g) and g != 0 else float("nan"))
    return np.array(out)


def ratio_summary(rows: list[dict], columns: Sequence[str] | None = None,
                  target: str = TARGET) -> dict[str, dict[str, float]]:
    """Per column: median, 10th and 90th percentile of estimate/observed, and the median of
    |estimate/observed − 1|, over the models where both are finite."""
    columns = estimate_columns(rows) if columns is None else columns
    out = {}
    for c in columns:
        r = ratios(rows, c, target)
        r = r[np.isfinite(r)]
        if len(r) == 0:
            out[c] = {k: float("nan") for k in ("median", "p10", "p90", "median_abs_error", "n")}
            continue
        out[c] = {"median": float(np.median(r)), "p10": float(np.percentile(r, 10)),
                  "p90": float(np.percentile(r, 90)),
                  "median_abs_error": float(np.median(np.abs(r - 1))), "n": len(r)}
    return out


def regime(row: dict, threshold: float = REGIME_THRESHOLD) -> str:
    """'overfit' when α_train < threshold, 'not overfit' when α_train ≥ threshold."""
    a = row.get("alpha_train")
    if not _finite(a):
        return "unknown"
    return "overfit" if a < threshold else "not overfit"


def split_regimes(rows: list[dict], threshold: float = REGIME_THRESHOLD
                  ) -> dict[str, list[dict]]:
    """{regime: rows} with :func:`regime`, in the order 'overfit', 'not overfit'."""
    out: dict[str, list[dict]] = {"overfit": [], "not overfit": []}
    for r in rows:
        out.setdefault(regime(r, threshold), []).append(r)
    return out


def group_rows(rows: list[dict], key: str) -> dict[Any, list[dict]]:
    """{value of ``key``: rows} in order of first appearance."""
    out: dict[Any, list[dict]] = {}
    for r in rows:
        out.setdefault(r.get(key), []).append(r)
    return out


# -- report ---------------------------------------------------------------------------------------
def _fmt(v: float, spec: str = "+.3f") -> str:
    return "—" if v is None or not math.isfinite(v) else format(v, spec)


def _tau_section(rows: list[dict], columns: list[str], threshold: float) -> list[str]:
    regimes = split_regimes(rows, threshold)
    axes = varying_hyperparameters(rows)
    head = (["measure", f"τ all (n={len(rows)})"]
            + [f"τ {k} (n={len(v)})" for k, v in regimes.items() if v]
            + ["granulated Ψ"] + [f"ψ {a}" for a in axes])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    taus = {k: tau_table(v, columns) for k, v in regimes.items() if v}
    overall = tau_table(rows, columns)
    for c in columns:
        g = granulated_tau(rows, c, axes)
        cells = ([f"`{c}`", _fmt(overall[c])] + [_fmt(t[c]) for t in taus.values()]
                 + [_fmt(g.value)] + [_fmt(g.per_hyperparameter[a]) for a in axes])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ratio_section(rows: list[dict], columns: list[str], threshold: float) -> list[str]:
    groups = {"all": rows, **{k: v for k, v in split_regimes(rows, threshold).items() if v}}
    head = ["estimate"] + [f"{k}: median [p10, p90]; med abs err" for k in groups]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    summaries = {k: ratio_summary(v, columns) for k, v in groups.items()}
    for c in columns:
        cells = [f"`{c}`"]
        for k in groups:
            s = summaries[k][c]
            cells.append(f"{_fmt(s['median'], '.3g')} [{_fmt(s['p10'], '.3g')}, "
                         f"{_fmt(s['p90'], '.3g')}]; {_fmt(s['median_abs_error'], '.3g')}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_report(rows: list[dict], threshold: float = REGIME_THRESHOLD,
                    by: str = "dataset") -> str:
    """Markdown tables per value of ``by``: Kendall τ (all models and per regime), granulated
    Ψ and ψ per hyperparameter, and estimate/observed ratios."""
    out: list[str] = []
    for name, group in group_rows(rows, by).items():
        gaps = [r[TARGET] for r in group if _finite(r.get(TARGET))]
        regimes = split_regimes(group, threshold)
        out += [f"### {name}", "",
                f"{len(group)} models; observed gap {min(gaps):.4g} … {max(gaps):.4g}; "
                + ", ".join(f"{len(v)} {k}" for k, v in regimes.items())
                + f" (α_train < {threshold:g} is 'overfit').", "",
                "Kendall τ against the observed gap (Ψ: granulated, Jiang et al. 2019):", ""]
        out += _tau_section(group, measure_columns(group), threshold)
        out += ["", "estimate / observed gap:", ""]
        out += _ratio_section(group, estimate_columns(group), threshold)
        out.append("")
    return "\n".join(out)


# -- as trained and finished -----------------------------------------------------------------------


def finished_view(rows: list[dict]) -> list[dict]:
    """The finished nets as rows of their own: each ``<column>_finished`` under ``<column>``
    (the configuration columns kept); rows measured only as trained are left out."""
    out = []
    for r in rows:
        if f"{TARGET}{FINISHED}" not in r:
            continue
        view = {k: v for k, v in r.items() if not k.endswith(FINISHED)}
        view.update({k[:-len(FINISHED)]: v for k, v in r.items() if k.endswith(FINISHED)})
        out.append(view)
    return out


def stationarity_report(rows: list[dict], columns: Sequence[str] | None = None,
                        by: str = "dataset") -> str:
    """Markdown: per value of ``by``, each estimate as trained and finished — median
    estimate/observed gap and Kendall τ against the observed gap of the same nets — with the
    median relative stationarity r of both."""
    out: list[str] = []
    for name, group in group_rows([r for r in rows if f"{TARGET}{FINISHED}" in r], by).items():
        fin = finished_view(group)
        cols = [c for c in (estimate_columns(fin) if columns is None else columns)
                if any(_finite(r.get(c)) for r in fin)]
        r_as = [r["grad_norm_relative"] for r in group if _finite(r.get("grad_norm_relative"))]
        r_fin = [r["grad_norm_relative"] for r in fin if _finite(r.get("grad_norm_relative"))]
        out += [f"### {name}", "",
                f"{len(group)} models; median relative stationarity r as trained "
                f"{_fmt(float(np.median(r_as)) if r_as else None, '.3g')} "
                f"(range {_fmt(min(r_as, default=None), '.3g')} … "
                f"{_fmt(max(r_as, default=None), '.3g')}), finished "
                f"{_fmt(float(np.median(r_fin)) if r_fin else None, '.3g')} "
                f"(range {_fmt(min(r_fin, default=None), '.3g')} … "
                f"{_fmt(max(r_fin, default=None), '.3g')}).", "",
                "| estimate | as trained: median est/obs [p10, p90] | τ | "
                "finished: median est/obs [p10, p90] | τ |", "|---|---|---|---|---|"]
        trained, finished = ratio_summary(group, cols), ratio_summary(fin, cols)
        tau_t, tau_f = tau_table(group, cols), tau_table(fin, cols)
        for c in cols:
            cells = [f"`{c}`"]
            for summary, taus in ((trained, tau_t), (finished, tau_f)):
                q = summary[c]
                cells += [f"{_fmt(q['median'], '.3g')} [{_fmt(q['p10'], '.3g')}, "
                          f"{_fmt(q['p90'], '.3g')}]", _fmt(taus[c])]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)
