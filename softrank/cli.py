"""Command line: ``softrank demo|score|study ...``.

``softrank score`` estimates a saved net's gap from a script, ``softrank demo`` ranks a grid of
digits MLPs by each measure, ``softrank study run|report`` runs the generalization study.
Only the chosen command's module is imported (torch and skorch load when a command runs, not
for ``softrank --help``).
"""
from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser", "COMMANDS"]

#: command -> (one-line help, module; the module provides build_parser(parser) and main(args))
COMMANDS = {
    "score": ("estimate a saved skorch net's generalization gap from its training data "
              "(summary or JSON)", "softrank.score"),
    "demo": ("rank a grid of skorch MLPs on digits by each measure and compare with the "
             "observed gap (Kendall tau)", "softrank.demo"),
    "study": ("generalization study: grid, run, report", "softrank.study.cli"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``softrank`` parser. Every command is listed; only ``command``'s arguments are
    filled in (importing that command's module), so that ``softrank --help`` imports none."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="softrank",
        description="Generalization-gap estimates from the training data alone.")
    parser.add_argument("--version", action="version", version=f"softrank {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (text, module) in COMMANDS.items():
        if name != command:
            p = sub.add_parser(name, help=text, add_help=False)
            p.add_argument("rest", nargs=argparse.REMAINDER)
        elif name == "study":
            importlib.import_module(module).add_study_command(sub)
        else:
            p = sub.add_parser(name, help=text, description=text)
            importlib.import_module(module).build_parser(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line (``argv`` without the program name; default ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "study":
        return args.study_main(args)
    return importlib.import_module(COMMANDS[args.command][1]).main(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
