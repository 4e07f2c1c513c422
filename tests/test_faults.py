"""Faults are normal: a crashed run is retried and then recorded, a killed driver resumes
where it stopped, and two studies can write one database at the same time."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml

from privtune.config import parse_config
from privtune.study import runner
from privtune.study.driver import open_store, run_study
from privtune.study.plan import plan_study


def fast_study(tmp_path, name="tiny", **overrides):
    raw = {
        "name": name, "model": "tiny-llama", "output_dir": str(tmp_path / "out"),
        "data": {"source": "customer-sim", "n_individuals": 8, "max_length": 48},
        "canaries": {"enabled": False}, "attacks": {"extraction": {"enabled": False}, "mia": {}},
        "train": {"epochs": 1, "batch_size": 4, "physical_batch_size": 4},
        "methods": [{"method": "fft"}, {"method": "lora", "lora": {"r": 2}},
                    {"method": "lora", "label": "lora-r4", "lora": {"r": 4}}],
        "precision": "fp32", "save_artifacts": False,
    }
    raw.update(overrides)
    return parse_config(raw)


def crash_once(monkeypatch, label: str, times: int):
    """Make ``execute_run`` raise a RuntimeError the first ``times`` times it runs ``label``."""
    real, calls = runner.execute_run, {"n": 0}

    def flaky(ctx, spec, *args, **kwargs):
        if spec.label == label and calls["n"] < times:
            calls["n"] += 1
            raise RuntimeError("simulated worker crash\nsecond line")
        return real(ctx, spec, *args, **kwargs)

    monkeypatch.setattr(runner, "execute_run", flaky)
    return calls


def test_crashed_run_is_retried_and_the_study_completes(tmp_path, monkeypatch):
    calls = crash_once(monkeypatch, "lora", times=1)
    outcome = run_study(fast_study(tmp_path, retries=1), show_progress=False)
    assert calls["n"] == 1
    assert outcome.failed == {} and outcome.done == ["base", "fft", "lora", "lora-r4"]


def test_run_that_keeps_crashing_is_recorded_and_the_rest_finish(tmp_path, monkeypatch):
    cfg = fast_study(tmp_path, retries=1)
    crash_once(monkeypatch, "fft", times=5)
    outcome = run_study(cfg, show_progress=False)
    assert outcome.done == ["base", "lora", "lora-r4"]
    error = outcome.failed["fft"]
    assert error.startswith("crashed on attempt 2: RuntimeError: simulated worker crash (traceback: ")
    fft = next(s for s in plan_study(cfg) if s.label == "fft")
    for attempt in (1, 2):
        log = tmp_path / "out" / "logs" / f"{fft.run_id}-attempt{attempt}.txt"
        assert "Traceback" in log.read_text() and "simulated worker crash" in log.read_text()
    store = open_store(cfg)
    rows = {r["label"]: (r["status"], r["error"]) for r in store.runs("tiny")}
    store.close()
    assert rows["fft"] == ("failed", error) and rows["lora"][0] == "done"


def _run_cli(config, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "privtune", "run", str(config), "--no-report"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _done_runs(db) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db, timeout=30) as conn:
        return conn.execute("SELECT COUNT(*) FROM runs WHERE status='done'").fetchone()[0]


@pytest.mark.slow
def test_driver_killed_mid_study_resumes_with_one_row_per_run(tmp_path):
    cfg = fast_study(tmp_path)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump()))
    db = tmp_path / "out" / "privtune.db"
    driver = _run_cli(config)
    deadline = time.time() + 120
    while _done_runs(db) < 2 and driver.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert driver.poll() is None, driver.communicate()[0]  # still mid-study
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished_before = _done_runs(db)
    assert 2 <= finished_before < 4

    rerun = _run_cli(config)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert "skipped" in out
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT run_id, status FROM runs").fetchall()
    assert sorted(rows) == sorted((spec.run_id, "done") for spec in plan_study(cfg))


@pytest.mark.slow
def test_two_studies_write_one_database_at_once(tmp_path):
    procs, configs = [], []
    for name in ("first", "second"):
        cfg = fast_study(tmp_path, name=name, seeds=[0, 1])
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(cfg.model_dump()))
        configs.append(cfg)
        procs.append(_run_cli(config))
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
    store = open_store(configs[0])
    try:
        for cfg in configs:
            runs = store.runs(cfg.name)
            assert sorted(r["run_id"] for r in runs) == sorted(s.run_id for s in plan_study(cfg))
            assert all(r["status"] == "done" and r["epochs"] for r in runs if r["label"] != "base")
    finally:
        store.close()
