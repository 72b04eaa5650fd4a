"""softrank.study: grid ids, the resumable store, the runners (serial, joblib, Dask), the
analysis (Kendall τ, granulated τ) against hand-computed values, and the figures."""
from __future__ import annotations

import itertools
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from softrank.study import (ResultStore, StudyJobError, TrainConfig, cli_main, expand_grid,
                            granulated_tau, kendall_tau, load_grid, markdown_report, ratios,
                            read_csv, run_config, run_study, tau_table, write_csv)
from softrank.study.analysis import ratio_summary, split_regimes
from softrank.study.grid import MeasureOptions
from softrank.study.measures import (_hessian_norms, _loo, _stationarity,
                                     expected_calibration_error)
from softrank.model import ModelData

ROOT = Path(__file__).resolve().parents[1]

# a grid that trains in well under a second per model
TINY_MEASURES = {"gram_samples": 60, "hessian_samples": 40, "test_samples": 50,
                 "dense_max_params": 50, "hessian_probes": 4, "hessian_iterations": 6}
TINY_GRID = {
    "name": "tiny",
    "measures": TINY_MEASURES,
    "fixed": {"dataset": "teacher_student", "n_train": 60, "n_test": 100, "epochs": 3,
              "batch_size": 16, "lr": 0.01},
    "vary": {"width": [4, 8], "weight_decay": [1e-3, 1e-2]},
}
# columns that legitimately differ between two runs of the same configuration
VOLATILE = ("time_",)


def _stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def _by_id(rows):
    return {r["config_id"]: _stable(r) for r in rows}


def _assert_same_tables(rows_a, rows_b):
    a, b = _by_id(rows_a), _by_id(rows_b)
    assert a.keys() == b.keys()
    for cid in a:
        assert a[cid].keys() == b[cid].keys(), cid
        for k, v in a[cid].items():
            if isinstance(v, float):
                assert b[cid][k] == pytest.approx(v, rel=1e-9, abs=1e-12, nan_ok=True), (cid, k)
            else:
                assert b[cid][k] == v, (cid, k)


@pytest.fixture(scope="module")
def tiny_configs():
    return expand_grid(TINY_GRID)


@pytest.fixture(scope="module")
def serial_rows(tiny_configs, tmp_path_factory):
    """The tiny grid run serially once: the reference table of the module."""
    path = tmp_path_factory.mktemp("serial") / "serial.sqlite"
    run_study(tiny_configs, path, backend="serial", progress=False)
    with ResultStore(path) as store:
        return store.rows()


# -- grid -----------------------------------------------------------------------------------
def test_grid_expands_the_product_with_stable_ids(tmp_path):
    configs = expand_grid(TINY_GRID)
    assert len(configs) == 4
    assert [(c.width, c.weight_decay) for c in configs] == list(
        itertools.product([4, 8], [1e-3, 1e-2]))
    assert len({c.id for c in configs}) == 4
    # the id depends on the values, not on how they were written
    same = TrainConfig("teacher_student", width=4.0, weight_decay=0.001, n_train=60, n_test=100,
                       epochs=3, batch_size=16, lr=0.01, measures=MeasureOptions(**TINY_MEASURES))
    assert same.id == configs[0].id
    assert TrainConfig("mnist", lr=1).id == TrainConfig("mnist", lr=1.0).id
    # ... and on the measurement options
    other = TrainConfig("teacher_student", width=4, weight_decay=0.001, n_train=60, n_test=100,
                        epochs=3, batch_size=16, lr=0.01)
    assert other.id != configs[0].id
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(TINY_GRID))
    spec, loaded = load_grid(path)
    assert [c.id for c in loaded] == [c.id for c in configs]


def test_grid_blocks_union_without_duplicates():
    block = {"fixed": {"dataset": "digits"}, "vary": {"width": [4, 8]}}
    configs = expand_grid({"blocks": [block, block, {"fixed": {"dataset": "digits",
                                                               "width": 16}}]})
    assert [c.width for c in configs] == [4, 8, 16]


@pytest.mark.parametrize("spec, match", [
    ({"fixed": {"dataset": "digits", "widht": 4}}, "widht"),
    ({"fixed": {"dataset": "digits"}, "vary": {"width": []}}, "non-empty"),
    ({"fixed": {"width": 4}}, "dataset"),
    ({"fixed": {"dataset": "digits", "weight_decay": 0}}, "weight_decay"),
    ({"fixed": {"dataset": "digits", "arch": "rnn"}}, "arch"),
    ({"fixed": {"dataset": "digits"}, "measures": {"gram_sample": 3}}, "gram_sample"),
])
def test_grid_rejects_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        expand_grid(spec)


# -- store ----------------------------------------------------------------------------------
def test_store_keys_on_config_id_and_persists(tmp_path):
    path = tmp_path / "s.sqlite"
    with ResultStore(path) as store:
        assert store.add("1e5000000000", {"a": 1}, {"config_id": "1e5000000000", "x": 1.5})
        assert not store.add("1e5000000000", {"a": 1}, {"config_id": "1e5000000000", "x": 9.0})
        assert store.add("b", {"a": 2}, {"config_id": "b", "x": float("nan"), "y": "text"})
    with ResultStore(path) as store:
        assert len(store) == 2 and "b" in store and store.done_ids() == {"1e5000000000", "b"}
        rows = store.rows()
        assert rows[0]["x"] == 1.5 and math.isnan(rows[1]["x"])
        store.to_csv(tmp_path / "t.csv")
    back = read_csv(tmp_path / "t.csv")
    assert back[0] == {"config_id": "1e5000000000", "x": 1.5}  # the id stays text; no 'y' cell
    assert back[1]["y"] == "text" and math.isnan(back[1]["x"])


# -- runner ---------------------------------------------------------------------------------
def _counting_job(config, torch_threads=1, data_root=None):
    """Records how many rows the store held when this job started (serial backend)."""
    with ResultStore(os.environ["SOFTRANK_TEST_STORE"]) as store:
        before = len(store)
    row = run_config(config, torch_threads=torch_threads, data_root=data_root)
    return {**row, "rows_before": before}


def test_serial_run_writes_each_row_before_the_next_model(tiny_configs, tmp_path, monkeypatch):
    path = tmp_path / "s.sqlite"
    monkeypatch.setenv("SOFTRANK_TEST_STORE", str(path))
    summary = run_study(tiny_configs, path, backend="serial", progress=False,
                        job=_counting_job)
    assert summary.n_written == 4 and summary.n_already_done == 0
    with ResultStore(path) as store:
        assert [r["rows_before"] for r in store.rows()] == [0, 1, 2, 3]
    again = run_study(tiny_configs, path, backend="serial", progress=False)
    assert again.n_already_done == 4 and again.n_written == 0


def test_row_holds_every_measure(serial_rows):
    row = serial_rows[0]
    assert row["errors"] == ""
    assert row["observed_gap"] == pytest.approx(row["test_loss"] - row["train_loss"])
    n = row["n_train"]
    for a in ("gram", "kfac", "ekfac", "diagonal"):
        assert row[f"est_rank_n_{a}"] == pytest.approx(row[f"rank_{a}"] / n)
        assert row[f"est_softrank_{a}"] == pytest.approx(row["alpha_train"] * row[f"rank_{a}"] / n)
    assert row["alpha_train"] == pytest.approx(row["trace_C"] / row["trace_F"])
    assert row["loo_exact_invalid_points"] == 0  # exact P_i: every A_i P_i has spectrum < 1
    assert 0 <= row["loo_exact_max_leverage"] < 1 and row["grad_norm"] > 0
    assert row["est_trace_ratio"] == pytest.approx(row["alpha_train"] / n)
    for c in ("est_tic_gram", "est_tic_kfac", "est_loo_exact", "est_loo_kfac", "alpha_test",
              "hessian_trace", "hessian_spectral", "ece_train", "ece_test"):
        assert math.isfinite(row[c]), c
    # diagonal soft rank is an upper bound of the exact one (Schur concavity), on all points
    assert row["rank_diagonal"] >= row["rank_gram"] - 1e-9
    assert row["hessian_method"] == "matrix_free"  # p = 134 > dense_max_params = 50


def test_failed_measure_is_recorded_not_fatal(monkeypatch):
    import softrank.study.measures as study_measures

    real = study_measures.curvature

    def failing(md, matrix, approximation, *args, **kwargs):
        if approximation == "ekfac":
            raise ValueError("simulated failure")
        return real(md, matrix, approximation, *args, **kwargs)

    monkeypatch.setattr(study_measures, "curvature", failing)
    cfg = TrainConfig("teacher_student", width=4, n_train=40, n_test=40, epochs=1,
                      measures=MeasureOptions(**{**TINY_MEASURES, "soft_rank": ("kfac", "ekfac"),
                                                 "tic": (), "loo": ("exact",),
                                                 "gram_samples": 20, "hessian": False}))
    row = run_config(cfg)
    assert "ekfac: ValueError: simulated failure" in row["errors"]
    assert math.isfinite(row["rank_kfac"]) and "rank_ekfac" not in row
    # exact ApproxLOO needs every training point in the Gram matrix: n = 40 > 20 skips it
    # ... and runs ApproxLOO's large-n method in its place, 'nystrom' (its 300 points: all 40)
    assert "loo_exact: n=40 > gram_samples=20; loo_nystrom instead" in row["skipped"]
    assert "est_loo_exact" not in row and math.isfinite(row["est_loo_nystrom"])


def test_cnn_on_digits_runs():
    cfg = TrainConfig("digits", arch="cnn", width=3, depth=1, n_train=80, n_test=60, epochs=1,
                      measures=MeasureOptions(**{**TINY_MEASURES, "loo": ("kfac",)}))
    row = run_config(cfg)
    assert row["errors"] == "" and row["n_params"] == 3 * 9 + 3 + 3 * 16 * 10 + 10
    assert math.isfinite(row["est_softrank_kfac"])


def _failing_job(config, torch_threads=1, data_root=None):
    """The third configuration of the tiny grid crashes (a simulated worker failure)."""
    if config["width"] == 8 and config["weight_decay"] == 1e-3:
        raise RuntimeError("simulated crash")
    return run_config(config, torch_threads=torch_threads, data_root=data_root)


def _crash_then_resume(configs, path, **backend):
    """Run with the failing job, then resume with the real one; (rows after the crash, all)."""
    with pytest.raises(StudyJobError, match="simulated crash"):
        run_study(configs, path, progress=False, job=_failing_job, **backend)
    with ResultStore(path) as store:
        first = store.rows()
    crashed = next(c.id for c in configs if c.width == 8 and c.weight_decay == 1e-3)
    assert crashed not in {r["config_id"] for r in first}
    summary = run_study(configs, path, progress=False, **backend)
    assert summary.n_already_done == len(first)
    assert summary.n_written == len(configs) - len(first)
    with ResultStore(path) as store:
        rows = store.rows()
    assert sorted(r["config_id"] for r in rows) == sorted(c.id for c in configs)
    assert rows[:len(first)] == first  # stored rows are never rewritten
    return first, rows


def test_resume_after_a_crash_loses_and_duplicates_nothing(tiny_configs, serial_rows,
                                                           tmp_path):
    first, rows = _crash_then_resume(tiny_configs, tmp_path / "s.sqlite", backend="serial")
    assert len(first) == 2  # the two models before the crash were written, in order
    _assert_same_tables(rows, serial_rows)


def test_joblib_two_processes_give_the_serial_table(tiny_configs, serial_rows, tmp_path):
    summary = run_study(tiny_configs, tmp_path / "j.sqlite", backend="joblib", n_jobs=2,
                        progress=False)
    assert summary.n_written == 4
    with ResultStore(tmp_path / "j.sqlite") as store:
        rows = store.rows()
    assert len({r["config_id"] for r in rows}) == len(rows) == 4
    _assert_same_tables(rows, serial_rows)


@pytest.mark.slow
def test_joblib_crash_and_resume_gives_the_serial_table(tiny_configs, serial_rows, tmp_path):
    _, rows = _crash_then_resume(tiny_configs, tmp_path / "j.sqlite", backend="joblib",
                                 n_jobs=2)
    _assert_same_tables(rows, serial_rows)  # worker processes give the serial numbers


@pytest.mark.slow
def test_kill_the_process_mid_run_and_resume(tmp_path):
    grid = {**TINY_GRID, "fixed": {**TINY_GRID["fixed"], "epochs": 20},
            "vary": {"width": [4, 8, 16], "weight_decay": [1e-3, 1e-2], "seed": [0, 1]}}
    grid_path, store_path = tmp_path / "grid.json", tmp_path / "s.sqlite"
    grid_path.write_text(json.dumps(grid))
    configs = expand_grid(grid)
    proc = subprocess.Popen(
        [sys.executable, "-m", "softrank.study", "run", str(grid_path), "--store",
         str(store_path), "--backend", "serial", "--no-progress"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if store_path.exists() and _count(store_path) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = _count(store_path)
    assert 2 <= killed_at < len(configs)
    with ResultStore(store_path) as store:
        assert store._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        summary = run_study(configs, store, backend="serial", progress=False)
        assert summary.n_already_done == killed_at
        ids = [r["config_id"] for r in store.rows()]
    assert sorted(ids) == sorted(c.id for c in configs)


def _count(path) -> int:
    with sqlite3.connect(path, timeout=30) as conn:
        try:
            return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        except sqlite3.OperationalError:  # the table is being created
            return 0


@pytest.mark.slow
def test_dask_local_cluster_gives_the_serial_table(tiny_configs, serial_rows, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        summary = run_study(tiny_configs, tmp_path / "d.sqlite", backend="dask", client=client,
                            progress=False)
    assert summary.n_written == 4
    with ResultStore(tmp_path / "d.sqlite") as store:
        _assert_same_tables(store.rows(), serial_rows)


# -- analysis against hand-computed values -----------------------------------------------------
def _hand_tau(x, y):
    """τ_a = (concordant − discordant) / pairs, for tie-free data."""
    s = [np.sign(a1 - a2) * np.sign(b1 - b2)
         for (a1, b1), (a2, b2) in itertools.combinations(zip(x, y), 2)]
    return sum(s) / len(s)


def test_kendall_tau_by_hand():
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # C=5, D=1
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, float("nan"), 4], [1, 2, 5, 3]) == pytest.approx(1.0)
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    assert math.isnan(kendall_tau([1], [2]))


# Two hyperparameters a ∈ {0, 1, 2}, b ∈ {0, 1}; the measure orders the gap perfectly except
# for a = 1 vs 2 at b = 1 (a) and b = 0 vs 1 at a = 2 (b):
#   ψ_a = mean(τ|b=0, τ|b=1) = mean(1, 1/3) = 2/3,  ψ_b = mean(1, 1, −1) = 1/3,  Ψ = 1/2.
SYNTHETIC = [
    {"width": a, "n_train": b, "seed": 0, "observed_gap": g, "m": m}
    for a, b, g, m in [(0, 0, 1.0, 1.0), (1, 0, 2.0, 2.0), (2, 0, 3.0, 3.0),
                       (0, 1, 1.5, 1.5), (1, 1, 2.5, 3.5), (2, 1, 3.5, 2.5)]
]


def test_granulated_tau_by_hand():
    g = granulated_tau(SYNTHETIC, "m")
    assert g.per_hyperparameter == pytest.approx({"width": 2 / 3, "n_train": 1 / 3})
    assert g.n_groups == {"width": 2, "n_train": 3}
    assert g.value == pytest.approx(0.5)
    overall = tau_table(SYNTHETIC, ["m"])["m"]
    assert overall == pytest.approx(_hand_tau([r["m"] for r in SYNTHETIC],
                                              [r["observed_gap"] for r in SYNTHETIC]))
    assert overall == pytest.approx(9 / 15)  # 15 pairs, 3 discordant


def test_granulated_tau_skips_undefined_groups():
    rows = SYNTHETIC + [{"width": w, "n_train": 2, "seed": 0, "observed_gap": 5.0, "m": w}
                        for w in (0, 1, 2)]  # constant gap: τ undefined in that group
    g = granulated_tau(rows, "m", ["width"])  # only ψ_width, groups still fix n_train
    assert g.n_groups == {"width": 2} and g.value == pytest.approx(2 / 3)


def test_ratios_regimes_and_report():
    rows = [{"dataset": "d", "observed_gap": 0.5, "est_x": 1.0, "alpha_train": 0.1},
            {"dataset": "d", "observed_gap": 0.2, "est_x": 0.2, "alpha_train": 0.9},
            {"dataset": "d", "observed_gap": 0.0, "est_x": 0.3, "alpha_train": 0.7}]
    r = ratios(rows, "est_x")
    assert r[:2] == pytest.approx([2.0, 1.0]) and math.isnan(r[2])
    s = ratio_summary(rows)["est_x"]
    assert s["median"] == pytest.approx(1.5) and s["median_abs_error"] == pytest.approx(0.5)
    regimes = split_regimes(rows, 0.5)
    assert [len(v) for v in regimes.values()] == [1, 2]
    text = markdown_report(rows)
    assert "`est_x`" in text and "1 overfit" in text and "2 not overfit" in text


def test_expected_calibration_error_by_hand():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]])
    y = np.array([0, 1, 1, 1])
    # bins of width 1/4: [.5, .75) holds {0.6 wrong, 0.55 right} (acc 1/2, conf 0.575),
    # [.75, 1] holds {0.9, 0.8}, both right (acc 1, conf 0.85)
    expected = 0.5 * abs(0.5 - 0.575) + 0.5 * abs(1 - 0.85)
    assert expected_calibration_error(probs, y, 4) == pytest.approx(expected)
    # one bin: |accuracy − mean confidence| = |3/4 − 0.7125|
    assert expected_calibration_error(probs, y, 1) == pytest.approx(0.0375)


# -- Hessian norms (dense for small p, else the core's matrix-free) against torch.func -------
def test_hessian_norms_match_a_dense_reference():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                              torch.nn.Linear(4, 3)).double()
    X, y = torch.randn(30, 3, dtype=torch.float64), torch.randint(0, 3, (30,))
    md = ModelData(net, torch.nn.CrossEntropyLoss(), X, y)
    theta0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    shapes = [(n, p.shape, p.numel()) for n, p in net.named_parameters()]

    def mean_loss(theta):
        params, i = {}, 0
        for name, shape, k in shapes:
            params[name] = theta[i:i + k].reshape(shape)
            i += k
        z = torch.func.functional_call(net, params, (X,))
        return torch.nn.functional.cross_entropy(z, y)

    H = torch.func.hessian(mean_loss)(theta0)
    top, trace = float(torch.linalg.eigvalsh(H).max()), float(H.trace())
    dense = _hessian_norms(md, MeasureOptions(dense_max_params=100), seed=0)
    assert dense["hessian_method"] == "dense"
    assert dense["hessian_spectral"] == pytest.approx(top, rel=1e-8)
    assert dense["hessian_trace"] == pytest.approx(trace, rel=1e-8)
    free = _hessian_norms(md, MeasureOptions(dense_max_params=10, hessian_probes=20,
                                             hessian_iterations=md.n_params), seed=0)
    assert free["hessian_method"] == "matrix_free"
    assert free["hessian_spectral"] == pytest.approx(top, rel=1e-6)
    assert abs(free["hessian_trace"] - trace) <= 4 * free["hessian_trace_stderr"] + 1e-8


def test_stationarity_is_the_gradient_of_the_regularized_objective():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    X, y = torch.randn(70, 5), torch.randint(0, 3, (70,))
    lam = 0.03
    md = ModelData(net, torch.nn.CrossEntropyLoss(), X, y, batch_size=32)
    objective = torch.nn.functional.cross_entropy(net(X), y) + lam / 2 * sum(
        (p ** 2).sum() for p in net.parameters())
    grads = torch.autograd.grad(objective, list(net.parameters()))
    g = torch.cat([gr.reshape(-1) for gr in grads]).double()
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).double()
    out = _stationarity(md, lam)
    assert out["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-5)
    assert out["grad_norm_relative"] == pytest.approx(float(g.norm() / (lam * theta).norm()),
                                                      rel=1e-5)


# -- plots and command line ---------------------------------------------------------------------
def test_plots_write_files(tmp_path):
    pytest.importorskip("matplotlib")
    from softrank.study.plots import plot_all

    rng = np.random.default_rng(0)
    rows = [{"observed_gap": g, "est_a": g * rng.uniform(0.5, 2), "est_b": -g,
             "hessian_trace": rng.uniform(), "alpha_train": rng.uniform(0.01, 1)}
            for g in rng.uniform(0.05, 1, 12)]
    paths = plot_all(rows, tmp_path, prefix="x_")
    assert [p.name for p in paths] == ["x_estimate_vs_observed.png", "x_tau.png",
                                       "x_error_vs_calibration.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_cli_list_export_report(serial_rows, tmp_path, capsys):
    grid_path = tmp_path / "grid.json"
    grid_path.write_text(json.dumps(TINY_GRID))
    store_path = tmp_path / "s.sqlite"
    with ResultStore(store_path) as store:  # the serial table, as if `run` had written it
        for r in serial_rows[:3]:
            store.add(r["config_id"], {}, r)
    assert cli_main(["list", str(grid_path), "--store", str(store_path)]) == 0
    assert "4 configurations, 3 done" in capsys.readouterr().out
    csv_path = tmp_path / "t.csv"
    assert cli_main(["export", "--store", str(store_path), "--csv", str(csv_path)]) == 0
    assert len(read_csv(csv_path)) == 3
    md_path = tmp_path / "r.md"
    assert cli_main(["report", "--csv", str(csv_path), "--markdown", str(md_path)]) == 0
    assert "Kendall τ" in md_path.read_text() and "3 models" in md_path.read_text()
    assert cli_main(["report", "--csv", str(csv_path), "--markdown", str(md_path),
                     "--where", "width=4", "--exclude", "weight_decay=1e-2"]) == 0
    assert "1 models" in md_path.read_text()  # (4, 1e-3) only


def test_write_csv_is_atomic_on_error(tmp_path):
    path = tmp_path / "t.csv"
    write_csv(path, [{"a": 1}])

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_csv(path, [{"a": Boom()}])
    assert read_csv(path) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["t.csv"]


# -- the whole grid is validated before anything runs ----------------------------------------------
_DIGITS = {"dataset": "digits"}


@pytest.mark.parametrize("spec, where, value", [
    ({"fixed": _DIGITS, "measures": {"soft_rank": ["kfc"]}}, "measures['soft_rank']", "'kfc'"),
    ({"fixed": _DIGITS, "measures": {"loo": ["gram"]}}, "measures['loo']", "'gram'"),
    ({"fixed": _DIGITS, "measures": {"soft_rank": "kfac"}}, "measures['soft_rank']",
     '["kfac"]'),
    ({"fixed": _DIGITS, "measures": {"hessian": "no"}}, "measures['hessian']", "'no'"),
    ({"fixed": {**_DIGITS, "width": 8.7}}, "fixed['width']", "8.7"),
    ({"fixed": {**_DIGITS, "epochs": True}}, "fixed['epochs']", "True"),
    ({"fixed": _DIGITS, "vary": {"width": [4, "wide"]}}, "vary['width'][1]", "'wide'"),
    ({"fixed": {**_DIGITS, "weight_decay": float("inf")}}, "fixed['weight_decay']", "inf"),
    ({"fixed": {**_DIGITS, "lr": float("nan")}}, "fixed['lr']", "nan"),
    ({"fixed": {"dataset": "mnst"}}, "fixed['dataset']", "'mnst'"),
    ({"fixed": {**_DIGITS, "seed": -1}}, "fixed['seed']", "-1"),
    ({"fixed": _DIGITS, "measures": {"gram_samples": 0}}, "measures['gram_samples']", "0"),
    ({"blocks": [{"fixed": _DIGITS}, {"fixed": {**_DIGITS, "optimizer": "lbfgs"}}]},
     "blocks[1].fixed['optimizer']", "'lbfgs'"),
    ({"fixed": _DIGITS, "vary": {"width": 8}}, "vary['width']", "8"),
    ({"blocks": "abc"}, "blocks", "'abc'"),
])
def test_grid_values_are_checked_naming_key_and_value(spec, where, value):
    with pytest.raises(ValueError) as info:
        expand_grid(spec)
    msg = str(info.value)
    assert where in msg and value in msg, msg


def test_every_problem_of_a_grid_is_reported_at_once():
    spec = {"fixed": {**_DIGITS, "width": 8.7}, "vary": {"lr": [1e-3, "x"]},
            "measures": {"soft_rank": ["kfc"], "hessian": 1}}
    with pytest.raises(ValueError, match=r"invalid grid \(4 problems\)") as info:
        expand_grid(spec)
    for where in ("fixed['width']", "vary['lr'][1]", "measures['soft_rank']",
                  "measures['hessian']"):
        assert where in str(info.value)


def test_valid_values_keep_their_types_and_ids():
    a = expand_grid({"fixed": {**_DIGITS, "width": 8.0, "weight_decay": 1},
                     "measures": {"soft_rank": ("kfac",), "hessian": False}})[0]
    b = expand_grid({"fixed": {**_DIGITS, "width": 8, "weight_decay": 1.0},
                     "measures": {"soft_rank": ["kfac"], "hessian": False}})[0]
    assert a.id == b.id and isinstance(a.width, int) and isinstance(a.weight_decay, float)
    assert a.measures.soft_rank == ("kfac",)
    with pytest.raises(ValueError, match="width: expected an integer"):
        TrainConfig("digits", width="wide")  # the same checks from Python


# -- a damaged store and the command line -----------------------------------------------------------
def test_a_file_that_is_not_a_store_gives_a_clear_error(tmp_path):
    from softrank.study.store import StoreError

    path = tmp_path / "s.sqlite"
    path.write_bytes(b"not a database " * 100)
    with pytest.raises(StoreError, match=r"s\.sqlite: not a usable results store .*Move the "):
        ResultStore(path)
    with pytest.raises(StoreError, match="is a folder"):
        ResultStore(tmp_path)


def test_a_damaged_row_is_left_out_and_computed_again(tmp_path):
    path = tmp_path / "s.sqlite"
    with ResultStore(path) as store:
        store.add("a", {"w": 1}, {"config_id": "a", "x": 1.0})
        store.add("b", {"w": 2}, {"config_id": "b", "x": 2.0})
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE results SET row = '{\"config_id\": \"b\", \"x\": ' "
                     "WHERE config_id = 'b'")
    with ResultStore(path) as store:
        assert store.damaged_ids() == ["b"] and store.done_ids() == {"a"}
        with pytest.warns(RuntimeWarning, match=r"1 stored row\(s\) cannot be read.*'b'"):
            assert [r["config_id"] for r in store.rows()] == ["a"]
        with pytest.warns(RuntimeWarning, match="cannot be read"):
            assert cli_main(["export", "--store", str(path), "--csv",
                             str(tmp_path / "t.csv")]) == 0
        assert [r["config_id"] for r in read_csv(tmp_path / "t.csv")] == ["a"]
        configs = [TrainConfig("digits"), TrainConfig("digits", width=4)]
        with sqlite3.connect(path) as conn:  # a configuration of the grid, damaged
            conn.execute("INSERT INTO results VALUES (?, '{}', 'null', 0)", (configs[0].id,))
        assert store.damaged_ids() == ["b", configs[0].id]
        with pytest.warns(RuntimeWarning, match="computed again"):
            summary = run_study(configs, store, backend="serial", progress=False,
                                job=_constant_job)
        assert summary.n_written == 2 and store.damaged_ids() == []
        assert {r["width"] for r in store.rows() if "width" in r} == {128, 4}


def _constant_job(config, torch_threads=1, data_root=None):
    return {"width": config["width"], "x": 1.0}


def test_cli_errors_are_one_line_naming_the_file_and_debug_shows_the_traceback(tmp_path,
                                                                               capsys):
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({"fixed": {**_DIGITS, "width": 8.7}}))
    bad_store = tmp_path / "bad.sqlite"
    bad_store.write_bytes(b"garbage" * 100)
    cases = [(["run", str(grid), "--store", str(tmp_path / "s.sqlite")], "fixed['width']"),
             (["run", str(tmp_path / "none.json"), "--store", str(tmp_path / "s.sqlite")],
              "no such grid file"),
             (["export", "--store", str(bad_store), "--csv", str(tmp_path / "o.csv")],
              "not a usable results store"),
             (["list", str(grid)], "g.json")]
    for argv, what in cases:
        assert cli_main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and what in err and "--debug" in err, err
        assert err.startswith("softrank study ")
    with pytest.raises(ValueError, match="fixed\\['width'\\]"):
        cli_main(["run", str(grid), "--store", str(tmp_path / "s.sqlite"), "--debug"])


def test_cli_failed_model_is_one_line(tmp_path, capsys, monkeypatch):
    import softrank.study.runner as runner

    def crash(config, torch_threads=1, data_root=None):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(runner, "run_config", crash)
    monkeypatch.setattr(runner.run_study, "__kwdefaults__",
                        {**runner.run_study.__kwdefaults__, "job": crash})
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({"fixed": _DIGITS}))
    argv = ["run", str(grid), "--store", str(tmp_path / "s.sqlite"), "--backend", "serial",
            "--no-progress"]
    assert cli_main(argv) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "RuntimeError: simulated crash" in last and "--errors skip" in last


# -- dead processes (joblib) ---------------------------------------------------------------------
def _suicidal_job(config, torch_threads=1, data_root=None):
    """The width-8 configuration kills its own worker (as kill -9 or the OOM killer would)."""
    if config["width"] == 8:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"width": config["width"], "pid": os.getpid()}


@pytest.mark.slow
def test_a_killed_worker_becomes_a_failed_row_not_an_abort(tmp_path):
    configs = expand_grid({"fixed": _DIGITS, "vary": {"width": [4, 8, 16, 32]}})
    summary = run_study(configs, tmp_path / "s.sqlite", backend="joblib", n_jobs=2,
                        errors="skip", progress=False, job=_suicidal_job)
    killer = next(c.id for c in configs if c.width == 8)
    assert summary.n_written == 3 and list(summary.failures) == [killer]
    assert "died twice" in summary.failures[killer]
    with ResultStore(tmp_path / "s.sqlite") as store:
        assert sorted(r["width"] for r in store.rows()) == [4, 16, 32]
    with pytest.raises(StudyJobError, match="died twice"):
        run_study(configs, tmp_path / "s.sqlite", backend="joblib", n_jobs=2, progress=False,
                  job=_suicidal_job)


_SLEEPER = """
import os, sys, time
sys.path.insert(0, {root!r})
from softrank.study import expand_grid, run_study

def sleeper(config, torch_threads=1, data_root=None):
    open(os.path.join({pids!r}, str(os.getpid())), "w").close()
    time.sleep(120)
    return {{}}

if __name__ == "__main__":
    configs = expand_grid({{"fixed": {{"dataset": "digits"}}, "vary": {{"width": [4, 8, 16]}}}})
    run_study(configs, {store!r}, backend="joblib", n_jobs=2, progress=False, job=sleeper)
"""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="reads /proc")
def test_workers_exit_when_the_driver_is_killed(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    script = tmp_path / "driver.py"
    script.write_text(_SLEEPER.format(root=str(ROOT), pids=str(pids),
                                      store=str(tmp_path / "s.sqlite")))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = [int(p.name) for p in pids.iterdir()]
        assert len(workers) == 2, "the workers did not start"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 20
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "workers outlived their driver"
def test_finish_option_measures_the_net_as_trained_and_finished():
    base = dict(dataset="teacher_student", width=4, n_train=40, n_test=40, epochs=2)
    plain = TrainConfig(**base, measures=MeasureOptions(**TINY_MEASURES))
    assert TrainConfig(**base, measures=MeasureOptions(**TINY_MEASURES, finish=0)).id == plain.id
    cfg = TrainConfig(**base, measures=MeasureOptions(**{**TINY_MEASURES, "finish": 300,
                                                         "hessian": False}))
    assert cfg.id != plain.id
    row = run_config(cfg)
    assert row["errors"] == "" and row["errors_finished"] == ""
    assert 1 <= row["finish_iterations"] <= 300
    # a ReLU net's objective is only piecewise smooth: L-BFGS gets r far down, not to 1e-3
    assert row["grad_norm_relative_finished"] < row["grad_norm_relative"] / 20
    for col in ("observed_gap", "train_loss", "est_rank_n_kfac"):
        assert math.isfinite(row[f"{col}_finished"]), col
    assert row["train_loss_finished"] < row["train_loss"]


def test_finished_view_and_stationarity_report():
    from softrank.study.analysis import finished_view, stationarity_report
    rows = [{"dataset": "d", "width": w, "observed_gap": g, "est_loo_exact": 10 * g,
             "grad_norm_relative": 50.0, "observed_gap_finished": 2 * g,
             "est_loo_exact_finished": 2 * g * (1 + 0.1 * w), "grad_norm_relative_finished": 0.2}
            for w, g in ((1, 0.1), (2, 0.3), (3, 0.2))] + [{"dataset": "d", "observed_gap": 1.0}]
    view = finished_view(rows)
    assert len(view) == 3 and view[1]["observed_gap"] == 0.6 and view[1]["width"] == 2
    assert view[0]["est_loo_exact"] == pytest.approx(0.22) and "observed_gap_finished" not in view[0]
    text = stationarity_report(rows)
    assert "3 models; median relative stationarity r as trained 50" in text and "finished 0.2" in text
    line = next(x for x in text.splitlines() if x.startswith("| `est_loo_exact`"))
    # as trained: ratio 10, τ +1 (same order); finished: ratios 1.1, 1.2, 1.3, τ +1
    assert line == "| `est_loo_exact` | 10 [10, 10] | +1.000 | 1.2 [1.12, 1.28] | +1.000 |"


def test_loo_records_invalid_points_without_warning():
    """The study records ApproxLOO's invalid points in the row instead of warning about them
    for each model; 'cavity' takes ``loo_points`` (clipped to n), the other methods every
    point."""
    import warnings
    from torch import nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 3))
    X, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    md = ModelData(net, nn.CrossEntropyLoss(), X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = _loo(md, 1e-4, "kfac", seed=0, points=5)
        cav = _loo(md, 1e-4, "cavity", seed=0, points=50)
    assert row["loo_kfac_invalid_points"] == 20 and "est_loo_kfac_stderr" not in row
    assert cav["loo_cavity_invalid_points"] == 0
    assert "est_loo_cavity_stderr" not in cav  # 50 clipped to the 20 points: nothing sampled
    part = _loo(md, 1e-4, "cavity", seed=0, points=8)
    assert part["est_loo_cavity_stderr"] > 0
    nys = _loo(md, 1e-4, "nystrom", seed=0, points=8)  # loo_points also sets 'nystrom''s
    assert nys["est_loo_nystrom_stderr"] > 0 and nys["loo_nystrom_invalid_points"] == 0


def test_loo_points_option_keeps_ids_of_grids_without_it():
    base = TrainConfig(dataset="mnist")
    same = TrainConfig(dataset="mnist", measures={"loo_points": 0})
    other = TrainConfig(dataset="mnist", measures={"loo_points": 100})
    assert base.id == same.id != other.id
    with pytest.raises(ValueError, match="loo_points"):
        TrainConfig(dataset="mnist", measures={"loo_points": -1})


def test_estimate_columns_leave_out_standard_errors_of_finished_nets_too():
    from softrank.study.analysis import estimate_columns
    rows = [{"est_loo_cavity": 1.0, "est_loo_cavity_stderr": 0.1,
             "est_loo_cavity_finished": 1.0, "est_loo_cavity_stderr_finished": 0.1}]
    assert estimate_columns(rows) == ["est_loo_cavity", "est_loo_cavity_finished"]
