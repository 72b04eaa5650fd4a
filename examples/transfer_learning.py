"""Choose a frozen feature extractor for a small target task by the estimated test loss of the
head trained on it — from the target's training data alone — and compare with the observed
test loss.

Target tasks: MNIST digits 5–9 and Fashion-MNIST classes 5–9, 300 training images each.
Extractors: the hidden layer (256 ReLU units) of MLPs pretrained on MNIST digits 0–4 and on
Fashion-MNIST classes 0–4, random ReLU features of two widths, and the raw pixels. Each head
is a softmax regression with weight decay 1e-2; its estimated test loss is training loss + the
soft-rank gap estimate α·rank_Λ(F)/n (SoftRankFIM, exact through the Gram matrix); the column
rank/n is the calibrated estimate. Without the data in ../shared/data (or $SOFTRANK_DATA) the
example falls back to scikit-learn's digits with random features only.

    python examples/transfer_learning.py
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau
from skorch import NeuralNetClassifier
from torch import nn

from softrank import SoftRankFIM
from softrank.datasets import load_digits_split, load_fashion_mnist, load_mnist
from softrank.transfer import compare_feature_extractors

DATA = Path(os.environ.get("SOFTRANK_DATA",
                          Path(__file__).resolve().parents[2] / "shared" / "data"))


def mlp(n_in, width=256, n_out=5):
    return nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, n_out))


def pretrained_features(X, y, n_in, epochs=5, seed=0):
    """Train an MLP on (X, y) and return its hidden layer (the ReLU output)."""
    torch.manual_seed(seed)
    net = NeuralNetClassifier(mlp, module__n_in=n_in, criterion=nn.CrossEntropyLoss,
                              optimizer=torch.optim.Adam, lr=1e-3, max_epochs=epochs,
                              batch_size=128, train_split=None, verbose=0).fit(X, y)
    return net.module_[:-1]


def random_features(n_in, width, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, width), nn.ReLU())


def head(n_features):
    return NeuralNetClassifier(nn.Linear, module__in_features=n_features, module__out_features=5,
                               criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam,
                               lr=0.01, optimizer__weight_decay=1e-2, max_epochs=150,
                               batch_size=64, train_split=None, verbose=0)


def classes(X, y, lo, n=None, seed=0):
    """Samples of classes lo..lo+4 relabelled 0..4; n of them at random."""
    keep = (y >= lo) & (y < lo + 5)
    X, y = X[keep], y[keep] - lo
    if n is not None:
        idx = np.random.RandomState(seed).choice(len(y), n, replace=False)
        X, y = X[idx], y[idx]
    return X, y


def mnist_setup():
    """[(target name, extractors, X, y, X_test, y_test)] for the two MNIST-sized targets."""
    mnist = load_mnist(root=DATA, download=False)
    fashion = load_fashion_mnist(root=DATA, download=False)
    extractors = {
        "MLP on MNIST 0-4": pretrained_features(*classes(mnist.X_train, mnist.y_train, 0, 8000),
                                                784),
        "MLP on Fashion 0-4": pretrained_features(
            *classes(fashion.X_train, fashion.y_train, 0, 8000), 784),
        "random ReLU 64": random_features(784, 64),
        "random ReLU 512": random_features(784, 512),
        "pixels": nn.Identity(),
    }
    return [(f"{name} 5-9, 300 training images", extractors,
             *classes(d.X_train, d.y_train, 5, n=300), *classes(d.X_test, d.y_test, 5, n=2000,
                                                               seed=1))
            for name, d in (("MNIST digits", mnist), ("Fashion-MNIST classes", fashion))]


def digits_setup():
    d = load_digits_split()
    extractors = {f"random ReLU {w}": random_features(64, w) for w in (8, 32, 128, 512)}
    extractors["pixels"] = nn.Identity()
    return [("scikit-learn digits 5-9 (MNIST data not found)", extractors,
             *classes(d.X_train, d.y_train, 5, n=300), *classes(d.X_test, d.y_test, 5))]


def report(what, extractors, X, y, Xt, yt):
    print(f"\ntarget: {what}; test set {len(yt)}")
    rows = compare_feature_extractors(extractors, head, X, y, X_test=Xt, y_test=yt,
                                      measure=SoftRankFIM(None, approximation="gram",
                                                          random_state=0))
    print(f"{'extractor':20s}{'d':>5s}{'train':>7s}{'α':>6s}{'est gap':>9s}{'est test':>10s}"
          f"{'rank/n':>8s}{'test':>7s}{'obs gap':>9s}")
    for r in rows:
        diag = r.measure.result_.diagnostics
        print(f"{r.name:20s}{r.n_features:5d}{r.train_loss:7.3f}{diag['alpha']:6.2f}"
              f"{r.gap:9.3f}{r.estimated_test_loss:10.3f}"
              f"{r.train_loss + diag['calibrated_gap']:8.3f}{r.test_loss:7.3f}"
              f"{r.observed_gap:9.3f}")
    tau = kendalltau([r.estimated_test_loss for r in rows], [r.test_loss for r in rows])[0]
    best = min(rows, key=lambda r: r.test_loss)
    print(f"chosen by estimated test loss: {rows[0].name} (test {rows[0].test_loss:.3f}); "
          f"best observed: {best.name} (test {best.test_loss:.3f}); Kendall tau(estimated, "
          f"observed test loss) = {tau:+.2f}")


def main():
    torch.set_num_threads(1)  # tiny models: one thread is fastest (and robust on busy cores)
    start = time.time()
    try:
        targets = mnist_setup()
    except FileNotFoundError:
        targets = digits_setup()
    for target in targets:
        report(*target)
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
