"""torch.optim.LBFGS (strong Wolfe) against scipy's L-BFGS-B on the same float64 objective
(softrank.stationarity._Objective): final r, objective passes and time, on an MNIST MLP
784-32-10 trained as softrank.study does (n = 300, Adam lr 2e-3, batch 64, 40 epochs)."""
from pathlib import Path
import time
import numpy as np
import scipy.optimize
import torch
from softrank.study.grid import TrainConfig
from softrank.study.train import train_model, load_data
from softrank import stationarity as st

torch.set_num_threads(1)
ITERS = 200
for wd in (1e-4, 1e-2):
    cfg = TrainConfig(dataset="mnist", width=32, weight_decay=wd, lr=2e-3, epochs=40,
                      n_train=300, n_test=1000)
    data = load_data(cfg, str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    net = train_model(cfg, data)
    t = time.perf_counter()
    res = st.finish_training(net, data.X_train, data.y_train, tol=1e-3, max_iter=ITERS)
    print(f"wd={wd:g} torch LBFGS: r {res.stationarity_before:.4g} -> {res.stationarity_after:.4g}"
          f" passes={res.n_evaluations} objective={res.objective_after:.10g}"
          f" {time.perf_counter() - t:.1f}s", flush=True)
    o = st._Objective(net, data.X_train, data.y_train, "auto", None, 4096, None)
    rs = []

    def fun(x):
        o.set_theta(torch.from_numpy(x))
        obj, _, g, r = o.evaluate()
        rs.append(r)
        return obj, g.numpy().copy()

    t = time.perf_counter()
    out = scipy.optimize.minimize(fun, o.theta().numpy().copy(), jac=True, method="L-BFGS-B",
                                  options={"maxiter": ITERS, "maxcor": 20, "ftol": 0, "gtol": 0})
    o.set_theta(torch.from_numpy(out.x))
    print(f"wd={wd:g} scipy L-BFGS-B: r -> {o.evaluate()[3]:.4g} passes={out.nfev}"
          f" objective={out.fun:.10g} {time.perf_counter() - t:.1f}s ({out.message})", flush=True)
