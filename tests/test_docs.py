"""The documentation builds without warnings, and the quick start's code runs and prints what
the page shows."""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
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


# -- self-contained user-facing text -----------------------------------------------------------

#: text a user does not have: the internal specification, issue numbers, its section signs
INTERNAL_REFERENCE = re.compile(r"\bSPEC\b|§|\b[Ii]ssues? #?\d+\b|\(#\d+\)")


def user_facing_files() -> list[Path]:
    files = [ROOT / "mkdocs.yml", ROOT / "README.md"]
    files += sorted((ROOT / "softrank").rglob("*.py"))
    files += sorted(p for p in (ROOT / "docs").rglob("*") if p.suffix in (".md", ".py", ".js"))
    return [f for f in files if f.exists()]


def test_no_references_to_internal_documents():
    """softrank/ and docs/ state their conventions themselves (docs/concepts.md): no "SPEC",
    section signs or issue numbers, in any page, module, docstring or message."""
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()[:100]}"
            for f in user_facing_files()
            for i, line in enumerate(f.read_text().splitlines(), 1)
            if INTERNAL_REFERENCE.search(line)]
    assert not hits, "\n".join(hits)


def test_internal_reference_pattern_catches_them():
    for text in ("see SPEC §2", "(issue 4)", "issue #12", "section § 3"):
        assert INTERNAL_REFERENCE.search(text), text
    for text in ("specification", "an issue with", "SPECIAL"):
        assert not INTERNAL_REFERENCE.search(text), text


def test_markdown_links_point_to_existing_pages():
    """Every relative link of a page ([text](page.md#anchor)) names a page that exists."""
    bad = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#")[0]
            if not path or re.match(r"[a-z]+:", path):
                continue
            if not (page.parent / path).exists():
                bad.append(f"{page.name}: {target}")
    assert not bad, bad


# -- docstrings of the public API --------------------------------------------------------------

def public_objects():
    import softrank

    return [(name, getattr(softrank, name)) for name in softrank.__all__
            if name != "__version__"]


def estimator_classes():
    import softrank

    return [obj for _, obj in public_objects()
            if isinstance(obj, type) and issubclass(obj, softrank.GapEstimator)]


def sections(doc: str) -> set[str]:
    return set(re.findall(r"^([A-Z][A-Za-z ]+)\n-{3,}$", doc, re.M))


def test_estimator_docstrings_are_complete_on_their_own():
    """For every exported estimator: every parameter of __init__ and every fitted attribute fit
    sets is documented in the class's own docstring (shared entries composed by
    softrank._doc.compose: decorate a new estimator with it), with Examples, References and
    See Also."""
    from softrank import _doc

    classes = [c for c in estimator_classes() if c.__init__ is not object.__init__]
    assert len(classes) >= 5
    for cls in classes:
        _check_estimator_docstring(cls, _doc)


def _check_estimator_docstring(cls, _doc):
    name = cls.__name__
    doc = cls.__doc__
    assert {"Parameters", "Attributes", "See Also", "References", "Examples"} <= sections(doc)
    documented = _doc.documented_parameters(cls)
    params = set(_doc._signature_names(cls))
    assert params <= documented, f"undocumented parameters of {name}: {params - documented}"
    for attr in ("measure_", "gap_", "train_loss_", "n_train_", "lam_", "stderr_",
                 "approximation_", "result_", "estimator_"):
        assert re.search(rf"^{attr} :", doc, re.M), f"{name} does not document {attr}"


def test_every_public_name_has_a_numpydoc_docstring():
    """Every exported class and function has a docstring with a summary line; functions and
    classes that take arguments document them (a Parameters section)."""
    import inspect

    missing = []
    for name, obj in public_objects():
        doc = inspect.getdoc(obj) or ""
        if not doc.strip():
            missing.append(f"{name}: no docstring")
            continue
        target = obj.__init__ if isinstance(obj, type) else obj
        try:
            params = [p for p in inspect.signature(target).parameters if p not in ("self",)]
        except (TypeError, ValueError):
            params = []
        params = [p for p in params if p not in ("args", "kwargs")]
        if params and "Parameters" not in sections(doc):
            missing.append(f"{name}: no Parameters section")
        if not isinstance(obj, type) and "Returns" not in sections(doc):
            missing.append(f"{name}: no Returns section")
        if "Examples" not in sections(doc):
            missing.append(f"{name}: no Examples section")
    assert not missing, "\n".join(missing)


def test_help_shows_no_rst_markup_and_no_source_comments():
    """help() of the public API reads as plain text: formulas in Unicode, no ``:math:``,
    ``.. math::`` or ``:class:`` markup, and no method documented by a source comment."""
    import inspect
    import pydoc

    import softrank

    def own_docs(obj):  # the object's docstring and those of the methods softrank defines
        yield obj.__doc__ or ""
        for klass in getattr(obj, "__mro__", ()):
            if klass.__module__.startswith("softrank"):
                for member in vars(klass).values():
                    member = getattr(member, "__func__", member)
                    if callable(member) or isinstance(member, property):
                        yield member.__doc__ or ""

    bad = []
    for name, obj in public_objects():
        for doc in own_docs(obj):
            for markup in (":math:", ".. math::", ":class:", ":func:", ":meth:", "\\frac"):
                if markup in doc:
                    bad.append(f"{name}: {markup} in {doc.strip()[:60]!r}")
    for cls in estimator_classes():
        for attr, member in vars(cls).items():
            if callable(member) and not attr.startswith("_") or attr == "__sklearn_tags__":
                if inspect.getdoc(member) is None or inspect.getcomments(member) and \
                        not member.__doc__:
                    bad.append(f"{cls.__name__}.{attr}: no docstring")
    assert "α" in pydoc.render_doc(softrank.SoftRankFIM, renderer=pydoc.plaintext)
    assert not bad, bad


def test_tex_to_text():
    from softrank._doc import tex_to_text, terminal_text

    assert tex_to_text(r"\mathrm{Tr}\,F(F+\Lambda)^{-1}") == "Tr F(F+Λ)⁻¹"
    assert tex_to_text(r"\frac{\mathrm{Tr}\,C}{\mathrm{Tr}\,F}") == "(Tr C)/(Tr F)"
    assert tex_to_text(r"n_{\mathrm{fit}}") == "n_fit"
    assert tex_to_text(r"\|H\|_F") == "‖H‖_F"
    text = terminal_text("Block\n\n.. math:: a = \\alpha\n           + b\n\nafter :class:`~x.Y`")
    assert "    a = α + b" in text and "after Y" in text and "math" not in text


def test_docstring_examples_run():
    """The Examples of the public API run as doctests (each estimator trains a small net: a
    few seconds in all)."""
    import doctest

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out = io.StringIO()
    try:
        for name, obj in public_objects():
            for test in finder.find(obj, name, globs={}):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # e.g. skorch's, not the examples' output
                    runner.run(test, out=out.write)
    finally:
        torch.set_num_threads(threads)
    result = runner.summarize(verbose=False)
    assert result.attempted > 30
    assert result.failed == 0, out.getvalue()[-5000:]


# -- the API changes ---------------------------------------------------------------------------

def test_calibrated_is_deprecated_for_gap_formula():
    from sklearn.base import clone

    import softrank

    est = softrank.SoftRankFIM(object(), calibrated=True)
    with pytest.warns(FutureWarning, match="gap_formula='rank'"):
        assert est._gap_formula() == "rank"
    assert clone(softrank.SoftRankFIM(object(), gap_formula="rank")).gap_formula == "rank"
    with pytest.raises(ValueError, match="gap_formula must be"):
        softrank.SoftRankFIM(object(), gap_formula="calibrated")._gap_formula()


def test_every_estimator_takes_verbose_off_by_default():
    import inspect

    for cls in estimator_classes():
        if cls.__name__ == "GapEstimator":
            continue
        assert inspect.signature(cls).parameters["verbose"].default is False, cls


def test_progress_bar_is_a_no_op_unless_enabled(capsys):
    from softrank._progress import bar, progress

    items = [1, 2, 3]
    assert bar(items, desc="x") is items
    with progress(True):
        assert list(bar(items, desc="pass")) == items
        with progress(False):
            assert bar(items, desc="x") is items
    assert "pass" in capsys.readouterr().err


# -- documented outputs ------------------------------------------------------------------------

def _sync():
    sys.path.insert(0, str(ROOT / "docs" / "_ext"))
    try:
        import sync_outputs
    finally:
        sys.path.pop(0)
    return sync_outputs


#: ```text blocks that are not the output of a command in this repository, and why
UNMARKED_ALLOWED = {
    # measured timings and memory of the benchmark scripts (long runs, machine-dependent)
    "benchmarks.md": "benchmark measurements",
    # the quick start's outputs are compared by test_quickstart_code_runs_and_prints_...
    "quickstart.md": "executed by this module",
}


def test_every_documented_output_names_its_command():
    """Every ```text block of the docs is marked with the command that prints it (or is on
    a page listed in UNMARKED_ALLOWED)."""
    sync = _sync()
    unmarked = {page.name: sync.unmarked_text_blocks(page)
                for page in sorted((ROOT / "docs").glob("*.md"))}
    unmarked = {k: v for k, v in unmarked.items() if v and k not in UNMARKED_ALLOWED}
    assert not unmarked, (f"```text blocks without an <!-- output: COMMAND --> marker: "
                          f"{unmarked}")


def test_documented_outputs_match_what_the_code_prints():
    """Each marked block equals (numbers within its tolerance) what its command prints: as
    recorded by docs/_ext/sync_outputs.py when the sources are unchanged since, else by
    running the command now. Regenerate with ``python docs/_ext/sync_outputs.py``."""
    sync = _sync()
    found = sync.all_blocks()
    assert found, "no marked outputs"
    record = sync.load_record()
    problems, fresh = [], {}
    for b in found:
        if b.command not in fresh:
            entry = record.get(b.command)
            if entry is not None and entry["sources"] == sync.sources_hash(b.command):
                fresh[b.command] = entry["stdout"]
            else:  # the code changed since the record: run it (slow, until resynced)
                fresh[b.command] = sync.run(b.command)
        problems += [f"{b.where} (`{b.command}`): {d}"
                     for d in sync.differences(b, sync.shown(b, fresh[b.command]))]
    assert not problems, ("documented outputs differ from what the code prints; run "
                          "`python docs/_ext/sync_outputs.py`:\n" + "\n".join(problems))


def test_output_comparison_catches_a_changed_number(tmp_path):
    sync = _sync()
    page = tmp_path / "p.md"
    page.write_text("<!-- output: python x.py | lines=2 -->\n```text\n"
                    "gap 0.1567 (5.0 s)\n```\n")
    (b,) = sync.blocks(page)
    assert b.lines == [1]
    assert sync.shown(b, "header\ngap 0.1566 (7.0 s)\n") == "gap 0.1566 (7.0 s)\n"
    assert sync.differences(b, "gap 0.1566 (5.0 s)\n") == []  # one unit in the last digit
    assert sync.differences(b, "gap 0.1564 (5.0 s)\n")  # three units
    assert sync.differences(b, "gap 0.1542 (5.0 s)\n")  # 1.6 % off
    assert sync.differences(b, "loss 0.1567 (5.0 s)\n")  # other text
    b.volatile = re.compile(r"[\d.]+(?= s\))")  # the time is not compared, the gap is
    assert sync.differences(b, "gap 0.1567 (9.0 s)\n") == []
    assert sync.differences(b, "gap 0.9 (5.0 s)\n")


# -- study figures -----------------------------------------------------------------------------

def test_key_comparison_figures_read_at_page_width(tmp_path):
    """One figure per key comparison, at most two panels per row, 150 dpi, 12-point labels."""
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from softrank.study.plots import KEY_COMPARISONS, plot_comparison, plot_key_comparisons

    rng = np.random.default_rng(0)
    rows = [{"observed_gap": g, "est_softrank_gram": g * rng.uniform(0.5, 2),
             "est_softrank_kfac": 2 * g, "hessian_trace": rng.uniform(),
             "alpha_train": rng.uniform(0.01, 1), "train_loss": 0.1}
            for g in rng.uniform(0.05, 1, 12)]
    paths = plot_key_comparisons(rows, tmp_path, prefix="m_")
    assert [p.name for p in paths] == [f"m_{k}.png" for k in KEY_COMPARISONS]
    width = imread(paths[1]).shape[1]  # two panels of 4 in at 150 dpi
    assert width == pytest.approx(2 * 4 * 150, rel=0.02)
    assert plot_comparison([{"observed_gap": 1.0}], tmp_path / "x.png", "estimators") is None
    with pytest.raises(ValueError, match="must be one of"):
        plot_comparison(rows, tmp_path / "x.png", "nope")


def test_no_control_characters_in_text():
    r"""A TeX command written in a non-raw Python string loses its backslash (``\theta`` becomes
    a tab and ``heta``, ``\bar`` a backspace): no such control character in the docs or code."""
    files = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md",
             *sorted((ROOT / "softrank").rglob("*.py"))]
    bad = [f"{path.relative_to(ROOT)}:{i}" for path in files
           for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
           if re.search(r"[\x00-\x08\x0b-\x1f]", line) or (path.suffix == ".md" and "\t" in line)]
    assert not bad, bad


def test_loo_study_table_is_what_its_report_prints():
    """The benchmarks page's table of ApproxLOO over the study's models is what
    benchmarks/loo_study_report.py prints from the committed docs/study/loo_study.csv."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import loo_study_report
    finally:
        sys.path.pop(0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        loo_study_report.main(["--csv", str(ROOT / "docs/study/loo_study.csv")])
    names = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}

    def cells(line):
        return [c.strip() for c in line.strip().strip("|").split("|")]

    printed, dataset = [], None
    for line in out.getvalue().splitlines():
        if line.startswith("**"):
            dataset = names[line.strip("*")]
        elif line.startswith(("| as trained", "| finished")):
            state, _models, *rest = cells(line)  # the page drops the count of models (28)
            printed.append([dataset, state, *rest])
    page = (ROOT / "docs/benchmarks.md").read_text()
    documented = [cells(line) for line in page.splitlines()
                  if re.match(r"\| (MNIST|Fashion-MNIST) \| (as trained|finished) \|", line)]
    assert len(printed) == len(documented) == 4
    assert sorted(printed) == sorted(documented)
