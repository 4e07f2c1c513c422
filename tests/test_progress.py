"""Progress off a terminal, as JSON, or not at all; and the timing stored with every run."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_cli import run_cli

from privtune.study.progress import JsonProgress, PlainProgress
from privtune.study.stages import RunTimer, stage

SRC = str(Path(__file__).resolve().parents[1] / "src")


def write_study(tmp_path, name="study"):
    """Two runs (base, lora) of a few records; extraction off, as it costs the most here."""
    study = {"model": "tiny-llama", "output_dir": str(tmp_path / name),
             "data": {"n_individuals": 6, "max_length": 48}, "canaries": {"enabled": False},
             "attacks": {"extraction": {"enabled": False}},
             "train": {"epochs": 2, "batch_size": 4}, "methods": [{"method": "lora", "lora": {"r": 2}}]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def stored_runs(output_dir: Path) -> dict:
    from privtune.study.store import Store

    store = Store(output_dir / "privtune.db")
    try:
        return {r["label"]: r for r in store.runs("default")}
    finally:
        store.close()


def test_plain_lines_when_stdout_is_a_pipe_and_timing_is_stored(tmp_path):
    path = write_study(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "privtune", "run", "--no-report", str(path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "2 runs to execute" in lines
    assert "[1/2] base: started" in lines and "[2/2] lora: started" in lines
    for name in ("preparation", "measures", "membership attacks", "record stats"):
        assert any(line.startswith(f"[2/2] lora: {name} done in ") for line in lines), name
    assert any(line.startswith("[2/2] lora: done in ") for line in lines)

    runs = stored_runs(tmp_path / "study")
    lora = runs["lora"]
    steps = lora["efficiency"]["steps"]  # 2 epochs of ceil(train records / 4)
    assert steps >= 2
    # the training stage's count, at its start and its end
    train_lines = [line for line in lines if line.startswith("[2/2] lora: training")]
    assert train_lines[0] == f"[2/2] lora: training 0/{steps}"
    assert train_lines[-1].startswith(f"[2/2] lora: training {steps}/{steps} done in ")
    timing = lora["timing"]
    stages = {s["stage"]: s for s in timing["stages"]}
    assert list(stages)[-1] == "other"
    assert stages["training"]["count"] == 1 and stages["measures"]["count"] == 2  # after each epoch
    # stages are exclusive: they add up to the run's wall time
    assert sum(s["seconds"] for s in stages.values()) == pytest.approx(timing["wall_seconds"], abs=0.01)
    assert timing["cpu_seconds"] > 0 and timing["cpus"] >= 1
    assert timing["cpu_covers"] == "this process, all its threads"
    for key in ("load_start", "load_end", "load_mean", "load_max"):
        assert timing[key] >= 0
    assert timing["load_max"] >= timing["load_mean"] >= min(timing["load_start"], timing["load_end"]) - 1e-9
    eff = lora["efficiency"]
    assert eff["train_cpu_seconds"] > 0
    assert eff["tokens_per_cpu_second"] == pytest.approx(eff["tokens"] / eff["train_cpu_seconds"])
    assert "base model scores" in {s["stage"] for s in runs["base"]["timing"]["stages"]}


def test_json_progress_is_one_object_per_event_on_stderr(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "run", "--no-report", "--json-progress",
                             str(write_study(tmp_path)))
    assert code == 0, err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert not any(line.startswith("{") for line in out.splitlines())  # stdout keeps the human summary
    assert all({"event", "time", "run"} <= set(e) for e in events)
    assert events[0] == {**events[0], "event": "study_started", "runs": 2}
    assert events[-1]["event"] == "study_finished"
    lora = [e for e in events if e["run"] == "lora"]
    assert lora[0] == {**lora[0], "event": "run_started", "index": 2, "runs": 2}
    assert lora[-1] == {**lora[-1], "event": "run_finished", "status": "done", "error": None}
    training = [e for e in lora if e.get("stage") == "training"]
    steps = stored_runs(tmp_path / "study")["lora"]["efficiency"]["steps"]
    assert training[0] == {**training[0], "event": "stage_started", "total": steps}
    assert training[-1]["event"] == "stage_finished" and training[-1]["seconds"] > 0
    advanced = [e for e in training if e["event"] == "stage_advanced"]
    assert advanced[-1] == {**advanced[-1], "done": steps, "total": steps}  # the last step always comes


def test_quiet_prints_only_the_summary(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "run", "--no-report", "--quiet", str(write_study(tmp_path)))
    assert code == 0, err
    assert err == ""
    assert "started" not in out and "training" not in out and "privtune study" not in out
    assert "study default" in out and "database:" in out  # the summary table and where it is stored


def test_quiet_and_json_progress_together_is_one_line_error(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "run", "--quiet", "--json-progress", str(write_study(tmp_path)))
    assert code != 0 and len(err.strip().splitlines()) == 1 and "--quiet" in err


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_progress_prints_a_count_at_most_every_interval_with_an_eta():
    out, clock = io.StringIO(), FakeClock()
    sink = PlainProgress(out, interval_s=30, clock=clock)
    sink.study_started(1)
    sink.run_started("fft")
    sink.stage_started("fft", "training", 100)
    for step in range(1, 101):
        clock.now = step * 1.0  # a step a second
        sink.stage_advanced("fft", "training", step, 100)
    sink.stage_finished("fft", "training", 100.0)
    lines = out.getvalue().splitlines()
    counts = [line for line in lines if "elapsed" in line]
    # boundaries at 0 s and 100 s; counts at 30, 60, 90 s
    assert counts == ["[1/1] fft: training 30/100, 30.0s elapsed, ETA 1m10s",
                      "[1/1] fft: training 60/100, 1m00s elapsed, ETA 40.0s",
                      "[1/1] fft: training 90/100, 1m30s elapsed, ETA 10.0s"]
    assert lines[-1] == "[1/1] fft: training 100/100 done in 1m40s"


def test_json_progress_thins_advances_but_keeps_the_last():
    out, clock = io.StringIO(), FakeClock()
    sink = JsonProgress(out, min_interval_s=1.0, clock=clock)
    for step in range(1, 11):
        clock.now = step * 0.25
        sink.stage_advanced("fft", "training", step, 10)
    done = [json.loads(line)["done"] for line in out.getvalue().splitlines()]
    assert done == [1, 5, 9, 10]


def test_stages_are_timed_exclusively_and_add_up_to_the_wall_time():
    with RunTimer("r") as timer:
        with stage("training"):
            time.sleep(0.05)
            with stage("measures"):
                time.sleep(0.1)
            time.sleep(0.05)
        with stage("measures"):
            time.sleep(0.1)
    record = timer.record("this process")
    stages = {s["stage"]: s for s in record["stages"]}
    assert list(stages) == ["training", "measures", "other"]
    assert stages["training"]["seconds"] == pytest.approx(0.1, abs=0.04)
    assert stages["measures"]["seconds"] == pytest.approx(0.2, abs=0.04) and stages["measures"]["count"] == 2
    assert sum(s["seconds"] for s in stages.values()) == pytest.approx(record["wall_seconds"], abs=1e-3)
    with stage("outside any run") as counter:  # no timer: the block runs, nothing is recorded
        counter.advance()
    assert "outside any run" not in {s["stage"] for s in timer.record("this process")["stages"]}


def timed_run(label, load_mean, stages, method="lora"):
    return {"label": label, "method": method, "status": "done",
            "timing": {"wall_seconds": sum(stages.values()), "cpu_seconds": 1.0, "cpus": 2,
                       "load_mean": load_mean, "cpu_covers": "this process, all its threads",
                       "stages": [{"stage": k, "seconds": v, "cpu_seconds": v, "count": 1} for k, v in stages.items()]}}


def test_report_flags_runs_under_a_different_load_and_shows_every_stage():
    from privtune.report.timing import LOAD_SPREAD, timing_section, uneven_load

    runs = [timed_run("base", 2.0, {"base model scores": 3.0, "other": 0.1}, method="base"),
            timed_run("fft", 2.2, {"training": 60.0, "measures": 5.0, "other": 0.2}, method="fft"),
            timed_run("lora", 2.1, {"training": 40.0, "extraction": 12.0, "other": 0.2}),
            timed_run("dp-lora", 2.0 + 2 * (2 * LOAD_SPREAD + 0.01), {"training": 90.0, "other": 0.1})]
    median, flagged = uneven_load(runs)
    assert median == pytest.approx(1.075) and [r["label"] for r in flagged] == ["dp-lora"]  # per CPU: 1.0-1.1, 1.51
    html = timing_section(runs)
    heads = html.split("<thead>")[1].split("</thead>")[0]
    assert heads.index("training") < heads.index("measures") < heads.index("extraction") \
        < heads.index("base model scores") < heads.index("other")
    assert html.count("⚠") == 2 and "dp-lora: load per CPU more than 0.25" in html
    assert timing_section([{**runs[1], "timing": None}]) == ""  # runs stored before timing: no section


def test_background_load_keeps_k_processes_busy_and_stops_them():
    import psutil

    from privtune.measures.load import BackgroundLoad

    with BackgroundLoad(2) as load:
        processes = [psutil.Process(p.pid) for p in load.processes]
        deadline = time.monotonic() + 20  # on a busy machine they get their share late
        while time.monotonic() < deadline and not all(p.cpu_times().user > 0.05 for p in processes):
            time.sleep(0.1)
        assert len(processes) == 2 and all(p.cpu_times().user > 0.05 for p in processes)  # spinning, not waiting
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in processes)


def test_rich_bars_show_each_run_at_its_innermost_stage():
    from rich.console import Console

    from privtune.study.progress import RichProgress

    out = io.StringIO()
    sink = RichProgress(Console(file=out, force_terminal=True, width=120))
    sink.study_started(1)
    sink.run_started("fft")
    sink.stage_started("fft", "training", 4)
    sink.stage_advanced("fft", "training", 2, 4)
    sink.stage_started("fft", "measures", None)
    assert sink._progress.tasks[-1].description == "fft · measures"
    sink.stage_finished("fft", "measures", 0.1)
    task = sink._progress.tasks[-1]
    assert (task.description, task.completed, task.total) == ("fft · training", 2, 4)  # back to the enclosing stage
    sink.stage_finished("fft", "training", 1.0)
    sink.run_finished("fft", "done", 1.5)
    sink.study_finished()
    assert "fft · done in 1.5s" in out.getvalue()


def test_rich_bars_show_a_label_that_looks_like_markup_as_written():
    from rich.console import Console

    from privtune.study.progress import RichProgress

    out = io.StringIO()
    sink = RichProgress(Console(file=out, force_terminal=True, width=120))
    sink.study_started(1)
    sink.run_started("mk[/]x[/bold]")  # Rich markup would raise MarkupError on the closing tags
    sink.run_finished("mk[/]x[/bold]", "done", 1.5)
    sink.study_finished()
    assert "mk[/]x[/bold] · done in 1.5s" in out.getvalue()


def test_a_retried_run_advances_the_study_bar_once_and_a_run_left_alone_counts():
    from rich.console import Console

    from privtune.study.progress import LEFT_ALONE, PlainProgress, RichProgress

    sink = RichProgress(Console(file=io.StringIO(), force_terminal=True, width=120))
    sink.study_started(2)
    sink.run_started("fft")
    sink.run_finished("fft", "retrying", 1.0, "crashed")
    sink.run_started("fft")
    sink.run_finished("fft", "done", 2.0)
    sink.run_finished("lora", LEFT_ALONE, 0.0, "another privtune process is training it")
    study = sink._progress.tasks[0]
    assert (study.completed, study.total) == (2, 2)
    sink.study_finished()
    out = io.StringIO()
    plain = PlainProgress(out)
    plain.study_started(1)
    plain.run_finished("lora", LEFT_ALONE, 0.0, "another privtune process is training it")
    assert "[1/1] lora: left alone: another privtune process is training it" in out.getvalue()
