"""softrank against the peer libraries (issue 5), on the same model, data and batch size.

From one run, on the MLP 784-512-512-10 (float32) trained for ``--epochs`` with Adam and weight
decay λ, over the first ``--n`` MNIST training images:

1. **KFAC soft rank** Σ_l Σ_jk a_k g_j/(a_k g_j + λ) (exact per-class G, bias folded into A,
   "expand"): ``curvature(md, 'fisher', 'kfac').soft_rank(λ)`` vs curvlinops
   ``KFACLinearOperator(fisher_type='type-2', separate_weight_and_bias=False)`` + eigendecomposition
   of its factors, and vs nngeometry ``FIM(..., PMatKFAC, variant='classif_logits')`` + the same
   eigendecomposition. Target: softrank ≥ 1.5× faster, same value. In float32 and, because
   nngeometry's ``classif_logits`` gives non-finite G factors in float32 once a prediction is
   confident (its Cholesky factor of diag(π) − ππᵀ), also with float64 copies of the model
   against softrank in float64.
2. **Diagonal Fisher + Tr C**: ``curvature(md, 'fisher', 'diagonal')`` and
   ``curvature(md, 'gsm', 'diagonal').trace()`` vs one BackPACK pass with ``DiagGGNExact`` and
   ``BatchGrad`` (per-sample gradients → Tr C = Σ_i‖g_i‖²/n). Target ≥ 1.0×.
3. **Peak memory** of the KFAC soft rank over all 60,000 training images (its own process, peak
   RSS including Python, torch and the data). Target ≤ 1.5 GB.

Every timing is the fastest of ``--repeats`` rounds that time each library once in turn, after a
warm-up of each on two batches (alternating rounds expose the libraries to the same load from
other processes); each library gets the same model copy, batches of ``--batch-size`` in the same
order, and factors are eigendecomposed in float64 for every library.

    python benchmarks/bench_peers.py                   # the issue's configuration
    python benchmarks/bench_peers.py --quick           # smoke test
    python benchmarks/bench_peers.py --only kfac       # one table (kfac, diagonal, memory)
    python benchmarks/bench_peers.py --device cuda     # the same tables on a GPU
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from softrank import ModelData, curvature  # noqa: E402

SCRIPT = Path(__file__).resolve()
KFAC_TARGET, DIAG_TARGET, MEMORY_TARGET = 1.5, 1.0, 1.5e9


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    p.add_argument("--n", type=int, default=10_000, help="MNIST images for the timings")
    p.add_argument("--n-memory", type=int, default=60_000, help="images for the memory run")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--weight-decay", type=float, default=1e-4, help="also the λ")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="--n 1000 --n-memory 5000 --repeats 1")
    p.add_argument("--only", nargs="+", choices=("kfac", "diagonal", "memory"),
                   default=("kfac", "diagonal", "memory"), help="tables to produce (default: all)")
    p.add_argument("--worker", choices=("memory",), help=argparse.SUPPRESS)
    p.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.n_memory, args.repeats = 1000, 5000, 1
    return args


# -- KFAC ------------------------------------------------------------------------------------------
def kfac_soft_rank_from_factors(factors, lam) -> float:
    """Σ_l Σ_jk a_k g_j / (a_k g_j + λ) from per-layer (A, G), eigendecomposed in float64;
    NaN when a factor is not finite."""
    total = 0.0
    for A, G in factors:
        if not (torch.isfinite(A).all() and torch.isfinite(G).all()):
            return float("nan")
        a = torch.linalg.eigvalsh(A.double().cpu()).clamp_min(0)
        g = torch.linalg.eigvalsh(G.double().cpu()).clamp_min(0)
        e = torch.outer(g, a)
        total += float((e / (e + lam)).sum())
    return total


def softrank_kfac(model, X, y, args):
    md = ModelData(model, nn.CrossEntropyLoss(), X, y, batch_size=args.batch_size,
                   device=args.device)
    return curvature(md, "fisher", "kfac").soft_rank(args.weight_decay)


def curvlinops_kfac(model, X, y, args):
    from curvlinops import KFACLinearOperator
    m = copy.deepcopy(model)
    data = [(X[i:i + args.batch_size].to(args.device), y[i:i + args.batch_size].to(args.device))
            for i in range(0, len(X), args.batch_size)]
    op = KFACLinearOperator(m, nn.CrossEntropyLoss(), list(m.parameters()), data,
                            check_deterministic=False, fisher_type="type-2",
                            kfac_approx="expand", separate_weight_and_bias=False,
                            num_data=len(X))
    op.compute_kronecker_factors()
    factors = [(op._input_covariances[k], op._gradient_covariances[k]) for k in op._mapping]
    return kfac_soft_rank_from_factors(factors, args.weight_decay)


def nngeometry_kfac(model, X, y, args):
    """nngeometry in the model's dtype (its classif_logits builds tensors in torch's default
    dtype, which is set to match, as tests/_peers.py does)."""
    from torch.utils.data import DataLoader, TensorDataset

    from nngeometry.metrics import FIM
    from nngeometry.object import PMatKFAC
    m = copy.deepcopy(model)
    dtype = next(m.parameters()).dtype
    loader = DataLoader(TensorDataset(X.clone().to(args.device, dtype), y.to(args.device)),
                        batch_size=args.batch_size, shuffle=False)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        F = FIM(m, loader, PMatKFAC, variant="classif_logits", device=args.device)
    finally:
        torch.set_default_dtype(old)
    lids = F.generator.layer_collection.layers.keys()
    return kfac_soft_rank_from_factors([F.data[k] for k in lids], args.weight_decay)


# -- diagonal Fisher + Tr C ------------------------------------------------------------------------
def softrank_diagonal(model, X, y, args):
    md = ModelData(model, nn.CrossEntropyLoss(), X, y, batch_size=args.batch_size,
                   device=args.device)
    diag_f = curvature(md, "fisher", "diagonal").diagonal()
    return diag_f, curvature(md, "gsm", "diagonal").trace()


def backpack_diagonal(model, X, y, args):
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, DiagGGNExact
    m = extend(copy.deepcopy(model))
    lf = extend(nn.CrossEntropyLoss())
    n = len(X)
    diag = [torch.zeros_like(p, dtype=torch.float64) for p in m.parameters()]
    tr_c = 0.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for i in range(0, n, args.batch_size):
            sl = slice(i, i + args.batch_size)
            xb, yb = X[sl].to(args.device), y[sl].to(args.device)
            N = len(xb)
            m.zero_grad()
            loss = lf(m(xb), yb)
            with backpack(DiagGGNExact(), BatchGrad()):
                loss.backward()
            for d, p in zip(diag, m.parameters()):  # batch mean → weight N/n
                d += p.diag_ggn_exact.double() * (N / n)
                tr_c += float((p.grad_batch.double() * N).pow(2).sum()) / n
    return torch.cat([d.reshape(-1) for d in diag]).cpu(), tr_c


# -- report ----------------------------------------------------------------------------------------
def _time(fns, model, X, y, args):
    """(fastest seconds, value) per function of ``fns``, from ``--repeats`` rounds that time
    every function once in turn (after a warm-up of each on two batches): alternating exposes
    each library to the same spells of load from other processes."""
    for fn in fns:
        fn(model, X[:2 * args.batch_size], y[:2 * args.batch_size], args)
    times, values = [[] for _ in fns], [None] * len(fns)
    for _ in range(args.repeats):
        for k, fn in enumerate(fns):
            t, values[k] = C.timed(lambda: fn(model, X, y, args), args.device)
            times[k].append(t)
    return [(min(t), v) for t, v in zip(times, values)]


def _kfac_row(name, t, v, t_sr, v_sr):
    if v != v:  # NaN: the peer's factors are not finite
        return [name, "NaN (factors not finite)", "—", f"{t:.2f}", f"{t / t_sr:.2f}",
                f"≥ {KFAC_TARGET}", "— (fails)"]
    ratio = t / t_sr
    return [name, f"{v:.4f}", f"{abs(v - v_sr) / abs(v_sr):.1e}", f"{t:.2f}", f"{ratio:.2f}",
            f"≥ {KFAC_TARGET}", "yes" if ratio >= KFAC_TARGET else "**no**"]


def report_kfac(model, X, y, args):
    rows = []
    for dtype in (torch.float32, torch.float64):
        m, Xd = copy.deepcopy(model).to(dtype), X.to(dtype)
        tag = str(dtype).replace("torch.", "")
        peers = [("nngeometry FIM(PMatKFAC, classif_logits) + eigh", nngeometry_kfac)]
        if dtype == torch.float32:
            peers.insert(0, ("curvlinops KFACLinearOperator (type-2, joint bias) + eigh",
                             curvlinops_kfac))
        (t_sr, v_sr), *timings = _time([softrank_kfac] + [fn for _, fn in peers], m, Xd, y,
                                       args)
        rows.append([f"softrank `curvature(md, 'fisher', 'kfac').soft_rank(λ)`, {tag}",
                     f"{v_sr:.4f}", "—", f"{t_sr:.2f}", "1.00", "—", "—"])
        for (name, _), (t, v) in zip(peers, timings):
            rows.append(_kfac_row(f"{name}, {tag}", t, v, t_sr, v_sr))
    print(f"## KFAC soft rank (n = {len(X):,}, batch size {args.batch_size}, λ = "
          f"{args.weight_decay:g}; fastest of {args.repeats} alternating rounds; load average "
          f"{C.load_average()})\n")
    print(C.table(rows, ["library", "soft rank", "rel. diff", "seconds",
                         "peer s ÷ softrank s", "target", "met"]))


def report_diagonal(model, X, y, args):
    (t_sr, (d_sr, c_sr)), (t_bp, (d_bp, c_bp)) = _time([softrank_diagonal, backpack_diagonal],
                                                       model, X, y, args)
    ratio = t_bp / t_sr
    diff_d = float((d_sr - d_bp).abs().max() / d_bp.abs().max())
    rows = [["softrank diagonal F + diagonal C", f"{float(d_sr.sum()):.6f}", f"{c_sr:.6f}",
             "—", f"{t_sr:.2f}", "1.00", "—", "—"],
            ["BackPACK DiagGGNExact + BatchGrad (one pass)", f"{float(d_bp.sum()):.6f}",
             f"{c_bp:.6f}", f"{diff_d:.1e} / {abs(c_sr - c_bp) / abs(c_bp):.1e}", f"{t_bp:.2f}",
             f"{ratio:.2f}", f"≥ {DIAG_TARGET}", "yes" if ratio >= DIAG_TARGET else "**no**"]]
    print(f"\n## Diagonal Fisher + Tr C (n = {len(X):,}, batch size {args.batch_size}; fastest "
          f"of {args.repeats} alternating rounds)\n")
    print(C.table(rows, ["library", "Tr F (Σ diag)", "Tr C", "rel. diff diag F / Tr C",
                         "seconds", "peer s ÷ softrank s", "target", "met"]))


def worker_memory(args):
    C.setup_torch(args.threads, args.seed)
    model = C.mlp()
    model.load_state_dict(torch.load(args.state))
    X, y = C.load_mnist(args.data, args.n_memory)
    before = C.rss_bytes()
    t, rank = C.timed(lambda: softrank_kfac(model.to(args.device), X, y, args), args.device)
    C.emit({"seconds": t, "soft_rank": rank, "rss_before_bytes": before,
            "device_peak_bytes": C.device_peak_bytes(args.device)})


def report_memory(args, state):
    fwd = ["--worker", "memory", "--state", str(state), "--data", str(args.data),
           "--device", args.device, "--threads", str(args.threads), "--seed", str(args.seed),
           "--n-memory", str(args.n_memory), "--batch-size", str(args.batch_size),
           "--weight-decay", str(args.weight_decay)]
    r = C.run_worker(SCRIPT, fwd, args.threads)
    peak = r["peak_rss_bytes"]
    met = peak <= MEMORY_TARGET
    print(f"\n## Peak memory of the KFAC soft rank over {args.n_memory:,} images (own process)\n")
    print(C.table([[f"{args.n_memory:,}", f"{r['soft_rank']:.4f}", f"{r['seconds']:.1f}",
                    C.gib(r["rss_before_bytes"]), C.gib(peak), f"{peak / 1e9:.2f} GB",
                    "≤ 1.5 GB", "yes" if met else "**no**"]],
                  ["n", "soft rank", "seconds", "RSS after loading data", "peak RSS",
                   "peak RSS (GB)", "target", "met"]))
    if r.get("device_peak_bytes"):
        print(f"\nCUDA peak allocated: {C.gib(r['device_peak_bytes'])}")


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker_memory(args)
    C.setup_torch(args.threads, args.seed)
    X, y = C.load_mnist(args.data, args.n)
    model = C.train(C.mlp(), X, y, epochs=args.epochs, batch_size=args.batch_size,
                    weight_decay=args.weight_decay, seed=args.seed, device=args.device)
    from importlib.metadata import version
    peers = ", ".join(f"{name} {version(dist)}" for name, dist in (
        ("curvlinops", "curvlinops-for-pytorch"), ("BackPACK", "backpack-for-pytorch"),
        ("nngeometry", "nngeometry")))
    print(f"# bench_peers: MLP 784-512-512-10 (p = {C.n_params(model):,}, float32), "
          f"{args.epochs} epoch(s) of Adam (weight decay = λ = {args.weight_decay:g}), train "
          f"accuracy {C.accuracy(model, X, y, args.device):.3f}; torch {torch.__version__}, "
          f"{peers}; {args.threads} threads, device {args.device}\n")
    if "kfac" in args.only:
        report_kfac(model, X, y, args)
    if "diagonal" in args.only:
        report_diagonal(model, X, y, args)
    if "memory" in args.only:
        with C.saved_state(model) as state:
            report_memory(args, state)


if __name__ == "__main__":
    main()
