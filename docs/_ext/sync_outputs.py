"""Regenerate every documented command output in docs/*.md, and check them.

A documented output is a ```` ```text ```` block preceded by a marker line naming the command
that prints it (an HTML comment, invisible on the site)::

    <!-- output: python examples/approx_loo.py | lines=1-6 | rel=0.02 -->
    ```text
    ...
    ```

Options, after ``|``: ``lines=A-B,C`` (1-based lines of the command's standard output to
show; default all), ``rel=`` and ``abs=`` (the tolerance of the check for this block; by
default a number may differ by one unit in its last printed digit or by 0.1 %, whichever is
larger: another machine, BLAS or torch build changes the last digits), ``volatile=REGEX``
(numbers inside the matches of REGEX on a printed line — wall-clock times — are not
compared).

Usage::

    python docs/_ext/sync_outputs.py            # rewrite the blocks, running every command
                                                # whose sources changed since its record
    python docs/_ext/sync_outputs.py --all      # run every command
    python docs/_ext/sync_outputs.py --check    # compare instead (exit 1 on a difference)
    python docs/_ext/sync_outputs.py --only approx_loo   # commands containing this text

Each run records the command's full output and a hash of the sources it depends on (the
command's script and the ``softrank`` package) in ``docs/_ext/outputs.json``. The default test
run (``tests/test_docs.py``) compares every block with that record, and re-runs the commands
whose sources changed since it was written; so a change in the code that changes a documented
number fails the tests until this script is run again.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
RECORD = DOCS / "_ext" / "outputs.json"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
MARKER = re.compile(r"^<!-- output: (?P<spec>.+?) -->\n```text\n(?P<body>.*?)^```$", re.M | re.S)
DEFAULT_REL = 1e-3  # and one unit in the last printed digit


@dataclass
class Block:
    """One documented output: where it is, what prints it, what it shows."""

    page: Path
    command: str
    body: str
    start: int  # offsets of the body in the page text
    end: int
    lines: list[int] | None = None  # 0-based lines of the output shown (None: all)
    rel: float = DEFAULT_REL
    abs: float | None = None  # None: one unit in the last printed digit
    volatile: re.Pattern | None = None
    options: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        line = self.page.read_text()[:self.start].count("\n")
        return f"{self.page.relative_to(ROOT)}:{line}"


def _parse_lines(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a) - 1, int(b or a)))
    return out


def blocks(page: Path) -> list[Block]:
    """The marked output blocks of a page."""
    text = page.read_text()
    out = []
    for m in MARKER.finditer(text):
        command, *opts = [p.strip() for p in m.group("spec").split("|")]
        options = dict(o.split("=", 1) for o in opts)
        unknown = set(options) - {"lines", "rel", "abs", "volatile"}
        if unknown:
            raise ValueError(f"{page.name}: unknown output option(s) {sorted(unknown)}")
        out.append(Block(
            page, command, m.group("body"), m.start("body"), m.end("body"),
            lines=_parse_lines(options["lines"]) if "lines" in options else None,
            rel=float(options.get("rel", DEFAULT_REL)),
            abs=float(options["abs"]) if "abs" in options else None,
            volatile=re.compile(options["volatile"]) if "volatile" in options else None,
            options=options))
    return out


def all_blocks() -> list[Block]:
    return [b for page in sorted(DOCS.glob("*.md")) for b in blocks(page)]


def unmarked_text_blocks(page: Path) -> list[int]:
    """Line numbers of ```text blocks of a page without an output marker."""
    lines = page.read_text().splitlines()
    return [i + 1 for i, line in enumerate(lines) if line.strip() == "```text"
            and not (i > 0 and lines[i - 1].startswith("<!-- output: "))]


def sources_hash(command: str) -> str:
    """Hash of what a command's output depends on: the command, the files it names (scripts),
    and every Python file of the softrank package."""
    h = hashlib.sha256(command.encode())
    files = [ROOT / a for a in shlex.split(command) if (ROOT / a).is_file()]
    files += sorted((ROOT / "softrank").rglob("*.py"))
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run(command: str, timeout: int = 1800) -> str:
    """stdout of ``command`` run from the repository root (one thread, this checkout first on
    the path, colours removed); fails with its stderr on a non-zero exit."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"`{command}` exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return ANSI.sub("", proc.stdout)  # terminal colours (skorch's epoch table)


def shown(block: Block, output: str) -> str:
    """The part of ``output`` that ``block`` shows."""
    lines = output.rstrip("\n").split("\n")
    if block.lines is not None:
        missing = [i + 1 for i in block.lines if i >= len(lines)]
        if missing:
            raise ValueError(f"{block.where}: lines={block.options['lines']} but `{block.command}`"
                             f" printed {len(lines)} lines")
        lines = [lines[i] for i in block.lines]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def differences(block: Block, expected: str) -> list[str]:
    """How the block's text differs from ``expected`` (the command's output): the text with the
    numbers masked must be equal, each number within the block's tolerance."""
    got_lines, exp_lines = block.body.rstrip("\n").split("\n"), expected.rstrip("\n").split("\n")
    if len(got_lines) != len(exp_lines):
        return [f"{len(got_lines)} lines documented, {len(exp_lines)} printed"]
    out = []
    for k, (doc, printed) in enumerate(zip(got_lines, exp_lines), 1):
        if NUMBER.sub("#", doc).split() != NUMBER.sub("#", printed).split():
            out.append(f"line {k}: documented {doc.strip()!r}, printed {printed.strip()!r}")
            continue
        spans = [] if block.volatile is None else [m.span() for m in
                                                   block.volatile.finditer(printed)]
        for a, m in zip(NUMBER.findall(doc), NUMBER.finditer(printed)):
            if any(lo <= m.start() and m.end() <= hi for lo, hi in spans):
                continue
            b = m.group()
            x, y = float(a), float(b)
            if abs(x - y) > max(_tolerance(block, a), block.rel * abs(y)) * (1 + 1e-9):
                out.append(f"line {k}: documented {a}, printed {b} ({doc.strip()!r})")
    return out


def _tolerance(block: Block, documented: str) -> float:
    """The block's absolute tolerance, or one unit in the last digit of the documented number."""
    if block.abs is not None:
        return block.abs
    mantissa, _, exponent = documented.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def load_record() -> dict:
    return json.loads(RECORD.read_text()) if RECORD.exists() else {}


def save_record(record: dict) -> None:
    RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="compare instead of rewriting (exit 1 on a difference)")
    parser.add_argument("--only", metavar="TEXT", help="only the commands containing TEXT")
    parser.add_argument("--all", action="store_true",
                        help="run every command, also those whose record is up to date")
    args = parser.parse_args(argv)
    found = [b for b in all_blocks() if args.only is None or args.only in b.command]
    record = load_record()
    outputs: dict[str, str] = {}
    for command in dict.fromkeys(b.command for b in found):
        entry = record.get(command)
        if not args.all and entry is not None and entry["sources"] == sources_hash(command):
            outputs[command] = entry["stdout"]  # the sources are unchanged since the record
            continue
        t = time.perf_counter()
        print(f"running `{command}` ...", end=" ", flush=True)
        outputs[command] = run(command)
        print(f"{time.perf_counter() - t:.0f} s", flush=True)
        if not args.check:
            record[command] = {"sources": sources_hash(command), "stdout": outputs[command]}
    failed = 0
    pages: dict[Path, list[Block]] = {}
    for b in found:
        expected = shown(b, outputs[b.command])
        if args.check:
            for d in differences(b, expected):
                print(f"{b.where}: {d}")
                failed += 1
        else:
            pages.setdefault(b.page, []).append(b)
    for page, bs in pages.items():
        text = page.read_text()
        for b in sorted(bs, key=lambda b: -b.start):
            text = text[:b.start] + shown(b, outputs[b.command]) + text[b.end:]
        page.write_text(text)
        print(f"rewrote {len(bs)} block(s) of {page.relative_to(ROOT)}")
    if not args.check:
        save_record(record)
        print(f"recorded {len(outputs)} output(s) in {RECORD.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
