"""MkDocs hook: serve MathJax from the installed ``django-static-mathjax`` package, not a CDN.

The documentation's formulas (``pymdownx.arithmatex``) are typeset by MathJax 3 in the browser.
This hook adds MathJax's files from the Python package ``mathjax`` (distribution
``django-static-mathjax``, pinned in the ``docs`` extra; it ships MathJax's es5 build and has no
dependencies) to the site under ``javascripts/mathjax/``, so a site built offline renders its
formulas offline. ``mkdocs.yml`` loads ``javascripts/mathjax/tex-mml-chtml.js``.
"""
from __future__ import annotations

import os
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

#: MathJax's combined TeX component, its CommonHTML fonts, and what it may load on demand
#: (TeX extensions, the context menu, assistive MathML); the speech engine (sre) is left out.
PARTS = ("tex-mml-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions", "ui", "a11y")
DEST = "javascripts/mathjax"


def mathjax_dir() -> Path:
    try:
        import mathjax
    except ImportError:
        raise PluginError("the docs need MathJax from the 'django-static-mathjax' package: "
                          "pip install -e '.[docs]'") from None
    root = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (root / "tex-mml-chtml.js").exists():
        raise PluginError(f"no MathJax es5 build under {root}: reinstall django-static-mathjax")
    return root


def on_files(files: Files, config) -> Files:
    root = mathjax_dir()
    for part in PARTS:
        base = root / part
        paths = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for path in paths:
            rel = path.relative_to(root).as_posix()
            files.append(File(rel, src_dir=str(root), dest_dir=os.path.join(config["site_dir"],
                              DEST), use_directory_urls=False))
    return files
