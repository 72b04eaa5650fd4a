"""softrank: how well will a trained network generalize — from its training data alone."""
from .curvature import curvature
from .families import family_for
from .model import ModelData

__version__ = "0.1.0"
__all__ = ["ModelData", "curvature", "family_for", "__version__"]
