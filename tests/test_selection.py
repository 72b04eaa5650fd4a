"""The selection benchmark on a tiny task: the table's structure and invariants, resuming, the
report; and the claim the comparison rests on (a refit with the same seed is the candidate)."""
from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from softrank.selection import BASELINES, SELECTORS, _fit_seeded, selectors_available

ROOT = Path(__file__).resolve().parents[1]
INSAMPLE = ["SoftRankFIM kfac, α·rank/n", "TIC kfac"]


def _bench():
    if "bench_selection" in sys.modules:
        return sys.modules["bench_selection"]
    spec = importlib.util.spec_from_file_location("bench_selection",
                                                  ROOT / "benchmarks" / "bench_selection.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    bench = _bench()
    out = tmp_path_factory.mktemp("selection") / "selection.csv"
    args = ["--tasks", "tiny", "--seeds", "0", "--out", str(out), "--selectors", *INSAMPLE]
    bench.main(args)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    return bench, out, args, rows


def test_table_structure(run):
    bench, _, _, rows = run
    assert rows and list(rows[0]) == bench.COLUMNS
    assert sorted(r["selector"] for r in rows) == sorted(INSAMPLE + list(BASELINES))
    assert {(r["task"], r["seed"]) for r in rows} == {("digits tiny", "0")}
    assert {int(r["n_candidates"]) for r in rows} == {len(bench.WIDTHS) * len(bench.WEIGHT_DECAYS)}


def test_invariants(run):
    _, _, _, rows = run
    by = {r["selector"]: r for r in rows}
    oracle = by["oracle"]
    assert float(oracle["regret"]) == 0.0 and oracle["picked_oracle"] == "True"
    for r in rows:
        regret, loss = float(r["regret"]), float(r["test_loss"])
        assert math.isclose(regret, loss - float(r["oracle_test_loss"]), abs_tol=1e-12)
        if r["selector"] != "holdout 80/20":   # the one final model not among the candidates
            assert regret >= 0.0, r
            assert r["picked_oracle"] != "True" or regret == 0.0, r
        if r["selector"] != "oracle":
            assert float(r["time_s"]) > 0 and float(r["time_rel"]) > 0, r
    grid = float(rows[0]["grid_time_s"])
    assert grid > 0
    for name in INSAMPLE + ["training loss"]:   # the grid once, plus the measurements
        assert float(by[name]["time_s"]) >= grid
    # a refit of the holdout's choice on all n is that grid candidate
    assert by["holdout 80/20, refit"]["chosen"] == by["holdout 80/20"]["chosen"]


def test_resume_adds_nothing_and_report(run, tmp_path):
    bench, out, args, rows = run
    bench.main(args + ["--report", str(tmp_path)])
    with open(out, newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    for name in ("summary.md", "regret_by_task.png", "regret_vs_time.png", "selection.csv"):
        assert (tmp_path / name).stat().st_size > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "### digits tiny" in summary and "### all tasks" in summary
    assert "| oracle |" not in summary


def test_refit_with_same_seed_is_the_candidate():
    bench = _bench()
    task = bench.tiny_task()
    X, y, *_ = task.load(0)
    a, _ = _fit_seeded(task.net().set_params(module__hidden=8), X, y, 3)
    state = torch.get_rng_state()
    b, _ = _fit_seeded(task.net().set_params(module__hidden=8), X, y, 3)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    for p, q in zip(a.module_.parameters(), b.module_.parameters()):
        assert torch.equal(p, q)


def test_exact_selectors_only_on_small_candidates():
    exact = {n for n, s in SELECTORS.items() if s.exact}
    assert exact and set(selectors_available(100, 10, 1000)) == set(SELECTORS)
    assert not exact & set(selectors_available(2000, 10, 1000))
    assert not exact & set(selectors_available(100, 10, 10**6))
    with pytest.raises(ValueError, match="unknown selectors"):
        selectors_available(100, 10, 1000, ["no such selector"])


def test_documented_tables_are_the_committed_csv():
    """docs/selection.md shows exactly the overview the benchmark's report prints from the
    committed raw table (docs/selection/selection.csv), and summary.md is its report."""
    bench = _bench()
    csv_path = ROOT / "docs" / "selection" / "selection.csv"
    stats, tasks = bench.summarize(bench.read_rows(csv_path))
    overview = bench.format_overview(stats, tasks)
    page = (ROOT / "docs" / "selection.md").read_text()
    start = page.index("<!-- table: python benchmarks/bench_selection.py")
    start = page.index("\n", start) + 1
    assert page[start:page.index("<!-- end table -->", start)].strip() == overview.strip()
    summary = (ROOT / "docs" / "selection" / "summary.md").read_text()
    assert summary.startswith(overview)


def test_readme_headline_numbers_are_the_committed_csv():
    """The README's headline regrets and time ratio, recomputed from the raw table."""
    bench = _bench()
    stats, _ = bench.summarize(bench.read_rows(ROOT / "docs" / "selection" / "selection.csv"))
    overall = {sel: st for (task, sel), st in stats.items() if task == "all tasks"}
    cv = overall["5-fold CV"]
    tic, alpha = overall["TIC kfac"], overall["SoftRankFIM kfac, α·rank/n"]
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"**{tic['mean']:.3f}–{alpha['mean']:.3f}**" in readme
    assert f"5-fold cross-validation lost less: {cv['mean']:.3f}**" in readme
    assert f"80/20 holdout {overall['holdout 80/20']['mean']:.3f})" in readme
    ratio = max(tic["time_rel"], alpha["time_rel"]) / cv["time_rel"]
    assert f"**{ratio:.2f}×**" in readme
