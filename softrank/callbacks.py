r"""skorch callbacks: the estimated gap and test loss in ``net.history``, and early stopping on
them — so a net trains on **all** its data (``train_split=None``) and still stops in time.

* :class:`GapTracker` — every ``every`` epochs, measures the net on its training data with a
  :class:`~softrank.estimators.GapEstimator` and records

  ============================  ===================================================
  ``est_gap``                   :math:`\widehat{\mathrm{gap}}` (the estimator's ``gap_``)
  ``est_test_loss``             :math:`\bar\ell_{\mathrm{train}} + \widehat{\mathrm{gap}}`
                                (mean loss on all training data, evaluation mode)
  ``est_test_loss_best``        True when ``est_test_loss`` is the lowest so far
  ============================  ===================================================

  which skorch's ``PrintLog`` shows (the best value highlighted). Epochs without a measurement
  get NaN (and ``_best`` False), so the table keeps its columns.
* :class:`EstimatedLossEarlyStopping` — skorch's :class:`~skorch.callbacks.EarlyStopping` on
  ``est_test_loss`` that counts only the measured epochs and restores the best weights.
  With ``every=1`` skorch's own ``EarlyStopping(monitor='est_test_loss')`` and
  ``Checkpoint(monitor='est_test_loss_best')`` work as they are.

The default measure is the **calibrated** KFAC soft-rank estimate
:math:`\bar\ell_{\mathrm{train}} + \mathrm{rank}_\Lambda(F)/n` — the training loss
penalized by the effective number of parameters, an AIC with :math:`\mathrm{rank}_\Lambda(F)`
in place of p — on a fixed random subsample of 512 training samples (seed 0). Not the
α-weighted estimate: while a net memorizes (noisy labels, small Λ) its training gradients
vanish, :math:`\alpha = \mathrm{Tr}\,C/\mathrm{Tr}\,F \to 0` and
:math:`\alpha\,\mathrm{rank}/n` keeps falling while the test loss rises; the soft rank itself
rises at the onset of memorization, which is what early stopping needs. With a small Λ its
*level* overestimates the test loss; its minimum over the epochs is what counts (measured on
digits with flipped labels: docs/guide_training_loop.md).

* :class:`FinishTraining` — at the end of training, trains the net on to the minimizer of its
  regularized objective (full-batch L-BFGS, :func:`~softrank.stationarity.finish_training`), so
  that every estimate made of it afterwards describes the net it is. Unlike the two above, it
  **changes the net being trained**: that is its purpose.

All follow skorch's conventions: ``__init__`` only stores parameters, state ends in ``_`` and
is set in ``initialize()``, so ``clone(net)`` is unfitted and GridSearchCV works. Put
:class:`GapTracker` before anything that reads its columns in ``callbacks=[...]``.

The measurement runs on a private copy of the module (the net, its optimizer and torch's global
RNG are untouched: training with the tracker gives bit-identical weights). Its cost is one
evaluation pass over the training data for the loss plus the estimator's curvature passes on the
subsample (KFAC: about one training epoch over the subsample).
"""
from __future__ import annotations

import warnings
from numbers import Integral

import numpy as np
import torch
from sklearn.base import clone
from skorch.callbacks import Callback, EarlyStopping
from torch.utils.data import Subset

from .estimators import GapEstimator, SoftRankFIM
from .stationarity import NotStationaryWarning, finish_training

__all__ = ["GapTracker", "EstimatedLossEarlyStopping", "FinishTraining",
           "default_tracker_measure"]


def default_tracker_measure() -> SoftRankFIM:
    """Calibrated KFAC soft-rank estimate rank_Λ(F)/n on a fixed subsample of 512 training
    samples (seed 0)."""
    return SoftRankFIM(None, approximation="kfac", gap_formula="rank", n_curvature_samples=512,
                       random_state=0)


def _as_array(a, what):
    if torch.is_tensor(a):
        return a.detach().cpu().numpy()
    if a is None or isinstance(a, dict):
        raise TypeError(f"GapTracker needs the training {what} as an array or tensor (skorch "
                        f"Dataset(X, y)); got {type(a).__name__}")
    return np.asarray(a)


def training_arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) arrays of the data a skorch net trains on in this epoch (a skorch ``Dataset`` or
    the ``Subset`` that ``train_split`` makes of one)."""
    if isinstance(dataset, Subset):
        X, y = training_arrays(dataset.dataset)
        idx = np.asarray(dataset.indices)
        return X[idx], y[idx]
    return _as_array(getattr(dataset, "X", None), "inputs X"), \
        _as_array(getattr(dataset, "y", None), "targets y")


class GapTracker(Callback):
    r"""Record the estimated gap and test loss of the net in ``net.history`` during training.

    Parameters
    ----------
    measure : GapEstimator or None
        Unfitted template, e.g. ``SoftRankFIM(None, approximation='diagonal',
        n_curvature_samples=256, random_state=0)`` (the α-weighted estimate) or
        ``ApproxLOO(None, method='exact')``; its settings are used as they are (with
        ``estimator`` = the net being trained and ``prefit=True``). Default
        :func:`default_tracker_measure`. Give it an integer ``random_state`` so that every
        epoch is measured on the same subsample.
    every : int
        Measure at epochs ``every, 2·every, ...`` (NaN in between).
    name : str
        Column prefix: ``{name}_gap``, ``{name}_test_loss``, ``{name}_test_loss_best``.

    Attributes
    ----------
    best_ : float
        The lowest estimated test loss so far (set in ``initialize``).
    result_ : softrank.measures.MeasureResult
        The last measurement.

    See Also
    --------
    EstimatedLossEarlyStopping : stop training on the tracked estimate.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skorch import NeuralNetClassifier
    >>> from softrank import GapTracker
    >>> from softrank.datasets import load_digits_split
    >>> data = load_digits_split()
    >>> _ = torch.manual_seed(0)
    >>> net = NeuralNetClassifier(
    ...     nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)),
    ...     criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam, lr=0.01,
    ...     optimizer__weight_decay=1e-3, max_epochs=4, train_split=None, verbose=0,
    ...     callbacks=[GapTracker(every=2)])
    >>> _ = net.fit(data.X_train[:200], data.y_train[:200])
    >>> gaps = net.history[:, "est_gap"]  # NaN on the epochs not measured
    >>> len(gaps), gaps[1] > 0
    (4, True)
    """

    def __init__(self, measure=None, *, every: int = 1, name: str = "est"):
        self.measure = measure
        self.every = every
        self.name = name

    # -- state ------------------------------------------------------------------------------
    def initialize(self):
        measure = self.measure if self.measure is not None else default_tracker_measure()
        if not isinstance(measure, GapEstimator):
            raise TypeError("measure must be an unfitted GapEstimator such as SoftRankFIM(None, "
                            f"approximation='kfac'); got {type(measure).__name__}")
        every = self.every
        if not isinstance(every, Integral) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive integer; got {every!r}")
        self.measure_ = clone(measure)
        self.best_ = np.inf
        self.result_ = None
        return self

    @property
    def columns(self) -> tuple[str, str, str]:
        """(gap, estimated test loss, best) column names."""
        return f"{self.name}_gap", f"{self.name}_test_loss", f"{self.name}_test_loss_best"

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        """Continue the running best over an existing history (``partial_fit``, warm start)."""
        key = self.columns[1]
        past = [row[key] for row in net.history if np.isfinite(row.get(key, np.nan))]
        self.best_ = min(past, default=np.inf)

    # -- measuring ---------------------------------------------------------------------------
    def measure_net(self, net, X, y) -> GapEstimator:
        """The template fitted on (X, y) with ``estimator=net``, ``prefit=True``."""
        with warnings.catch_warnings():  # a net in training is not at a minimizer, by design
            warnings.simplefilter("ignore", NotStationaryWarning)
            est = clone(self.measure_).set_params(estimator=net, prefit=True).fit(X, y)
        if est.gap_ is None:
            raise ValueError(f"{type(est).__name__} has no gap estimate; GapTracker needs a "
                             "measure with gap_ (SoftRankFIM, TIC, TraceRatio, ApproxLOO)")
        return est

    def on_epoch_end(self, net, dataset_train=None, dataset_valid=None, **kwargs):
        gap_key, loss_key, best_key = self.columns
        if len(net.history) % self.every:
            net.history.record(gap_key, np.nan)
            net.history.record(loss_key, np.nan)
            net.history.record(best_key, False)
            return
        est = self.measure_net(net, *training_arrays(dataset_train))
        estimated = est.train_loss_ + est.gap_
        self.result_ = est.result_
        is_best = bool(estimated < self.best_)
        if is_best:
            self.best_ = estimated
        net.history.record(gap_key, float(est.gap_))
        net.history.record(loss_key, float(estimated))
        net.history.record(best_key, is_best)


class EstimatedLossEarlyStopping(EarlyStopping):
    """skorch's :class:`~skorch.callbacks.EarlyStopping` on the estimated test loss of a
    :class:`GapTracker` (lower is better): stops after ``patience`` *measurements* without an
    improvement (epochs the tracker skipped, NaN, are not counted) and, with ``load_best``
    (default True here), restores the weights of the best measured epoch at the end.

    ``warmup``: the first ``warmup`` epochs are not monitored. The estimates assume a trained
    net; during the first epochs the net is far from that and its soft rank is still growing
    as it learns features, so an early, low estimate would otherwise end training (measured on
    digits with flipped labels, see the training-loop guide). Put it after the
    :class:`GapTracker` in ``callbacks``.

    Parameters
    ----------
    monitor : str, default='est_test_loss'
        History column to monitor (the tracker's ``{name}_test_loss``).
    patience : int, default=5
        Measurements without improvement before stopping.
    threshold : float, default=1e-4
        Smallest improvement that counts.
    threshold_mode : {'rel', 'abs'}, default='rel'
        Whether ``threshold`` is relative or absolute.
    sink : callable, default=print
        Where the stopping message goes.
    load_best : bool, default=True
        Restore the weights of the best measured epoch at the end.
    warmup : int, default=2
        Epochs not monitored at the start.

    See Also
    --------
    GapTracker : records the estimate this callback monitors.

    Examples
    --------
    >>> from softrank import EstimatedLossEarlyStopping, GapTracker
    >>> callbacks = [GapTracker(), EstimatedLossEarlyStopping(patience=3)]
    >>> callbacks[1].monitor
    'est_test_loss'
    """

    def __init__(self, monitor: str = "est_test_loss", patience: int = 5,
                 threshold: float = 1e-4, threshold_mode: str = "rel", sink=print,
                 load_best: bool = True, warmup: int = 2):
        super().__init__(monitor=monitor, patience=patience, threshold=threshold,
                         threshold_mode=threshold_mode, lower_is_better=True, sink=sink,
                         load_best=load_best)
        self.warmup = warmup

    def on_train_begin(self, net, **kwargs):
        if not isinstance(self.warmup, Integral) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer; got {self.warmup!r}")
        super().on_train_begin(net, **kwargs)

    def on_epoch_end(self, net, **kwargs):
        row = net.history[-1]
        if self.monitor not in row:
            raise KeyError(f"{self.monitor!r} is not in net.history: add a GapTracker (before "
                           "this callback) to callbacks=[...]")
        if row["epoch"] <= self.warmup or not np.isfinite(row[self.monitor]):
            return  # warm-up, or an epoch the tracker skipped
        super().on_epoch_end(net, **kwargs)


class FinishTraining(Callback):
    r"""Finish training at its end: full-batch L-BFGS (strong-Wolfe line search) on the
    training objective :math:`\frac1n\sum_i\ell_i + \frac12\theta^\top\Lambda\theta`, from
    the trained θ, until the relative stationarity
    :math:`r = \|\nabla(\cdot)\|/\|\Lambda\theta\|` is at most ``tol``
    (:func:`~softrank.stationarity.finish_training`, on the data the net trained on in its last
    epoch).

    **This callback changes the net being trained**: the finished parameters are written into
    ``net.module_`` at ``on_train_end``, so that the net — and every gap estimate made of it —
    is the minimizer the estimates assume. The optimizer state is left as it was. Finishing
    erases what early stopping or the learning rate did beyond Λ; use it when the net serves
    to compare Λ or architectures by an estimate, not to keep an early-stopped net as it is.

    Parameters
    ----------
    lam : 'auto', float or dict
        :math:`\Lambda` ('auto': the optimizer's ``weight_decay``).
    tol, max_iter, history_size, batch_size :
        As for :func:`~softrank.stationarity.finish_training`.

    Attributes
    ----------
    result_ : FinishResult or None
        What the last finishing did (iterations, r and loss before and after).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetClassifier
    >>> from softrank import FinishTraining, relative_stationarity
    >>> X = np.random.RandomState(0).randn(64, 4).astype(np.float32)
    >>> y = (X[:, 0] > 0).astype(np.int64)
    >>> _ = torch.manual_seed(0)
    >>> finish = FinishTraining(tol=1e-3)
    >>> net = NeuralNetClassifier(torch.nn.Linear, module__in_features=4, module__out_features=2,
    ...                           criterion=torch.nn.CrossEntropyLoss, max_epochs=2,
    ...                           optimizer__weight_decay=1e-2, train_split=None, verbose=0,
    ...                           callbacks=[finish]).fit(X, y)
    >>> bool(relative_stationarity(net, X, y) <= 1e-3)
    True
    """

    def __init__(self, *, lam="auto", tol: float = 1e-3, max_iter: int = 500,
                 history_size: int = 20, batch_size=None):
        self.lam = lam
        self.tol = tol
        self.max_iter = max_iter
        self.history_size = history_size
        self.batch_size = batch_size

    def initialize(self):
        self.result_ = None
        self._data = None
        return self

    def on_epoch_end(self, net, dataset_train=None, **kwargs):
        self._data = dataset_train  # the data of the last epoch (train_split applied)

    def on_train_end(self, net, X=None, y=None, **kwargs):
        if self._data is None:
            return  # no epoch ran
        Xt, yt = training_arrays(self._data)
        self._data = None
        result = finish_training(net, Xt, yt, lam=self.lam, tol=self.tol,
                                 max_iter=self.max_iter, history_size=self.history_size,
                                 batch_size=self.batch_size)
        finished = dict(result.estimator.module_.named_parameters())
        with torch.no_grad():
            for name, p in net.module_.named_parameters():
                p.copy_(finished[name])
        self.result_ = result
