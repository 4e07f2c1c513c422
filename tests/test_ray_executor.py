"""The Ray executor on a local two-CPU Ray: same rows as the local executor, a killed
worker is retried, a user error is not."""

import os
import signal
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from privtune.study.driver import open_store, run_study  # noqa: E402
from privtune.study.ray_executor import RayExecutor, execute_remote  # noqa: E402
from test_faults import fast_study  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the fault-injecting tasks below
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def finals(cfg) -> dict:
    store = open_store(cfg)
    try:
        return {r["label"]: (r["status"], r.get("final")) for r in store.runs(cfg.name)}
    finally:
        store.close()


def test_ray_study_gives_the_rows_of_the_local_executor(tmp_path):
    local = fast_study(tmp_path / "local", seeds=[0, 1])
    on_ray = fast_study(tmp_path / "ray", seeds=[0, 1], save_artifacts=True)
    assert run_study(local, show_progress=False).failed == {}
    outcome = run_study(on_ray, executor=RayExecutor(on_ray), show_progress=False)
    assert outcome.failed == {} and len(outcome.done) == 7  # base + 3 methods x 2 seeds
    expected, got = finals(local), finals(on_ray)
    assert set(got) == set(expected)
    for label, (status, final) in expected.items():
        assert got[label][0] == status == "done"
        assert got[label][1] == pytest.approx(final, rel=1e-4, abs=1e-6), label
    store = open_store(on_ray)
    artifacts = [r["artifact"] for r in store.runs(on_ray.name) if r["label"] != "base"]
    store.close()
    assert len(artifacts) == 6 and all((Path(a) / "config.json").exists() or (Path(a) / "adapter_config.json").exists()
                                       for a in artifacts)
    # Rerun: everything is in the database, Ray is not even asked.
    assert run_study(on_ray, executor=RayExecutor(on_ray)).skipped == list(got)


def kill_worker_once(markers: Path):
    """A task that dies by SIGKILL the first time it gets the lora run, as an OOM-killed worker would."""
    def task(config_json, spec, threads):
        if spec.label == "lora" and not any(markers.glob("lora-*")):
            (markers / f"lora-{os.getpid()}").touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return execute_remote(config_json, spec, threads)
    return task


def count_attempts(markers: Path):
    """A task that leaves one file per attempt."""
    def task(config_json, spec, threads):
        (markers / f"{spec.label}-{os.urandom(4).hex()}").touch()
        return execute_remote(config_json, spec, threads)
    return task


@pytest.fixture
def markers(tmp_path):
    path = tmp_path / "markers"
    path.mkdir()
    return path


def test_killed_worker_is_retried_and_the_study_completes(tmp_path, markers):
    cfg = fast_study(tmp_path)
    executor = RayExecutor(cfg, retries=1, task=kill_worker_once(markers))
    outcome = run_study(cfg, executor=executor)
    assert outcome.failed == {}
    assert len(list(markers.glob("lora-*"))) == 1  # it did die once
    assert all(status == "done" for status, _ in finals(cfg).values())


def test_user_error_fails_at_once_and_the_rest_finish(tmp_path, markers):
    cfg = fast_study(tmp_path, methods=[{"method": "lora", "lora": {"r": 2}},
                                        {"method": "dp-lora", "dp": {"target_epsilon": 4.0, "delta": 0.5}}])
    executor = RayExecutor(cfg, retries=2, task=count_attempts(markers))
    outcome = run_study(cfg, executor=executor)
    assert "delta" in outcome.failed["dp-lora"] and sorted(outcome.done) == ["base", "lora"]
    assert len(list(markers.glob("dp-lora-*"))) == 1  # not retried


def sleepy_task(config_json, spec, threads):
    """A stand-in run: a second of work, and an error for lora."""
    import time

    time.sleep(1.0)
    return {"error": "boom"} if spec.label == "lora" else {"result": {"label": spec.label}}


def test_progress_counts_runs_queued_running_done_and_failed(tmp_path):
    from privtune.study.executor import RunHooks
    from privtune.study.plan import plan_study
    from privtune.study.progress import ProgressSink
    from privtune.study.ray_executor import RunCounts

    cfg = fast_study(tmp_path)
    runs = plan_study(cfg)  # base, fft, lora, lora-r4: four runs on two CPUs
    seen, outcomes, events = [], {}, []

    class Recorder(ProgressSink):
        def run_started(self, run):
            events.append(("started", run))

        def run_finished(self, run, status, seconds, error=None):
            events.append((status, run))

    hooks = RunHooks(started=lambda s: None, epoch=lambda s, e, m: None,
                     finished=lambda s, r: outcomes.update({s.label: "done"}),
                     failed=lambda s, e: outcomes.update({s.label: e}), progress=Recorder())
    RayExecutor(cfg, task=sleepy_task, on_counts=seen.append, poll_seconds=0.1).execute(runs, hooks)
    assert outcomes == {"base": "done", "fft": "done", "lora": "boom", "lora-r4": "done"}
    assert seen[0] == RunCounts(queued=4, running=0, done=0, failed=0)  # nothing has started yet
    assert seen[-1] == RunCounts(queued=0, running=0, done=3, failed=1)
    assert all(c.queued + c.running + c.done + c.failed == 4 and c.running <= 2 for c in seen)
    assert any(c.running == 2 for c in seen)  # two CPUs: two at a time
    for before, after in zip(seen, seen[1:]):
        assert after.queued <= before.queued and after.done + after.failed >= before.done + before.failed
    # the progress sink hears each run start, then end, with its outcome
    for label in ("base", "fft", "lora", "lora-r4"):
        mine = [what for what, run in events if run == label]
        assert mine == ["started", "failed" if label == "lora" else "done"]


def half_second_task(config_json, spec, threads):
    """A Ray task that only takes its time."""
    import time

    time.sleep(0.5)
    return {"result": {}}


def test_runs_are_stored_as_queued_until_a_worker_starts_them(tmp_path):
    from privtune.study.executor import RunHooks
    from privtune.study.plan import plan_study
    from privtune.study.store import Store

    cfg = fast_study(tmp_path)
    runs = plan_study(cfg)  # four runs on two CPUs
    store = Store(tmp_path / "r.db")
    hooks = RunHooks(started=lambda s: store.start(s.run_id, s.study, s.label, s.method, s.config, s.role),
                     epoch=lambda s, e, m: None, finished=lambda s, r: store.finish(s.run_id, r),
                     failed=lambda s, e: store.fail(s.run_id, e),
                     claim=lambda s: store.claim(s.run_id, s.study, s.label, s.method, s.config, s.role,
                                                 status="queued") is None)
    seen = []

    def stored(counts):
        statuses = [store.status(s.run_id) for s in runs]
        seen.append((counts, {k: statuses.count(k) for k in ("queued", "running", "done")}))

    RayExecutor(cfg, task=half_second_task, on_counts=stored, poll_seconds=0.1).execute(
        runs, hooks)
    store.close()
    assert seen[0][1] == {"queued": 4, "running": 0, "done": 0}  # submitted, none started
    for counts, statuses in seen:
        assert statuses == {"queued": counts.queued, "running": counts.running, "done": counts.done}
    assert any(counts.running == 2 for counts, _ in seen) and seen[-1][1]["done"] == 4


def finishes_within(seconds: float, call) -> BaseException | None:
    """Run ``call`` in a thread; the exception it raised (``None``: none), failing the test
    if it is still running after ``seconds`` (as a run Ray can never place would be)."""
    import threading

    box = {}
    thread = threading.Thread(target=lambda: box.update(error=_raised(call)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return box["error"]


def _raised(call) -> BaseException | None:
    try:
        call()
    except BaseException as e:  # noqa: BLE001 - handed to the test
        return e
    return None


def recording_hooks(events: dict):
    from privtune.study.executor import RunHooks

    return RunHooks(started=lambda s: events.setdefault("started", []).append(s.label),
                    epoch=lambda s, e, m: None,
                    finished=lambda s, r: events.setdefault("done", []).append(s.label),
                    failed=lambda s, e: events.setdefault("failed", {}).update({s.label: e}))


def test_a_run_no_node_can_hold_fails_at_once_on_one_line(tmp_path):
    from privtune.errors import PrivtuneError
    from privtune.study.plan import plan_study

    cfg = fast_study(tmp_path)
    events = {}
    executor = RayExecutor(cfg, cpus_per_run=4, task=sleepy_task)  # the cluster has 2 CPUs
    error = finishes_within(60, lambda: executor.execute(plan_study(cfg), recording_hooks(events)))
    assert isinstance(error, PrivtuneError), error
    assert "asks for 4 CPUs" in str(error) and "has 2" in str(error) and "--cpus-per-run 2 or less" in str(error)
    assert events == {}  # nothing stored or submitted
    on_cuda = fast_study(tmp_path, device="cuda")
    error = finishes_within(60, lambda: RayExecutor(on_cuda, task=sleepy_task).execute(
        plan_study(on_cuda), recording_hooks(events)))
    assert isinstance(error, PrivtuneError) and "needs a GPU, but the Ray cluster has none" in str(error), error
    assert events == {}


class DyingBoard:
    """A start board whose process dies on its third poll, as every actor does when its
    cluster is stopped (``ray stop``) under a running study."""

    def __init__(self):
        self.polls = 0

    def start(self, run_id, worker_log=None):
        pass

    def started(self):
        self.polls += 1
        if self.polls == 3:
            os._exit(1)
        return {}


def test_a_cluster_lost_mid_study_ends_it_on_one_line_with_the_traceback_in_logs(tmp_path, monkeypatch):
    from privtune.errors import PrivtuneError
    from privtune.study import ray_executor
    from privtune.study.plan import plan_study

    monkeypatch.setattr(ray_executor, "StartBoard", DyingBoard)
    cfg = fast_study(tmp_path)
    executor = RayExecutor(cfg, task=sleepy_task, poll_seconds=0.1)
    error = finishes_within(60, lambda: executor.execute(plan_study(cfg), recording_hooks({})))
    assert isinstance(error, PrivtuneError), error
    line = error.one_line()
    assert line.startswith("lost the Ray cluster during the study (ActorDiedError: ") and "\n" not in line
    assert "finished runs are saved" in line and "rerun the same command to resume" in line
    logs = list((Path(cfg.output_dir) / "logs").glob("ray-*.txt"))
    assert len(logs) == 1 and f"(traceback: {logs[0]})" in line
    assert "ActorDiedError" in logs[0].read_text() and (logs[0].stat().st_mode & 0o777) == 0o600


def crash_or_die(config_json, spec, threads):
    """lora raises, lora-r4 kills its own worker, as the OOM killer would."""
    if spec.label == "lora":
        raise RuntimeError("simulated bug\nin two lines")
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_crashed_run_names_its_traceback_and_its_worker_log(tmp_path):
    from privtune.study.plan import plan_study

    cfg = fast_study(tmp_path)
    events = {}
    runs = [spec for spec in plan_study(cfg) if spec.label in ("lora", "lora-r4")]  # one per CPU
    RayExecutor(cfg, retries=0, task=crash_or_die, poll_seconds=0.1).execute(
        runs, recording_hooks(events))
    assert sorted(events["failed"]) == ["lora", "lora-r4"]
    for label, error in events["failed"].items():
        assert "\n" not in error
        traceback_path = error.split("(traceback: ")[1].split(";")[0]
        worker_log = error.split("; worker log: ")[1].rstrip(")")
        assert Path(traceback_path).parent == Path(cfg.output_dir) / "logs"
        node, path = worker_log.split(":", 1)
        assert node == ray.util.get_node_ip_address() and Path(path).name.startswith("worker-")
        assert Path(path).is_file()
    raised, killed = events["failed"]["lora"], events["failed"]["lora-r4"]
    assert raised.startswith("crashed after all retries: RuntimeError: in two lines (traceback: ")
    assert "simulated bug" in Path(raised.split("(traceback: ")[1].split(";")[0]).read_text()
    assert killed.startswith("crashed after all retries: ") and "(traceback: " in killed
