"""Executors: who runs the planned runs, and where.

The driver (``run_study``) plans, skips runs the database already holds, and is the only
writer of the database. An executor only decides how pending runs get executed and hands
each result (or error) back through callbacks, so a distributed executor can replace the
local one without touching the store or the measures.
"""

from __future__ import annotations

import gc
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from privtune.errors import PrivtuneError, write_traceback
from privtune.study.plan import RunSpec
from privtune.study.progress import ProgressSink
from privtune.study.stages import study_stage


@dataclass
class RunHooks:
    """Callbacks from an executor back to the driver, and where progress goes.

    ``claim`` comes first, once per run, before the run is executed or submitted: when it
    returns ``False`` (another process holds the run) the executor leaves the run alone.
    ``started`` comes when an attempt actually begins (a submitted run may wait in a
    queue first), ``failed`` or ``finished`` when it ends.
    """

    started: Callable[[RunSpec], None]
    epoch: Callable[[RunSpec, int, dict], None]
    finished: Callable[[RunSpec, dict], None]
    failed: Callable[[RunSpec, str], None]
    progress: ProgressSink = field(default_factory=ProgressSink)
    claim: Callable[[RunSpec], bool] = lambda spec: True


class Executor(ABC):
    """Runs a list of pending runs and reports each outcome through ``hooks``."""

    @abstractmethod
    def execute(self, runs: list[RunSpec], hooks: RunHooks) -> None: ...


@dataclass
class LocalExecutor(Executor):
    """Runs in this process, one after another, sharing one loaded model and dataset.

    ``context_factory`` builds the expensive shared state lazily, so a study whose runs
    are all finished loads nothing. A run that crashes (a bug, out of memory during an
    attack, a library error) is retried ``retries`` times and then recorded as failed;
    the study goes on either way. A :class:`PrivtuneError` is the user's to fix, so it
    fails the run at once. Every failed attempt leaves its whole traceback under
    ``log_dir``, and its one line names the file.
    """

    context_factory: Callable[[], object]
    retries: int = 0
    log_dir: Path | None = None
    _context: object | None = field(default=None, init=False)

    def execute(self, runs: list[RunSpec], hooks: RunHooks) -> None:
        if not runs:
            return
        if self._context is None:
            with study_stage(hooks.progress, "loading model and data"):
                self._context = self.context_factory()
        for spec in runs:
            if hooks.claim(spec):
                self._execute_with_retries(spec, hooks)

    def _execute_with_retries(self, spec: RunSpec, hooks: RunHooks) -> None:
        from privtune.study.runner import execute_run

        progress = hooks.progress
        for attempt in range(1, self.retries + 2):
            hooks.started(spec)
            progress.run_started(spec.label)
            started = time.perf_counter()
            try:
                result = execute_run(self._context, spec, on_epoch=lambda e, m: hooks.epoch(spec, e, m),
                                     progress=progress)
            except PrivtuneError as e:
                line = failure_line(e, spec.run_id, attempt, self.log_dir)
                progress.run_finished(spec.label, "failed", time.perf_counter() - started, line)
                hooks.failed(spec, line)
                return
            except Exception as e:  # noqa: BLE001 - a crashed run must not end the study
                error = failure_line(e, spec.run_id, attempt, self.log_dir)
                _release_memory()
                last = attempt > self.retries
                progress.run_finished(spec.label, "failed" if last else "retrying",
                                      time.perf_counter() - started, error)
                if last:
                    hooks.failed(spec, error)
                    return
            else:
                seconds = time.perf_counter() - started
                hooks.finished(spec, result)
                progress.run_finished(spec.label, "done", seconds)
                return


def failure_line(error: Exception, run_id: str, attempt: int, log_dir: Path | None) -> str:
    """The one line a failed attempt of a run is stored and shown with: a user error's
    own line, or what crashed; with ``log_dir``, naming the file there that holds the
    whole traceback."""
    if isinstance(error, PrivtuneError):
        line = error.one_line()
    else:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        line = f"crashed on attempt {attempt}: {type(error).__name__}: {first}".rstrip(": ")
    if log_dir is None:
        return line
    path = write_traceback(error, log_dir, f"{run_id}-attempt{attempt}", unique=False)
    return f"{line.rstrip('.')} (traceback: {path})"


def _release_memory() -> None:
    """What a crashed attempt left on the heap or the GPU, freed before the next one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

