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

Ray's own failures are turned into one line each, their tracebacks into files under
``output_dir/logs``: an address that does not answer fails after
:data:`CONNECT_TIMEOUT_S` (Ray itself would retry for ever), a run that no node of the
cluster has the CPUs or GPU for fails before anything is submitted (Ray would queue it
for ever), and a cluster lost mid-study ends the study with the finished runs saved. A
run that crashed names its traceback and its Ray worker's log.

Ray is an optional extra: ``pip install 'privtune[ray]'``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from privtune.config import StudyConfig, config_hash, parse_config
from privtune.errors import PrivtuneError, write_traceback
from privtune.study.executor import Executor, RunHooks
from privtune.study.plan import RunSpec
from privtune.study.stages import study_stage

_CONTEXTS: dict[str, object] = {}  # per worker process: study config hash -> StudyContext

#: Seconds privtune waits for a Ray address (``--address`` or ``RAY_ADDRESS``) to answer.
CONNECT_TIMEOUT_S = 10.0


def execute_tracked(board, task: Callable[[str, RunSpec, int], dict], config_json: str, spec: RunSpec,
                    threads: int) -> dict:
    """The Ray task: tell the driver's :class:`StartBoard` the run has started (and where
    this worker logs), then run it."""
    import ray

    ray.get(board.start.remote(spec.run_id, _worker_log()))  # delivered even if the run kills its worker at once
    return task(config_json, spec, threads)


def _worker_log() -> str | None:
    """``node-ip:path`` of the file Ray sends this worker's stderr to (a crash's last words),
    or ``None`` where it cannot be told. Ray has no API for it; on Linux the worker's
    stderr descriptor names it."""
    import ray

    try:
        path = os.readlink("/proc/self/fd/2")
    except OSError:
        return None
    return f"{ray.util.get_node_ip_address()}:{path}" if os.path.isfile(path) else None


class StartBoard:
    """A small Ray actor (no CPU of its own) that knows which runs have started on a worker,
    and the log of the worker each one started on last.

    Ray's task states would tell the same, but its state API needs the dashboard, which
    privtune does not start; one call per task, one poll per half-second
    by the driver, is all this costs. A run whose worker died and which waits for its
    retry still counts as running.
    """

    def __init__(self) -> None:
        self._started: dict[str, str | None] = {}

    def start(self, run_id: str, worker_log: str | None = None) -> None:
        self._started[run_id] = worker_log

    def started(self) -> dict[str, str | None]:
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

    ``address``: ``None`` joins the cluster named by ``RAY_ADDRESS`` or already running on
    this machine, else starts a local Ray instance (Ray's own rule); ``"auto"`` joins the
    cluster this machine belongs to and fails without one; ``"host:6379"`` or
    ``"ray://host:10001"`` a remote one. ``task`` is the remote function (tests wrap it to
    inject faults); ``on_counts`` is called with the :class:`RunCounts` each time they
    change (tests watch them); ``say`` gets the line naming
    the cluster joined.
    """

    cfg: StudyConfig
    address: str | None = None
    cpus_per_run: int = 1
    retries: int = 1
    task: Callable[[str, RunSpec, int], dict] = execute_remote
    on_counts: Callable[[RunCounts], None] = lambda counts: None
    poll_seconds: float = 0.5
    say: Callable[[str], None] = print
    _connected_here: bool = field(default=False, init=False)  # else the caller's Ray, theirs to shut down

    def execute(self, runs: list[RunSpec], hooks: RunHooks) -> None:
        if not runs:
            return
        ray = _import_ray()
        log_dir = Path(self.cfg.output_dir) / "logs"
        if not ray.is_initialized():
            self.say(_connect(ray, self.address, log_dir))
            self._connected_here = True
        try:
            gpus = _gpus_per_run(ray, self.cfg.device)
            _check_fits(ray, self.cpus_per_run, gpus)  # before any run is stored or submitted
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
                self._collect(ray, pending, board, hooks, log_dir)
            finally:
                with contextlib.suppress(Exception):  # a lost cluster has lost the board too
                    ray.kill(board)
        except (ray.exceptions.RayError, ConnectionError) as e:  # from Ray itself, not from a run
            path = write_traceback(e, log_dir, "ray")
            if self._connected_here:
                with contextlib.suppress(Exception):
                    ray.shutdown()  # now, so Ray's own complaints about the lost tasks come before our line
            raise PrivtuneError(f"lost the Ray cluster during the study ({_first_line(e)}); finished runs are saved "
                                f"(traceback: {path})",
                                "check the cluster (ray status), restart it if it stopped, and rerun the same "
                                "command to resume") from None

    def _collect(self, ray, pending: dict, board, hooks: RunHooks, log_dir: Path) -> None:
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
                        outcome = {"error": _crash_line(e, write_traceback(e, log_dir, spec.run_id),
                                                        started.get(spec.run_id))}
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


def _crash_line(error: Exception, traceback_path: Path, worker_log: str | None) -> str:
    """A crashed run's line, naming where to read more: the traceback the driver got, and
    the log of the worker it last ran on (the only trace of a worker that was killed)."""
    where = f"traceback: {traceback_path}" + (f"; worker log: {worker_log}" if worker_log else "")
    return f"{_one_line(error)} ({where})"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _connect(ray, address: str | None, log_dir: Path) -> str:
    """Join (or start) Ray, failing on one line; return the line naming the cluster joined.

    A named address is probed first: Ray retries an address nobody answers at for ever.
    """
    # Ray's rule: RAY_ADDRESS overrides no address and "auto", not a concrete one.
    named = address if address not in (None, "auto") else os.environ.get("RAY_ADDRESS") or address
    if named and named != "auto":
        _probe(named, "--address" if named == address else "RAY_ADDRESS")
    # Ray's advice on a setting privtune does not use; it would be the study's first line.
    warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*", category=FutureWarning)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except Exception as e:  # noqa: BLE001 - whatever Ray raises, the user gets one line
        path = write_traceback(e, log_dir, "ray-connect")
        if named == "auto" and isinstance(e, ConnectionError):
            raise PrivtuneError(f"--address auto found no Ray cluster running on this machine (traceback: {path})",
                                "start one with `ray start --head`, or drop --address to let privtune start "
                                "a Ray for this study") from None
        raise PrivtuneError(f"could not {'join Ray at ' + named if named else 'start Ray'}: {_first_line(e)} "
                            f"(traceback: {path})",
                            "check the address (`ray status` on the head node), or drop --address to let "
                            "privtune start a Ray for this study") from None
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    where = getattr(ray.get_runtime_context(), "gcs_address", None) or named or "this machine"
    return (f"ray: cluster at {where}: {len(nodes)} node{'s' * (len(nodes) != 1)}, "
            f"{sum(n.get('CPU', 0) for n in nodes):g} CPUs, {sum(n.get('GPU', 0) for n in nodes):g} GPUs")


def _probe(address: str, given_as: str) -> None:
    """Fail on one line unless something listens at ``address`` (``host:port`` or
    ``ray://host:port``), waiting at most :data:`CONNECT_TIMEOUT_S`."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # an IPv6 literal
    if not sep or not host or not port.isdigit():
        raise PrivtuneError(f"{given_as} {address!r} is not auto, HOST:PORT or ray://HOST:PORT",
                            "for example --address auto, --address 10.0.0.5:6379 or --address ray://10.0.0.5:10001")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        if isinstance(e, socket.gaierror):
            why = f"no host is named {host!r}"
        elif isinstance(e, TimeoutError):
            why = f"no answer within {CONNECT_TIMEOUT_S:g} s"
        else:
            why = e.strerror or str(e)
        raise PrivtuneError(f"cannot reach the Ray cluster at {address} ({given_as}): {why}",
                            "check the host and port (`ray status` on the head node prints them: the cluster listens "
                            "on 6379, Ray Client on ray://HOST:10001), or drop --address to let privtune start a "
                            "Ray for this study") from None


def _gpus_per_run(ray, device: str) -> int:
    """One GPU per run where the cluster has any and ``device`` allows it, else none."""
    total = ray.cluster_resources().get("GPU", 0)
    if device.startswith("cuda") and total < 1:
        raise PrivtuneError(f"device {device} needs a GPU, but the Ray cluster has none",
                            "set device: auto (or cpu), or add a node with a GPU to the cluster")
    return 1 if total >= 1 and device != "cpu" else 0


def _check_fits(ray, cpus: int, gpus: int) -> None:
    """Fail on one line when no node of the cluster has ``cpus`` CPUs (and ``gpus`` GPUs):
    Ray would keep such runs queued for ever. Nodes an autoscaler may add later do not count."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        return
    largest = max((int(n.get("CPU", 0)) for n in nodes if n.get("GPU", 0) >= gpus), default=0)
    with_gpu = " with a GPU" if gpus else ""
    fix = (f"use --cpus-per-run {largest} or less, or add a node with {cpus} CPUs{with_gpu}" if largest
           else f"add a node with {cpus} CPUs{with_gpu} to the cluster")
    raise PrivtuneError(f"each run asks for {cpus} CPUs{' and a GPU' if gpus else ''} (--cpus-per-run {cpus}), but "
                        f"the largest node of the Ray cluster{with_gpu} has {largest}, so the runs would wait for ever",
                        fix)


def ray_missing() -> PrivtuneError:
    """The error for ``--executor ray`` without Ray installed."""
    return PrivtuneError("the ray executor needs Ray, which is not installed",
                         "pip install 'privtune[ray]', or drop --executor ray")


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ray_missing() from None
    return ray
