"""Warnings that point at the user's line, not at softrank's.

``warnings.warn(..., stacklevel=k)`` needs the depth of the call inside the library, which
changes with every refactoring and differs between a direct ``fit`` and one made through
another softrank function. :func:`warn` counts it: the warning is attributed to the first
frame outside the softrank package (Python 3.12's ``skip_file_prefixes`` does the same).
"""
from __future__ import annotations

import os
import sys
import warnings

__all__ = ["warn", "ReissuedWarnings"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _inside(frame) -> bool:
    return os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE)


def _stacklevel(frame) -> int:
    """stacklevel, for a ``warnings.warn`` called in ``frame``, of the first frame outside
    the softrank package."""
    level = 1
    while frame is not None and _inside(frame):
        frame = frame.f_back
        level += 1
    return level


def warn(message, category=UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside the softrank package."""
    warnings.warn(message, category, stacklevel=_stacklevel(sys._getframe(1)))


class ReissuedWarnings:
    """Context manager: collect the warnings raised inside the block and raise them again on
    exit, each once: softrank's own attributed to the user's line (the first frame outside
    softrank); those of other libraries (torch, scikit-learn...) where they were raised, so
    that the filters apply to them as if they had not been caught (a torch
    ``DeprecationWarning`` stays hidden by Python's default filters)."""

    def __enter__(self):
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catcher.__exit__(*exc)
        frame = sys._getframe(0)
        seen = set()
        for w in self._caught:
            key = (str(w.message), w.category)
            if key not in seen:  # the same warning from two passes over one net: once
                seen.add(key)
                if os.path.abspath(w.filename).startswith(_PACKAGE):
                    warnings.warn(w.message, w.category, stacklevel=_stacklevel(frame))
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return False
