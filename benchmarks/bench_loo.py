"""Speed of ApproxLOO (issue 7, "Speed"), ratios measured in one run.

On an MLP 784-512-512-10 (float32) briefly trained on MNIST with Adam + weight decay:

1. exact ApproxLOO (NTK + one Cholesky of size nK) ÷ exact Gram soft rank, same model and the
   first ``--n`` images (default 1,000: nK = 10,000). Target ≤ 2.
2. KFAC ApproxLOO over ``--n-train`` images (default 10,000) ÷ one training epoch over the same
   images and batch size. Target ≤ 3.

Wall and CPU seconds are both printed (CPU time is the robust one when other processes compete
for the cores).

    python benchmarks/bench_loo.py            # the issue's configuration
    python benchmarks/bench_loo.py --quick    # --n 300 --n-train 2000
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from softrank.curvature import curvature  # noqa: E402
from softrank.loo import approx_loo  # noqa: E402
from softrank.model import ModelData  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(p)
    p.add_argument("--n", type=int, default=1_000, help="images for exact ApproxLOO vs Gram")
    p.add_argument("--n-train", type=int, default=10_000, help="images for KFAC ApproxLOO")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.n_train = min(args.n, 300), min(args.n_train, 2000)
    return args


def main(argv=None):
    args = parse_args(argv)
    C.setup_torch(args.threads, args.seed)
    X, y = C.load_mnist(args.data, args.n_train)
    model = C.train(C.mlp(), X, y, epochs=args.epochs, batch_size=args.batch_size,
                    weight_decay=args.weight_decay, seed=args.seed, device=args.device)
    lam = args.weight_decay
    print(f"# bench_loo: MLP 784-512-512-10 (p = {C.n_params(model):,}), {args.epochs} epoch(s)"
          f" of Adam (weight decay = λ = {lam:g}); torch {torch.__version__}, {args.threads} "
          f"threads, device {args.device}; load average {C.load_average()}\n")

    def md_for(n):
        return ModelData(model, nn.CrossEntropyLoss(), X[:n], y[:n], batch_size=args.batch_size,
                         device=args.device)

    rows = []
    gram_t, gram_c, rank = C.timed_cpu(
        lambda: curvature(md_for(args.n), "fisher", "gram").soft_rank(lam), args.device)
    loo_t, loo_c, res = C.timed_cpu(lambda: approx_loo(md_for(args.n), lam, "exact"), args.device)
    rows.append([f"exact ApproxLOO ÷ exact Gram soft rank (n = {args.n})",
                 f"{loo_t:.1f} s / {gram_t:.1f} s", f"{loo_c:.1f} s / {gram_c:.1f} s",
                 f"{loo_t / gram_t:.2f}", "≤ 2"])
    check = f"rank from ApproxLOO {res.soft_rank:.2f} vs Gram {rank:.2f}"

    trainee = copy.deepcopy(model)
    opt = C.make_optimizer(trainee, lam)
    gen = torch.Generator().manual_seed(args.seed)
    ep_t, ep_c, _ = C.timed_cpu(lambda: C.train_epoch(trainee, opt, X, y, args.batch_size, gen,
                                                      args.device), args.device)
    with_warn = []
    kf_t, kf_c, kres = C.timed_cpu(
        lambda: approx_loo(md_for(args.n_train), lam, "kfac"), args.device)
    with_warn.append(kres.diagnostics.get("invalid_points"))
    rows.append([f"KFAC ApproxLOO ÷ one training epoch (n = {args.n_train})",
                 f"{kf_t:.1f} s / {ep_t:.1f} s", f"{kf_c:.1f} s / {ep_c:.1f} s",
                 f"{kf_t / ep_t:.2f}", "≤ 3"])
    print(C.table(rows, ["ratio", "wall", "CPU", "wall ratio", "target"]))
    print(f"\n{check}; exact ApproxLOO gap {res.gap:.4f}, KFAC ApproxLOO gap "
          f"{kres.gap:.4f} (n = {args.n_train}, points with invalid step: {with_warn[0]}); "
          f"load average at the end: {C.load_average()}")


if __name__ == "__main__":
    main()
