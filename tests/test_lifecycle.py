"""A run's life in the database: who holds it, what a reader sees when its process is gone,
what a second copy of the study does meanwhile, and what a failure leaves behind."""

import csv
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
import yaml

from privtune.study import runner
from privtune.study.driver import open_store, run_study
from privtune.study.plan import plan_study
from test_cli import run_cli
from test_faults import fast_study


def _running_rows(db, label: str | None = None) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=30) as conn:
            return conn.execute("SELECT COUNT(*) FROM runs WHERE status='running' AND label LIKE ?",
                                (label or "%",)).fetchone()[0]
    except sqlite3.OperationalError:  # the table is not there yet
        return 0


def _slow_study(tmp_path):
    """The fast study with runs long enough (20 epochs) that a signal sent while ``fft``
    runs lands before the study ends: tiny runs otherwise finish in a fraction of a second,
    and the whole study can end between the poll that sees a run and the signal."""
    return fast_study(tmp_path, train={"epochs": 20, "batch_size": 4, "physical_batch_size": 4})


def _start_cli(tmp_path, cfg, *args):
    """``privtune run`` on ``cfg`` in a subprocess, its stdout and stderr going to files."""
    config = tmp_path / f"{cfg.name}.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump()))
    out, err = open(tmp_path / "stdout.txt", "w"), open(tmp_path / "stderr.txt", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # As a command started at a terminal: Ctrl-C's signal handled, even when these tests run
    # in a background job, which starts with SIGINT ignored and passes that on to its children.
    proc = subprocess.Popen([sys.executable, "-m", "privtune", "run", str(config), "--no-report", *args],
                            env=env, stdout=out, stderr=err,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out.close(), err.close()
    return proc


@pytest.mark.slow
def test_ctrl_c_with_output_in_files_says_how_to_resume(tmp_path):
    proc = _start_cli(tmp_path, _slow_study(tmp_path))
    _wait_for_a_running_run(proc, tmp_path / "out" / "privtune.db", tmp_path)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    stderr = (tmp_path / "stderr.txt").read_text()
    assert stderr.strip() == "interrupted: finished runs are saved; rerun the same command to resume."


def _wait_for_a_running_run(proc, db, tmp_path, label: str = "fft"):
    """Until ``label`` (the first trained run: two more follow it) is running."""
    deadline = time.time() + 120
    while not _running_rows(db, label) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()  # a run is under way


@pytest.mark.slow
def test_a_run_whose_driver_was_killed_shows_as_interrupted_everywhere(tmp_path, monkeypatch, capsys):
    cfg = _slow_study(tmp_path)
    proc = _start_cli(tmp_path, cfg)
    db = tmp_path / "out" / "privtune.db"
    _wait_for_a_running_run(proc, db, tmp_path)
    with sqlite3.connect(db, timeout=30) as conn:
        (label,) = conn.execute("SELECT label FROM runs WHERE status='running'").fetchone()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    how = (f"{label}: interrupted: interrupted before it finished: its process (pid {proc.pid} on "
           f"{socket.gethostname()}) has ended; run the study again (the same privtune run command) to resume it")

    code, out, _ = run_cli(monkeypatch, capsys, "status", "-o", str(tmp_path / "out"))
    assert code == 0 and how in out.splitlines()
    code, out, _ = run_cli(monkeypatch, capsys, "report", "-o", str(tmp_path / "out"))
    assert code == 0 and how in out.splitlines()
    reports = tmp_path / "out" / "reports" / cfg.name
    rows = {r["label"]: r for r in csv.DictReader(open(reports / "runs.csv"))}
    assert rows[label]["status"] == "interrupted" and rows[label]["error"] == how.split(": ", 2)[2]
    runs = {r["label"]: r for r in json.loads((reports / "runs.json").read_text())}
    assert runs[label]["status"] == "interrupted" and runs[label]["error"] == rows[label]["error"]
    page = (reports / "report.html").read_text()
    assert '<span class="status interrupted">interrupted</span>' in page and "to resume it" in page
    assert '<span class="status running">' not in page


def test_a_second_copy_of_a_study_leaves_the_run_the_first_is_training_alone(tmp_path, monkeypatch, capsys):
    cfg = fast_study(tmp_path, save_artifacts=True, methods=[
        {"method": "fft"}, {"method": "lora", "lora": {"r": 2}},
        {"method": "unlearn-ga", "unlearn": {"source": "fft", "forget": {"fraction": 0.34}}}])
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump()))
    fft = next(s for s in plan_study(cfg) if s.label == "fft")
    first = open_store(cfg)  # the first copy, training fft meanwhile
    assert first.claim(fft.run_id, fft.study, fft.label, fft.method, fft.config, fft.role) is None
    trained = []
    real = runner.execute_run
    monkeypatch.setattr(runner, "execute_run", lambda ctx, spec, *a, **k: trained.append(spec.label) or real(
        ctx, spec, *a, **k))

    code, out, _ = run_cli(monkeypatch, capsys, "run", str(config), "--no-report")
    assert code == 0, out
    assert trained == ["base", "lora", "fft+retrain"]  # neither fft nor what starts from it
    assert (f"left alone: run fft: another privtune process (pid {os.getpid()} on {socket.gethostname()}) is "
            "training it; privtune status shows when it is done") in out
    assert ("left alone: run fft+unlearn-ga: it needs run fft, which was left to another privtune process; privtune "
            "status shows when it is done") in out
    assert first.status(fft.run_id) == "running"  # still the first copy's
    first.close()



@pytest.mark.parametrize("error, line", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
     "out of memory with a physical batch of 4 records; lower train.physical_batch_size (or data.max_length); the "
     "logical batch and results stay the same"),
    (MemoryError("cannot allocate 20 GiB"), "crashed on attempt 1: MemoryError: cannot allocate 20 GiB"),
], ids=["torch-oom", "memory-error"])
def test_every_failed_run_leaves_its_whole_traceback_in_the_logs(tmp_path, monkeypatch, error, line):
    from privtune.train import loop

    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(loop, "_plain_steps", out_of_memory)
    cfg = fast_study(tmp_path, methods=[{"method": "fft"}], retries=0)
    outcome = run_study(cfg, show_progress=False)
    fft = next(s for s in plan_study(cfg) if s.label == "fft")
    log = tmp_path / "out" / "logs" / f"{fft.run_id}-attempt1.txt"
    assert outcome.failed == {"fft": f"{line} (traceback: {log})"}
    text = log.read_text()
    assert text.startswith("Traceback") and "in out_of_memory" in text  # where it was raised
    assert f"{type(error).__name__}: {error}" in text  # the allocator's own error, under a user error too


def test_failed_runs_are_shown_with_their_error_and_replaced_when_their_label_runs_again(tmp_path, monkeypatch,
                                                                                         capsys):
    from privtune.study.store import Store

    db = tmp_path / "out" / "privtune.db"
    store = Store(db)
    store.start("b", "s", "base", "base", {}, role="base")
    store.finish("b", {})
    for attempt, model in enumerate(["/models/one", "/models/two"]):  # an audit label tried on two models
        store.start(f"a{attempt}", "s", "mine", "audit", {"audited_model": model}, role="audit")
        store.fail(f"a{attempt}", f"adapter {model} does not fit the study's model tiny-llama; audit it with the "
                                  "study config it was trained in.")
    store.start("t", "s", "fft", "fft", {})
    store.fail("t", "crashed on attempt 2: RuntimeError: boom (traceback: out/logs/t-attempt2.txt)")

    code, out, _ = run_cli(monkeypatch, capsys, "status", "-o", str(tmp_path / "out"))
    assert code == 0
    assert ("mine: failed: adapter /models/two does not fit the study's model tiny-llama; audit it with the study "
            "config it was trained in.") in out.splitlines()
    assert "fft: failed: crashed on attempt 2: RuntimeError: boom (traceback: out/logs/t-attempt2.txt)" in out
    assert [(r["run_id"], r["status"]) for r in store.runs("s")] == [("b", "done"), ("a1", "failed"),
                                                                      ("t", "failed")]  # a0: replaced by a1
    store.start("a2", "s", "mine", "audit", {"audited_model": "/models/three"}, role="audit")
    store.finish("a2", {})
    assert [(r["run_id"], r["status"]) for r in store.runs("s")] == [("b", "done"), ("t", "failed"), ("a2", "done")]
    store.close()
