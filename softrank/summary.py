r"""A verdict on an estimate: the number, what it rests on, and the regimes where it fails.

:class:`EstimateSummary` is what ``GapEstimator.summary()`` returns: the estimate with its
standard error, n, :math:`\Lambda`, the approximation, :math:`\alpha = \mathrm{Tr}\,C/\mathrm{Tr}\,F`
(where computed), the relative stationarity r, the invalid approximate leave-one-out points,
and one plain statement, with the action to take, for each regime the estimate is in:

* **not stationary** — r above :data:`~softrank.stationarity.STATIONARITY_THRESHOLD`: the net is
  not at the minimizer of its training objective, which every estimate assumes;
* **collapsed gradients** — α below :data:`ALPHA_THRESHOLD` on the fit data: the net fits its
  training labels far more confidently than its own predictive distribution implies
  (memorization), so the estimates built on C (the α-weighted soft-rank gap, TIC, the trace
  ratio) collapse with the gradients while the real gap does not;
* **upper bound** — a diagonal curvature: :math:`\mathrm{rank}_\Lambda(\mathrm{diag}\,F) \ge
  \mathrm{rank}_\Lambda(F)`, so the estimate is an upper bound;
* **as trained, effective Λ** — the estimate used an :class:`~softrank.effective.EffectiveLam`
  (``lam='effective'``): a model of what the training budget did, good for a rough value of a
  net kept as trained, not for ranking nets;
* **invalid leave-one-out steps** — points where the approximate curvature does not dominate
  the point's own term (max eigenvalue of :math:`A_iP_i \ge 1`).

``str(summary)`` prints it; ``summary.as_dict()`` is the same as a flat dict.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .effective import EffectiveLam
from .stationarity import STATIONARITY_THRESHOLD

__all__ = ["EstimateSummary", "ALPHA_THRESHOLD", "summarize"]

#: α = Tr C / Tr F on the fit data below which the C-based estimates are said to collapse
ALPHA_THRESHOLD = 0.5

_C_BASED = {"SoftRankFIM", "TIC", "TraceRatio"}


def _number(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, (tuple, list)):
        return "per parameter [" + ", ".join(_number(x, digits) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_number(x, digits)}" for k, x in v.items()) + "}"
    return str(v)


@dataclass(frozen=True)
class EstimateSummary:
    """A fitted estimator's estimate and the regimes it is in (``estimator.summary()``).

    Printing it gives the estimate with its standard error, n, Λ, the approximation, α, r and
    one plain statement, with the action to take, per regime the estimate is in.

    Parameters
    ----------
    estimator, measure, gap, stderr, train_loss, n, lam, approximation, alpha, stationarity,
    finished, invalid_points, regimes, statements
        As under Attributes (built by ``summary()``; not meant to be made by hand).

    Attributes
    ----------
    estimator : str
        The estimator's class name.
    measure, gap, stderr : float or None
        ``measure_``, ``gap_`` (loss units; None for a baseline) and ``stderr_``.
    train_loss : float
        Mean training loss of the measured net.
    n : int
        Samples the net trained on (n of the estimates).
    lam : float, dict, tuple or None
        :math:`\\Lambda`.
    approximation : str
        The curvature approximation (or leave-one-out method).
    alpha : float or None
        :math:`\\mathrm{Tr}\\,C/\\mathrm{Tr}\\,F` on the fit data, where the estimator computes it.
    stationarity : float or None
        Relative stationarity r of the measured net.
    finished : bool
        Whether the measured net was finished (``finish=True``).
    invalid_points : int or None
        Approximate leave-one-out points with an invalid step (ApproxLOO only).
    regimes : tuple of str
        Names of the regimes the estimate is in ('not_stationary', 'collapsed_gradients',
        'upper_bound', 'effective_lam', 'invalid_loo_steps', 'approximate_loo').
    statements : tuple of str
        One plain statement with the action to take per regime, in the same order.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetClassifier
    >>> from softrank import SoftRankFIM
    >>> X = np.random.RandomState(0).randn(64, 4).astype(np.float32)
    >>> y = (X[:, 0] > 0).astype(np.int64)
    >>> _ = torch.manual_seed(0)
    >>> net = NeuralNetClassifier(torch.nn.Linear, module__in_features=4, module__out_features=2,
    ...                           criterion=torch.nn.CrossEntropyLoss, max_epochs=2,
    ...                           optimizer__weight_decay=1e-2, train_split=None, verbose=0)
    >>> est = SoftRankFIM(net, finish=True).fit(X, y)
    >>> summary = est.summary()
    >>> summary.finished, "not_stationary" in summary.regimes
    (True, False)
    >>> print(summary)  # doctest: +ELLIPSIS
    SoftRankFIM: gap ...
    """

    estimator: str
    measure: float
    gap: float | None
    stderr: float | None
    train_loss: float
    n: int
    lam: object
    approximation: str
    alpha: float | None
    stationarity: float | None
    finished: bool
    invalid_points: int | None
    regimes: tuple
    statements: tuple

    def as_dict(self) -> dict:
        """The summary as a plain dict (JSON-ready apart from a tensor-valued Λ)."""
        d = asdict(self)
        d["regimes"], d["statements"] = list(self.regimes), list(self.statements)
        return d

    @property
    def trustworthy(self) -> bool:
        """True when the estimate is in none of the regimes."""
        return not self.regimes

    def __str__(self) -> str:
        head = f"{self.estimator}: "
        if self.gap is not None:
            head += f"gap {_number(self.gap)}"
            if self.stderr is not None:
                head += f" ± {_number(self.stderr, 2)}"
            head += (f" (estimated test loss {_number(self.train_loss + self.gap)}, "
                     f"training loss {_number(self.train_loss)})")
        else:
            head += f"measure {_number(self.measure)}"
        lines = [head,
                 f"  n = {self.n}, Λ = {_number(self.lam)}, approximation = {self.approximation}"
                 + (", α not computed by this estimator" if self.alpha is None else
                    f", α = {_number(self.alpha)}")
                 + (", r not measured" if self.stationarity is None else
                    f", r = {_number(self.stationarity)}")
                 + (" (finished)" if self.finished else "")
                 + ("" if self.invalid_points is None else
                    f", invalid leave-one-out points = {self.invalid_points}")]
        if not self.statements:
            lines.append("  No known failure regime applies.")
        lines += [f"  - {s}" for s in self.statements]
        return "\n".join(lines)


#: what the measurements on 20 MNIST and Fashion-MNIST MLPs (n = 300) say of each route, for
#: the exact ApproxLOO against each net's own observed gap (the stationarity guide's table)
_EFFECTIVE_MEASURED = {
    "optimizer": "median 1.2x the observed gap, within 2x on 14 of 20 nets, but 3.6-9x on "
                 "nets trained for only 5 epochs",
    "balance": "median 2.8x the observed gap, within 2x on 7 of 20 nets, up to 14x on nets "
               "trained for only 5 epochs",
}


#: what the benchmarks measured of method='cavity' against 'exact' (MNIST MLPs, gap against
#: the exact gap; the study's 56 MLPs, gap against gap)
_CAVITY_MEASURED = ("measured against the exact method: on MNIST MLPs finished to the "
                    "regularized minimum (n = 1,000 and 3,000, λ from 1e-4 to 1e-1), the gap "
                    "was 9-15 % above the exact one with a third of the points kept exactly, "
                    "17-45 % above with 10 % kept and 22-55 % above with 3.3 % kept; over 56 "
                    "MNIST and Fashion-MNIST MLPs with 100 points kept, 0.6-1.4x the exact gap "
                    "with a third kept and 0.98-1.75x with 8 % kept")
#: the smallest share of points kept (%) in those comparisons
_CAVITY_FEWEST_KEPT = 3.3


def _cavity_statement(m: int, n: int, s: float, correlation: float | None = None) -> str:
    kept = 100 * m / n
    where = ("" if kept >= _CAVITY_FEWEST_KEPT else
             f" Here only {kept:.2g} % are kept, fewer than in any comparison with the exact "
             f"method: expect the bias at least as large as with {_CAVITY_FEWEST_KEPT} % kept.")
    cv = ("," if correlation is None or correlation != correlation else
          " — reduced by a control variate computed for every point, which follows the kept "
          f"points' values (correlation {correlation:.3f}) —")
    return (f"Approximate leave-one-out: {m} of {n} points ({kept:.2g} %) kept exactly, the "
            f"others through EKFAC shrunk by their leverage (s = {s:.3g}); {_CAVITY_MEASURED}."
            f"{where} The standard error covers only the sampling of points{cv} not this "
            "bias, which is the larger error. Action: use method='exact' where its memory "
            "allows (see the estimator's estimate_memory(X) with method='exact'), else more "
            "n_points (the bias fell as more points were kept), or method='nystrom', whose "
            "estimate erred downward on the same nets.")


#: what the benchmarks measured of method='nystrom' against 'exact' (MNIST MLPs finished to the
#: regularized minimum, gap against the exact gap), by points kept
_NYSTROM_MEASURED = {300: "4.2 % below to 5.3 % above the exact gap", 100: "5–12 % below",
                      30: "15–67 % below"}
#: what was measured where it erred upward: a narrow net, fewer parameters than n·K
_NYSTROM_NARROW_MEASURED = ("on a finished MLP 784-8-10 with fewer (n = 5,000) it was 26 % "
                            "above the exact gap with 300 points (3.7 % with 600)")
#: the smallest share of the points kept (%) in those comparisons with the most points (300 of
#: 3,000)
_NYSTROM_FEWEST_SHARE = 10
#: what the benchmarks measured of method='nystrom' on a curvature subsample (MNIST, n = 60,000,
#: MLP 784-512-10, 300 points kept): the gap against that with all 60,000 samples, by samples,
#: before and after the jackknife
_NYSTROM_SUBSAMPLE_MEASURED = {10000: ("+10 %", "−3.3 %"), 6000: ("+21 %", "−0.1 %"),
                               3000: ("+40 %", "+3.3 %")}


def _nystrom_statement(m: int, n: int, correlation: float | None = None,
                       samples: int | None = None, jackknife: dict | None = None,
                       gap: float | None = None) -> str:
    rows = ", ".join(f"{v} with {k}" for k, v in _NYSTROM_MEASURED.items())
    most, fewest, share = max(_NYSTROM_MEASURED), min(_NYSTROM_MEASURED), 100 * m / n
    notes = []
    if m < most:
        notes.append(f"Here {m} point{'s are' if m != 1 else ' is'} kept, fewer than {most}: "
                     "the measured bias grew as fewer were kept"
                     + (f" (fewer than in any comparison, {fewest})." if m < fewest else "."))
    if share < _NYSTROM_FEWEST_SHARE:
        notes.append(f"Only {share:.2g} % of the points are kept, below the "
                     f"{_NYSTROM_FEWEST_SHARE:g} % of those comparisons with {most} points, and "
                     "the bias grew as that share fell. At n = 60,000 it was 2.4 % below the "
                     "exact gap on a small CNN (300 points; 31 % below with 100), but on an MLP "
                     "784-512-10, with no exact reference, the gap rose from 0.053 with 300 "
                     "points to 0.064 with 600 and 0.066 with 1,000, so there it is likely about "
                     "20 % low.")
    if samples is not None and samples < n:
        where = (f"The other points come from {samples:,} curvature samples (the {m} kept "
                 f"points and {samples - m:,} others) of the {n:,}")
        if jackknife is not None:
            measured = ", ".join(f"{a} → {b} with {k:,}"
                                 for k, (a, b) in _NYSTROM_SUBSAMPLE_MEASURED.items())
            fixed = (f" here from {jackknife['uncorrected_gap']:.3g} to {gap:.3g}"
                     if gap is not None else "")
            notes.append(f"{where}: such a subsample biases the gap upward, and a jackknife "
                         f"over {jackknife['groups']} groups of them corrected it{fixed} "
                         "(where measured, at n = 60,000 with 300 points, against all samples: "
                         f"{measured}).")
        else:
            notes.append(f"{where}, more than half of them, so not jackknifed: the "
                         "subsample's upward bias is not corrected.")
    cv = ("" if correlation is None or correlation != correlation else
          " (reduced by a control variate computed for every point, which follows the kept "
          f"points' values: correlation {correlation:.3f})")
    sampled = (" and of the curvature samples (the jackknife's)" if jackknife is not None
               else "")
    return (f"Approximate leave-one-out: {m} of {n} points ({100 * m / n:.2g} %) kept exactly, "
            "the others through a Nyström approximation on them with their own terms exact. "
            "Measured against the exact method on MNIST MLPs finished to the regularized "
            "minimum with many more parameters than n·K (n = 1,000 and 3,000, λ from 1e-4 "
            f"to 1e-1), the gap was {rows} points kept: low, less as more points are kept; "
            f"but {_NYSTROM_NARROW_MEASURED}: its error can go either way. "
            f"{' '.join(notes)}{' ' if notes else ''}"
            f"The standard error covers the sampling of the points{cv}{sampled}, not this "
            "bias. Action: use method='exact' where its memory allows (where the net has "
            "fewer parameters than n·K it runs in parameter space, memory p² at any n; the "
            "estimator's estimate_memory(X) with method='exact' says how much it needs), else "
            "more n_points (time grows as n_points³ while 10 samples per point are at most "
            "half of them, then as n·n_points²).")


def _effective_statement(lam) -> str:
    text = ("As trained, with an effective Λ (weight decay plus the training budget's pull, "
            f"{lam.method} route, per {lam.per}): a model of the training run. Measured on "
            "MNIST and Fashion-MNIST MLPs (exact ApproxLOO, per layer): "
            f"{_EFFECTIVE_MEASURED[lam.method]}; it does not rank nets (Kendall τ ≤ 0.46).")
    if lam.center is None:
        text += (" θ₀ is unknown (no softrank.InitialParameters callback), so r is measured "
                 "against a pull toward 0, not toward the initial parameters.")
    return text + (" Action: read it as a rough value for this net as trained; to choose "
                   "among models, see the selection guide (cross-validation, or in-sample "
                   "TIC/SoftRankFIM with KFAC on the nets as trained).")


def summarize(est) -> EstimateSummary:
    """The :class:`EstimateSummary` of a fitted :class:`~softrank.estimators.GapEstimator`."""
    name = type(est).__name__
    diag = est.result_.diagnostics
    alpha = diag.get("alpha")
    if alpha is None and name == "TraceRatio":
        alpha = est.measure_
    r = getattr(est, "stationarity_", None)
    finished = getattr(est, "finish_result_", None) is not None
    invalid = diag.get("invalid_points") if name == "ApproxLOO" else None
    regimes, statements = [], []
    if r is not None and r > STATIONARITY_THRESHOLD:
        regimes.append("not_stationary")
        fix = ("raise the finishing budget (finish={'max_iter': ...})" if finished else
               "fit with finish=True to measure the net finished to that minimizer (then the "
               "estimate describes the finished net, not the one as trained)")
        statements.append(
            f"Not stationary: r = {r:.3g} > {STATIONARITY_THRESHOLD:g}, the net is far from the "
            "minimizer of mean loss + ½θᵀΛθ that every estimate assumes; estimates of such "
            f"nets were measured 2-50x the observed gap. Action: {fix}.")
    if alpha is not None and alpha < ALPHA_THRESHOLD and name in _C_BASED:
        regimes.append("collapsed_gradients")
        statements.append(
            f"Collapsed gradients: α = Tr C/Tr F = {alpha:.3g} < {ALPHA_THRESHOLD:g}, the net "
            "fits its training labels far more confidently than its own predictions imply "
            "(memorization), so estimates built on C (this one) shrink while the real gap "
            "does not. Action: use ApproxLOO, or SoftRankFIM(gap_formula='rank') to rank models.")
    if est.approximation_ == "diagonal":
        regimes.append("upper_bound")
        statements.append(
            "Upper bound: the diagonal approximation over-counts the soft rank "
            "(rank_Λ(diag F) ≥ rank_Λ(F)). Action: use approximation='kfac' or 'exact' for a "
            "value; the diagonal one can still rank similar models.")
    if isinstance(est.lam_, EffectiveLam):
        regimes.append("effective_lam")
        statements.append(_effective_statement(est.lam_))
    if invalid:
        regimes.append("invalid_loo_steps")
        statements.append(
            f"Invalid leave-one-out steps: for {invalid} points the approximate curvature does "
            "not dominate the point's own term (max eig A_iP_i ≥ 1), so the estimate is "
            "unreliable. Action: use method='exact' (or 'subsample').")
    if name == "ApproxLOO" and "rest_shrinkage" in diag:
        regimes.append("approximate_loo")
        statements.append(_cavity_statement(
            len(est.loo_indices_), int(est.n_train_), diag["rest_shrinkage"],
            diag.get("control_variate", {}).get("correlation")))
    if name == "ApproxLOO" and "proxy_shrinkage" in diag:
        regimes.append("approximate_loo")
        statements.append(_nystrom_statement(
            len(est.loo_indices_), int(est.n_train_),
            diag.get("control_variate", {}).get("correlation"), diag.get("curvature_samples"),
            diag.get("jackknife"), est.gap_))
    stderr = getattr(est, "stderr_", None)
    return EstimateSummary(
        estimator=name, measure=float(est.measure_), gap=est.gap_,
        stderr=None if stderr is None else float(stderr), train_loss=float(est.train_loss_),
        n=int(est.n_train_), lam=est.lam_, approximation=str(est.approximation_),
        alpha=None if alpha is None else float(alpha), stationarity=r, finished=finished,
        invalid_points=None if invalid is None else int(invalid), regimes=tuple(regimes),
        statements=tuple(statements))
