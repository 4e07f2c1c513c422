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
