"""Running a study's runs as Ray tasks, on one machine or a cluster.

Ray schedules, places (a GPU per run when the cluster has GPUs) and restarts tasks
whose worker died; privtune adds only what Ray cannot know: which errors are the
user's to fix (a :class:`PrivtuneError` comes back as a value and is never retried,
everything else is retried ``retries`` times), and that the driver alone writes the
database, so workers need no access to it. Each worker process keeps the study context
(model, data, base scores) it built for its first run, for the runs it gets after. The
progress line counts runs queued, running, done and failed: each task reports its start
to a small actor the driver polls. The driver reports each run's start and end to the
study's progress sink; the stages of a run happen in its worker and are stored with its
result (``timing``), not shown live.

Ray is an optional extra: ``pip install 'privtune[ray]'``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from privtune.config import StudyConfig, config_hash, parse_config
from privtune.errors import PrivtuneError
from privtune.study.executor import Executor, RunHooks
from privtune.study.plan import RunSpec
from privtune.study.stages import study_stage

_CONTEXTS: dict[str, object] = {}  # per worker process: study config hash -> StudyContext


def execute_tracked(board, task: Callable[[str, RunSpec, int], dict], config_json: str, spec: RunSpec,
                    threads: int) -> dict:
    """The Ray task: tell the driver's :class:`StartBoard` the run has started, then run it."""
    board.start.remote(spec.run_id)
    return task(config_json, spec, threads)


class StartBoard:
    """A small Ray actor (no CPU of its own) that knows which runs have started on a worker.

    Ray's task states would tell the same, but its state API needs the dashboard, which
    privtune does not start; one fire-and-forget call per task, one poll per half-second
    by the driver, is all this costs. A run whose worker died and which waits for its
    retry still counts as running.
    """

    def __init__(self) -> None:
        self._started: set[str] = set()

    def start(self, run_id: str) -> None:
        self._started.add(run_id)

    def started(self) -> set[str]:
        return self._started


@dataclass(frozen=True)
class RunCounts:
    """Where the study's runs are, across the cluster."""

    queued: int
    running: int
    done: int
    failed: int


def execute_remote(config_json: str, spec: RunSpec, threads: int) -> dict:
    """A Ray task: one run, its result or ``{"error": one line}`` for a user error."""
    import torch

    from privtune.study.runner import StudyContext, execute_run

    torch.set_num_threads(threads)
    raw = json.loads(config_json)
    key = config_hash(raw)
    try:
        if key not in _CONTEXTS:
            _CONTEXTS.clear()  # one study at a time per worker: free the previous model
            _CONTEXTS[key] = StudyContext.build(parse_config(raw))
        return {"result": execute_run(_CONTEXTS[key], spec)}
    except PrivtuneError as e:
        return {"error": e.one_line()}


@dataclass
class RayExecutor(Executor):
    """Submits every pending run at once; Ray runs as many as the cluster's resources allow.

    ``address``: ``None`` starts a local Ray instance, ``"auto"`` joins the cluster this
    machine belongs to, ``"ray://host:10001"`` a remote one. ``task`` is the remote
    function (tests wrap it to inject faults); ``on_counts`` is called with the
    :class:`RunCounts` each time they change (tests watch them).
    """

    cfg: StudyConfig
    address: str | None = None
    cpus_per_run: int = 1
    retries: int = 1
    task: Callable[[str, RunSpec, int], dict] = execute_remote
    on_counts: Callable[[RunCounts], None] = lambda counts: None
    poll_seconds: float = 0.5

    def execute(self, runs: list[RunSpec], hooks: RunHooks) -> None:
        if not runs:
            return
        ray = _import_ray()
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 and self.cfg.device != "cpu" else 0
        remote = ray.remote(execute_tracked).options(num_cpus=self.cpus_per_run, num_gpus=gpus,
                                                     max_retries=self.retries, retry_exceptions=True)
        board = ray.remote(num_cpus=0)(StartBoard).remote()
        ray.get(board.started.remote())  # up before the first task, so the counts are right from the start
        # Workers run in their own directories: artifacts go to the driver's output_dir.
        cfg = self.cfg.model_copy(update={"output_dir": str(Path(self.cfg.output_dir).resolve())})
        config_json = json.dumps(cfg.model_dump())
        pending = {}
        for spec in runs:
            if hooks.claim(spec):  # stored as queued; running once its task reports its start
                pending[remote.remote(board, self.task, config_json, spec, self.cpus_per_run)] = spec
        try:
            self._collect(ray, pending, board, hooks)
        finally:
            ray.kill(board)

    def _collect(self, ray, pending: dict, board, hooks: RunHooks) -> None:
        """Hand each result to ``hooks`` as it comes, reporting progress meanwhile: each
        run's start and end, and the runs finished as the ``ray`` stage of the study."""
        progress = hooks.progress
        with study_stage(progress, "ray", total=len(pending)) as finished:
            done = failed = 0
            shown = RunCounts(len(pending), 0, 0, 0)  # submitted, none seen starting yet
            self.on_counts(shown)
            seen: dict[str, float] = {}  # run id -> when its start was seen
            while True:
                # The board first, then the results: a run whose successor on the same worker
                # has reported its start has finished by then, so it is not counted running.
                started = ray.get(board.started.remote())
                for spec in pending.values():
                    if spec.run_id in started and spec.run_id not in seen:
                        seen[spec.run_id] = time.perf_counter()
                        hooks.started(spec)  # stored as running from now
                        progress.run_started(spec.label)
                for ready in ray.wait(list(pending), num_returns=len(pending), timeout=0)[0] if pending else []:
                    spec = pending.pop(ready)
                    try:
                        outcome = ray.get(ready)
                    except Exception as e:  # noqa: BLE001 - retries exhausted: record it, go on
                        outcome = {"error": _one_line(e)}
                    if spec.run_id not in seen:  # started and ended between two polls
                        seen[spec.run_id] = time.perf_counter()
                        progress.run_started(spec.label)
                    seconds = time.perf_counter() - seen[spec.run_id]
                    if "error" in outcome:
                        failed += 1
                        hooks.failed(spec, outcome["error"])
                        progress.run_finished(spec.label, "failed", seconds, outcome["error"])
                    else:
                        done += 1
                        hooks.finished(spec, outcome["result"])
                        progress.run_finished(spec.label, "done", seconds)
                    finished.advance()
                queued = sum(spec.run_id not in started for spec in pending.values())
                counts = RunCounts(queued, len(pending) - queued, done, failed)
                if counts != shown:
                    self.on_counts(counts)
                    shown = counts
                if not pending:
                    return
                ray.wait(list(pending), num_returns=1, timeout=self.poll_seconds)  # sleep until one is ready


def _one_line(error: Exception) -> str:
    """The root cause of a Ray task failure, without Ray's wrapping traceback."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"crashed after all retries: {type(cause).__name__}: {text[-1] if text else ''}".rstrip(": ")


def _import_ray():
    try:
        import ray
    except ImportError:
        raise PrivtuneError("the ray executor needs Ray, which is not installed",
                            "pip install 'privtune[ray]', or drop --executor ray") from None
    return ray
