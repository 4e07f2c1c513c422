"""What grows with the records: stored results linearly, the report page not at all.

Per-record statistics go to ``records.json.gz`` beside the report and are read from the
database only when used (``Store.runs(per_record=False)``); the JSON export and the page
keep the same size whatever the number of records (issue 20).
"""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import numpy as np

from privtune.config import parse_config
from privtune.report import html as report_html
from privtune.report import write_json, write_report
from privtune.report.differences import run_difference
from privtune.report.export import RECORDS_FORMAT
from privtune.study.store import Store, StoredRecordStats, _json

FIXTURE = Path(__file__).parent / "fixtures" / "runs_example.json"


def synthetic_stats(n: int, seed: int) -> dict:
    """``record_stats`` of ``n`` records (half members), two records per person."""
    rng = np.random.default_rng(seed)

    def level(scale: float) -> dict:
        tokens = rng.integers(1, 60, n)
        return {"stat": rng.normal(size=n).tolist(), "loglik": (-scale * tokens * rng.random(n)).tolist(),
                "tokens": tokens.tolist()}

    return {"record": level(4.0), "sensitive": level(6.0), "n_members": n // 2,
            "person": (np.arange(n) // 2).tolist(), "selection_half": (np.arange(n) % 4 < 2).tolist()}


def runs_with_records(n: int) -> list[dict]:
    """Two finished runs of the example study, given per-record statistics of ``n`` records."""
    runs = [r for r in json.loads(FIXTURE.read_text()) if r["label"] in ("base", "fft")]
    for i, run in enumerate(runs):
        run["record_stats"] = synthetic_stats(n, i)
    return runs


def test_the_page_and_json_keep_their_size_and_the_records_go_beside_them(tmp_path):
    sizes = {}
    for n in (50, 5000):
        runs = runs_with_records(n)
        out = tmp_path / str(n)
        page = write_report(copy.deepcopy(runs), out, title="t", meta={})
        exported = write_json(runs, out / "runs.json")
        sizes[n] = page.stat().st_size, exported.stat().st_size
        with gzip.open(out / "records.json.gz", "rt", encoding="utf-8") as f:
            records = json.load(f)
        assert records["format"] == RECORDS_FORMAT
        assert [(e["run_id"], e["label"], e["record_stats"]) for e in records["runs"]] == [
            (r["run_id"], r["label"], r["record_stats"]) for r in runs]  # what the export used to hold
        assert json.loads(exported.read_text()) == [{k: v for k, v in r.items() if k != "record_stats"} for r in runs]
        assert 'href="records.json.gz"' in page.read_text()
        assert (out / "records.json.gz").stat().st_mode & 0o777 == 0o600  # private, as every output
    # 100x the records: the same page and export, give or take the verdict's interval digits
    assert abs(sizes[5000][0] - sizes[50][0]) < 2_000
    assert sizes[5000][1] == sizes[50][1]


def test_a_report_without_per_record_statistics_writes_no_records_file(tmp_path, monkeypatch):
    monkeypatch.setattr(report_html, "report_figures", lambda runs: [])  # the figures take no part here
    runs = runs_with_records(20)
    write_report(runs, tmp_path, title="t", meta={})
    assert (tmp_path / "records.json.gz").exists()
    for run in runs:
        del run["record_stats"]
    page = write_report(runs, tmp_path, title="t", meta={}).read_text()
    assert not (tmp_path / "records.json.gz").exists() and "records.json.gz" not in page


def test_the_store_reads_per_record_statistics_only_when_used(tmp_path):
    store = Store(tmp_path / "privtune.db")
    stored = {}
    for label, seed in (("base", 0), ("fft", 1)):
        stored[label] = synthetic_stats(200, seed)
        store.start(label, "s", label, label, {"model": "tiny-llama"})
        store.finish(label, {"final": {"leakage_gain": 0.1}, "record_stats": stored[label]})
    store.start("old", "s", "old", "fft", {"model": "tiny-llama"})
    store.finish("old", {"final": {}})  # stored without them
    eager = {r["label"]: r for r in store.runs("s")}
    lazy = {r["label"]: r for r in store.runs("s", per_record=False)}
    store.close()
    assert "record_stats" not in lazy["old"]
    stats = lazy["fft"]["record_stats"]
    assert isinstance(stats, StoredRecordStats) and stats._stats is None  # not parsed with the run
    assert {k: v for k, v in lazy["fft"].items() if k != "record_stats"} == {
        k: v for k, v in eager["fft"].items() if k != "record_stats"}
    assert json.loads(_json(dict(stats))) == json.loads(_json(stored["fft"])) == json.loads(_json(
        eager["fft"]["record_stats"]))
    assert run_difference(lazy["fft"], lazy["base"], "leakage_gain") == run_difference(
        eager["fft"], eager["base"], "leakage_gain")


def test_a_stored_result_grows_linearly_with_the_records(tmp_path):
    """On a tiny model, the base run's stored result at ~4x the records: per-record
    statistics the same bytes per record, and nothing that grows faster than the records."""
    from privtune.study.plan import plan_study
    from privtune.study.runner import StudyContext, execute_run

    sizes = {}
    for people in (25, 100):
        cfg = parse_config({
            "name": "scale", "model": "tiny-llama", "output_dir": str(tmp_path / str(people)),
            "data": {"source": "customer-sim", "n_individuals": people, "max_length": 48},
            "canaries": {"enabled": False}, "attacks": {"extraction": {"enabled": False}},
            "methods": [{"method": "fft"}], "precision": "fp32", "eval_batch_size": 32})
        ctx = StudyContext.build(cfg)
        base = next(spec for spec in plan_study(cfg) if spec.is_base)
        result = execute_run(ctx, base)
        n = len(ctx.data.members) + len(ctx.data.nonmembers)
        per_record = len(_json(result["record_stats"]))
        sizes[n] = per_record, len(_json(result)) - per_record
    (small, (stats_small, rest_small)), (large, (stats_large, rest_large)) = sorted(sizes.items())
    assert large > 3 * small
    assert 0.9 < (stats_large / large) / (stats_small / small) < 1.1
    assert rest_large / large < rest_small / small  # the rest: mostly fixed (ROC curves are thinned)
