"""Where a run's time goes: its stages, timed, and announced as they happen.

A :class:`RunTimer` is open for the whole of one run (``runner.execute_run``). Code at
the natural seams of a run (training, the measures after each epoch, each attack, the
canaries, saving the model) opens a stage with :func:`stage`, which both reports it to
the study's :class:`~privtune.study.progress.ProgressSink` and times it. Stages are
timed *exclusively*: the measures taken after each epoch, nested inside training, are
charged to ``measures`` and not to ``training`` as well, and time outside any stage goes
to ``other``, so a run's stages add up to its wall time. Each stage gets wall and
process CPU seconds and how often it was entered.

One run at a time per process (each executor runs its runs one after another in a
process), so the open timer is a module global, reachable from the thread Flower's
server evaluates in as well; outside a run, :func:`stage` only runs its block.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from privtune.measures.load import LoadSampler
from privtune.study.progress import ProgressSink

OTHER = "other"

_current: "RunTimer | None" = None


class StageCounter:
    """What a stage's code holds: ``advance()`` after each step of a stage of known size."""

    def __init__(self, sink: ProgressSink, run: str | None, name: str, total: int | None):
        self._sink, self._run, self.name, self.total, self.done = sink, run, name, total, 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._sink.stage_advanced(self._run, self.name, self.done, self.total)


class RunTimer:
    """Context manager around one run: wall and CPU time, load, and the time of each stage."""

    def __init__(self, run: str, sink: ProgressSink | None = None, load_interval_s: float = 10.0):
        self.run = run
        self.sink = sink or ProgressSink()
        self._load = LoadSampler(load_interval_s)
        self._lock = threading.Lock()
        self._open: list[str] = []
        self._stages: dict[str, list[float]] = {}  # name -> [wall s, cpu s, entries], in first-entry order

    def __enter__(self) -> "RunTimer":
        global _current
        self._previous, _current = _current, self
        self._load.__enter__()
        self._start = self._mark = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc) -> None:
        global _current
        with self._lock:
            self._charge()
        self._end = (time.perf_counter(), time.process_time())
        self._load.__exit__(*exc)
        _current = self._previous

    def _charge(self) -> None:
        """Charge the time since the last mark to the innermost open stage (or ``other``)."""
        now = (time.perf_counter(), time.process_time())
        entry = self._stages.setdefault(self._open[-1] if self._open else OTHER, [0.0, 0.0, 0])
        entry[0] += now[0] - self._mark[0]
        entry[1] += now[1] - self._mark[1]
        self._mark = now

    @contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[StageCounter]:
        with self._lock:
            self._charge()
            self._open.append(name)
            self._stages.setdefault(name, [0.0, 0.0, 0])[2] += 1
        started = time.perf_counter()
        self.sink.stage_started(self.run, name, total)
        try:
            yield StageCounter(self.sink, self.run, name, total)
        finally:
            with self._lock:
                self._charge()
                self._open.pop()
            self.sink.stage_finished(self.run, name, time.perf_counter() - started)

    def record(self, cpu_covers: str) -> dict:
        """The run's ``timing`` section (after the timer closed): ``wall_seconds``,
        ``cpu_seconds`` and ``cpu_covers`` (which processes they count), the load
        (:meth:`LoadSampler.record`), and ``stages``, a list in the order first entered
        with ``other`` last: ``stage``, ``seconds``, ``cpu_seconds``, ``count``."""
        order = [name for name in self._stages if name != OTHER] + [OTHER]  # "other" last
        stages = [{"stage": name, "seconds": wall, "cpu_seconds": cpu, "count": int(count)}
                  for name in order if name in self._stages
                  for wall, cpu, count in [self._stages[name]]]
        return {"wall_seconds": self._end[0] - self._start[0], "cpu_seconds": self._end[1] - self._start[1],
                "cpu_covers": cpu_covers, **self._load.record(), "stages": stages}


@contextmanager
def stage(name: str, total: int | None = None) -> Iterator[StageCounter]:
    """Time ``name`` in the run in progress and report it; outside a run, just run the block."""
    timer = _current
    if timer is None:
        yield StageCounter(ProgressSink(), None, name, total)
        return
    with timer.stage(name, total) as counter:
        yield counter


@contextmanager
def study_stage(sink: ProgressSink, name: str, total: int | None = None) -> Iterator[StageCounter]:
    """Report work of the whole study (``run`` is ``None``), outside any run's timing."""
    started = time.perf_counter()
    sink.stage_started(None, name, total)
    try:
        yield StageCounter(sink, None, name, total)
    finally:
        sink.stage_finished(None, name, time.perf_counter() - started)
