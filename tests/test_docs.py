"""The documentation builds without warnings, and the quick start's code runs and prints what
the page shows."""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "docs" / "quickstart.md"
NUMBER = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def code_and_outputs(text: str) -> list[tuple[str, str | None]]:
    """Each ```python block with the ```text block right after it (None if there is none)."""
    pairs = []
    for m in re.finditer(r"^```python\n(.*?)^```\n", text, re.S | re.M):
        nxt = re.match(r"\s*```text\n(.*?)^```", text[m.end():], re.S | re.M)
        pairs.append((m.group(1), nxt.group(1) if nxt else None))
    return pairs


def same_up_to_numbers(got: str, shown: str, rel: float = 0.05, abs_: float = 0.005) -> None:
    """Same text with every number replaced, and numbers within a tolerance (the shown output
    was produced on another machine)."""
    assert re.sub(NUMBER, "#", got.strip()) == re.sub(NUMBER, "#", shown.strip()), (got, shown)
    for a, b in zip(re.findall(NUMBER, got), re.findall(NUMBER, shown)):
        assert float(a) == pytest.approx(float(b), rel=rel, abs=abs_), (got, shown)


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("material")
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                           str(ROOT / "mkdocs.yml"), "-d", str(site)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    api = (site / "api" / "index.html").read_text()
    for name in ("estimators.SoftRankFIM", "estimators.ApproxLOO", "scoring.InSampleSplit",
                 "loo.approx_loo", "curvature.curvature", "calibration.fit_temperature"):
        assert f'id="softrank.{name}"' in api, name
    # the docstrings' reStructuredText became Markdown + MathJax (docs/_ext/rst_docstrings.py)
    assert ":math:" not in api and ".. math::" not in api and ":class:" not in api
    assert api.count('class="arithmatex"') > 50


#: pages in the nav written by others (the study, the benchmarks) that may not exist yet
PENDING_PAGES = {"benchmarks.md"}


def nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in nav_pages(v)]
    return [p for item in nav for p in nav_pages(item)]


def test_every_nav_page_exists():
    """mkdocs.yml lets nav entries be missing (for PENDING_PAGES); every other one must exist."""
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = nav_pages(config["nav"])
    assert "quickstart.md" in pages and "api.md" in pages
    missing = [p for p in pages if not (ROOT / "docs" / p).exists()]
    assert set(missing) <= PENDING_PAGES, missing


def test_quickstart_code_runs_and_prints_what_the_page_shows():
    pytest.importorskip("skorch")
    import torch

    pairs = code_and_outputs(QUICKSTART.read_text())
    assert len(pairs) >= 3 and all(shown is not None for _, shown in pairs)
    namespace = {"__name__": "quickstart"}
    threads = torch.get_num_threads()
    try:
        for i, (code, shown) in enumerate(pairs):
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                exec(compile(code, f"{QUICKSTART.name}, python block {i + 1}", "exec"), namespace)
            same_up_to_numbers(buffer.getvalue(), shown)
    finally:
        torch.set_num_threads(threads)
    assert namespace["search"].best_params_["estimator__optimizer__weight_decay"] in (
        1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def test_same_up_to_numbers_catches_a_changed_output():
    same_up_to_numbers("loss 0.1931\n", "loss 0.1935\n")
    with pytest.raises(AssertionError):
        same_up_to_numbers("loss 0.1931\n", "loss 0.2931\n")
    with pytest.raises(AssertionError):
        same_up_to_numbers("loss 0.1931\n", "gap 0.1931\n")
