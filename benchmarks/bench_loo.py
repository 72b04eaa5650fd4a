"""ApproxLOO: accuracy of the large-n methods against the exact one, and cost at n = 60,000.

Part ``accuracy`` (``--sizes``, default 1,000 and 3,000 MNIST training images): for each net of
``--nets`` (``WIDTH:LAMBDA``, MLP 784-WIDTH-10), train with Adam (weight decay = λ) and FINISH it
to the regularized minimum with full-batch L-BFGS (strong Wolfe) on mean loss + ½λ‖θ‖², print
its relative stationarity r = ‖∇(objective)‖/‖λθ‖, then compare with ``method='exact'``:
``'cavity'`` with each of ``--cavity-points`` points, ``'nystrom'`` with each of
``--nystrom-points`` and ``'kfac'``: relative error of the gap
estimate, Spearman correlation of the per-point leave-one-out losses (on the points the method
measured), invalid points (max eig A_iP_i ≥ 1), time.

Part ``scale``: n = 60,000 (``--n-large``), an MLP 784-512-10 and a small CNN, one epoch of
Adam each, then ``--scale-method`` (default ``'cavity'``; ``'exact'`` runs over every point,
in parameter space where p < nK, and prints its mean over each configuration's points for a
paired comparison with the sampled methods, which print theirs) in each configuration of
``--configs`` (``POINTS:CURVATURE``:
the points it keeps and the samples its EKFAC is estimated from, ``all`` or a number, what
``ApproxLOO(n_points=, n_curvature_samples=)`` set; the first is the default): time relative
to one training epoch (same images, batch size 256), peak resident memory while it runs
(reset after training), its standard error. Configurations with the same number of points
measure the same points (a random subset of n, nested across sizes), so the gap of an EKFAC
from a subsample is compared on the same points with the one from all n. ``'nystrom'`` uses at
most ``softrank.memory.LOO_NYSTROM_SAMPLES_PER_POINT`` curvature samples per point of those
(column "samples used"; ``--nystrom-samples-per-point all``: every one, no jackknife).

Part ``shrinkage``: the leverage shrinkage s that ``'cavity'`` solves for on its points, against
the same ratio computed from the exact leverages of all n points (``--sizes``, ``--nets``,
``--cavity-points``).

One thread by default (``--threads``); wall and CPU seconds are both printed (CPU time is the
robust one when other processes compete for the cores).

    python benchmarks/bench_loo.py                       # both parts, the documented grid
    python benchmarks/bench_loo.py --part accuracy --sizes 1000
    python benchmarks/bench_loo.py --quick               # n = 300, two small nets, no scale part
    python benchmarks/bench_loo.py --part shrinkage --sizes 1000 --nets 64:1e-4,256:1e-2
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from softrank import loo as loo_module  # noqa: E402
from softrank import memory as loo_memory  # noqa: E402
from softrank.loo import approx_loo  # noqa: E402
from softrank.model import ModelData  # noqa: E402
from softrank.regularization import as_lam  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(p)
    p.set_defaults(threads=1)
    p.add_argument("--part", choices=("accuracy", "scale", "shrinkage", "both"), default="both",
                   help="'shrinkage': the cavity's self-consistent s against the same ratio "
                        "from the exact leverages of all n points (--sizes, --nets, "
                        "--cavity-points)")
    p.add_argument("--sizes", default="1000,3000", help="n of the accuracy part")
    p.add_argument("--nets", default="64:1e-4,512:1e-3,256:1e-2,128:1e-1",
                   help="WIDTH:LAMBDA of the MLPs 784-WIDTH-10 of the accuracy part")
    p.add_argument("--cavity-points", default="100,300,1000",
                   help="points of method='cavity' (those below n are run)")
    p.add_argument("--nystrom-points", default="",
                   help="points of method='nystrom' (those below n are run; none by default)")
    p.add_argument("--rest", default="ekfac,ekfac_mean,rescale",
                   help="how 'cavity' treats the points outside its subset (compared)")
    p.add_argument("--lbfgs-iters", type=int, default=300)
    p.add_argument("--n-large", type=int, default=60_000)
    p.add_argument("--lam-large", type=float, default=1e-3)
    p.add_argument("--configs", default="1000:all,500:all,500:20000,300:all,300:10000",
                   help="scale part: POINTS:CURVATURE configurations of 'cavity' (CURVATURE: "
                        "'all' or the samples its EKFAC is estimated from)")
    p.add_argument("--nystrom-samples-per-point", default=None,
                   help="softrank.memory.LOO_NYSTROM_SAMPLES_PER_POINT for this run: a number, "
                        "or 'all' (every curvature sample, no jackknife); default: the "
                        "library's")
    p.add_argument("--scale-method", choices=("cavity", "nystrom", "exact"), default="cavity",
                   help="scale part: the method timed ('exact': every point, in parameter "
                        "space where p < nK; the points of each configuration only select the "
                        "mean printed for them)")
    p.add_argument("--scale-nets", default="mlp,cnn", help="scale part: mlp, cnn or both")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="scale part: print where approx_loo's time goes (cProfile, cumulative)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.nets, args.cavity_points = "300", "64:1e-3,128:1e-1", "50,100"
        args.part, args.lbfgs_iters = "accuracy", 100
    return args


def finish(model, X, y, lam, iters):
    """Full-batch L-BFGS (strong Wolfe) on mean CE + ½λ‖θ‖²; returns the relative
    stationarity ‖∇(objective)‖ / ‖λθ‖ at the end."""
    params = list(model.parameters())
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iters, history_size=50,
                            tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")
    loss_fn = nn.CrossEntropyLoss()

    def objective():
        opt.zero_grad()
        loss = loss_fn(model(X), y) + 0.5 * lam * sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    model.train()
    opt.step(objective)
    model.eval()
    objective()
    g = torch.cat([p.grad.reshape(-1) for p in params]).double()
    theta = torch.cat([p.detach().reshape(-1) for p in params]).double()
    opt.zero_grad()
    return float(g.norm() / (lam * theta.norm()))


def run(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        wall, cpu, res = C.timed_cpu(fn)
    return wall, cpu, res


def finished_nets(args):
    """For each n of ``--sizes`` and WIDTH:LAMBDA of ``--nets``: the MLP 784-WIDTH-10 trained
    on the first n MNIST images (Adam, weight decay λ, 5 epochs) and finished; yields
    (n, width, λ, r, ModelData)."""
    X_all, y_all = C.load_mnist(args.data, max(int(s) for s in args.sizes.split(",")))
    for n in (int(s) for s in args.sizes.split(",")):
        X, y = X_all[:n], y_all[:n]
        for spec in args.nets.split(","):
            width, lam = int(spec.split(":")[0]), float(spec.split(":")[1])
            model = C.train(C.mlp((784, width, 10), seed=args.seed), X, y, epochs=5,
                            batch_size=128, weight_decay=lam, seed=args.seed)
            r = finish(model, X, y, lam, args.lbfgs_iters)
            yield n, width, lam, r, ModelData(model, nn.CrossEntropyLoss(), X, y, batch_size=256)


def accuracy_part(args):
    rows = []
    header = ["n", "net", "λ", "r", "method", "points", "s", "gap", "± stderr", "rel. error",
              "plain mean ± stderr", "its rel. error", "cv corr.", "rel. error, same points",
              "Spearman", "invalid", "wall s", "CPU s"]
    for n, width, lam, r, md in finished_nets(args):
        net = f"784-{width}-10"
        w, c, ex = run(lambda: approx_loo(md, lam, "exact"))
        base = [n, net, f"{lam:g}", f"{r:.2g}"]
        rows.append(base + ["exact", n, "—", f"{ex.gap:.4f}", *["—"] * 7,
                            ex.diagnostics["invalid_points"], f"{w:.1f}", f"{c:.1f}"])
        print(C.table(rows[-1:], header).splitlines()[-1], flush=True)
        runs = [(f"cavity/{rest}", int(m)) for m in args.cavity_points.split(",")
                if int(m) < n for rest in args.rest.split(",") if rest]
        runs += [("nystrom", int(m)) for m in args.nystrom_points.split(",") if m and int(m) < n]
        for method, m in runs + [("kfac", n)]:
            kw = {"n_points": m, "random_state": args.seed} if method != "kfac" else {}
            loo_module._CAVITY_REST = method.partition("/")[2] or "ekfac"
            w, c, res = run(lambda: approx_loo(md, lam, method.partition("/")[0], **kw))
            rho = spearmanr(res.loo_losses, ex.loo_losses[res.indices]).statistic
            # the exact estimate restricted to the method's points: its bias alone
            same = float((ex.loo_losses - ex.point_losses)[res.indices].mean())
            ours = float((res.loo_losses - res.point_losses).mean())
            se = "—" if res.stderr is None else f"{res.stderr:.4f}"
            shrink = res.diagnostics.get("rest_shrinkage")
            # the plain mean over the kept points, where the gap is a control-variate estimate
            plain, cv = res.diagnostics.get("sample_mean_gap"), res.diagnostics.get(
                "control_variate")
            plain_cells = (["—", "—", "—"] if cv is None else
                           [f"{plain:.4f} ± {res.diagnostics['sample_mean_stderr']:.4f}",
                            f"{(plain - ex.gap) / ex.gap:+.1%}", f"{cv['correlation']:.3f}"])
            rows.append(base + [method, m, "—" if shrink is None else f"{shrink:.3f}",
                                f"{res.gap:.4f}", se,
                                f"{(res.gap - ex.gap) / ex.gap:+.1%}", *plain_cells,
                                f"{(ours - same) / same:+.1%}", f"{rho:.3f}",
                                res.diagnostics["invalid_points"], f"{w:.1f}", f"{c:.1f}"])
            print(C.table(rows[-1:], header).splitlines()[-1], flush=True)
    return C.table(rows, header)


def shrinkage_part(args):
    """The shrinkage s that 'cavity' solves for (on its points, the others through EKFAC)
    against the ratio it estimates, Σ_i tr((I − M_i)K_i) / Σ_i tr K_i, computed from the exact
    leverages M_i = B_iᵀJ_iH⁻¹J_iᵀB_i of all n points (one exact Cholesky of size n(K−1))."""
    rows = []
    for n, width, lam, _, md in finished_nets(args):
        L = as_lam(lam, md.param_names, md.sizes)
        M, _, _ = loo_module._exact_blocks(md, L, True)
        fis, _, _ = loo_module._fisher_records(md, np.arange(md.n))
        s_exact, _ = loo_module._shrinkage_ratio(M, loo_module._euclidean_fisher_blocks(md, fis))
        for m in (int(v) for v in args.cavity_points.split(",") if int(v) < n):
            res = approx_loo(md, lam, "cavity", n_points=m, random_state=args.seed)
            d = res.diagnostics
            rows.append([n, f"784-{width}-10", f"{lam:g}", m, f"{s_exact:.3f}",
                         f"{d['rest_shrinkage']:.3f} ± {d['rest_shrinkage_stderr']:.3f}",
                         f"{(d['rest_shrinkage'] - s_exact) / s_exact:+.1%}"])
            print(rows[-1], flush=True)
    return C.table(rows, ["n", "net", "λ", "points", "s from the exact leverages (all n)",
                          "s solved by 'cavity' ± its stderr", "difference"])


def small_cnn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


def scale_configs(text, n):
    """[(points, curvature samples)] from ``POINTS:CURVATURE,...`` ('all' = n)."""
    out = []
    for spec in text.split(","):
        m, nc = spec.split(":")
        out.append((int(m), n if nc == "all" else int(nc)))
    return out


def scale_data(model, X, y, n, m, nc, points, others):
    """ModelData of ``nc`` curvature samples containing the ``m`` points (all n if nc = n), and
    the points' positions in it. The others are a random permutation of the rest: together a
    uniform random subsample with uniform random points in it, as
    ``ApproxLOO(n_points=m, n_curvature_samples=nc)`` draws them."""
    S = np.sort(points[:m])
    if nc >= n:
        return ModelData(model, nn.CrossEntropyLoss(), X, y, batch_size=256), S
    sub = np.sort(np.concatenate([S, others[:nc - m]]))
    md = ModelData(model, nn.CrossEntropyLoss(), X[sub], y[sub], batch_size=256, n_train=n)
    return md, np.searchsorted(sub, S)


def scale_part(args):
    X, y = C.load_mnist(args.data, args.n_large)
    n, lam = len(X), args.lam_large
    configs = scale_configs(args.configs, n)
    rng = np.random.RandomState(args.seed)
    points = rng.permutation(n)[:max(m for m, _ in configs)]  # nested: the first m of them
    others = rng.permutation(np.setdiff1d(np.arange(n), points))
    rows = []
    nets = {"mlp": ("MLP 784-512-10", lambda: C.mlp((784, 512, 10), seed=args.seed)),
            "cnn": ("CNN c8-c16-fc", lambda: small_cnn(args.seed))}
    for name, make in (nets[k] for k in args.scale_nets.split(",")):
        model = make()
        opt = C.make_optimizer(model, lam)
        gen = torch.Generator().manual_seed(args.seed)
        ep_w, ep_c, _ = C.timed_cpu(lambda: C.train_epoch(model, opt, X, y, 256, gen))
        model.eval()
        full_gap = {}  # points → gap with the EKFAC of all n
        for m, nc in configs:
            md, idx = scale_data(model, X, y, n, m, nc, points, others)
            base_rss = C.rss_bytes()
            C.reset_peak_rss()
            if args.scale_method == "exact":
                call = lambda: approx_loo(md, lam, "exact")  # noqa: E731
            else:
                call = lambda: approx_loo(md, lam, args.scale_method,  # noqa: E731
                                          indices=idx, random_state=args.seed)
            if args.profile:
                prof = cProfile.Profile()
                call = (lambda f: lambda: prof.runcall(f))(call)
            w, c, res = run(call)
            peak = C.peak_rss_bytes()
            if args.profile:
                print(f"# where the time of {name}, {m} points, EKFAC from {nc} goes "
                      f"(cumulative CPU s, epoch {ep_c:.2f} s)")
                pstats.Stats(prof).sort_stats("cumulative").print_stats(
                    r"softrank/(loo|curvature)")
            # the plain mean of the gap terms over the configuration's m points: for 'exact'
            # from its per-point values, else the sampled methods' own (same points: paired)
            terms = res.loo_losses - res.point_losses
            on_points = (terms[idx].mean() if args.scale_method == "exact" else
                         res.diagnostics.get("sample_mean_gap", float("nan")))
            print(f"# {name}, {args.scale_method}: mean gap term over the {m} points "
                  f"{on_points:.5f}", flush=True)
            if nc >= n:
                full_gap[m] = res.gap
            same = (f"{(res.gap - full_gap[m]) / full_gap[m]:+.1%}"
                    if nc < n and m in full_gap else "")
            its = res.diagnostics.get("rest_shrinkage_iterations")
            jk = res.diagnostics.get("jackknife")  # 'nystrom' on a curvature subsample
            used = res.diagnostics.get("curvature_samples", md.n)  # 'nystrom': at most 10·m
            rows.append([name, f"{C.n_params(model):,}", n, m, "all" if nc >= n else nc,
                         "all" if used >= n else used,
                         f"{res.diagnostics['rest_shrinkage']:.3f} "
                         f"({its['quarter of the points']} + {its['all points']})" if its else
                         "—",
                         f"{res.gap:.4f}" + ("" if res.stderr is None else
                                             f" ± {res.stderr:.2g}"),
                         f"{jk['uncorrected_gap']:.4f} (± {jk['stderr']:.2g})" if jk else "—",
                         same,
                         res.diagnostics["invalid_points"],
                         f"{w:.0f} s / {ep_w:.1f} s = {w / ep_w:.1f}",
                         f"{c:.0f} s / {ep_c:.1f} s = {c / ep_c:.1f}",
                         C.gib(peak), C.gib(peak - base_rss)])
            print(rows[-1], flush=True)
    return C.table(rows, ["net", "p", "n", "points", "EKFAC from", "samples used",
                          "s (iterations: m/4 + m)",
                          "gap ± stderr", "before the jackknife (its stderr)",
                          "vs EKFAC from all, same points", "invalid",
                          f"wall: {args.scale_method} / epoch",
                          f"CPU: {args.scale_method} / epoch",
                          "peak RSS (process)", "peak − RSS before"])


def main(argv=None):
    args = parse_args(argv)
    C.setup_torch(args.threads, args.seed)
    if args.nystrom_samples_per_point is not None:
        per = args.nystrom_samples_per_point
        loo_memory.LOO_NYSTROM_SAMPLES_PER_POINT = None if per == "all" else float(per)
    print(f"# bench_loo: torch {torch.__version__}, {args.threads} thread(s), device "
          f"{args.device}; load average {C.load_average()}; {time.strftime('%Y-%m-%d %H:%M')}\n",
          flush=True)
    if args.part in ("accuracy", "both"):
        print(accuracy_part(args), flush=True)
    if args.part in ("scale", "both"):
        print(scale_part(args), flush=True)
    if args.part == "shrinkage":
        print(shrinkage_part(args), flush=True)
    print(f"\nload average at the end: {C.load_average()}")


if __name__ == "__main__":
    main()
