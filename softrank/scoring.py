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
    r"""A picklable scorer ``(estimator, X, y) -> float``, greater is better.

    Parameters
    ----------
    kind : {'estimated_test_loss', 'gap', 'measure'}, default='estimated_test_loss'
        What the scorer returns, negated: the estimated test loss (mean loss on (X, y) plus
        ``gap_``), ``gap_``, or ``measure_``.
    measure : gap estimator or None, default=None
        An unfitted estimator used as a template when the scored estimator is a plain skorch
        net or Pipeline (its ``estimator`` is replaced by the scored net, with ``prefit=True``);
        None: ``SoftRankFIM(None)``. A gap estimator being scored is used as it is.

    Returns
    -------
    GapScorer
        The scorer, for ``scoring=`` in GridSearchCV, ``cross_validate`` or multi-metric
        ``refit=``.

    Raises
    ------
    ValueError
        For an unknown ``kind``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skorch import NeuralNetClassifier
    >>> from softrank.datasets import load_digits_split
    >>> data = load_digits_split()
    >>> X, y = data.X_train[:200], data.y_train[:200]
    >>> _ = torch.manual_seed(0)
    >>> net = NeuralNetClassifier(
    ...     nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)),
    ...     criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam, lr=0.01,
    ...     optimizer__weight_decay=1e-3, max_epochs=20, train_split=None, verbose=0)
    >>> from softrank import ApproxLOO, make_gap_scorer
    >>> scorer = make_gap_scorer("gap", measure=ApproxLOO(None))
    >>> _ = net.fit(X, y)
    >>> scorer(net, X, y) < 0  # minus the estimated gap
    True
    """
    return GapScorer(kind, measure)


_DEFAULT_SCORER = GapScorer()


def gap_scorer(estimator, X, y) -> float:
    r"""Estimated test loss, negated (greater is better), as a scikit-learn scorer.

    For a gap estimator, ``estimator.score(X, y)`` (for :class:`HessianNorm`: −``measure_``);
    for a plain fitted skorch net or Pipeline, the score of a
    ``SoftRankFIM(lam='auto', prefit=True)`` measurement of it on (X, y).

    Parameters
    ----------
    estimator : gap estimator, skorch net or Pipeline ending in one
        Fitted.
    X : array-like of shape (n_samples, ...)
        Data to score on: the training data for the estimated test loss (``InSampleSplit``).
    y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        Targets.

    Returns
    -------
    float
        −(mean loss on (X, y) + estimated gap), in loss units (nats per sample for
        cross-entropy).

    See Also
    --------
    make_gap_scorer : scorers for the gap or the measure, or with another estimator.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skorch import NeuralNetClassifier
    >>> from softrank.datasets import load_digits_split
    >>> data = load_digits_split()
    >>> X, y = data.X_train[:200], data.y_train[:200]
    >>> _ = torch.manual_seed(0)
    >>> net = NeuralNetClassifier(
    ...     nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)),
    ...     criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam, lr=0.01,
    ...     optimizer__weight_decay=1e-3, max_epochs=20, train_split=None, verbose=0)
    >>> from softrank import gap_scorer
    >>> _ = net.fit(X, y)
    >>> gap_scorer(net, X, y) < 0
    True
    """
    if isinstance(estimator, GapEstimator):
        return float(estimator.score(X, y))
    return _DEFAULT_SCORER(estimator, X, y)


class InSampleSplit(BaseCrossValidator):
    r"""Cross-validation splitter that trains and tests on all samples, ``n_splits`` times.

    For model selection by an in-sample criterion (the estimated test loss of a gap estimator)
    with :class:`sklearn.model_selection.GridSearchCV` or ``cross_validate``, without a
    validation split: each split is (all indices, all indices).

    Parameters
    ----------
    n_splits : int, default=1
        Number of (identical) splits.

    See Also
    --------
    gap_scorer : the scorer to use with it for plain nets.

    Examples
    --------
    >>> import numpy as np
    >>> from softrank import InSampleSplit
    >>> [(train.tolist(), test.tolist()) for train, test in InSampleSplit().split(np.zeros((3, 1)))]
    [([0, 1, 2], [0, 1, 2])]
    """

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
