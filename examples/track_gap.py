"""Track the estimated generalization gap while a skorch net trains on all its data.

Two GapTrackers on an MLP trained on scikit-learn's digits (train_split=None):

* ``est_*`` — the default: the calibrated KFAC soft-rank estimate, train loss + rank_Λ(F)/n;
* ``sr_*``  — the α-weighted soft-rank gap estimate α·rank_Λ(F)/n (α = Tr C / Tr F),

both on the same fixed subsample of 512 training images. skorch's PrintLog shows them next
to the training loss; a third column, ``test_loss``, is the real test loss, recorded only to
compare (no training decision uses it).

    python examples/track_gap.py
"""
from __future__ import annotations

import time

import numpy as np
import torch
from skorch.callbacks import Callback

from softrank import SoftRankFIM
from softrank.callbacks import GapTracker
from softrank.datasets import load_digits_split
from softrank.demo import make_mlp_classifier


class TestLoss(Callback):
    """Records the log loss on held-out data (for comparison only)."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def on_epoch_end(self, net, **kwargs):
        p = net.predict_proba(self.X)[np.arange(len(self.y)), self.y]
        net.history.record("test_loss", float(-np.log(np.clip(p, 1e-12, None)).mean()))


def main():
    torch.set_num_threads(1)  # tiny models: one thread is fastest (and robust on busy cores)
    start = time.time()
    d = load_digits_split()
    trackers = [
        GapTracker(),  # est_gap, est_test_loss
        GapTracker(SoftRankFIM(None, approximation="kfac", n_curvature_samples=512,
                               random_state=0), name="sr"),
        TestLoss(d.X_test, d.y_test),
    ]
    torch.manual_seed(0)
    net = make_mlp_classifier(hidden=64, weight_decay=1e-3, max_epochs=30, callbacks=trackers)
    net.set_params(verbose=1)
    net.fit(d.X_train, d.y_train)

    h = net.history
    est, sr, test = (np.array(h[:, k]) for k in ("est_test_loss", "sr_test_loss", "test_loss"))
    print(f"\nlast epoch: estimated test loss {est[-1]:.3f} (calibrated), {sr[-1]:.3f} "
          f"(α-weighted); real test loss {test[-1]:.3f}")
    print(f"lowest estimate at epoch {est.argmin() + 1} (calibrated), {sr.argmin() + 1} "
          f"(α-weighted); lowest real test loss at epoch {test.argmin() + 1}")
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
