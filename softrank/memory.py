r"""How much memory each curvature representation needs — known before computing it.

:func:`estimate_memory` adds up the large arrays an approximation allocates beyond what
:class:`~softrank.model.ModelData` already holds (the model copy and the data X, y), from the
layer shapes alone (one forward of a single sample gives them; no data pass, nothing is
accumulated). With n samples, p parameters, batch size B, V backward vectors per sample (K
columns of :math:`B_i` for F, 1 for C, ``mc_samples`` for F_MC), a activations per sample,
per layer l the input width :math:`\tilde d_l` (bias folded in), output width
:math:`d_l`, T_l positions (Conv2d), and 8-byte float64 (s bytes for the model dtype):

==============  ==================================================================  ==========
approximation   main terms                                                          grows with
==============  ==================================================================  ==========
dense           :math:`2\cdot 8p^2` (M and its eigendecomposition; H: 3×) +          p²
                :math:`BKp(8+s)` (per-sample Jacobians)
gram            :math:`3\cdot 8(nV)^2` (kernel, Cholesky, inverse) + the recorded    n², n
                layer inputs / output gradients of all n samples
diagonal        :math:`3\cdot 8p` + one batch of layer records                        p
kfac, ekfac     :math:`\sum_l 8(2\tilde d_l^2 + 2d_l^2 + 2d_l\tilde d_l)` + one batch   layers
matrix_free     Lanczos basis :math:`8\,\text{steps}\cdot p\cdot m` + :math:`6\cdot 8pm`   p
                work vectors + :math:`pm(16 + s(2+t))` jvp/vjp buffers (t parameter
                tensors: each slice of the flat θ gets a p-sized gradient) + per-batch
                tangents :math:`3Bams` (m = probes per block)
==============  ==================================================================  ==========

ApproxLOO (:func:`estimate_loo_memory`; m points, K' ≤ K columns of the loss factor
:math:`B_i` (K − 1 for softmax), :math:`c` = :data:`KFAC_CACHE_BYTES`):

==============  ==================================================================  ==========
method          main terms                                                          grows with
==============  ==================================================================  ==========
exact           :math:`1.5\cdot 8(nK')^2` (the Cholesky of I + BᵀΘB, factored in       n², n
                place, and the temporaries of the diagonal blocks of its inverse) +
                :math:`2\cdot 8BK\cdot nK'` (one batch of kernel rows and their
                solve) + the recorded layer inputs / Jacobian and Fisher output
                gradients of all n; where p < nK (:func:`exact_loo_space`) instead
                :math:`8p^2` (the Gauss–Newton Hessian + nΛ, factored in place) +
                :math:`2\cdot 8BKp` (one batch of per-sample gradient rows and their
                solve) + one batch of records
nystrom         five :math:`8(mK')^2` squares (the Cholesky of the kept points'      m², layers
                Gram, C and its Cholesky, Y, Z; Y only outside the Fisher rows' range,
                counted anyway) + the kernel of the m points against one batch + the
                EKFAC factors of the control variate (default m:
                :data:`LOO_NYSTROM_POINTS`); on a curvature subsample also C (and Y)
                per jackknife group and for the kept points, 2·6 more squares
cavity          as exact with m points instead of n (default                        m², layers
                :data:`LOO_CAVITY_POINTS`), + the EKFAC factors and eigenbases
kfac            Kronecker factors (as kfac) + cached layer records                  layers, n
                :math:`\min(c, n\sum_l T_l(\tilde d_l + Kd_l)s)` + one batch of
                records + the per-point blocks
subsample       per-sample Jacobians :math:`mKp(8+s)` + CG vectors                   m·p
                :math:`7\cdot 8p\cdot mK` + GGN products on mK columns (as
                matrix_free with mK probes) + the KFAC preconditioner
==============  ==================================================================  ==========

Every method also holds the per-point :math:`K\times K` blocks (P, A, AP and their
temporaries, :math:`8\cdot 8nK^2`), linear in n: ``kfac`` grows beyond its cache only by them.
``method='auto'`` is ``'exact'`` while that estimate stays below :data:`LOO_AUTO_EXACT_BYTES`,
``'nystrom'`` above it (:func:`resolve_loo_method`), on at most
:data:`LOO_NYSTROM_SAMPLES_PER_POINT` curvature samples per point kept
(:func:`nystrom_samples`).

"one batch of layer records" is :math:`8B\sum_l T_l(\tilde d_l + V d_l)` plus the autograd
graph :math:`2Bas(1+V)`; none of kfac, diagonal or matrix_free depends on n (they stream).
Estimates are within a small factor of the measured peak (allocator slack, temporaries), meant
to refuse configurations that cannot fit, not to account for every byte.

:func:`check_memory` raises :class:`MemoryError` before any data pass when the estimate
exceeds ``memory_budget`` (bytes, or a string such as ``"1.5GB"`` / ``"512MiB"``) or, when no
budget is given, the memory available now (:func:`available_memory`: the smaller of the
kernel's ``MemAvailable`` and the room left under the process's cgroup limit on the CPU, free
device memory on CUDA), naming the approximations that would fit. A budget set explicitly is
the limit, above or below what is available.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model import call_module

__all__ = ["MemoryEstimate", "estimate_memory", "check_memory", "parse_bytes",
           "estimate_loo_memory", "check_loo_memory", "available_memory",
           "MEMORY_APPROXIMATIONS", "LOO_MEMORY_METHODS", "resolve_loo_method",
           "KFAC_CACHE_BYTES", "LOO_CAVITY_POINTS", "LOO_NYSTROM_POINTS", "LOO_AUTO_EXACT_BYTES",
           "LOO_NYSTROM_SAMPLES_PER_POINT", "nystrom_samples", "exact_loo_space"]

MEMORY_APPROXIMATIONS = ("dense", "gram", "diagonal", "kfac", "ekfac", "matrix_free")
LOO_MEMORY_METHODS = ("exact", "nystrom", "cavity", "kfac", "subsample")
#: bytes of layer records (Jacobian output gradients and layer inputs, kept in the layers' own
#: dtype) that ApproxLOO ``method='kfac'`` holds from its factor pass for its block pass; batches
#: beyond it are recomputed (one more forward and K backward vectors each), so memory stays bounded
KFAC_CACHE_BYTES = 512 * 2 ** 20
#: points that ApproxLOO ``method='cavity'`` keeps exactly, by default (at most n)
LOO_CAVITY_POINTS = 1000
#: points that ApproxLOO ``method='nystrom'`` keeps exactly, by default (at most n): its memory
#: grows as m², its time as m² times the curvature samples it uses
LOO_NYSTROM_POINTS = 300
#: ApproxLOO ``method='nystrom'`` uses this many curvature samples per point kept (its points
#: and random others) where they are at most half of the samples (None: all of them), so that
#: its time, ∝ m³ then, does not grow with n: a jackknife corrects the subsample's bias (at
#: n = 60,000 with 300 points, 3,000 samples: +40 % before, +3.3 % after, against all of them)
LOO_NYSTROM_SAMPLES_PER_POINT = 10
#: ApproxLOO ``method='auto'`` runs ``'exact'`` while its memory estimate stays below this, and
#: ``'nystrom'`` above it
LOO_AUTO_EXACT_BYTES = 2 * 2 ** 30
F64 = 8
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes an approximation needs (``total``) and the terms they come from."""

    approximation: str
    matrix: str
    total: int
    breakdown: dict = field(default_factory=dict)

    def __str__(self):
        parts = ", ".join(f"{k} {_fmt(v)}" for k, v in
                          sorted(self.breakdown.items(), key=lambda kv: -kv[1]) if v)
        return f"{self.approximation} ({self.matrix}): {_fmt(self.total)} [{parts}]"


def _fmt(b: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{int(b)} B"


def parse_bytes(budget) -> int:
    """Bytes from an int/float or a string with a unit ('1.5GB', '512 MiB', '2e9'); a clear
    ValueError for anything else (NaN, inf, a bool, a string without a number)."""
    bad = ValueError("memory_budget must be a finite number of bytes or a string such as "
                     f"'2GB' or '512MiB'; got {budget!r}")
    if isinstance(budget, bool):
        raise bad
    if isinstance(budget, (int, float)):
        value = float(budget)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:E[+-]?[0-9]+)?)\s*([KMGT]?I?B?)\s*",
                         str(budget).upper())
        if not m or m.group(2) not in _UNITS:
            raise bad
        value = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(value):
        raise bad
    return int(value)


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, then v1); None without one."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        lim, use = _read_int(limit), _read_int(usage)
        if lim is not None and use is not None and lim < 2 ** 60:  # 'max' / unlimited
            return max(lim - use, 0)
    return None


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory(device=None) -> tuple[int, str] | None:
    """(bytes that can be allocated now on ``device``, where that number comes from), or None
    when it cannot be read.

    CPU: the smaller of ``MemAvailable`` (``/proc/meminfo``; elsewhere the free pages from
    ``os.sysconf``) and the room left under the process's cgroup memory limit. CUDA:
    ``torch.cuda.mem_get_info`` (free device memory)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(dev)[0]), f"free memory on {dev}"
        except (RuntimeError, AssertionError):
            return None
    if dev.type != "cpu":
        return None
    found = [(b, src) for b, src in ((_mem_available(), "available memory"),
                                     (_cgroup_room(), "room under the cgroup memory limit"))
             if b is not None]
    return min(found) if found else None


def _limit(memory_budget, device) -> tuple[int, str] | None:
    """(bytes, how to name them in a message) of an explicit budget or of what is available."""
    if memory_budget is not None:
        budget = parse_bytes(memory_budget)
        return budget, f"memory_budget={_fmt(budget)}"
    avail = available_memory(device)
    if avail is None:
        return None
    return avail[0], (f"the {_fmt(avail[0])} of {avail[1]} (set memory_budget to use another "
                      "limit)")


# -- layer shapes (one sample: no data pass) -------------------------------------------------------
def _output_shapes(md) -> dict:
    """Per-sample output shape of every leaf module, from a forward of a single sample."""
    shapes, handles = {}, []
    for name, mod in md.net.named_modules():
        if not list(mod.children()):
            handles.append(mod.register_forward_hook(
                lambda m, a, o, name=name: shapes.__setitem__(
                    name, tuple(o.shape[1:]) if torch.is_tensor(o) else None)))
    try:
        with torch.no_grad():
            call_module(md.net, md.X[:1].to(md.device))
    finally:
        for h in handles:
            h.remove()
    return shapes


def _numel(shape) -> int:
    out = 1
    for s in shape or ():
        out *= s
    return out


@dataclass(frozen=True)
class _Layout:
    n: int
    p: int
    B: int
    K: int
    s: int  # bytes per element of the model dtype
    act: int  # activations per sample (elements)
    tensors: int  # parameter tensors
    layers: list  # (numel, d_in_tilde or None, d_out or None, T) per rule


def _layout(md) -> _Layout:
    shapes = _output_shapes(md)
    act = md.X[0].numel() + sum(_numel(s) for s in shapes.values())
    layers = []
    for r in md.rules:
        if getattr(r, "kfac_capable", False):
            out = shapes.get(r.name)
            T = max(1, _numel(out) // r.d_out) if out else 1
            layers.append((r.numel, r.d_in_tilde, r.d_out, T))
        else:
            layers.append((r.numel, None, None, 1))
    s = torch.empty((), dtype=md.dtype).element_size()
    return _Layout(md.n, md.n_params, min(md.batch_size, md.n), md.n_outputs, s, act,
                   len(md.sizes), layers)


def _vectors(md, matrix, mc_samples) -> int:
    return {"fisher": md.n_outputs, "gsm": 1, "fisher_mc": mc_samples}.get(matrix, 1)


def _batch_records(L: _Layout, V: int, rows: int) -> int:
    """Recorded inputs / output gradients (float64) of ``rows`` samples, plus per-sample
    gradients of generic layers."""
    total = 0
    for numel, d_in, d_out, T in L.layers:
        if d_in is None:
            total += V * rows * numel * F64
        else:
            total += rows * T * (d_in + V * d_out) * F64
    return total


def _graph(L: _Layout, V: int) -> int:
    return 2 * L.B * L.act * L.s * (1 + V)


def _kronecker_factors(L: _Layout, ekfac: bool) -> int:
    total = 0
    for numel, d_in, d_out, T in L.layers:
        if d_in is not None:
            total += F64 * (2 * d_in ** 2 + 2 * d_out ** 2 + (3 if ekfac else 2) * d_in * d_out)
    return total


def estimate_memory(md, approximation: str = "exact", matrix: str = "fisher", *,
                    max_params: int = 5000, mc_samples: int = 1, n_probes: int = 30,
                    lanczos_steps: int = 30, block_size: int | None = None,
                    preconditioner=None, **_) -> MemoryEstimate:
    """Working memory of ``curvature(md, matrix, approximation, ...)`` (see the module table)."""
    if approximation == "exact":
        approximation = "dense" if md.n_params <= max_params or matrix == "hessian" else "gram"
    if approximation not in MEMORY_APPROXIMATIONS:
        raise ValueError(f"no memory model for approximation={approximation!r}; "
                         f"known: {MEMORY_APPROXIMATIONS}")
    L = _layout(md)
    V = _vectors(md, matrix, mc_samples)
    p, B = L.p, L.B
    if approximation == "dense":
        if matrix == "hessian":
            parts = {"matrix and eigendecomposition": 3 * F64 * p * p,
                     "per-batch Hessian": L.s * p * p}
        else:
            parts = {"matrix and eigendecomposition": 2 * F64 * p * p,
                     "per-sample Jacobians": B * L.K * p * (F64 + L.s)}
    elif approximation == "gram":
        rows = L.n * V
        parts = {"kernel, Cholesky, inverse": 3 * F64 * rows * rows,
                 "recorded layer inputs/gradients (all n)": _batch_records(L, V, L.n),
                 "autograd graph (one batch)": _graph(L, V)}
    elif approximation == "diagonal":
        parts = {"diagonal and sums": 3 * F64 * p,
                 "layer records (one batch)": _batch_records(L, V, B),
                 "autograd graph (one batch)": _graph(L, V)}
    elif approximation in ("kfac", "ekfac"):
        factors = _kronecker_factors(L, approximation == "ekfac")
        parts = {"Kronecker factors and eigenbases": factors,
                 "layer records (one batch)": _batch_records(L, V, B),
                 "autograd graph (one batch)": _graph(L, V)}
    else:
        m = min(n_probes, block_size or n_probes)
        parts = {"Lanczos basis": F64 * lanczos_steps * p * m,
                 "work vectors": 6 * F64 * p * m,
                 "parameter-sized jvp/vjp buffers": m * p * (2 * F64 + L.s * (2 + L.tensors)),
                 "tangents / cotangents (one batch)": 3 * B * L.act * m * L.s,
                 "autograd graph (one batch)": 2 * B * L.act * L.s}
        if preconditioner in ("kfac", "diagonal"):
            pre = estimate_memory(md, preconditioner, "fisher")
            parts["preconditioner"] = pre.total
    return MemoryEstimate(approximation, matrix, int(sum(parts.values())), parts)


def _hint(approximation: str) -> str:
    """Advice when no other approximation fits, valid for every estimator (all take these)."""
    fewer_samples = (" estimate the curvature on fewer samples with n_curvature_samples (the "
                     "kernel grows as n²),") if approximation == "gram" else ""
    return (f"; nothing else fits either: reduce batch_size,{fewer_samples} or count fewer "
            "parameters with params")


def _refuse(what: str, est: MemoryEstimate, limit: str, fits: list, hint: str):
    fits_txt = ("; within budget: " + ", ".join(fits)) if fits else hint
    raise MemoryError(f"{what} needs about {_fmt(est.total)} ({est}), above "
                      f"{limit}{fits_txt}. Nothing was computed.")


def _estimate_quietly(estimate, md, memory_budget, *args, **options):
    """The estimate; when only the available memory is checked (no budget given), a model
    whose layout cannot be read is not refused (None)."""
    if memory_budget is not None:
        return estimate(md, *args, **options)
    try:
        return estimate(md, *args, **options)
    except Exception:  # noqa: BLE001 - a safety net must not break a computation
        return None


def check_memory(md, approximation: str, matrix: str, memory_budget=None,
                 **options) -> MemoryEstimate | None:
    """Raise :class:`MemoryError` (before any data pass) when the estimate of
    ``approximation`` exceeds ``memory_budget`` (None: the memory available now on
    ``md.device``, see :func:`available_memory`); return the estimate otherwise (None when
    neither a budget nor the available memory is known)."""
    limit = _limit(memory_budget, md.device)
    if limit is None:
        return None
    budget, limit_txt = limit
    est = _estimate_quietly(estimate_memory, md, memory_budget, approximation, matrix, **options)
    if est is None or est.total <= budget:
        return est
    fits = []
    for other in MEMORY_APPROXIMATIONS:
        if other == est.approximation or (matrix == "hessian" and other not in
                                          ("dense", "matrix_free")):
            continue
        try:
            o = estimate_memory(md, other, matrix, **options)
        except Exception:  # noqa: BLE001 - only for the suggestion
            continue
        if o.total <= budget:
            fits.append(f"approximation={other!r} (~{_fmt(o.total)})")
    _refuse(f"approximation={est.approximation!r} for matrix={matrix!r}", est, limit_txt, fits,
            _hint(est.approximation))


# -- approximate leave-one-out (softrank.loo.approx_loo) ------------------------------------------
def _point_blocks(m: int, K: int) -> int:
    """The per-point K×K blocks of approx_loo (blocks, P, A, AP, B and temporaries): 8 of them."""
    return 8 * F64 * m * K * K


def _jackknife_groups() -> int:
    from .loo import _JACKKNIFE_GROUPS  # loo imports this module
    return _JACKKNIFE_GROUPS


def resolve_loo_method(md, method: str) -> str:
    """The ApproxLOO method that ``method='auto'`` stands for on ``md``: 'exact' while the
    memory of its n·K' kernel (data space) is below :data:`LOO_AUTO_EXACT_BYTES`, else
    'nystrom'; other methods unchanged. The kernel's size, not that of the parameter-space
    form (:func:`exact_loo_space`), decides: it bounds the exact method's time (about 20 s
    of CPU at n = 1,000 on MNIST MLPs), where in parameter space the time grows as n·K·p²
    (839 training epochs for a CNN with p = 9,098 at n = 60,000)."""
    if method != "auto":
        return method
    if sum(_woodbury(_layout(md), md.n, md.n_outputs).values()) <= LOO_AUTO_EXACT_BYTES:
        return "exact"
    return "nystrom"


def nystrom_samples(n_samples: int, m: int) -> int:
    """How many of ``n_samples`` curvature samples ApproxLOO ``method='nystrom'`` keeping ``m``
    points uses: :data:`LOO_NYSTROM_SAMPLES_PER_POINT` per point where that is at most half of
    them (its jackknife was measured on such subsamples; above, the saving is at most 2×),
    else all (always all when it is None)."""
    per = LOO_NYSTROM_SAMPLES_PER_POINT
    k = n_samples if per is None else max(m, int(per * m))
    return k if 2 * k <= n_samples else n_samples


def exact_loo_space(md) -> str:
    """Where ApproxLOO ``method='exact'`` works on ``md``: ``'parameters'`` (a p × p matrix,
    the Gauss–Newton Hessian plus nΛ) when p < nK, else ``'data'`` (the n·K' kernel, K' ≤ K
    columns of the loss factor; the two give the same blocks)."""
    return "parameters" if md.n_params < md.n * md.n_outputs else "data"


def _parameter_space(L: _Layout) -> dict:
    """The terms of ApproxLOO ``method='exact'`` in parameter space."""
    p, B, K = L.p, L.B, L.K
    return {"Gauss–Newton Hessian + nΛ (p²), factored in place": F64 * p ** 2,
            "per-sample gradient rows of one batch and their solve": 2 * F64 * B * K * p,
            "layer records (one batch)": _batch_records(L, 2 * K, B),
            "autograd graph (one batch)": _graph(L, K),
            "per-point K×K blocks": _point_blocks(L.n, K)}


def _woodbury(L: _Layout, m: int, Kp: int) -> dict:
    """The terms of ApproxLOO's Woodbury solve on m points."""
    K = L.K
    return {"Cholesky of I + BᵀΘB (mK')², in place": F64 * (m * Kp) ** 2,
            "diagonal blocks of its inverse (two (mK'/2)² temporaries)": F64 * (m * Kp) ** 2 // 2,
            "one batch of kernel rows and their solve": 2 * F64 * min(L.B, m) * K * m * Kp,
            "recorded layer inputs/gradients (m points)": _batch_records(L, K + Kp, m),
            "autograd graph (one batch)": _graph(L, K),
            "per-point K×K blocks": _point_blocks(m, K)}


def estimate_loo_memory(md, method: str = "exact", *, n_points: int | None = None,
                        preconditioner="kfac", **_) -> MemoryEstimate:
    """Working memory of ``approx_loo(md, lam, method, ...)`` (see the module's second table):
    a :class:`MemoryEstimate` with ``approximation=method`` and ``matrix='approx_loo'``."""
    method = resolve_loo_method(md, method)
    if method not in LOO_MEMORY_METHODS:
        raise ValueError(f"no memory model for ApproxLOO method={method!r}; "
                         f"known: {LOO_MEMORY_METHODS}")
    L = _layout(md)
    n, p, B, K = L.n, L.p, L.B, L.K
    Kp = K  # columns of the loss factor B_i: at most K (K − 1 for softmax: an upper bound)
    if method == "exact":
        parts = (_parameter_space(L) if exact_loo_space(md) == "parameters" else
                 _woodbury(L, n, Kp))
    elif method == "cavity":
        m = min(LOO_CAVITY_POINTS if n_points is None else int(n_points), n)
        parts = _woodbury(L, m, Kp)
        parts["EKFAC factors and eigenbases"] = _kronecker_factors(L, True)
        parts["layer records (one batch, EKFAC passes)"] = _batch_records(L, Kp, B)
    elif method == "nystrom":
        m = min(LOO_NYSTROM_POINTS if n_points is None else int(n_points), n)
        n_used = nystrom_samples(n, m)
        mk = m * Kp
        parts = {"the kept points' Gram's Cholesky, C, its Cholesky, Y, Z (five (mK')²)":
                 5 * F64 * mk ** 2,
                 "kernel of the kept points against one batch, its solves (four)":
                 4 * F64 * mk * B * K,
                 # on a curvature subsample: C and Y per jackknife group and for the kept
                 # points (Y only outside the Fisher rows' range; counted anyway)
                 "jackknife sums (curvature subsample): 2·(groups + 1) (mK')²":
                 2 * (_jackknife_groups() + 1) * F64 * mk ** 2 if m < n_used < md.n_train
                 else 0,
                 "recorded layer inputs/gradients (m points)": _batch_records(L, K + Kp, m),
                 "EKFAC factors and eigenbases (control variate)": _kronecker_factors(L, True),
                 "layer records (one batch)": _batch_records(L, K + Kp, B),
                 "autograd graph (one batch)": _graph(L, K),
                 "per-point K×K blocks": _point_blocks(m, K)}
    elif method == "kfac":
        cached = _batch_records(L, K, n) * L.s // F64  # records in the layers' dtype
        parts = {"Kronecker factors and eigenbases": _kronecker_factors(L, False),
                 "cached layer records (up to KFAC_CACHE_BYTES)": min(KFAC_CACHE_BYTES, cached),
                 # Jacobian output gradients (K per sample) and their Fisher combinations (K')
                 "layer records (one batch)": _batch_records(L, K + Kp, B),
                 "autograd graph (one batch)": _graph(L, K),
                 "per-point K×K blocks": _point_blocks(n, K)}
    else:
        m = n if n_points is None else min(int(n_points), n)
        cols = m * K  # right-hand sides of the CG solve
        parts = {"per-sample Jacobians of the m points": m * K * p * (F64 + L.s),
                 # right-hand side, solution, residual, preconditioned residual, direction,
                 # product and one temporary, each p × mK
                 "CG vectors": 7 * F64 * p * cols,
                 "GGN product buffers (jvp/vjp, mK columns)": cols * p * (2 * F64 + L.s * (
                     2 + L.tensors)) + 3 * B * L.act * cols * L.s,
                 "per-point K×K blocks": _point_blocks(m, K)}
        if preconditioner == "kfac":
            parts["KFAC preconditioner"] = estimate_memory(md, "kfac", "fisher").total
    return MemoryEstimate(method, "approx_loo", int(sum(parts.values())), parts)


def check_loo_memory(md, method: str, memory_budget=None, **options) -> MemoryEstimate | None:
    """Raise :class:`MemoryError` (before any data pass) when the estimate of
    ``approx_loo(md, lam, method, ...)`` exceeds ``memory_budget`` (None: the memory available
    now); return it otherwise (None when no limit is known)."""
    method = resolve_loo_method(md, method)
    limit = _limit(memory_budget, md.device)
    if limit is None:
        return None
    budget, limit_txt = limit
    est = _estimate_quietly(estimate_loo_memory, md, memory_budget, method, **options)
    if est is None or est.total <= budget:
        return est
    fits = []
    for other in LOO_MEMORY_METHODS:
        if other != method:
            o = estimate_loo_memory(md, other, **options)
            if o.total <= budget:
                fits.append(f"method={other!r} (~{_fmt(o.total)})")
    _refuse(f"ApproxLOO(method={method!r})", est, limit_txt, fits,
            "; no method fits: reduce batch_size or n_points (method='cavity' or 'subsample'), or "
            "estimate on fewer samples with n_curvature_samples")
