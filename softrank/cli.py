"""Command line: ``softrank demo [--approximation A] [--csv PATH] [--quick] [--seed S]`` and
``softrank study run|report ...`` (the generalization study)."""
from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .demo import build_parser as demo_parser

    parser = argparse.ArgumentParser(
        prog="softrank",
        description="Generalization-gap estimates from the training data alone.")
    parser.add_argument("--version", action="version", version=f"softrank {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="rank a grid of skorch MLPs on digits by each measure "
                                       "and compare with the observed gap (Kendall tau)")
    demo_parser(demo)
    from .study.cli import add_study_command

    add_study_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "study":
        return args.study_main(args)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(args)
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
