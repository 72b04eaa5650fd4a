r"""A trained network together with the data it is measured on.

:class:`ModelData` is the one entry point of the curvature layer: it holds a private evaluation
copy of the module (the user's model is never touched: SPEC §6), the loss family of the
criterion, the parameters that count, and the data, and it streams batches of

* network outputs :math:`z_i` (2-D, ``(N, K)``),
* per-layer inputs and backpropagated output gradients (:class:`~softrank.layers.LayerBatch`)
  for the vectors that define each matrix: columns of :math:`B_i` (F), residuals :math:`r_i`
  (C) or residuals at labels sampled from the model (F_MC).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .families import LossFamily, UnsupportedCriterionError, family_for
from .layers import LayerBatch, LayerRule, UnsupportedLayerError, rule_for

__all__ = ["ModelData", "Batch"]


@dataclass
class Batch:
    z: torch.Tensor  # (N, K) float64 outputs
    y: torch.Tensor | None
    layers: list[LayerBatch] | None  # one per tracked module (same order as ModelData.rules)
    index: slice


def _to_tensor(a, name):
    if torch.is_tensor(a):
        t = a.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(a))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be an array-like or a tensor; got {type(a).__name__}") from e
    return t


def _all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """``torch.isfinite(t).all()`` over blocks of rows of about ``chunk`` elements: the whole-
    tensor check makes temporaries about twice the size of ``t`` (measured: +0.3 GiB for the
    60,000 MNIST images), the blocks only of one block."""
    if t.ndim == 0 or len(t) == 0:
        return bool(torch.isfinite(t).all())
    rows = max(1, chunk // max(1, t[0].numel()))
    return all(bool(torch.isfinite(t[i:i + rows]).all()) for i in range(0, len(t), rows))


def _check_outputs(z: torch.Tensor, rows) -> None:
    """Raise a clear error when network outputs are NaN or inf (before any curvature)."""
    bad = ~torch.isfinite(z.detach()).all(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        first = (rows.start or 0) + i if isinstance(rows, slice) else int(rows[i])
        raise ValueError(
            f"the network outputs z (the criterion's input) are NaN or inf for {int(bad.sum())} "
            f"of {len(z)} samples of a batch (first: sample {first}); every curvature and loss "
            "would be undefined. The model is broken (diverged training?) or its output is not "
            "what the criterion expects (e.g. log of a non-probability).")


def _check_curvature_vectors(vecs: torch.Tensor, family, what: str) -> None:
    if not bool(torch.isfinite(vecs).all()):
        raise ValueError(
            f"the output-space curvature vectors ({what}) of {family!r} are NaN or inf at finite "
            "network outputs: the criterion's derivatives overflow there (e.g. exp of a large "
            "log-rate); rescale the outputs or use a criterion with finite curvature")


class ModelData:
    """A network, its criterion and data, ready for curvature computations.

    Parameters
    ----------
    module : nn.Module
        The trained network. A private copy in evaluation mode is used.
    criterion : nn.Module
        The loss the network was trained with (a criterion of the family table, or any
        other twice-differentiable one; options such as ``ignore_index`` are honoured).
    X, y : array-like or tensors
        The data (training data for the measures). ``y`` may be None for label-free quantities.
    params : None, list of names, or callable(name, parameter) -> bool
        Which parameters count (default: all with ``requires_grad``).
    output_transform : callable, optional
        Maps the module output to :math:`z` (skorch's NLLLoss classifier: ``log(p + eps)``).
    batch_size : int
        Samples per batch for streaming.
    n_train : int, optional
        n of the gap estimates: the number of samples the model was trained on (default len(X)).
    device, dtype : optional
        Where/in which precision the copy runs (default: the module's). Sums are float64 anyway.
    """

    n_ignored = 0  # samples dropped because their label is the criterion's ignore_index

    def __init__(self, module: nn.Module, criterion: nn.Module, X, y=None, *,
                 params: None | Sequence[str] | Callable = None,
                 output_transform: Callable | None = None, batch_size: int = 256,
                 n_train: int | None = None, device=None, dtype: torch.dtype | None = None):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
        if isinstance(criterion, type):
            criterion = criterion()
        if not isinstance(criterion, nn.Module):
            raise TypeError(f"criterion must be a loss module such as nn.CrossEntropyLoss(); "
                            f"got {type(criterion).__name__}")
        if batch_size is None or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        self.criterion = criterion
        self.family: LossFamily = family_for(criterion)
        self.output_transform = output_transform
        self.batch_size = int(batch_size)

        net = copy.deepcopy(module)
        if device is not None:
            net = net.to(device)
        if dtype is not None:
            net = net.to(dtype)
        net.eval()
        self.net = net
        self.param_names, selected = self._select(net, params)
        for name, p in net.named_parameters():
            if not torch.isfinite(p).all():
                raise ValueError(f"parameter {name!r} contains NaN or inf; the model is broken "
                                 "(diverged training?) and its curvature is undefined")
            p.requires_grad_(name in selected)
        self.params = [selected[n] for n in self.param_names]
        self.sizes = [p.numel() for p in self.params]
        self.n_params = sum(self.sizes)
        first = next(net.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.dtype = first.dtype if first is not None else torch.float32
        self._rules: list[LayerRule] | None = None
        self._set_data(X, y)
        self.n_train = self.n if n_train is None else int(n_train)
        if self.n_train < 1:
            raise ValueError(f"n_train must be >= 1; got {n_train}")

    # -- set-up ----------------------------------------------------------------------------
    @staticmethod
    def _select(net, params):
        named = dict(net.named_parameters())
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
        elif callable(params):
            names = [n for n, p in named.items() if params(n, p)]
        else:
            names = list(params) if not isinstance(params, str) else [params]
            unknown = [n for n in names if n not in named]
            if unknown:
                raise ValueError(f"params names {unknown} are not parameters of the module; "
                                 f"available: {list(named)}")
            names = [n for n in named if n in set(names)]  # module order
        if not names:
            raise ValueError("no parameters selected: the module has no trainable parameters, or "
                             "`params` matched none")
        return names, {n: named[n] for n in names}

    def _set_data(self, X, y):
        X = _to_tensor(X, "X")
        if X.ndim == 0 or len(X) == 0:
            raise ValueError("empty dataset: X has no samples; pass at least one sample")
        if X.is_floating_point():
            if not _all_finite(X):
                raise ValueError("X contains NaN or inf; clean or impute the inputs first")
            X = X.to(self.dtype)
        self.X = X
        self.n = len(X)
        self.y = None
        if y is not None:
            y = _to_tensor(y, "y")
            if len(y) != self.n:
                raise ValueError(f"X and y have different numbers of samples: {self.n} vs {len(y)}")
            if y.is_floating_point() and not _all_finite(y):
                raise ValueError("y contains NaN or inf")
            self.y = y
            self._drop_ignored()
        with torch.no_grad():
            try:
                z = self._outputs(self.X[: min(self.n, self.batch_size)].to(self.device))
            except RuntimeError as e:
                raise ValueError(f"the module cannot process X of shape {tuple(self.X.shape)}: {e}. "
                                 "Check that X has the number of features the module expects."
                                 ) from e
        _check_outputs(z, slice(0, len(z)))
        self.n_outputs = z.shape[1]
        if self.y is not None:
            self.family.check_target(self.y, z if len(z) == self.n else
                                     torch.empty(self.n, z.shape[1]))

    def _drop_ignored(self) -> None:
        """Samples labelled with the criterion's ``ignore_index`` are not in the loss as trained
        (the criterion's mean runs over the other samples): drop them, so that they enter
        neither the loss nor F, C, H nor the number of samples ``n``."""
        ignore = getattr(self.criterion, "ignore_index", None)
        if ignore is None or self.y.ndim != 1:  # class-probability targets ignore nothing
            return
        keep = self.y != ignore
        self.n_ignored = int((~keep).sum())
        if self.n_ignored == 0:
            return
        if self.n_ignored == self.n:
            raise ValueError(f"every label equals the criterion's ignore_index={ignore}: no "
                             "sample enters the loss, so there is nothing to measure")
        self.X, self.y = self.X[keep], self.y[keep]
        self.n = len(self.y)

    def require_fisher(self, what: str) -> None:
        if not self.family.is_fisher:
            family_for(self.criterion, require_fisher=True)
            raise UnsupportedCriterionError(what)  # pragma: no cover - family_for raised

    def require_labels(self, what: str) -> None:
        if self.y is None:
            raise ValueError(f"{what} needs labels: pass y")

    # -- layout ----------------------------------------------------------------------------
    @property
    def rules(self) -> list[LayerRule]:
        """One rule per module that owns selected parameters, in parameter order."""
        if self._rules is None:
            owner = {}
            rules = []
            for mname, mod in self.net.named_modules():
                own = [n for n, p in mod.named_parameters(recurse=False)
                       if f"{mname}.{n}".lstrip(".") in set(self.param_names)]
                for n in own:
                    key = id(getattr(mod, n))
                    if key in owner:
                        raise UnsupportedLayerError(
                            f"parameter {mname}.{n} is shared with {owner[key]}; layer-wise "
                            "approximations need untied weights: use approximation='dense'")
                    owner[key] = f"{mname}.{n}"
                if own:
                    rules.append(rule_for(mname, mod, own))
            order = [f"{r.name}.{n}".lstrip(".") for r in rules for n in r.param_names]
            assert order == self.param_names, (order, self.param_names)
            self._rules = rules
        return self._rules

    def flat_params(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    # -- streaming -------------------------------------------------------------------------
    def _outputs(self, xb):
        out = self.net(xb)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if self.output_transform is not None:
            out = self.output_transform(out)
        return out.reshape(len(xb), -1)

    def _targets(self, sl, z):
        if self.y is None:
            return None
        return self.family.prepare_target(self.y[sl].to(self.device), z)

    def batches(self, vectors: str | None = None, generator: torch.Generator | None = None,
                mc_samples: int = 1, indices: torch.Tensor | None = None) -> Iterator[Batch]:
        """Stream batches. ``vectors``: None (outputs only), 'fisher' (columns of B_i),
        'residual' (r_i at the true label), 'sampled' (r_i at labels drawn from the model,
        ``mc_samples`` per input, scaled by 1/√mc_samples) or 'jacobian' (unit vectors: the
        rows of J_i). ``indices`` restricts the stream to those samples."""
        if vectors == "residual":
            self.require_labels("the gradient second moment C")
        if vectors == "sampled":
            self.require_fisher("a sampled Fisher")
        N = self.n if indices is None else len(indices)
        for start in range(0, N, self.batch_size):
            sl = slice(start, min(start + self.batch_size, N))
            rows = sl if indices is None else indices[sl]
            xb = self.X[rows].to(self.device)
            if vectors is None:
                with torch.no_grad():
                    z = self._outputs(xb)
                _check_outputs(z, rows)
                yield Batch(z.double(), self._targets(rows, z), None, sl)
                continue
            yield self._backprop(xb, rows, sl, vectors, generator, mc_samples)

    def _backprop(self, xb, rows, sl, vectors, generator, mc_samples):
        rules = self.rules
        inputs, outputs, calls = {}, {}, {}

        def hook(i):
            def f(mod, args, out):
                calls[i] = calls.get(i, 0) + 1
                inputs[i], outputs[i] = args, out
            return f

        handles = [r.module.register_forward_hook(hook(i)) for i, r in enumerate(rules)]
        try:
            with torch.enable_grad():
                z = self._outputs(xb)
        finally:
            for h in handles:
                h.remove()
        for i, r in enumerate(rules):
            if calls.get(i, 0) != 1:
                raise UnsupportedLayerError(
                    f"module {r.name!r} ran {calls.get(i, 0)} times in one forward pass; layer-wise "
                    "computations need each parameter-owning module called once: use "
                    "approximation='dense'")
        _check_outputs(z, rows)
        y = self._targets(rows, z)
        zd = z.detach().double()  # r_i and B_i in float64: a float32 π_y rounds to 1 (r_y to 0)
        if vectors == "fisher":
            vecs = self.family.factor(zd, y).permute(2, 0, 1)  # (V, N, K)
        elif vectors == "residual":
            vecs = self.family.residual(zd, y).unsqueeze(0)
        elif vectors == "jacobian":  # rows of J_i: unit vectors e_k
            K = zd.shape[1]
            vecs = torch.eye(K, dtype=zd.dtype, device=zd.device)[:, None, :].expand(K, len(zd), K)
        elif vectors == "sampled":
            vecs = torch.stack([self.family.sampled_residual(zd, generator)
                                for _ in range(mc_samples)]) / mc_samples ** 0.5
        else:
            raise ValueError(f"unknown vectors {vectors!r}")
        _check_curvature_vectors(vecs, self.family, vectors)
        outs = [outputs[i] for i in range(len(rules))]
        # (V, N, *out) float64, filled pass by pass: one converting copy, no float32 stack
        grads = [torch.empty((len(vecs), *o.shape), dtype=torch.float64, device=o.device)
                 for o in outs]
        for c, v in enumerate(vecs.to(z.dtype)):
            gs = torch.autograd.grad(z, outs, grad_outputs=v, retain_graph=True, allow_unused=True)
            for i, g in enumerate(gs):
                grads[i][c].zero_() if g is None else grads[i][c].copy_(g)
        layers = [LayerBatch(r.record_input(inputs[i]), r.record_grad(grads[i]))
                  for i, r in enumerate(rules)]
        return Batch(zd, y, layers, sl)

    # -- whole-model functional views (dense paths, Hessian) --------------------------------
    def functional_loss(self):
        """(flat θ, xb, yb) -> summed per-sample loss, for torch.func transforms."""
        names, shapes = self.param_names, [p.shape for p in self.params]
        buffers = {n: b for n, b in self.net.named_buffers()}
        others = {n: p.detach() for n, p in self.net.named_parameters() if n not in set(names)}

        def unflatten(theta):
            out, i = {}, 0
            for n, s, k in zip(names, shapes, self.sizes):
                out[n] = theta[i:i + k].reshape(s)
                i += k
            return out

        def outputs(theta, xb):
            out = torch.func.functional_call(self.net, {**others, **buffers, **unflatten(theta)},
                                             (xb,))
            if isinstance(out, (tuple, list)):
                out = out[0]
            if self.output_transform is not None:
                out = self.output_transform(out)
            return out.reshape(xb.shape[0], -1)

        def loss(theta, xb, yb):
            z = outputs(theta, xb).double()  # ℓ and its z-derivatives in float64
            return self.family.loss(z, self.family.prepare_target(yb, z)).sum()

        return outputs, loss
