"""Auditing models privtune did not train: the exported data, and audits of saved runs
that must reproduce the runs' own measurements."""

import json

import pytest

from privtune.config import parse_config
from privtune.data.loaders import load_records
from privtune.errors import PrivtuneError
from privtune.study.dataset import build_study_records
from privtune.study.driver import audit_external, open_store, run_study
from privtune.study.store import latest_per_label
from test_cli import assert_one_line_error, run_cli


def tiny_study(tmp_path, **overrides):
    raw = {
        "name": "tiny", "model": "tiny-llama", "output_dir": str(tmp_path / "out"),
        "data": {"source": "customer-sim", "n_individuals": 12, "max_length": 64},
        "canaries": {"repetitions": [1, 4], "n_reference": 1, "n_candidates": 32},
        "attacks": {"extraction": {"max_spans_per_type": 2, "n_samples": 1, "pii_candidates": 3}},
        "train": {"epochs": 1, "batch_size": 4, "physical_batch_size": 4, "lr": 3e-3},
        "methods": [{"method": "fft"}, {"method": "lora", "lr": 3e-2, "lora": {"r": 4}}],
        "precision": "fp32", "eval_batch_size": 8,
    }
    raw.update(overrides)
    return parse_config(raw)


def test_export_writes_the_study_split_in_the_loader_format(tmp_path, monkeypatch, capsys):
    cfg = tiny_study(tmp_path, backdoor={"enabled": True, "fraction": 0.2, "n_eval": 2})
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(cfg.model_dump()))
    code, out, _ = run_cli(monkeypatch, capsys, "data", "export", str(path), "--out", str(tmp_path / "data"))
    assert code == 0 and "train.jsonl" in out

    expected = build_study_records(cfg)
    assert f"records digest: {expected.digest()}" in out  # what every run of the study stores
    for name, records in (("train", expected.train), ("members", expected.members),
                          ("nonmembers", expected.nonmembers)):
        loaded = load_records(tmp_path / "data" / f"{name}.jsonl")
        assert [(r.id, r.individual, r.text, r.spans) for r in loaded] == [
            (r.id, r.individual, r.text, r.spans) for r in records]
    train = load_records(tmp_path / "data" / "train.jsonl")
    assert any(r.id.startswith("canary") for r in train)  # canary copies are trained on too
    assert sum(cfg.backdoor.trigger in r.text for r in train) == len(expected.poisoned) > 0
    assert not {r.individual for r in expected.members} & {r.individual for r in expected.nonmembers}


@pytest.mark.slow
def test_audit_of_saved_runs_reproduces_their_measurements(tmp_path):
    cfg = tiny_study(tmp_path)
    assert run_study(cfg, show_progress=False).failed == {}
    store = open_store(cfg)
    runs = {r["label"]: r for r in store.runs("tiny")}
    store.close()

    # fft saves a whole checkpoint directory, lora a PEFT adapter: both load paths.
    for label in ("fft", "lora"):
        audited = audit_external(cfg, runs[label]["artifact"], label=f"{label}-audit")
        store = open_store(cfg)
        audit = next(r for r in store.runs("tiny") if r["label"] == audited)
        store.close()
        assert audit["role"] == "audit" and audit["status"] == "done"
        for key in ("ce_s_train", "ce_s_test", "leakage_gain", "utility_ce"):
            assert audit["final"][key] == pytest.approx(runs[label]["final"][key], rel=1e-5), key
        aucs = {(e["attack"], e["level"]): e["auc"] for e in runs[label]["attacks"]["mia"]}
        for entry in audit["attacks"]["mia"]:
            assert entry["auc"] == pytest.approx(aucs[entry["attack"], entry["level"]], abs=1e-9)
        assert [e["exposure"] for e in audit["exposure"]] == pytest.approx(
            [e["exposure"] for e in runs[label]["exposure"]], rel=1e-4)
        # The audit reports the same proof: method and rank bounds of every canary.
        assert [(e["exposure_method"], e["rank_low"], e["rank_high"]) for e in audit["exposure"]] == [
            (e["exposure_method"], e["rank_low"], e["rank_high"]) for e in runs[label]["exposure"]]
        assert audit["efficiency"]["trainable_params"] == runs[label]["efficiency"]["trainable_params"]


def test_audit_measures_the_base_run_first_and_rejects_a_taken_label(tmp_path, monkeypatch, capsys):
    cfg = tiny_study(tmp_path, attacks={"extraction": {"enabled": False}}, canaries={"enabled": False})
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(cfg.model_dump()))
    # A registered model of the same tokenizer, never trained on the study's data.
    code, out, err = run_cli(monkeypatch, capsys, "audit", "tiny-llama", str(path), "--label", "untrained")
    assert code == 0, err
    assert "untrained" in out
    assert "untrained" in (tmp_path / "out" / "reports" / "tiny" / "report.html").read_text()
    store = open_store(cfg)
    runs = {r["label"]: r for r in store.runs("tiny")}
    store.close()
    assert set(runs) == {"base", "untrained"}
    assert runs["untrained"]["final"]["leakage_gain"] == pytest.approx(0.0, abs=1e-6)

    code, _, err = run_cli(monkeypatch, capsys, "audit", "tiny-llama", str(path), "--label", "lora")
    assert_one_line_error(code, err, "audit label 'lora'", "--label")


def test_audit_of_a_model_with_another_tokenizer_fails_and_keeps_the_database(tmp_path, monkeypatch, capsys):
    cfg = tiny_study(tmp_path, model="tiny-gpt-neox", attacks={"extraction": {"enabled": False}},
                     canaries={"enabled": False})
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(cfg.model_dump()))
    other = tmp_path / "other"
    from transformers import AutoTokenizer

    from privtune.models.tiny import tiny_model, tiny_tokenizer
    tiny_model("llama").save_pretrained(other)
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<extra-token>"])
    tokenizer.save_pretrained(other)
    assert AutoTokenizer.from_pretrained(other).get_vocab() != tiny_tokenizer().get_vocab()
    capsys.readouterr()  # drop what saving printed

    code, _, err = run_cli(monkeypatch, capsys, "audit", str(other), str(path))
    assert_one_line_error(code, err, "audited model", "different tokenizer", "(traceback: ")
    store = open_store(cfg)
    runs = {r["label"]: r for r in store.runs("tiny")}
    store.close()
    assert {label: r["status"] for label, r in runs.items()} == {"base": "done", "other": "failed"}
    log = tmp_path / "out" / "logs" / f"{runs['other']['run_id']}-attempt1.txt"  # the line names it
    assert f"(traceback: {log})" in runs["other"]["error"] and "check_same_tokenizer" in log.read_text()


def test_latest_run_of_each_label_supersedes_older_ones():
    runs = [{"label": "base", "n": 0}, {"label": "fft", "n": 1}, {"label": "fft", "n": 2}, {"label": "lora", "n": 3}]
    assert [r["n"] for r in latest_per_label(runs)] == [0, 2, 3]


def test_unknown_audited_model_is_a_one_line_error(tmp_path):
    cfg = tiny_study(tmp_path)
    with pytest.raises(PrivtuneError, match="unknown model"):
        audit_external(cfg, str(tmp_path / "no-such-dir"))


def test_a_crashed_audit_is_a_bug_exit_1_with_its_log(tmp_path, monkeypatch, capsys):
    from privtune.study import external

    cfg = tiny_study(tmp_path, model="tiny-gpt-neox", attacks={"extraction": {"enabled": False}},
                     canaries={"enabled": False})
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(cfg.model_dump()))

    def crash(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(external, "audit_model", crash)
    code, _, err = run_cli(monkeypatch, capsys, "audit", "tiny-gpt-neox", str(path), "--label", "crashy")
    assert code == 1  # not 2: nothing the user can fix
    assert_one_line_error(code, err, "crashed on attempt 1: RuntimeError: simulated bug", "(traceback: ")
