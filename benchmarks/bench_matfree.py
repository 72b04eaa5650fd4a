"""Matrix-free estimates at scale (issue 5): accuracy per matrix-vector product, and memory.

From one run, on the MLP 784-512-512-10 (float32) trained for ``--epochs`` on the first ``--n``
MNIST training images with Adam and weight decay ``--weight-decay``:

1. **Soft rank and log-det dimension by SLQ** (``approximation='matrix_free'``) for several
   budgets (probes × Lanczos steps; one Lanczos run per budget serves every λ of the grid)
   against the exact value from the Gram kernel (``approximation='gram'``, Cholesky of the
   nK×nK kernel). Target: relative error ≤ 2% within 100 products, and the reported stderr
   covering the actual error.
2. **Hessian spectral norm** by Lanczos (10, 20, 30 Hessian-vector products) against ARPACK
   (``scipy.sparse.linalg.eigsh`` on the same products, tol 1e-10). Target: within 1% in ≤ 30.
3. **Memory**: :func:`softrank.memory.estimate_memory` against the measured peak RSS (own
   process; the peak counted from after loading the data, whose RSS is subtracted) for
   diagonal, KFAC and matrix-free on ``--memory-n`` images — none of them grows with n.

    python benchmarks/bench_matfree.py                  # the issue's configuration
    python benchmarks/bench_matfree.py --quick          # smoke test (n = 300)
    python benchmarks/bench_matfree.py --device cuda    # the same tables on a GPU
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from softrank import ModelData, curvature  # noqa: E402
from softrank.curvature import GramCurvature, hessian_vector_product  # noqa: E402
from softrank.memory import estimate_memory  # noqa: E402

SCRIPT = Path(__file__).resolve()
BUDGETS = ((4, 25), (4, 50), (4, 100))  # (probes, Lanczos steps)
SLQ_TARGET, SLQ_MATVECS, EIG_TARGET, EIG_MATVECS = 0.02, 100, 0.01, 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    p.add_argument("--n", type=int, default=2_000, help="MNIST images (train and measure)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--lams", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2],
                   help="λ grid of the soft rank (the first is the training weight decay)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--memory-n", type=int, nargs="+", default=[10_000, 60_000])
    p.add_argument("--quick", action="store_true", help="--n 300, small budgets, --memory-n 2000")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-only", action="store_true", help="only the memory table")
    p.add_argument("--worker", choices=("memory",), help=argparse.SUPPRESS)
    p.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--approximation", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.memory_n = 300, [2000]
    return args


def model_data(model, X, y, args):
    return ModelData(model, nn.CrossEntropyLoss(), X, y, batch_size=args.batch_size,
                     device=args.device)


# -- 1. soft rank by SLQ vs exact Gram -------------------------------------------------------------
def exact_gram(md, lams):
    """Exact soft rank and log-det dimension per λ (one kernel, one Cholesky per λ)."""
    t0 = time.perf_counter()
    G = GramCurvature(md)
    out = {}
    for lam in lams:
        rank = G.soft_rank(lam)
        logdet = float(2 * torch.log(G._cholesky(G.lam(lam)).diagonal()).sum())
        out[lam] = (rank, logdet)
    return out, time.perf_counter() - t0


def report_slq(md, args, budgets):
    exact, t_exact = exact_gram(md, args.lams)
    print(f"## Soft rank and log-det dimension: SLQ vs exact Gram (n = {md.n:,}, nK = "
          f"{md.n * md.n_outputs:,}; exact: {t_exact:.0f} s)\n")
    rows, met_any = [], {}
    for probes, steps in budgets:
        M = curvature(md, "fisher", "matrix_free", random_state=args.seed, n_probes=probes,
                      lanczos_steps=steps)
        t0 = time.perf_counter()
        ranks = M.soft_rank_grid(args.lams)
        est = M.last_estimate
        seconds = time.perf_counter() - t0
        logdets = M.logdet_grid(args.lams)
        est_ld = M.last_estimate
        for k, lam in enumerate(args.lams):
            for name, value, se, ref, bound in (
                    ("soft rank", ranks[k], est.stderrs[k], exact[lam][0],
                     est.diagnostics["quadrature_error"][k]),
                    ("log-det dim.", logdets[k], est_ld.stderrs[k], exact[lam][1],
                     est_ld.diagnostics["quadrature_error"][k])):
                rel = abs(value - ref) / abs(ref)
                covered = abs(value - ref) <= 2 * se
                ok = name == "soft rank" and M.n_matvec <= SLQ_MATVECS and rel <= SLQ_TARGET
                if name == "soft rank":
                    met_any.setdefault(lam, []).append((M.n_matvec, rel <= SLQ_TARGET and covered))
                rows.append([f"{lam:g}", name, f"{probes}×{steps} = {M.n_matvec}",
                             f"{ref:.1f}", f"{value:.1f}", f"{100 * rel:.1f}%",
                             f"{se:.1f}", f"{bound:.1f}", "yes" if covered else "**no**",
                             f"{seconds:.0f}", "yes" if ok else ("—" if name != "soft rank" or
                                                                 M.n_matvec > SLQ_MATVECS
                                                                 else "**no**")])
    print(C.table(rows, ["λ", "quantity", "probes × steps = products", "exact (Gram)",
                         "SLQ", "rel. error", "stderr", "quadrature bound",
                         "|error| ≤ 2·stderr", "SLQ s (all λ)",
                         "≤ 2% in ≤ 100 products"]))
    for lam, runs in met_any.items():
        ok = [nm for nm, good in runs if good]
        print(f"\nλ = {lam:g}: relative error ≤ 2% with covering stderr first at "
              f"{min(ok) if ok else f'> {max(nm for nm, _ in runs)}'} products.", end="")
    print()


# -- 2. Hessian spectral norm ----------------------------------------------------------------------
def report_spectral(md, args):
    from scipy.sparse.linalg import LinearOperator, eigsh
    p = md.n_params
    count = [0]

    def hvp(v):
        count[0] += 1
        return hessian_vector_product(md, torch.as_tensor(v).reshape(-1)).cpu().numpy()

    t0 = time.perf_counter()
    ref = float(eigsh(LinearOperator((p, p), matvec=hvp, dtype=np.float64), k=1, which="LM",
                      tol=1e-10, return_eigenvectors=False)[0])
    t_ref = time.perf_counter() - t0
    rows = [["ARPACK eigsh (reference)", f"{count[0]}", f"{abs(ref):.6f}", "—", "—", "—",
             f"{t_ref:.0f}", "—"]]
    for steps in (10, 20, 30):
        H = curvature(md, "hessian", "matrix_free", random_state=args.seed, lanczos_steps=steps)
        t0 = time.perf_counter()
        value = H.spectral_norm()
        est = H.last_estimate
        rel = abs(value - abs(ref)) / abs(ref)
        ok = est.n_matvec <= EIG_MATVECS and rel <= EIG_TARGET
        rows.append([f"Lanczos, {steps} steps", f"{est.n_matvec}", f"{value:.6f}",
                     f"{100 * rel:.3f}%", f"{est.stderr:.2e}",
                     f"{est.diagnostics['ritz_residuals'][0]:.2e}",
                     f"{time.perf_counter() - t0:.0f}", "yes" if ok else "**no**"])
    print(f"\n## Hessian spectral norm ‖H‖₂ (n = {md.n:,})\n")
    print(C.table(rows, ["method", "HVPs", "‖H‖₂", "rel. error", "error estimate",
                         "Ritz residual", "seconds", "≤ 1% in ≤ 30 HVPs"]))


# -- 3. memory -------------------------------------------------------------------------------------
def run_approximation(md, approximation, lam):
    if approximation == "matrix_free":  # a few products: memory does not depend on how many
        M = curvature(md, "fisher", "matrix_free", random_state=0, n_probes=4, lanczos_steps=3)
        return M.soft_rank(lam)
    return curvature(md, "fisher", approximation).soft_rank(lam)


def worker_memory(args):
    C.setup_torch(args.threads, args.seed)
    model = C.mlp()
    model.load_state_dict(torch.load(args.state))
    X, y = C.load_mnist(args.data, args.memory_n[0])
    C.reset_peak_rss()  # the peak from here on: not the transients of loading the data
    before = C.rss_bytes()
    md = model_data(model.to(args.device), X, y, args)
    kw = {"n_probes": 4, "lanczos_steps": 3} if args.approximation == "matrix_free" else {}
    est = estimate_memory(md, args.approximation, "fisher", **kw)
    t, value = C.timed(lambda: run_approximation(md, args.approximation, args.weight_decay),
                       args.device)
    C.emit({"seconds": t, "value": value, "rss_before_bytes": before, "estimate": est.total})


def report_memory(args, state):
    rows = []
    for approximation in ("diagonal", "kfac", "matrix_free"):
        for n in args.memory_n:
            fwd = ["--worker", "memory", "--state", str(state), "--data", str(args.data),
                   "--device", args.device, "--threads", str(args.threads),
                   "--memory-n", str(n), "--batch-size", str(args.batch_size),
                   "--weight-decay", str(args.weight_decay), "--approximation", approximation]
            r = C.run_worker(SCRIPT, fwd, args.threads)
            extra = r["peak_rss_bytes"] - r["rss_before_bytes"]
            rows.append([approximation, f"{n:,}", C.gib(r["estimate"]), C.gib(extra),
                         f"{r['estimate'] / max(extra, 1):.2f}", C.gib(r["peak_rss_bytes"]),
                         f"{r['seconds']:.0f}"])
    print(f"\n## Memory: estimate vs measured (batch size {args.batch_size}; matrix-free: "
          "4 probes × 3 Lanczos steps)\n")
    print(C.table(rows, ["approximation", "n", "estimate", "measured peak − RSS before",
                         "estimate ÷ measured", "peak RSS", "seconds"]))


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker_memory(args)
    C.setup_torch(args.threads, args.seed)
    X, y = C.load_mnist(args.data, args.n)
    model = C.train(C.mlp(), X, y, epochs=args.epochs, batch_size=128,
                    weight_decay=args.weight_decay, seed=args.seed, device=args.device)
    print(f"# bench_matfree: MLP 784-512-512-10 (p = {C.n_params(model):,}, float32), "
          f"{args.epochs} epochs of Adam on {args.n:,} MNIST images (weight decay "
          f"{args.weight_decay:g}), train accuracy {C.accuracy(model, X, y, args.device):.3f}; "
          f"torch {torch.__version__}, {args.threads} threads, device {args.device}\n")
    md = model_data(model, X, y, args)
    budgets = ((2, 10), (4, 25)) if args.quick else BUDGETS
    if not args.memory_only:
        report_slq(md, args, budgets)
        report_spectral(md, args)
    if not args.skip_memory:
        with C.saved_state(model) as state:
            report_memory(args, state)


if __name__ == "__main__":
    main()
