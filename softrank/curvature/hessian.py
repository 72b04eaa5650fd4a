r"""Hessian of the mean training loss, :math:`H = \nabla^2_\theta \frac1n\sum_i \ell_i`.

``hessian_vector_product`` streams batches (``torch.func.vjp`` of ``torch.func.grad``), for
matrix-free methods; the dense Hessian (small p) is built by
:func:`softrank.curvature.dense.dense_curvature` with ``matrix='hessian'``.
For ReLU networks :math:`\mathrm{Tr}\,H = \mathrm{Tr}\,F` exactly (every weight enters
linearly and relu'' = 0).
"""
from __future__ import annotations

import torch

__all__ = ["hessian_vector_product"]


def hessian_vector_product(md, v: torch.Tensor) -> torch.Tensor:
    """H v (float64) for v of shape (p,) or (p, m), streaming over batches."""
    md.require_labels("the Hessian")
    _, loss = md.functional_loss()
    theta = md.flat_params()
    grad = torch.func.grad(loss)
    v = v.to(md.device)
    cols = v.ndim == 2
    V = v if cols else v[:, None]
    out = torch.zeros(V.shape, dtype=torch.float64, device=md.device)
    for start in range(0, md.n, md.batch_size):
        xb = md.X[start:start + md.batch_size].to(md.device)
        yb = md.y[start:start + md.batch_size].to(md.device)

        # reverse-over-reverse (H is symmetric, so vjp of the gradient is H u): unlike
        # forward-over-reverse it also works for criteria without forward AD (e.g. HuberLoss)
        _, vjp = torch.func.vjp(lambda th: grad(th, xb, yb), theta)
        U = V.to(theta.dtype)
        try:
            out += torch.func.vmap(lambda u: vjp(u)[0], in_dims=1, out_dims=1)(U).double()
        except (RuntimeError, NotImplementedError):  # no batching rule (nn.LSTM in float64)
            out += torch.stack([vjp(u)[0] for u in U.T], 1).double()
    out /= md.n
    return out if cols else out[:, 0]
