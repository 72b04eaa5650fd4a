"""Nets as trained: does an effective Λ (weight decay + what the training budget imposed) bring
the exact approximate leave-one-out estimate within 2× of the observed gap?

MNIST and Fashion-MNIST MLPs 784-h-10, n = 300 training points (all trained on), 2,000 test
points, trained as ``softrank.study`` trains them (shuffled minibatches of 64, a fixed number
of epochs; Adam lr 2e-3, or SGD with momentum 0.9 lr 0.05). Each net is measured as trained
with the exact ``ApproxLOO`` and the exact soft rank (``gap_formula='rank'``) under each Λ:

* ``weight decay`` — Λ as ``lam='auto'`` reads it (what the estimators assume by default);
* ``optimizer, per layer|scalar|element`` — :func:`softrank.effective_lam` from the
  optimizer's state (median per layer / overall / every element);
* ``balance, per layer|scalar`` — :func:`softrank.effective_lam` from the residual gradient
  and θ − θ₀ (θ₀ rebuilt from the study's seeded initialization).

Rows go to a CSV (``--out``; a rerun skips the nets already there); ``--report`` prints the
markdown tables of docs/stationarity.md: per variant the median and range of estimate/observed,
how many nets fall within 2× (0.5–2), and Kendall τ between estimate and observed gap.

    python benchmarks/bench_effective_lam.py --out benchmarks/results/effective_lam.csv --report
"""
from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

VARIANTS = {  # name -> effective_lam options (None: the weight decay alone)
    "weight decay": None,
    "optimizer, per layer": dict(method="optimizer", per="layer"),
    "optimizer, per scalar": dict(method="optimizer", per="scalar"),
    "optimizer, per element": dict(method="optimizer", per="element"),
    "balance, per layer": dict(method="balance", per="layer"),
    "balance, per scalar": dict(method="balance", per="scalar"),
}
COLUMNS = ["dataset", "optimizer", "width", "weight_decay", "epochs", "variant", "r_trained",
           "r_effective", "observed_gap", "loo_gap", "rank_gap", "lam_median", "time_s"]


def configs():
    """The nets: Adam over width × weight decay × epochs on both data sets, and an SGD block."""
    from softrank.study.grid import TrainConfig

    out = []
    for ds, width, wd, epochs in itertools.product(("mnist", "fashion_mnist"), (32, 256),
                                                   (1e-4, 1e-2), (5, 40)):
        out.append(TrainConfig(dataset=ds, width=width, weight_decay=wd, lr=2e-3,
                               epochs=epochs, n_train=300, n_test=2000))
    for ds, wd in itertools.product(("mnist", "fashion_mnist"), (1e-4, 1e-2)):
        out.append(TrainConfig(dataset=ds, width=64, weight_decay=wd, lr=0.05, epochs=20,
                               optimizer="sgd", n_train=300, n_test=2000))
    return out


_NET = ("dataset", "optimizer", "width", "weight_decay", "epochs")  # the columns naming a net


def _key(cfg) -> tuple:
    return (cfg.dataset, cfg.optimizer, str(cfg.width), f"{cfg.weight_decay:g}", str(cfg.epochs))


def _row_key(row) -> tuple:
    return tuple(str(row[c]) for c in _NET)


def _mean_log_loss(net, X, y) -> float:
    p = net.predict_proba(X).astype(np.float64)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-300, None))))


def measure(cfg) -> list[dict]:
    from softrank import ApproxLOO, SoftRankFIM, effective_lam, relative_stationarity
    from softrank.study.train import build_module, load_data, train_model

    data = load_data(cfg, str(DATA_ROOT))
    X, y = data.X_train, data.y_train
    n_features = int(np.prod(X.shape[1:]))
    torch.manual_seed(cfg.seed)  # train_model draws the same initialization after this seed
    theta0 = {k: v.detach().double().clone()
              for k, v in build_module(cfg, n_features, data.n_classes).named_parameters()}
    net = train_model(cfg, data)
    observed = _mean_log_loss(net, data.X_test, data.y_test) - _mean_log_loss(net, X, y)
    r_trained = relative_stationarity(net, X, y)
    rows = []
    for name, options in VARIANTS.items():
        t0 = time.perf_counter()
        try:
            lam = ("auto" if options is None else
                   effective_lam(net, X, y, theta0=theta0, **options))
        except ValueError as e:  # e.g. the balance finds no pull toward θ₀: recorded as NaN
            print(f"  {name}: {e}", flush=True)
            continue
        loo = ApproxLOO(net, lam=lam, method="exact", prefit=True).fit(X, y)
        try:
            rank = SoftRankFIM(net, lam=lam, approximation="exact", gap_formula="rank",
                               prefit=True).fit(X, y).gap_
        except ValueError:  # per-element Λ: the Gram soft rank takes a scalar or per tensor
            rank = math.nan
        values = (loo.lam_ if options is None else lam.lam)
        values = (np.asarray(list(values.values())) if isinstance(values, dict)
                  else np.asarray(values, dtype=float).reshape(-1))
        rows.append({"dataset": cfg.dataset, "optimizer": cfg.optimizer, "width": cfg.width,
                     "weight_decay": f"{cfg.weight_decay:g}", "epochs": cfg.epochs,
                     "variant": name, "r_trained": r_trained, "r_effective": loo.stationarity_,
                     "observed_gap": observed, "loo_gap": loo.gap_, "rank_gap": rank,
                     "lam_median": float(np.median(values)),
                     "time_s": time.perf_counter() - t0})
    return rows


def report(rows: list[dict]) -> str:
    from scipy.stats import kendalltau

    lines = ["| Λ | ApproxLOO / observed: median (range) | within 2× | Kendall τ | "
             "rank/n / observed: median | within 2× |", "|---|---|---|---|---|---|"]
    for name in VARIANTS:
        g = [r for r in rows if r["variant"] == name]
        if not g:
            continue
        obs = np.array([float(r["observed_gap"]) for r in g])
        loo = np.array([float(r["loo_gap"]) for r in g])
        rank = np.array([float(r["rank_gap"]) for r in g])
        q = loo / obs
        within = int(np.sum((q >= 0.5) & (q <= 2)))
        tau = kendalltau(loo, obs).statistic
        rq = rank / obs
        rank_cells = ("—", "—") if np.isnan(rq).all() else (
            f"{np.median(rq):.2f}", f"{int(np.sum((rq >= 0.5) & (rq <= 2)))}/{len(g)}")
        lines.append(f"| {name} | {np.median(q):.2f} ({q.min():.2g}–{q.max():.3g}) | "
                     f"{within}/{len(g)} | {tau:+.2f} | {rank_cells[0]} | {rank_cells[1]} |")
    lines += ["", "| net | r as trained | observed gap | " + " | ".join(VARIANTS) + " |",
              "|---|---|---|" + "---|" * len(VARIANTS)]
    nets = list(dict.fromkeys(_row_key(r) for r in rows))
    for net in nets:
        g = {r["variant"]: r for r in rows if _row_key(r) == net}
        first = next(iter(g.values()))
        cells = [f"{float(g[v]['loo_gap']) / float(first['observed_gap']):.2f}" if v in g else "—"
                 for v in VARIANTS]
        label = f"{net[0]} {net[1]} h{net[2]} wd {net[3]} {net[4]} ep"
        lines.append(f"| {label} | {float(first['r_trained']):.3g} | "
                     f"{float(first['observed_gap']):.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks/results/effective_lam.csv")
    p.add_argument("--limit", type=int, default=None, help="measure at most this many nets")
    p.add_argument("--report", action="store_true", help="print the markdown tables")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    if args.out.exists():
        with open(args.out, newline="") as f:
            rows = list(csv.DictReader(f))
    done = {_row_key(r) for r in rows}
    todo = [c for c in configs() if _key(c) not in done][:args.limit]
    for cfg in todo:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotStationaryWarning: these nets are as trained
            new = measure(cfg)
        new_file = not args.out.exists()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new_file:
                w.writeheader()
            w.writerows(new)
        rows += [{k: str(v) for k, v in r.items()} for r in new]
        print(f"{' '.join(_key(cfg))}: r {new[0]['r_trained']:.3g}, " + ", ".join(
            f"{r['variant']} {r['loo_gap'] / r['observed_gap']:.2f}" for r in new), flush=True)
    if args.report:
        print(report(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
