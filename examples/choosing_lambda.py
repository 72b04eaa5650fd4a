"""Choosing λ: what the regularization coefficient is, how to convert it, and how to select it.

1. The convention, checked on linear regression. softrank's λ is the weight decay of
   ``mean_i ℓ_i + ½ λ‖θ‖²``. scikit-learn's ``Ridge(alpha)`` minimizes ``‖y − Xw‖² + alpha‖w‖²``
   (a *sum* of squares), which is n times the mean-MSE objective with λ = 2·alpha/n. At that λ
   the soft rank of the Hessian equals Ridge's effective degrees of freedom (the trace of its
   hat matrix), and softrank's approximate leave-one-out equals scikit-learn's exact
   leave-one-out error (``RidgeCV``), so both select the same alpha.
2. One network, many λ: rank_λ(F) = Σ σ/(σ+λ) is a soft count of the Fisher eigenvalues above λ.
3. Selecting the weight decay of a network by an estimated test loss (training data only) —
   the soft-rank estimate α·rank/n (what ``SoftRankFIM.score`` uses), the calibrated rank/n,
   and ApproxLOO — next to the real test loss each was trying to predict.

    python examples/choosing_lambda.py           # ~20 s on one core
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from skorch import NeuralNetClassifier
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge, RidgeCV
from torch import nn

from softrank import ApproxLOO, ModelData, SoftRankFIM, approx_loo, curvature
from softrank.datasets import load_digits_split


# -- 1. ridge regression: λ = 2·alpha/n ------------------------------------------------------------
def linear_model(coef: np.ndarray) -> nn.Linear:
    """nn.Linear(d, 1) in float64 holding [w, b] = coef (the last entry is the intercept)."""
    model = nn.Linear(len(coef) - 1, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(coef[:-1]).reshape(1, -1))
        model.bias.copy_(torch.as_tensor(coef[-1:]))
    return model


def ridge_section(alphas):
    X, y = load_diabetes(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    X1 = np.hstack([X, np.ones((len(X), 1))])  # intercept as a penalized column, like θ = [W | b]
    n = len(X1)
    loo_mse = RidgeCV(alphas=alphas, fit_intercept=False, store_cv_results=True).fit(X1, y)
    loo_mse = loo_mse.cv_results_.mean(0)  # sklearn's exact leave-one-out MSE per alpha
    print(f"1. Ridge on diabetes (n = {n}, 11 weights incl. intercept): lambda = 2*alpha/n")
    print(f"{'alpha':>7}  {'lambda':>9}  {'Ridge dof':>9}  {'rank_lam(H)':>11}  "
          f"{'sklearn LOO MSE':>15}  {'ApproxLOO':>9}")
    ours = []
    for alpha, sk_loo in zip(alphas, loo_mse):
        coef = Ridge(alpha=alpha, fit_intercept=False).fit(X1, y).coef_
        hat = X1 @ np.linalg.solve(X1.T @ X1 + alpha * np.eye(X1.shape[1]), X1.T)
        lam = 2 * alpha / n
        md = ModelData(linear_model(coef), nn.MSELoss(), X, y[:, None])
        rank = curvature(md, "hessian", "dense").soft_rank(lam)
        loo = approx_loo(md, lam).estimated_test_loss
        ours.append(loo)
        print(f"{alpha:7g}  {lam:9.3g}  {np.trace(hat):9.4f}  {rank:11.4f}  {sk_loo:15.6f}  "
              f"{loo:9.6f}")
    print(f"   sklearn's leave-one-out picks alpha = {alphas[int(np.argmin(loo_mse))]:g}, "
          f"softrank's ApproxLOO picks alpha = {alphas[int(np.argmin(ours))]:g}\n")


# -- 2 and 3. a network ----------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.hidden, self.out = nn.Linear(64, hidden), nn.Linear(hidden, 10)

    def forward(self, X):
        return self.out(torch.relu(self.hidden(X)))


def make_net(weight_decay):
    """Adam with L2 weight_decay on the mean cross-entropy: Λ = weight_decay · I exactly."""
    return NeuralNetClassifier(MLP, criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam,
                               lr=0.01, optimizer__weight_decay=weight_decay, max_epochs=40,
                               batch_size=64, train_split=None, verbose=0)


def soft_count_section(X, y, seed):
    torch.manual_seed(seed)
    net = make_net(1e-3).fit(X, y)
    md = ModelData(net.module_, net.criterion_, X, y)
    sigma = curvature(md, "fisher", "exact").eigvals()  # dense here: p = 2410
    print(f"2. One MLP (trained with weight decay 1e-3, n = {len(X)}): the soft rank of F at "
          f"other lambdas")
    print(f"{'lambda':>7}  {'rank_lam(F)':>11}  {'#eigenvalues > lambda':>21}")
    for lam in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1):
        rank = float((sigma / (sigma + lam)).sum())
        print(f"{lam:7g}  {rank:11.1f}  {int((sigma > lam).sum()):21d}")
    print("   (the gap estimate of this net uses lambda = the weight decay it was trained with, "
          "1e-3)\n")


def selection_section(data, X, y, grid, seed):
    print(f"3. Selecting the weight decay by an estimated test loss (n = {len(X)}, training data "
          "only)")
    print(f"{'weight decay':>12}  {'train loss':>10}  {'est. alpha*rank/n':>17}  "
          f"{'est. rank/n':>11}  {'est. ApproxLOO':>14}  {'real test':>9}")
    columns = {"alpha*rank/n": [], "rank/n": [], "ApproxLOO": [], "real": []}
    for wd in grid:
        est = SoftRankFIM(make_net(wd), approximation="kfac", random_state=seed).fit(X, y)
        net = est.estimator_  # the trained skorch net, measured again without retraining
        loo = ApproxLOO(net, method="exact", prefit=True).fit(X, y)
        train = est.train_loss_
        columns["alpha*rank/n"].append(train + est.gap_)  # = -est.score(X, y)
        columns["rank/n"].append(train + est.result_.diagnostics["calibrated_gap"])
        columns["ApproxLOO"].append(loo.measure_)  # mean leave-one-out loss
        columns["real"].append(est.loss(data.X_test, data.y_test))
        print(f"{wd:12g}  {train:10.4f}  {columns['alpha*rank/n'][-1]:17.4f}  "
              f"{columns['rank/n'][-1]:11.4f}  {columns['ApproxLOO'][-1]:14.4f}  "
              f"{columns['real'][-1]:9.4f}")
    real = np.array(columns.pop("real"))
    print(f"   best in the grid: {grid[int(real.argmin())]:g} (real test loss {real.min():.4f})")
    for name, values in columns.items():
        pick = int(np.argmin(values))
        print(f"   {name:>12} picks {grid[pick]:g} (real test loss {real[pick]:.4f}, "
              f"+{real[pick] - real.min():.4f})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=300, help="digits training samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny nets: one thread is fastest
    ridge_section([0.1, 1.0, 10.0, 100.0, 1000.0])
    data = load_digits_split(random_state=args.seed)
    X, y = data.X_train[:args.n], data.y_train[:args.n]
    soft_count_section(X, y, args.seed)
    selection_section(data, X, y, [1e-5, 1e-4, 1e-3, 1e-2, 1e-1], args.seed)


if __name__ == "__main__":
    main()
