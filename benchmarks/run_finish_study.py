"""Run the as-trained / finished study (benchmarks/grids/finish_study.json) in a fixed random
order (seed 0), so that a partial run is a random sample of the grid; resumable (the store
keys on configuration ids). Then `python benchmarks/finish_study_report.py` writes the tables.

    nice -n 10 python benchmarks/run_finish_study.py [--store PATH] [--n-jobs N]
"""
import argparse
import random

from softrank.study.grid import load_grid
from softrank.study.runner import run_study

p = argparse.ArgumentParser()
p.add_argument("--grid", default="benchmarks/grids/finish_study.json")
p.add_argument("--store", default="benchmarks/results/finish_study.sqlite")
p.add_argument("--data-root", default="../shared/data",
               help="folder holding mnist/ and fashion_mnist/ (default: ../shared/data)")
p.add_argument("--n-jobs", type=int, default=1)
args = p.parse_args()
_, configs = load_grid(args.grid)
random.Random(0).shuffle(configs)
print(run_study(configs, args.store, backend="serial" if args.n_jobs == 1 else "joblib",
                n_jobs=args.n_jobs, data_root=args.data_root, errors="skip", progress=False))
