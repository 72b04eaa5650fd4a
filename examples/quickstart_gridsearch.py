"""Quick start: pick the weight decay of a skorch network without a validation split.

``GridSearchCV`` over ``optimizer__weight_decay`` with ``cv=InSampleSplit()``: every candidate is
trained on all the training data and scored on that same data by ``SoftRankFIM.score``, the
negated *estimated* test loss −(training loss + soft-rank gap estimate). No sample is held out.
The real test loss of each candidate (on scikit-learn digits' held-out split) is printed next to
its estimate — it is computed for the report only, as a second metric that ``refit`` ignores.

    python examples/quickstart_gridsearch.py       # ~10 s on one core
"""
from __future__ import annotations

import argparse
import time

import torch
from skorch import NeuralNetClassifier
from sklearn.model_selection import GridSearchCV
from torch import nn

from softrank import InSampleSplit, SoftRankFIM, gap_scorer
from softrank.datasets import load_digits_split


class MLP(nn.Module):
    """64 pixels → hidden (ReLU) → 10 logits."""

    def __init__(self, hidden=32):
        super().__init__()
        self.hidden, self.out = nn.Linear(64, hidden), nn.Linear(hidden, 10)

    def forward(self, X):
        return self.out(torch.relu(self.hidden(X)))


class RealTestLoss:
    """Scorer reporting the candidate's loss on a held-out test set (negated, as sklearn wants);
    it ignores the (X, y) GridSearchCV passes. For the printout only: refit does not use it."""

    def __init__(self, X_test, y_test):
        self.X_test, self.y_test = X_test, y_test

    def __call__(self, estimator, X, y):
        return -estimator.loss(self.X_test, self.y_test)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300, help="training samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny nets train fastest on one thread
    t0 = time.perf_counter()

    data = load_digits_split(random_state=args.seed)  # 1257 train / 540 test
    X, y = data.X_train[:args.n], data.y_train[:args.n]
    grid = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    net = NeuralNetClassifier(
        MLP, criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam, lr=0.01,
        max_epochs=40, batch_size=64,
        train_split=None,  # train on all of X: n = len(X)
        verbose=0)
    search = GridSearchCV(
        SoftRankFIM(net, approximation="kfac", random_state=args.seed),
        {"estimator__optimizer__weight_decay": grid},
        cv=InSampleSplit(),  # fit and score on the same (training) data
        scoring={"estimated": gap_scorer, "real": RealTestLoss(data.X_test, data.y_test)},
        refit="estimated")  # select by the estimated test loss only
    search.fit(X, y)

    res = search.cv_results_
    print(f"GridSearchCV over weight decay, {len(X)} digits, cv=InSampleSplit() "
          "(no validation split)")
    print(f"{'weight decay':>12}  {'estimated test loss':>19}  {'real test loss':>14}")
    for wd, est, real in zip(grid, res["mean_test_estimated"], res["mean_test_real"]):
        print(f"{wd:12g}  {-est:19.4f}  {-real:14.4f}")
    chosen = search.best_params_["estimator__optimizer__weight_decay"]
    best = grid[int(res["mean_test_real"].argmax())]
    chosen_real = -res["mean_test_real"][grid.index(chosen)]
    print(f"chosen weight decay: {chosen:g} (real test loss {chosen_real:.4f}); "
          f"best in the grid: {best:g} ({-res['mean_test_real'].max():.4f})")
    fitted = search.best_estimator_
    print(f"chosen model: train loss {fitted.train_loss_:.4f}, soft rank {fitted.measure_:.1f}, "
          f"gap estimate {fitted.gap_:.4f}, n = {fitted.n_train_}")
    print(f"time: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
