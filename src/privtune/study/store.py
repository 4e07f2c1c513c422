"""Results in SQLite: one row per run keyed by its config hash, one row per epoch.

SQLite because a study is a file a user can copy, query and keep, with transactions
that make every finished run durable the moment it is written (WAL mode, so a reader
such as ``privtune report`` never blocks a running study). A crash or Ctrl-C loses at
most the run in progress; its partial rows are replaced when it is run again.

A run's per-record statistics (``record_stats``: a few numbers per record, so the bulk
of a result past a few thousand records) stay in the database until something asks for
them: :meth:`Store.runs` with ``per_record=False`` leaves them out of the parsed results
and gives each run a :class:`StoredRecordStats` in their place, which reads them on
first use, so a report over many runs of many records holds only the few it compares.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from privtune.files import private_dir, private_file

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    study       TEXT NOT NULL,
    label       TEXT NOT NULL,
    method      TEXT NOT NULL,
    role        TEXT NOT NULL,          -- base | target | shadow | audit | retrain | unlearn
    status      TEXT NOT NULL,          -- running | done | failed
    config      TEXT NOT NULL,          -- resolved run config, JSON
    result      TEXT,                   -- measures, JSON (done runs)
    error       TEXT,                   -- one line (failed runs)
    started_at  REAL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id   TEXT NOT NULL REFERENCES runs(run_id),
    epoch    INTEGER NOT NULL,
    measures TEXT NOT NULL,             -- JSON
    PRIMARY KEY (run_id, epoch)
);
"""


def _json(value) -> str:
    """JSON with NaN/inf written as null, which every reader understands."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(value), sort_keys=True)


class StoredRecordStats(Mapping):
    """One run's ``record_stats``, read from its database on first use and kept after.

    A read-only mapping, so readers that look keys up (``stats["record"]["loglik"]``)
    need not know; :meth:`read` gives a fresh copy without keeping it, for a writer that
    streams every run's statistics one after another."""

    def __init__(self, path: str | Path, run_id: str):
        self.path, self.run_id = Path(path), run_id
        self._stats: dict | None = None

    def read(self) -> dict:
        db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        try:
            row = db.execute("SELECT json_extract(result, '$.record_stats') FROM runs WHERE run_id=?",
                             (self.run_id,)).fetchone()
        finally:
            db.close()
        return json.loads(row[0]) if row and row[0] else {}

    def _loaded(self) -> dict:
        if self._stats is None:
            self._stats = self.read()
        return self._stats

    def __getitem__(self, key):
        return self._loaded()[key]

    def __iter__(self) -> Iterator:
        return iter(self._loaded())

    def __len__(self) -> int:
        return len(self._loaded())

    def __repr__(self) -> str:
        return f"StoredRecordStats({str(self.path)!r}, {self.run_id!r})"


class Store:
    """The results database of one output directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        private_file(private_dir(self.path.parent) / self.path.name)  # SQLite gives its -wal, -shm files this mode
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def status(self, run_id: str) -> str | None:
        row = self._db.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return row[0] if row else None

    def data_digest(self, run_id: str) -> str | None:
        """The data digest a run's stored result records (``None``: no result, or one
        stored before privtune recorded digests)."""
        row = self._db.execute("SELECT json_extract(result, '$.digests.data') FROM runs WHERE run_id=?",
                               (run_id,)).fetchone()
        return row[0] if row else None

    def start(self, run_id: str, study: str, label: str, method: str, config: dict, role: str = "target") -> None:
        """Mark a run as running, dropping rows a previous attempt left behind."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM epochs WHERE run_id=?", (run_id,))
            self._db.execute(
                "INSERT OR REPLACE INTO runs (run_id, study, label, method, role, status, config, started_at)"
                " VALUES (?, ?, ?, ?, ?, 'running', ?, ?)",
                (run_id, study, label, method, role, _json(config), time.time()))

    def add_epoch(self, run_id: str, epoch: int, measures: dict) -> None:
        self._db.execute("INSERT OR REPLACE INTO epochs (run_id, epoch, measures) VALUES (?, ?, ?)",
                         (run_id, epoch, _json(measures)))

    def finish(self, run_id: str, result: dict) -> None:
        self._db.execute("UPDATE runs SET status='done', result=?, error=NULL, finished_at=? WHERE run_id=?",
                         (_json(result), time.time(), run_id))

    def update_result(self, run_id: str, result: dict) -> None:
        """Replace a finished run's result (study-level analyses such as LiRA add to it)."""
        self._db.execute("UPDATE runs SET result=? WHERE run_id=?", (_json(result), run_id))

    def fail(self, run_id: str, error: str) -> None:
        self._db.execute("UPDATE runs SET status='failed', error=?, finished_at=? WHERE run_id=?",
                         (error, time.time(), run_id))

    def studies(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT study FROM runs ORDER BY study")]

    def runs(self, study: str | None = None,
             roles: tuple[str, ...] = ("base", "target", "audit", "retrain", "unlearn"),
             per_record: bool = True) -> list[dict]:
        """Runs (of ``study``, with one of ``roles``) as the dicts the report reads, epochs
        included; ``per_record=False``: each run's ``record_stats`` a :class:`StoredRecordStats`,
        read when first used."""
        result = "result" if per_record else "json_remove(result, '$.record_stats')"
        query = (f"SELECT run_id, study, label, method, role, status, config, {result}, error,"
                 f" json_type(result, '$.record_stats') FROM runs WHERE role IN ({','.join('?' * len(roles))})")
        args: tuple = tuple(roles)
        if study is not None:
            query += " AND study=?"
            args += (study,)
        out = []
        for run_id, study_name, label, method, role, status, config, result, error, stats_type in self._db.execute(
                query + " ORDER BY started_at", args):
            run = json.loads(result) if result else {}
            if not per_record and stats_type == "object":
                run["record_stats"] = StoredRecordStats(self.path, run_id)
            cfg = json.loads(config)
            run.update(run_id=run_id, study=study_name, label=label, method=method, role=role, status=status,
                       error=error, config=cfg, model=cfg.get("model"), seed=cfg.get("seed"))
            run["epochs"] = [dict(json.loads(m), epoch=e) for e, m in self._db.execute(
                "SELECT epoch, measures FROM epochs WHERE run_id=? ORDER BY epoch", (run_id,))]
            out.append(run)
        return out


def latest_per_label(runs: list[dict]) -> list[dict]:
    """The most recently started run of each label, in start order.

    A study rerun after its config changed (another learning rate, more epochs) makes
    new runs under the old labels; reports show the current ones, while the database
    keeps every run.
    """
    latest = {run["label"]: run for run in runs}  # runs come in start order
    return [run for run in runs if latest[run["label"]] is run]
