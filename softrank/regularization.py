r"""The Tikhonov term :math:`\tfrac12\theta^\top\Lambda\theta`: the weight decay of a mean-loss
objective.

:math:`\Lambda` is a scalar, a per-parameter-tensor value (a dict ``{name: value}``, e.g. from
optimizer parameter groups) or a full per-element diagonal (a 1-D tensor of length ``p``).
:func:`as_lam` validates it against a parameter layout; the result tells each curvature
representation what form it has, so a representation that only supports a scalar or a
per-tensor value can say so clearly.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from numbers import Real

import torch

__all__ = ["Lam", "as_lam"]


@dataclass(frozen=True)
class Lam:
    """A validated :math:`\\Lambda` over a parameter layout (names and sizes, in order)."""

    vector: torch.Tensor  # (p,) float64, > 0
    scalar: float | None  # set when Λ = λ I
    per_tensor: tuple[float, ...] | None  # set when Λ is constant on each parameter tensor
    #: (p,) float64 point the penalty ½(θ − c)ᵀΛ(θ − c) pulls toward; None: the origin
    center: torch.Tensor | None = None

    def tensor_values(self, what: str) -> tuple[float, ...]:
        if self.per_tensor is None:
            raise ValueError(f"{what} supports a scalar or per-parameter-tensor lam, not a "
                             "per-element diagonal; pass a float or a dict {parameter name: value} "
                             "(for an effective Λ: effective_lam(..., per='layer' or 'scalar'))")
        return self.per_tensor

    def describe(self):
        return self.scalar if self.scalar is not None else self.per_tensor or "per-element"


def _check_positive(values, what="lam"):
    t = torch.as_tensor(values, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} must be finite; got {values!r}")
    if (t <= 0).any():
        raise ValueError(
            f"{what} must be > 0 (it is the weight-decay coefficient Λ in mean loss + ½θᵀΛθ); "
            f"got {values!r}. Train with weight_decay > 0 or pass a positive lam.")
    return t


def as_lam(lam, names: list[str], sizes: list[int]) -> Lam:
    """Validate ``lam`` (float, dict name→float, or (p,) tensor) against a parameter layout."""
    if isinstance(lam, Lam):
        return lam
    from .effective import EffectiveLam

    if isinstance(lam, EffectiveLam):
        if list(lam.param_names) != list(names):
            raise ValueError("this effective Λ was computed for parameters "
                             f"{list(lam.param_names)}, but the measured ones are {names}; "
                             "compute it with the same params=")
        return replace(as_lam(lam.lam, names, sizes), center=lam.center)
    if isinstance(lam, str):
        raise ValueError(f"lam={lam!r} is resolved by the estimators; here pass a positive "
                         "number, a dict, a tensor or softrank.effective_lam(...)")
    p = sum(sizes)
    if isinstance(lam, bool) or lam is None:
        raise TypeError(f"lam must be a positive number, a dict or a tensor; got {lam!r}")
    if isinstance(lam, Real) or (torch.is_tensor(lam) and lam.ndim == 0):
        v = float(_check_positive(float(lam)))
        return Lam(torch.full((p,), v, dtype=torch.float64), v, tuple(v for _ in names))
    if isinstance(lam, dict):
        unknown = set(lam) - set(names)
        if unknown:
            raise ValueError(f"lam has entries for unknown parameters {sorted(unknown)}; "
                             f"the measured parameters are {names}")
        missing = [n for n in names if n not in lam]
        if missing:
            raise ValueError(f"lam has no value for parameters {missing}; give every measured "
                             "parameter a positive value (or pass a float)")
        vals = tuple(float(_check_positive(float(lam[n]), f"lam[{n!r}]")) for n in names)
        vec = torch.cat([torch.full((s,), v, dtype=torch.float64) for v, s in zip(vals, sizes)])
        scalar = vals[0] if len(set(vals)) == 1 else None
        return Lam(vec, scalar, vals)
    vec = _check_positive(torch.as_tensor(lam, dtype=torch.float64).detach().cpu().reshape(-1))
    if vec.numel() != p:
        raise ValueError(f"lam has {vec.numel()} entries but the measured parameters have p={p}")
    chunks = vec.split(sizes)
    per_tensor = tuple(float(c[0]) for c in chunks) if all(
        bool((c == c[0]).all()) for c in chunks) else None
    scalar = float(vec[0]) if bool((vec == vec[0]).all()) else None
    return Lam(vec, scalar, per_tensor)
