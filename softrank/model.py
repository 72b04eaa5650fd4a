r"""A trained network together with the data it is measured on.

:class:`ModelData` is the one entry point of the curvature layer: it holds a private evaluation
copy of the module (the user's model is never touched), the loss family of the
criterion, the parameters that count, and the data, and it streams batches of

* network outputs :math:`z_i` (2-D, ``(N, K)``),
* per-layer inputs and backpropagated output gradients (:class:`~softrank.layers.LayerBatch`)
  for the vectors that define each matrix: columns of :math:`B_i` (F), residuals :math:`r_i`
  (C) or residuals at labels sampled from the model (F_MC).

Layer records are exact only when every parameter enters the network through the one call of
the module that owns it. :attr:`ModelData.rules` checks that on one sample (forward hooks,
and the records' gradient against autograd's); a parameter shared by two modules, a module
called more than once, a module that returns a tuple (``nn.LSTM``) or a parameter used outside
its module's call is measured instead through per-sample Jacobians of the whole network
(:class:`~softrank.layers.JacobianRule`), which is exact for any differentiable module.
A module that is never called owns parameters of zero curvature: its records are zeros.

Inputs ``X`` are a tensor or array (floating inputs are cast to the module's dtype, integer
inputs such as token ids are kept), or a dict of them, passed to the module as keyword
arguments (skorch's convention): :class:`InputDict`.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ._progress import bar
from .families import LossFamily, UnsupportedCriterionError, family_for
from .layers import JacobianRule, LayerBatch, LayerRule, UnsupportedLayerError, rule_for

__all__ = ["ModelData", "Batch", "InputDict", "call_module"]


@dataclass
class Batch:
    z: torch.Tensor  # (N, K) float64 outputs
    y: torch.Tensor | None
    layers: list[LayerBatch] | None  # one per tracked module (same order as ModelData.rules)
    index: slice


class InputDict(dict):
    """Named input tensors of one length n, passed to the module as keyword arguments (skorch's
    convention for a dict ``X``). A string key gives that tensor; any other index (a slice, an
    index tensor or array) gives the same rows of every tensor, as an :class:`InputDict`."""

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return InputDict({k: v[key] for k, v in self.items()})

    def to(self, *args, **kwargs) -> "InputDict":
        return InputDict({k: v.to(*args, **kwargs) for k, v in self.items()})

    def numel(self) -> int:
        return sum(v.numel() for v in self.values())


def n_rows(X) -> int:
    """Number of samples of a tensor or an :class:`InputDict`."""
    if isinstance(X, dict):
        return len(next(iter(X.values()))) if X else 0
    return len(X) if X.ndim else 0


def call_module(module, xb):
    """``module(**xb)`` for a dict of inputs, else ``module(xb)`` (as skorch calls it)."""
    return module(**xb) if isinstance(xb, dict) else module(xb)


def _to_tensor(a, name):
    if torch.is_tensor(a):
        t = a.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(a))
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be an array-like or a tensor, or a dict of them; got "
                            f"{type(a).__name__}") from e
    return t


def _to_inputs(X):
    """X as a tensor, or a dict-like of arrays as an :class:`InputDict` of equal-length tensors."""
    if isinstance(X, dict) and not hasattr(X, "tocsr"):  # (a scipy DOK matrix is a dict)
        if not len(X):
            raise ValueError("X is an empty dict; pass a dict of input arrays, one per argument of "
                             "the module's forward")
        out = InputDict({str(k): _to_tensor(v, f"X[{k!r}]") for k, v in dict(X).items()})
        lengths = {k: n_rows(v) for k, v in out.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"the arrays of the dict X have different numbers of samples: "
                             f"{lengths}")
        return out
    return _to_tensor(X, "X")


def _integers_as(X, dtype):
    """X with its integer (and boolean) tensors cast to ``dtype``; None when it has none."""
    def cast(t):
        return t if t.is_floating_point() or t.is_complex() else t.to(dtype)
    if isinstance(X, dict):
        if all(v.is_floating_point() for v in X.values()):
            return None
        return InputDict({k: cast(v) for k, v in X.items()})
    return None if X.is_floating_point() else cast(X)


def _describe(X) -> str:
    if isinstance(X, dict):
        return "given as a dict (" + ", ".join(f"{k}: shape {tuple(v.shape)}, {v.dtype}"
                                               for k, v in X.items()) + ")"
    return f"of shape {tuple(X.shape)} and dtype {X.dtype}"


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
        The data (training data for the measures). X may also be a dict of them (e.g. a skorch
        ``SliceDict``), passed to the module as keyword arguments; floating inputs are cast to
        the module's dtype, integer inputs (token ids) are kept unless the module cannot take
        them. ``y`` may be None for label-free quantities.
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

    See Also
    --------
    curvature : curvature matrices of a ModelData.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from softrank import ModelData
    >>> X, y = torch.randn(100, 5), torch.randint(0, 3, (100,))
    >>> md = ModelData(nn.Linear(5, 3), nn.CrossEntropyLoss(), X, y)
    >>> md.n, md.n_params, md.n_train
    (100, 18, 100)
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

    def _cast(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """Floating inputs: checked finite, cast to the module's dtype; others kept as they are
        (integer token ids for ``nn.Embedding``)."""
        if t.is_floating_point():
            if not _all_finite(t):
                raise ValueError(f"{name} contains NaN or inf; clean or impute the inputs first")
            t = t.to(self.dtype)
        return t

    def _set_data(self, X, y):
        X = _to_inputs(X)
        if isinstance(X, InputDict):
            X = InputDict({k: self._cast(v, f"X[{k!r}]") for k, v in X.items()})
        else:
            X = self._cast(X, "X")
        self.n = n_rows(X)
        if self.n == 0:
            raise ValueError("empty dataset: X has no samples; pass at least one sample")
        self.X = X
        self.y = None
        if y is not None:
            y = _to_tensor(y, "y")
            if len(y) != self.n:
                raise ValueError(f"X and y have different numbers of samples: {self.n} vs {len(y)}")
            if y.is_floating_point() and not _all_finite(y):
                raise ValueError("y contains NaN or inf")
            self.y = y
            self._drop_ignored()
        m = min(self.n, self.batch_size)
        with torch.no_grad():
            first = self.X[:m]
            try:
                z = self._outputs(first.to(self.device))
            except (RuntimeError, TypeError, IndexError) as e:
                # integer-valued features for a module that computes in floating point
                floated = _integers_as(self.X, self.dtype)
                try:
                    z = self._outputs(floated[:m].to(self.device)) if floated is not None else None
                except (RuntimeError, TypeError, IndexError):
                    z = None
                if z is not None:
                    self.X = floated
                    _check_outputs(z, slice(0, len(z)))
                    return self._check_target(z)
                raise ValueError(f"the module cannot process X {_describe(self.X)}: {e}. Pass X "
                                 "as the net was trained on it (shape, dtype, and for a module "
                                 "with several inputs a dict of arrays keyed by the names of "
                                 "its forward arguments).") from e
        _check_outputs(z, slice(0, len(z)))
        self._check_target(z)

    def _check_target(self, z):
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
        """How the layer records are formed: one rule per module that owns selected parameters,
        in parameter order, when such records are exact for this network; else (a parameter
        shared by modules, a module called several times, a module the rules cannot replay) one
        :class:`~softrank.layers.JacobianRule` over all selected parameters, whose
        ``reasons`` say why."""
        if self._rules is None:
            rules, reasons = self._module_rules()
            if not reasons:
                reasons = self._check_records(rules)
            self._rules = [JacobianRule(self.net, self.param_names, reasons)] if reasons else rules
        return self._rules

    def _module_rules(self) -> tuple[list[LayerRule], list[str]]:
        """(one rule per parameter-owning module, reasons they cannot give exact records)."""
        selected = set(self.param_names)
        name_of = {id(p): n for n, p in self.net.named_parameters()}
        owners: dict[int, list[str]] = {}
        for mname, mod in self.net.named_modules():
            for p in mod.parameters(recurse=False):
                owners.setdefault(id(p), []).append(mname)
        reasons = [f"parameter {name_of[k]!r} is shared by the modules "
                   + " and ".join(repr(m) if m else "the root module" for m in mods)
                   for k, mods in owners.items() if len(mods) > 1 and name_of[k] in selected]
        rules = []
        for mname, mod in self.net.named_modules():
            own = [n for n, p in mod.named_parameters(recurse=False)
                   if name_of[id(p)] == f"{mname}.{n}".lstrip(".") and name_of[id(p)] in selected]
            if own:
                rules.append(rule_for(mname, mod, own))
        order = [f"{r.name}.{n}".lstrip(".") for r in rules for n in r.param_names]
        assert reasons or order == self.param_names, (order, self.param_names)
        return rules, reasons

    def _probe_rows(self):
        """One sample: enough to see how each module is called and to compare gradients."""
        return self.X[:1].to(self.device)

    def _check_records(self, rules) -> list[str]:
        """Reasons the layer records of ``rules`` are not exact, from one forward/backward pass
        of one sample: how each module was called, and whether the records' gradient of
        Σ u·z (u random) equals autograd's."""
        xb = self._probe_rows()
        try:
            z, calls = self._hooked_forward(xb, rules)
            reasons = [r.call_problem(c, n_rows(xb)) for r, c in zip(rules, calls)]
            reasons = [m for m in reasons if m]
            if reasons:
                return reasons
            u = torch.randn(z.shape, generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64).to(z.device)
            exact = torch.autograd.grad(z, self.params, grad_outputs=u.to(z.dtype),
                                        retain_graph=True, allow_unused=True)
            layers = self._layer_records(rules, z, calls, u.unsqueeze(0))
            got = torch.cat([r.grad_sum(lb).reshape(-1).cpu() for r, lb in zip(rules, layers)])
        except (RuntimeError, NotImplementedError, TypeError, ValueError, IndexError) as e:
            return [f"the layer records cannot be formed ({type(e).__name__}: {e})"]
        want = torch.cat([torch.zeros(p.numel(), dtype=torch.float64) if g is None
                          else g.detach().double().reshape(-1).cpu()
                          for p, g in zip(self.params, exact)])
        tol = 1e-3 if self.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-8
        if float((got - want).norm()) > tol * float(want.norm()) + 1e-30:
            return ["the layer records do not reproduce the network's gradient (a parameter is "
                    "used outside the call of the module that owns it)"]
        return []

    def flat_params(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    # -- streaming -------------------------------------------------------------------------
    def _outputs(self, xb):
        out = call_module(self.net, xb)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if self.output_transform is not None:
            out = self.output_transform(out)
        return out.reshape(n_rows(xb), -1)

    def _targets(self, sl, z):
        if self.y is None:
            return None
        return self.family.prepare_target(self.y[sl].to(self.device), z)

    def subset(self, indices) -> "ModelData":
        """The same network, loss and settings on some of the samples: a curvature subsample
        of the same training set.

        Parameters
        ----------
        indices : array-like of int, shape (k,)
            Distinct positions into this object's samples.

        Returns
        -------
        ModelData
            With ``n = k`` and ``n_train`` unchanged; it shares this object's evaluation copy
            of the network (none is made).
        """
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        out = copy.copy(self)
        out.X = self.X[idx]
        out.y = None if self.y is None else self.y[idx]
        out.n = len(idx)
        return out

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
        if vectors not in (None, "fisher", "residual", "jacobian", "sampled"):
            raise ValueError(f"unknown vectors {vectors!r}")
        N = self.n if indices is None else len(indices)
        starts = range(0, N, self.batch_size)
        for start in bar(starts, desc=f"data pass ({vectors or 'outputs'})", unit="batch"):
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

    def _vectors(self, zd, y, vectors, generator, mc_samples) -> torch.Tensor:
        """(V, N, K) float64 output-space vectors v_ic of one batch."""
        if vectors == "fisher":
            return self.family.factor(zd, y).permute(2, 0, 1)
        if vectors == "residual":
            return self.family.residual(zd, y).unsqueeze(0)
        if vectors == "jacobian":  # rows of J_i: unit vectors e_k
            K = zd.shape[1]
            return torch.eye(K, dtype=zd.dtype, device=zd.device)[:, None, :].expand(
                K, len(zd), K)
        return torch.stack([self.family.sampled_residual(zd, generator)
                            for _ in range(mc_samples)]) / mc_samples ** 0.5

    def _backprop(self, xb, rows, sl, vectors, generator, mc_samples):
        rules = self.rules
        if isinstance(rules[0], JacobianRule):  # per-sample Jacobians of the whole network
            with torch.no_grad():
                z = self._outputs(xb)
            _check_outputs(z, rows)
            y = self._targets(rows, z)
            zd = z.detach().double()
            vecs = self._vectors(zd, y, vectors, generator, mc_samples)
            _check_curvature_vectors(vecs, self.family, vectors)
            S = torch.einsum("vnk,nkp->vnp", vecs, self.jacobians(xb).double())
            return Batch(zd, y, [LayerBatch(None, S)], sl)
        z, calls = self._hooked_forward(xb, rules)
        for r, c in zip(rules, calls):
            if len(c) > 1:
                raise UnsupportedLayerError(
                    f"module {r.name!r} ran {len(c)} times in one forward pass on this batch but "
                    "at most once on the first samples; a network whose structure depends on "
                    "the data cannot be measured layer by layer. Pass params=... to leave that "
                    "module out.")
        _check_outputs(z, rows)
        y = self._targets(rows, z)
        zd = z.detach().double()  # r_i and B_i in float64: a float32 π_y rounds to 1 (r_y to 0)
        vecs = self._vectors(zd, y, vectors, generator, mc_samples)
        _check_curvature_vectors(vecs, self.family, vectors)
        return Batch(zd, y, self._layer_records(rules, z, calls, vecs), sl)

    def _hooked_forward(self, xb, rules):
        """(z with its graph, per rule the list of its calls (args, kwargs, output))."""
        calls: list[list] = [[] for _ in rules]

        def hook(i):
            def f(mod, args, kwargs, out):
                calls[i].append((args, kwargs, out))
            return f

        handles = [r.module.register_forward_hook(hook(i), with_kwargs=True)
                   for i, r in enumerate(rules)]
        try:
            with torch.enable_grad():
                z = self._outputs(xb)
        finally:
            for h in handles:
                h.remove()
        return z, calls

    def _layer_records(self, rules, z, calls, vecs) -> list[LayerBatch]:
        """One :class:`LayerBatch` per rule: the recorded inputs and the output gradients of
        the V vectors ``vecs`` (V, N, K); zeros for a module that was not called."""
        called = [i for i, c in enumerate(calls) if c]
        outs = [calls[i][0][2] for i in called]
        # (V, N, *out) float64, filled pass by pass: one converting copy, no float32 stack
        grads = [torch.empty((len(vecs), *o.shape), dtype=torch.float64, device=o.device)
                 for o in outs]
        for c, v in enumerate(vecs.to(z.dtype)):
            gs = torch.autograd.grad(z, outs, grad_outputs=v, retain_graph=True, allow_unused=True)
            for i, g in enumerate(gs):
                grads[i][c].zero_() if g is None else grads[i][c].copy_(g)
        layers = [None] * len(rules)
        for i, g in zip(called, grads):
            layers[i] = LayerBatch(rules[i].record_input(calls[i][0][0]), rules[i].record_grad(g))
        V, N = vecs.shape[:2]
        for i, r in enumerate(rules):
            if layers[i] is None:
                layers[i] = r.zero_record(V, N, z.device)
        return layers

    # -- whole-model functional views (dense paths, Hessian, shared parameters) -------------
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
            args, kwargs = ((), dict(xb)) if isinstance(xb, dict) else ((xb,), None)
            out = torch.func.functional_call(self.net, {**others, **buffers, **unflatten(theta)},
                                             args, kwargs, tie_weights=True)
            if isinstance(out, (tuple, list)):
                out = out[0]
            if self.output_transform is not None:
                out = self.output_transform(out)
            return out.reshape(n_rows(xb), -1)

        def loss(theta, xb, yb):
            z = outputs(theta, xb).double()  # ℓ and its z-derivatives in float64
            return self.family.loss(z, self.family.prepare_target(yb, z)).sum()

        return outputs, loss

    def jacobians(self, xb) -> torch.Tensor:
        """(N, K, p) per-sample Jacobians :math:`J_i = \\partial z_i/\\partial\\theta` of the
        outputs with respect to the selected parameters: ``vmap(jacrev)`` over the samples, or
        reverse mode one sample at a time where torch.func cannot batch a module (``nn.LSTM``
        in float64). Exact for any differentiable module, shared parameters included."""
        outputs, _ = self.functional_loss()
        theta = self.flat_params()
        xs = dict(xb) if isinstance(xb, dict) else xb

        def z_one(th, x):
            return outputs(th, _one_row(x)).squeeze(0)

        try:
            return torch.func.vmap(torch.func.jacrev(z_one), in_dims=(None, 0))(theta, xs)
        except (RuntimeError, NotImplementedError):
            pass

        def jac(i):
            x = xb[i:i + 1]
            return torch.autograd.functional.jacobian(lambda th: outputs(th, x)[0], theta)
        return torch.stack([jac(i) for i in range(n_rows(xb))])


def _one_row(x):
    return {k: v.unsqueeze(0) for k, v in x.items()} if isinstance(x, dict) else x.unsqueeze(0)
