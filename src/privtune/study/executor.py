"""Executors: who runs the planned runs, and where.

The driver (``run_study``) plans, skips runs the database already holds, and is the only
writer of the database. An executor only decides how pending runs get executed and hands
each result (or error) back through callbacks, so a distributed executor can replace the
local one without touching the store or the measures.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from privtune.errors import PrivtuneError
from privtune.study.plan import RunSpec


@dataclass
class RunHooks:
    """Callbacks from an executor back to the driver."""

    started: Callable[[RunSpec], None]
    epoch: Callable[[RunSpec, int, dict], None]
    finished: Callable[[RunSpec, dict], None]
    failed: Callable[[RunSpec, str], None]


class Executor(ABC):
    """Runs a list of pending runs and reports each outcome through ``hooks``."""

    @abstractmethod
    def execute(self, runs: list[RunSpec], hooks: RunHooks) -> None: ...


@dataclass
class LocalExecutor(Executor):
    """Runs in this process, one after another, sharing one loaded model and dataset.

    ``context_factory`` builds the expensive shared state lazily, so a study whose runs
    are all finished loads nothing.
    """

    context_factory: Callable[[], object]
    show_progress: bool = True
    _context: object | None = field(default=None, init=False)

    def execute(self, runs: list[RunSpec], hooks: RunHooks) -> None:
        from privtune.study.runner import execute_run

        if not runs:
            return
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), disable=not self.show_progress, transient=False) as progress:
            if self._context is None:
                setup = progress.add_task("loading model and data", total=1)
                self._context = self.context_factory()
                progress.update(setup, completed=1)
            overall = progress.add_task("study", total=len(runs))
            for spec in runs:
                hooks.started(spec)
                steps = _total_steps(self._context, spec)
                task = progress.add_task(f"{spec.label}", total=steps or 1)
                try:
                    result = execute_run(self._context, spec,
                                         on_epoch=lambda e, m, s=spec: hooks.epoch(s, e, m),
                                         on_step=lambda t=task: progress.advance(t))
                except PrivtuneError as e:
                    hooks.failed(spec, e.one_line())
                else:
                    hooks.finished(spec, result)
                progress.update(task, completed=steps or 1)
                progress.advance(overall)


def _total_steps(ctx, spec: RunSpec) -> int:
    if spec.is_base:
        return 0
    method = spec.config["method"]
    n = len(ctx.data.train)
    if spec.is_shadow:  # half of the population
        n = (len(ctx.data.members) + len(ctx.data.nonmembers)) // 2
    return method["epochs"] * -(-n // method["batch_size"])
