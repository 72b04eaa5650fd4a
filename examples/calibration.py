"""Calibration and the calibration ratio α = Tr C / Tr F: how to read a soft-rank estimate.

Four skorch MLPs are trained on 300 digits with weight decay 1e-4 … 1e-1. For each:

* α on the training data (what ``SoftRankFIM`` uses) and on the held-out test data
  (``TraceRatio`` fitted on held-out data — the "ideal" reading);
* the expected calibration error (ECE) on train and test, and the temperature T that
  minimizes the test NLL of softmax(z/T) (T > 1: over-confident, T < 1: under-confident);
* the calibrated gap estimate rank_λ(F)/n, the soft-rank gap estimate α·rank_λ(F)/n,
  and the observed gap (test loss − train loss).

What to look for: α on *test* data tracks the temperature (α > 1 ⇔ T > 1, over-confident); α on
*training* data is ≪ 1 for nets that fit their training set (gradients at the true labels
vanish), which is why α·rank/n undershoots there and ApproxLOO exists.

    python examples/calibration.py               # ~15 s on one core
"""
from __future__ import annotations

import argparse

import torch
from skorch import NeuralNetClassifier
from torch import nn

from softrank import SoftRankFIM, TraceRatio
from softrank.calibration import expected_calibration_error, fit_temperature
from softrank.datasets import load_digits_split


class MLP(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.hidden, self.out = nn.Linear(64, hidden), nn.Linear(hidden, 10)

    def forward(self, X):
        return self.out(torch.relu(self.hidden(X)))


def train(X, y, weight_decay, seed):
    torch.manual_seed(seed)
    return NeuralNetClassifier(MLP, criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam,
                               lr=0.01, optimizer__weight_decay=weight_decay, max_epochs=40,
                               batch_size=64, train_split=None, verbose=0).fit(X, y)


def logits(net, X):
    """The module's outputs (logits), float64, without changing the net's mode."""
    return torch.as_tensor(net.forward(X)).double().numpy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300, help="training samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny nets: one thread is fastest

    data = load_digits_split(random_state=args.seed)
    X, y = data.X_train[:args.n], data.y_train[:args.n]
    Xte, yte = data.X_test, data.y_test
    print(f"{len(X)} digits; alpha = Tr C / Tr F; T = test temperature; gaps in nats")
    print(f"{'wd':>6}  {'alpha(train)':>12}  {'alpha(test)':>11}  {'ECE train':>9}  "
          f"{'ECE test':>8}  {'T':>5}  {'rank/n':>7}  {'alpha*rank/n':>12}  {'observed':>8}")
    for wd in (1e-4, 1e-3, 1e-2, 1e-1):
        net = train(X, y, wd, args.seed)
        est = SoftRankFIM(net, approximation="kfac", prefit=True).fit(X, y)
        alpha_test = TraceRatio(net, prefit=True).fit(Xte, yte).measure_
        d = est.result_.diagnostics
        observed = est.loss(Xte, yte) - est.train_loss_
        ece_train = expected_calibration_error(net.predict_proba(X), y)
        ece_test = expected_calibration_error(net.predict_proba(Xte), yte)
        T = fit_temperature(logits(net, Xte), yte)
        print(f"{wd:6g}  {d['alpha']:12.3f}  {alpha_test:11.3f}  {ece_train:9.3f}  "
              f"{ece_test:8.3f}  {T:5.2f}  {d['calibrated_gap']:7.3f}  {est.gap_:12.4f}  "
              f"{observed:8.4f}")


if __name__ == "__main__":
    main()
