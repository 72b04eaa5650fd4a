"""Early stopping without a validation split.

scikit-learn's digits, 10 % of the training labels flipped (and, so that the test loss is that
of the training distribution, 10 % of the test labels). An MLP with weight decay 1e-4 memorizes
the flipped labels if it trains long enough, and its test loss climbs. Three ways to train it:

1. all data, a fixed 60 epochs;
2. skorch's usual early stopping: 20 % held out (ValidSplit(5)), EarlyStopping on valid_loss
   with the best weights restored — it trains on 80 % of the data;
3. softrank: all data (train_split=None), GapTracker + EstimatedLossEarlyStopping on the
   estimated test loss (calibrated KFAC soft rank), best weights restored.

The test set is used only to report the outcome.

    python examples/early_stopping.py
"""
from __future__ import annotations

import time

import numpy as np
import torch
from skorch.callbacks import Callback, EarlyStopping
from skorch.dataset import ValidSplit

from softrank.callbacks import EstimatedLossEarlyStopping, GapTracker
from softrank.datasets import load_digits_split
from softrank.demo import make_mlp_classifier


def flip(y, rate, rng):
    y = y.copy()
    idx = rng.choice(len(y), int(rate * len(y)), replace=False)
    y[idx] = (y[idx] + rng.randint(1, 10, len(idx))) % 10
    return y


def log_loss(net, X, y):
    p = net.predict_proba(X)[np.arange(len(y)), y]
    return float(-np.log(np.clip(p, 1e-12, None)).mean())


class TestLoss(Callback):
    """Records the test loss of each epoch (for the report only)."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def on_epoch_end(self, net, **kwargs):
        net.history.record("test_loss", log_loss(net, self.X, self.y))


def net(**kw):
    return make_mlp_classifier(hidden=64, weight_decay=1e-4, lr=0.01, batch_size=32,
                               max_epochs=60, **kw)


def train(label, callbacks, X, y, Xt, yt, yt_clean, **kw):
    torch.manual_seed(0)
    stopper = next((c for c in callbacks if isinstance(c, EarlyStopping)), None)
    model = net(callbacks=callbacks, **kw).fit(X, y)
    kept = stopper.best_epoch_ if stopper is not None else len(model.history)
    acc = float((model.predict(Xt) == yt_clean).mean())
    print(f"{label:38s}{len(model.history):>7d}{kept:>7d}{log_loss(model, Xt, yt):>10.3f}"
          f"{acc:>10.3f}")
    return model


def main():
    torch.set_num_threads(1)  # tiny models: one thread is fastest (and robust on busy cores)
    start = time.time()
    d = load_digits_split()
    rng = np.random.RandomState(0)
    X, y = d.X_train, flip(d.y_train, 0.1, rng)
    Xt, yt = d.X_test, flip(d.y_test, 0.1, rng)
    quiet = dict(sink=lambda *_: None)

    print(f"{'':38s}{'epochs':>7s}{'kept':>7s}{'test loss':>10s}{'clean acc':>10s}")
    full = train("all data, 60 epochs", [TestLoss(Xt, yt)], X, y, Xt, yt, d.y_test)
    curve = np.array(full.history[:, "test_loss"])
    train("80 %, EarlyStopping(valid_loss)",
          [EarlyStopping(patience=5, load_best=True, **quiet)], X, y, Xt, yt, d.y_test,
          train_split=ValidSplit(5))
    ours = train("all data, EstimatedLossEarlyStopping",
                 [GapTracker(), EstimatedLossEarlyStopping(patience=5, **quiet)],
                 X, y, Xt, yt, d.y_test)
    best = int(curve.argmin()) + 1
    stop = next(c for c in ours.callbacks if isinstance(c, EarlyStopping)).best_epoch_
    print(f"\nreal test loss: lowest {curve.min():.3f} at epoch {best}, {curve[-1]:.3f} at "
          f"epoch 60; estimated-loss early stopping kept epoch {stop} (test loss "
          f"{curve[stop - 1]:.3f}, margin {abs(stop - best)} epochs)")
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
