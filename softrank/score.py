"""``softrank score``: estimate a saved skorch net's generalization gap from a script.

Loads a fitted skorch net — a pickle (``pickle.dump(net, f)``), or the files of
``net.save_params(f_params=...)`` with the module class named as ``package.module:Class`` — and
its training data (.npz, .npy or .csv), runs one gap estimator with ``prefit=True`` and prints
a summary, or JSON with ``--json``. The numbers are those of the Python API::

    SoftRankFIM(net, approximation=..., lam=..., prefit=True).fit(X, y)

Example::

    softrank score net.pkl --data train.npz --estimator soft_rank --approximation kfac --json

This module imports torch, skorch and the estimators only when it runs, so that
``softrank score --help`` is fast.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["ESTIMATORS", "build_parser", "load_net", "load_data", "make_estimator", "summary",
           "main"]

#: ``--estimator`` choices -> (class name in softrank, parameters it takes from the options)
ESTIMATORS = {
    "soft_rank": ("SoftRankFIM", ("lam", "approximation", "gap_formula")),
    "tic": ("TIC", ("lam", "approximation", "variant")),
    "trace_ratio": ("TraceRatio", ()),
    "hessian_norm": ("HessianNorm", ("approximation", "ord")),
    "approx_loo": ("ApproxLOO", ("lam", "method", "n_points")),
}
_APPROXIMATIONS = ("exact", "dense", "gram", "diagonal", "kfac", "ekfac", "matrix_free")
_NETS = {"classifier": "NeuralNetClassifier", "binary": "NeuralNetBinaryClassifier",
         "regressor": "NeuralNetRegressor"}


def _lam(text: str):
    if text in ("auto", "effective"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--lam must be 'auto', 'effective' or a number; got {text!r}")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``softrank score`` argument parser (or fill ``parser``, a subcommand's parser)."""
    p = parser or argparse.ArgumentParser(prog="softrank score")
    p.description = ("Estimate the generalization gap of a saved, fitted skorch net from its "
                     "training data, with one of softrank's estimators.")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("examples:\n"
                "  softrank score net.pkl --data train.npz --approximation kfac\n"
                "  softrank score params.pt --module mypkg.nets:MLP --module-kwargs "
                "'{\"hidden\": 32}' \\\n"
                "      --criterion torch.nn.CrossEntropyLoss --lam 1e-3 --data train.csv "
                "--estimator approx_loo --json")
    p.add_argument("model", metavar="MODEL",
                   help="a pickled fitted skorch net (.pkl/.pickle), or the f_params file of "
                        "net.save_params (then --module is required)")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="training data: .npz (arrays X and y, see --x-key/--y-key), .npy (X; "
                        "labels from --labels) or .csv (numbers; target column --target)")
    p.add_argument("--labels", metavar="PATH", help=".npy file of the targets for .npy data")
    p.add_argument("--x-key", default="X", help="array name of the inputs in .npz (default X)")
    p.add_argument("--y-key", default="y", help="array name of the targets in .npz (default y)")
    p.add_argument("--target", type=int, default=-1,
                   help="target column of .csv data (default -1, the last); a header line is "
                        "skipped")
    p.add_argument("--estimator", choices=list(ESTIMATORS), default="soft_rank",
                   help="which estimate (default soft_rank: SoftRankFIM)")
    p.add_argument("--approximation", choices=_APPROXIMATIONS, default="exact",
                   help="curvature representation (default exact)")
    p.add_argument("--lam", type=_lam, default="auto",
                   help="weight decay Λ = λI of the objective; default 'auto' reads the "
                        "optimizer's weight_decay")
    p.add_argument("--gap-formula", choices=("alpha_rank", "rank"), default="alpha_rank",
                   help="soft_rank: α·rank/n (default) or rank/n")
    p.add_argument("--variant", choices=("fisher", "hessian"), default="fisher",
                   help="tic: M = F or H")
    p.add_argument("--ord", choices=("trace", "spectral", "max_eigenvalue", "frobenius"),
                   default="trace", help="hessian_norm: which norm (or the largest eigenvalue)")
    p.add_argument("--method", choices=("auto", "exact", "nystrom", "cavity", "kfac",
                                        "subsample"),
                   default="auto", help="approx_loo: how P_i is computed (default auto: exact "
                   "while it fits in 2 GiB, else nystrom up to n = 3,000, else cavity)")
    p.add_argument("--n-points", type=int,
                   help="approx_loo --method nystrom, cavity or subsample: points")
    p.add_argument("--finish", action="store_true",
                   help="measure the net finished to the minimizer of mean loss + ½θᵀΛθ "
                   "(full-batch L-BFGS), as every estimate assumes")
    p.add_argument("--n-curvature-samples", type=int,
                   help="estimate the curvature on this many random samples")
    p.add_argument("--batch-size", type=int, default=256, help="samples per batch (256)")
    p.add_argument("--random-state", type=int, default=0, help="seed (default 0)")
    p.add_argument("--device", help="torch device (default: the module's)")
    p.add_argument("--memory-budget", help="refuse above this many bytes, e.g. 2GB")
    loading = p.add_argument_group("loading save_params files")
    loading.add_argument("--module", metavar="PACKAGE.MODULE:CLASS",
                         help="the module class the net wraps (importable)")
    loading.add_argument("--module-kwargs", default="{}", metavar="JSON",
                         help="keyword arguments of the module class, as JSON")
    loading.add_argument("--net", choices=list(_NETS), default="classifier",
                         help="skorch net class (default classifier)")
    loading.add_argument("--criterion", metavar="PACKAGE.MODULE:CLASS",
                         help="criterion class, e.g. torch.nn.CrossEntropyLoss (default: the "
                              "skorch net's)")
    loading.add_argument("--history", metavar="PATH",
                         help="f_history file of save_params (n is read from it; else from "
                              "the net's train_split)")
    loading.add_argument("--train-split", choices=("default", "none"), default="default",
                         help="'none': the net trained on all of the data (n = len(data))")
    p.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _import(path: str, what: str):
    """``package.module:Name`` or ``package.module.Name`` -> the object."""
    import importlib

    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    if not module or not name:
        raise SystemExit(f"softrank score: {what} must be 'package.module:Name'; got {path!r}")
    try:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"softrank score: cannot import {what} {path!r}: {e}. Is its package "
                         "on PYTHONPATH?") from None
    return obj


def load_net(args):
    """The fitted skorch net (or Pipeline) of ``args.model``."""
    path = Path(args.model)
    if not path.exists():
        raise SystemExit(f"softrank score: no such model file: {path}")
    if path.suffix in (".pkl", ".pickle"):
        import pickle

        with open(path, "rb") as f:
            return pickle.load(f)
    if not args.module:
        raise SystemExit(
            f"softrank score: {path} is not a pickle (.pkl/.pickle): for the f_params file of "
            "net.save_params, name the module class with --module package.module:Class "
            "(and --module-kwargs, --criterion, --lam as the net was trained)")
    import skorch

    module = _import(args.module, "--module")
    kwargs = json.loads(args.module_kwargs)
    options = {f"module__{k}": v for k, v in kwargs.items()}
    if args.criterion:
        options["criterion"] = _import(args.criterion, "--criterion")
    if args.train_split == "none":
        options["train_split"] = None
    net = getattr(skorch, _NETS[args.net])(module, **options)
    net.initialize()
    net.load_params(f_params=str(path), f_history=args.history)
    return net


def load_data(args):
    """(X, y) arrays from ``args.data`` (.npz, .npy + --labels, or .csv)."""
    import numpy as np

    path = Path(args.data)
    if not path.exists():
        raise SystemExit(f"softrank score: no such data file: {path}")
    if path.suffix == ".npz":
        with np.load(path) as d:
            missing = [k for k in (args.x_key, args.y_key) if k not in d]
            if missing:
                raise SystemExit(f"softrank score: {path} has arrays {sorted(d.files)}, not "
                                 f"{missing}; name them with --x-key/--y-key")
            return d[args.x_key], d[args.y_key]
    if path.suffix == ".npy":
        if not args.labels:
            raise SystemExit("softrank score: .npy data needs the targets in --labels FILE.npy")
        return np.load(path), np.load(args.labels)
    if path.suffix == ".csv":
        with open(path) as f:
            first = f.readline()
        try:
            [float(v) for v in first.strip().split(",")]
            skip = 0
        except ValueError:
            skip = 1
        table = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2)
        y = table[:, args.target]
        X = np.delete(table, args.target % table.shape[1], axis=1)
        return X, y
    raise SystemExit(f"softrank score: data must be .npz, .npy or .csv; got {path.name}")


def _cast(net, X, y):
    """Inputs to float32 (the estimator casts to the module's dtype), class labels to int64."""
    import numpy as np

    from . import skorch_adapter as sk

    X = np.asarray(X)
    if X.dtype.kind in "fiub":
        X = X.astype(np.float32)
    y = np.asarray(y)
    _, inner = sk.split_estimator(net)
    if sk.net_kind(inner) == "classifier" and y.dtype.kind == "f" and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    elif sk.net_kind(inner) in ("regressor", "binary") and y.dtype.kind != "f":
        y = y.astype(np.float32)
    return X, y


def make_estimator(net, args):
    """The softrank estimator ``args.estimator`` around ``net`` (``prefit=True``)."""
    import softrank

    name, own = ESTIMATORS[args.estimator]
    options = {"gap_formula": args.gap_formula, "variant": args.variant, "ord": args.ord,
               "method": args.method, "n_points": args.n_points, "lam": args.lam,
               "approximation": args.approximation}
    kwargs = {k: options[k] for k in own}
    return getattr(softrank, name)(
        net, prefit=True, n_curvature_samples=args.n_curvature_samples,
        batch_size=args.batch_size, random_state=args.random_state, device=args.device,
        memory_budget=args.memory_budget, verbose=not args.no_progress, finish=args.finish,
        **kwargs)


def _plain(value):
    """JSON-ready: floats, ints, lists, dicts (tensors and arrays converted)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def summary(est) -> dict:
    """The numbers ``softrank score`` prints, from a fitted estimator."""
    out = {"estimator": type(est).__name__, "n_train": est.n_train_,
           "n_samples": est.n_samples_fit_, "lam": _plain(est.lam_),
           "approximation": est.approximation_, "measure": est.measure_, "gap": est.gap_,
           "train_loss": est.train_loss_,
           "estimated_test_loss": None if est.gap_ is None else est.train_loss_ + est.gap_,
           "stderr": est.stderr_}
    d = est.result_.diagnostics
    for key in ("alpha", "calibrated_gap", "soft_rank", "tic_gap"):
        if key in d and key not in out:
            out[key] = _plain(d[key])
    return out


def _format(s: dict) -> str:
    lines = [f"{s['estimator']} on {s['n_samples']} samples (n = {s['n_train']} trained on), "
             f"lambda = {s['lam']}, approximation = {s['approximation']}",
             f"  measure              {s['measure']:.6g}"]
    if s["gap"] is not None:
        lines += [f"  train loss           {s['train_loss']:.6g}",
                  f"  gap estimate         {s['gap']:.6g}",
                  f"  estimated test loss  {s['estimated_test_loss']:.6g}"]
    if s["stderr"] is not None:
        lines.append(f"  standard error       {s['stderr']:.3g}")
    for key in ("alpha", "calibrated_gap", "soft_rank", "tic_gap"):
        if isinstance(s.get(key), float):
            lines.append(f"  {key:<20} {s[key]:.6g}")
    return "\n".join(lines)


def main(args: argparse.Namespace | None = None) -> int:
    """Run ``softrank score`` (parsed ``args``, or the command line)."""
    args = args if args is not None else build_parser().parse_args()
    net = load_net(args)
    X, y = _cast(net, *load_data(args))
    est = make_estimator(net, args).fit(X, y)
    s = summary(est)
    print(json.dumps(_plain(s), indent=2) if args.json else _format(s))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
