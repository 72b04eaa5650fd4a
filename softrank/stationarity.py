r"""Stationarity: how far a trained net is from the minimizer every estimate assumes, and
finishing it there.

Every gap estimate of softrank (soft rank, TIC, approximate leave-one-out) is a statement about

.. math:: \hat\theta = \arg\min_\theta\ \mathcal{J}(\theta),\qquad
          \mathcal{J}(\theta) = \frac1n\sum_i \ell_i(\theta) + \frac12\theta^\top\Lambda\theta,

the training objective with the criterion exactly as the net was trained (per-sample loss
:math:`\ell_i`, mean over samples) and :math:`\Lambda` its weight decay. The TIC expansion and
the leave-one-out Newton step both start from :math:`\nabla\mathcal{J}(\hat\theta) = 0`. A net
trained the usual way — shuffled minibatches, Adam or SGD, a fixed number of epochs — is not
there, and its estimates can be off by large factors. The **relative stationarity**

.. math:: r = \frac{\|\nabla_\theta\mathcal{J}(\theta)\|}{\|\Lambda\theta\|}

(the residual gradient against the regularizer's pull; 0 at the minimizer) says how far.

* :func:`relative_stationarity` — r on (X, y), one gradient pass;
* :func:`finish_training` — a finished **copy** of the net: full-batch L-BFGS with a
  strong-Wolfe line search on :math:`\mathcal{J}` from the trained θ, stopped when r ≤ ``tol``;
* :class:`NotStationaryWarning` — what the estimators warn with above
  :data:`STATIONARITY_THRESHOLD`.

Both functions work on a private float64 copy of the module in evaluation mode (dropout off,
BatchNorm on its running statistics: the objective the estimators measure), with the data
passed through the preceding steps of a Pipeline and cast as skorch would. The user's net is
never changed.

References
----------
J. Nocedal and S. J. Wright, *Numerical Optimization*, 2nd ed., Springer, 2006: L-BFGS
(section 7.2) and the strong Wolfe conditions (section 3.1).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from numbers import Integral, Real

import torch

from . import skorch_adapter as sk
from .model import InputDict, call_module, n_rows
from .regularization import as_lam

__all__ = ["relative_stationarity", "finish_training", "FinishResult", "NotStationaryWarning",
           "STATIONARITY_THRESHOLD"]

#: r above which the estimators warn (:class:`NotStationaryWarning`). Measured on MNIST MLPs
#: (784-h-10, n = 300, exact approximate leave-one-out): nets with r ≤ 0.2 gave estimates
#: 1.3–1.4× the observed gap; r = 0.47 → 1.6×, r = 1.4 → 1.8×, r = 3.4 → 7.8×, r = 52 → 54×.
STATIONARITY_THRESHOLD = 1.0

#: most objective evaluations of one strong-Wolfe line search
_MAX_LINE_SEARCH = 25

#: rows per pass of :func:`finish_training` when ``batch_size`` is None
_FINISH_BATCH = 4096


class NotStationaryWarning(UserWarning):
    """The measured net is far from the minimizer of its training objective (relative
    stationarity r above :data:`STATIONARITY_THRESHOLD`), which every gap estimate assumes.

    Raised (as a warning, pointing at the caller's line) by every estimator's ``fit``; its
    message names the two ways out: ``finish=True``, or training to convergence.

    Examples
    --------
    >>> import warnings
    >>> from softrank import NotStationaryWarning
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("error", NotStationaryWarning)  # make it an error
    ...     issubclass(NotStationaryWarning, UserWarning)
    True
    """


@dataclass(frozen=True)
class FinishResult:
    """Result of :func:`finish_training` (a frozen record; its fields are its parameters).

    Parameters
    ----------
    estimator, n_iter, n_evaluations, converged, stationarity_before, stationarity_after,
    loss_before, loss_after, objective_before, objective_after, lam, tol
        As under Attributes.

    Attributes
    ----------
    estimator : skorch net or Pipeline
        The finished copy (its optimizer state and history are those of the original, copied
        as they are: they describe the training before finishing).
    n_iter : int
        L-BFGS iterations run.
    n_evaluations : int
        Full passes over the data (objective and gradient), line-search trials included.
    converged : bool
        True when ``stationarity_after`` ≤ ``tol``.
    stationarity_before, stationarity_after : float
        Relative stationarity r of the net given and of the finished copy.
    loss_before, loss_after : float
        Mean training loss :math:`\\frac1n\\sum_i\\ell_i`.
    objective_before, objective_after : float
        :math:`\\frac1n\\sum_i\\ell_i + \\frac12\\theta^\\top\\Lambda\\theta`.
    lam : float or dict
        The :math:`\\Lambda` of the objective (as resolved from ``lam``).
    tol : float
        The tolerance on r.

    Examples
    --------
    >>> from softrank import FinishResult
    >>> r = FinishResult(None, n_iter=3, n_evaluations=4, converged=True,
    ...                  stationarity_before=12.0, stationarity_after=5e-4, loss_before=0.3,
    ...                  loss_after=0.25, objective_before=0.4, objective_after=0.31, lam=1e-3,
    ...                  tol=1e-3)
    >>> r.converged and r.stationarity_after <= r.tol
    True
    """

    estimator: object
    n_iter: int
    n_evaluations: int
    converged: bool
    stationarity_before: float
    stationarity_after: float
    loss_before: float
    loss_after: float
    objective_before: float
    objective_after: float
    lam: object
    tol: float


class _Objective:
    r""":math:`\mathcal{J}(\theta) = \frac1n\sum_i\ell_i + \frac12\theta^\top\Lambda\theta` of a
    fitted net on (X, y), on a private float64 evaluation copy of its module."""

    def __init__(self, estimator, X, y, lam, params, batch_size, device):
        md, net = sk.model_data(estimator, X, y, params=params, batch_size=batch_size,
                                device=device)
        md.require_labels("the stationarity of the training objective")
        self.names = md.param_names
        self.lam = sk.weight_decay_lam(net, self.names, md) if _is_auto(lam) else lam
        L = as_lam(self.lam, self.names, md.sizes)
        self.family = md.family
        transform = md.output_transform
        if transform is sk.log_probabilities:  # the ε of the dtype it was trained in
            eps = torch.finfo(md.dtype).eps
            transform = lambda p: torch.log(p + eps)  # noqa: E731
        self.transform = transform
        self.criterion = copy.deepcopy(md.criterion).double()
        if hasattr(self.criterion, "reduction"):
            self.criterion.reduction = "none"
        self.module = md.net.double()  # md's private copy, already in evaluation mode
        named = dict(self.module.named_parameters())
        self.params = [named[n] for n in self.names]
        self.device = md.device
        self.lam_vector = L.vector.to(self.device)
        self.center = None if L.center is None else L.center.to(self.device)
        self.X, self.y, self.n = md.X, md.y, md.n
        self.batch_size = md.batch_size
        self.n_evaluations = 0

    def theta(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def set_theta(self, theta: torch.Tensor) -> None:
        with torch.no_grad():
            for p, t in zip(self.params, theta.split([p.numel() for p in self.params])):
                p.copy_(t.view_as(p))

    def evaluate(self):
        """(objective, mean loss, ∇objective (p,) float64) at the current θ; one data pass,
        batch gradients accumulated in float64."""
        for p in self.params:
            p.grad = None
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for start in range(0, self.n, self.batch_size):
            xb = _as_float64(self.X[start:start + self.batch_size].to(self.device))
            out = call_module(self.module, xb)
            if isinstance(out, (tuple, list)):
                out = out[0]
            if self.transform is not None:
                out = self.transform(out)
            z = out.reshape(n_rows(xb), -1)
            target = self.family.prepare_target(
                self.y[start:start + self.batch_size].to(self.device), z)
            if target.is_floating_point():
                target = target.double()
            batch_loss = self.criterion(z, target).reshape(len(z), -1).mean(1).sum()
            batch_loss.backward()
            total += batch_loss.detach()
        self.n_evaluations += 1
        theta = self.theta()
        if self.center is not None:
            theta = theta - self.center
        pull = self.lam_vector * theta
        grad = torch.cat([torch.zeros(p.numel(), dtype=torch.float64, device=self.device)
                          if p.grad is None else p.grad.reshape(-1) for p in self.params])
        grad = grad / self.n + pull
        loss = float(total) / self.n
        objective = loss + 0.5 * float(theta @ pull)
        return objective, loss, grad, _ratio(float(grad.norm()), float(pull.norm()))


def _as_float64(xb):
    """Floating inputs in float64 (integer ones, e.g. token ids, as they are); a dict of
    inputs member by member."""
    if isinstance(xb, dict):
        return InputDict({k: _as_float64(v) for k, v in xb.items()})
    return xb.double() if xb.is_floating_point() else xb


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("inf")


def _is_auto(lam) -> bool:
    return isinstance(lam, str) and lam == "auto"


def relative_stationarity(estimator, X, y, *, lam="auto", params=None, batch_size=256,
                          device=None) -> float:
    r"""Relative stationarity of a fitted net on (X, y):

    .. math:: r = \frac{\big\|\nabla_\theta\big(\frac1n\sum_i\ell_i +
              \frac12\theta^\top\Lambda\theta\big)\big\|}{\|\Lambda\theta\|},

    0 at the minimizer of the training objective, which every gap estimate assumes. It
    compares the residual gradient with the regularizer's pull: r ≪ 1 is close to the
    minimizer; r ≳ 1 (:data:`STATIONARITY_THRESHOLD`) is not, and the estimates of that net can
    be off by large factors.

    Parameters
    ----------
    estimator : skorch net or Pipeline ending in one
        Fitted; never changed.
    X : array-like, shape (n, ...)
        The training data (passed through the Pipeline's preceding steps).
    y : array-like, shape (n,) or (n, d)
        Targets.
    lam : 'auto', float, dict {parameter name: float} or (p,) tensor
        :math:`\Lambda`; 'auto' reads the optimizer's ``weight_decay`` (per parameter group).
    params : None, list of parameter names, or callable(name, parameter) -> bool
        Which parameters count (default: all that require grad); the others are held fixed.
    batch_size : int
        Rows per pass (the result does not depend on it).
    device : torch device or None
        Where the pass runs (default: the module's device).

    Returns
    -------
    float
        r (dimensionless; ``inf`` when :math:`\Lambda\theta = 0`). One forward and backward
        pass in float64 on a private copy of the module, in evaluation mode.

    Raises
    ------
    ValueError
        No weight decay with ``lam='auto'``, λ ≤ 0, y missing, bad data.
    sklearn.exceptions.NotFittedError
        The net is not fitted.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetClassifier
    >>> X = np.random.RandomState(0).randn(64, 4).astype(np.float32)
    >>> y = (X[:, 0] > 0).astype(np.int64)
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = NeuralNetClassifier(torch.nn.Linear, module__in_features=4, module__out_features=2,
    ...                           criterion=torch.nn.CrossEntropyLoss, max_epochs=1,
    ...                           optimizer__weight_decay=1e-2, train_split=None, verbose=0)
    >>> from softrank import relative_stationarity
    >>> r = relative_stationarity(net.fit(X, y), X, y)
    >>> r > 1  # one epoch of SGD: far from the minimizer
    True
    """
    objective = _Objective(estimator, X, y, lam, params, batch_size, device)
    return objective.evaluate()[3]


def _check_finish_options(tol, max_iter, history_size, batch_size):
    if isinstance(tol, bool) or not isinstance(tol, Real) or not tol > 0:
        raise ValueError(f"tol must be a positive number (a bound on r); got {tol!r}")
    for name, value in (("max_iter", max_iter), ("history_size", history_size)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or
                                   not isinstance(batch_size, Integral) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None; got {batch_size!r}")


def finish_training(estimator, X, y, *, lam="auto", tol=1e-3, max_iter=500, history_size=20,
                    batch_size=None, params=None, device=None) -> FinishResult:
    r"""A copy of a fitted net, trained on to the minimizer of its regularized objective.

    Minimizes

    .. math:: \mathcal{J}(\theta) = \frac1n\sum_i\ell_i(\theta) + \frac12\theta^\top\Lambda\theta

    — the criterion exactly as the net was trained, mean over the samples of (X, y),
    :math:`\Lambda` as the estimators read it — from the trained θ, by full-batch L-BFGS with a
    strong-Wolfe line search (``torch.optim.LBFGS``), in float64 on a private copy of the
    module in evaluation mode, until the relative stationarity
    :math:`r = \|\nabla\mathcal{J}\|/\|\Lambda\theta\|` is at most ``tol`` or ``max_iter``
    iterations have run. The parameters are then written (in the module's dtype) into a deep
    copy of ``estimator``; ``r`` after finishing is measured on that copy.

    This is the net every gap estimate describes. It is *not* the net as trained: finishing
    erases what early stopping, a learning-rate schedule or minibatch noise did beyond
    :math:`\Lambda`, and changes the net's own test loss. Finish when the estimate serves to
    choose :math:`\Lambda` or an architecture; do not expect it to describe a net you keep
    unfinished.

    Parameters
    ----------
    estimator : skorch net or Pipeline ending in one
        Fitted. Never changed (parameters, buffers, modes, hooks, optimizer state).
    X : array-like, shape (n, ...)
        The training data.
    y : array-like, shape (n,) or (n, d)
        Targets.
    lam : 'auto', float, dict {parameter name: float} or (p,) tensor
        :math:`\Lambda` ('auto': the optimizer's ``weight_decay``, parameter groups included).
    tol : float
        Stop when r ≤ tol.
    max_iter : int
        Most L-BFGS iterations (each one pass over the data, plus the line search's extra
        passes when the unit step is rejected).
    history_size : int
        Pairs of vectors L-BFGS keeps (memory: 2 · history_size · p float64 numbers).
    batch_size : int or None
        Rows per forward/backward pass; the gradient of the full objective is accumulated over
        the passes (in float64), so the result does not depend on it. None: 4096.
    params : None, list of parameter names, or callable(name, parameter) -> bool
        Which parameters are optimized (default: all that require grad); the others are held
        fixed and not regularized.
    device : torch device or None
        Where the optimization runs (default: the module's device).

    Returns
    -------
    FinishResult
        ``.estimator`` (the finished copy), ``.n_iter``, ``.converged``,
        ``.stationarity_before``/``_after``, ``.loss_before``/``_after``,
        ``.objective_before``/``_after``.

    Raises
    ------
    ValueError
        Bad options, no weight decay with ``lam='auto'``, λ ≤ 0, bad data.
    sklearn.exceptions.NotFittedError
        The net is not fitted.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetClassifier
    >>> X = np.random.RandomState(0).randn(64, 4).astype(np.float32)
    >>> y = (X[:, 0] > 0).astype(np.int64)
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = NeuralNetClassifier(torch.nn.Linear, module__in_features=4, module__out_features=2,
    ...                           criterion=torch.nn.CrossEntropyLoss, max_epochs=1,
    ...                           optimizer__weight_decay=1e-2, train_split=None, verbose=0)
    >>> from softrank import finish_training
    >>> result = finish_training(net.fit(X, y), X, y)
    >>> result.converged, result.stationarity_after <= 1e-3
    (True, True)
    >>> result.objective_after < result.objective_before
    True
    """
    _check_finish_options(tol, max_iter, history_size, batch_size)
    objective = _Objective(estimator, X, y, lam, params,
                           _FINISH_BATCH if batch_size is None else batch_size, device)
    obj0, loss0, _, r0 = objective.evaluate()
    r, n_iter = r0, 0
    if r0 > tol:
        n_iter = _lbfgs(objective, tol, max_iter, history_size)

    finished = copy.deepcopy(estimator)
    _, net = sk.split_estimator(finished)
    named = dict(net.module_.named_parameters())
    with torch.no_grad():
        for name, p in zip(objective.names, objective.params):
            target = named[name]
            target.copy_(p.to(target.dtype))
            p.copy_(target)  # evaluate r at the parameters as stored (module dtype)
    obj1, loss1, _, r = objective.evaluate()
    return FinishResult(finished, n_iter, objective.n_evaluations, bool(r <= tol), r0, r,
                        loss0, loss1, obj0, obj1, objective.lam, float(tol))


def _lbfgs(objective: _Objective, tol: float, max_iter: int, history_size: int) -> int:
    """Run L-BFGS (strong Wolfe) on ``objective`` in place; the number of iterations."""
    opt = torch.optim.LBFGS(objective.params, lr=1.0, max_iter=1, history_size=history_size,
                            max_eval=1 + _MAX_LINE_SEARCH, tolerance_grad=0.0, tolerance_change=0.0,
                            line_search_fn="strong_wolfe")
    cache: dict = {}

    def closure():
        theta = objective.theta()
        if cache and torch.equal(theta, cache["theta"]):
            grad = cache["grad"]
        else:
            obj, _, grad, r = objective.evaluate()
            cache.update(theta=theta, grad=grad, objective=obj, r=r)
        for p, g in zip(objective.params, grad.split([p.numel() for p in objective.params])):
            p.grad = g.view_as(p).clone()
        return torch.tensor(cache["objective"], dtype=torch.float64)

    closure()
    restarted = False
    for it in range(1, max_iter + 1):
        before = cache["theta"]
        opt.step(closure)
        closure()  # r at the accepted point (reused by the next step)
        if cache["r"] <= tol:
            return it
        if torch.equal(before, cache["theta"]):  # no decrease along the L-BFGS direction
            if restarted:
                return it  # nor along -∇: the round-off floor of the objective's values
            opt.state.clear()  # restart from steepest descent, forgetting the curvature pairs
            restarted = True
        else:
            restarted = False
    return max_iter
