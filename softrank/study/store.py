"""The incremental results table: one row per finished model, keyed on the configuration id.

Why SQLite (the standard library's :mod:`sqlite3`) rather than CSV or Parquet:

* **no lost rows** — each row is one committed transaction (rollback journal,
  ``synchronous=FULL``): a process killed at any instant leaves the file with every row
  committed before the kill and no partial row. A CSV append killed mid-write leaves a torn
  last line that the reader would have to detect and repair; Parquet files cannot be appended
  to row by row at all.
* **no duplicated rows** — ``config_id`` is the PRIMARY KEY and rows are added with
  ``INSERT OR IGNORE``: a configuration finished twice (a resumed run racing a stale worker, two
  runners on one store) is stored once, by construction rather than by care.
* **resume is a query** — the runner asks for the ids present and runs the others.
* no dependency beyond Python, and other processes may read the table while a run writes it.

Only the runner's driver process writes (workers return rows to it), so there is one writer.
Rows are stored as JSON (the columns differ between models when a measure fails or the measure
options change); :meth:`ResultStore.rows` gives them back as flat dicts and
:meth:`ResultStore.to_csv` exports the tidy table (written to a temporary file, then renamed).

Damage is reported, not raised from deep inside: a file that is not a SQLite database (or whose
pages are corrupted) raises :class:`StoreError` naming the file and what to do; a row whose
stored text is not a JSON object (edited by hand, a disk error) is left out of ``rows()`` with a
warning, and the next ``run`` computes that configuration again (``done_ids`` does not count it).
"""
from __future__ import annotations

import csv
import functools
import json
import math
import os
import sqlite3
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

__all__ = ["ResultStore", "StoreError", "write_csv", "read_csv", "TEXT_COLUMNS"]

#: columns that stay strings when a CSV is read back
TEXT_COLUMNS = frozenset({"config_id", "dataset", "arch", "optimizer", "hessian_method",
                          "errors", "skipped", "regime"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    config_id   TEXT PRIMARY KEY,
    config      TEXT NOT NULL,
    row         TEXT NOT NULL,
    finished_at REAL NOT NULL
)
"""


class StoreError(RuntimeError):
    """The results file cannot be used (not a SQLite database, corrupted, unwritable)."""


def _guarded(method):
    """Turn sqlite3's errors into a :class:`StoreError` that names the file and the fix."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as e:
            raise StoreError(_store_problem(self.path, e)) from e
    return wrapper


def _store_problem(path: Path, error: Exception) -> str:
    if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):
        return (f"{path}: the results store is locked by another process ({error}); wait for "
                "the other run to finish or stop it")
    return (f"{path}: not a usable results store ({error}). Move the file aside and run again "
            "to start a new store, or use another store file (sqlite3's .recover command may "
            "salvage its rows)")


class ResultStore:
    """A SQLite results table at ``path`` (created if missing).

    Raises :class:`StoreError` (naming the file and the fix) when the file is not a usable
    SQLite database."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a folder; the store is a file (e.g. "
                             f"{self.path / 'results.sqlite'})")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"{self.path}: cannot create its folder ({e})") from e
        self._conn = None
        try:
            self._conn = sqlite3.connect(self.path, timeout=60.0)
            self._conn.execute("PRAGMA synchronous=FULL")
            with self._conn:
                self._conn.execute(_SCHEMA)
            self._conn.execute("SELECT config_id, config, row, finished_at FROM results "
                               "LIMIT 1").fetchall()
        except sqlite3.DatabaseError as e:
            if self._conn is not None:
                self._conn.close()
            raise StoreError(_store_problem(self.path, e)) from e

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @_guarded
    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    @_guarded
    def __contains__(self, config_id: str) -> bool:
        return self._conn.execute("SELECT 1 FROM results WHERE config_id = ?",
                                  (config_id,)).fetchone() is not None

    @_guarded
    def _decoded(self) -> tuple[list, list[str]]:
        """([(config id, config dict, row dict)] of the readable rows in finishing order,
        ids of the rows whose stored text is not a JSON object)."""
        good, bad = [], []
        for cid, config, row in self._conn.execute(
                "SELECT config_id, config, row FROM results ORDER BY rowid"):
            try:
                c, r = json.loads(config), json.loads(row)
            except (TypeError, ValueError):
                c = r = None
            if isinstance(c, dict) and isinstance(r, dict):
                good.append((cid, c, r))
            else:
                bad.append(str(cid))
        return good, bad

    def damaged_ids(self) -> list[str]:
        """Ids of the rows that cannot be read back (not JSON objects)."""
        return self._decoded()[1]

    @_guarded
    def remove(self, config_ids: Iterable[str]) -> int:
        """Delete these rows (one transaction); returns how many were deleted."""
        with self._conn:
            cur = self._conn.executemany("DELETE FROM results WHERE config_id = ?",
                                         [(c,) for c in config_ids])
        return cur.rowcount

    def _warn_damaged(self, bad: list[str]) -> None:
        if bad:
            warnings.warn(f"{self.path}: {len(bad)} stored row(s) cannot be read (not JSON "
                          f"objects) and are left out: {bad[:5]}{' …' if len(bad) > 5 else ''}; "
                          "run the grid again to compute them anew", RuntimeWarning,
                          stacklevel=3)

    def done_ids(self) -> set[str]:
        """Ids of the configurations already stored (readable rows only: a damaged row is
        computed again)."""
        return {cid for cid, _, _ in self._decoded()[0]}

    @_guarded
    def add(self, config_id: str, config: dict[str, Any], row: dict[str, Any]) -> bool:
        """Commit one row; False (and nothing written) when ``config_id`` is already stored."""
        with self._conn:
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO results (config_id, config, row, finished_at) "
                "VALUES (?, ?, ?, ?)",
                (config_id, json.dumps(config, sort_keys=True), json.dumps(row), time.time()))
        return cur.rowcount == 1

    def configs(self) -> dict[str, dict[str, Any]]:
        """{config id: configuration dict} of the stored rows (damaged rows left out, with a
        warning)."""
        good, bad = self._decoded()
        self._warn_damaged(bad)
        return {cid: c for cid, c, _ in good}

    def rows(self) -> list[dict[str, Any]]:
        """The result rows in the order they finished (damaged rows left out, with a
        warning)."""
        good, bad = self._decoded()
        self._warn_damaged(bad)
        return [r for _, _, r in good]

    def to_csv(self, path: str | os.PathLike) -> list[str]:
        """Write the tidy table; returns its columns."""
        return write_csv(path, self.rows())


def _columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return str(v)


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]],
              columns: list[str] | None = None) -> list[str]:
    """Atomic CSV write (temporary file + rename); missing cells are empty."""
    columns = columns or _columns(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for r in rows:
                writer.writerow([_cell(r.get(c)) for c in columns])
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a table is for sharing
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return columns


def _parse(text: str) -> Any:
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a CSV written by :func:`write_csv`: numbers parsed except in the text columns
    (:data:`TEXT_COLUMNS`: a hex id such as ``'1e5000000000'`` is not a float), empty cells
    dropped."""
    with open(path, newline="") as f:
        return [{k: (v if k in TEXT_COLUMNS else _parse(v)) for k, v in r.items() if v != ""}
                for r in csv.DictReader(f)]
