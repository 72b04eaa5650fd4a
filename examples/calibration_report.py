"""Temperature scaling of an over-confident net, and what it does to the gap estimate.

A 64-unit MLP on 200 digits, weight decay 1e-5, 100 epochs: it memorizes its training set and
is over-confident on new data. ``calibration_report`` fits the temperature T on half of the
test split (the calibration data) and measures, before and after scaling the logits by 1/T,
the training loss, ECE, α, the soft rank and the gap estimates, with the test loss and ECE on
the other half. The docs' training-loop guide shows its output.

    python examples/calibration_report.py       # ~20 s on one core
"""
from __future__ import annotations

import torch

from softrank.calibration import calibration_report
from softrank.datasets import load_digits_split
from softrank.demo import make_mlp_classifier


def main() -> None:
    torch.set_num_threads(1)
    data = load_digits_split()
    X, y = data.X_train[:200], data.y_train[:200]
    X_cal, y_cal = data.X_test[::2], data.y_test[::2]
    X_test, y_test = data.X_test[1::2], data.y_test[1::2]
    torch.manual_seed(0)
    net = make_mlp_classifier(hidden=64, weight_decay=1e-5, max_epochs=100).fit(X, y)
    print(calibration_report(net, X, y, X_test, y_test, X_cal=X_cal, y_cal=y_cal))


if __name__ == "__main__":
    main()
