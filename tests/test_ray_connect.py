"""Connecting to Ray fails on one line, at once or after a stated time, never by hanging
or with Ray's traceback: a port nobody listens on, a host that does not exist, and
``--address auto`` on a machine without a cluster. Each test starts no cluster."""

import functools
import socket

import pytest

ray = pytest.importorskip("ray")

from privtune.errors import PrivtuneError  # noqa: E402
from privtune.study.plan import plan_study  # noqa: E402
from privtune.study.ray_executor import CONNECT_TIMEOUT_S, RayExecutor  # noqa: E402
from test_cli import assert_one_line_error, run_cli, write_study  # noqa: E402
from test_faults import fast_study  # noqa: E402
from test_ray_executor import finishes_within, recording_hooks, sleepy_task  # noqa: E402


@pytest.fixture(autouse=True)
def no_ray_left():
    assert not ray.is_initialized()  # another module's cluster would be joined instead
    yield
    ray.shutdown()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free once closed: nothing listens there


def test_a_port_nobody_listens_on_fails_at_once(tmp_path):
    port = closed_port()
    cfg = fast_study(tmp_path)
    executor = RayExecutor(cfg, address=f"127.0.0.1:{port}", task=sleepy_task)
    events = {}
    error = finishes_within(CONNECT_TIMEOUT_S + 20, lambda: executor.execute(plan_study(cfg), recording_hooks(events)))
    assert isinstance(error, PrivtuneError), error
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port} (--address): " in error.one_line()
    assert "ray status" in error.one_line() and events == {}


def test_auto_without_a_cluster_is_one_line_with_its_traceback_in_logs(tmp_path, monkeypatch):
    # However many clusters other processes on this machine run, Ray finds none.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray._private.services, "find_gcs_addresses", functools.lru_cache(lambda: []))
    monkeypatch.setattr(ray._private.services, "find_bootstrap_address", lambda temp_dir: None)
    cfg = fast_study(tmp_path)
    error = finishes_within(60, lambda: RayExecutor(cfg, address="auto", task=sleepy_task)
                            .execute(plan_study(cfg), recording_hooks({})))
    assert isinstance(error, PrivtuneError), error
    line = error.one_line()
    assert line.startswith("--address auto found no Ray cluster running on this machine (traceback: ")
    assert "ray start --head" in line
    logs = list((tmp_path / "out" / "logs").glob("ray-connect-*.txt"))
    assert len(logs) == 1 and "ConnectionError" in logs[0].read_text()


def test_a_host_that_does_not_exist_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    study = write_study(tmp_path)
    result = {}
    finishes_within(60, lambda: result.update(zip(("code", "out", "err"), run_cli(
        monkeypatch, capsys, "run", "--no-report", str(study), "--executor", "ray", "--address", "ray://bad:1"))))
    assert result["code"] == 2
    assert_one_line_error(result["code"], result["err"], "cannot reach the Ray cluster at ray://bad:1 (--address): "
                                                         "no host is named 'bad'")


def test_an_address_that_is_no_address_is_one_line(tmp_path):
    cfg = fast_study(tmp_path)
    with pytest.raises(PrivtuneError, match="'bad' is not auto, HOST:PORT or ray://HOST:PORT"):
        RayExecutor(cfg, address="bad", task=sleepy_task).execute(plan_study(cfg), recording_hooks({}))
