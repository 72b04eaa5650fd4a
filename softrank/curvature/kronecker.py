r"""KFAC and EKFAC for ``nn.Linear`` and ``nn.Conv2d`` (block diagonal over layers).

Per layer, with the bias folded into the input (:math:`\tilde a = [a, 1]`, joint block
:math:`[W\,|\,b]`):

.. math::
    F_l \approx A_l \otimes G_l,\quad A_l = \tfrac1{nT}\sum_{i,t}\tilde a_{it}\tilde a_{it}^\top,
    \quad G_l = \tfrac1n\sum_{i,c,t} g_{ict} g_{ict}^\top

(the "expand" convention; T = 1 for Linear on flat inputs, the number of spatial positions for
Conv2d). With :math:`A = U_A\,\mathrm{diag}(a)\,U_A^\top`, :math:`G = U_G\,\mathrm{diag}(g)\,U_G^\top`
the eigenvalues are :math:`a_k g_j` and

.. math:: \mathrm{rank}_\lambda(F_{\mathrm{KFAC}}) = \sum_l\sum_{j,k}\frac{a_k g_j}{a_k g_j+\lambda_l}.

EKFAC (George et al., 2018) keeps the eigenbasis and re-fits the eigenvalues to the second
moments of the per-sample gradients in it,
:math:`s_{jk} = \frac1n\sum_{i,c}\big(U_G^\top \nabla_{W}(v_{ic}^\top z_i)\, U_A\big)_{jk}^2`,
which makes its trace exact and its Frobenius error to F no larger than KFAC's.
By default G uses the exact columns of :math:`B_i` (K backward passes); ``vectors='sampled'``
uses labels drawn from the model (one backward pass, but it fails on confident models:
sampled labels almost always equal the prediction).
"""
from __future__ import annotations

import torch

from .._symmetric_sum import SymmetricSum
from .base import Curvature

__all__ = ["KroneckerCurvature", "KroneckerSums", "require_kfac_capable"]


#: what a user of ``approximation=`` can choose instead of a Kronecker factorization
APPROXIMATION_ALTERNATIVES = "approximation='exact', 'gram', 'diagonal' or 'matrix_free'"


def require_kfac_capable(rules, what: str = "KFAC", alternatives: str | None = None) -> None:
    """Raise the layer's clear error when a rule has no Kronecker factorization; the message
    ends with ``alternatives`` (the caller's options without that restriction), if given."""
    for r in rules:
        if not r.kfac_capable:
            r.unsupported(what, alternatives)


class KroneckerSums:
    """Running float64 Kronecker-factor sums Σ ã ãᵀ / T and Σ g gᵀ, one pair per layer rule,
    over the layer records of the batches passed to :meth:`add`."""

    def __init__(self, rules):
        self.rules = rules
        self._A = [SymmetricSum() for _ in rules]
        self._G = [SymmetricSum() for _ in rules]

    def add(self, layers) -> None:
        for r, lb, A, G in zip(self.rules, layers, self._A, self._G):
            a, w, g = r.kfac_rows(lb)
            A.add(a, w)
            G.add(g)

    def factors(self, n: int):
        """(A, G): per-layer factors divided by n, on the CPU."""
        return ([a.value().cpu() / n for a in self._A], [g.value().cpu() / n for g in self._G])


class KroneckerCurvature(Curvature):
    def __init__(self, md, matrix="fisher", vectors="fisher", *, ekfac=False, generator=None,
                 mc_samples=1):
        super().__init__(md.param_names, md.sizes, md.n)
        self.matrix = matrix
        self.approximation = "ekfac" if ekfac else "kfac"
        self.rules = md.rules
        require_kfac_capable(self.rules, f"approximation={self.approximation!r}",
                             APPROXIMATION_ALTERNATIVES)
        sums = KroneckerSums(self.rules)
        for b in md.batches(vectors, generator, mc_samples):
            sums.add(b.layers)
        self.A, self.G = sums.factors(md.n)
        self._UA = self._UG = None  # eigenvectors: computed on first use (soft rank needs none)
        if ekfac:
            S = [torch.zeros(len(g), len(a), dtype=torch.float64) for a, g in zip(self.A, self.G)]
            for b in md.batches(vectors, generator, mc_samples):
                for k, (r, lb) in enumerate(zip(self.rules, b.layers)):
                    S[k] += self._squared_coords(r, lb, self.UA[k], self.UG[k]).cpu()
            self.E = [s / md.n for s in S]
        else:  # eigenvalues a_k g_j, (d_out, d_in~)
            self.E = [torch.outer(torch.linalg.eigvalsh(g).clamp_min(0),
                                  torch.linalg.eigvalsh(a).clamp_min(0))
                      for a, g in zip(self.A, self.G)]

    @classmethod
    def from_factors(cls, md, A, G, matrix="fisher"):
        """KFAC from factors ``A``, ``G`` (per layer, already divided by n) computed elsewhere,
        e.g. in a pass that also needs the layer records for something else. One ``eigh`` per
        factor gives both the eigenvalues and the eigenbasis (no second decomposition)."""
        self = cls.__new__(cls)
        Curvature.__init__(self, md.param_names, md.sizes, md.n)
        self.matrix, self.approximation, self.rules = matrix, "kfac", md.rules
        require_kfac_capable(self.rules)
        self.A, self.G = list(A), list(G)
        ea, self._UA = map(list, zip(*(torch.linalg.eigh(a) for a in self.A)))
        eg, self._UG = map(list, zip(*(torch.linalg.eigh(g) for g in self.G)))
        self.E = [torch.outer(g.clamp_min(0), a.clamp_min(0)) for a, g in zip(ea, eg)]
        return self

    @property
    def UA(self) -> list[torch.Tensor]:
        """Eigenvectors of the A factors (columns), one per layer."""
        self._eigenvectors()
        return self._UA

    @property
    def UG(self) -> list[torch.Tensor]:
        """Eigenvectors of the G factors (columns), one per layer."""
        self._eigenvectors()
        return self._UG

    def _eigenvectors(self):
        if self._UA is None:
            self._UA = [torch.linalg.eigh(a)[1] for a in self.A]
            self._UG = [torch.linalg.eigh(g)[1] for g in self.G]

    @staticmethod
    def _squared_coords(r, lb, UA, UG):
        x, y = r.eigen_coords(lb, UA.to(lb.g.device), UG.to(lb.g.device))
        if y is not None:
            return torch.einsum("vnj,nk->jk", x ** 2, y ** 2)
        return (x ** 2).sum((0, 1))

    # -- layout helpers --------------------------------------------------------------------
    def _layer_lam(self, lam):
        L = self.lam(lam)
        vals = L.tensor_values(f"approximation={self.approximation!r}")
        out, i = [], 0
        for r in self.rules:
            v = vals[i:i + len(r.param_names)]
            if len(set(v)) != 1:
                raise ValueError(
                    f"{self.approximation.upper()} folds the bias of {r.name!r} into its weight "
                    "block, so weight and bias need the same lam; got " + str(v)
                    + " (for an effective Λ: effective_lam(..., per='layer'))")
            out.append(v[0])
            i += len(r.param_names)
        return out

    def _apply(self, v, fn):
        """Per layer: U_G (fn(E) ∘ (U_Gᵀ M U_A)) U_Aᵀ on the joint-block view of v."""
        v = v.to(torch.float64)
        cols = v.ndim == 2
        vt = v.T if cols else v
        out, i = [], 0
        for k, r in enumerate(self.rules):
            Mk = r.from_flat(vt[..., i:i + r.numel])
            rot = self.UG[k].T @ Mk @ self.UA[k]
            out.append(r.to_flat(self.UG[k] @ (fn(k) * rot) @ self.UA[k].T))
            i += r.numel
        res = torch.cat(out, -1)
        return res.T if cols else res

    # -- interface -------------------------------------------------------------------------
    def eigvals(self):
        return torch.sort(torch.cat([e.reshape(-1) for e in self.E])).values

    def trace(self):
        return float(sum(e.sum() for e in self.E))

    def diagonal(self):
        return torch.cat([r.to_flat((ug ** 2) @ e @ (ua ** 2).T)
                          for r, ua, ug, e in zip(self.rules, self.UA, self.UG, self.E)])

    def matvec(self, v):
        return self._apply(v, lambda k: self.E[k])

    def solve(self, v, lam):
        lams = self._layer_lam(lam)
        return self._apply(v, lambda k: 1.0 / (self.E[k] + lams[k]))

    def soft_rank(self, lam):
        lams = self._layer_lam(lam)
        return float(sum((e / (e + l)).sum() for e, l in zip(self.E, lams)))

    def logdet_dim(self, lam):
        lams = self._layer_lam(lam)
        return float(sum(torch.log1p(e / l).sum() for e, l in zip(self.E, lams)))

    def tic_sum(self, rules, feats, lam) -> float:
        """Σ_i g_iᵀ(M+Λ)⁻¹g_i, layer by layer in the Kronecker eigenbasis."""
        lams = self._layer_lam(lam)
        W = [1.0 / (e + l) for e, l in zip(self.E, lams)]
        total = 0.0
        for b in feats:
            for k, (r, lb) in enumerate(zip(self.rules, b.layers)):
                dev = lb.g.device
                x, y = r.eigen_coords(lb, self.UA[k].to(dev), self.UG[k].to(dev))
                Wk = W[k].to(dev)
                if y is not None:
                    total += float(torch.einsum("vnj,jk,nk->", x ** 2, Wk, y ** 2))
                else:
                    total += float((x ** 2 * Wk).sum())
        return total

    def output_blocks(self, layers, lam) -> torch.Tensor:
        r"""(N, V, V) blocks :math:`G_i (M+\Lambda)^{-1} G_i^\top` for the per-sample gradient
        rows :math:`G_i` recorded in ``layers`` (e.g. the Jacobian rows, ``vectors='jacobian'``)."""
        lams = self._layer_lam(lam)
        out = 0.0
        for k, (r, lb) in enumerate(zip(self.rules, layers)):
            dev = lb.g.device
            W = (1.0 / (self.E[k] + lams[k])).to(dev)
            x, y = r.eigen_coords(lb, self.UA[k].to(dev), self.UG[k].to(dev))
            if y is not None:  # x: (V, N, d_out), y: (N, d_in~)
                xw = x * ((y ** 2) @ W.T)
            else:  # x: (V, N, d_out, d_in~)
                xw, x = (x * W).flatten(2), x.flatten(2)
            out = out + torch.bmm(xw.transpose(0, 1), x.permute(1, 2, 0))  # (N, V, V)
        return out
