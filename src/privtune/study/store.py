"""Results in SQLite: one row per run keyed by its config hash, one row per epoch.

SQLite because a study is a file a user can copy, query and keep, with transactions
that make every finished run durable the moment it is written (WAL mode, so a reader
such as ``privtune report`` never blocks a running study). A crash or Ctrl-C loses at
most the run in progress; its partial rows are replaced when it is run again.

A run being worked on is held by one process: its row names the owner (a token per open
store, the process id and host) and carries a heartbeat the owner refreshes every
:data:`HEARTBEAT_SECONDS`. That row is a lock: another process that wants the run (the
same study started twice) leaves it alone while the owner lives. And it tells a reader
the truth after a crash: a ``queued`` or ``running`` row whose process has ended (same
host, process id gone) or has not been heard from for :data:`LEASE_SECONDS` reads as
``interrupted``, with how to resume it. That status is worked out when the row is read,
never stored, so nothing has to clean up after a process that cannot.

A run's per-record statistics (``record_stats``: a few numbers per record, so the bulk
of a result past a few thousand records) stay in the database until something asks for
them: :meth:`Store.runs` with ``per_record=False`` leaves them out of the parsed results
and gives each run a :class:`StoredRecordStats` in their place, which reads them on
first use, so a report over many runs of many records holds only the few it compares.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from privtune.files import private_dir, private_file

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    study       TEXT NOT NULL,
    label       TEXT NOT NULL,
    method      TEXT NOT NULL,
    role        TEXT NOT NULL,          -- base | target | shadow | audit | retrain | unlearn
    status      TEXT NOT NULL,          -- queued | running | done | failed
    config      TEXT NOT NULL,          -- resolved run config, JSON
    result      TEXT,                   -- measures, JSON (done runs)
    error       TEXT,                   -- one line (failed runs)
    started_at  REAL,
    finished_at REAL,
    owner_id    TEXT,                   -- the Store that holds (or held) the run
    owner_pid   INTEGER,                -- its process ...
    owner_host  TEXT,                   -- ... and host
    heartbeat   REAL                    -- last sign of life of a queued or running run
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id   TEXT NOT NULL REFERENCES runs(run_id),
    epoch    INTEGER NOT NULL,
    measures TEXT NOT NULL,             -- JSON
    PRIMARY KEY (run_id, epoch)
);
"""


#: Columns added since the first release; an older database gets them when it is opened.
ADDED_COLUMNS = {"owner_id": "TEXT", "owner_pid": "INTEGER", "owner_host": "TEXT", "heartbeat": "REAL"}

#: How often a process holding runs says it is alive, and how long a run whose holder
#: has not said so for is taken as interrupted. The lease is long because a process can
#: stall (a swapping machine, a debugger); a holder that has ended on this host is seen
#: at once, by its process id.
HEARTBEAT_SECONDS = 20.0
LEASE_SECONDS = 300.0

#: Statuses of a run someone is working on: they hold the run's lock while their owner lives.
HELD = ("queued", "running")


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


@dataclass(frozen=True)
class Holder:
    """Who holds a queued or running run, and whether it is still there."""

    pid: int | None
    host: str | None
    heartbeat: float | None

    def who(self) -> str:
        return f"pid {self.pid} on {self.host}" if self.pid is not None else "an older privtune"

    def gone(self, lease_seconds: float, now: float) -> str | None:
        """Why the holder is taken to be gone (``None``: it may still be working)."""
        if self.host == socket.gethostname() and self.pid is not None and not _pid_alive(self.pid):
            return f"its process ({self.who()}) has ended"
        if self.heartbeat is None or now - self.heartbeat > lease_seconds:
            return f"its process ({self.who()}) has not been heard from for over {lease_seconds / 60:.0f} min"
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def interrupted_error(status: str, why: str) -> str:
    """The one line an interrupted run shows in place of an error."""
    when = "before it started" if status == "queued" else "before it finished"
    return f"interrupted {when}: {why}; run the study again (the same privtune run command) to resume it"


class Store:
    """The results database of one output directory.

    Each open store is one owner: runs it starts or queues are held in its name until
    they finish, fail or it closes (a background thread refreshes their heartbeat).
    """

    def __init__(self, path: str | Path, lease_seconds: float = LEASE_SECONDS,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS):
        self.path = Path(path)
        private_file(private_dir(self.path.parent) / self.path.name)  # SQLite gives its -wal, -shm files this mode
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.owner_id = uuid.uuid4().hex
        self._heartbeat: _Heartbeat | None = None
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Bring a database written by an older privtune up to the current schema."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")  # two processes opening an old file add each column once
            have = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
            for column, kind in ADDED_COLUMNS.items():
                if column not in have:
                    self._db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self._db.close()

    def status(self, run_id: str) -> str | None:
        """``queued``, ``running``, ``done``, ``failed``, ``interrupted`` (held by a process
        that is gone), or ``None`` for a run the database does not hold."""
        row = self._db.execute(f"SELECT {_ROW} FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return self._seen(*row)[0] if row else None

    def _seen(self, status: str, owner_id, pid, host, heartbeat, started_at, error) -> tuple[str, str | None]:
        """A row's status and error as a reader should see them."""
        if status in HELD and owner_id != self.owner_id:
            why = Holder(pid, host, heartbeat if heartbeat is not None else started_at).gone(
                self.lease_seconds, time.time())
            if why:
                return "interrupted", interrupted_error(status, why)
        return status, error

    def data_digest(self, run_id: str) -> str | None:
        """The data digest a run's stored result records (``None``: no result, or one
        stored before privtune recorded digests)."""
        row = self._db.execute("SELECT json_extract(result, '$.digests.data') FROM runs WHERE run_id=?",
                               (run_id,)).fetchone()
        return row[0] if row else None

    def start(self, run_id: str, study: str, label: str, method: str, config: dict, role: str = "target") -> None:
        """Mark a run as running in this store's name, dropping rows a previous attempt left
        behind (its epochs, and failed attempts of the same label under another config)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._take(run_id, study, label, method, config, role, "running")

    def claim(self, run_id: str, study: str, label: str, method: str, config: dict, role: str = "target", *,
              status: str = "running", planned_at: float | None = None) -> str | None:
        """Take a run for this store (``status`` ``queued`` for a run handed to a scheduler),
        unless another process holds it or has finished it since ``planned_at``.

        Returns ``None`` when the run is now this store's, else why it is not: the
        caller skips the run. Read and write are one transaction, so of two processes
        claiming one run exactly one gets it.
        """
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(f"SELECT {_ROW}, finished_at FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is not None:
                held, owner_id, pid, host, heartbeat, *_, finished_at = row
                seen, _ = self._seen(*row[:-1])
                if seen in HELD and owner_id != self.owner_id:
                    doing = "training" if held == "running" else "about to train"
                    return f"another privtune process ({Holder(pid, host, heartbeat).who()}) is {doing} it"
                if held == "done" and planned_at is not None and (finished_at or 0) >= planned_at:
                    return "another privtune process finished it meanwhile"
            self._take(run_id, study, label, method, config, role, status)
        return None

    def _take(self, run_id: str, study: str, label: str, method: str, config: dict, role: str, status: str) -> None:
        """Inside a transaction: (re)write the run's row as held by this store."""
        stale = [r for (r,) in self._db.execute(
            "SELECT run_id FROM runs WHERE study=? AND label=? AND status='failed' AND run_id<>?",
            (study, label, run_id))]
        for old in [run_id, *stale]:
            self._db.execute("DELETE FROM epochs WHERE run_id=?", (old,))
        self._db.executemany("DELETE FROM runs WHERE run_id=?", [(old,) for old in stale])
        now = time.time()
        # A run this store already holds keeps its place in the study's order (the order
        # it was claimed in), whether a worker starts it later or it is retried.
        kept = self._db.execute(f"SELECT started_at FROM runs WHERE run_id=? AND owner_id=? AND status IN {HELD}",
                                (run_id, self.owner_id)).fetchone()
        self._db.execute(
            "INSERT OR REPLACE INTO runs (run_id, study, label, method, role, status, config, started_at,"
            " owner_id, owner_pid, owner_host, heartbeat) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (run_id, study, label, method, role, status, _json(config), kept[0] if kept else now, self.owner_id,
             os.getpid(), socket.gethostname(), now))
        if self._heartbeat is None:
            self._heartbeat = _Heartbeat(self.path, self.owner_id, self.heartbeat_seconds)
            self._heartbeat.start()

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
        included; a queued or running run whose process is gone reads as ``interrupted``.
        ``per_record=False``: each run's ``record_stats`` a :class:`StoredRecordStats`, read
        when first used."""
        result = "result" if per_record else "json_remove(result, '$.record_stats')"
        query = (f"SELECT run_id, study, label, method, role, config, {result},"
                 f" json_type(result, '$.record_stats'), {_ROW} FROM runs"
                 f" WHERE role IN ({','.join('?' * len(roles))})")
        args: tuple = tuple(roles)
        if study is not None:
            query += " AND study=?"
            args += (study,)
        out = []
        for run_id, study_name, label, method, role, config, result, stats_type, *row in self._db.execute(
                query + " ORDER BY started_at", args):
            status, error = self._seen(*row)
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


#: The columns :meth:`Store._seen` reads, in its order.
_ROW = "status, owner_id, owner_pid, owner_host, heartbeat, started_at, error"


class _Heartbeat(threading.Thread):
    """Refreshes the heartbeat of every queued or running run of one store, on its own
    connection (a training step can take the main thread for minutes)."""

    def __init__(self, path: Path, owner_id: str, every: float):
        super().__init__(name="privtune-heartbeat", daemon=True)
        self._path, self._owner_id, self._every = path, owner_id, every
        self._stopped = threading.Event()

    def run(self) -> None:
        db = sqlite3.connect(self._path, timeout=60, isolation_level=None)
        try:
            while not self._stopped.wait(self._every):
                try:
                    db.execute(f"UPDATE runs SET heartbeat=? WHERE owner_id=? AND status IN {HELD}",
                               (time.time(), self._owner_id))
                except sqlite3.Error:  # busy for a minute: the next beat tries again
                    continue
        finally:
            db.close()

    def stop(self) -> None:
        self._stopped.set()
        self.join()


def latest_per_label(runs: list[dict]) -> list[dict]:
    """The most recently started run of each label, in start order.

    A study rerun after its config changed (another learning rate, more epochs) makes
    new runs under the old labels; reports show the current ones, while the database
    keeps every run.
    """
    latest = {run["label"]: run for run in runs}  # runs come in start order
    return [run for run in runs if latest[run["label"]] is run]
