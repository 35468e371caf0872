"""Results are data: an SQLite store of result rows, written as runs finish (DESIGN.md, principle 7).

Table ``runs``: one row per run, keyed by a unique ``run_id`` (a hash of the run's full spec, see
:class:`w2s_theory.pipeline.RunSpec`). A row holds the study name, the spec and the metrics as JSON, and the
time it was written. Writes are transactions (``INSERT OR IGNORE``): a re-run skips what is there and never
duplicates, and a process killed at any moment leaves every committed row intact (SQLite's journal; WAL mode).

Tables and figures are computed from the store (:meth:`ResultsStore.dataframe`), never from memory.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Iterable

import pandas as pd

from .validation import InputError

__all__ = ["ResultsStore", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    study       TEXT NOT NULL,
    spec        TEXT NOT NULL,
    metrics     TEXT NOT NULL,
    finished_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_study ON runs (study);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} in the results store")


def _dumps(d: dict) -> str:
    # NaN and inf are kept (json allows them as literals by default), so nothing is silently altered.
    return json.dumps(d, sort_keys=True, default=_json_default, allow_nan=True)


class ResultsStore:
    """An SQLite file of result rows. Safe to open from one writer and any number of readers."""

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise InputError(f"results store not found: {self.path}")
        if self.path.exists() and self.path.is_dir():
            raise InputError(f"results store {self.path} is a directory; give a file path such as results.db")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{self.path} is not a w2s-theory results store ({exc})") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def done_ids(self, run_ids: Iterable[str] | None = None) -> set[str]:
        """Run ids already stored (restricted to ``run_ids`` when given)."""
        if run_ids is None:
            return {r[0] for r in self._db.execute("SELECT run_id FROM runs")}
        wanted = list(run_ids)
        found: set[str] = set()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            q = f"SELECT run_id FROM runs WHERE run_id IN ({','.join('?' * len(chunk))})"
            found.update(r[0] for r in self._db.execute(q, chunk))
        return found

    def write(self, study: str, rows: list[dict], specs: list[dict]) -> int:
        """Store finished runs in one transaction; rows already present are left as they are.

        Returns the number of rows inserted.
        """
        if len(rows) != len(specs):
            raise ValueError("write: one spec per row")
        now = time.time()
        payload = [(row["run_id"], study, _dumps(spec), _dumps(row), now) for row, spec in zip(rows, specs)]
        with self._db:  # one transaction: all rows of the chunk or none
            before = self._db.total_changes
            self._db.executemany("INSERT OR IGNORE INTO runs VALUES (?, ?, ?, ?, ?)", payload)
            return self._db.total_changes - before

    def count(self, study: str | None = None) -> int:
        if study is None:
            return self._db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        return self._db.execute("SELECT COUNT(*) FROM runs WHERE study = ?", (study,)).fetchone()[0]

    def studies(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT study FROM runs ORDER BY study")]

    def rows(self, study: str | None = None) -> list[dict]:
        """Stored metric rows (each with ``study`` added), in insertion order."""
        if study is None:
            cur = self._db.execute("SELECT study, metrics FROM runs ORDER BY rowid")
        else:
            cur = self._db.execute("SELECT study, metrics FROM runs WHERE study = ? ORDER BY rowid", (study,))
        return [{"study": s, **json.loads(m)} for s, m in cur]

    def dataframe(self, study: str | None = None) -> pd.DataFrame:
        """The stored rows as a pandas DataFrame (one column per metric or spec field)."""
        return pd.DataFrame(self.rows(study))

