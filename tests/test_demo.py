"""``softrank demo``: the smoke test (--quick) runs, and the Kendall τ it prints are computed
from the table it prints."""
from __future__ import annotations

import csv
import math
import re
import subprocess
import sys
import time
from importlib.metadata import entry_points

import pytest
from scipy.stats import kendalltau

from softrank import cli, demo

TAU_LINE = re.compile(r"^\s+tau\[(?P<name>[^\]]+)\] = (?P<tau>[+-]\d\.\d{4})$")


def parse(out: str):
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["model", "n"])
    header = lines[start].split()
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        cells = line.split()
        rows.append({c: (v if c == "model" else float(v)) for c, v in zip(header, cells)})
    taus = {m["name"]: float(m["tau"]) for m in map(TAU_LINE.match, lines) if m}
    return header, rows, taus


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "table.csv"
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    out, err = StringIO(), StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(["demo", "--quick", "--csv", str(path), "--seed", "0"])
    return code, out.getvalue(), err.getvalue(), path


def test_quick_demo_prints_taus_computed_from_its_table(quick_run):
    code, out, err, path = quick_run
    assert code == 0
    header, rows, taus = parse(out)
    measures = [c for c, _, _ in demo.MEASURES]
    assert header == ["model", "n", "r", "r_finished", "train_loss", "test_loss",
                      "observed_gap"] + measures
    assert len(rows) == len(demo.model_grid(quick=True)) == 4
    assert set(taus) == set(measures)
    for r in rows:  # 4 significant digits
        assert r["observed_gap"] == pytest.approx(r["test_loss"] - r["train_loss"], rel=2e-3,
                                                  abs=2e-4)
        assert r["r_finished"] < r["r"]
    with open(path) as f:
        table = list(csv.DictReader(f))
    gaps = [float(r["observed_gap"]) for r in table]
    for name, tau in taus.items():
        assert math.isfinite(tau) and -1 <= tau <= 1
        recomputed = kendalltau([float(r[name]) for r in table], gaps).statistic
        assert tau == pytest.approx(recomputed, abs=5e-5), name
    assert "training and measuring" in err  # the progress bar
    warning_lines = [line for line in out.splitlines() if line.startswith("warnings:")]
    assert len(warning_lines) == 1  # one summary line, not one per model
    assert "Warning" not in err.replace("warnings:", "")  # none printed per model


def test_sections_are_one_function_each():
    rows = [{c: 1.0 for c in demo.csv_columns()} | {"model": "m", "n": 3, "warnings": []}]
    taus = {c: 0.5 for c, _, _ in demo.MEASURES}
    text = demo.format_table(rows, taus)
    assert text.split("\n\n") == ["\n".join(f(rows, taus)) for f in demo.SECTIONS]
    rows[0]["warnings"] = ["NotStationaryWarning", "NotStationaryWarning", "RuntimeWarning"]
    assert demo.warning_section(rows, taus)[0].startswith(
        "warnings: NotStationaryWarning x2, RuntimeWarning x1 (on 1 of 1 models")


def test_quick_demo_csv_matches_the_printed_table(quick_run):
    _, out, _, path = quick_run
    _, rows, taus = parse(out)
    with open(path) as f:
        table = list(csv.DictReader(f))
    assert [r["model"] for r in table] == [r["model"] for r in rows]
    gaps = [float(r["observed_gap"]) for r in table]
    for name, tau in taus.items():
        values = [float(r[name]) for r in table]
        assert values == pytest.approx([r[name] for r in rows], rel=5e-4)
        assert tau == pytest.approx(kendalltau(values, gaps).statistic, abs=5e-5)


AS_TRAINED_LINE = re.compile(r"^\s+lam='(?P<lam>\w+)'\s+median (?P<median>[\d.]+)x \(range "
                             r".*\), within 2x on (?P<within>\d+) of (?P<n>\d+), "
                             r"tau (?P<tau>[+-]\d\.\d{4})$")


def test_quick_demo_as_trained_section_is_computed_from_its_csv(quick_run):
    """The as-trained lines (median ratio, count within 2x, τ) recomputed from the CSV."""
    import numpy as np

    _, out, _, path = quick_run
    found = {m["lam"]: m for m in map(AS_TRAINED_LINE.match, out.splitlines()) if m}
    assert set(found) == {lam for _, lam in demo.AS_TRAINED} == {"effective"}
    with open(path) as f:
        table = list(csv.DictReader(f))
    gaps = np.array([float(r["gap_as_trained"]) for r in table])
    for column, lam in demo.AS_TRAINED:
        est = np.array([float(r[column]) for r in table])
        ratio = est / gaps
        line = found[lam]
        assert float(line["median"]) == pytest.approx(np.median(ratio), rel=1e-3)
        assert int(line["within"]) == int(np.sum((ratio >= 0.5) & (ratio <= 2)))
        assert int(line["n"]) == len(table)
        assert float(line["tau"]) == pytest.approx(kendalltau(est, gaps).statistic, abs=5e-5)


def test_entry_points():
    scripts = entry_points(group="console_scripts")
    assert any(e.name == "softrank" and e.value == "softrank.cli:main" for e in scripts)
    help_ = subprocess.run([sys.executable, "-m", "softrank", "demo", "--help"],
                           capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0
    for option in ("--approximation", "--csv", "--quick", "--seed"):
        assert option in help_.stdout
    assert cli.main([]) == 2  # no command: help, non-zero


def test_measure_list_has_every_estimator():
    names = [c for c, _, _ in demo.MEASURES]
    assert names == ["softrank_gap", "rank/n", "TIC_gap", "traceratio_gap", "ApproxLOO_gap",
                     "trace(H)"]


@pytest.mark.slow
def test_full_demo_runs_under_two_minutes():
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "softrank", "demo", "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    _, rows, taus = parse(proc.stdout)
    assert len(rows) == 12 and len(taus) == len(demo.MEASURES)
    assert elapsed < 120, elapsed
