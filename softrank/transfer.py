r"""Transfer learning: choose a frozen feature extractor by the estimated test loss of the head
trained on it — from the (small) target training set alone, no validation split.

A frozen extractor :math:`\phi` and a head :math:`h_\theta` trained on :math:`\phi(x)`: the
head's curvature is that of the full network restricted to :math:`\theta` (the measures'
``params=``), since :math:`\partial z/\partial\theta` does not depend on how :math:`\phi` is
computed. :class:`FrozenFeatures` makes :math:`\phi` a scikit-learn transformer, so

.. code-block:: python

    pipe = Pipeline([("features", FrozenFeatures(backbone)), ("head", head_net)])
    SoftRankFIM(pipe).fit(X, y).score(X, y)      # −(train loss + gap) of the head

works with every :class:`~softrank.estimators.GapEstimator`, in GridSearchCV over
``estimator__features__module``, and :func:`compare_feature_extractors` does the loop: one
head per extractor, each scored by its estimated test loss (and by the observed test loss when
test data is given, for comparison).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted
from torch import nn

from . import skorch_adapter as sk
from .estimators import GapEstimator, SoftRankFIM

__all__ = ["FrozenFeatures", "ExtractorScore", "compare_feature_extractors"]


class FrozenFeatures(TransformerMixin, BaseEstimator):
    """A frozen torch module as a transformer: ``transform(X)`` = ``module(X)`` of a private
    copy in evaluation mode, without gradients, flattened to (N, d), in the module's output
    dtype (or ``dtype``: match the head's). ``fit`` only copies the module (it is never
    trained; the user's module is not changed)."""

    def __init__(self, module: nn.Module, *, batch_size: int = 1024, dtype=None,
                 device=None):
        self.module = module
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device

    def fit(self, X, y=None):
        if not isinstance(self.module, nn.Module):
            raise TypeError(f"module must be a torch nn.Module; got {type(self.module).__name__}")
        module = copy.deepcopy(self.module).eval()
        for p in module.parameters():
            p.requires_grad_(False)
        self.module_ = module if self.device is None else module.to(self.device)
        self.n_features_in_ = int(np.prod(np.shape(X)[1:]))
        return self

    def transform(self, X):
        check_is_fitted(self)
        first = next(self.module_.parameters(), None)
        dtype = first.dtype if first is not None else torch.get_default_dtype()
        device = first.device if first is not None else torch.device("cpu")
        X = torch.as_tensor(sk.check_X(X, dtype))
        out = []
        with torch.no_grad():
            for start in range(0, len(X), self.batch_size):
                z = self.module_(X[start:start + self.batch_size].to(device))
                out.append(z.reshape(len(z), -1).cpu().numpy())
        out = np.concatenate(out)
        return out if self.dtype is None else out.astype(self.dtype, copy=False)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.input_tags.allow_nan = False
        return tags


@dataclass(frozen=True)
class ExtractorScore:
    """One feature extractor: the head's training loss, gap estimate and estimated test loss
    (from the target training data), and its observed test loss when test data was given."""

    name: str
    n_features: int
    train_loss: float
    gap: float
    estimated_test_loss: float
    test_loss: float | None
    measure: GapEstimator  # fitted; ``measure.estimator_`` is the fitted Pipeline

    @property
    def observed_gap(self) -> float | None:
        return None if self.test_loss is None else self.test_loss - self.train_loss


def _head_for(head, n_features: int):
    return clone(head) if hasattr(head, "get_params") else head(n_features)


def compare_feature_extractors(extractors: Mapping[str, nn.Module],
                               head: Callable[[int], object] | object, X, y, *,
                               measure: GapEstimator | None = None, X_test=None,
                               y_test=None) -> list[ExtractorScore]:
    r"""Train a head on each frozen extractor's features of (X, y) and score it by its
    estimated test loss :math:`\bar\ell_{\mathrm{train}} + \widehat{\mathrm{gap}}`; sorted best
    (lowest) first.

    ``head``: an unfitted skorch net (cloned for each extractor; the extractors must then have
    the same output width) or a callable ``n_features -> unfitted skorch net``. ``measure``: an
    unfitted GapEstimator template (default ``SoftRankFIM(None, random_state=0)``: the exact
    soft-rank gap estimate, ``lam='auto'``); its ``estimator`` is set to
    ``Pipeline([FrozenFeatures(extractor), head])``, and its ``random_state`` seeds the head's
    training. With (X_test, y_test) the observed
    test loss of each head is reported too — only for comparison, the choice never uses it.
    """
    template = measure if measure is not None else SoftRankFIM(None, random_state=0)
    if not isinstance(template, GapEstimator):
        raise TypeError(f"measure must be an unfitted GapEstimator; got {type(template).__name__}")
    rows = []
    for name, module in extractors.items():
        features = FrozenFeatures(module).fit(X[:1])
        width = features.transform(X[:1]).shape[1]
        pipe = Pipeline([("features", FrozenFeatures(module)), ("head", _head_for(head, width))])
        est = clone(template).set_params(estimator=pipe, prefit=False).fit(X, y)
        test_loss = None if X_test is None else est.loss(X_test, y_test)
        rows.append(ExtractorScore(name, width, est.train_loss_, est.gap_,
                                   est.train_loss_ + est.gap_, test_loss, est))
    return sorted(rows, key=lambda r: r.estimated_test_loss)
