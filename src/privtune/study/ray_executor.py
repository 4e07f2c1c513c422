"""Running a study's runs as Ray tasks, on one machine or a cluster.

Ray schedules, places (a GPU per run when the cluster has GPUs) and restarts tasks
whose worker died; privtune adds only what Ray cannot know: which errors are the
user's to fix (a :class:`PrivtuneError` comes back as a value and is never retried,
everything else is retried ``retries`` times), and that the driver alone writes the
database, so workers need no access to it. Each worker process keeps the study context
(model, data, base scores) it built for its first run, for the runs it gets after.

Ray is an optional extra: ``pip install 'privtune[ray]'``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from privtune.config import StudyConfig, config_hash, parse_config
from privtune.errors import PrivtuneError
from privtune.study.executor import Executor, RunHooks
from privtune.study.plan import RunSpec

_CONTEXTS: dict[str, object] = {}  # per worker process: study config hash -> StudyContext


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
    function (tests wrap it to inject faults).
    """

    cfg: StudyConfig
    address: str | None = None
    cpus_per_run: int = 1
    retries: int = 1
    show_progress: bool = True
    task: Callable[[str, RunSpec, int], dict] = execute_remote

    def execute(self, runs: list[RunSpec], hooks: RunHooks) -> None:
        if not runs:
            return
        ray = _import_ray()
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 and self.cfg.device != "cpu" else 0
        remote = ray.remote(self.task).options(num_cpus=self.cpus_per_run, num_gpus=gpus,
                                               max_retries=self.retries, retry_exceptions=True)
        # Workers run in their own directories: artifacts go to the driver's output_dir.
        cfg = self.cfg.model_copy(update={"output_dir": str(Path(self.cfg.output_dir).resolve())})
        config_json = json.dumps(cfg.model_dump())
        pending = {}
        for spec in runs:
            hooks.started(spec)
            pending[remote.remote(config_json, spec, self.cpus_per_run)] = spec
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), disable=not self.show_progress) as progress:
            bar = progress.add_task("ray", total=len(runs))
            failed = 0
            while pending:
                progress.update(bar, description=f"ray: {len(pending)} queued or running, {failed} failed")
                (ready,), _ = ray.wait(list(pending), num_returns=1)
                spec = pending.pop(ready)
                try:
                    outcome = ray.get(ready)
                except Exception as e:  # noqa: BLE001 - retries exhausted: record it, go on
                    outcome = {"error": _one_line(e)}
                if "error" in outcome:
                    failed += 1
                    hooks.failed(spec, outcome["error"])
                else:
                    hooks.finished(spec, outcome["result"])
                progress.advance(bar)


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
