r"""Calibration: expected calibration error, reliability diagrams, temperature scaling, and
the calibration ratio :math:`\alpha = \mathrm{Tr}\,C/\mathrm{Tr}\,F`.

For a fitted skorch net: :func:`fit_net_temperature` fits :math:`T` on the training data (or
given data), :func:`temperature_measures` computes the soft rank, α and the gap estimates of the
net at temperature T (its criterion input :math:`z` replaced by :math:`z/T`, re-normalized for
NLLLoss), and :func:`calibration_report` puts α on the training and on the test data, ECE and
losses before and after temperature scaling side by side, with the reading below.

Reading α: for a calibrated model C ≈ F and α ≈ 1, and the soft-rank gap estimate
reduces to :math:`\mathrm{rank}_\Lambda(F)/n`. α > 1: over-confident on this data — the
calibrated estimate rank/n *under*-estimates the gap and the α factor corrects for it;
α < 1: under-confident (or interpolating: training gradients vanish, α ≪ 1, and every
C-based estimate collapses — use ApproxLOO there).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from . import skorch_adapter as sk
from .measures import soft_rank_gap, trace_ratio

__all__ = ["expected_calibration_error", "reliability_curve", "reliability_diagram",
           "fit_temperature", "ReliabilityCurve", "temperature_transform", "net_logits",
           "fit_net_temperature", "temperature_measures", "TemperatureMeasures",
           "calibration_report", "CalibrationReport", "read_alpha"]


def _as_proba(proba) -> np.ndarray:
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim == 1:  # binary: probability of class 1
        p = np.stack([1 - p, p], 1)
    if p.ndim != 2 or not np.all(np.isfinite(p)):
        raise ValueError("proba must be a finite (n_samples, n_classes) array of probabilities")
    return p


@dataclass(frozen=True)
class ReliabilityCurve:
    confidence: np.ndarray  # mean top-label confidence per non-empty bin
    accuracy: np.ndarray  # accuracy per non-empty bin
    counts: np.ndarray  # samples per non-empty bin
    edges: np.ndarray  # the bin edges (all bins)


def reliability_curve(proba, y, n_bins: int = 15) -> ReliabilityCurve:
    """Top-label confidence vs accuracy in ``n_bins`` equal-width bins on [0, 1]."""
    p = _as_proba(proba)
    y = np.asarray(y).reshape(-1)
    if len(y) != len(p):
        raise ValueError(f"proba has {len(p)} rows but y has {len(y)} labels")
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    keep = counts > 0
    sum_conf = np.bincount(which, conf, n_bins)
    sum_acc = np.bincount(which, correct, n_bins)
    return ReliabilityCurve(sum_conf[keep] / counts[keep], sum_acc[keep] / counts[keep],
                            counts[keep], edges)


def expected_calibration_error(proba, y, n_bins: int = 15) -> float:
    r"""Top-label ECE :math:`\sum_b \frac{|B_b|}{n}\,|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|`
    (Guo et al., 2017) with equal-width bins."""
    c = reliability_curve(proba, y, n_bins)
    return float(np.sum(c.counts * np.abs(c.accuracy - c.confidence)) / c.counts.sum())


def reliability_diagram(proba, y, n_bins: int = 15, ax=None, label: str | None = None):
    """Plot the reliability diagram (needs matplotlib: ``pip install softrank[plots]``)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reliability_diagram needs matplotlib: pip install matplotlib") from e
    c = reliability_curve(proba, y, n_bins)
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    ece = expected_calibration_error(proba, y, n_bins)
    ax.plot(c.confidence, c.accuracy, "o-", label=f"{label or 'model'} (ECE {ece:.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left")
    return ax


def fit_temperature(logits, y, *, max_iter: int = 200) -> float:
    r"""Temperature :math:`T>0` minimizing the NLL of :math:`\mathrm{softmax}(z/T)` on
    (logits, y) (Guo et al., 2017). For a binary model pass one logit per sample.
    Fitted on the training data by default in softrank; pass held-out data to fit there.

    Raises ValueError for non-finite logits, labels outside 0..K-1 (0/1 for one logit), a
    length mismatch or no samples, and when the optimum is not a finite positive T."""
    z_np, y_np = np.asarray(logits), np.asarray(y)
    if z_np.dtype.kind not in "biuf" or y_np.dtype.kind not in "biuf":
        raise TypeError(f"fit_temperature needs numeric logits and integer labels; got dtypes "
                        f"{z_np.dtype} and {y_np.dtype}")
    z = torch.as_tensor(z_np, dtype=torch.float64)
    if z.ndim not in (1, 2) or z.shape[0] == 0:
        raise ValueError(f"logits must be (n_samples, K) or (n_samples,) with n_samples ≥ 1; "
                         f"got shape {tuple(z.shape)}")
    if not torch.isfinite(z).all():
        bad = int((~torch.isfinite(z)).reshape(z.shape[0], -1).any(1).sum())
        raise ValueError(f"logits contain NaN or inf ({bad} samples): the temperature of a "
                         "non-finite logit is undefined; check the model's outputs")
    if z.ndim == 1 or z.shape[1] == 1:
        z = z.reshape(-1, 1)
        z = torch.cat([torch.zeros_like(z), z], 1)
    y_flat = y_np.reshape(-1)
    if len(y_flat) != z.shape[0]:
        raise ValueError(f"logits have {z.shape[0]} samples but y has {len(y_flat)}")
    if not np.array_equal(y_flat, np.round(y_flat)) or y_flat.min() < 0 or \
            y_flat.max() >= z.shape[1]:
        raise ValueError(f"labels must be integers in 0..{z.shape[1] - 1} (one per column of "
                         f"the logits); got values in [{y_flat.min()}, {y_flat.max()}]")
    y = torch.as_tensor(y_flat.astype(np.int64))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    T = float(log_t.detach().exp())
    if not (np.isfinite(T) and T > 0):
        raise ValueError(f"the temperature fit did not reach a finite optimum (T = {T}); the "
                         "logits separate the labels perfectly (the NLL falls without bound as "
                         "T → 0) or are degenerate")
    return T


# -- temperature scaling of a fitted skorch net -----------------------------------------------
def temperature_transform(criterion: nn.Module, temperature: float):
    r"""The map :math:`z \mapsto z_T` that puts the net's criterion input at temperature T:
    :math:`z/T` for logits (CrossEntropyLoss, BCEWithLogitsLoss), :math:`\log\mathrm{softmax}(z/T)`
    for log-probabilities (NLLLoss, skorch's classifier default). Other criteria have no
    temperature (ValueError)."""
    T = float(temperature)
    if not np.isfinite(T) or T <= 0:
        raise ValueError(f"temperature must be a positive number; got {temperature!r}")
    if isinstance(criterion, nn.NLLLoss):
        return lambda z: torch.log_softmax(z / T, dim=1)
    if isinstance(criterion, (nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)):
        return lambda z: z / T
    raise ValueError("temperature scaling applies to classifiers trained with CrossEntropyLoss, "
                     f"NLLLoss or BCEWithLogitsLoss; the criterion is {type(criterion).__name__}")


def _model_data(estimator, X, y, temperature=1.0, **kw):
    _, net = sk.split_estimator(estimator)
    extra = None if temperature == 1.0 else temperature_transform(net.criterion_, temperature)
    return sk.model_data(estimator, X, y, extra_transform=extra, **kw)


def _outputs(md) -> torch.Tensor:
    return torch.cat([b.z.cpu() for b in md.batches(None)])


def _proba(z: torch.Tensor) -> np.ndarray:
    if z.shape[1] == 1:  # Bernoulli logit
        return torch.sigmoid(z[:, 0]).numpy()
    return torch.softmax(z, 1).numpy()


def net_logits(estimator, X) -> np.ndarray:
    """(N, K) criterion inputs z of the fitted net on X (logits, or log-probabilities for
    NLLLoss — logits up to a per-sample constant), float64; the net is not changed."""
    md, _ = sk.model_data(estimator, X)
    return _outputs(md).numpy()


def fit_net_temperature(estimator, X, y, *, max_iter: int = 200) -> float:
    """Temperature of the fitted net minimizing the NLL on (X, y) — the training data by
    default in softrank, or held-out calibration data (:func:`fit_temperature`)."""
    md, net = sk.model_data(estimator, X, y)
    temperature_transform(net.criterion_, 1.0)  # clear error for a non-classifier
    return fit_temperature(_outputs(md), md.y, max_iter=max_iter)


@dataclass(frozen=True)
class TemperatureMeasures:
    r"""The net at one temperature T: on the training data its loss, ECE, soft rank,
    :math:`\alpha = \mathrm{Tr}\,C/\mathrm{Tr}\,F`, gap estimates :math:`\alpha\,\mathrm{rank}/n`
    and :math:`\mathrm{rank}/n`; on test data (when given) its loss, ECE and α."""

    temperature: float
    train_loss: float
    train_ece: float
    alpha_train: float
    soft_rank: float
    gap: float
    calibrated_gap: float
    n_train: int
    test_loss: float | None = None
    test_ece: float | None = None
    alpha_test: float | None = None

    @property
    def estimated_test_loss(self) -> float:
        return self.train_loss + self.gap

    @property
    def observed_gap(self) -> float | None:
        return None if self.test_loss is None else self.test_loss - self.train_loss


def _subsample(X, y, m, random_state):
    if m is None or m >= len(X):
        return X, y
    idx = np.sort(np.random.RandomState(random_state).choice(len(X), m, replace=False))
    return X[idx], y[idx]


def _asarray(a):
    return a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)


def temperature_measures(estimator, X, y, temperature: float = 1.0, X_test=None, y_test=None, *,
                         lam="auto", approximation: str = "kfac", n_curvature_samples=None,
                         random_state=0, n_bins: int = 15, params=None,
                         batch_size: int = 256) -> TemperatureMeasures:
    r"""Measures of the fitted net at temperature T (criterion input :math:`z/T`): the soft-rank
    gap estimate on (X, y) — the training data; F, C and ``lam='auto'`` as for
    :class:`~softrank.estimators.SoftRankFIM` — plus loss and ECE, and α on (X_test, y_test)
    when given. ``n_curvature_samples``: curvature on a random subsample (n unchanged)."""
    X, y = _asarray(X), _asarray(y)
    kw = dict(params=params, batch_size=batch_size)
    full, net = _model_data(estimator, X, y, temperature, **kw)
    z = _outputs(full)
    Xc, yc = _subsample(X, y, n_curvature_samples, random_state)
    md = _model_data(estimator, Xc, yc, temperature, **kw)[0]
    md.n_train = full.n_train
    if lam == "auto":
        lam = sk.weight_decay_lam(net, md.param_names, md)
    res = soft_rank_gap(md, lam, approximation, random_state=random_state)
    out = TemperatureMeasures(
        temperature=float(temperature), train_loss=sk.mean_loss(full),
        train_ece=expected_calibration_error(_proba(z), full.y.numpy(), n_bins),
        alpha_train=float(res.diagnostics["alpha"]), soft_rank=float(res.value),
        gap=float(res.gap), calibrated_gap=float(res.diagnostics["calibrated_gap"]),
        n_train=int(full.n_train))
    if X_test is None:
        return out
    test = _model_data(estimator, _asarray(X_test), _asarray(y_test), temperature, **kw)[0]
    return replace(out, test_loss=sk.mean_loss(test),
                   test_ece=expected_calibration_error(_proba(_outputs(test)), test.y.numpy(),
                                                       n_bins),
                   alpha_test=float(trace_ratio(test).value))


def read_alpha(alpha: float, where: str = "train", tol: float = 0.1) -> str:
    r"""The paper's reading of :math:`\alpha = \mathrm{Tr}\,C/\mathrm{Tr}\,F` on the training
    data (``where='train'``: what it does to the gap estimates) or on test data ('test')."""
    if where != "train":
        if abs(alpha - 1.0) <= tol:
            return f"α_{where} ≈ 1: calibrated on unseen data (C ≈ F)"
        if alpha > 1.0:
            return (f"α_{where} > 1: over-confident on unseen data; a temperature T > 1 fitted "
                    "on held-out data moves it toward 1")
        return (f"α_{where} < 1: under-confident on unseen data; a temperature T < 1 moves it "
                "toward 1")
    if abs(alpha - 1.0) <= tol:
        return "α_train ≈ 1: calibrated (C ≈ F); rank/n and the soft-rank gap estimate agree"
    if alpha > 1.0:
        return ("α_train > 1: over-confident; the calibrated estimate rank/n underestimates the "
                "gap, the soft-rank gap estimate α·rank/n corrects for it")
    if alpha < 0.3:
        return ("α_train ≪ 1: the net fits (memorizes) its training labels; every C-based "
                "estimate collapses there (use ApproxLOO), and a temperature fitted "
                "on the training data is < 1: fit it on held-out data (X_cal, y_cal)")
    return ("α_train < 1: under-confident; rank/n overestimates the gap, α·rank/n corrects "
            "for it")


@dataclass(frozen=True)
class CalibrationReport:
    """Before (T = 1) and after temperature scaling (T = ``after.temperature``)."""

    before: TemperatureMeasures
    after: TemperatureMeasures
    temperature_source: str

    @property
    def temperature(self) -> float:
        return self.after.temperature

    def reading(self) -> list[str]:
        lines = [read_alpha(self.before.alpha_train, "train")]
        if self.before.alpha_test is not None:
            lines.append(read_alpha(self.before.alpha_test, "test"))
        return lines

    def __str__(self) -> str:
        rows = [("temperature", "temperature")]
        fields = [("train loss", "train_loss"), ("train ECE", "train_ece"),
                  ("α train", "alpha_train"), ("soft rank", "soft_rank"),
                  ("gap α·rank/n", "gap"), ("gap rank/n", "calibrated_gap"),
                  ("est. test loss", "estimated_test_loss")]
        if self.before.test_loss is not None:
            fields += [("test loss", "test_loss"), ("observed gap", "observed_gap"),
                       ("test ECE", "test_ece"), ("α test", "alpha_test")]
        rows += fields
        out = [f"{'':16s}{'before':>12s}{'after':>12s}"]
        for label, attr in rows:
            b, a = getattr(self.before, attr), getattr(self.after, attr)
            out.append(f"{label:16s}{b:12.4f}{a:12.4f}")
        source = self.temperature_source
        out.append("(T given)" if source == "given" else f"(T fitted on {source})")
        return "\n".join(out + self.reading())


def calibration_report(estimator, X, y, X_test=None, y_test=None, *, temperature="fit",
                       X_cal=None, y_cal=None, **kw) -> CalibrationReport:
    r"""α = Tr C/Tr F on the training data (X, y) and on (X_test, y_test), ECE, losses and the
    gap estimates of the fitted net before and after temperature scaling.

    ``temperature``: 'fit' — fitted on (X_cal, y_cal) when given, else on the training data —
    or a number. ``kw``: ``lam``, ``approximation`` (default 'kfac'), ``n_curvature_samples``,
    ``random_state``, ``n_bins``, ``params``, ``batch_size`` (see :func:`temperature_measures`).
    Scaling an over-confident net (T > 1) lowers its test ECE and moves α toward 1."""
    if isinstance(temperature, str):
        if temperature != "fit":
            raise ValueError(f"temperature must be 'fit' or a positive number; got "
                             f"{temperature!r}")
        on_cal = X_cal is not None
        source = "the calibration data" if on_cal else "the training data"
        T = fit_net_temperature(estimator, X_cal if on_cal else X, y_cal if on_cal else y)
    else:
        T, source = float(temperature), "given"
    before = temperature_measures(estimator, X, y, 1.0, X_test, y_test, **kw)
    after = temperature_measures(estimator, X, y, T, X_test, y_test, **kw)
    return CalibrationReport(before, after, source)
