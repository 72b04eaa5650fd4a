r"""Per-layer rules: what one backward pass gives about one parameter-owning module.

A forward pass records each tracked module's input, a backward pass of vectors
:math:`v_{ic}` (columns of :math:`B_i`, residuals, or sampled residuals) gives the gradient of
:math:`v_{ic}^\top z_i` with respect to the module's output. From that pair (a
:class:`LayerBatch`) a rule computes, without going through the full parameter vector:

* per-sample gradients (materialized, one layer at a time),
* Gram kernels :math:`\langle \nabla_\theta v_{ic}^\top z_i, \nabla_\theta v_{jd}^\top z_j\rangle`
  (for ``nn.Linear`` as :math:`(\tilde a_i\cdot\tilde a_j)(g_{ic}\cdot g_{jd})`, no per-sample
  gradient is formed),
* Kronecker factors (KFAC) and eigenbasis coordinates (EKFAC) for ``Linear`` and ``Conv2d``.

Such records are exact when each parameter enters the network only through the one call of
the module that owns it. Where it does not (weights tied between modules, a module called twice,
a module returning a tuple such as ``nn.LSTM``), :class:`JacobianRule` takes every selected
parameter at once, its records being the per-sample gradients themselves, from whole-network
per-sample Jacobians.

Parameter layout inside a rule: the module's selected parameters in registration order,
each flattened row-major (``weight`` then ``bias``), as in ``module.parameters()``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as Fn


__all__ = ["LayerBatch", "LayerRule", "JacobianRule", "rule_for", "UnsupportedLayerError"]

KRONECKER_LAYERS = "nn.Linear or nn.Conv2d (groups=1, zero padding)"


class UnsupportedLayerError(TypeError):
    """A layer has no rule for the requested approximation (e.g. KFAC on BatchNorm)."""


@dataclass
class LayerBatch:
    """One tracked module on one batch: inputs and backpropagated output gradients.

    ``a``: (N, T, d_in) patches/inputs (float64) for Linear/Conv2d, else the raw input tuple
    (None for a module that was not called, and for :class:`JacobianRule`);
    ``g``: (V, N, T, d_out) output gradients (float64) for Linear/Conv2d, else (V, N, *out);
    for :class:`JacobianRule` the (V, N, p) per-sample gradients.
    """

    a: object
    g: torch.Tensor


class LayerRule:
    """Generic rule: per-sample gradients of the module's own parameters through ``vmap(vjp)``."""

    kfac_capable = False

    def __init__(self, name: str, module: nn.Module, param_names: list[str]):
        self.name, self.module, self.param_names = name, module, param_names
        params = dict(module.named_parameters(recurse=False))
        self.shapes = [params[n].shape for n in param_names]
        self.sizes = [params[n].numel() for n in param_names]
        self.numel = sum(self.sizes)

    # -- recording -------------------------------------------------------------------------
    def call_problem(self, calls, n: int) -> str | None:
        """Why the recorded ``calls`` [(args, kwargs, output)] of one forward pass of ``n``
        samples cannot give exact records (None when they can): the generic rule replays one
        call, sample by sample, from its positional tensor arguments."""
        what = f"module {self.name!r} ({type(self.module).__name__})"
        if len(calls) > 1:
            return f"{what} is called {len(calls)} times in one forward pass"
        if not calls:
            return None
        args, kwargs, out = calls[0]
        if not torch.is_tensor(out):
            return f"{what} returns a {type(out).__name__}, not a tensor"
        if kwargs or not args or not all(torch.is_tensor(a) and a.ndim and len(a) == n
                                          for a in args) or len(out) != n:
            return f"{what} is not called on batch-first tensor arguments only"
        return None

    def record_input(self, args):
        return tuple(x.detach() for x in args)

    def record_grad(self, grads: torch.Tensor):  # (V, N, *out)
        return grads.double()

    def zero_record(self, V: int, N: int, device) -> LayerBatch:
        """The record of a module that was not called: its parameters have zero gradient."""
        return LayerBatch(None, torch.zeros(V, N, 1, dtype=torch.float64, device=device))

    # -- derived quantities ----------------------------------------------------------------
    def per_sample_grads(self, lb: LayerBatch) -> torch.Tensor:
        """(V, N, numel) per-sample gradients of :math:`v_{ic}^\\top z_i` (float64)."""
        if lb.a is None:  # not called
            return lb.g.new_zeros(*lb.g.shape[:2], self.numel)
        module = self.module
        params = {n: p.detach() for n, p in module.named_parameters(recurse=False)
                  if n in self.param_names}

        def one(args_i, g_i):
            def f(p):
                out = torch.func.functional_call(module, p, tuple(a.unsqueeze(0) for a in args_i))
                return out.squeeze(0)
            _, vjp = torch.func.vjp(f, params)
            (grads,) = vjp(g_i.to(next(iter(params.values())).dtype))
            return torch.cat([grads[n].reshape(-1) for n in self.param_names])

        per_v = torch.func.vmap(one)
        return torch.stack([per_v(lb.a, gv) for gv in lb.g]).double()

    def _weight_flat(self, w, like):
        """Per-element weights (numel,) from per-parameter weights ``w`` (or None)."""
        if w is None:
            return None
        return torch.cat([torch.full((k,), float(wi), dtype=like.dtype, device=like.device)
                          for wi, k in zip(w, self.sizes)])

    def kernel(self, lb1: LayerBatch, lb2: LayerBatch, w=None) -> torch.Tensor:
        """(N1, V1, N2, V2) Gram block of this layer; ``w``: per-parameter weights (1/λ)."""
        s1, s2 = self.per_sample_grads(lb1), self.per_sample_grads(lb2)
        wf = self._weight_flat(w, s1)
        if wf is not None:
            s1 = s1 * wf
        V1, N1, _ = s1.shape
        V2, N2, _ = s2.shape
        k = s1.transpose(0, 1).reshape(N1 * V1, -1) @ s2.transpose(0, 1).reshape(N2 * V2, -1).T
        return k.reshape(N1, V1, N2, V2)

    def diag_sum(self, lb: LayerBatch) -> torch.Tensor:
        """Σ_{i,c} (∂ v_icᵀ z_i / ∂θ)² over the batch, (numel,)."""
        return self.per_sample_grads(lb).pow(2).sum((0, 1))

    def grad_sum(self, lb: LayerBatch) -> torch.Tensor:
        return self.per_sample_grads(lb).sum((0, 1))

    def jvp(self, lb: LayerBatch, v: torch.Tensor) -> torch.Tensor:
        """(V, N): per-sample directional derivatives ⟨∂ v_icᵀz_i/∂θ, v⟩ for v (numel,)."""
        return self.per_sample_grads(lb) @ v

    def vjp(self, lb: LayerBatch, u: torch.Tensor) -> torch.Tensor:
        """(numel,): Σ_{i,c} u_ic ∂ v_icᵀz_i/∂θ for u (V, N)."""
        return torch.einsum("vnp,vn->p", self.per_sample_grads(lb), u)

    # KFAC-only methods are defined by KroneckerRule
    def unsupported(self, what: str, alternatives: str | None = None):
        """Raise the clear error of a Kronecker-factored ``what`` on this layer; ``alternatives``
        (options of the caller without that restriction) end the message."""
        raise UnsupportedLayerError(
            f"{what} does not support layer {self.name!r} ({type(self.module).__name__}); it "
            f"factorizes only {KRONECKER_LAYERS} layers. Restrict `params` to such layers"
            + (f", or use {alternatives}." if alternatives else "."))


class JacobianRule(LayerRule):
    r"""Every selected parameter of the network at once. Its record of a batch is the
    (V, N, p) per-sample gradients :math:`J_i^\top v_{ic}` themselves, from whole-network
    per-sample Jacobians (:meth:`softrank.model.ModelData.jacobians`): exact for any
    differentiable module, with any parameter sharing, at the memory of materializing them.
    ``reasons`` say why layer-by-layer records were not exact."""

    def __init__(self, net: nn.Module, param_names: list[str], reasons: list[str]):
        named = dict(net.named_parameters())
        self.name, self.module, self.param_names = "", net, list(param_names)
        self.shapes = [named[n].shape for n in param_names]
        self.sizes = [named[n].numel() for n in param_names]
        self.numel = sum(self.sizes)
        self.reasons = list(reasons)

    def per_sample_grads(self, lb: LayerBatch) -> torch.Tensor:
        return lb.g

    def unsupported(self, what: str, alternatives: str | None = None):
        raise UnsupportedLayerError(
            f"{what} needs every measured parameter to belong to one {KRONECKER_LAYERS} layer "
            "called once per forward pass; here " + "; ".join(self.reasons) + ". Restrict "
            "`params` to such layers" + (f", or use {alternatives}." if alternatives else "."))


class KroneckerRule(LayerRule):
    r"""Linear and Conv2d: the per-sample gradient of the joint block :math:`[W\,|\,b]` is
    :math:`\sum_t g_t \tilde a_t^\top` with :math:`\tilde a_t = [a_t, 1]` (bias folded into the
    input factor; the KFAC convention of softrank)."""

    kfac_capable = True

    def __init__(self, name, module, param_names):
        super().__init__(name, module, param_names)
        self.has_w = "weight" in param_names
        self.has_b = "bias" in param_names
        w = module.weight
        self.d_out = w.shape[0]
        self.d_in = w[0].numel()  # Cin*kh*kw for conv
        if param_names != [n for n in ("weight", "bias") if n in param_names]:
            raise UnsupportedLayerError(f"unexpected parameters {param_names} in {self.name!r}")

    def call_problem(self, calls, n):
        if len(calls) > 1:
            return (f"module {self.name!r} ({type(self.module).__name__}) is called "
                    f"{len(calls)} times in one forward pass")
        return None

    def zero_record(self, V, N, device):
        return LayerBatch(torch.zeros(N, 1, self.d_in, dtype=torch.float64, device=device),
                          torch.zeros(V, N, 1, self.d_out, dtype=torch.float64, device=device))

    @property
    def d_in_tilde(self):
        return (self.d_in if self.has_w else 0) + (1 if self.has_b else 0)

    def _tilde(self, a, w=None):  # (N, T, d_in) -> (N, T, d_in~), columns scaled by sqrt(w)
        sw = [1.0, 1.0] if w is None else [float(x) ** 0.5 for x in w]
        parts = []
        if self.has_w:
            parts.append(a if sw[0] == 1.0 else a * sw[0])
        if self.has_b:
            parts.append(torch.full_like(a[..., :1], sw[-1]))
        return torch.cat(parts, -1)

    def per_sample_matrices(self, lb: LayerBatch) -> torch.Tensor:
        """(V, N, d_out, d_in~) per-sample gradients of the joint block."""
        return torch.einsum("vnto,ntk->vnok", lb.g, self._tilde(lb.a))

    def to_flat(self, mats: torch.Tensor) -> torch.Tensor:
        """(..., d_out, d_in~) joint-block matrices -> (..., numel) in parameter layout."""
        parts = []
        if self.has_w:
            parts.append(mats[..., : self.d_in].reshape(*mats.shape[:-2], -1))
        if self.has_b:
            parts.append(mats[..., -1])
        return torch.cat(parts, -1)

    def from_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """(..., numel) -> (..., d_out, d_in~)."""
        lead = flat.shape[:-1]
        parts = []
        if self.has_w:
            parts.append(flat[..., : self.d_out * self.d_in].reshape(*lead, self.d_out, self.d_in))
        if self.has_b:
            parts.append(flat[..., -self.d_out:].unsqueeze(-1))
        return torch.cat(parts, -1)

    def per_sample_grads(self, lb):
        return self.to_flat(self.per_sample_matrices(lb))

    def kernel(self, lb1, lb2, w=None):
        a1, a2 = self._tilde(lb1.a, w), self._tilde(lb2.a, w)
        T = a1.shape[1]
        if T == 1:  # (ã_i·ã_j)(g_ic·g_jd): no per-sample gradient is formed
            aa = a1[:, 0] @ a2[:, 0].T
            (V1, N1), (V2, N2) = lb1.g.shape[:2], lb2.g.shape[:2]
            g1 = lb1.g[:, :, 0].transpose(0, 1).reshape(N1 * V1, -1)  # rows (i, c)
            g2 = lb2.g[:, :, 0].transpose(0, 1).reshape(N2 * V2, -1)
            return (g1 @ g2.T).view(N1, V1, N2, V2).mul_(aa[:, None, :, None])
        if T * T <= self.numel:  # Σ_{t,s} (ã_it·ã_js)(g_ict·g_jds)
            aa = torch.einsum("itk,jsk->itjs", a1, a2)
            gg = torch.einsum("aitk,bjsk->iatjbs", lb1.g, lb2.g)
            return torch.einsum("itjs,iatjbs->iajb", aa, gg)
        return super().kernel(lb1, lb2, w)

    def diag_sum(self, lb):
        a = self._tilde(lb.a)
        if a.shape[1] == 1:
            return self.to_flat(torch.einsum("vno,nk->ok", lb.g[:, :, 0] ** 2, a[:, 0] ** 2))
        return super().diag_sum(lb)

    def grad_sum(self, lb):
        return self.to_flat(torch.einsum("vnto,ntk->ok", lb.g, self._tilde(lb.a)))

    def jvp(self, lb, v):
        return torch.einsum("vnto,ok,ntk->vn", lb.g, self.from_flat(v), self._tilde(lb.a))

    def vjp(self, lb, u):
        return self.to_flat(torch.einsum("vnto,vn,ntk->ok", lb.g, u, self._tilde(lb.a)))

    # -- KFAC ------------------------------------------------------------------------------
    def kfac_rows(self, lb):
        """(rows of ã, their weight 1/T, rows of g): the batch's KFAC sums are
        Σ_{i,t} ã ãᵀ / T and Σ_{i,c,t} g gᵀ (the 'expand' convention for Conv2d)."""
        return self._tilde(lb.a).flatten(0, 1), 1.0 / lb.a.shape[1], lb.g.flatten(0, 2)

    def eigen_coords(self, lb, UA, UG):
        """Per-sample gradients in the Kronecker eigenbasis, squared and summed over t:
        returns ((U_Gᵀ g)_v,n , (U_Aᵀ ã)_n) factors when T == 1, else full (V,N,d_out,d_in~)."""
        a = self._tilde(lb.a)
        if a.shape[1] == 1:
            return lb.g[:, :, 0] @ UG, a[:, 0] @ UA
        return UG.T @ self.per_sample_matrices(lb) @ UA, None


class LinearRule(KroneckerRule):
    def record_input(self, args):
        (x,) = args
        return x.detach().double().reshape(x.shape[0], -1, x.shape[-1])

    def record_grad(self, grads):  # (V, N, *, d_out)
        V, N = grads.shape[:2]
        return grads.double().reshape(V, N, -1, grads.shape[-1])


class Conv2dRule(KroneckerRule):
    def record_input(self, args):
        (x,) = args
        m = self.module
        cols = Fn.unfold(x.detach().double(), m.kernel_size, m.dilation, m.padding, m.stride)
        return cols.transpose(1, 2)  # (N, T, Cin*kh*kw)

    def record_grad(self, grads):  # (V, N, Cout, H, W)
        V, N, C = grads.shape[:3]
        return grads.double().reshape(V, N, C, -1).transpose(2, 3)  # (V, N, T, Cout)


def per_sample_gradients(rules, layers) -> torch.Tensor:
    """(V, N, p) per-sample gradients of one batch's layer records (one per rule, as
    :meth:`softrank.model.ModelData.batches` yields them), in parameter order, float64."""
    return torch.cat([r.per_sample_grads(lb) for r, lb in zip(rules, layers)], -1)


def rule_for(name: str, module: nn.Module, param_names: list[str]) -> LayerRule:
    if type(module) is nn.Linear:
        return LinearRule(name, module, param_names)
    if (type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)):
        return Conv2dRule(name, module, param_names)
    return LayerRule(name, module, param_names)
