"""Which curvature approximation when: the soft rank of one network's Fisher, every way.

One skorch MLP 64-32-10 (p = 2,410 parameters) is trained on 500 of scikit-learn's digits with
weight decay λ = 1e-3. Its Fisher F is then represented by every approximation of
``softrank.curvature.APPROXIMATIONS`` and the soft rank Tr F(F+λI)⁻¹ of each is printed with
its time, its ratio to the exact value and softrank's memory estimate. The two exact paths
(dense p×p and the n·K×n·K Gram matrix) agree to rounding; the diagonal is an upper bound;
KFAC/EKFAC overestimate less and cost one data pass; matrix_free returns a standard error; KFAC
with a sampled output-gradient factor (``matrix='fisher_mc'``) is cheaper, noisier and lower
than KFAC with the exact factor (on very confident nets far lower: docs/approximations.md).

    python examples/approximations.py            # ~15 s on one core
"""
from __future__ import annotations

import argparse
import time

import torch
from skorch import NeuralNetClassifier
from torch import nn

from softrank import ModelData, curvature
from softrank.curvature import APPROXIMATIONS
from softrank.datasets import load_digits_split
from softrank.memory import estimate_memory


class MLP(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.hidden, self.out = nn.Linear(64, hidden), nn.Linear(hidden, 10)

    def forward(self, X):
        return self.out(torch.relu(self.hidden(X)))


def train(X, y, weight_decay, seed=0):
    torch.manual_seed(seed)
    net = NeuralNetClassifier(MLP, criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam,
                              lr=0.01, optimizer__weight_decay=weight_decay, max_epochs=40,
                              batch_size=64, train_split=None, verbose=0)
    return net.fit(X, y)


def timed_soft_rank(md, matrix, approximation, lam, seed):
    options = {"n_probes": 20, "lanczos_steps": 40} if approximation == "matrix_free" else {}
    t0 = time.perf_counter()
    F = curvature(md, matrix, approximation, random_state=seed, **options)
    value = F.soft_rank(lam)
    seconds = time.perf_counter() - t0
    est = getattr(F, "last_estimate", None)
    return value, seconds, (None if est is None else est.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=500, help="training samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny nets: one thread is fastest

    data = load_digits_split(random_state=args.seed)
    X, y = data.X_train[:args.n], data.y_train[:args.n]
    lam = 1e-3
    net = train(X, y, lam, args.seed)
    md = ModelData(net.module_, net.criterion_, X, y)
    print(f"MLP 64-32-10 on {md.n} digits: p = {md.n_params} parameters, K = 10 outputs, "
          f"lambda = weight decay = {lam:g}")

    # 'exact' is 'dense' here (p <= 5000) and 'gram' beyond; the last row is KFAC with its
    # output-gradient factor G from one label sampled per input (the F_MC matrix) instead of
    # the exact K columns of B_i
    configs = [(a, "fisher", a) for a in APPROXIMATIONS if a != "exact"]
    configs.append(("kfac sampled G", "fisher_mc", "kfac"))
    rows = []
    for name, matrix, approximation in configs:
        value, seconds, stderr = timed_soft_rank(md, matrix, approximation, lam, args.seed)
        mem = estimate_memory(md, approximation, matrix).total
        rows.append((name, value, stderr, seconds, mem))
    exact = rows[0][1]  # dense
    print(f"{'approximation':>14}  {'soft rank':>10}  {'stderr':>7}  {'/ exact':>7}  "
          f"{'time [s]':>8}  {'memory est.':>11}")
    for name, value, stderr, seconds, mem in rows:
        err = "" if stderr is None else f"{stderr:.2f}"
        print(f"{name:>14}  {value:10.2f}  {err:>7}  {value / exact:7.3f}  {seconds:8.2f}  "
              f"{mem / 2 ** 20:8.1f} MiB")
    diagonal = dict((r[0], r[1]) for r in rows)["diagonal"]
    print(f"upper bound: rank(diag F) = {diagonal:.2f} >= rank(F) = {exact:.2f}: "
          f"{diagonal >= exact}")


if __name__ == "__main__":
    main()
