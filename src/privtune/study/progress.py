"""A study's progress as events, and the ways to show them.

The driver, the executors and the stages of a run (:mod:`privtune.study.stages`) report
to one :class:`ProgressSink`; what the user sees depends on where the output goes:

- :class:`RichProgress` on a terminal: a bar for the study and one per run, showing the
  stage it is in;
- :class:`PlainProgress` when stdout is not a terminal (a log file, CI, ``nohup``, a
  notebook), where bars print nothing: a line at every stage boundary, and within a
  stage of known size its count, elapsed time and ETA, at most once every 30 s per run;
- :class:`JsonProgress` (``--json-progress``): one JSON object per event, for scripts
  and dashboards, on stderr, so that stdout keeps the human summary;
- the base :class:`ProgressSink` (``--quiet``) ignores them all.

``run`` is a run's label, or ``None`` for work of the whole study (loading the model and
data, the shadow-model attacks). A run failing and retried starts again under its label.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO


class ProgressSink:
    """Receives a study's progress events; this base class ignores them (``--quiet``)."""

    def study_started(self, runs: int) -> None:
        """``runs`` runs are to be executed (those the database holds are not counted)."""

    def run_started(self, run: str) -> None: ...

    def stage_started(self, run: str | None, stage: str, total: int | None) -> None:
        """``total``: the stage's count of steps (training steps, rounds), ``None`` when unknown."""

    def stage_advanced(self, run: str | None, stage: str, done: int, total: int | None) -> None: ...

    def stage_finished(self, run: str | None, stage: str, seconds: float) -> None:
        """``seconds``: wall time from the stage's start, stages nested in it included."""

    def run_finished(self, run: str, status: str, seconds: float, error: str | None = None) -> None:
        """``status``: ``done``, ``failed``, ``retrying`` (a crashed attempt that runs
        again, under the same label) or :data:`LEFT_ALONE` (another process holds the run:
        it never started here); ``error`` says why for the last three."""

    def study_finished(self) -> None:
        """The last event: close what the display holds open."""


#: The status of a run another privtune process holds, so this one leaves it alone.
LEFT_ALONE = "left alone"


def _ended(status: str, seconds: float, error: str | None) -> str:
    """``done in 3m05s``, ``failed in 8.2s: why``, ``left alone: why``."""
    text = status if status == LEFT_ALONE else f"{status} in {duration(seconds)}"
    return text + (f": {error}" if error else "")


def default_sink(quiet: bool = False, json_progress: bool = False) -> ProgressSink:
    """The sink for the user's options and where stdout goes."""
    if quiet:
        return ProgressSink()
    if json_progress:
        return JsonProgress()
    return RichProgress() if sys.stdout.isatty() else PlainProgress(sys.stdout)


def duration(seconds: float) -> str:
    """``8.2s``, ``3m05s``, ``1h02m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


@dataclass
class _OpenStage:
    name: str
    total: int | None
    started: float
    done: int = 0


@dataclass
class _Runs:
    """What every renderer tracks: each run's number, its open stages (innermost last)."""

    total: int = 0
    numbers: dict[str | None, int] = field(default_factory=dict)
    stages: dict[str | None, list[_OpenStage]] = field(default_factory=dict)

    def number(self, run: str) -> int:
        return self.numbers.setdefault(run, len(self.numbers) + 1)

    def open(self, run: str | None, stage: str, total: int | None, now: float) -> _OpenStage:
        opened = _OpenStage(stage, total, now)
        self.stages.setdefault(run, []).append(opened)
        return opened

    def innermost(self, run: str | None) -> _OpenStage | None:
        return (self.stages.get(run) or [None])[-1]

    def close(self, run: str | None, stage: str) -> _OpenStage | None:
        open_stages = self.stages.get(run) or []
        for i in range(len(open_stages) - 1, -1, -1):
            if open_stages[i].name == stage:
                return open_stages.pop(i)
        return None


class PlainProgress(ProgressSink):
    """One line per event worth a line, for output that is not a terminal."""

    def __init__(self, stream: TextIO | None = None, interval_s: float = 30.0, clock=time.monotonic):
        self.stream = stream or sys.stdout
        self.interval_s = interval_s
        self.clock = clock
        self._runs = _Runs()
        self._last_line: dict[str | None, float] = {}

    def _say(self, run: str | None, text: str) -> None:
        if run is None:
            prefix = "study:"
        else:
            prefix = f"[{self._runs.number(run)}/{self._runs.total}] {run}:" if self._runs.total else f"{run}:"
        print(f"{prefix} {text}", file=self.stream, flush=True)
        self._last_line[run] = self.clock()

    def study_started(self, runs: int) -> None:
        self._runs.total = runs
        print(f"{runs} run{'s' if runs != 1 else ''} to execute", file=self.stream, flush=True)

    def run_started(self, run: str) -> None:
        self._say(run, "started")

    def stage_started(self, run, stage, total) -> None:
        self._runs.open(run, stage, total, self.clock())
        self._say(run, f"{stage} 0/{total}" if total else f"{stage} ...")

    def stage_advanced(self, run, stage, done, total) -> None:
        current = self._runs.innermost(run)
        if current is None or current.name != stage:
            return
        current.done, current.total = done, total
        now = self.clock()
        if now - self._last_line.get(run, -float("inf")) < self.interval_s:
            return
        elapsed = now - current.started
        text = f"{stage} {done}/{total}, {duration(elapsed)} elapsed" if total else f"{stage} {done}, {duration(elapsed)}"
        if total and 0 < done < total:
            text += f", ETA {duration(elapsed / done * (total - done))}"
        self._say(run, text)

    def stage_finished(self, run, stage, seconds) -> None:
        closed = self._runs.close(run, stage)
        count = f" {closed.done}/{closed.total}" if closed and closed.total else ""
        self._say(run, f"{stage}{count} done in {duration(seconds)}")

    def run_finished(self, run, status, seconds, error=None) -> None:
        self._runs.stages.pop(run, None)
        self._say(run, _ended(status, seconds, error))


class JsonProgress(ProgressSink):
    """One JSON object per line and event: ``event``, ``time`` (Unix seconds), ``run``,
    and the event's own fields. ``stage_advanced`` comes at most once a second per run,
    and always for a stage's last step."""

    def __init__(self, stream: TextIO | None = None, min_interval_s: float = 1.0, clock=time.monotonic):
        self.stream = stream or sys.stderr
        self.min_interval_s = min_interval_s
        self.clock = clock
        self._runs = _Runs()
        self._last_advance: dict[str | None, float] = {}

    def _emit(self, event: str, run: str | None = None, **fields) -> None:
        line = {"event": event, "time": round(time.time(), 3), "run": run, **fields}
        print(json.dumps(line), file=self.stream, flush=True)

    def study_started(self, runs: int) -> None:
        self._runs.total = runs
        self._emit("study_started", runs=runs)

    def run_started(self, run: str) -> None:
        self._emit("run_started", run, index=self._runs.number(run), runs=self._runs.total)

    def stage_started(self, run, stage, total) -> None:
        self._emit("stage_started", run, stage=stage, total=total)

    def stage_advanced(self, run, stage, done, total) -> None:
        now = self.clock()
        if done != total and now - self._last_advance.get(run, -float("inf")) < self.min_interval_s:
            return
        self._last_advance[run] = now
        self._emit("stage_advanced", run, stage=stage, done=done, total=total)

    def stage_finished(self, run, stage, seconds) -> None:
        self._emit("stage_finished", run, stage=stage, seconds=round(seconds, 3))

    def run_finished(self, run, status, seconds, error=None) -> None:
        self._emit("run_finished", run, status=status, seconds=round(seconds, 3), error=error)

    def study_finished(self) -> None:
        self._emit("study_finished")


class RichProgress(ProgressSink):
    """Bars on a terminal: the study's runs, and each run at the stage it is in."""

    def __init__(self, console=None):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        # A run's label is the user's text, not Rich markup.
        self._progress = Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(),
                                  MofNCompleteColumn(),
                                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
        self._runs = _Runs()
        self._tasks: dict[str | None, int] = {}
        self._study: int | None = None
        self._started = False

    def _start(self) -> None:
        if not self._started:
            self._progress.start()
            self._started = True

    def _task(self, run: str | None) -> int:
        if run not in self._tasks:
            self._start()
            self._tasks[run] = self._progress.add_task(run or "study", total=None)
        return self._tasks[run]

    def _show(self, run: str | None) -> None:
        """The run's bar shows its innermost open stage."""
        current = self._runs.innermost(run)
        label = run or "study"
        if current is None:
            self._progress.update(self._task(run), description=label)
            return
        self._progress.reset(self._task(run), total=current.total, completed=current.done,
                             description=f"{label} · {current.name}")

    def study_started(self, runs: int) -> None:
        self._start()
        self._runs.total = runs
        self._study = self._progress.add_task("runs", total=runs)

    def run_started(self, run: str) -> None:
        self._runs.stages.pop(run, None)
        self._progress.reset(self._task(run), total=None, description=f"{run} · starting")

    def stage_started(self, run, stage, total) -> None:
        self._runs.open(run, stage, total, time.monotonic())
        self._show(run)

    def stage_advanced(self, run, stage, done, total) -> None:
        current = self._runs.innermost(run)
        if current is not None and current.name == stage:
            current.done = done
            self._progress.update(self._task(run), completed=done, total=total)

    def stage_finished(self, run, stage, seconds) -> None:
        self._runs.close(run, stage)
        self._show(run)
        if run is None and self._runs.innermost(None) is None:
            self._progress.update(self._task(None), description=f"study · {stage} done")

    def run_finished(self, run, status, seconds, error=None) -> None:
        self._runs.stages.pop(run, None)
        task = self._task(run)
        self._progress.update(task, description=f"{run} · {_ended(status, seconds, None)}", total=1, completed=1)
        if self._study is not None and status != "retrying":  # a retried run ends once, later
            self._progress.advance(self._study)

    def study_finished(self) -> None:
        if self._started:
            self._progress.stop()
            self._started = False
