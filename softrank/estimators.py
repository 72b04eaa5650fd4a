r"""The scikit-learn face: gap estimators that wrap a skorch net.

Each estimator wraps a skorch net (``NeuralNetClassifier``, ``NeuralNetBinaryClassifier``,
``NeuralNetRegressor``) or a :class:`~sklearn.pipeline.Pipeline` ending in one, fitted or not.
``fit(X, y)`` fits the net if needed (never a net that is already fitted), then measures the
curvature of its loss on (X, y) — the training data — and estimates the generalization gap

* :class:`SoftRankFIM` — ``measure_``
  :math:`\mathrm{rank}_\Lambda(F)=\mathrm{Tr}\,F(F+\Lambda)^{-1}`, ``gap_``
  :math:`\alpha\,\mathrm{rank}_\Lambda(F)/n` with :math:`\alpha=\mathrm{Tr}\,C/\mathrm{Tr}\,F`
  (``gap_formula='rank'``: :math:`\mathrm{rank}_\Lambda(F)/n`);
* :class:`TIC` — ``measure_`` :math:`\mathrm{Tr}\,C(M+\Lambda)^{-1}`, M = F or H;
  ``gap_`` value/n;
* :class:`TraceRatio` — ``measure_`` :math:`\mathrm{Tr}\,C/\mathrm{Tr}\,F`; ``gap_`` value/n
  (Thomas et al., 2020);
* :class:`HessianNorm` — ``measure_`` Tr H, ‖H‖₂ or ‖H‖_F; no gap (a baseline).

Conventions: mean loss; :math:`\Lambda` is the weight decay of the objective
:math:`\frac1n\sum_i\ell_i + \frac12\theta^\top\Lambda\theta` (``lam='auto'`` reads it from the
net's optimizer, parameter groups included); n is the number of samples the net **trained** on
(skorch's ``train_split`` holds out 20 % by default: ``n_train_`` counts what it actually used).

``score(X, y)`` is greater-is-better: the estimated test loss, negated,
:math:`-(\bar\ell(X, y) + \widehat{\mathrm{gap}})`, so that ``GridSearchCV(SoftRankFIM(net), grid,
cv=InSampleSplit())`` selects by estimated test loss without a validation split.

Writing another measure: subclass :class:`GapEstimator`, list the parameters in ``__init__``
(store them only), and implement ``_measure(self, md, lam) -> MeasureResult`` (``md`` holds the
curvature samples, ``md.n_train`` is n; ``lam`` is resolved, or None when ``_needs_lam`` is
False). ``result.gap`` becomes ``gap_`` (override ``_gap``), ``result.diagnostics['stderr']``
becomes ``stderr_``. Set ``_requires_fisher = False`` when the measure works for any criterion.
For ``memory_budget``, list the curvatures ``_measure`` builds in ``_memory_plan(self, md)``
(``[(approximation, matrix, options), ...]``).
"""
from __future__ import annotations

import warnings
import re
from contextlib import contextmanager
from numbers import Integral

import numpy as np
import torch
from sklearn.base import BaseEstimator, MetaEstimatorMixin, TransformerMixin, clone
from sklearn.exceptions import NotFittedError
from sklearn.utils import check_random_state
from sklearn.utils._tags import ClassifierTags, RegressorTags
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted, validate_data

from . import skorch_adapter as sk
from ._doc import compose
from ._progress import progress
from .curvature import APPROXIMATIONS, GramCurvature, curvature
from .curvature.dense import DEFAULT_MAX_PARAMS
from .effective import EffectiveLam, effective_lam
from .families import family_for
from .influence import fisher_leverage  # noqa: F401  (re-exported: per-sample leverage)
from .loo import LOO_METHODS, approx_loo
from .measures import (HESSIAN_ORDS, MeasureResult, hessian_norms, soft_rank_gap, tic,
                       trace_ratio)
from .memory import (MemoryEstimate, check_loo_memory, check_memory, estimate_loo_memory,
                     estimate_memory, parse_bytes)
from .model import ModelData
from .regularization import as_lam
from .stationarity import (STATIONARITY_THRESHOLD, NotStationaryWarning, finish_training,
                           relative_stationarity)
from ._warnings import ReissuedWarnings, warn
from .summary import EstimateSummary, summarize

__all__ = ["GapEstimator", "SoftRankFIM", "TIC", "TraceRatio", "HessianNorm", "ApproxLOO"]

_PREFIT = ("auto", True, False)


@contextmanager
def _seeded(random_state):
    """Seed torch for the block (training a clone), restoring the global RNG afterwards."""
    if random_state is None:
        yield
        return
    seed = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def _unfrozen(estimator):
    """The net or pipeline inside a :class:`sklearn.frozen.FrozenEstimator` (clone-safe prefit)."""
    inner = getattr(estimator, "estimator", None)
    if type(estimator).__name__ == "FrozenEstimator" and inner is not None:
        return inner
    return estimator


def _wraps_classifier(self) -> bool:
    _, net = sk.split_estimator(_unfrozen(self.estimator))
    return sk.net_kind(net) in ("classifier", "binary")


@compose
class GapEstimator(MetaEstimatorMixin, BaseEstimator):
    r"""Base class of the gap estimators: wraps a skorch net, fits it if needed, measures it.

    ``fit(X, y)`` fits the net if needed (never a net that is already fitted, see ``prefit``),
    then measures the curvature of its loss on (X, y), the training data, and sets ``measure_``
    and ``gap_``. ``score(X, y)`` is the estimated test loss, negated (greater is better), so
    that ``GridSearchCV(estimator, grid, cv=InSampleSplit())`` selects models by estimated test
    loss without a validation split.

    The concrete estimators are :class:`SoftRankFIM`, :class:`TIC`, :class:`TraceRatio`,
    :class:`HessianNorm` and :class:`ApproxLOO`; all take the parameters below (those that
    apply to them). To write another measure, subclass this class, list the parameters in
    ``__init__`` (store them only) and implement ``_measure(self, md, lam) -> MeasureResult``
    (``md`` is a :class:`softrank.ModelData` of the curvature samples, ``md.n_train`` is n;
    ``lam`` is resolved, or None when ``_needs_lam`` is False). ``result.gap`` becomes ``gap_``
    (override ``_gap``), ``result.diagnostics['stderr']`` becomes ``stderr_``. Set
    ``_requires_fisher = False`` when the measure works for any criterion, and list the
    curvatures ``_measure`` builds in ``_memory_plan(self, md)`` for ``memory_budget``.

    See Also
    --------
    InSampleSplit : cross-validation splitter for selecting by estimated test loss.
    make_gap_scorer : a scorer from any gap estimator.

    Examples
    --------
    >>> from softrank import GapEstimator, SoftRankFIM, ApproxLOO
    >>> all(issubclass(c, GapEstimator) for c in (SoftRankFIM, ApproxLOO))
    True
    >>> SoftRankFIM(None, approximation="kfac").get_params()["approximation"]
    'kfac'
    """

    _needs_lam = True
    _requires_fisher = True

    # -- parameters ------------------------------------------------------------------------
    def _check_params(self):
        if self.prefit not in _PREFIT:
            raise ValueError(f"prefit must be 'auto', True or False; got {self.prefit!r}")
        batch_size = getattr(self, "batch_size", 256)
        if not isinstance(batch_size, Integral) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        m = self.n_curvature_samples
        if m is not None and (not isinstance(m, Integral) or isinstance(m, bool) or m < 1):
            raise ValueError(f"n_curvature_samples must be a positive integer or None; got {m!r}")
        approx = getattr(self, "approximation", "exact")
        if approx not in APPROXIMATIONS:
            raise ValueError(f"approximation must be one of {APPROXIMATIONS}; got {approx!r}")
        budget = getattr(self, "memory_budget", None)
        if budget is not None and (isinstance(budget, bool) or parse_bytes(budget) <= 0):
            raise ValueError(f"memory_budget must be a positive number of bytes, a string such "
                             f"as '2GB', or None; got {budget!r}")
        if self._needs_lam:
            _check_lam(getattr(self, "lam", "auto"))
        for name in ("random_state", "device", "params"):
            _check_option(name, getattr(self, name, None))
        finish_options(getattr(self, "finish", False))

    # -- tags ------------------------------------------------------------------------------
    def __sklearn_tags__(self):
        """scikit-learn tags: a classifier or regressor like the wrapped net; needs y."""
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        try:
            _, net = sk.split_estimator(_unfrozen(self.estimator))
        except TypeError:
            return tags
        kind = sk.net_kind(net)
        if kind in ("classifier", "binary"):
            tags.estimator_type = "classifier"
            tags.classifier_tags = ClassifierTags(multi_class=kind == "classifier")
        elif kind == "regressor":
            tags.estimator_type = "regressor"
            tags.regressor_tags = RegressorTags(poor_score=True)  # score is not R²
            tags.target_tags.multi_output = True
        return tags

    def __sklearn_is_fitted__(self):
        return hasattr(self, "result_")

    # -- fitting ---------------------------------------------------------------------------
    def _fit_estimator(self, X, y):
        """The fitted net or pipeline to measure: the user's if fitted (per ``prefit``), else a
        fitted clone."""
        est = _unfrozen(self.estimator)
        _, net = sk.split_estimator(est)
        X, y = sk.split_dataset(X, y)
        if self.prefit is True:
            sk.check_fitted(est)
        if sk.is_fitted(net) and self.prefit in ("auto", True):
            return est, X, y
        est = clone(est)
        pre, net = sk.split_estimator(est)
        with _seeded(self.random_state):
            if pre is None:
                sk.initialize(net)
                X = sk.check_X(X, sk.module_dtype(net), net.module_)
                y = sk.check_y(net, y, len(X), sk.module_dtype(net))
                self._check_criterion(net)
                if sk.module_built_by_initialize(net):
                    sk.check_module_fits_data(net, X, y)  # before training: clear errors
            else:
                y = sk.check_y(net, y, sk.num_samples(X))
            try:
                est.fit(X, y)
            except Exception:
                if pre is None:  # name the mismatch if that is what failed in training
                    sk.check_module_fits_data(net, X, y)
                raise
        return est, X, y

    def _check_criterion(self, net):
        if self._requires_fisher:
            family_for(net.criterion_, require_fisher=True)

    def _inputs(self, est, X, *, reset: bool):
        """(transformed X — an array with floating inputs in the module's dtype, or a SliceDict
        of them — and the net) for measuring on X (an array, a dict of arrays, or a torch
        Dataset of (Xi, yi) items)."""
        pre, net = sk.split_estimator(est)
        X, _ = sk.split_dataset(X)
        if pre is None and sk.is_dict_like(X):  # named inputs: no n_features_in_
            if reset:
                self.__dict__.pop("n_features_in_", None)
        elif pre is None:
            sk.require_finite(X)
            with _naming("X"):
                X = validate_data(self, X, reset=reset, dtype="numeric", allow_nd=True,
                                  ensure_all_finite=True)
        else:
            validate_data(self, X, reset=reset, skip_check_array=True)
            X = X if pre is None else pre.transform(X)
        return sk.check_X(X, sk.module_dtype(net), net.module_), net

    def _model_data(self, net, X, y, n_train=None):
        return ModelData(net.module_, net.criterion_, X, y, params=self.params,
                         output_transform=sk.output_transform(net), batch_size=self.batch_size,
                         n_train=n_train, device=self.device)

    def _labelled(self, est, X, y, *, reset: bool):
        """(X, y, net) checked for measuring: shapes, dtypes, labels the net has seen."""
        X, y = sk.split_dataset(X, y)
        Xt, net = self._inputs(est, X, reset=reset)
        y = sk.check_y(net, y, len(Xt), sk.module_dtype(net))
        sk.check_labels_seen(net, y)
        sk.check_module_fits_data(net, Xt, y)
        return Xt, y, net

    def _curvature_subset(self, X, y):
        m = self.n_curvature_samples
        self._curvature_rows = None  # all of X
        if m is None or m >= len(X):
            return X, y
        idx = np.sort(check_random_state(self.random_state).choice(len(X), m, replace=False))
        self._curvature_rows = idx
        return X[idx], y[idx]

    def _resolve_lam(self, net, md, lam_option):
        if not self._needs_lam:
            return None
        lam = sk.weight_decay_lam(net, md.param_names, md) if _is_auto(self.lam) else lam_option
        as_lam(lam, md.param_names, md.sizes)  # clear error for λ ≤ 0, unknown names, shapes
        return lam

    def fit(self, X, y):
        """Fit the net if needed (see ``prefit``), then measure it on (X, y).

        Parameters
        ----------
        X : array-like of shape (n_samples, ...)
            The training data (what the net was or will be trained on), any array the net
            accepts (converted to the module's dtype).
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            Targets: class labels for classifiers, values for regressors.

        Returns
        -------
        self
            With the fitted attributes (``measure_``, ``gap_``, ``train_loss_``...) set.

        Raises
        ------
        ValueError
            For invalid parameters, or data the net cannot take.
        MemoryError
            When ``memory_budget`` is set and a curvature representation would exceed it.
        softrank.families.UnsupportedCriterionError
            When the measure needs the Fisher and the net's criterion has none.
        """
        with ReissuedWarnings():  # every warning of the measurement points at the caller
            return self._fit(X, y)

    def _fit(self, X, y):
        self._check_params()
        self._y_1d = y is not None and np.asarray(y).ndim == 1
        est, X, y = self._fit_estimator(X, y)
        Xt, yt, net = self._labelled(est, X, y, reset=True)
        self._check_criterion(net)
        lam_option = getattr(self, "lam", "auto")
        if _is_effective(lam_option):
            lam_option = effective_lam(est, X, y, params=self.params, batch_size=self.batch_size,
                                       device=self.device)
        options = finish_options(getattr(self, "finish", False))
        finished = None
        if options is not None:
            finished = finish_training(est, X, y, lam=lam_option, params=self.params,
                                       device=self.device, **options)
            est = finished.estimator
            _, net = sk.split_estimator(est)
            stationarity = finished.stationarity_after
        else:
            stationarity = self._stationarity(est, X, y, lam_option)
        y = yt
        n_train, source = sk.n_trained(net, Xt, y)
        full = self._model_data(net, Xt, y, n_train)
        Xc, yc = self._curvature_subset(Xt, y)
        md = full if len(Xc) == len(Xt) else self._model_data(net, Xc, yc, n_train)
        # before any data pass: against memory_budget, or the memory available now
        self._memory_estimates(md, getattr(self, "memory_budget", None), check=True)
        train_loss = sk.mean_loss(full)
        lam = self._resolve_lam(net, md, lam_option)
        with progress(getattr(self, "verbose", False)):
            result = self._measure(md, lam)

        self.estimator_ = est
        self.result_ = result
        self.measure_ = float(result.value)
        self.gap_ = self._gap(result)
        self.train_loss_ = train_loss
        self.lam_ = lam
        self.n_train_ = int(n_train)
        self.n_train_source_ = source
        self.n_samples_fit_ = len(Xt)
        self.approximation_ = result.approximation
        self.stderr_ = result.diagnostics.get("stderr")
        self.stationarity_ = stationarity
        self.finish_result_ = finished
        if stationarity is not None and stationarity > STATIONARITY_THRESHOLD:
            warn(not_stationary_message(type(self).__name__, stationarity, finished, lam),
                 NotStationaryWarning)
        if sk.net_kind(net) in ("classifier", "binary"):
            self.classes_ = sk.classes_of(net, md.n_outputs)
        self._after_fit(md, Xc)
        return self

    def _stationarity(self, est, X, y, lam) -> float | None:
        """r of ``est`` on the fit data; None when there is no Λ to measure it against (no
        ``lam`` and no weight decay in the optimizer)."""
        if not self._needs_lam and _is_auto(lam):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return relative_stationarity(est, X, y, params=self.params,
                                                 batch_size=self.batch_size, device=self.device)
            except ValueError:
                return None
        return relative_stationarity(est, X, y, lam=lam, params=self.params,
                                     batch_size=self.batch_size, device=self.device)

    def _measure(self, md, lam) -> MeasureResult:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- memory ----------------------------------------------------------------------------
    def _memory_plan(self, md) -> list:
        """(approximation, matrix, options) of every curvature ``_measure`` builds on ``md``;
        matrix 'approx_loo' stands for :func:`~softrank.loo.approx_loo` (approximation = its
        method). Subclasses list theirs (default: none)."""
        return []

    def _memory_estimates(self, md, budget=None, *, check=False) -> list:
        """The estimates of ``_memory_plan(md)``; with ``check``, raise a MemoryError (named
        after the estimator) at the first one above ``budget`` (None: the memory available
        now, :func:`softrank.memory.available_memory`)."""
        out = []
        for approx, matrix, opts in self._memory_plan(md):
            loo = matrix == "approx_loo"
            try:
                if not check:
                    est = (estimate_loo_memory(md, approx, **opts) if loo else
                           estimate_memory(md, approx, matrix, **opts))
                else:
                    est = (check_loo_memory(md, approx, budget, **opts) if loo else
                           check_memory(md, approx, matrix, budget, **opts))
            except MemoryError as e:
                name = type(self).__name__
                raise MemoryError(str(e) if str(e).startswith(name) else f"{name}: {e}") from None
            if est is not None:
                out.append(est)
        return out

    def estimate_memory(self, X, y=None) -> list[MemoryEstimate]:
        """The memory estimates ``fit(X, y)`` would check against ``memory_budget``, one
        :class:`~softrank.memory.MemoryEstimate` per curvature the measure builds (``total``
        bytes and the named terms of ``breakdown``), computed from the layer shapes: no data
        pass, nothing is measured and the estimator is not changed.

        Needs the wrapped net fitted (the estimate reads its module's layers): fit it first, or
        call this after ``fit`` (it then uses ``estimator_``). ``y`` is optional (only checked).
        """
        self._check_params()
        est = getattr(self, "estimator_", None)
        est = _unfrozen(self.estimator) if est is None else est
        pre, net = sk.split_estimator(est)
        if not sk.is_fitted(net):
            raise NotFittedError(
                f"{type(self).__name__}.estimate_memory needs the wrapped "
                f"{type(net).__name__} fitted (the estimate reads the trained module's layer "
                "shapes): fit the net first (net.fit(X, y)), then pass it to the estimator "
                "(wrap it in FrozenEstimator to keep it fitted through clone), or call "
                "estimate_memory after fit.")
        dtype = sk.module_dtype(net)
        if pre is None:
            X = sk.check_X(X, dtype)
        else:
            X = sk.check_X(pre.transform(X), dtype)
        if y is not None:
            y = sk.check_y(net, y, len(X), dtype)
        m = self.n_curvature_samples
        if m is not None and m < len(X):  # which samples does not matter: only how many
            X, y = X[:m], None if y is None else y[:m]
        return self._memory_estimates(self._model_data(net, X, y))

    def _gap(self, result) -> float | None:
        return None if result.gap is None else float(result.gap)

    def _after_fit(self, md, X_curvature):
        """Hook: keep what ``transform`` needs."""

    # -- using the fitted estimator --------------------------------------------------------
    def summary(self) -> EstimateSummary:
        """A verdict on the estimate: the number with its standard error, n, Λ, the
        approximation, α, r, invalid leave-one-out points, and a plain statement with the
        action to take for each failure regime it is in (not stationary, collapsed gradients,
        upper-bound approximation, invalid leave-one-out steps). ``print(est.summary())``;
        ``est.summary().as_dict()``."""
        check_is_fitted(self)
        return summarize(self)

    def loss(self, X, y) -> float:
        """Mean loss of the fitted net on (X, y), in evaluation mode, with its criterion."""
        check_is_fitted(self)
        Xt, y, net = self._labelled(self.estimator_, X, y, reset=False)
        return sk.mean_loss(self._model_data(net, Xt, y))

    def score(self, X, y) -> float:
        """Estimated test loss, negated (greater is better): the mean loss on (X, y) plus
        ``gap_``, negated.

        On the training data (``InSampleSplit``) this is ``-(train_loss_ + gap_)``, in loss
        units (nats per sample for cross-entropy)."""
        loss = self.loss(X, y)
        if self.gap_ is None:  # pragma: no cover - HessianNorm overrides score
            raise ValueError(f"{type(self).__name__} has no gap estimate")
        return -(loss + self.gap_)

    def _delegate(self, method, X):
        check_is_fitted(self)
        pre, net = sk.split_estimator(self.estimator_)
        X, _ = sk.split_dataset(X)
        if pre is None:
            if not sk.is_dict_like(X):
                sk.require_finite(X)
                X = validate_data(self, X, reset=False, dtype="numeric", allow_nd=True,
                                  ensure_all_finite=True)
            X = sk.check_X(X, sk.module_dtype(net), net.module_)
        with sk.preserved_modes(net):
            return getattr(self.estimator_, method)(X)

    def predict(self, X):
        """The fitted net's predictions (its train/eval mode is left as it was); 1-D for a
        regressor fitted on 1-D targets."""
        pred = self._delegate("predict", X)
        if getattr(self, "_y_1d", False) and pred.ndim == 2 and pred.shape[1] == 1:
            pred = pred[:, 0]
        return pred

    @available_if(_wraps_classifier)
    def predict_proba(self, X):
        """The fitted net's class probabilities (classifiers only)."""
        return self._delegate("predict_proba", X)


_LAM_KINDS = ("'auto', 'effective', a positive float, a dict {parameter name: positive float}, "
              "a (p,) tensor or softrank.effective_lam(...)")


def _check_lam(lam) -> None:
    """The form of ``lam`` (its values are checked against the parameters in ``fit``)."""
    if _is_auto(lam) or _is_effective(lam) or isinstance(lam, EffectiveLam):
        return
    if lam is None or isinstance(lam, (bool, str)):
        raise (ValueError if isinstance(lam, str) else TypeError)(
            f"lam must be {_LAM_KINDS}; got {lam!r}")
    values = list(lam.values()) if isinstance(lam, dict) else [lam]
    for v in values:
        if isinstance(v, bool) or isinstance(v, str):
            raise TypeError(f"lam must be {_LAM_KINDS}; got {lam!r}")
        arr = v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)
        if arr.dtype.kind == "c":
            raise TypeError(f"lam must be real (it is the weight-decay coefficient Λ); got the "
                            f"complex value {lam!r}")
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"lam must be {_LAM_KINDS}; got {lam!r}")
        if arr.size and not np.isfinite(arr).all():
            raise ValueError(f"lam must be finite; got {lam!r}")
        if arr.size and not (arr > 0).all():
            raise ValueError(f"lam must be > 0 (the weight-decay coefficient Λ in mean loss + "
                             f"½θᵀΛθ); got {lam!r}")


def _check_option(name, value) -> None:
    """random_state, device and params: their forms (torch and numpy would fail later, less
    clearly; parameter names are checked against the module in ``fit``)."""
    if value is None:
        return
    if name == "random_state":
        if isinstance(value, bool) or not isinstance(value, (Integral, np.random.RandomState)):
            raise TypeError(f"random_state must be None, an int or a numpy RandomState; got "
                            f"{value!r}")
        if isinstance(value, Integral) and not 0 <= value < 2 ** 32:
            raise ValueError(f"random_state must be in [0, 2**32); got {value!r}")
        return
    if name == "params":
        if callable(value) or isinstance(value, str) or (
                isinstance(value, (list, tuple, set, frozenset)) and value and
                all(isinstance(v, str) for v in value)):
            return
        raise TypeError("params must be None, a parameter name, a non-empty list of parameter "
                        f"names, or a callable(name, parameter) -> bool; got {value!r}")
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be None or a torch device such as 'cpu' or 'cuda:0'; "
                         f"got {value!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={value!r}, but CUDA is not available here; use device='cpu' "
                         "or None (the module's device)")


@contextmanager
def _naming(name: str):
    """Prefix ``name: `` to a ValueError/TypeError whose message does not name it (numpy's
    'could not convert string to float', scikit-learn's 'Expected 2D array')."""
    try:
        yield
    except (ValueError, TypeError) as e:
        if re.search(rf"\b{name}\b", str(e)):
            raise
        raise type(e)(f"{name}: {e}") from e


def _is_auto(lam) -> bool:
    return isinstance(lam, str) and lam == "auto"


def _is_effective(lam) -> bool:
    return isinstance(lam, str) and lam == "effective"


_FINISH_KEYS = ("tol", "max_iter", "history_size", "batch_size")


def finish_options(finish) -> dict | None:
    """The options of :func:`~softrank.stationarity.finish_training` that ``finish`` asks for
    (None: do not finish)."""
    if finish is False or finish is None:
        return None
    if finish is True:
        return {}
    if isinstance(finish, dict):
        unknown = sorted(set(finish) - set(_FINISH_KEYS))
        if unknown:
            raise ValueError(f"finish has unknown options {unknown}; allowed: {list(_FINISH_KEYS)}"
                             " (lam, params and device are the estimator's own)")
        return dict(finish)
    raise ValueError(f"finish must be True, False or a dict of finish_training options "
                     f"{list(_FINISH_KEYS)}; got {finish!r}")


def not_stationary_message(name: str, r: float, finished=None, lam=None) -> str:
    """What a :class:`~softrank.stationarity.NotStationaryWarning` says."""
    where = ("the finished net is still" if finished is not None else "the measured net is")
    objective = "training objective mean loss + ½θᵀΛθ"
    if isinstance(lam, EffectiveLam):
        objective = ("effective objective (mean loss + ½θᵀΛθ with the effective Λ, pulling "
                     + ("toward the initial parameters)" if lam.center is not None else
                        "toward 0: θ₀ unknown, record it with softrank.InitialParameters)"))
    text = (f"{name}: {where} far from the minimizer of its {objective}: relative stationarity "
            f"r = {r:.3g} > {STATIONARITY_THRESHOLD:g} (the objective's gradient against the "
            "regularizer's pull; 0 at the minimizer). Every gap estimate assumes that "
            "minimizer; on nets this far from it they were measured 2-50x the observed gap. ")
    if finished is not None:
        return text + (f"Finishing stopped after {finished.n_iter} iterations: raise "
                       "finish={'max_iter': ...} or 'tol'.")
    return text + ("Pass finish=True to measure the net finished to that minimizer (L-BFGS; "
                   "the estimate then describes the finished net, not the one as trained), "
                   "or train it to convergence yourself (full batch, decaying learning rate).")


@compose
class SoftRankFIM(TransformerMixin, GapEstimator):
    r"""Soft rank of the Fisher and the soft-rank generalization gap estimate.

    The soft rank of the Fisher F of the training loss, regularized by the weight decay Λ,

    .. math:: \mathrm{rank}_\Lambda(F) = \mathrm{Tr}\,F(F+\Lambda)^{-1}
              = \sum_j \frac{\sigma_j}{\sigma_j+\lambda}\quad(\Lambda = \lambda I),

    counts the parameter directions the data pins down more strongly than the weight decay.
    The gap estimate [1]_ (expected test loss minus training loss, in loss units) is

    .. math:: \widehat{\mathrm{gap}} = \alpha\,\frac{\mathrm{rank}_\Lambda(F)}{n},\qquad
              \alpha = \frac{\mathrm{Tr}\,C}{\mathrm{Tr}\,F},

    with C the second moment of the per-sample gradients and n the number of training samples
    (``gap_formula='alpha_rank'``); ``gap_formula='rank'`` assumes a calibrated model (C = F,
    α = 1) and uses :math:`\mathrm{rank}_\Lambda(F)/n`. Needs a criterion of the family table
    (``CrossEntropyLoss``, ``NLLLoss``, ``BCEWithLogitsLoss``, ``MSELoss``,
    ``PoissonNLLLoss(log_input=True)``; see the Concepts page).

    ``transform(X)`` returns per-sample leverage scores
    :math:`\mathrm{Tr}\,F_i(F+\Lambda)^{-1}/n_{\mathrm{fit}}` (one column; no labels needed),
    which sum over the fit data to ``measure_`` for the exact representations (in expectation
    with ``n_curvature_samples``); with an approximation :math:`\tilde F` (kfac, ekfac,
    diagonal) they sum to :math:`\mathrm{Tr}\,F(\tilde F+\Lambda)^{-1}`, close to but not equal
    to :math:`\mathrm{rank}_\Lambda(\tilde F)`.

    Parameters
    ----------
    gap_formula : {'alpha_rank', 'rank'}, default='alpha_rank'
        Which gap formula ``gap_`` uses: 'alpha_rank', :math:`\alpha\,\mathrm{rank}_\Lambda(F)/n`
        (the soft-rank estimate); 'rank', :math:`\mathrm{rank}_\Lambda(F)/n` (exact for a
        calibrated model, an underestimate for an over-confident one). Both are in
        ``result_.diagnostics`` ('gap' and 'calibrated_gap').
    calibrated : bool, default='deprecated'
        Deprecated: use ``gap_formula`` (``calibrated=True`` is ``gap_formula='rank'``).
        Still accepted, with a FutureWarning; removed in the next release.

    Attributes
    ----------
    measure_ : float
        The soft rank :math:`\mathrm{rank}_\Lambda(F)` (a number of parameter directions,
        between 0 and p).

    See Also
    --------
    TIC : the regularized Takeuchi information criterion.
    TraceRatio : α/n, the estimate without the soft-rank factor.
    ApproxLOO : approximate leave-one-out, which keeps working on interpolating nets.

    References
    ----------
    .. [1] Shoham, Mor-Yosef & Avron (2025). "Flatness After All?" (the soft rank of the
       Fisher as a generalization gap estimate).
    .. [2] Takeuchi (1976). "Distribution of information statistics and validity criteria of
       models." Mathematical Science 153 (the TIC).
    .. [3] Thomas, Pedregosa, van Merriënboer, Manzagol, Bengio & Le Roux (2020). "On the
       interplay between noise and curvature and its effect on optimization and
       generalization." AISTATS (the trace ratio).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skorch import NeuralNetClassifier
    >>> from softrank.datasets import load_digits_split
    >>> data = load_digits_split()  # 8x8 digits, float32 pixels in [0, 1]
    >>> X, y = data.X_train[:200], data.y_train[:200]
    >>> _ = torch.manual_seed(0)
    >>> net = NeuralNetClassifier(
    ...     nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)),
    ...     criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam, lr=0.01,
    ...     optimizer__weight_decay=1e-3, max_epochs=20, train_split=None, verbose=0)
    >>> from softrank import SoftRankFIM
    >>> est = SoftRankFIM(net, approximation="kfac").fit(X, y)
    >>> est.n_train_, est.lam_
    (200, 0.001)
    >>> 0 < est.gap_ < 1  # nats per sample
    True
    >>> est.transform(X[:3]).shape  # per-sample leverage
    (3, 1)
    """

    def __init__(self, estimator, *, lam="auto", approximation="exact", gap_formula="alpha_rank",
                 n_curvature_samples=None, batch_size=256, random_state=None, device=None,
                 params=None, prefit="auto", memory_budget=None, finish=False, verbose=False,
                 calibrated="deprecated"):
        self.estimator = estimator
        self.lam = lam
        self.approximation = approximation
        self.gap_formula = gap_formula
        self.calibrated = calibrated
        self.verbose = verbose
        self.n_curvature_samples = n_curvature_samples
        self.batch_size = batch_size
        self.random_state = random_state
        self.device = device
        self.params = params
        self.prefit = prefit
        self.memory_budget = memory_budget
        self.finish = finish

    def _memory_plan(self, md):
        # F, then the exact traces of C and F (diagonals) of the trace ratio α
        return [(self.approximation, "fisher", {}), ("diagonal", "gsm", {}),
                ("diagonal", "fisher", {})]

    def _measure(self, md, lam):
        F = curvature(md, "fisher", self.approximation, random_state=self.random_state)
        self._fisher = F
        return soft_rank_gap(md, lam, self.approximation, F=F)

    def _gap_formula(self) -> str:
        if isinstance(self.calibrated, str) and self.calibrated == "deprecated":
            if self.gap_formula not in ("alpha_rank", "rank"):
                raise ValueError("gap_formula must be 'alpha_rank' (α·rank/n) or 'rank' "
                                 f"(rank/n); got {self.gap_formula!r}")
            return self.gap_formula
        warnings.warn("SoftRankFIM(calibrated=...) is deprecated and will be removed in the next "
                      "release: use gap_formula='rank' for calibrated=True, 'alpha_rank' for "
                      "calibrated=False", FutureWarning, stacklevel=3)
        return "rank" if self.calibrated else "alpha_rank"

    def _check_params(self):
        super()._check_params()
        self._gap_formula()

    def _gap(self, result):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # warned once, by _check_params
            formula = self._gap_formula()
        if formula == "rank":
            return float(result.diagnostics["calibrated_gap"])
        return float(result.gap)

    def _after_fit(self, md, X_curvature):
        self._X_curvature = X_curvature
        if isinstance(self._fisher, GramCurvature) or self.approximation_ == "dense":
            del self._fisher  # large (n·K kernel, p×p matrix): rebuilt on demand

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_fisher", None)
        return state

    def _fisher_curvature(self, net):
        F = getattr(self, "_fisher", None)
        if F is None:
            F = curvature(self._model_data(net, self._X_curvature, None), "fisher",
                          self.approximation, random_state=self.random_state,
                          memory_budget=self.memory_budget)
        return F

    def transform(self, X):
        r"""Per-sample leverage :math:`\mathrm{Tr}\,F_i(F+\Lambda)^{-1}/n_{\mathrm{fit}}`,
        shape (n_samples, 1); F is the Fisher of the fit data. No labels needed."""
        check_is_fitted(self)
        Xt, net = self._inputs(self.estimator_, X, reset=False)
        F = self._fisher_curvature(net)
        L = F.lam(self.lam_)
        if isinstance(F, GramCurvature) and _same_array(Xt, self._X_curvature):
            per_sample = F.leverage(L) * F.md.n
        else:
            per_sample = fisher_leverage(F, self._model_data(net, Xt, None), L)
        return (per_sample / self.n_samples_fit_).numpy()[:, None]


def _same_array(a, b) -> bool:
    if sk.is_dict_like(a) or sk.is_dict_like(b):
        return (sk.is_dict_like(a) and sk.is_dict_like(b) and a.keys() == b.keys()
                and all(_same_array(a[k], b[k]) for k in a.keys()))
    return a.shape == b.shape and np.array_equal(a, b)


@compose
class TIC(GapEstimator):
    r"""Regularized Takeuchi information criterion (TIC) and its gap estimate.

    .. math:: \mathrm{TIC}_\Lambda = \mathrm{Tr}\,C(M+\Lambda)^{-1},\qquad
              \widehat{\mathrm{gap}} = \mathrm{TIC}_\Lambda / n,

    with C the second moment of the per-sample gradients, M the Fisher F
    (``variant='fisher'``, needs a criterion with a Fisher) or the Hessian H of the mean
    training loss (``variant='hessian'``, any twice-differentiable criterion; dense, small p;
    warns when H + Λ is not positive definite) [1]_ [2]_.

    Parameters
    ----------
    variant : {'fisher', 'hessian'}, default='fisher'
        The curvature M in the formula.

    Attributes
    ----------
    measure_ : float
        :math:`\mathrm{Tr}\,C(M+\Lambda)^{-1}` (loss units times n).

    See Also
    --------
    SoftRankFIM : the soft-rank estimate, α·rank/n.
    ApproxLOO : keeps the higher-order terms TIC drops.

    References
    ----------
    .. [1] Takeuchi (1976). "Distribution of information statistics and validity criteria of
       models." Mathematical Science 153.
    .. [2] Shoham, Mor-Yosef & Avron (2025). "Flatness After All?" (the regularized TIC and
       its relation to the soft rank).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skorch import NeuralNetClassifier
    >>> from softrank.datasets import load_digits_split
    >>> data = load_digits_split()  # 8x8 digits, float32 pixels in [0, 1]
    >>> X, y = data.X_train[:200], data.y_train[:200]
    >>> _ = torch.manual_seed(0)
    >>> net = NeuralNetClassifier(
    ...     nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)),
    ...     criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam, lr=0.01,
    ...     optimizer__weight_decay=1e-3, max_epochs=20, train_split=None, verbose=0)
    >>> from softrank import TIC
    >>> est = TIC(net, approximation="kfac").fit(X, y)
    >>> abs(est.gap_ - est.measure_ / est.n_train_) < 1e-12
    True
    """

    def __init__(self, estimator, *, lam="auto", approximation="exact", variant="fisher",
                 n_curvature_samples=None, batch_size=256, random_state=None, device=None,
                 params=None, prefit="auto", memory_budget=None, finish=False,
                 verbose=False):
        self.estimator = estimator
        self.lam = lam
        self.approximation = approximation
        self.variant = variant
        self.n_curvature_samples = n_curvature_samples
        self.batch_size = batch_size
        self.random_state = random_state
        self.device = device
        self.params = params
        self.prefit = prefit
        self.memory_budget = memory_budget
        self.finish = finish
        self.verbose = verbose

    @property
    def _requires_fisher(self):
        return self.variant == "fisher"

    def _check_params(self):
        super()._check_params()
        if self.variant not in ("fisher", "hessian"):
            raise ValueError(f"variant must be 'fisher' or 'hessian'; got {self.variant!r}")

    def _memory_plan(self, md):
        matrix = "fisher" if self.variant == "fisher" else "hessian"
        plan = [(self.approximation, matrix, {})]
        if self.approximation == "dense" or (self.approximation == "exact" and (
                md.n_params <= DEFAULT_MAX_PARAMS or matrix == "hessian")):
            plan.append(("dense", "gsm", {}))  # a dense M comes with a dense C
        return plan

    def _measure(self, md, lam):
        return tic(md, lam, self.approximation, self.variant, random_state=self.random_state)


@compose
class TraceRatio(GapEstimator):
    r"""Trace ratio α = Tr C / Tr F and the gap estimate α/n of Thomas et al. (2020).

    .. math:: \alpha = \frac{\mathrm{Tr}\,C}{\mathrm{Tr}\,F},\qquad
              \widehat{\mathrm{gap}} = \frac{\alpha}{n}

    (exact traces). It lacks the soft-rank factor and so underestimates the gap; α itself reads
    as a calibration ratio: α > 1 over-confident, α < 1 under-confident, α = 1 calibrated.
    Needs a criterion with a Fisher; no λ.

    Attributes
    ----------
    measure_ : float
        The trace ratio α (dimensionless).

    See Also
    --------
    SoftRankFIM : α·rank/n, the estimate with the soft-rank factor.

    References
    ----------
    .. [1] Thomas, Pedregosa, van Merriënboer, Manzagol, Bengio & Le Roux (2020). "On the
       interplay between noise and curvature and its effect on optimization and
       generalization." AISTATS.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skorch import NeuralNetClassifier
    >>> from softrank.datasets import load_digits_split
    >>> data = load_digits_split()  # 8x8 digits, float32 pixels in [0, 1]
    >>> X, y = data.X_train[:200], data.y_train[:200]
    >>> _ = torch.manual_seed(0)
    >>> net = NeuralNetClassifier(
    ...     nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)),
    ...     criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam, lr=0.01,
    ...     optimizer__weight_decay=1e-3, max_epochs=20, train_split=None, verbose=0)
    >>> from softrank import TraceRatio
    >>> est = TraceRatio(net).fit(X, y)
    >>> alpha = est.measure_  # over-confident when > 1
    >>> abs(est.gap_ - alpha / est.n_train_) < 1e-12
    True
    """

    _needs_lam = False

    def __init__(self, estimator, *, n_curvature_samples=None, batch_size=256, random_state=None,
                 device=None, params=None, prefit="auto", memory_budget=None, finish=False,
                 verbose=False):
        self.estimator = estimator
        self.n_curvature_samples = n_curvature_samples
        self.batch_size = batch_size
        self.random_state = random_state
        self.device = device
        self.params = params
        self.prefit = prefit
        self.memory_budget = memory_budget
        self.finish = finish
        self.verbose = verbose

    def _memory_plan(self, md):
        return [("diagonal", "gsm", {}), ("diagonal", "fisher", {})]

    def _measure(self, md, lam):
        return trace_ratio(md)


HESSIAN_APPROXIMATIONS = ("exact", "dense", "matrix_free")


@compose
class HessianNorm(GapEstimator):
    r"""Hessian norm baselines of the mean training loss (sharpness measures).

    :math:`\mathrm{Tr}\,H` (``ord='trace'``), the spectral norm
    :math:`\|H\|_2 = \max_j|\sigma_j|` (``'spectral'``), the largest eigenvalue
    :math:`\sigma_{\max}(H)` (``'max_eigenvalue'``; below :math:`\|H\|_2` when H is indefinite
    with a larger negative end, as away from a minimum) or :math:`\|H\|_F` (``'frobenius'``).

    ``approximation``: 'exact' (= 'dense') builds the dense p×p Hessian (small p; subsample with
    ``n_curvature_samples``); 'matrix_free' works from Hessian-vector products only (Hutch++
    for the trace and for :math:`\mathrm{Tr}\,H^2`, Lanczos for the two ends of the spectrum)
    with ``random_state`` and reports ``stderr_``. The other representations (gram, diagonal,
    kfac, ekfac) are of the Fisher and have no Hessian.

    There is no gap estimate: a norm is not in loss units, and it changes under
    reparametrizations that leave the function unchanged. ``score`` returns ``-measure_``
    (greater is better = flatter), whatever X and y are, so that GridSearchCV picks the
    flattest model by this baseline. Works for any twice-differentiable criterion.

    Parameters
    ----------
    ord : {'trace', 'spectral', 'max_eigenvalue', 'frobenius'}, default='trace'
        Which norm of H (or its largest eigenvalue).

    Attributes
    ----------
    measure_ : float
        The norm (loss units per squared parameter unit).
    gap_ : None
        A norm is not a gap estimate.

    See Also
    --------
    SoftRankFIM : a gap estimate in loss units.

    References
    ----------
    .. [1] Keskar, Mudigere, Nocedal, Smelyanskiy & Tang (2017). "On large-batch training for
       deep learning: generalization gap and sharp minima." ICLR.
    .. [2] Dinh, Pascanu, Bengio & Bengio (2017). "Sharp minima can generalize for deep
       nets." ICML (why norms change under reparametrization).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skorch import NeuralNetClassifier
    >>> from softrank.datasets import load_digits_split
    >>> data = load_digits_split()  # 8x8 digits, float32 pixels in [0, 1]
    >>> X, y = data.X_train[:200], data.y_train[:200]
    >>> _ = torch.manual_seed(0)
    >>> net = NeuralNetClassifier(
    ...     nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)),
    ...     criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam, lr=0.01,
    ...     optimizer__weight_decay=1e-3, max_epochs=20, train_split=None, verbose=0)
    >>> from softrank import HessianNorm
    >>> est = HessianNorm(net, ord="trace", approximation="matrix_free", random_state=0)
    >>> est = est.fit(X, y)
    >>> est.gap_ is None, est.measure_ > 0
    (True, True)
    """

    _needs_lam = False
    _requires_fisher = False

    def __init__(self, estimator, *, ord="trace", approximation="exact",
                 n_curvature_samples=None, batch_size=256, random_state=None, device=None,
                 params=None, prefit="auto", memory_budget=None, finish=False,
                 verbose=False):
        self.estimator = estimator
        self.ord = ord
        self.approximation = approximation
        self.n_curvature_samples = n_curvature_samples
        self.batch_size = batch_size
        self.random_state = random_state
        self.device = device
        self.params = params
        self.prefit = prefit
        self.memory_budget = memory_budget
        self.finish = finish
        self.verbose = verbose

    def _check_params(self):
        super()._check_params()
        if self.ord not in HESSIAN_ORDS:
            raise ValueError(f"ord must be one of {HESSIAN_ORDS}; got {self.ord!r}")
        if self.approximation not in HESSIAN_APPROXIMATIONS:
            raise ValueError(f"HessianNorm needs the Hessian: approximation must be one of "
                             f"{HESSIAN_APPROXIMATIONS} (the others are of the Fisher); "
                             f"got {self.approximation!r}")

    def _memory_plan(self, md):
        if self.approximation in ("exact", "dense"):
            return [("dense", "hessian", {})]
        # Hutch++ keeps no Lanczos basis; Lanczos for the extreme eigenvalues runs one vector
        lanczos = {"block_size": 1} if self.ord in ("spectral", "max_eigenvalue") else \
            {"lanczos_steps": 0}
        return [(self.approximation, "hessian", lanczos)]

    def _measure(self, md, lam):
        if self.approximation in ("exact", "dense"):
            return hessian_norms(md, self.ord)
        return hessian_norms(md, self.ord, approximation=self.approximation,
                             random_state=self.random_state)

    def score(self, X, y=None) -> float:
        """``-measure_``: greater is better (flatter). X and y are checked, not used."""
        check_is_fitted(self)
        self._inputs(self.estimator_, X, reset=False)
        return -self.measure_


@compose
class ApproxLOO(GapEstimator):
    r"""Approximate leave-one-out estimate of the test loss.

    For each training point, one Newton step of the objective without it, in output space:

    .. math:: z_i^{(-i)} = z_i + P_i (I - A_i P_i)^{-1} r_i,\qquad
              P_i = J_i\,\big(n(F+\Lambda)\big)^{-1} J_i^\top,

    with :math:`z_i` the net's outputs, :math:`r_i = \partial\ell_i/\partial z_i`,
    :math:`A_i` the output-space curvature of the loss and :math:`J_i` the Jacobian of the
    outputs with respect to the parameters [1]_ [2]_. ``measure_`` is the estimated test loss
    :math:`\frac1n\sum_i\ell(y_i, z_i^{(-i)})`, ``gap_`` = ``measure_`` − ``train_loss_``. Its
    first-order term is the Fisher TIC and :math:`\sum_i\mathrm{tr}(A_iP_i) =
    \mathrm{rank}_\Lambda(F)`; unlike them it keeps the factor :math:`(I - A_iP_i)^{-1}`, which
    stays large on memorized points, so it keeps working on over-confident, interpolating nets
    where every estimate built on C collapses. Works for any twice-differentiable criterion.

    Parameters
    ----------
    method : {'auto', 'exact', 'nystrom', 'cavity', 'kfac', 'subsample'}, default='auto'
        'auto' (default): 'exact' while the memory of its data-space form (an n·K kernel and
        its Cholesky, estimated with K columns per point) stays below
        ``softrank.memory.LOO_AUTO_EXACT_BYTES`` (2 GiB; the kernel alone, 12·(nK)² bytes,
        allows n ≤ 1,337 for K = 10, the layer records of all n somewhat fewer), whichever
        form 'exact' then runs in; above it 'nystrom'.
        'exact': Woodbury on the empirical NTK, one Cholesky of size n(K−1) (moderate n·K);
        where p < nK the same blocks from the p × p Gauss–Newton Hessian + nΛ instead
        (memory p², time ∝ n·K·p²: small nets at any n, though slower there than 'nystrom').
        'nystrom': ``n_points`` random points (default 300) kept exactly and the other
        points through a Nyström approximation on them with each one's own term exact
        (FITC [3]_): every entry of the kernel :math:`JD^{-1}J^\top` that involves a kept
        point is exact, so no EKFAC and no shrinkage enter its blocks; valid by construction,
        with the control variate and ``stderr_`` of 'cavity' (below). On wide MLPs its bias
        is downward and shrinks as more points are kept: on finished MNIST MLPs at n = 1,000
        and 3,000,
        λ from 1e-4 to 1e-1, the gap was 4.2 % below to 5.3 % above the exact one with 300
        points kept, 5–12 % below with 100, 15–67 % below with 30 (where 'cavity' erred
        upward: on the same points the two bracketed the exact value on every such net,
        a measured property, not a bound); at n = 60,000 on a small CNN (p = 9,098, exact in
        parameter space) the default's gap was 2.4 % below the exact one, 31 % below with
        100 points; on an MLP 784-512-10, where no exact reference runs, it rose with the
        points kept (0.034, 0.053, 0.064 and 0.066 with 100, 300, 600 and 1,000), so there
        the default's is likely about 20 % below the exact one. On a narrow finished MLP
        784-8-10 (n = 5,000, fewer parameters than nK) it was 26 % *above* the exact gap
        with 300 points, 3.7 % with 600 (its per-point values ranked as the exact ones): the
        direction of its error depends on the net, and ``stderr_`` does not cover it.
        Its memory grows as ``n_points``², flat in n; its time as ``n_points``² times the
        curvature samples it uses: ``softrank.memory.LOO_NYSTROM_SAMPLES_PER_POINT`` (10) per
        point kept, its points and random others, where that is at most half of them, so that
        the time does not grow with n (at n = 60,000, CPU: 9.0 training epochs on that MLP,
        13.0 on the CNN, against 149 on the MLP with all 60,000 samples). Such a
        subsample biases the gap upward (300 points on 10,000, 6,000 and 3,000 of the 60,000
        samples: +10 %, +21 %, +40 %), which a jackknife over five groups of the samples
        corrects (then −3.3 %, −0.1 %, +3.3 % of the gap with all samples, within one
        standard error; ``result_.diagnostics['jackknife']``), its variance part of
        ``stderr_``. Over 56 MNIST and Fashion-MNIST MLPs (100 points kept, n = 300 and
        1,200) its gap was 0.82–1.12× the exact one, within about one of its standard errors.
        'cavity': ``n_points`` random points kept exactly, the other points through EKFAC
        shrunk by their own leverage (a self-consistent scalar s in
        ``result_.diagnostics['rest_shrinkage']``, with ``'rest_shrinkage_stderr'`` and
        ``'rest_shrinkage_iterations'``: the inverse of a sum of per-point terms is not the
        inverse of their mean), and each point's leave-one-out step from its cavity
        :math:`J_i(\tilde H - J_i^\top A_iJ_i)^{-1}J_i^\top`, positive semi-definite by
        construction (no invalid points), memory flat in n. Every curvature sample also gets
        that step with all the other points through the shrunk EKFAC (one more pass over the
        data, no kernel): a control variate, and ``gap_`` is the regression estimate on it
        (``result_.diagnostics['control_variate']``; the plain mean over the kept points in
        ``'sample_mean_gap'``), with ``stderr_`` over the points — small, since the control
        variate follows the kept points closely (correlation 0.99–1.00 on MNIST MLPs) — that
        does not cover the approximation's bias, upward and larger as fewer points are kept:
        on finished MNIST MLPs at n = 1,000 and 3,000, λ from 1e-4 to 1e-1, the gap was
        9–15 % above the exact one with a third of the points kept (the default 1,000 points
        at n = 3,000), 17–45 % above with 10 % kept and 22–55 % above with 3.3 %; over 56
        MNIST and Fashion-MNIST MLPs with 100 points kept, 0.98–1.75× the exact gap at
        n = 1,200, 8 % kept, largest at small λ; the summary states it. Its time: EKFAC's two
        passes and the control variate's one over the curvature samples
        (``n_curvature_samples`` shortens them: the EKFAC of the other points is a mean, so a
        subsample changes the gap little, and the control variate's sampling error is added
        to ``stderr_``) and a few kernels and Cholesky factorizations of size
        ``n_points``·(K−1) (time ∝ n_points²); at n = 60,000 on an MLP 784-512-10 (CPU), 55
        training epochs with the defaults and 7.9 with ``n_points=300,
        n_curvature_samples=10000`` (the gap 2.2 % from that with all n, on the same points;
        stderr 4 % of the gap).
        'kfac': P_i from the Kronecker factors, any n; it fails on wide or memorizing nets,
        where KFAC spreads a point's own curvature over the layer and many points get
        max eig :math:`A_iP_i \ge 1` (invalid steps: counted and warned about).
        'subsample': ``n_points`` random points, P_i by conjugate gradients
        (KFAC-preconditioned) against the full-data Fisher, with ``stderr_``; a rigorous
        bound on each block's solver error gives a first-order bound on the gap's
        (``result_.diagnostics['solver_error_bound']``, loss units), and ``stderr_`` is NaN,
        with a warning, only when that bound exceeds a tenth of it.
    n_points : int or None, default=None
        Points for 'nystrom' (default ``softrank.memory.LOO_NYSTROM_POINTS`` = 300),
        'cavity' (default ``softrank.memory.LOO_CAVITY_POINTS`` = 1000) and 'subsample'
        (default: all); ignored by 'exact' and 'kfac', which measure every point.
        A standard error needs at least two. A value above the curvature samples is clipped to
        them, so that one setting serves cross-validation folds of any size; 'cavity' keeping every
        curvature sample is the exact computation on them (``len(loo_indices_)`` tells how
        many were kept); 'nystrom' refuses that when the curvature samples are a subsample
        (``n_curvature_samples``): no sample would be left to stand for the other points.
    memory_budget : int, str or None, default=None
        As for the other estimators, checked against
        :func:`softrank.memory.estimate_loo_memory` of ``method`` ('exact': a Cholesky of size
        n(K−1), quadratic in n, or where p < nK the p × p Gauss–Newton Hessian, flat in n;
        'nystrom' and 'cavity': the same on their points plus the
        EKFAC factors, flat in n; 'kfac': the Kronecker factors and at most
        ``softrank.memory.KFAC_CACHE_BYTES`` of cached layer records; 'subsample': the
        Jacobians of the ``n_points`` points and the CG vectors).

    Attributes
    ----------
    measure_ : float
        The estimated test loss (loss units, e.g. nats per sample).
    soft_rank_ : float
        :math:`\mathrm{rank}_\Lambda(F)`, from the same blocks (dimensionless). For 'cavity'
        and 'subsample' a mean over the measured points, with its standard error in
        ``result_.diagnostics['soft_rank_stderr']``.
    tic_gap_ : float
        The first-order term (the Fisher TIC gap estimate, loss units). For 'cavity' and
        'subsample' a mean over the measured points, with its standard error in
        ``result_.diagnostics['first_order_gap_stderr']``.
    loo_losses_ : ndarray of shape (n_points,)
        Each measured point's leave-one-out loss: a memorization score.
    loo_indices_ : ndarray of shape (n_points,)
        Which points, as indices into the fit data.

    See Also
    --------
    softrank.approx_loo : the same computation on a :class:`softrank.ModelData`.
    SoftRankFIM : the soft-rank estimate.

    References
    ----------
    .. [1] Rad & Maleki (2020). "A scalable estimate of the out-of-sample prediction error via
       approximate leave-one-out cross-validation." JRSS B 82(4).
    .. [2] Shoham, Mor-Yosef & Avron (2025). "Flatness After All?"
    .. [3] Snelson & Ghahramani (2006). "Sparse Gaussian processes using pseudo-inputs."
       NeurIPS.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skorch import NeuralNetClassifier
    >>> from softrank.datasets import load_digits_split
    >>> data = load_digits_split()  # 8x8 digits, float32 pixels in [0, 1]
    >>> X, y = data.X_train[:200], data.y_train[:200]
    >>> _ = torch.manual_seed(0)
    >>> net = NeuralNetClassifier(
    ...     nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)),
    ...     criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam, lr=0.01,
    ...     optimizer__weight_decay=1e-3, max_epochs=20, train_split=None, verbose=0)
    >>> from softrank import ApproxLOO
    >>> est = ApproxLOO(net, method="exact").fit(X, y)
    >>> est.loo_losses_.shape
    (200,)
    >>> est.measure_ > est.train_loss_
    True
    """

    _requires_fisher = False  # a GGN Newton step works for any twice-differentiable criterion

    def __init__(self, estimator, *, lam="auto", method="auto", n_points=None,
                 n_curvature_samples=None, batch_size=256, random_state=None, device=None,
                 params=None, prefit="auto", memory_budget=None, finish=False,
                 verbose=False):
        self.estimator = estimator
        self.lam = lam
        self.method = method
        self.n_points = n_points
        self.n_curvature_samples = n_curvature_samples
        self.batch_size = batch_size
        self.random_state = random_state
        self.device = device
        self.params = params
        self.prefit = prefit
        self.memory_budget = memory_budget
        self.finish = finish
        self.verbose = verbose

    def _check_params(self):
        super()._check_params()
        if self.method not in LOO_METHODS:
            raise ValueError(f"method must be one of {LOO_METHODS}; got {self.method!r}")
        m = self.n_points
        if m is not None and (not isinstance(m, Integral) or isinstance(m, bool) or m < 1):
            raise ValueError(f"n_points must be a positive integer or None; got {m!r}")

    def _n_points(self, md):
        return None if self.n_points is None else min(int(self.n_points), md.n)

    def _memory_plan(self, md):
        return [(self.method, "approx_loo", {"n_points": self._n_points(md)})]

    def _measure(self, md, lam):
        res = approx_loo(md, lam, self.method, n_points=self._n_points(md),
                         random_state=self.random_state)
        self._loo = res
        diagnostics = {"stderr": res.stderr, "soft_rank": res.soft_rank,
                       "tic_gap": res.first_order_gap, "train_loss": res.train_loss,
                       **res.diagnostics}
        return MeasureResult("approx_loo", res.estimated_test_loss, res.gap, res.n,
                             res.lam, res.method, diagnostics)

    def _after_fit(self, md, X_curvature):
        res = self._loo
        del self._loo
        self.soft_rank_ = res.soft_rank
        self.tic_gap_ = res.first_order_gap
        self.loo_losses_ = res.loo_losses
        rows = getattr(self, "_curvature_rows", None)  # positions of the curvature samples in X
        self.loo_indices_ = res.indices if rows is None else rows[res.indices]
