r"""The scikit-learn face (SPEC §6): gap estimators that wrap a skorch net.

Each estimator wraps a skorch net (``NeuralNetClassifier``, ``NeuralNetBinaryClassifier``,
``NeuralNetRegressor``) or a :class:`~sklearn.pipeline.Pipeline` ending in one, fitted or not.
``fit(X, y)`` fits the net if needed (never a net that is already fitted), then measures the
curvature of its loss on (X, y) — the training data — and estimates the generalization gap

* :class:`SoftRankFIM` — ``measure_``
  :math:`\mathrm{rank}_\Lambda(F)=\mathrm{Tr}\,F(F+\Lambda)^{-1}`, ``gap_``
  :math:`\alpha\,\mathrm{rank}_\Lambda(F)/n` with :math:`\alpha=\mathrm{Tr}\,C/\mathrm{Tr}\,F`
  (``calibrated=True``: :math:`\mathrm{rank}_\Lambda(F)/n`);
* :class:`TIC` — ``measure_`` :math:`\mathrm{Tr}\,C(M+\Lambda)^{-1}`, M = F or H;
  ``gap_`` value/n;
* :class:`TraceRatio` — ``measure_`` :math:`\mathrm{Tr}\,C/\mathrm{Tr}\,F`; ``gap_`` value/n
  (Thomas et al., 2020);
* :class:`HessianNorm` — ``measure_`` Tr H, ‖H‖₂ or ‖H‖_F; no gap (a baseline).

Conventions (SPEC §2): mean loss; :math:`\Lambda` is the weight decay of the objective
:math:`\frac1n\sum_i\ell_i + \frac12\theta^\top\Lambda\theta` (``lam='auto'`` reads it from the
net's optimizer, parameter groups included); n is the number of samples the net **trained** on
(skorch's ``train_split`` holds out 20 % by default: ``n_train_`` counts what it actually used).

``score(X, y)`` is greater-is-better: the estimated test loss, negated,
:math:`-(\bar\ell(X, y) + \texttt{gap\_})`, so that ``GridSearchCV(SoftRankFIM(net), grid,
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
from .curvature import APPROXIMATIONS, GramCurvature, curvature
from .curvature.dense import DEFAULT_MAX_PARAMS
from .families import family_for
from .influence import fisher_leverage  # noqa: F401  (re-exported: per-sample leverage)
from .loo import LOO_METHODS, approx_loo
from .measures import MeasureResult, hessian_norms, soft_rank_gap, tic, trace_ratio
from .memory import (MemoryEstimate, check_loo_memory, check_memory, estimate_loo_memory,
                     estimate_memory, parse_bytes)
from .model import ModelData
from .regularization import as_lam

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


class GapEstimator(MetaEstimatorMixin, BaseEstimator):
    """Base class: wraps a skorch net, fits it if needed, measures it on (X, y).

    Parameters common to the concrete estimators
    --------------------------------------------
    estimator : skorch net or Pipeline ending in one
        Fitted or not. A fitted net is used as it is and never changed (parameters, buffers,
        train/eval mode and optimizer state stay bit-identical). Wrap it in
        :class:`sklearn.frozen.FrozenEstimator` to keep it fitted through ``clone``.
    lam : 'auto', float, dict {parameter name: float} or (p,) tensor
        :math:`\\Lambda`. 'auto': the optimizer's ``weight_decay`` (per parameter group).
    approximation : str
        Curvature representation: 'exact', 'dense', 'gram', 'diagonal', 'kfac', 'ekfac' or
        'matrix_free' (stochastic; its standard error is ``stderr_``).
    n_curvature_samples : int or None
        Estimate the curvature on this many random samples of X (n is unchanged).
    batch_size : int
        Samples per batch of the curvature passes.
    random_state : int, RandomState or None
        Seeds the curvature subsample and, when the estimator fits the net itself, torch's RNG
        during that training (the global RNG state is restored afterwards).
    device : torch device or None
        Where the measurement runs (default: the module's device).
    params : None, list of parameter names, or callable(name, parameter) -> bool
        Which parameters count (default: all that require grad), e.g. the head of a
        pretrained backbone.
    prefit : 'auto', True or False
        'auto': fit a clone of the net only if it is not fitted; True: require a fitted net
        (clear error otherwise); False: always fit a clone.
    memory_budget : int, str or None
        Bytes (an int, or a string such as '2GB' or '512MiB') the curvature representations may
        use. ``fit`` compares :mod:`softrank.memory`'s estimate of every curvature the measure
        builds with it, after training the net (if it does) and before any measuring data pass,
        and raises a :class:`MemoryError` naming the approximation, the estimate, the budget and
        the approximations that would fit. None (default): no check.
        :meth:`estimate_memory` lists the estimates in advance.
    """

    _needs_lam = True
    _requires_fisher = True

    # -- parameters ------------------------------------------------------------------------
    def _check_params(self):
        if self.prefit not in _PREFIT:
            raise ValueError(f"prefit must be 'auto', True or False; got {self.prefit!r}")
        batch_size = getattr(self, "batch_size", 256)
        if not isinstance(batch_size, Integral) or batch_size < 1:
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
        lam = getattr(self, "lam", None)
        if isinstance(lam, str) and lam != "auto":
            raise ValueError("lam must be 'auto', a positive float, a dict or a tensor; "
                             f"got {lam!r}")

    # -- tags ------------------------------------------------------------------------------
    def __sklearn_tags__(self):
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
        if self.prefit is True:
            sk.check_fitted(est)
        if sk.is_fitted(net) and self.prefit in ("auto", True):
            return est, X, y
        est = clone(est)
        pre, net = sk.split_estimator(est)
        with _seeded(self.random_state):
            if pre is None:
                net.initialize()
                X = sk.check_X(X, sk.module_dtype(net))
                y = sk.check_y(net, y, len(X), sk.module_dtype(net))
                self._check_criterion(net)
            else:
                y = sk.check_y(net, y, sk.num_samples(X))
            est.fit(X, y)
        return est, X, y

    def _check_criterion(self, net):
        if self._requires_fisher:
            family_for(net.criterion_, require_fisher=True)

    def _inputs(self, est, X, *, reset: bool):
        """(transformed X as an array in the module's dtype, net) for measuring on X."""
        pre, net = sk.split_estimator(est)
        dtype = sk.module_dtype(net)
        if pre is None:
            X = validate_data(self, X, reset=reset, dtype="numeric", allow_nd=True,
                              ensure_all_finite=True)
        else:
            validate_data(self, X, reset=reset, skip_check_array=True)
            X = pre.transform(X)
        return sk.check_X(X, dtype), net

    def _model_data(self, net, X, y, n_train=None):
        return ModelData(net.module_, net.criterion_, X, y, params=self.params,
                         output_transform=sk.output_transform(net), batch_size=self.batch_size,
                         n_train=n_train, device=self.device)

    def _labelled(self, est, X, y, *, reset: bool):
        """(X, y, net) checked for measuring: shapes, dtypes, labels the net has seen."""
        Xt, net = self._inputs(est, X, reset=reset)
        y = sk.check_y(net, y, len(Xt), sk.module_dtype(net))
        sk.check_labels_seen(net, y)
        return Xt, y, net

    def _curvature_subset(self, X, y):
        m = self.n_curvature_samples
        if m is None or m >= len(X):
            return X, y
        idx = np.sort(check_random_state(self.random_state).choice(len(X), m, replace=False))
        return X[idx], y[idx]

    def _resolve_lam(self, net, md):
        if not self._needs_lam:
            return None
        lam = sk.weight_decay_lam(net, md.param_names) if _is_auto(self.lam) else self.lam
        as_lam(lam, md.param_names, md.sizes)  # clear error for λ ≤ 0, unknown names, shapes
        return lam

    def fit(self, X, y):
        """Fit the net if needed (see ``prefit``), then measure it on (X, y).

        Returns self, with ``measure_``, ``gap_``, ``train_loss_``, ``lam_``, ``n_train_``,
        ``approximation_``, ``result_``, ``stderr_``, ``estimator_``, ``n_features_in_`` (and
        ``classes_`` for classifiers) set."""
        self._check_params()
        self._y_1d = y is not None and np.asarray(y).ndim == 1
        est, X, y = self._fit_estimator(X, y)
        Xt, y, net = self._labelled(est, X, y, reset=True)
        self._check_criterion(net)
        n_train, source = sk.n_trained(net, Xt, y)
        full = self._model_data(net, Xt, y, n_train)
        Xc, yc = self._curvature_subset(Xt, y)
        md = full if len(Xc) == len(Xt) else self._model_data(net, Xc, yc, n_train)
        budget = getattr(self, "memory_budget", None)
        if budget is not None:  # before any data pass
            self._memory_estimates(md, budget)
        train_loss = sk.mean_loss(full)
        lam = self._resolve_lam(net, md)
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
        if sk.net_kind(net) in ("classifier", "binary"):
            self.classes_ = sk.classes_of(net, md.n_outputs)
        self._after_fit(md, Xc)
        return self

    def _measure(self, md, lam) -> MeasureResult:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- memory ----------------------------------------------------------------------------
    def _memory_plan(self, md) -> list:
        """(approximation, matrix, options) of every curvature ``_measure`` builds on ``md``;
        matrix 'approx_loo' stands for :func:`~softrank.loo.approx_loo` (approximation = its
        method). Subclasses list theirs (default: none)."""
        return []

    def _memory_estimates(self, md, budget=None) -> list:
        """The estimates of ``_memory_plan(md)``; with ``budget``, raise a MemoryError (named
        after the estimator) at the first one above it."""
        out = []
        for approx, matrix, opts in self._memory_plan(md):
            loo = matrix == "approx_loo"
            try:
                if budget is None:
                    est = (estimate_loo_memory(md, approx, **opts) if loo else
                           estimate_memory(md, approx, matrix, **opts))
                else:
                    est = (check_loo_memory(md, approx, budget, **opts) if loo else
                           check_memory(md, approx, matrix, budget, **opts))
            except MemoryError as e:
                name = type(self).__name__
                raise MemoryError(str(e) if str(e).startswith(name) else f"{name}: {e}") from None
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
    def loss(self, X, y) -> float:
        """Mean loss of the fitted net on (X, y), in evaluation mode, with its criterion."""
        check_is_fitted(self)
        Xt, y, net = self._labelled(self.estimator_, X, y, reset=False)
        return sk.mean_loss(self._model_data(net, Xt, y))

    def score(self, X, y) -> float:
        """Estimated test loss, negated (greater is better):
        :math:`-(\\bar\\ell(X, y) + \\text{gap\\_})`.

        On the training data (``InSampleSplit``) this is ``-(train_loss_ + gap_)``."""
        loss = self.loss(X, y)
        if self.gap_ is None:  # pragma: no cover - HessianNorm overrides score
            raise ValueError(f"{type(self).__name__} has no gap estimate")
        return -(loss + self.gap_)

    def _delegate(self, method, X):
        check_is_fitted(self)
        pre, net = sk.split_estimator(self.estimator_)
        if pre is None:
            X = validate_data(self, X, reset=False, dtype="numeric", allow_nd=True,
                              ensure_all_finite=True)
            X = sk.check_X(X, sk.module_dtype(net))
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


def _is_auto(lam) -> bool:
    return isinstance(lam, str) and lam == "auto"


class SoftRankFIM(TransformerMixin, GapEstimator):
    r"""Soft rank of the Fisher :math:`\mathrm{rank}_\Lambda(F) = \mathrm{Tr}\,F(F+\Lambda)^{-1}`
    and the soft-rank gap estimate (Shoham, Mor-Yosef & Avron, 2025):

    .. math:: \widehat{\mathrm{gap}} = \frac{\mathrm{Tr}\,C}{\mathrm{Tr}\,F}\,
              \frac{\mathrm{rank}_\Lambda(F)}{n}
              \quad(\texttt{calibrated=True}:\ \mathrm{rank}_\Lambda(F)/n).

    ``measure_`` is the soft rank, ``gap_`` the gap estimate; ``result_.diagnostics`` holds
    :math:`\alpha`, Tr C, Tr F and the calibrated gap. ``transform(X)`` returns per-sample
    leverage scores :math:`\mathrm{Tr}\,F_i(F+\Lambda)^{-1}/n_{\mathrm{fit}}` (one column; they
    need no labels), which sum over the fit data to ``measure_`` for the exact representations
    (exactly without ``n_curvature_samples``, in expectation with it); with an approximation
    :math:`\tilde F` (kfac, ekfac, diagonal) they are :math:`\mathrm{Tr}\,F_i(\tilde F+\Lambda)^{-1}`
    and sum to :math:`\mathrm{Tr}\,F(\tilde F+\Lambda)^{-1}`, close to but not equal to
    :math:`\mathrm{rank}_\Lambda(\tilde F)`. Needs a criterion of the family table (SPEC §3).
    See :class:`GapEstimator` for the common parameters.
    """

    def __init__(self, estimator, *, lam="auto", approximation="exact", calibrated=False,
                 n_curvature_samples=None, batch_size=256, random_state=None, device=None,
                 params=None, prefit="auto", memory_budget=None):
        self.estimator = estimator
        self.lam = lam
        self.approximation = approximation
        self.calibrated = calibrated
        self.n_curvature_samples = n_curvature_samples
        self.batch_size = batch_size
        self.random_state = random_state
        self.device = device
        self.params = params
        self.prefit = prefit
        self.memory_budget = memory_budget

    def _memory_plan(self, md):
        # F, then the exact traces of C and F (diagonals) of the trace ratio α
        return [(self.approximation, "fisher", {}), ("diagonal", "gsm", {}),
                ("diagonal", "fisher", {})]

    def _measure(self, md, lam):
        F = curvature(md, "fisher", self.approximation, random_state=self.random_state)
        self._fisher = F
        return soft_rank_gap(md, lam, self.approximation, F=F)

    def _gap(self, result):
        if self.calibrated:
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
    return a.shape == b.shape and np.array_equal(a, b)


class TIC(GapEstimator):
    r"""Regularized Takeuchi Information Criterion :math:`\mathrm{Tr}\,C(M+\Lambda)^{-1}`,
    M = F (``variant='fisher'``, needs a criterion of the family table) or the Hessian H
    (``variant='hessian'``, any criterion; dense, small p; warns when H + Λ is not positive
    definite). ``gap_`` = ``measure_`` / n. See :class:`GapEstimator` for the other parameters.
    """

    def __init__(self, estimator, *, lam="auto", approximation="exact", variant="fisher",
                 n_curvature_samples=None, batch_size=256, random_state=None, device=None,
                 params=None, prefit="auto", memory_budget=None):
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


class TraceRatio(GapEstimator):
    r"""Trace ratio :math:`\alpha = \mathrm{Tr}\,C/\mathrm{Tr}\,F` (exact traces) and the gap
    estimate :math:`\alpha/n` of Thomas et al. (2020) — it lacks the soft-rank factor and so
    underestimates the gap. α > 1: over-confident, α < 1: under-confident. Needs a criterion of
    the family table; no λ. See :class:`GapEstimator` for the other parameters."""

    _needs_lam = False

    def __init__(self, estimator, *, n_curvature_samples=None, batch_size=256, random_state=None,
                 device=None, params=None, prefit="auto", memory_budget=None):
        self.estimator = estimator
        self.n_curvature_samples = n_curvature_samples
        self.batch_size = batch_size
        self.random_state = random_state
        self.device = device
        self.params = params
        self.prefit = prefit
        self.memory_budget = memory_budget

    def _memory_plan(self, md):
        return [("diagonal", "gsm", {}), ("diagonal", "fisher", {})]

    def _measure(self, md, lam):
        return trace_ratio(md)


class HessianNorm(GapEstimator):
    r"""Hessian norm baselines: :math:`\mathrm{Tr}\,H` (``ord='trace'``), :math:`\|H\|_2`
    (``'spectral'``, the largest eigenvalue) or :math:`\|H\|_F` (``'frobenius'``) of the mean
    training loss. ``approximation='exact'`` builds the dense Hessian (small p; subsample with
    ``n_curvature_samples``); a matrix-free approximation of the core, where available, is
    passed on with ``random_state`` and reports ``stderr_``.

    There is no gap estimate (``gap_`` is None: a norm is not in loss units, and it changes
    under reparametrizations that leave the function unchanged). ``score`` returns
    ``-measure_`` (greater is better = flatter), whatever X and y are, so GridSearchCV picks
    the flattest model by this baseline. Works for any twice-differentiable criterion."""

    _needs_lam = False
    _requires_fisher = False

    def __init__(self, estimator, *, ord="trace", approximation="exact",
                 n_curvature_samples=None, batch_size=256, random_state=None, device=None,
                 params=None, prefit="auto", memory_budget=None):
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

    def _check_params(self):
        super()._check_params()
        if self.ord not in ("trace", "spectral", "frobenius"):
            raise ValueError(f"ord must be 'trace', 'spectral' or 'frobenius'; got {self.ord!r}")

    def _memory_plan(self, md):
        dense = self.approximation in ("exact", "dense")
        return [("dense" if dense else self.approximation, "hessian", {})]

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


class ApproxLOO(GapEstimator):
    r"""Approximate leave-one-out estimate of the test loss (SPEC §4a): for each training point
    one Newton step of the objective without it, in output space,

    .. math:: z_i^{(-i)} = z_i + P_i (I - A_i P_i)^{-1} r_i,\qquad
              P_i = J_i\,\big(n(F+\Lambda)\big)^{-1} J_i^\top,

    ``measure_`` = the estimated test loss :math:`\frac1n\sum_i\ell(y_i, z_i^{(-i)})`,
    ``gap_`` = ``measure_`` − ``train_loss_``. Its first-order term is the Fisher TIC and
    :math:`\sum_i\mathrm{tr}(A_iP_i) = \mathrm{rank}_\Lambda(F)`; unlike them it keeps the factor
    :math:`(I - A_iP_i)^{-1}`, which stays large on memorized points, so it keeps working on
    over-confident, interpolating nets where every C-based estimate collapses.

    Parameters (besides those of :class:`GapEstimator`)
    ---------------------------------------------------
    method : 'auto', 'exact', 'cavity', 'kfac' or 'subsample'
        'auto' (default): 'exact' while its memory (a Cholesky of size n(K−1)) stays below
        ``softrank.memory.LOO_AUTO_EXACT_BYTES`` (2 GiB), 'cavity' above.
        'exact': Woodbury on the empirical NTK, one Cholesky of size n(K−1) (moderate n·K).
        'cavity': ``n_points`` random points kept exactly, the other points through EKFAC, and
        each point's leave-one-out step from its cavity
        :math:`J_i(\tilde H - J_i^\top A_iJ_i)^{-1}J_i^\top`, positive semi-definite by
        construction (no invalid points), memory flat in n, with ``stderr_`` over the points
        (it does not cover EKFAC's bias, which tends to underestimate the gap at small λ).
        'kfac': P_i from the Kronecker factors, any n; it fails on wide or memorizing nets,
        where KFAC spreads a point's own curvature over the layer and many points get
        max eig :math:`A_iP_i \ge 1` (invalid steps: counted and warned about).
        'subsample': ``n_points`` random points, P_i by conjugate gradients
        (KFAC-preconditioned) against the full-data Fisher, with ``stderr_`` (NaN, with a
        warning, when conjugate gradients did not converge).
    n_points : int or None
        Points for 'cavity' (default ``softrank.memory.LOO_CAVITY_POINTS`` = 1000, at most n)
        and 'subsample' (default: all).
    memory_budget : int, str or None
        As for :class:`GapEstimator`, checked against
        :func:`softrank.memory.estimate_loo_memory` of ``method`` ('exact': a Cholesky of size
        n(K−1), quadratic in n; 'cavity': the same on its points plus the EKFAC factors, flat
        in n; 'kfac': the Kronecker factors and at most ``softrank.memory.KFAC_CACHE_BYTES`` of
        cached layer records; 'subsample': the Jacobians of the ``n_points`` points and the CG
        vectors).

    Fitted diagnostics: ``soft_rank_`` (:math:`\mathrm{rank}_\Lambda(F)`), ``tic_gap_`` (the
    first-order term), ``loo_losses_`` (each measured point's leave-one-out loss: a memorization
    score; ``loo_indices_`` says which points, in the order of the fit data).
    """

    _requires_fisher = False  # a GGN Newton step works for any twice-differentiable criterion

    def __init__(self, estimator, *, lam="auto", method="auto", n_points=None,
                 n_curvature_samples=None, batch_size=256, random_state=None, device=None,
                 params=None, prefit="auto", memory_budget=None):
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
        self.loo_indices_ = res.indices
