"""Command line of the study: ``python -m softrank.study COMMAND`` (or ``softrank study``).

Commands:

* ``run GRID.json --store S.sqlite`` — train and measure the configurations not yet in the
  store (resumable: run it again after a kill); ``--backend serial|joblib|dask``,
  ``--n-jobs N``, ``--scheduler ADDRESS`` (Dask), ``--torch-threads T``, ``--data-root DIR``,
  ``--csv OUT`` (export when done);
* ``list GRID.json [--store S.sqlite]`` — the configurations, their ids, and which are done;
* ``export --store S.sqlite --csv OUT.csv`` — the tidy table;
* ``report (--store S.sqlite | --csv T.csv) [--markdown OUT.md] [--plots DIR]
  [--where COL=V] [--exclude COL=V]`` — Kendall τ, granulated τ and estimate/observed ratios
  (printed as Markdown) and the figures, on the rows selected.

An error (a bad grid, a damaged store, a failed model with ``--errors raise``) is printed as
one line that names the file and what to do, with exit status 1; ``--debug`` (on every command)
shows the traceback instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["cli_main", "build_parser", "add_study_command", "run_args", "filter_rows"]


def _common() -> argparse.ArgumentParser:
    """Options of every command."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true",
                   help="on an error, show the full traceback instead of one line")
    return p


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="train and measure the configurations not yet stored",
                       parents=[_common()])
    p.add_argument("grid", help="grid JSON file")
    p.add_argument("--store", required=True, help="SQLite results file (created if missing)")
    p.add_argument("--backend", default="joblib", choices=["serial", "joblib", "dask"])
    p.add_argument("--n-jobs", type=int, default=1,
                   help="parallel models: joblib processes, or LocalCluster workers (dask)")
    p.add_argument("--scheduler", default=None,
                   help="address of a running Dask scheduler (backend dask); default: start a "
                        "LocalCluster of --n-jobs single-threaded worker processes")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per model")
    p.add_argument("--data-root", default=None,
                   help="folder of the image data sets (default: $SOFTRANK_DATA)")
    p.add_argument("--errors", default="raise", choices=["raise", "skip"],
                   help="stop at the first failed model, or record it and go on")
    p.add_argument("--csv", default=None, help="export the table to this CSV when done")
    p.add_argument("--no-progress", action="store_true")


def _add_other(sub) -> None:
    p = sub.add_parser("list", help="the configurations of a grid and whether they are done",
                       parents=[_common()])
    p.add_argument("grid")
    p.add_argument("--store", default=None)
    p = sub.add_parser("export", help="write the results table as CSV", parents=[_common()])
    p.add_argument("--store", required=True)
    p.add_argument("--csv", required=True)
    p = sub.add_parser("report", help="Kendall tau tables (Markdown) and figures",
                       parents=[_common()])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store")
    src.add_argument("--csv")
    p.add_argument("--markdown", default=None, help="also write the tables to this file")
    p.add_argument("--plots", default=None, help="folder for the PNG figures")
    p.add_argument("--plot-prefix", default="",
                   help="prefix of the figure names (<prefix><dataset>_tau.png, ...)")
    p.add_argument("--threshold", type=float, default=None,
                   help="α_train below which a model counts as over-fit (default 0.5)")
    p.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                   help="keep only the rows with this value (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="COLUMN=VALUE",
                   help="drop the rows with this value (repeatable)")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The study's argument parser (or fill ``parser``, e.g. a ``softrank study`` subparser)."""
    parser = parser or argparse.ArgumentParser(
        prog="python -m softrank.study",
        description="Train a grid of networks, measure each on its training data, rank.")
    sub = parser.add_subparsers(dest="study_command", metavar="COMMAND")
    _add_run(sub)
    _add_other(sub)
    return parser


def add_study_command(subparsers) -> argparse.ArgumentParser:
    """Register ``study`` on a parent CLI's subparsers; dispatch with ``args.study_main(args)``."""
    p = subparsers.add_parser("study", help="generalization study: grid, run, report")
    build_parser(p)
    p.set_defaults(study_main=run_args)
    return p


def _cmd_run(args) -> int:
    from .grid import load_grid
    from .runner import run_study
    from .store import ResultStore

    _, configs = load_grid(args.grid)
    with ResultStore(args.store) as store:
        summary = run_study(configs, store, backend=args.backend, n_jobs=args.n_jobs,
                            client=args.scheduler, torch_threads=args.torch_threads,
                            data_root=args.data_root, progress=not args.no_progress,
                            errors=args.errors)
        print(f"{summary.n_configs} configurations: {summary.n_already_done} already stored, "
              f"{summary.n_written} written now, {len(summary.failures)} failed; "
              f"{summary.seconds:.1f} s; store {args.store} has {len(store)} rows")
        if args.csv:
            store.to_csv(args.csv)
            print(f"table written to {args.csv}")
    return 1 if summary.failures else 0


def _cmd_list(args) -> int:
    from .grid import load_grid
    from .store import ResultStore

    _, configs = load_grid(args.grid)
    done = set()
    if args.store and Path(args.store).exists():
        with ResultStore(args.store) as store:
            done = store.done_ids()
    for c in configs:
        hp = ", ".join(f"{k}={v}" for k, v in c.hyperparameters().items())
        print(f"{c.id}  {'done' if c.id in done else 'todo'}  {hp}")
    print(f"{len(configs)} configurations, {sum(c.id in done for c in configs)} done")
    return 0


def _cmd_export(args) -> int:
    from .store import ResultStore

    with ResultStore(args.store) as store:
        cols = store.to_csv(args.csv)
        print(f"{len(store)} rows × {len(cols)} columns written to {args.csv}")
    return 0


def _cmd_report(args) -> int:
    from .analysis import REGIME_THRESHOLD, markdown_report
    from .store import ResultStore, read_csv

    if args.store:
        with ResultStore(args.store) as store:
            rows = store.rows()
    else:
        rows = read_csv(args.csv)
    rows = filter_rows(rows, args.where, args.exclude)
    threshold = REGIME_THRESHOLD if args.threshold is None else args.threshold
    text = markdown_report(rows, threshold)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.plots:
        from .analysis import group_rows
        from .plots import plot_all

        for name, group in group_rows(rows, "dataset").items():
            for path in plot_all(group, args.plots, prefix=f"{args.plot_prefix}{name}_",
                                 title=f"{args.plot_prefix}{name}"):
                print(f"figure: {path}")
    return 0


def _condition(text: str) -> tuple[str, str]:
    column, sep, value = text.partition("=")
    if not sep or not column:
        raise SystemExit(f"expected COLUMN=VALUE, got {text!r}")
    return column, value


def _matches(row: dict, column: str, value: str) -> bool:
    cell = row.get(column)
    if isinstance(cell, (int, float)) and not isinstance(cell, bool):
        try:
            return float(cell) == float(value)
        except ValueError:
            return False
    return str(cell) == value


def filter_rows(rows: list[dict], where: list[str], exclude: list[str]) -> list[dict]:
    """Rows matching every ``COLUMN=VALUE`` of ``where`` and none of ``exclude`` (numbers
    compare as numbers: ``weight_decay=1e-4`` matches 0.0001)."""
    keep, drop = [_condition(w) for w in where], [_condition(e) for e in exclude]
    return [r for r in rows if all(_matches(r, c, v) for c, v in keep)
            and not any(_matches(r, c, v) for c, v in drop)]


_COMMANDS = {"run": _cmd_run, "list": _cmd_list, "export": _cmd_export, "report": _cmd_report}


def run_args(args: argparse.Namespace) -> int:
    """Dispatch parsed arguments (from :func:`build_parser` or :func:`add_study_command`)."""
    name = getattr(args, "study_command", None)
    command = _COMMANDS.get(name)
    if command is None:
        build_parser().print_help()
        return 2
    try:
        return command(args)
    except Exception as e:  # noqa: BLE001 - one line for the user; --debug for the traceback
        if getattr(args, "debug", False):
            raise
        print(f"softrank study {name}: error: {_message(e)} (--debug shows the traceback)",
              file=sys.stderr)
        return 1


def _message(e: Exception) -> str:
    """The error's own text; the type where the text alone would not say what it is."""
    text = str(e).strip()
    if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)) and e.filename:
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, (ValueError, OSError, RuntimeError, MemoryError)) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def cli_main(argv: list[str] | None = None) -> int:
    """``python -m softrank.study`` entry point; returns the exit status."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run_args(args)
