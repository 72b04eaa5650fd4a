r"""Scorers and the in-sample splitter: model selection by estimated test loss, no validation split.

* :func:`gap_scorer` ``(estimator, X, y) -> float`` — a picklable module-level scorer for
  ``scoring=`` in GridSearchCV / cross_validate / multi-metric ``refit=``. For a fitted
  :class:`~softrank.estimators.GapEstimator` it is ``estimator.score(X, y)``; for a plain
  fitted skorch net (or Pipeline) it measures the net with :class:`~softrank.estimators.SoftRankFIM`
  (``lam='auto'``) on (X, y) first.
* :func:`make_gap_scorer` builds the same for any measure and any of three quantities (all
  greater-is-better): ``'estimated_test_loss'`` :math:`-(\bar\ell(X,y) + \widehat{\mathrm{gap}})`,
  ``'gap'`` :math:`-\widehat{\mathrm{gap}}`, ``'measure'`` :math:`-\text{measure}`.
* :class:`InSampleSplit` — a CV splitter yielding (all indices, all indices): fit and score
  on the same (training) data, like scikit-learn's ``LassoLarsIC`` selects by an information
  criterion::

      search = GridSearchCV(SoftRankFIM(net), {"estimator__optimizer__weight_decay": grid},
                            cv=InSampleSplit())

With an ordinary CV splitter the scorer sees held-out data: the loss term is then the
held-out loss, and a measure built by the scorer (plain nets) is its held-out version.
"""
from __future__ import annotations

import numpy as np
from sklearn.base import clone
from sklearn.model_selection import BaseCrossValidator
from sklearn.utils.validation import _num_samples

from .estimators import GapEstimator, SoftRankFIM

__all__ = ["gap_scorer", "make_gap_scorer", "GapScorer", "InSampleSplit", "SCORER_KINDS"]

SCORER_KINDS = ("estimated_test_loss", "gap", "measure")


class GapScorer:
    """Picklable scorer (see :func:`make_gap_scorer`)."""

    def __init__(self, kind: str = "estimated_test_loss", measure: GapEstimator | None = None):
        if kind not in SCORER_KINDS:
            raise ValueError(f"kind must be one of {SCORER_KINDS}; got {kind!r}")
        if measure is not None and not isinstance(measure, GapEstimator):
            raise TypeError("measure must be an (unfitted) GapEstimator such as "
                            f"SoftRankFIM(None); got {type(measure).__name__}")
        self.kind, self.measure = kind, measure

    def __repr__(self):
        return f"make_gap_scorer(kind={self.kind!r}, measure={self.measure!r})"

    def _fitted_measure(self, estimator, X, y) -> GapEstimator:
        if isinstance(estimator, GapEstimator):
            return estimator
        template = self.measure if self.measure is not None else SoftRankFIM(None)
        return clone(template).set_params(estimator=estimator, prefit=True).fit(X, y)

    def __call__(self, estimator, X, y) -> float:
        est = self._fitted_measure(estimator, X, y)
        if self.kind == "measure":
            return -float(est.measure_)
        if est.gap_ is None:
            raise ValueError(f"{type(est).__name__} has no gap estimate; use "
                             "make_gap_scorer(kind='measure')")
        if self.kind == "gap":
            return -float(est.gap_)
        return -(est.loss(X, y) + est.gap_)


def make_gap_scorer(kind: str = "estimated_test_loss",
                    measure: GapEstimator | None = None) -> GapScorer:
    """A picklable scorer ``(estimator, X, y) -> float``, greater is better.

    ``kind``: 'estimated_test_loss' (−(loss on (X, y) + gap_)), 'gap' (−gap_) or 'measure'
    (−measure_). ``measure``: an unfitted GapEstimator used as a template when the scored
    estimator is a plain skorch net or Pipeline (its ``estimator`` is replaced by the scored
    net, with ``prefit=True``); default ``SoftRankFIM(None)``. A GapEstimator being scored is
    used as it is."""
    return GapScorer(kind, measure)


_DEFAULT_SCORER = GapScorer()


def gap_scorer(estimator, X, y) -> float:
    """Estimated test loss, negated: ``estimator.score(X, y)`` for a GapEstimator (for
    HessianNorm: −measure_), a SoftRankFIM(lam='auto') measurement for a plain net."""
    if isinstance(estimator, GapEstimator):
        return float(estimator.score(X, y))
    return _DEFAULT_SCORER(estimator, X, y)


class InSampleSplit(BaseCrossValidator):
    """Train and test on all samples, ``n_splits`` times (default once).

    For model selection by an in-sample criterion (the estimated test loss of a
    GapEstimator) with GridSearchCV / cross_validate, without a validation split."""

    def __init__(self, n_splits: int = 1):
        self.n_splits = n_splits

    def split(self, X, y=None, groups=None):
        if not isinstance(self.n_splits, (int, np.integer)) or self.n_splits < 1:
            raise ValueError(f"n_splits must be a positive integer; got {self.n_splits!r}")
        n = _num_samples(X)
        if n < 1:
            raise ValueError("InSampleSplit needs at least one sample")
        for _ in range(self.n_splits):
            idx = np.arange(n)
            yield idx, idx.copy()

    def get_n_splits(self, X=None, y=None, groups=None):
        return self.n_splits

    def _iter_test_indices(self, X=None, y=None, groups=None):  # pragma: no cover - split overrides
        n = _num_samples(X)
        for _ in range(self.n_splits):
            yield np.arange(n)
