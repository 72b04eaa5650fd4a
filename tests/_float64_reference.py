"""Independent float64 references for whole skorch-trained modules, one sample at a time.

Every reference here is built from a float64 copy of the module with plain reverse-mode autograd
(``torch.autograd.functional``) over ``torch.func.functional_call``, one sample at a time: no
layer records, no ``vmap``, so it holds for any differentiable module (shared weights, modules
called twice, LSTMs) and is independent of the paths softrank takes.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch.func import functional_call

__all__ = ["Reference64", "soft_rank", "rel_err"]


def rel_err(a, b) -> float:
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-300)


def soft_rank(M: torch.Tensor, lam: float) -> float:
    s = torch.linalg.eigvalsh(M)
    return float((s / (s + lam)).sum())


def _rows(X, i):
    """Row i (as a batch of one) of X, or the rows ``i`` if it is a slice."""
    sl = i if isinstance(i, slice) else slice(i, i + 1)
    if isinstance(X, dict):
        return {k: torch.as_tensor(np.asarray(v[sl])) for k, v in X.items()}
    return torch.as_tensor(np.asarray(X[sl]))


class Reference64:
    """F, C and H of the mean loss of ``module`` on (X, y), in float64.

    ``loss``: 'ce' (cross-entropy on logits, integer labels), 'bce' (binary cross-entropy on
    one logit, labels in {0, 1}) or 'mse' (mean squared error over the d outputs, targets
    (n, d)). ``names``: the parameters that count (default: all)."""

    def __init__(self, module, X, y, loss: str, names=None):
        self.m = copy.deepcopy(module).double().eval()
        allp = {k: v.detach() for k, v in self.m.named_parameters()}
        self.names = list(allp) if names is None else list(names)
        self.fixed = {k: v for k, v in allp.items() if k not in self.names}
        self.buffers = dict(self.m.named_buffers())
        self.shapes = [allp[k].shape for k in self.names]
        self.theta = torch.cat([allp[k].reshape(-1) for k in self.names])
        self.X, self.loss = X, loss
        self.n = len(y)
        self.y = torch.as_tensor(np.asarray(y))
        if loss in ("mse", "bce"):
            self.y = self.y.double().reshape(self.n, -1)
        J, Z = zip(*(self._jacobian(i) for i in range(self.n)))
        self.J, self.z = torch.stack(J), torch.stack(Z)  # (n, K, p), (n, K)

    def outputs(self, theta, xb):
        params, i = {}, 0
        for k, s in zip(self.names, self.shapes):
            params[k] = theta[i:i + s.numel()].reshape(s)
            i += s.numel()
        args, kwargs = ((), {k: self._f64(v) for k, v in xb.items()}) if isinstance(xb, dict) \
            else ((self._f64(xb),), None)
        out = functional_call(self.m, {**self.fixed, **self.buffers, **params}, args, kwargs)
        return (out[0] if isinstance(out, tuple) else out).reshape(-1)

    @staticmethod
    def _f64(t):
        return t.double() if t.is_floating_point() else t

    def _jacobian(self, i):
        xb = _rows(self.X, i)
        f = lambda th: self.outputs(th, xb)  # noqa: E731
        return torch.autograd.functional.jacobian(f, self.theta), f(self.theta).detach()

    # -- output space ---------------------------------------------------------------------------
    def _A(self):
        if self.loss == "bce":
            p = torch.sigmoid(self.z)
            return (p * (1 - p)).unsqueeze(2)
        if self.loss == "ce":
            p = torch.softmax(self.z, 1)
            return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        d = self.z.shape[1]
        return (2.0 / d) * torch.eye(d, dtype=torch.float64).expand(self.n, d, d)

    def _residual(self):
        if self.loss == "bce":
            return torch.sigmoid(self.z) - self.y
        if self.loss == "ce":
            return torch.softmax(self.z, 1) - torch.nn.functional.one_hot(
                self.y.long(), self.z.shape[1]).double()
        return 2.0 * (self.z - self.y) / self.z.shape[1]

    def _mean_loss(self, theta):
        """Mean loss, all samples in one forward pass (the modules here are per-sample in
        evaluation mode)."""
        z = self.outputs(theta, _rows(self.X, slice(None))).reshape(self.n, -1)
        if self.loss == "ce":
            return torch.nn.functional.cross_entropy(z, self.y.long())
        if self.loss == "bce":
            return torch.nn.functional.binary_cross_entropy_with_logits(z, self.y)
        return ((z - self.y) ** 2).mean()

    # -- matrices -------------------------------------------------------------------------------
    @property
    def F(self) -> torch.Tensor:
        return torch.einsum("nkp,nkl,nlq->pq", self.J, self._A(), self.J) / self.n

    @property
    def C(self) -> torch.Tensor:
        G = torch.einsum("nkp,nk->np", self.J, self._residual())
        return G.T @ G / self.n

    def H(self) -> torch.Tensor:
        """Reverse-over-reverse, one row per backward pass (no forward-mode AD: LSTMs)."""
        if not hasattr(self, "_H"):
            self._H = torch.autograd.functional.hessian(self._mean_loss, self.theta)
        return self._H

    def train_loss(self) -> float:
        return float(self._mean_loss(self.theta))

    def soft_rank(self, lam) -> float:
        return soft_rank(self.F, lam)

    def tic(self, lam) -> float:
        F = self.F
        return float(torch.linalg.solve(F + lam * torch.eye(len(F), dtype=F.dtype), self.C).trace())

    def gap(self, lam, n_train=None) -> float:
        """The soft-rank gap estimate (Tr C / Tr F) rank_λ(F) / n."""
        n = self.n if n_train is None else n_train
        return float(self.C.trace() / self.F.trace()) * self.soft_rank(lam) / n
