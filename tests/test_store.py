import math

from privtune.study.store import Store


def test_runs_round_trip_with_epochs_and_nan(tmp_path):
    store = Store(tmp_path / "r.db")
    store.start("abc", "s", "lora", "lora", {"model": "m", "seed": 3})
    store.add_epoch("abc", 0, {"ce_s_train": 2.0})
    store.add_epoch("abc", 1, {"ce_s_train": 1.5})
    store.finish("abc", {"final": {"ce_s_train": 1.5, "utility_ppl": math.inf}, "dp": None})
    store.close()
    (run,) = Store(tmp_path / "r.db").runs("s")
    assert run["status"] == "done" and run["label"] == "lora" and run["seed"] == 3
    assert [e["epoch"] for e in run["epochs"]] == [0, 1]
    assert run["final"]["utility_ppl"] is None


def test_restart_drops_partial_epochs_and_failed_runs_keep_their_error(tmp_path):
    store = Store(tmp_path / "r.db")
    store.start("abc", "s", "fft", "fft", {})
    store.add_epoch("abc", 1, {"x": 1})
    assert store.status("abc") == "running"
    store.start("abc", "s", "fft", "fft", {})
    store.fail("abc", "out of memory; lower the batch.")
    (run,) = store.runs()
    assert run["epochs"] == [] and run["status"] == "failed" and run["error"].startswith("out of memory")
    assert store.studies() == ["s"]


def test_a_finished_run_is_reused_only_on_the_data_digest_it_stored(tmp_path):
    from privtune.study.driver import stale_reason
    from privtune.study.plan import RunSpec

    store = Store(tmp_path / "r.db")
    fft, old = RunSpec("abc", "s", "fft", "fft", 0, {}), RunSpec("old", "s", "lora", "lora", 0, {})
    store.start("abc", "s", "fft", "fft", {})
    assert store.data_digest("abc") is None and stale_reason(store, fft, "d1" * 32) is None  # not finished
    store.finish("abc", {"digests": {"data": "d1" * 32}})
    store.start("old", "s", "lora", "lora", {})
    store.finish("old", {"final": {}})  # stored by a privtune that recorded no digest
    assert store.data_digest("abc") == "d1" * 32 and store.data_digest("missing") is None
    assert stale_reason(store, fft, "d1" * 32) is None
    assert stale_reason(store, fft, "e2" * 32) == (
        "run fft: data changed since it was stored (digest d1d1d1d1d1d1 -> e2e2e2e2e2e2); retraining")
    assert "stored without a data digest" in stale_reason(store, old, "d1" * 32)
