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
"""
from __future__ import annotations

import csv
import json
import math
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

__all__ = ["ResultStore", "write_csv", "read_csv", "TEXT_COLUMNS"]

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


class ResultStore:
    """A SQLite results table at ``path`` (created if missing)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=60.0)
        self._conn.execute("PRAGMA synchronous=FULL")
        with self._conn:
            self._conn.execute(_SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def __contains__(self, config_id: str) -> bool:
        return self._conn.execute("SELECT 1 FROM results WHERE config_id = ?",
                                  (config_id,)).fetchone() is not None

    def done_ids(self) -> set[str]:
        """Ids of the configurations already stored."""
        return {r[0] for r in self._conn.execute("SELECT config_id FROM results")}

    def add(self, config_id: str, config: dict[str, Any], row: dict[str, Any]) -> bool:
        """Commit one row; False (and nothing written) when ``config_id`` is already stored."""
        with self._conn:
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO results (config_id, config, row, finished_at) "
                "VALUES (?, ?, ?, ?)",
                (config_id, json.dumps(config, sort_keys=True), json.dumps(row), time.time()))
        return cur.rowcount == 1

    def configs(self) -> dict[str, dict[str, Any]]:
        """{config id: configuration dict} of the stored rows."""
        return {cid: json.loads(c) for cid, c in
                self._conn.execute("SELECT config_id, config FROM results ORDER BY rowid")}

    def rows(self) -> list[dict[str, Any]]:
        """The result rows in the order they finished."""
        return [json.loads(r) for (r,) in
                self._conn.execute("SELECT row FROM results ORDER BY rowid")]

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
