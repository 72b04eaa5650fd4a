"""Find mislabelled training samples by their contribution to the TIC.

scikit-learn's digits with 10 % of the training labels moved to another class. Each training
sample is scored by

* ``tic``      — g_iᵀ(F+Λ)⁻¹g_i / n, its share of the TIC (labels needed),
* ``leverage`` — Tr F_i(F+Λ)⁻¹ / n, its share of the soft rank (no labels),
* ``loss``     — its training loss (a baseline),

all with the KFAC Fisher, and we report the precision among the top-k samples, k = number of
flipped labels (a random ranking scores 0.10). Two regimes: weight decay 1e-3 (the net does
not fit the flipped labels) and 1e-5 with long training (it memorizes them: their loss is as
small as anyone's, yet they still need their own directions of parameter space).

    python examples/flipped_labels.py
"""
from __future__ import annotations

import time

import numpy as np
import torch

from softrank.datasets import load_digits_split
from softrank.demo import make_mlp_classifier
from softrank.influence import rank_samples


def flipped(y, rate, seed=0):
    rng = np.random.RandomState(seed)
    y = y.copy()
    idx = rng.choice(len(y), int(round(rate * len(y))), replace=False)
    y[idx] = (y[idx] + rng.randint(1, 10, len(idx))) % 10
    mask = np.zeros(len(y), bool)
    mask[idx] = True
    return y, mask


def main():
    torch.set_num_threads(1)  # tiny models: one thread is fastest (and robust on busy cores)
    start = time.time()
    d = load_digits_split()
    X = d.X_train
    y, is_flipped = flipped(d.y_train, 0.1)
    print(f"{len(y)} training samples, {is_flipped.sum()} flipped labels "
          f"(random ranking: precision {is_flipped.mean():.2f})")
    print(f"{'regime':34s}{'fits flipped':>13s}{'tic':>7s}{'leverage':>10s}{'loss':>7s}")
    for label, wd, epochs in (("weight decay 1e-3, 40 epochs", 1e-3, 40),
                              ("weight decay 1e-5, 100 epochs", 1e-5, 100)):
        torch.manual_seed(0)
        net = make_mlp_classifier(hidden=64, weight_decay=wd, max_epochs=epochs).fit(X, y)
        fits = float((net.predict(X[is_flipped]) == y[is_flipped]).mean())
        precision = {score: rank_samples(net, X, y, score=score).precision_at(is_flipped)
                     for score in ("tic", "leverage", "loss")}
        print(f"{label:34s}{fits:13.2f}{precision['tic']:7.2f}{precision['leverage']:10.2f}"
              f"{precision['loss']:7.2f}")
    ranking = rank_samples(net, X, y, score="tic")
    top = ranking.top(10)
    print(f"\ntop 10 by TIC contribution (last net): flipped {is_flipped[top].sum()} of 10; "
          f"their labels {y[top].tolist()}, the originals {d.y_train[top].tolist()}")
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
