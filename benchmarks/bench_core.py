"""Speed of the curvature core (issue 2, "Speed"): KFAC and exact Gram soft rank on MNIST.

From one run, on an MLP 784-512-512-10 (float32) briefly trained with Adam + weight decay:

1. ``curvature(md, 'fisher', 'kfac').soft_rank(lam)`` (data pass + eigendecompositions) on
   ``--n-train`` MNIST training images ÷ one training epoch over the same images and batch size
   (forward + backward + Adam step), for the exact per-class G (K = 10 backward vectors per
   sample) and for the sampled G (``matrix='fisher_mc'``, one vector per sample).
   Targets: ≤ 5 (exact), ≤ 1.5 (sampled).
2. Exact Gram soft rank (``approximation='gram'``) on the first ``--n`` images: wall time
   (target ≤ 60 s for n = 1,000, i.e. nK = 10,000; the kernel has nK' = n(K−1) = 9,000 rows
   because the softmax A_i has rank K−1) and peak RSS (target ≤ 4 GB), next to the memory that
   materializing S (nK' × p float64) would need.

Every configuration runs in a subprocess of its own (``--worker``) so that its peak memory is
its own. ``--profile`` adds profiles (torch.profiler operator table and cProfile of softrank
functions) of the KFAC and Gram computations.

    python benchmarks/bench_core.py                 # the issue's configuration
    python benchmarks/bench_core.py --quick         # smaller, for a smoke test
    python benchmarks/bench_core.py --profile       # + what dominates the time
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from softrank.curvature import curvature  # noqa: E402
from softrank.model import ModelData  # noqa: E402

SCRIPT = Path(__file__).resolve()
KFAC_CASES = {"exact": ("fisher", 5.0), "sampled": ("fisher_mc", 1.5)}  # matrix, target ratio
GRAM_TARGET_S, GRAM_TARGET_BYTES = 60.0, 4 * 10 ** 9


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(p)
    p.add_argument("--n-train", type=int, default=10_000, help="images for the KFAC ratio")
    p.add_argument("--n", type=int, default=1_000, help="images for the exact Gram soft rank")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--weight-decay", type=float, default=1e-4, help="also the λ of the soft rank")
    p.add_argument("--epochs", type=int, default=1, help="training epochs before measuring")
    p.add_argument("--repeats", type=int, default=3,
                   help="alternating timed runs per ratio (the fastest is kept)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: --n-train 2000 --n 300 --repeats 1")
    p.add_argument("--profile", action="store_true", help="also print profiles")
    p.add_argument("--skip-gram", action="store_true")
    # worker mode (internal)
    p.add_argument("--worker", choices=("kfac", "gram", "profile"), help=argparse.SUPPRESS)
    p.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--case", default="exact", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n, args.repeats = min(args.n_train, 2000), min(args.n, 300), 1
    return args


# -- workers (each in its own process) -------------------------------------------------------
def _load(args, n):
    C.setup_torch(args.threads, args.seed)
    model = C.mlp()
    model.load_state_dict(torch.load(args.state))
    X, y = C.load_mnist(args.data, n)
    return model.to(args.device), X, y


def soft_rank_kfac(model, X, y, args, matrix):
    md = ModelData(model, nn.CrossEntropyLoss(), X, y, batch_size=args.batch_size,
                   device=args.device)
    return curvature(md, matrix, "kfac", random_state=args.seed).soft_rank(args.weight_decay)


def soft_rank_gram(model, X, y, args):
    md = ModelData(model, nn.CrossEntropyLoss(), X, y, batch_size=args.batch_size,
                   device=args.device)
    return curvature(md, "fisher", "gram").soft_rank(args.weight_decay)


def worker_kfac(args):
    """Alternate one training epoch and one KFAC soft rank ``--repeats`` times; keep the
    fastest of each (robust to other load on the machine), so the ratio is paired."""
    import copy
    model, X, y = _load(args, args.n_train)
    matrix = KFAC_CASES[args.case][0]
    trainee = copy.deepcopy(model)
    opt = C.make_optimizer(trainee, args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    warm = min(len(X), 2 * args.batch_size)
    C.train_epoch(trainee, opt, X[:warm], y[:warm], args.batch_size, gen, args.device)
    soft_rank_kfac(model, X[:warm], y[:warm], args, matrix)
    train_s, kfac_s = [], []
    for _ in range(args.repeats):
        t, c, _ = C.timed_cpu(lambda: C.train_epoch(trainee, opt, X, y, args.batch_size, gen,
                                                    args.device), args.device)
        train_s.append((t, c))
        t, c, rank = C.timed_cpu(lambda: soft_rank_kfac(model, X, y, args, matrix), args.device)
        kfac_s.append((t, c))
    C.emit({"seconds": min(kfac_s)[0], "train_seconds": min(train_s)[0],
            "cpu_seconds": min(c for _, c in kfac_s),
            "train_cpu_seconds": min(c for _, c in train_s),
            "soft_rank": rank, "all_seconds": kfac_s, "all_train_seconds": train_s})


def worker_gram(args):
    model, X, y = _load(args, args.n)
    before = C.rss_bytes()
    t, c, rank = C.timed_cpu(lambda: soft_rank_gram(model, X, y, args), args.device)
    C.emit({"seconds": t, "cpu_seconds": c, "soft_rank": rank, "rss_before_bytes": before,
            "device_peak_bytes": C.device_peak_bytes(args.device)})


def _profile(fn, label, top=12):
    """Print torch.profiler's operator table and cProfile's softrank functions for ``fn``."""
    from torch.profiler import ProfilerActivity, profile
    prof = cProfile.Profile(time.process_time)  # CPU time: steadier under other load
    with profile(activities=[ProfilerActivity.CPU]) as tp:
        prof.enable()
        fn()
        prof.disable()
    total = sum(e.self_cpu_time_total for e in tp.key_averages())
    print(f"\n### {label}: torch.profiler, top operators by self CPU time "
          f"(total {total / 1e6:.2f} s)\n")
    rows = []
    for e in sorted(tp.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]:
        rows.append([e.key, e.count, f"{e.self_cpu_time_total / 1e6:.2f}",
                     f"{100 * e.self_cpu_time_total / total:.0f}%"])
    print(C.table(rows, ["operator", "calls", "self CPU s", "share"]))
    s = io.StringIO()
    stats = pstats.Stats(prof, stream=s).sort_stats("cumulative")
    stats.print_stats(r"softrank[/\\]", top)
    print(f"\n### {label}: cProfile (process CPU time), softrank functions by cumulative "
          "time\n")
    print("```\n" + "\n".join(ln for ln in s.getvalue().splitlines()
                               if "softrank" in ln or "cumtime" in ln) + "\n```")


def worker_profile(args):
    model, X, y = _load(args, args.n_train)
    for case, (matrix, _) in KFAC_CASES.items():
        soft_rank_kfac(model, X[:512], y[:512], args, matrix)  # warm-up
        _profile(lambda: soft_rank_kfac(model, X, y, args, matrix),
                 f"KFAC soft rank, {case} G, n = {len(X)}")
    if not args.skip_gram:
        _profile(lambda: soft_rank_gram(model, X[:args.n], y[:args.n], args),
                 f"Gram soft rank, n = {args.n}")
    C.emit({})


# -- parent ----------------------------------------------------------------------------------
def _forward(args, state, **kw):
    base = ["--state", str(state), "--data", str(args.data), "--device", args.device,
            "--threads", str(args.threads), "--seed", str(args.seed),
            "--n-train", str(args.n_train), "--n", str(args.n),
            "--batch-size", str(args.batch_size), "--weight-decay", str(args.weight_decay),
            "--repeats", str(args.repeats)] + (["--skip-gram"] if args.skip_gram else [])
    for k, v in kw.items():
        base += [f"--{k}", str(v)]
    return base


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return globals()[f"worker_{args.worker}"](args)
    C.setup_torch(args.threads, args.seed)
    X, y = C.load_mnist(args.data, args.n_train)
    model = C.train(C.mlp().to(args.device), X, y, epochs=args.epochs, batch_size=args.batch_size,
                    weight_decay=args.weight_decay, seed=args.seed, device=args.device).cpu()
    p = C.n_params(model)
    print(f"# bench_core: MLP 784-512-512-10 (p = {p:,}, float32), {args.epochs} epoch(s) of "
          f"Adam (weight decay = λ = {args.weight_decay:g}), train accuracy "
          f"{C.accuracy(model, X, y):.3f}; torch {torch.__version__}, {args.threads} threads, "
          f"device {args.device}; load average {C.load_average()}\n")
    with C.saved_state(model) as state:
        report_kfac(args, state)
        if not args.skip_gram:
            report_gram(args, state, p)
        if args.profile:
            out = C.run_worker(SCRIPT, _forward(args, state, worker="profile"), args.threads)
            print("\n## Profiles" + out["stdout"])
    print(f"\nload average at the end: {C.load_average()}")


def report_kfac(args, state):
    rows = []
    for case, (matrix, target) in KFAC_CASES.items():
        r = C.run_worker(SCRIPT, _forward(args, state, worker="kfac", case=case), args.threads)
        ratio = r["seconds"] / r["train_seconds"]
        cpu_ratio = r["cpu_seconds"] / r["train_cpu_seconds"]
        rows.append([f"KFAC, {case} G (`{matrix}`)", f"{r['soft_rank']:.6f}",
                     f"{r['seconds']:.2f}", f"{r['train_seconds']:.2f}", f"**{ratio:.2f}**",
                     f"{cpu_ratio:.2f}", f"≤ {target}", "yes" if ratio <= target else "**no**",
                     C.gib(r["peak_rss_bytes"])])
    print(f"## KFAC soft rank ÷ one training epoch (n = {args.n_train:,}, batch size "
          f"{args.batch_size}; fastest of {args.repeats} alternating runs)\n")
    print(C.table(rows, ["soft rank of", "value", "soft rank s", "epoch s", "ratio (wall)",
                         "ratio (CPU)", "target", "met", "peak RSS"]))


def report_gram(args, state, p):
    r = C.run_worker(SCRIPT, _forward(args, state, worker="gram"), args.threads)
    from softrank.families import Categorical
    K = Categorical().factor(torch.zeros(1, 10)).shape[2]  # rows per sample of S: K − 1 = 9
    s_bytes = args.n * K * p * 8
    kernel_bytes = (args.n * K) ** 2 * 8
    peak = r["peak_rss_bytes"]
    ok_t, ok_m = r["seconds"] <= GRAM_TARGET_S, peak <= GRAM_TARGET_BYTES
    rows = [[f"{args.n:,}", f"{args.n * K:,}", f"{r['soft_rank']:.6f}", f"**{r['seconds']:.1f}**",
             f"{r['cpu_seconds']:.1f}",
             f"{C.gib(peak)} ({peak / 1e9:.2f} GB)", C.gib(peak - r["rss_before_bytes"]),
             C.gib(kernel_bytes),
             f"{C.gib(s_bytes)} ({s_bytes / 1e9:.1f} GB)"]]
    print("\n## Exact Gram soft rank (`approximation='gram'`), separate process\n")
    print(C.table(rows, ["n", "kernel rows nK'", "soft rank", "wall s", "CPU s", "peak RSS",
                         "peak − RSS before", "one nK'×nK' float64",
                         "materializing S (nK'·p·8 B)"]))
    if r.get("device_peak_bytes"):
        print(f"\nCUDA peak allocated: {C.gib(r['device_peak_bytes'])}")
    if args.n == 1000:
        print(f"\nTargets (n = 1,000): ≤ {GRAM_TARGET_S:.0f} s — "
              f"{'met' if ok_t else '**not met**'}; ≤ 4 GB peak — "
              f"{'met' if ok_m else '**not met**'}.")


if __name__ == "__main__":
    main()
