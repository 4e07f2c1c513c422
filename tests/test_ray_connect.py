"""Connecting to Ray fails on one line, never with Ray's traceback: ``--address auto`` on a
machine without a cluster. Each test starts no cluster."""

import functools

import pytest

ray = pytest.importorskip("ray")

from privtune.errors import PrivtuneError  # noqa: E402
from privtune.study.plan import plan_study  # noqa: E402
from privtune.study.ray_executor import RayExecutor  # noqa: E402
from test_faults import fast_study  # noqa: E402
from test_ray_executor import finishes_within, recording_hooks, sleepy_task  # noqa: E402


@pytest.fixture(autouse=True)
def no_ray_left():
    assert not ray.is_initialized()  # another module's cluster would be joined instead
    yield
    ray.shutdown()


def test_auto_without_a_cluster_is_one_line_with_its_traceback_in_logs(tmp_path, monkeypatch):
    # However many clusters other processes on this machine run, Ray finds none.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray._private.services, "find_gcs_addresses", functools.lru_cache(lambda: []))
    monkeypatch.setattr(ray._private.services, "find_bootstrap_address", lambda temp_dir: None)
    cfg = fast_study(tmp_path)
    error = finishes_within(60, lambda: RayExecutor(cfg, address="auto", show_progress=False, task=sleepy_task)
                            .execute(plan_study(cfg), recording_hooks({})))
    assert isinstance(error, PrivtuneError), error
    line = error.one_line()
    assert line.startswith("--address auto found no Ray cluster running on this machine (traceback: ")
    assert "ray start --head" in line
    logs = list((tmp_path / "out" / "logs").glob("ray-connect-*.txt"))
    assert len(logs) == 1 and "ConnectionError" in logs[0].read_text()

