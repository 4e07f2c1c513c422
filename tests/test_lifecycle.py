"""A run's life in the database: who holds it, what a reader sees when its process is gone,
what a second copy of the study does meanwhile, and what a failure leaves behind."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml

from test_faults import fast_study


def _running_rows(db) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=30) as conn:
            return conn.execute("SELECT COUNT(*) FROM runs WHERE status='running'").fetchone()[0]
    except sqlite3.OperationalError:  # the table is not there yet
        return 0


def _start_cli(tmp_path, cfg, *args):
    """``privtune run`` on ``cfg`` in a subprocess, its stdout and stderr going to files."""
    config = tmp_path / f"{cfg.name}.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump()))
    out, err = open(tmp_path / "stdout.txt", "w"), open(tmp_path / "stderr.txt", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "privtune", "run", str(config), "--no-report", *args],
                            env=env, stdout=out, stderr=err)
    out.close(), err.close()
    return proc


@pytest.mark.slow
def test_ctrl_c_with_output_in_files_says_how_to_resume(tmp_path):
    proc = _start_cli(tmp_path, fast_study(tmp_path))
    db = tmp_path / "out" / "privtune.db"
    deadline = time.time() + 120
    while not _running_rows(db) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()  # a run is under way
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    stderr = (tmp_path / "stderr.txt").read_text()
    assert stderr.strip() == "interrupted: finished runs are saved; rerun the same command to resume."
