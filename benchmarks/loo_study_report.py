"""ApproxLOO over the study's models: 'nystrom', 'cavity' and 'kfac' against 'exact'.

Reads the rows of ``benchmarks/grids/loo_study.json`` (the shipped study's 56 MLPs, measured
as trained and again after finishing them to the regularized minimum with L-BFGS) and prints,
per data set and state: Kendall τ of each method's gap estimate against the observed gap; for
each sampling method ('nystrom' and 'cavity', the same 100 points): τ against 'exact' over the
models, the ratio to 'exact' per model (median and range, per n) and how many of its standard
errors separate it from 'exact'; models with invalid points; the median seconds per model.

    python -m softrank.study run benchmarks/grids/loo_study.json --store S.sqlite \\
        --backend joblib --n-jobs 2 --torch-threads 1 --data-root ../shared/data \\
        --errors skip --csv docs/study/loo_study.csv
    python benchmarks/loo_study_report.py [--csv docs/study/loo_study.csv]
"""
import argparse

import numpy as np

from softrank.study.analysis import kendall_tau
from softrank.study.store import read_csv

METHODS = ("exact", "nystrom", "cavity", "kfac")
SAMPLED = ("nystrom", "cavity")  # on the same points, with a standard error


def _col(rows, name):
    return np.array([float(r.get(name, np.nan)) for r in rows])


def _range(x):
    x = x[np.isfinite(x)]
    return f"{np.median(x):.2f} [{x.min():.2f}, {x.max():.2f}]" if len(x) else "—"


def section(rows, state):
    sfx = "" if state == "as trained" else "_finished"
    gap = _col(rows, "observed_gap")
    est = {m: _col(rows, f"est_loo_{m}{sfx}") for m in METHODS}
    n = _col(rows, "n_train")
    sizes = sorted(set(n))
    cells, head = [state, len(rows)], []
    cells += [f"{kendall_tau(est[m], gap):+.2f}" for m in METHODS]
    head += [f"τ {m}" for m in METHODS]
    cells += [f"{kendall_tau(est[m], est['exact']):+.2f}" for m in SAMPLED]
    head += [f"τ({m}, exact)" for m in SAMPLED]
    for m in SAMPLED:
        ratio = est[m] / est["exact"]
        cells += [_range(ratio[n == v]) for v in sizes]
        head += [f"{m} / exact, n = {int(v):,}" for v in sizes]
    for m in SAMPLED:
        z = (est[m] - est["exact"]) / _col(rows, f"est_loo_{m}_stderr{sfx}")
        cells.append(f"{np.nanmedian(np.abs(z)):.1f}")
        head.append(f"\\|{m} − exact\\| / stderr")
    for m in METHODS[1:]:
        bad = _col(rows, f"loo_{m}_invalid_points{sfx}")
        cells.append(f"{int(np.nansum(bad > 0))} ({int(np.nansum(bad))})")
        head.append(f"invalid: {m}")
    cells += [f"{np.nanmedian(_col(rows, f'time_loo_{m}{sfx}')):.1f}" for m in METHODS]
    head += [f"s {m}" for m in METHODS]
    return cells, head


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--csv", default="docs/study/loo_study.csv")
    args = p.parse_args(argv)
    rows = read_csv(args.csv)
    for ds in sorted({r["dataset"] for r in rows}, key=lambda d: (d != "mnist", d)):
        group = [r for r in rows if r["dataset"] == ds]
        lines = [section(group, s) for s in ("as trained", "finished")]
        head = ["state", "models"] + lines[0][1]
        print(f"\n**{ds}**\n")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for cells, _ in lines:
            print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
