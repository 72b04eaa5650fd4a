r"""Griffe extension: render softrank's reStructuredText docstring markup in mkdocstrings.

softrank's docstrings use a few Sphinx/RST constructs (they read well in ``help()`` and in an
IDE). Before mkdocstrings parses a docstring (NumPy style), this rewrites them into the
Markdown + ``pymdownx.arithmatex`` the site uses:

* ``:math:`x``` → ``$x$``; a ``.. math::`` directive (inline first line and/or indented body)
  → a ``$$ … $$`` block;
* ``:class:`~a.b.C``` (also ``:func:``, ``:mod:``, ``:meth:``, ``:attr:``, ``:data:``,
  ``:exc:``) → ```C``` (the full path without ``~``);
* RST simple tables (``=====  =====`` rules) → Markdown tables, continuation lines merged;
* a paragraph ending in ``::`` (or a ``.. code-block:: lang`` directive) followed by an
  indented block → a fenced code block;
* a paragraph after the last item of a ``Parameters`` section → moved in front of it;
* a section title that starts with "Parameters", "Attributes", "Returns" or "Raises"
  (``Parameters common to the concrete estimators``) → that NumPy section, rendered as a list.

Used from ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""
from __future__ import annotations

import re
import textwrap

from griffe import Extension

_ROLE = re.compile(r":(?:class|func|mod|meth|attr|data|exc|obj):`~?([^`]+)`")
_TILDE_ROLE = re.compile(r":(?:class|func|mod|meth|attr|data|exc|obj):`~([^`]+)`")
_MATH = re.compile(r":math:`([^`]+)`")
_RULE = re.compile(r"^(\s*)(=+)((?: +=+)+)\s*$")
_MATH_DIRECTIVE = re.compile(r"^(\s*)\.\. math::\s*(.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _columns(rule: str) -> list[int]:
    return [m.start() for m in re.finditer(r"=+", rule)]


def _boundary(line: str, b: int) -> int:
    """Where a cell really ends near the rule's column start ``b`` in a hand-aligned line: a
    token that starts a character or two early after a run of spaces belongs to the next
    column; a token that runs across ``b`` (a middle column overflowing) to this one."""
    for span in _MATH.finditer(line):  # never split a math role
        if span.start() < b < span.end():
            b = span.end()
            m = re.compile(r"\s{2,}").search(line, b)
            return m.start() if m else len(line)
    if b >= len(line) or line[b - 1] == " ":
        return b
    t = b - 1
    while t > 0 and line[t - 1] != " ":
        t -= 1
    if t >= b - 2 and line[max(t - 2, 0):t] == "  ":
        return t
    if line[b] == " ":
        return b
    m = re.compile(r"\s{2,}").search(line, b)
    return m.start() if m else len(line)


def _cells(line: str, starts: list[int]) -> list[str]:
    bounds = [_boundary(line, b) for b in starts[1:]]
    edges = [starts[0]] + bounds + [len(line)]
    return [line[a:b].strip() if len(line) > a else "" for a, b in zip(edges, edges[1:])]


def _table_cell(cell: str) -> str:
    """Escape pipes for a Markdown table: ``\\|`` → ``\\Vert`` and ``|`` → ``\\vert`` inside
    math, ``\\|`` outside."""
    parts = re.split(r"(:math:`[^`]+`)", cell)
    out = []
    for part in parts:
        if part.startswith(":math:"):
            part = part.replace("\\|", "\\Vert ").replace("|", "\\vert ")
        else:
            part = part.replace("|", "\\|")
        out.append(part)
    return "".join(out)


def _table(lines: list[str], starts: list[int], indent: str) -> list[str]:
    """Markdown rows from the lines between the rules (rules are passed as None)."""
    groups, current = [], []
    for line in lines:
        if line is None:
            if current:
                groups.append(current)
            current = []
        else:
            current.append(line)
    if current:
        groups.append(current)
    header_lines = groups[0] if len(groups) > 1 else []
    body_lines = [line for g in groups[1:] for line in g] if len(groups) > 1 else groups[0]
    header = [" ".join(c) for c in zip(*[_cells(l, starts) for l in header_lines])] or \
        [""] * len(starts)
    rows: list[list[str]] = []
    for line in body_lines:
        if not line.strip():
            continue
        cells = _cells(line, starts)
        if rows and not cells[0]:  # continuation of the previous row
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells)]
        else:
            rows.append(cells)
    out = [indent + "| " + " | ".join(header) + " |",
           indent + "|" + "|".join("---" for _ in starts) + "|"]
    out += [indent + "| " + " | ".join(_table_cell(c) for c in r) + " |" for r in rows]
    return [""] + out + [""]


def convert_tables(text: str) -> str:
    lines = text.split("\n")
    out, i = [], 0
    while i < len(lines):
        m = _RULE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        rule, starts, inner, j = lines[i], _columns(lines[i]), [], i + 1
        n_rules = 1
        while j < len(lines):
            if lines[j].rstrip() == rule.rstrip():
                n_rules += 1
                inner.append(None)
                if n_rules == 3 or (j + 1 < len(lines) and not lines[j + 1].strip()):
                    break
            else:
                inner.append(lines[j])
            j += 1
        while inner and inner[-1] is None:
            inner.pop()
        out += _table(inner, starts, m.group(1))
        i = j + 1
    return "\n".join(out)


def convert_math_blocks(text: str) -> str:
    lines = text.split("\n")
    out, i = [], 0
    while i < len(lines):
        m = _MATH_DIRECTIVE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        base = len(m.group(1))
        body = [m.group(2)] if m.group(2).strip() else []
        j = i + 1
        while j < len(lines):
            line = lines[j]
            if line.strip() and _indent(line) <= base:
                break
            if not line.strip() and (j + 1 >= len(lines) or (lines[j + 1].strip() and
                                                               _indent(lines[j + 1]) <= base)):
                break
            body.append(line)
            j += 1
        first, rest = body[:1], textwrap.dedent("\n".join(body[1:])).split("\n") if body[1:] else []
        math = [b.strip() for b in first + rest if b.strip()]
        pad = " " * base
        out += ["", pad + "$$"] + [pad + b for b in math] + [pad + "$$", ""]
        i = j
    return "\n".join(out)


_CODE_BLOCK = re.compile(r"^(\s*)\.\. code-block::\s*(\w*)\s*$")


def convert_literal_blocks(text: str) -> str:
    lines = text.split("\n")
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        directive = _CODE_BLOCK.match(line)
        if directive or (line.rstrip().endswith("::") and not line.strip().startswith("..")):
            base = _indent(line)
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            k = j
            while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) > base):
                k += 1
            if j < len(lines) and k > j:
                language = (directive.group(2) or "text") if directive else "python"
                if not directive:
                    stripped = line.rstrip()[:-2].rstrip()
                    out.append(stripped + ":" if stripped.strip() else "")
                pad = " " * base
                code = textwrap.dedent("\n".join(lines[j:k])).rstrip("\n").split("\n")
                out += ["", pad + "```" + language] + [pad + c if c else "" for c in code] + \
                    [pad + "```", ""]
                i = k
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


_SECTION_TITLE = re.compile(
    r"^(\s*)(Parameters|Attributes|Returns|Raises)\b[^\n]*\n(\s*)-{3,}\s*$", re.M)


def convert_section_titles(text: str) -> str:
    """'Parameters common to ...' / 'Attributes (set in ...)' + underline → the NumPy section
    ('Parameters', 'Attributes', ...), so the entries render as a list, not a paragraph."""
    return _SECTION_TITLE.sub(
        lambda m: f"{m.group(1)}{m.group(2)}\n{m.group(3)}{'-' * len(m.group(2))}", text)


_ITEM = re.compile(r"^[A-Za-z_*][\w*]*(\s*,\s*[A-Za-z_*][\w*]*)*(\s+:\s.*|\s*:?)$")


def move_trailing_prose(text: str) -> str:
    """A NumPy section runs to the next section title; prose written after the last item (a
    paragraph at column 0 that is not a ``name : type`` item) would be parsed as more items.
    Move such paragraphs in front of the section."""
    lines = text.split("\n")
    for h in range(len(lines) - 1):
        underlined = re.fullmatch(r"\s*-{3,}\s*", lines[h + 1])
        if lines[h].strip() not in ("Parameters", "Attributes") or not underlined:
            continue
        j = h + 2
        while j < len(lines):
            line = lines[j]
            if j + 1 < len(lines) and re.fullmatch(r"\s*-{3,}\s*", lines[j + 1]):
                break  # the next section
            prose = (line.strip() and _indent(line) == 0 and not _ITEM.match(line)
                     and not lines[j - 1].strip())
            if prose:
                k = j
                while k < len(lines) and lines[k].strip():
                    k += 1
                moved = lines[j:k] + [""]
                del lines[j:k]
                lines[h:h] = moved
                return "\n".join(lines)
            j += 1
    return text


def convert(text: str) -> str:
    """All rewrites, in an order that keeps tables and math intact."""
    text = convert_section_titles(text)
    text = move_trailing_prose(text)
    text = convert_literal_blocks(text)
    text = convert_tables(text)
    text = convert_math_blocks(text)
    text = _MATH.sub(lambda m: "$" + m.group(1).strip() + "$", text)
    text = _TILDE_ROLE.sub(lambda m: "`" + m.group(1).split(".")[-1] + "`", text)
    return _ROLE.sub(lambda m: "`" + m.group(1).lstrip(".") + "`", text)


class RSTDocstrings(Extension):
    """Rewrite every docstring once, when griffe loads the object."""

    def on_instance(self, *, obj, **kwargs) -> None:
        if getattr(obj, "kind", None) is not None and obj.kind.value == "class" \
                and obj.path.startswith("softrank."):
            # an estimator's docstring is completed by softrank._doc.compose at import time
            # (the shared parameters and attributes): document the completed text
            from softrank._doc import composed_source

            composed = composed_source(obj.path)
            if composed is not None and obj.docstring is not None:
                obj.docstring.value = composed
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
