r"""Effective regularization of a net as trained: the :math:`\Lambda` that its training budget
imposed, beyond its weight decay.

Every gap estimate of softrank assumes the net minimizes
:math:`\frac1n\sum_i\ell_i + \frac12\theta^\top\Lambda\theta`. A net trained for a fixed number
of epochs stops before that minimizer; what kept it small was the training budget as much as
:math:`\Lambda`. Early-stopped (preconditioned) gradient descent on a quadratic behaves like ridge
regression toward its starting point θ₀, with a penalty that grows as the budget shrinks. The
net as trained is then modelled as the minimizer of

.. math:: \mathcal{J}_{\mathrm{eff}}(\theta) = \frac1n\sum_i\ell_i(\theta)
          + \frac12\theta^\top\Lambda\theta
          + \frac12(\theta-\theta_0)^\top\Lambda_{\mathrm{es}}(\theta-\theta_0),

whose curvature term is :math:`\Lambda_{\mathrm{eff}} = \Lambda + \Lambda_{\mathrm{es}}`. Two
estimates of :math:`\Lambda_{\mathrm{es}}`:

* ``method='optimizer'`` — from the optimizer's own state. Adam after T steps at learning rate
  η with bias-corrected second moment :math:`\hat v`: :math:`\Lambda_{\mathrm{es}} =
  (\sqrt{\hat v}+\epsilon)/(\eta T)`, per element (preconditioned gradient descent stopped
  after T steps ≈ ridge with the inverse preconditioner over ηT). SGD with momentum μ:
  :math:`(1-\mu)/(\eta T)`.
* ``method='balance'`` — from stationarity of :math:`\mathcal{J}_{\mathrm{eff}}`: the
  :math:`\Lambda_{\mathrm{es}}` (a scalar or one value per layer) that best cancels
  the residual gradient, :math:`\lambda_{\mathrm{es}} = -\langle\nabla\mathcal{J},
  \theta-\theta_0\rangle/\|\theta-\theta_0\|^2` (least squares, clipped at 0). Needs θ₀:
  record it with the :class:`InitialParameters` callback or pass ``theta0``.

The result, an :class:`EffectiveLam`, is accepted as ``lam`` by every estimator (and
``lam='effective'`` computes it inside ``fit`` with the defaults, which works in
``GridSearchCV``). It is a model of the training run, not an exact property of the net; how far
the as-trained estimates it gives can be trusted is measured in the documentation's page on
stationarity: on 20 MNIST and Fashion-MNIST MLPs the default put the exact approximate
leave-one-out estimate within 2× of the observed gap on 14 (median 1.2×; the weight decay alone:
14×), but 3.6–9× on nets trained for 5 epochs, and it does not rank nets (Kendall τ 0.20).
To choose among models, see the documentation's selection guide.

References
----------
A. Ali, J. Z. Kolter and R. J. Tibshirani, "A continuous-time view of early stopping for least
squares regression", AISTATS 2019 (early-stopped gradient descent ≈ ridge with penalty 1/(ηT)).
J. Bae, N. Ng, A. Lo, M. Ghassemi and R. Grosse, "If influence functions are the answer, then
what is the question?", NeurIPS 2022 (influence at non-converged parameters as a damped,
proximal response).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from skorch.callbacks import Callback

from . import skorch_adapter as sk

__all__ = ["effective_lam", "EffectiveLam", "InitialParameters"]

_METHODS = ("optimizer", "balance")
_PER = ("layer", "scalar", "element")


class InitialParameters(Callback):
    """Record the parameters a skorch net starts training from (θ₀), for
    :func:`effective_lam`'s ``method='balance'`` and for the stationarity of the effective
    objective.

    The copy is taken at the start of the first epoch after each (re-)initialization: ``fit``
    records the fresh parameters; ``partial_fit`` and ``warm_start`` keep the first record.
    The net is not changed.

    Attributes
    ----------
    theta0_ : dict {parameter name: torch.Tensor} or None
        float64 copies, on the CPU.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetClassifier
    >>> from softrank import InitialParameters
    >>> X = np.random.RandomState(0).randn(64, 4).astype(np.float32)
    >>> y = (X[:, 0] > 0).astype(np.int64)
    >>> net = NeuralNetClassifier(torch.nn.Linear, module__in_features=4, module__out_features=2,
    ...                           criterion=torch.nn.CrossEntropyLoss, max_epochs=2,
    ...                           train_split=None, verbose=0, callbacks=[InitialParameters()])
    >>> _ = net.fit(X, y)
    >>> sorted(dict(net.callbacks_)["InitialParameters"].theta0_)
    ['bias', 'weight']
    """

    def initialize(self):
        self.theta0_ = None
        return self

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        if getattr(self, "theta0_", None) is None:
            self.theta0_ = {name: p.detach().to("cpu", torch.float64).clone()
                            for name, p in net.module_.named_parameters()}


@dataclass(frozen=True, eq=False)
class EffectiveLam:
    r"""An effective :math:`\Lambda` of a net as trained (what :func:`effective_lam` returns);
    pass it as ``lam`` to any estimator, to :func:`~softrank.relative_stationarity` or to
    :func:`~softrank.finish_training`.

    Parameters
    ----------
    lam, weight_decay, center, method, per, param_names
        As under Attributes.

    Attributes
    ----------
    lam : float, dict {parameter name: float} or torch.Tensor of shape (p,)
        :math:`\Lambda_{\mathrm{eff}} = \Lambda + \Lambda_{\mathrm{es}}` in loss units per
        squared parameter unit (the weight-decay scale of the mean-loss objective): a float
        (``per='scalar'``), one value per layer given per parameter tensor (``'layer'``) or per
        element
        (``'element'``, float64).
    weight_decay : float or dict
        The :math:`\Lambda` of the weight decay alone (0 when the net had none).
    center : torch.Tensor of shape (p,) or None
        float64 :math:`c = \Lambda_{\mathrm{eff}}^{-1}\Lambda_{\mathrm{es}}\theta_0`, the point
        the effective penalty :math:`\frac12(\theta-c)^\top\Lambda_{\mathrm{eff}}(\theta-c)`
        pulls toward (up to a constant); None when θ₀ is unknown (then the penalty pulls toward
        0, and the relative stationarity measured with it is not that of the effective
        objective).
    method : {'optimizer', 'balance'}
    per : {'layer', 'scalar', 'element'}
    param_names : tuple of str
        The parameters, in order, that ``lam`` and ``center`` describe.

    Examples
    --------
    >>> from softrank import EffectiveLam
    >>> L = EffectiveLam(lam=2e-3, weight_decay=1e-4, center=None, method="optimizer",
    ...                  per="scalar", param_names=("weight", "bias"))
    >>> print(L)
    effective Λ 0.002 (optimizer, per scalar; weight decay 0.0001)
    """

    lam: object
    weight_decay: object
    center: torch.Tensor | None
    method: str
    per: str
    param_names: tuple

    def __str__(self) -> str:
        if isinstance(self.lam, float):
            value = f"{self.lam:.4g}"
        else:
            values = (np.asarray(list(self.lam.values())) if isinstance(self.lam, dict)
                      else self.lam.numpy())
            value = f"median {float(np.median(values)):.4g} (range {values.min():.3g}–" \
                    f"{values.max():.3g})"
        wd = self.weight_decay
        wd = f"{wd:.4g}" if isinstance(wd, float) else "per parameter group"
        return f"effective Λ {value} ({self.method}, per {self.per}; weight decay {wd})"


def effective_lam(estimator, X, y, *, method: str = "optimizer", per: str = "layer",
                  theta0=None, lam="auto", params=None, batch_size: int = 256,
                  device=None) -> EffectiveLam:
    r"""The effective :math:`\Lambda` of a net as trained (weight decay plus what the training
    budget imposed; see the module's description).

    Parameters
    ----------
    estimator : skorch net or Pipeline ending in one
        Fitted. Never changed.
    X : array-like, shape (n, ...)
        The training data.
    y : array-like, shape (n,) or (n, d)
        Targets.
    method : {'optimizer', 'balance'}, default='optimizer'
        'optimizer': from the optimizer's state (the Adam family — any optimizer whose state
        holds ``exp_avg_sq``: :math:`(\sqrt{\hat v}+\epsilon)/(\eta T)`; SGD:
        :math:`(1-\mu)/(\eta T)`), assuming a constant learning rate η. 'balance': from the
        residual gradient and θ − θ₀.
    per : {'layer', 'scalar', 'element'}, default='layer'
        One value per layer — the parameters of one module, e.g. a Linear layer's weight and
        bias (for ``'optimizer'`` the median of the layer's values), accepted by every
        approximation — one overall, or one per element (``'optimizer'`` only; accepted by
        ApproxLOO, every method, and the dense measures, not by the Gram or KFAC ones).
    theta0 : dict {name: array}, array of shape (p,), or None
        The parameters training started from. None: taken from an :class:`InitialParameters`
        callback of the net if it has one.
    lam : 'auto', float or dict, default='auto'
        The weight decay's :math:`\Lambda` ('auto': read from the optimizer; 0 when it has
        none).
    params : None, list of parameter names, or callable(name, parameter) -> bool
        Which parameters (default: all that require grad).
    batch_size : int
        Rows per pass (for ``'balance'``'s gradient; the result does not depend on it).
    device : torch device or None
        Where the gradient pass runs.

    Returns
    -------
    EffectiveLam
        ``.lam`` (pass the object itself as ``lam``), ``.center``, ``.weight_decay``.

    Raises
    ------
    ValueError
        Unknown ``method`` or ``per``; ``per='element'`` with ``'balance'``; an optimizer
        whose state does not say its preconditioner (supported: Adam, AdamW, SGD); a net not
        trained (no optimizer steps); ``'balance'`` without θ₀; a residual gradient that does
        not pull back toward θ₀ where the net has no weight decay (no positive effective
        Λ there; with weight decay the budget's part is then 0).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skorch import NeuralNetClassifier
    >>> from softrank import effective_lam, ApproxLOO
    >>> X = np.random.RandomState(0).randn(64, 4).astype(np.float32)
    >>> y = (X[:, 0] > 0).astype(np.int64)
    >>> _ = torch.manual_seed(0)
    >>> net = NeuralNetClassifier(torch.nn.Linear, module__in_features=4, module__out_features=2,
    ...                           criterion=torch.nn.CrossEntropyLoss, optimizer=torch.optim.Adam,
    ...                           lr=1e-2, max_epochs=5, optimizer__weight_decay=1e-3,
    ...                           train_split=None, verbose=0).fit(X, y)
    >>> L = effective_lam(net, X, y)
    >>> all(v > 1e-3 for v in L.lam.values())  # the budget adds to the weight decay
    True
    >>> loo = ApproxLOO(net, lam=L, prefit=True).fit(X, y)
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got {method!r}")
    if per not in _PER:
        raise ValueError(f"per must be one of {_PER}; got {per!r}")
    sk.check_fitted(estimator, "effective_lam reads a trained net,")
    if method == "balance" and per == "element":
        raise ValueError("method='balance' fits one value per layer or one overall "
                         "(per='layer' or 'scalar'): per element it is one equation per "
                         "unknown and has no stable solution")
    md, net = sk.model_data(estimator, X, y, params=params, batch_size=batch_size,
                            device=device)
    names, sizes = list(md.param_names), list(md.sizes)
    wd = _weight_decay(net, names, md, lam)
    wd_vec = _per_element(wd, names, sizes)
    theta = torch.cat([dict(net.module_.named_parameters())[n].detach().to("cpu", torch.float64)
                       .reshape(-1) for n in names])
    theta0 = _theta0(net, theta0, names, sizes)
    if method == "optimizer":
        added = _optimizer_lam(net, names) * sk._reduction_scale(net, md)
        added = _reduce(added, names, sizes, per, np.median)
    else:
        if theta0 is None:
            raise ValueError("method='balance' needs the parameters training started from: add "
                             "softrank.InitialParameters() to the net's callbacks before "
                             "fitting, or pass theta0")
        added = _balance(estimator, X, y, wd, theta, theta0, names, sizes, per, params,
                         batch_size, device)
    total = wd_vec + added
    center = None if theta0 is None else added * theta0 / total
    return EffectiveLam(lam=_form(total, names, sizes, per), weight_decay=wd,
                        center=center, method=method, per=per, param_names=tuple(names))


# -- pieces ----------------------------------------------------------------------------------
def _weight_decay(net, names, md, lam):
    if not (isinstance(lam, str) and lam == "auto"):
        values = lam if isinstance(lam, dict) else {"lam": lam}
        for key, v in values.items():
            if isinstance(v, (bool, str)) or not np.isfinite(float(v)) or float(v) < 0:
                raise ValueError(f"lam (the weight decay's Λ) must be 'auto', a finite number "
                                 f"≥ 0 or a dict of them; got {key}={v!r}")
        if isinstance(lam, dict):
            missing = [n for n in names if n not in lam]
            if missing:
                raise ValueError(f"lam has no value for parameters {missing}")
            return {n: float(lam[n]) for n in names}
        return float(lam)
    if getattr(net, "optimizer_", None) is None:
        raise ValueError("the net has no optimizer_: effective_lam reads the training from it; "
                         "fit the net first")
    decay = sk.optimizer_weight_decay(net)
    scale = sk._reduction_scale(net, md)
    values = {n: (decay.get(n) or 0.0) * scale for n in names}
    return next(iter(values.values())) if len(set(values.values())) == 1 else values


def _per_element(value, names, sizes) -> torch.Tensor:
    if isinstance(value, dict):
        return torch.cat([torch.full((s,), float(value[n]), dtype=torch.float64)
                          for n, s in zip(names, sizes)])
    return torch.full((sum(sizes),), float(value), dtype=torch.float64)


def _theta0(net, theta0, names, sizes):
    if theta0 is None:
        for _, cb in getattr(net, "callbacks_", []):
            if isinstance(cb, InitialParameters) and getattr(cb, "theta0_", None) is not None:
                theta0 = cb.theta0_
                break
        else:
            return None
    if isinstance(theta0, dict):
        missing = [n for n in names if n not in theta0]
        if missing:
            raise ValueError(f"theta0 has no values for parameters {missing}")
        parts = [torch.as_tensor(np.asarray(theta0[n]), dtype=torch.float64).reshape(-1)
                 for n in names]
        bad = [n for n, t, s in zip(names, parts, sizes) if t.numel() != s]
        if bad:
            raise ValueError(f"theta0 has the wrong number of elements for parameters {bad}")
        return torch.cat(parts)
    t = torch.as_tensor(np.asarray(theta0), dtype=torch.float64).reshape(-1)
    if t.numel() != sum(sizes):
        raise ValueError(f"theta0 has {t.numel()} elements; the parameters have p={sum(sizes)}")
    return t


def _optimizer_lam(net, names) -> torch.Tensor:
    """(p,) Λ_es from the optimizer state, in the units of the per-step loss gradient."""
    opt = getattr(net, "optimizer_", None)
    if opt is None:
        raise ValueError("the net has no optimizer_: fit it first")
    kind = type(opt).__name__
    named = dict(net.module_.named_parameters())
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    parts = []
    for n in names:
        p = named[n]
        g, state = group_of.get(id(p)), opt.state.get(p, {})
        if g is None:
            raise ValueError(f"parameter {n!r} is not in the optimizer; exclude it with params=")
        lr = float(g["lr"])
        if "initial_lr" in g and float(g["initial_lr"]) != lr:
            warnings.warn(f"the learning rate of parameter {n!r} changed during training "
                          f"({float(g['initial_lr']):.3g} -> {lr:.3g}: a schedule); "
                          "method='optimizer' assumes a constant rate and uses the last one, so "
                          "its effective Λ is off by about the ratio of the last to the mean "
                          "rate. Use method='balance' with softrank.InitialParameters.",
                          UserWarning, stacklevel=3)
        if "betas" in g and "exp_avg_sq" not in state:
            raise ValueError(f"{kind} has taken no step for parameter {n!r} (no second moment "
                             "yet): train the net before reading its effective Λ")
        if "exp_avg_sq" in state and "betas" in g:  # Adam family
            steps = float(state["step"])
            if steps < 1:
                raise ValueError("the optimizer has taken no steps: train the net first")
            v = state["exp_avg_sq"].detach().to("cpu", torch.float64)
            v = v / (1 - g["betas"][1] ** steps)  # bias-corrected second moment
            parts.append(((v.sqrt() + g["eps"]) / (lr * steps)).reshape(-1))
        elif kind == "SGD":
            steps = _steps_taken(net)
            mu = float(g.get("momentum", 0.0))
            parts.append(torch.full((p.numel(),), (1 - mu) / (lr * steps), dtype=torch.float64))
        else:
            raise ValueError(f"method='optimizer' reads the second moment of the Adam family "
                             f"(Adam, AdamW, NAdam...) or SGD's learning rate; {kind} is neither. "
                             "Use method='balance' with softrank.InitialParameters.")
    return torch.cat(parts)


def _steps_taken(net) -> int:
    try:
        steps = sum(sum(1 for b in epoch["batches"] if "train_loss" in b)
                    for epoch in net.history)
    except (KeyError, TypeError):
        steps = 0
    if steps < 1:
        raise ValueError("the net's history records no training steps: SGD's effective Λ needs "
                         "the number of steps taken (fit the net with skorch, or use "
                         "method='balance')")
    return steps


def _layers(names, sizes) -> list[tuple[list[int], int]]:
    """[(indices of the parameters of one module, their total size)] in order of appearance;
    a layer = the parameters whose names share everything before the last dot."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n.rsplit(".", 1)[0] if "." in n else "", []).append(i)
    return [(idx, sum(sizes[i] for i in idx)) for idx in groups.values()]


def _reduce(values: torch.Tensor, names, sizes, per, how) -> torch.Tensor:
    """``values`` (p,) reduced by ``how`` over each layer (or overall), broadcast back."""
    if per == "element":
        return values
    if per == "scalar":
        return torch.full_like(values, float(how(values.numpy())))
    chunks = values.split(sizes)
    out = list(chunks)
    for idx, _ in _layers(names, sizes):
        v = float(how(torch.cat([chunks[i] for i in idx]).numpy()))
        for i in idx:
            out[i] = torch.full_like(chunks[i], v)
    return torch.cat(out)


def _balance(estimator, X, y, wd, theta, theta0, names, sizes, per, params, batch_size,
             device) -> torch.Tensor:
    from .stationarity import _Objective

    objective = _Objective(estimator, X, y, 1.0, params, batch_size, device)
    _, _, grad, _ = objective.evaluate()
    wd_vec = _per_element(wd, names, sizes)
    # ∇(mean loss) + Λθ: the gradient of the objective as trained (Λ may be 0 here)
    grad = grad.cpu() - objective.lam_vector.cpu() * theta + wd_vec * theta
    d = theta - theta0
    if per == "scalar":
        value = -float(grad @ d) / max(float(d @ d), 1e-300)
        if value <= 0 and bool((wd_vec <= 0).any()):
            raise ValueError(_NO_PULL)
        return torch.full_like(theta, max(value, 0.0))  # ≤ 0: the weight decay alone
    fallback = -float(grad @ d) / max(float(d @ d), 1e-300)
    g_chunks, d_chunks, w_chunks = grad.split(sizes), d.split(sizes), wd_vec.split(sizes)
    out = [torch.zeros_like(c) for c in g_chunks]
    for idx, _ in _layers(names, sizes):
        g = torch.cat([g_chunks[i] for i in idx])
        dd = torch.cat([d_chunks[i] for i in idx])
        value = -float(g @ dd) / float(dd @ dd) if float(dd @ dd) > 0 else 0.0
        if value <= 0 and any(float(w_chunks[i][0]) <= 0 for i in idx):
            if fallback <= 0:
                raise ValueError(_NO_PULL)
            value = fallback  # no pull back on this layer and no weight decay: the overall one
        for i in idx:
            out[i] = torch.full_like(g_chunks[i], max(value, 0.0))
    return torch.cat(out)


_NO_PULL = ("method='balance': the residual gradient does not pull the net back toward its "
            "initialization, so it implies no positive effective Λ; use method='optimizer' or "
            "finish the net (finish=True)")


def _form(total: torch.Tensor, names, sizes, per):
    if per == "scalar":
        return float(total[0])
    if per == "layer":
        chunks = total.split(sizes)
        values = {n: float(c[0]) for n, c in zip(names, chunks)}
        return values
    return total
