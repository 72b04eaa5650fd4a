"""The command line: ``softrank --help`` imports no heavy library, ``softrank score`` prints the
numbers of the Python API for a pickled net and for save_params files."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

torch = pytest.importorskip("torch")
skorch = pytest.importorskip("skorch")
from torch import nn  # noqa: E402

from softrank import ApproxLOO, SoftRankFIM, TraceRatio  # noqa: E402
from softrank import cli  # noqa: E402
from softrank.datasets import load_digits_split  # noqa: E402


class MLP(nn.Module):
    """Importable module class (``tests.test_cli:MLP``) for the save_params path."""

    def __init__(self, hidden=16):
        super().__init__()
        self.hidden, self.out = nn.Linear(64, hidden), nn.Linear(hidden, 10)

    def forward(self, X):
        return self.out(torch.tanh(self.hidden(X)))


@pytest.fixture(scope="module")
def digits_net():
    data = load_digits_split()
    X, y = data.X_train[:150], data.y_train[:150]
    torch.manual_seed(0)
    net = skorch.NeuralNetClassifier(MLP, criterion=nn.CrossEntropyLoss,
                                     optimizer=torch.optim.Adam, lr=0.01,
                                     optimizer__weight_decay=1e-3, max_epochs=15,
                                     train_split=None, verbose=0).fit(X, y)
    return net, X, y


def _run(argv, capsys) -> dict:
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_help_imports_no_heavy_library():
    """``softrank --help`` and ``softrank score --help`` build their parsers without torch,
    skorch, scikit-learn or numpy (measured: ~0.1 s of softrank's own imports)."""
    code = ("import sys, time; t = time.perf_counter(); from softrank import cli; "
            "cli.build_parser(); cli.build_parser('score'); "
            "print(time.perf_counter() - t); "
            "print(sorted(m for m in ('torch', 'skorch', 'sklearn', 'numpy') if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, check=True).stdout.split("\n")
    assert out[1] == "[]", out
    assert float(out[0]) < 1.0, out  # generous: a loaded CI machine


@pytest.mark.parametrize("argv", [["--help"], ["score", "--help"]])
def test_help_exits_cleanly(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: softrank" in text and ("score" in text)


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_score_pickled_net_matches_python_api(digits_net, tmp_path, capsys):
    net, X, y = digits_net
    model = tmp_path / "net.pkl"
    model.write_bytes(pickle.dumps(net))
    data = tmp_path / "train.npz"
    np.savez(data, X=X, y=y)
    got = _run(["score", str(model), "--data", str(data), "--approximation", "kfac",
                "--json", "--no-progress"], capsys)
    api = SoftRankFIM(net, approximation="kfac", prefit=True, random_state=0).fit(X, y)
    assert got["estimator"] == "SoftRankFIM" and got["n_train"] == 150
    assert got["lam"] == pytest.approx(1e-3)
    for key, value in [("measure", api.measure_), ("gap", api.gap_),
                       ("train_loss", api.train_loss_),
                       ("alpha", api.result_.diagnostics["alpha"])]:
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert got["estimated_test_loss"] == pytest.approx(api.train_loss_ + api.gap_, rel=1e-12)

    # the plain-text summary carries the same numbers
    assert cli.main(["score", str(model), "--data", str(data), "--approximation", "kfac",
                     "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"{api.gap_:.6g}" in text and f"{api.measure_:.6g}" in text


def test_score_other_estimators_and_data_formats(digits_net, tmp_path, capsys):
    net, X, y = digits_net
    model = tmp_path / "net.pickle"
    model.write_bytes(pickle.dumps(net))
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    got = _run(["score", str(model), "--data", str(tmp_path / "X.npy"), "--labels",
                str(tmp_path / "y.npy"), "--estimator", "trace_ratio", "--json",
                "--no-progress"], capsys)
    assert got["measure"] == pytest.approx(TraceRatio(net, prefit=True).fit(X, y).measure_,
                                           rel=1e-12)
    csv = tmp_path / "train.csv"
    header = ",".join([f"x{i}" for i in range(64)] + ["label"])
    np.savetxt(csv, np.column_stack([X, y]), delimiter=",", header=header, comments="")
    got = _run(["score", str(model), "--data", str(csv), "--estimator", "approx_loo",
                "--method", "kfac", "--lam", "0.01", "--json", "--no-progress"], capsys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # KFAC steps may be invalid: reported
        api = ApproxLOO(net, method="kfac", lam=0.01, prefit=True, random_state=0).fit(X, y)
    assert got["estimator"] == "ApproxLOO" and got["lam"] == 0.01
    assert got["measure"] == pytest.approx(api.measure_, rel=1e-10)


def test_score_save_params_files(digits_net, tmp_path, capsys):
    net, X, y = digits_net
    f_params, f_history = tmp_path / "params.pt", tmp_path / "history.json"
    net.save_params(f_params=str(f_params), f_history=str(f_history))
    data = tmp_path / "train.npz"
    np.savez(data, X=X, y=y)
    got = _run(["score", str(f_params), "--module", "tests.test_cli:MLP", "--module-kwargs",
                '{"hidden": 16}', "--criterion", "torch.nn:CrossEntropyLoss",
                "--history", str(f_history), "--lam", "1e-3", "--data", str(data),
                "--approximation", "kfac", "--json", "--no-progress"], capsys)
    api = SoftRankFIM(net, approximation="kfac", prefit=True, random_state=0).fit(X, y)
    assert got["n_train"] == 150
    assert got["measure"] == pytest.approx(api.measure_, rel=1e-10)
    assert got["gap"] == pytest.approx(api.gap_, rel=1e-10)


def test_score_errors_say_what_to_do(digits_net, tmp_path):
    net, X, y = digits_net
    f_params = tmp_path / "params.pt"
    net.save_params(f_params=str(f_params))
    data = tmp_path / "train.npz"
    np.savez(data, inputs=X, y=y)
    with pytest.raises(SystemExit, match="--module package.module:Class"):
        cli.main(["score", str(f_params), "--data", str(data)])
    model = tmp_path / "net.pkl"
    model.write_bytes(pickle.dumps(net))
    with pytest.raises(SystemExit, match="--x-key"):
        cli.main(["score", str(model), "--data", str(data)])
    with pytest.raises(SystemExit, match="no such data file"):
        cli.main(["score", str(model), "--data", str(tmp_path / "missing.npz")])


def test_verbose_shows_progress_bars(digits_net, capsys):
    net, X, y = digits_net
    t = time.perf_counter()
    SoftRankFIM(net, approximation="matrix_free", prefit=True, random_state=0,
                verbose=True).fit(X, y)
    err = capsys.readouterr().err
    assert "data pass" in err and "Lanczos" in err, err[-2000:]
    SoftRankFIM(net, approximation="kfac", prefit=True).fit(X, y)
    assert capsys.readouterr().err == ""  # off by default
    assert time.perf_counter() - t < 60
