"""softrank: how well will a trained network generalize — from its training data alone.

The public names below are imported on first use (``softrank.SoftRankFIM`` imports
:mod:`softrank.estimators`, and torch with it), so that ``import softrank`` and the command
line's ``--help`` stay fast. To export a new name, add it to ``_EXPORTS``.
"""
from __future__ import annotations

import importlib
import sys
import types

from . import _doc

_doc.install()  # docstrings read in a terminal: Unicode formulas instead of TeX markup

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "ModelData": ".model", "curvature": ".curvature", "family_for": ".families",
    "approx_loo": ".loo",
    "GapEstimator": ".estimators", "SoftRankFIM": ".estimators", "TIC": ".estimators",
    "TraceRatio": ".estimators", "HessianNorm": ".estimators", "ApproxLOO": ".estimators",
    "InSampleSplit": ".scoring", "gap_scorer": ".scoring", "make_gap_scorer": ".scoring",
    "GapTracker": ".callbacks", "EstimatedLossEarlyStopping": ".callbacks",
    "FinishTraining": ".callbacks", "EstimateSummary": ".summary",
    "relative_stationarity": ".stationarity", "finish_training": ".stationarity",
    "FinishResult": ".stationarity", "NotStationaryWarning": ".stationarity",
    "effective_lam": ".effective", "EffectiveLam": ".effective",
    "InitialParameters": ".effective",
    "leverage_scores": ".influence", "tic_contributions": ".influence",
    "rank_samples": ".influence",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'softrank' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """``softrank.curvature`` is the function, as with ``from .curvature import curvature``
    (importing the subpackage ``softrank.curvature`` must not rebind it to the module)."""

    @property
    def curvature(self):
        from .curvature import curvature

        return curvature

    @curvature.setter
    def curvature(self, value):  # the import system binds the subpackage: keep the function
        pass


sys.modules[__name__].__class__ = _Package
