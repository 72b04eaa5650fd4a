"""ApproxLOO's default at n = 60,000 against training epochs, as whole processes (farm-bench).

``--what train`` trains the MLP 784-512-10 (``--net cnn``: bench_loo's small CNN) on all 60,000
MNIST training images for ``--epochs`` epochs (Adam, weight decay λ, batch 256, one thread)
and, with ``--out``, saves it; ``--what loo`` loads such a net and runs ``approx_loo(md, lam)``
(``'auto'``: ``'nystrom'`` with its defaults). Both processes pay the same start-up (imports,
MNIST), so paired by farm-bench the ratio says whether the default costs less than that many
epochs:

    python benchmarks/bench_loo_epochs.py --what train --epochs 1 --out /tmp/mlp.pt
    farm-bench -n 5 --timeout 1800 \\
        --vs 'python benchmarks/bench_loo_epochs.py --what train --epochs 10' \\
        -- python benchmarks/bench_loo_epochs.py --what loo --load /tmp/mlp.pt

(run from the repository root with ``PYTHONPATH=$PWD``). A ratio A/B below 1: the default took
less than 10 epochs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _common as C  # noqa: E402
from bench_loo import small_cnn  # noqa: E402

from softrank import ModelData, approx_loo  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", choices=("train", "loo"), required=True)
    p.add_argument("--net", choices=("mlp", "cnn"), default="mlp")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lam", type=float, default=1e-3)
    p.add_argument("--out", default=None, help="train: save the net's state here")
    p.add_argument("--load", default=None, help="loo: the net's state to load")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    C.setup_torch(1, args.seed)
    X, y = C.load_mnist(n=60_000)
    model = C.mlp((784, 512, 10), seed=args.seed) if args.net == "mlp" else small_cnn(args.seed)
    if args.what == "train":
        opt = C.make_optimizer(model, args.lam)
        gen = torch.Generator().manual_seed(args.seed)
        for _ in range(args.epochs):
            C.train_epoch(model, opt, X, y, 256, gen)
        if args.out:
            torch.save(model.state_dict(), args.out)
        return
    model.load_state_dict(torch.load(args.load))
    model.eval()
    res = approx_loo(ModelData(model, nn.CrossEntropyLoss(), X, y, batch_size=256), args.lam,
                     random_state=args.seed)
    print(f"{res.method}: gap {res.gap:.4f} ± {res.stderr:.4f}")


if __name__ == "__main__":
    main()
