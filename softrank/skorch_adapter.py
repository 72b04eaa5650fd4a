r"""Reading a skorch net: what the measures need from it, without changing it.

Everything that knows about skorch lives here; :mod:`softrank.estimators` only asks

* :func:`split_estimator` — a bare net, or a :class:`~sklearn.pipeline.Pipeline` ending in one
  (the measures run on the net, with ``X`` transformed by the preceding steps);
* :func:`is_fitted` / :func:`check_fitted` — skorch's own notion (``initialized_`` and
  ``module_``), so a net restored with ``initialize()`` + ``load_params()`` counts as fitted;
* :func:`output_transform` — ``NeuralNetClassifier`` with ``NLLLoss`` trains on
  :math:`z = \log(p + \varepsilon)` of the module's probabilities (skorch's ``get_loss``);
* :func:`check_X` / :func:`check_y` — data converted as skorch would train on it: an array,
  or a dict of arrays (a :class:`skorch.helper.SliceDict`) passed to the module as keyword
  arguments; :func:`split_dataset` turns a torch ``Dataset`` of (Xi, yi) items into (X, y);
* :func:`weight_decay_lam` — :math:`\Lambda` from the optimizer's parameter groups
  (``weight_decay=wd`` on a mean loss is :math:`\Lambda = wd\cdot I`; a summed loss
  divides it by the samples per optimizer step);
* :func:`n_trained` — n, the number of samples the net actually trained on (skorch's
  ``train_split`` holds out 20 % by default);
* :func:`mean_loss` — the mean loss in evaluation mode, with the criterion exactly as trained;
* :func:`preserved_modes` — train/eval flags restored after delegating to ``net.predict``.

None of these changes the net: parameters, buffers, modes, hooks and optimizer state stay
bit-identical.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from sklearn.utils import check_array, column_or_1d
from sklearn.utils.multiclass import check_classification_targets
from torch import nn
from torch.utils.data import Dataset

try:  # skorch is a hard dependency; the guard only sharpens the error message
    from skorch import NeuralNet, NeuralNetBinaryClassifier, NeuralNetClassifier
    from skorch import NeuralNetRegressor
    from skorch.helper import SliceDict
except ImportError as e:  # pragma: no cover
    raise ImportError("softrank's scikit-learn estimators need skorch: pip install skorch") from e

__all__ = ["split_estimator", "is_fitted", "check_fitted", "net_kind", "output_transform",
           "log_probabilities", "module_dtype", "check_X", "check_y", "require_finite",
           "num_samples", "split_dataset", "is_dict_like",
           "check_labels_seen", "classes_of",
           "weight_decay_lam", "n_trained", "per_sample_loss", "mean_loss", "preserved_modes",
           "model_data", "NET_TYPES"]

NET_TYPES = "a skorch NeuralNetClassifier, NeuralNetBinaryClassifier or NeuralNetRegressor"


# -- what is wrapped -------------------------------------------------------------------------
def split_estimator(estimator):
    """(preprocessing pipeline or None, skorch net) of a net or a Pipeline ending in one."""
    if isinstance(estimator, Pipeline):
        net = estimator.steps[-1][1]
        if not isinstance(net, NeuralNet):
            raise TypeError(f"the Pipeline must end in {NET_TYPES}; its last step is "
                            f"{type(net).__name__}")
        return (estimator[:-1] if len(estimator.steps) > 1 else None), net
    if isinstance(estimator, NeuralNet):
        return None, estimator
    raise TypeError(f"estimator must be {NET_TYPES} (or a Pipeline ending in one); got "
                    f"{type(estimator).__name__}. Wrap a plain torch module in a skorch net first.")


def net_kind(net) -> str | None:
    """'classifier', 'binary', 'regressor', or None for another NeuralNet."""
    if isinstance(net, NeuralNetBinaryClassifier):
        return "binary"
    if isinstance(net, NeuralNetClassifier):
        return "classifier"
    if isinstance(net, NeuralNetRegressor):
        return "regressor"
    return None


def is_fitted(net) -> bool:
    """skorch's notion of fitted: initialized, with a ``module_``."""
    return bool(getattr(net, "initialized_", False)) and hasattr(net, "module_")


def check_fitted(estimator, what: str = "prefit=True") -> None:
    _, net = split_estimator(estimator)
    if not is_fitted(net):
        hint = (", or use prefit='auto' to let the estimator fit a clone" if "prefit" in what
                else "")
        raise NotFittedError(
            f"{what} but the wrapped {type(net).__name__} is not fitted (not initialized). Fit it "
            f"first (net.fit(X, y)){hint}.")


# -- outputs and dtypes ------------------------------------------------------------------------
def log_probabilities(p: torch.Tensor) -> torch.Tensor:
    r""":math:`z = \log(p + \varepsilon)`, what ``NeuralNetClassifier.get_loss`` feeds NLLLoss.

    Raises
    ------
    ValueError
        When ``p`` is not a batch of probability vectors (entries outside [0, 1] or rows that do
        not sum to 1), e.g. a module ending in ``LogSoftmax``: skorch takes the log of what it
        believes are probabilities, and the loss it trained on is NaN or meaningless.
    """
    _check_probabilities(p)
    return torch.log(p + torch.finfo(p.dtype).eps)


def _check_probabilities(p: torch.Tensor, tol: float = 1e-3) -> None:
    try:
        detached = p.detach()
        bad = bool(((detached < -tol) | (detached > 1 + tol)).any()
                   or ((detached.sum(-1) - 1).abs() > tol).any()) if p.ndim == 2 else False
    except RuntimeError:  # inside a torch.func transform: the eager passes check every batch
        return
    if bad:
        lo, hi = float(p.detach().min()), float(p.detach().max())
        raise ValueError(
            "NeuralNetClassifier with criterion NLLLoss takes the log of the module's output, "
            "which must therefore be probabilities, but the outputs are not probabilities "
            f"(values in [{lo:.3g}, {hi:.3g}], or rows that do not sum to 1). A module ending in "
            "LogSoftmax (or in raw logits) trains on log of a non-probability, a NaN loss. End "
            "the module in Softmax and keep NLLLoss, or return logits and use "
            "criterion=nn.CrossEntropyLoss.")


def output_transform(net):
    """The map from module output to the criterion's input z, as skorch's get_loss applies it."""
    if isinstance(net, NeuralNetClassifier) and isinstance(net.criterion_, nn.NLLLoss):
        return log_probabilities
    return None


def module_dtype(net) -> torch.dtype:
    """Floating dtype of the fitted module's parameters (torch's default when it has none)."""
    for p in net.module_.parameters():
        if p.is_floating_point() and not isinstance(p, nn.parameter.UninitializedParameter):
            return p.dtype
    return torch.get_default_dtype()


_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
              torch.bfloat16: np.float32}


# -- data ------------------------------------------------------------------------------------
def is_dict_like(X) -> bool:
    """A dict of input arrays (a plain dict or skorch's SliceDict; not a scipy DOK matrix)."""
    return isinstance(X, dict) and not hasattr(X, "tocsr")


def split_dataset(X, y=None):
    """(X, y) of a torch ``Dataset`` whose items are (Xi, yi) pairs, as skorch reads one
    (its default collation: arrays, or dicts of arrays, stacked over the items); other X and y
    are returned as they are."""
    if not isinstance(X, Dataset):
        return X, y
    name = type(X).__name__
    if y is not None:
        raise ValueError(f"X is a torch Dataset ({name}), whose items hold the targets; pass "
                         "y=None (or pass X and y as arrays)")
    try:
        n = len(X)
        items = [X[i] for i in range(n)]
    except TypeError as e:
        raise TypeError(f"X is a torch Dataset ({name}) without __len__ or integer indexing; "
                        "pass X and y as arrays (or a dict of arrays) instead") from e
    if not n:
        raise ValueError(f"empty dataset: the torch Dataset X ({name}) has no items")
    if not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items):
        raise ValueError(f"the items of the torch Dataset X ({name}) must be (Xi, yi) pairs, as "
                         "skorch expects; pass X and y as arrays (or a dict of arrays) instead")
    from torch.utils.data import default_collate
    Xs, ys = default_collate(items)
    if getattr(X, "y", "") is None:  # skorch.dataset.Dataset(X, y=None): yi is a placeholder
        ys = None
    to_np = (lambda t: t.numpy() if torch.is_tensor(t) else np.asarray(t))
    Xs = SliceDict(**{k: to_np(v) for k, v in Xs.items()}) if isinstance(Xs, dict) else to_np(Xs)
    return Xs, (None if ys is None else to_np(ys))


def _takes_integers(module, X) -> bool:
    """Whether (a private copy of) ``module`` accepts the first rows of integer X as they are
    (token ids for nn.Embedding) rather than needing them cast to floating point."""
    m = copy.deepcopy(module).eval()
    first = next(m.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    rows = {k: torch.as_tensor(v[:2]).to(device) for k, v in X.items()} if is_dict_like(X) \
        else torch.as_tensor(X[:2]).to(device)
    try:
        with torch.no_grad():
            m(**rows) if isinstance(rows, dict) else m(rows)
    except (RuntimeError, TypeError, IndexError):
        return False
    return True


def require_finite(X, name: str = "X") -> None:
    """Raise a ValueError naming the rows of ``X`` (an array-like of floating or complex
    values; anything else passes) that hold NaN or infinite values."""
    if torch.is_tensor(X):
        X = X.detach().cpu().numpy()
    try:
        arr = np.asarray(X)
    except Exception:  # ragged, sparse, ...: left to the checks that follow
        return
    if arr.dtype.kind not in "fc" or arr.ndim == 0 or not arr.size:
        return
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(arr.sum()):  # no NaN or inf (a large sum may overflow: checked below)
            return
    bad = ~np.isfinite(arr.reshape(len(arr), -1))
    if not bad.any():
        return
    rows = np.flatnonzero(bad.any(1))
    what = "NaN" if np.isnan(arr).any() else "infinite values"
    raise ValueError(f"{name} contains {what} in {len(rows)} of {len(arr)} rows (first: row "
                     f"{rows[0]}); the network is measured on every sample, so drop or impute "
                     "those rows first (e.g. sklearn.impute.SimpleImputer in a Pipeline before "
                     "the net)")


def _check_array(X, name, target, ensure_2d=True):
    if torch.is_tensor(X):
        X = X.detach().cpu().numpy()
    require_finite(X, name)
    try:
        X = check_array(X, dtype="numeric", allow_nd=True, ensure_all_finite=True,
                        input_name=name, ensure_2d=ensure_2d)
    except (ValueError, TypeError) as e:  # name X where numpy / scikit-learn do not
        if name in str(e):
            raise
        raise type(e)(f"{name}: {e}") from e
    if X.dtype.kind != "f":
        return X
    with np.errstate(over="ignore"):  # an overflowing cast is reported below
        out = X.astype(target, copy=False)
    if out.dtype != X.dtype and not np.isfinite(out).all():
        big = float(np.abs(X).max())
        raise ValueError(f"{name} has values up to {big:.3g}, which overflow the module's dtype "
                         f"{np.dtype(target).name} (largest finite value "
                         f"{float(np.finfo(target).max):.3g}): rescale {name} (e.g. with "
                         "sklearn.preprocessing.StandardScaler) or use a float64 module")
    return out


def check_X(X, dtype: torch.dtype | None = None, module: nn.Module | None = None):
    """Validate inputs (finite, numeric, ≥ 2-D, non-empty); floating ones are cast to ``dtype``.

    X is an array-like or tensor, or a dict of them (returned as a
    :class:`skorch.helper.SliceDict`, which skorch passes to the module as keyword arguments).
    Integer inputs (token ids) are kept as they are, as skorch keeps them; when ``module`` is
    given and rejects them, they are integer-valued features and are cast to ``dtype`` too.
    skorch feeds arrays to the module as they come; a float64 array into a float32 module
    fails there. The measures cast to the module's dtype anyway, so the estimators do the same
    when they train or evaluate a bare net."""
    target = _NP_DTYPES.get(dtype or torch.get_default_dtype(), np.float32)
    if isinstance(X, Dataset):
        raise TypeError(f"X is a torch Dataset ({type(X).__name__}); split it into arrays with "
                        "split_dataset first")
    if is_dict_like(X):
        if not X:
            raise ValueError("X is an empty dict; pass one array per argument of the module's "
                             "forward")
        arrays = {str(k): _check_array(v, f"X[{k!r}]", target, False) for k, v in X.items()}
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"the arrays of the dict X have different numbers of samples: "
                             f"{lengths}")
        X = SliceDict(**arrays)
        ints = any(v.dtype.kind != "f" for v in X.values())
    else:
        X = _check_array(X, "X", target)
        ints = X.dtype.kind != "f"
    if ints and module is not None and not _takes_integers(module, X):
        cast = (lambda a: a.astype(target) if a.dtype.kind in "biu" else a)
        X = SliceDict(**{k: cast(v) for k, v in X.items()}) if is_dict_like(X) else cast(X)
    return X


def _check_has_parameters(net) -> None:
    if next(iter(net.module_.parameters()), None) is None:
        raise ValueError(f"the module {type(net.module_).__name__} has no parameters: there is "
                         "nothing to train or to measure")


def initialize(net):
    """``net.initialize()``, with a clear error for a module without parameters (the optimizer
    would refuse an empty parameter list)."""
    try:
        return net.initialize()
    except ValueError:
        if getattr(net, "module_", None) is not None:
            _check_has_parameters(net)
        raise


def module_built_by_initialize(net) -> bool:
    """True when ``net.initialize()`` builds the module that ``fit`` trains: no class of the net
    outside skorch overrides ``fit`` or ``initialize_module`` (which may size the module from
    the data, after the checks run)."""
    for cls in type(net).__mro__:
        if cls.__module__.split(".")[0] == "skorch":
            return True
        if "fit" in vars(cls) or "initialize_module" in vars(cls):
            return False
    return True


def check_module_fits_data(net, X, y) -> None:
    """Before training or measuring a bare net: it has parameters to train and measure, and a
    classifier's labels index its outputs (labels 0..K-1 for K outputs). One forward of one
    sample in eval mode, without gradients (modes restored: the module is not changed)."""
    _check_has_parameters(net)
    if not isinstance(X, np.ndarray) or not len(X):
        return
    try:
        with torch.no_grad(), preserved_modes(net):
            net.module_.eval()
            device = next(net.module_.parameters()).device
            out = net.module_(torch.as_tensor(X[:1]).to(device))
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise ValueError(f"the module cannot process X of shape {X.shape}: {e}. Check that X "
                         "has the number of features (and the shape) the module expects") from e
    if net_kind(net) != "classifier" or y is None or not len(y) or not torch.is_tensor(out) \
            or out.ndim < 2:
        return
    K, top = int(out.shape[1]), int(np.max(y))
    if top >= K:
        raise ValueError(f"y has the class label {top}, but the module has {K} outputs "
                         f"(labels must be 0..{K - 1}): encode the labels with "
                         "sklearn.preprocessing.LabelEncoder or give the module more outputs")


def check_y(net, y, n_samples: int | None = None, dtype: torch.dtype | None = None) -> np.ndarray:
    """Targets as the net's criterion needs them: int64 class labels for a classifier, float
    {0, 1} for a binary classifier, a 2-D float array for a regressor."""
    if y is None:
        raise ValueError("the estimator requires y to be passed, but the target y is None: the "
                         "measures are computed at the true labels. Pass the training targets.")
    if torch.is_tensor(y):
        y = y.detach().cpu().numpy()
    kind = net_kind(net)
    if kind in ("classifier", "binary"):
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)  # "Unknown label type: continuous" etc.
        if y.dtype.kind not in "biuf":
            raise ValueError(
                f"{type(net).__name__} needs numeric class labels 0..K-1 (skorch does not encode "
                f"labels); got dtype {y.dtype}. Encode them with sklearn.preprocessing."
                "LabelEncoder first.")
        y = check_array(y, ensure_2d=False, dtype=None, input_name="y")
        if not np.array_equal(y, np.round(y)):
            raise ValueError(f"{type(net).__name__} needs integer class labels 0..K-1; y has "
                             "non-integer values (a regression target?)")
        ignore = getattr(getattr(net, "criterion_", None), "ignore_index", None)
        labelled = y if ignore is None else y[y != ignore]
        if labelled.size and labelled.min() < 0:
            raise ValueError(f"class labels must be 0..K-1 (skorch does not encode labels); got "
                             f"a negative label {int(labelled.min())}. Encode them with "
                             "LabelEncoder.")
        if kind == "binary":
            y = y.astype(_NP_DTYPES.get(dtype or torch.get_default_dtype(), np.float32))
        else:
            y = y.astype(np.int64)
    elif kind == "regressor":
        y = check_array(y, ensure_2d=False, dtype="numeric", input_name="y")
        y = y.reshape(len(y), -1).astype(_NP_DTYPES.get(dtype or torch.get_default_dtype(),
                                                         np.float32))
    else:
        y = check_array(y, ensure_2d=False, dtype=None, input_name="y")
    if n_samples is not None and len(y) != n_samples:
        raise ValueError(f"X and y have different numbers of samples: {n_samples} vs {len(y)}")
    return y


def num_samples(X) -> int:
    """Number of samples of an array-like, DataFrame, tensor or dict of arrays."""
    if is_dict_like(X) and not isinstance(X, SliceDict):
        return len(next(iter(X.values()))) if X else 0
    shape = getattr(X, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) else len(X)


def classes_of(net, n_outputs: int) -> np.ndarray:
    """``net.classes_``, or 0..K-1 for a classifier restored without ever seeing y."""
    try:
        return np.asarray(net.classes_)
    except AttributeError:
        return np.arange(max(n_outputs, 2))


def check_labels_seen(net, y) -> None:
    """Raise when y holds class labels the fitted classifier never saw (``net.classes_``)."""
    if net_kind(net) != "classifier":
        return
    try:
        classes = np.asarray(net.classes_)
    except AttributeError:
        return
    unseen = np.setdiff1d(np.unique(y), classes)
    if unseen.size:
        raise ValueError(f"labels not seen in training: {unseen.tolist()}; the net was trained on "
                         f"classes_ = {classes.tolist()}. Measure on data from the same classes.")


# -- Λ from the optimizer ----------------------------------------------------------------------
def weight_decay_lam(net, param_names: list[str], md=None) -> float | dict[str, float]:
    r""":math:`\Lambda` of the objective :math:`\frac1n\sum_i\ell_i + \frac12\theta^\top\Lambda
    \theta` that ``net.optimizer_``'s ``weight_decay`` minimizes with the criterion as trained.

    A float when every measured parameter has the same ``weight_decay``, else
    ``{parameter name: Λ}`` (parameter groups). Each step of skorch's training loop adds
    ``wd·θ`` to the gradient of the criterion on one batch, so a fixed point of an epoch's
    steps is a stationary point of :math:`\sum_{\text{batches}} L_B + \frac{s}{2}wd\,\|\theta\|^2`
    with s the number of optimizer steps per epoch. Written as the mean per-sample loss
    (:math:`\ell_i` averaged over its e loss elements) plus :math:`\frac12\Lambda\|\theta\|^2`:

    ===============================  ===================================================
    criterion reduction               Λ
    ===============================  ===================================================
    'mean'                            wd (for CrossEntropyLoss/NLLLoss with class weights,
                                      whose mean divides by :math:`\sum_i w_{y_i}`:
                                      :math:`wd\cdot\bar w`, :math:`\bar w` the mean weight
                                      of the samples' labels)
    'sum'                             :math:`wd\cdot s/(n\,e)` — full batch: wd/(n e);
                                      batches of b samples: wd/(b e)
    'batchmean'                       wd / e
    ===============================  ===================================================

    n is the number of samples whose losses count per epoch (``md.n_train``); s comes from the
    net's training history, or, for a net without one (restored with ``load_params``), from
    its ``batch_size`` (with a warning). Pass ``md`` (the :class:`~softrank.model.ModelData`
    being measured) for any reduction but 'mean'.

    Raises
    ------
    ValueError
        No optimizer, parameters outside it, zero weight decay, or a reduction other than
        'mean', 'sum' and 'batchmean' (Λ cannot be told; pass ``lam``).
    """
    opt = getattr(net, "optimizer_", None)
    if opt is None:
        raise ValueError("lam='auto' reads the optimizer's weight_decay, but the net has no "
                         "optimizer_; pass lam explicitly.")
    if "AdamW" in type(opt).__name__:
        warnings.warn(f"{type(opt).__name__} decouples weight decay from the loss gradient, so "
                      "Λ = weight_decay is only an approximation of its regularization; pass lam "
                      "explicitly to silence this warning", UserWarning, stacklevel=3)
    by_name = optimizer_weight_decay(net)
    missing = [n for n in param_names if by_name.get(n) is None]
    if missing:
        raise ValueError(f"lam='auto': parameters {missing} are not in the optimizer, so they have "
                         "no weight decay; exclude them with params=... or pass lam explicitly.")
    zero = [n for n in param_names if by_name[n] <= 0]
    if zero:
        raise ValueError(
            f"lam='auto' found no weight decay (weight_decay = 0) for parameters {zero}; the soft "
            "rank and TIC need Λ > 0. Train with optimizer__weight_decay > 0, or pass lam "
            "explicitly (e.g. lam=1e-4).")
    scale = _reduction_scale(net, md)
    values = {n: by_name[n] * scale for n in param_names}
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return values


def optimizer_weight_decay(net) -> dict[str, float | None]:
    """{parameter name: ``weight_decay`` of its optimizer group} (None: not in the optimizer)."""
    decay = {}
    for group in net.optimizer_.param_groups:
        for p in group["params"]:
            decay[id(p)] = float(group.get("weight_decay", 0.0))
    return {name: decay.get(id(p)) for name, p in net.module_.named_parameters()}


def _reduction_scale(net, md) -> float:
    """Λ / weight_decay for the criterion's reduction (see :func:`weight_decay_lam`)."""
    crit = net.criterion_
    reduction = getattr(crit, "reduction", "mean")
    if reduction == "mean":
        weight = getattr(crit, "weight", None)
        if (weight is None or md is None or md.y is None or md.y.ndim != 1
                or not isinstance(crit, (nn.CrossEntropyLoss, nn.NLLLoss))):
            return 1.0
        return float(weight.detach().double().cpu()[md.y.long().cpu()].mean())
    if reduction not in ("sum", "batchmean"):
        raise ValueError(f"lam='auto' cannot tell Λ for a criterion with reduction="
                         f"{reduction!r}; pass lam explicitly.")
    if md is None:
        raise ValueError(f"lam='auto' with reduction={reduction!r} needs the number of samples and "
                         "of loss elements per sample: pass md, or lam explicitly.")
    elements = _loss_elements(md)
    if reduction == "batchmean":
        return 1.0 / elements
    steps, _ = _steps_per_epoch(net, md)
    return steps / (md.n_train * elements)


def _loss_elements(md) -> int:
    """e: elements of the criterion's ``reduction='none'`` output per sample."""
    crit = copy.deepcopy(md.criterion).double()
    crit.reduction = "none"
    b = next(md.batches(None))
    z = b.z.to(md.device)
    y = b.y if b.y is None or not b.y.is_floating_point() else b.y.double()
    with torch.no_grad():
        out = crit(z, y) if y is not None else None
    if out is None:
        return max(1, z.shape[1])
    return max(1, out.numel() // len(z))


def _steps_per_epoch(net, md) -> tuple[int, int]:
    """(optimizer steps, samples) of the last training epoch; from ``batch_size`` without a
    history."""
    try:
        sizes = [b["train_batch_size"] for b in net.history[-1, "batches"]
                 if "train_batch_size" in b]
    except (IndexError, KeyError):
        sizes = []
    if sizes:
        return len(sizes), int(sum(sizes))
    seen = int(round(md.n_train * (md.n + md.n_ignored) / md.n))
    b = getattr(net, "iterator_train__batch_size", None) or net.batch_size
    drop_last = bool(getattr(net, "iterator_train__drop_last", False))
    steps = 1 if b in (-1, None) or b >= seen else (seen // b if drop_last else -(-seen // b))
    warnings.warn(f"lam='auto' with a summed loss: the net has no training history, so Λ assumes "
                  f"{steps} optimizer step(s) per epoch (batch_size={b}, {seen} samples); pass lam "
                  "explicitly if it was trained otherwise", UserWarning, stacklevel=4)
    return max(1, steps), seen


# -- n ---------------------------------------------------------------------------------------
def _n_from_history(net) -> int | None:
    try:
        batches = net.history[-1, "batches"]
    except (IndexError, KeyError):
        return None
    sizes = [b["train_batch_size"] for b in batches if "train_batch_size" in b]
    return int(sum(sizes)) if sizes else None


def _n_from_split(net, X, y) -> int:
    if not net.train_split:
        return len(X)
    train, _ = net.get_split_datasets(X, y)
    return len(train)


def _n_labelled(net, n: int, X, y) -> int:
    """Of n trained samples, those whose label is not the criterion's ``ignore_index`` (they
    are not in the loss): counted on the training part of (X, y)."""
    ignore = getattr(getattr(net, "criterion_", None), "ignore_index", None)
    if ignore is None or y is None or np.ndim(y) != 1:
        return n
    labels = np.asarray(y)
    if not (labels == ignore).any():
        return n
    if net.train_split:
        train, _ = net.get_split_datasets(X, y)
        labels = np.asarray([np.asarray(train[i][1]) for i in range(len(train))])
    kept = int((labels != ignore).sum())
    if kept == len(labels):
        return n
    return max(1, int(round(n * kept / max(len(labels), 1))))


def n_trained(net, X, y) -> tuple[int, str]:
    """(n, source): samples seen in the last training epoch (``net.history``), or, for a net
    without history (restored with ``load_params``), ``net.train_split`` applied to (X, y).
    Samples labelled with the criterion's ``ignore_index`` are not counted: the criterion's
    mean runs over the others."""
    n = _n_from_history(net)
    source = "history"
    if n is None:
        n, source = _n_from_split(net, X, y), "train_split"
    return _n_labelled(net, n, X, y), source


# -- loss ------------------------------------------------------------------------------------
def per_sample_loss(md) -> torch.Tensor:
    r"""(n,) float64 :math:`\ell_i`: the criterion with ``reduction='none'`` on the model's z,
    averaged over non-batch dimensions, evaluated on ``md``'s private eval copy."""
    crit = copy.deepcopy(md.criterion).double()
    if hasattr(crit, "reduction"):
        crit.reduction = "none"
    out = []
    with torch.no_grad():
        for b in md.batches(None):
            z = b.z.to(md.device)
            y = md.family.prepare_target(md.y[b.index].to(md.device), z)
            if y.is_floating_point():
                y = y.double()
            out.append(crit(z, y).reshape(len(z), -1).double().mean(1).cpu())
    losses = torch.cat(out)
    if not bool(torch.isfinite(losses).all()):
        bad = (~torch.isfinite(losses)).nonzero()[:, 0]
        raise ValueError(
            f"the criterion {type(md.criterion).__name__} is NaN or inf on {len(bad)} of "
            f"{len(losses)} samples (first: sample {int(bad[0])}) at finite network outputs: the "
            "targets do not fit the criterion (e.g. counts for a log-rate model that overflow, "
            "or labels outside its domain)")
    return losses


def mean_loss(md) -> float:
    """Mean loss over the samples of ``md`` (float64 sum)."""
    return float(per_sample_loss(md).mean())


# -- a fitted net as ModelData ----------------------------------------------------------------
def model_data(estimator, X, y=None, *, params=None, batch_size: int = 256, device=None,
               extra_transform=None):
    """(ModelData of the fitted net on (X, y) as it was trained, net) for a fitted net or a
    Pipeline ending in one: X transformed by the preceding steps and cast to the module's
    dtype, y checked against the classes the net saw, z = skorch's output transform (then
    ``extra_transform``, e.g. a temperature), n = :func:`n_trained`."""
    from .model import ModelData

    pre, net = split_estimator(estimator)
    check_fitted(estimator, "measuring needs a fitted net")
    X, y = split_dataset(X, y)
    if pre is not None:
        X = pre.transform(X)
    dtype = module_dtype(net)
    X = check_X(X, dtype, net.module_)
    if y is not None:
        y = check_y(net, y, len(X), dtype)
        check_labels_seen(net, y)
    base = output_transform(net)
    z_of = base if extra_transform is None else (
        extra_transform if base is None else lambda out: extra_transform(base(out)))
    n_train = _n_from_history(net)
    if n_train is None and (y is not None or not net.train_split):
        n_train = _n_from_split(net, X, y)
    if n_train is not None:
        n_train = _n_labelled(net, n_train, X, y)
    md = ModelData(net.module_, net.criterion_, X, y, params=params, output_transform=z_of,
                   batch_size=batch_size, n_train=n_train, device=device)
    return md, net


# -- modes -----------------------------------------------------------------------------------
def _torch_components(net):
    names = list(getattr(net, "_modules", ["module"])) + list(getattr(net, "_criteria",
                                                                     ["criterion"]))
    for name in names:
        comp = getattr(net, name + "_", None)
        if isinstance(comp, nn.Module):
            yield comp


@contextmanager
def preserved_modes(net):
    """Restore every submodule's ``training`` flag after the block (skorch's predict leaves the
    module in eval mode)."""
    saved = [(m, m.training) for comp in _torch_components(net) for m in comp.modules()]
    try:
        yield net
    finally:
        for m, flag in saved:
            m.training = flag
