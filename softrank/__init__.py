"""softrank: how well will a trained network generalize — from its training data alone."""
from .curvature import curvature
from .estimators import TIC, ApproxLOO, GapEstimator, HessianNorm, SoftRankFIM, TraceRatio
from .callbacks import EstimatedLossEarlyStopping, FinishTraining, GapTracker
from .families import family_for
from .influence import leverage_scores, rank_samples, tic_contributions
from .loo import approx_loo
from .model import ModelData
from .scoring import InSampleSplit, gap_scorer, make_gap_scorer
from .stationarity import (FinishResult, NotStationaryWarning, finish_training,
                           relative_stationarity)

__version__ = "0.1.0"
__all__ = ["ModelData", "curvature", "family_for", "approx_loo", "__version__",
           "GapEstimator", "SoftRankFIM", "TIC", "TraceRatio", "HessianNorm", "ApproxLOO",
           "InSampleSplit", "gap_scorer", "make_gap_scorer",
           "GapTracker", "EstimatedLossEarlyStopping", "FinishTraining",
           "relative_stationarity", "finish_training", "FinishResult", "NotStationaryWarning",
           "leverage_scores", "tic_contributions", "rank_samples"]
