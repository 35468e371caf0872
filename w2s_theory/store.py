"""Results are data: an SQLite store of result rows, written as runs finish (docs/design.md, principle 7).

Tables:

* ``runs``: one row per run, keyed by a unique ``run_id`` (a hash of the run's full spec — world config,
  setting and seed — see :class:`w2s_theory.pipeline.RunSpec`). A row holds the spec and the metrics as JSON,
  the study that computed it and the time it was written.
* ``study_runs``: which runs belong to which study, ``(study, run_id)`` unique. A run that two studies share
  (the same setting and seed) is computed and stored once and listed in both, so each study's table is
  complete and nothing is computed twice.
* ``meta``: ``schema_version``.

Writes are transactions (``INSERT OR IGNORE``): a re-run skips what is there and never duplicates, a chunk's
rows are stored all or none, and a process killed at any moment leaves every committed row intact (SQLite's
write-ahead log, WAL mode; ``synchronous=NORMAL`` survives a killed process, though not a power cut).

Tables and figures are computed from the store (:meth:`ResultsStore.dataframe`), never from memory.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.parse
from pathlib import Path
from typing import Iterable

import pandas as pd

from .validation import InputError

__all__ = ["ResultsStore", "SCHEMA_VERSION", "EXPORT_FORMATS"]

SCHEMA_VERSION = 2

#: File suffix -> format of :meth:`ResultsStore.export`.
EXPORT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY NOT NULL,
    study       TEXT NOT NULL,
    spec        TEXT NOT NULL,
    metrics     TEXT NOT NULL,
    finished_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_study ON runs (study);
CREATE TABLE IF NOT EXISTS study_runs (
    study  TEXT NOT NULL,
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    PRIMARY KEY (study, run_id)
);
CREATE INDEX IF NOT EXISTS study_runs_run ON study_runs (run_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

#: SQLite's default limit on host parameters is 999 on old builds; stay well below it.
_IN_BATCH = 500


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot store {type(obj).__name__} in the results store")


def _dumps(d: dict, *, sort_keys: bool = True) -> str:
    # NaN and inf are kept (json allows them as literals by default), so nothing is silently altered.
    return json.dumps(d, sort_keys=sort_keys, default=_json_default, allow_nan=True)


#: The first 16 bytes of every SQLite database file.
_SQLITE_HEADER = b"SQLite format 3\x00"

#: Tables a store of each schema version has.
_TABLES = {1: {"runs", "meta"}, 2: {"runs", "study_runs", "meta"}}


class ResultsStore:
    """An SQLite file of result rows. Safe to open from one writer and any number of readers.

    ``create=False`` refuses to create a missing file (for readers such as ``w2s-theory export``);
    ``read_only=True`` opens the file read-only (SQLite ``mode=ro``): nothing is written to it, not even the
    journal mode. An existing non-empty file is recognised as a results store (an SQLite database with a
    ``meta`` table holding an integer ``schema_version`` and the tables of that version) before anything is
    written; any other file — another SQLite database, a CSV, a damaged store — is an :class:`InputError`
    and is left byte-identical.
    """

    def __init__(self, path: str | Path, *, create: bool = True, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        if (read_only or not create) and not self.path.exists():
            raise InputError(f"results store not found: {self.path}")
        if self.path.exists() and self.path.is_dir():
            raise InputError(f"results store {self.path} is a directory; give a file path such as results.db")
        version = self._recognise() if self.path.exists() and self.path.stat().st_size > 0 else None
        try:
            if read_only:
                if version is None:
                    raise InputError(f"{self.path} is an empty file, not a results store")
                uri = "file:" + urllib.parse.quote(str(self.path.resolve())) + "?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, timeout=60)
                if version == 1:  # schema 1 had no study_runs: every run belonged to the study that computed it
                    self._db.executescript("CREATE TEMP TABLE study_runs AS "
                                           "SELECT study, run_id FROM runs ORDER BY rowid")
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._open_schema()
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{self.path} is not a readable w2s-theory results store ({exc})") from None

    def _recognise(self) -> int:
        """The schema version of the existing file at ``self.path``, read without writing anything; an
        :class:`InputError` when the file is not a results store of a version this code reads."""
        with open(self.path, "rb") as fh:
            header = fh.read(len(_SQLITE_HEADER))
        if header != _SQLITE_HEADER:
            raise InputError(f"{self.path} is not a w2s-theory results store (not an SQLite database); "
                             "it was left as it is: give a store or a new file name")
        uri = "file:" + urllib.parse.quote(str(self.path.resolve())) + "?mode=ro"
        wal = self.path.with_name(self.path.name + "-wal")
        if not wal.exists() or wal.stat().st_size == 0:
            uri += "&immutable=1"  # the file is the whole database: read it without creating -shm/-wal files
        try:
            db = sqlite3.connect(uri, uri=True, timeout=60)
            try:
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if "meta" not in tables:
                    raise InputError(f"{self.path} is an SQLite database but not a w2s-theory results store (no "
                                     "meta table); it was left as it is: give a store or a new file name")
                row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                # The b-trees are intact (one pass over the file; a damaged page is caught before a write).
                problems = [r[0] for r in db.execute("PRAGMA quick_check(1)")]
                if problems != ["ok"]:
                    detail = " ".join(" ".join(problems).replace("*** in database main ***", "").split())[:120]
                    raise InputError(f"{self.path} is damaged (SQLite quick_check: {detail}); it was left "
                                     "as it is: restore it from a copy or give a new file name")
            finally:
                db.close()
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{self.path} is damaged or not a results store ({exc})") from None
        try:
            version = int(row[0]) if row else None
        except (TypeError, ValueError):
            version = None
        if version is None:
            value = "missing" if row is None else repr(row[0])
            raise InputError(f"{self.path} is damaged or not a results store (schema_version {value})")
        if version > SCHEMA_VERSION:
            raise InputError(f"{self.path} was written by a newer w2s-theory (store schema {version}, this "
                             f"version reads up to {SCHEMA_VERSION}); upgrade w2s-theory")
        missing = sorted(_TABLES.get(version, {"?"}) - tables)
        if missing:
            raise InputError(f"{self.path} is damaged or not a results store (schema {version} without "
                             f"table {', '.join(missing)})")
        return version

    def _open_schema(self) -> None:
        row = None
        if self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone():
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = int(row[0]) if row else None
        if version == SCHEMA_VERSION:
            return  # nothing to write: opening a store to read it never modifies it
        with self._db:  # create or upgrade in one transaction
            self._db.executescript("BEGIN;" + _SCHEMA)
            if version == 1:
                # Schema 1 had no study_runs: every run belonged to the study that computed it.
                self._db.execute("INSERT OR IGNORE INTO study_runs (study, run_id) "
                                 "SELECT study, run_id FROM runs ORDER BY rowid")
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- writing -------------------------------------------------------------------------------------------

    def write(self, study: str, rows: list[dict], specs: list[dict]) -> int:
        """Store finished runs (``rows[i]`` has a ``run_id``; ``specs[i]`` is its spec) in one transaction and
        list them in ``study``: all of them or, if anything fails, none. Runs already stored are left as they
        are (never duplicated, never overwritten).

        Returns the number of rows newly added to ``study``.
        """
        if len(rows) != len(specs):
            raise ValueError("write: one spec per row")
        for row in rows:
            if not isinstance(row.get("run_id"), str) or not row["run_id"]:
                raise ValueError(f"write: every row needs a non-empty string run_id, got {row.get('run_id')!r}")
        now = time.time()
        # Metrics keep the producer's key order (run id, spec, then metrics): it becomes the column order.
        payload = [(row["run_id"], study, _dumps(spec), _dumps(row, sort_keys=False), now)
                   for row, spec in zip(rows, specs)]
        with self._db:  # one transaction: all rows of the chunk or none
            self._db.executemany("INSERT OR IGNORE INTO runs VALUES (?, ?, ?, ?, ?)", payload)
            before = self._db.total_changes
            self._db.executemany("INSERT OR IGNORE INTO study_runs (study, run_id) VALUES (?, ?)",
                                 [(study, row["run_id"]) for row in rows])
            return self._db.total_changes - before

    def link(self, study: str, run_ids: Iterable[str]) -> int:
        """List runs that are already stored (computed for another study) in ``study`` too, in one
        transaction; ids not in the store are ignored. Returns the number newly listed."""
        with self._db:
            before = self._db.total_changes
            self._db.executemany("INSERT OR IGNORE INTO study_runs (study, run_id) "
                                 "SELECT ?, run_id FROM runs WHERE run_id = ?",
                                 [(study, run_id) for run_id in run_ids])
            return self._db.total_changes - before

    # -- reading -------------------------------------------------------------------------------------------

    def done_ids(self, run_ids: Iterable[str] | None = None, *, study: str | None = None) -> set[str]:
        """Run ids already stored (in any study, or listed in ``study`` when given), restricted to
        ``run_ids`` when given."""
        table, where = ("runs", "") if study is None else ("study_runs", "study = ? AND ")
        prefix = [] if study is None else [study]
        if run_ids is None:
            q = f"SELECT run_id FROM {table}" + (" WHERE study = ?" if study is not None else "")
            return {r[0] for r in self._db.execute(q, prefix)}
        wanted = list(run_ids)
        found: set[str] = set()
        for start in range(0, len(wanted), _IN_BATCH):
            chunk = wanted[start : start + _IN_BATCH]
            q = f"SELECT run_id FROM {table} WHERE {where}run_id IN ({','.join('?' * len(chunk))})"
            found.update(r[0] for r in self._db.execute(q, prefix + chunk))
        return found

    def count(self, study: str | None = None) -> int:
        """Rows of ``study`` (of every study, one per (study, run), when ``None``)."""
        if study is None:
            return self._db.execute("SELECT COUNT(*) FROM study_runs").fetchone()[0]
        return self._db.execute("SELECT COUNT(*) FROM study_runs WHERE study = ?", (study,)).fetchone()[0]

    def studies(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT study FROM study_runs ORDER BY study")]

    def rows(self, study: str | None = None) -> list[dict]:
        """Stored metric rows (each with ``study`` added), in the order they were listed in their study;
        with ``study=None``, one row per (study, run)."""
        q = "SELECT s.study, r.metrics FROM study_runs AS s JOIN runs AS r ON r.run_id = s.run_id"
        if study is None:
            cur = self._db.execute(q + " ORDER BY s.rowid")
        else:
            cur = self._db.execute(q + " WHERE s.study = ? ORDER BY s.rowid", (study,))
        return [{"study": s, **json.loads(m)} for s, m in cur]

    def specs(self, study: str | None = None) -> dict[str, dict]:
        """``run_id -> spec`` (as given to :meth:`write`) for the runs of ``study`` (or all runs)."""
        if study is None:
            cur = self._db.execute("SELECT run_id, spec FROM runs ORDER BY rowid")
        else:
            cur = self._db.execute("SELECT r.run_id, r.spec FROM study_runs AS s JOIN runs AS r "
                                   "ON r.run_id = s.run_id WHERE s.study = ? ORDER BY s.rowid", (study,))
        return {run_id: json.loads(spec) for run_id, spec in cur}

    def dataframe(self, study: str | None = None) -> pd.DataFrame:
        """The stored rows as a pandas DataFrame (one column per metric or spec field)."""
        return pd.DataFrame(self.rows(study))

    def export(self, path: str | Path, study: str | None = None) -> int:
        """Write :meth:`dataframe` to ``path`` as CSV or Parquet (by suffix: .csv, .parquet, .pq), atomically
        (an existing file is replaced whole or not at all). Returns the number of rows written."""
        from .io import atomic_write

        path = Path(path)
        fmt = EXPORT_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise InputError(f"--out {path}: unknown format {path.suffix or '(no suffix)'!r}; "
                             f"end the file name with one of {', '.join(EXPORT_FORMATS)}")
        if study is not None and study not in self.studies():
            known = ", ".join(self.studies()) or "none: the store is empty"
            raise InputError(f"--study {study!r} is not in {self.path}; studies stored: {known}")
        frame = self.dataframe(study)
        if frame.empty:
            raise InputError(f"{self.path} holds no rows to export; run `w2s-theory sweep CONFIG.toml "
                             f"--store {self.path}` first")
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise InputError("Parquet export needs pyarrow: pip install 'w2s-theory[parquet]' "
                                 "(or export to .csv)") from None
            atomic_write(path, lambda fh: frame.to_parquet(fh, index=False, engine="pyarrow"))
        else:
            atomic_write(path, lambda fh: frame.to_csv(fh, index=False))
        return len(frame)
