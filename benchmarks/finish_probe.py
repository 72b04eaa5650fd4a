"""Probe: finish_training on MNIST MLPs trained as softrank.study does (n=300)."""
from pathlib import Path
import sys, time
import numpy as np, torch
from softrank.study.grid import TrainConfig
from softrank.study.train import train_model, load_data
from softrank.stationarity import finish_training, relative_stationarity
torch.set_num_threads(1)
for wd, ep, width in [(1e-4, 40, 32), (1e-2, 40, 32), (1e-4, 2, 32)]:
    cfg = TrainConfig(dataset="mnist", width=width, weight_decay=wd, lr=2e-3, epochs=ep, n_train=300, n_test=1000)
    data = load_data(cfg, str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    net = train_model(cfg, data)
    for hs in (20, 100):
        t = time.time()
        res = finish_training(net, data.X_train, data.y_train, tol=1e-3, max_iter=int(sys.argv[1]), history_size=hs)
        print(f"wd={wd} ep={ep} h={width} hist={hs}: r {res.stationarity_before:.4g} -> {res.stationarity_after:.4g} it={res.n_iter} ev={res.n_evaluations} loss {res.loss_before:.4f}->{res.loss_after:.4f} {time.time()-t:.1f}s", flush=True)
