"""Progress bars for long work, switched on by the estimators' ``verbose`` parameter.

One switch, consulted where the time goes: :meth:`softrank.ModelData.batches` (every data pass),
the Gram kernel build, Lanczos steps and conjugate-gradient iterations. Code that loops call
:func:`bar` around its iterable; it returns the iterable unchanged (no tqdm object, no cost)
unless a caller enabled progress with :func:`progress`::

    with progress(self.verbose):
        result = self._measure(md, lam)

The switch is a :class:`contextvars.ContextVar`, so it is per thread and per task, and nested
``progress(False)`` blocks silence the code inside them.
"""
from __future__ import annotations

import contextvars
import sys
from contextlib import contextmanager

__all__ = ["progress", "bar", "enabled"]

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("softrank_progress", default=False)


def enabled() -> bool:
    """Whether progress bars are on in the current context."""
    return _ENABLED.get()


@contextmanager
def progress(verbose=True):
    """Show progress bars (on standard error) for the work inside the block when ``verbose``
    is true (a bool or an int > 0); silence them when it is false."""
    token = _ENABLED.set(bool(verbose))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def bar(iterable, *, desc: str, total: int | None = None, unit: str = "it"):
    """``iterable`` wrapped in a tqdm bar labelled ``desc`` when progress is on, else
    ``iterable`` itself. The bar disappears when the loop ends (``leave=False``), so nested
    loops do not stack up finished bars."""
    if not _ENABLED.get():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr,
                dynamic_ncols=True)
