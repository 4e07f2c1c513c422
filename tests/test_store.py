import math
import os
import socket
import sqlite3
import subprocess
import sys
import time

from privtune.study.store import Store


def test_runs_round_trip_with_epochs_and_nan(tmp_path):
    store = Store(tmp_path / "r.db")
    store.start("abc", "s", "lora", "lora", {"model": "m", "seed": 3})
    store.add_epoch("abc", 0, {"ce_s_train": 2.0})
    store.add_epoch("abc", 1, {"ce_s_train": 1.5})
    store.finish("abc", {"final": {"ce_s_train": 1.5, "utility_ppl": math.inf}, "dp": None})
    store.close()
    (run,) = Store(tmp_path / "r.db").runs("s")
    assert run["status"] == "done" and run["label"] == "lora" and run["seed"] == 3
    assert [e["epoch"] for e in run["epochs"]] == [0, 1]
    assert run["final"]["utility_ppl"] is None


def test_restart_drops_partial_epochs_and_failed_runs_keep_their_error(tmp_path):
    store = Store(tmp_path / "r.db")
    store.start("abc", "s", "fft", "fft", {})
    store.add_epoch("abc", 1, {"x": 1})
    assert store.status("abc") == "running"
    store.start("abc", "s", "fft", "fft", {})
    store.fail("abc", "out of memory; lower the batch.")
    (run,) = store.runs()
    assert run["epochs"] == [] and run["status"] == "failed" and run["error"].startswith("out of memory")
    assert store.studies() == ["s"]


def test_a_finished_run_is_reused_only_on_the_data_digest_it_stored(tmp_path):
    from privtune.study.driver import stale_reason
    from privtune.study.plan import RunSpec

    store = Store(tmp_path / "r.db")
    fft, old = RunSpec("abc", "s", "fft", "fft", 0, {}), RunSpec("old", "s", "lora", "lora", 0, {})
    store.start("abc", "s", "fft", "fft", {})
    assert store.data_digest("abc") is None and stale_reason(store, fft, "d1" * 32) is None  # not finished
    store.finish("abc", {"digests": {"data": "d1" * 32}})
    store.start("old", "s", "lora", "lora", {})
    store.finish("old", {"final": {}})  # stored by a privtune that recorded no digest
    assert store.data_digest("abc") == "d1" * 32 and store.data_digest("missing") is None
    assert stale_reason(store, fft, "d1" * 32) is None
    assert stale_reason(store, fft, "e2" * 32) == (
        "run fft: data changed since it was stored (digest d1d1d1d1d1d1 -> e2e2e2e2e2e2); retraining")
    assert "stored without a data digest" in stale_reason(store, old, "d1" * 32)


def _ended_process_pid() -> int:
    """The id of a process that has ended (and so holds nothing)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def _set_owner(path, run_id, **columns):
    """Rewrite who holds a run, as another process (or host) would have written it."""
    with sqlite3.connect(path) as conn:
        conn.execute(f"UPDATE runs SET {', '.join(f'{c}=?' for c in columns)} WHERE run_id=?",
                     (*columns.values(), run_id))


def test_a_run_whose_process_ended_reads_as_interrupted_with_how_to_resume(tmp_path):
    writer = Store(tmp_path / "r.db")
    writer.start("abc", "s", "fft", "fft", {})
    writer.claim("def", "s", "lora", "lora", {}, status="queued")
    reader = Store(tmp_path / "r.db")
    assert reader.status("abc") == "running" and reader.status("def") == "queued"  # the writer is alive
    for run_id in ("abc", "def"):
        _set_owner(tmp_path / "r.db", run_id, owner_pid=_ended_process_pid())  # as if the writer had crashed
    runs = {r["label"]: r for r in reader.runs("s")}
    assert reader.status("abc") == runs["fft"]["status"] == "interrupted"
    assert runs["fft"]["error"] == (
        f"interrupted before it finished: its process (pid {_owner_pid(tmp_path, 'abc')} on {socket.gethostname()}) "
        "has ended; run the study again (the same privtune run command) to resume it")
    assert runs["lora"]["status"] == "interrupted" and runs["lora"]["error"].startswith("interrupted before it started")
    writer.close(), reader.close()


def _owner_pid(tmp_path, run_id):
    with sqlite3.connect(tmp_path / "r.db") as conn:
        return conn.execute("SELECT owner_pid FROM runs WHERE run_id=?", (run_id,)).fetchone()[0]


def test_a_run_on_another_host_is_interrupted_once_its_lease_expires(tmp_path):
    writer = Store(tmp_path / "r.db", heartbeat_seconds=0.05)
    writer.start("abc", "s", "fft", "fft", {})
    first = _heartbeat(tmp_path)
    time.sleep(0.3)
    assert _heartbeat(tmp_path) > first  # the writer's thread keeps the lease fresh
    writer.close()
    _set_owner(tmp_path / "r.db", "abc", owner_host="elsewhere", owner_pid=1)  # cannot be checked from here
    reader = Store(tmp_path / "r.db", lease_seconds=60)
    assert reader.status("abc") == "running"
    _set_owner(tmp_path / "r.db", "abc", heartbeat=time.time() - 61)
    (run,) = reader.runs()
    assert run["status"] == "interrupted"
    assert "its process (pid 1 on elsewhere) has not been heard from for over 1 min" in run["error"]
    reader.close()


def _heartbeat(tmp_path) -> float:
    with sqlite3.connect(tmp_path / "r.db") as conn:
        return conn.execute("SELECT heartbeat FROM runs").fetchone()[0]


OLD_SCHEMA = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, study TEXT NOT NULL, label TEXT NOT NULL, method TEXT NOT NULL,
    role TEXT NOT NULL, status TEXT NOT NULL, config TEXT NOT NULL, result TEXT, error TEXT, started_at REAL,
    finished_at REAL);
CREATE TABLE epochs (run_id TEXT NOT NULL REFERENCES runs(run_id), epoch INTEGER NOT NULL, measures TEXT NOT NULL,
    PRIMARY KEY (run_id, epoch));
"""


def test_a_database_of_an_older_privtune_opens_and_its_stale_running_row_is_interrupted(tmp_path):
    with sqlite3.connect(tmp_path / "r.db") as conn:
        conn.executescript(OLD_SCHEMA)
        conn.execute("INSERT INTO runs VALUES ('old', 's', 'fft', 'fft', 'target', 'running', '{}', NULL, NULL, ?,"
                     " NULL)", (time.time() - 3600,))
        conn.execute("INSERT INTO runs VALUES ('done', 's', 'lora', 'lora', 'target', 'done', '{}', '{}', NULL, 1,"
                     " 2)")
    store = Store(tmp_path / "r.db")
    runs = {r["label"]: r for r in store.runs("s")}
    assert runs["lora"]["status"] == "done"
    assert runs["fft"]["status"] == "interrupted" and "an older privtune" in runs["fft"]["error"]
    store.start("old", "s", "fft", "fft", {})  # the new columns are there to write
    assert store.status("old") == "running"
    store.close()
    Store(tmp_path / "r.db").close()  # opening it again adds nothing twice


def test_a_claim_leaves_a_run_another_live_process_holds_alone(tmp_path):
    first, second = Store(tmp_path / "r.db"), Store(tmp_path / "r.db")  # two processes' connections
    planned = time.time()
    assert first.claim("abc", "s", "fft", "fft", {}, planned_at=planned) is None
    assert first.claim("abc", "s", "fft", "fft", {}, planned_at=planned) is None  # its own: a retry
    why = second.claim("abc", "s", "fft", "fft", {}, planned_at=planned)
    assert why == f"another privtune process (pid {os.getpid()} on {socket.gethostname()}) is training it"
    assert second.claim("def", "s", "lora", "lora", {}, status="queued", planned_at=planned) is None
    assert first.claim("def", "s", "lora", "lora", {}).endswith("is about to train it")
    first.finish("abc", {"final": {}})
    assert second.claim("abc", "s", "fft", "fft", {}, planned_at=planned) == (
        "another privtune process finished it meanwhile")
    assert second.claim("abc", "s", "fft", "fft", {}, planned_at=time.time()) is None  # finished before: rerun it
    _set_owner(tmp_path / "r.db", "def", owner_pid=_ended_process_pid())
    assert first.claim("def", "s", "lora", "lora", {}) is None  # its holder is gone: taken over
    first.close(), second.close()
