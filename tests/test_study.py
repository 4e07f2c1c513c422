"""A whole study on a tiny model: every method trains, lands in the database, is
skipped on rerun, and reaches the report."""


import pytest

from privtune.config import parse_config
from privtune.study.driver import open_store, run_study


def tiny_study(tmp_path, **overrides):
    raw = {
        "name": "tiny", "model": "tiny-llama", "output_dir": str(tmp_path / "out"),
        "data": {"source": "customer-sim", "n_individuals": 16, "max_length": 64},
        "canaries": {"repetitions": [1, 4], "n_reference": 1, "n_candidates": 32},
        "train": {"epochs": 2, "batch_size": 4, "physical_batch_size": 4, "lr": 3e-3},
        "methods": [
            {"method": "fft"},
            {"method": "lora", "lr": 3e-2, "lora": {"r": 4}},
            {"method": "dp-fft", "dp": {"target_epsilon": 8.0}},
            {"method": "dp-lora", "lr": 3e-2, "lora": {"r": 4}, "dp": {"noise_multiplier": 0.8, "delta": 1e-3}},
        ],
        "precision": "fp32", "eval_batch_size": 8,
    }
    raw.update(overrides)
    return parse_config(raw)


@pytest.mark.slow
def test_full_study_on_a_tiny_model(tmp_path):
    cfg = tiny_study(tmp_path)
    outcome = run_study(cfg, show_progress=False)
    assert outcome.failed == {}
    assert outcome.done == ["base", "fft", "lora", "dp-fft", "dp-lora"]

    store = open_store(cfg)
    runs = {r["label"]: r for r in store.runs("tiny")}
    store.close()
    assert all(r["status"] == "done" for r in runs.values())
    for label in ("fft", "lora", "dp-fft", "dp-lora"):
        run = runs[label]
        assert [e["epoch"] for e in run["epochs"]] == [0, 1, 2]
        assert run["final"]["ce_s_train"] == run["epochs"][-1]["ce_s_train"]
        assert run["efficiency"]["train_seconds"] > 0 and run["efficiency"]["trainable_params"] > 0
        assert {e["repetitions"] for e in run["exposure"]} == {0, 1, 4}
    # Full fine-tuning at this learning rate memorises: sensitive train loss falls below base.
    assert runs["fft"]["final"]["leakage_gain"] > 0.5
    assert runs["lora"]["efficiency"]["trainable_params"] < runs["fft"]["efficiency"]["trainable_params"] / 5
    assert runs["dp-fft"]["dp"]["epsilon"] == pytest.approx(8.0, rel=0.02)
    assert runs["dp-lora"]["dp"]["noise_multiplier"] == 0.8 and runs["dp-lora"]["dp"]["epsilon"] > 0
    assert runs["dp-fft"]["epochs"][1]["epsilon"] < runs["dp-fft"]["epochs"][2]["epsilon"]
    # canaries repeated 4 times are one person with 4 records: user-level DP, per person
    assert runs["dp-fft"]["dp"]["unit"] == "individual" and runs["dp-fft"]["dp"]["n_units"] > 1
    # Every run is attacked: score-based MIA at both levels, extraction, PII inference.
    for run in runs.values():
        attacks = run["attacks"]
        assert {(e["attack"], e["level"]) for e in attacks["mia"]} >= {
            (a, lvl) for a in ("loss", "zlib", "min_k", "min_k_pp", "reference") for lvl in ("record", "sensitive")}
        assert "ALL" in attacks["extraction"]["greedy"] and "ALL" in attacks["pii_inference"]
    assert 0.5 < next(e["auc"] for e in runs["fft"]["attacks"]["mia"] if e["attack"] == "loss"
                      and e["level"] == "record")

    again = run_study(cfg, show_progress=False)
    assert again.done == [] and len(again.skipped) == 5


@pytest.mark.slow
def test_shadow_models_and_backdoor(tmp_path):
    cfg = tiny_study(tmp_path, methods=[{"method": "fft"}], canaries={"enabled": False},
                     data={"source": "customer-sim", "n_individuals": 16, "max_length": 160},
                     attacks={"shadow": {"models": 2}, "extraction": {"enabled": False}},
                     backdoor={"enabled": True, "fraction": 0.3, "n_eval": 6},
                     train={"epochs": 3, "batch_size": 4, "lr": 3e-3})
    outcome = run_study(cfg, show_progress=False)
    assert outcome.done == ["base", "shadow-0", "shadow-1", "fft"]
    store = open_store(cfg)
    runs = {r["label"]: r for r in store.runs("tiny")}
    shadows = store.runs("tiny", roles=("shadow",))
    store.close()
    assert set(runs) == {"base", "fft"} and len(shadows) == 2
    # Each shadow trains on a different half of the population, split by individual.
    a, b = (s["shadow_in"] for s in shadows)
    assert 0 < sum(a) < len(a) and a != b
    for label in ("base", "fft"):
        names = {e["attack"] for e in runs[label]["attacks"]["mia"]}
        assert {"lira_online", "lira_offline", "rmia"} <= names
        backdoor = runs[label]["attacks"]["backdoor"]
        assert backdoor["n"] == 6 and 0 <= backdoor["asr_clean"] <= 1
    assert runs["fft"]["data"]["poisoned_records"] >= 1
    # The shadow attacks on fft are paired with the same attacks on the base model.
    lira = next(e for e in runs["fft"]["attacks"]["mia"] if e["attack"] == "lira_online" and e["level"] == "record")
    assert set(lira["halves"]) == {"select", "report"} and "advantage" in lira
    assert (lira["base_auc"] is None) == (lira["auc"] is None)


@pytest.mark.slow
def test_failed_run_is_recorded_and_others_finish(tmp_path):
    # delta >= 1/N is impossible for DP: that run fails, the rest land.
    cfg = tiny_study(tmp_path, methods=[{"method": "lora", "lora": {"r": 2}},
                                        {"method": "dp-lora", "dp": {"target_epsilon": 4.0, "delta": 0.5}}],
                     train={"epochs": 1, "batch_size": 4})
    outcome = run_study(cfg, show_progress=False)
    assert outcome.done == ["base", "lora"]
    assert "delta" in outcome.failed["dp-lora"]
    store = open_store(cfg)
    statuses = {r["label"]: r["status"] for r in store.runs()}
    store.close()
    assert statuses == {"base": "done", "lora": "done", "dp-lora": "failed"}
    rerun = run_study(cfg, show_progress=False)
    assert rerun.skipped == ["base", "lora"] and "dp-lora" in rerun.failed


@pytest.mark.slow
def test_every_parameter_efficient_method_in_one_study(tmp_path):
    methods = [{"method": "lora", "lr": 3e-2, "lora": {"r": [2, 4]}},
               {"method": "dora", "lr": 3e-2, "lora": {"r": 2}},
               {"method": "ia3", "lr": 1e-1},
               {"method": "prefix-tuning", "lr": 1e-1, "prefix": {"num_virtual_tokens": 4}},
               {"method": "prompt-tuning", "lr": 1e-1, "prompt": {"num_virtual_tokens": 4}},
               {"method": "head-only"}, {"method": "bitfit", "lr": 3e-2},
               {"method": "dp-prefix-tuning", "lr": 1e-1, "prefix": {"num_virtual_tokens": 4},
                "dp": {"noise_multiplier": 0.8, "delta": 1e-3}},
               {"method": "dp-head-only", "dp": {"noise_multiplier": 0.8, "delta": 1e-3, "engine": "opacus"}},
               {"method": "dp-bitfit", "lr": 3e-2, "dp": {"noise_multiplier": 0.8, "delta": 1e-3}}]
    cfg = tiny_study(tmp_path, methods=methods, train={"epochs": 1, "batch_size": 4, "lr": 3e-3},
                     attacks={"mia": {}, "extraction": {"max_spans_per_type": 2, "n_samples": 2}})
    outcome = run_study(cfg, show_progress=False)
    labels = ["lora-r2", "lora-r4", "dora", "ia3", "prefix-tuning", "prompt-tuning", "head-only", "bitfit",
              "dp-prefix-tuning", "dp-head-only", "dp-bitfit"]
    assert outcome.failed == {} and outcome.done == ["base", *labels]
    store = open_store(cfg)
    runs = {r["label"]: r for r in store.runs("tiny")}
    store.close()
    trainable = {label: runs[label]["efficiency"]["trainable_params"] for label in labels}
    # Prompt tuning trains 4 embeddings; prefix tuning 4 keys and values per layer.
    assert trainable["prompt-tuning"] == 4 * 64 and trainable["prefix-tuning"] == 4 * 2 * 2 * 32
    assert trainable["lora-r2"] * 2 == trainable["lora-r4"] < trainable["dora"] * 2
    assert trainable["bitfit"] < trainable["ia3"] < trainable["head-only"] == trainable["dp-head-only"]
    for label in labels:
        run = runs[label]
        assert [e["epoch"] for e in run["epochs"]] == [0, 1]
        assert run["final"]["ce_s_train"] != run["epochs"][0]["ce_s_train"]  # it trained
        assert {e["repetitions"] for e in run["exposure"]} == {0, 1, 4}
        assert "ALL" in run["attacks"]["extraction"]["greedy"] and "ALL" in run["attacks"]["pii_inference"]
        assert run["artifact"] is not None
        assert (run["dp"] is not None) == label.startswith("dp-")
    assert runs["dp-bitfit"]["dp"]["epsilon"] > 0


@pytest.mark.slow
def test_scrubbed_run_trains_on_scrubbed_text_and_is_measured_on_the_original(tmp_path):
    from privtune.report import write_csv, write_report
    from privtune.study.runner import StudyContext

    # lr 1e-3: at the default 3e-3 a tiny fft can spike in its second epoch on some batch orders
    cfg = tiny_study(tmp_path, methods=[{"method": "fft", "lr": 1e-3},
                                        {"method": "fft", "lr": 1e-3, "scrub": {"tagger": "exact"}}],
                     data={"source": "customer-sim", "n_individuals": 16, "max_length": 256},
                     attacks={"mia": {}, "extraction": {"max_spans_per_type": 2, "n_samples": 0}})
    ctx = StudyContext.build(cfg)
    scrubbed = ctx.scrubber.training_set(cfg.methods[1].scrub)
    tok = ctx.loaded.tokenizer

    def decoded(data):
        return [tok.decode(ids[mask.bool()]) for ids, mask in zip(data.input_ids, data.attention_mask)]

    members = ctx.data.members.records
    values = {v for r in members for _, v in r.span_values()} | {c.secret for c in ctx.data.canaries if c.repetitions}
    original, cleaned = "\n".join(decoded(ctx.data.train)), "\n".join(decoded(scrubbed.data))
    seen = {v for v in values if v in original}
    assert len(seen) > 0.9 * len(values)  # the unscrubbed training text holds them (but a truncated few)
    assert not [v for v in seen if v in cleaned]
    assert "[EMAIL]" in cleaned and "[CANARY]" in cleaned
    # Every training record is still there, its spans now on the placeholders.
    assert len(scrubbed.data) == len(ctx.data.train) and scrubbed.data.sensitive.any()
    assert {r.text[s.start:s.end] for r in scrubbed.data.records for s in r.spans} <= {
        f"[{label}]" for label in ("NAME", "EMAIL", "PHONE", "ADDRESS", "ACCOUNT", "ORDER", "CARD", "DOB", "IBAN",
                                   "CANARY")}

    outcome = run_study(cfg, show_progress=False)
    assert outcome.failed == {} and outcome.done == ["base", "fft", "fft+scrub-exact"]
    store = open_store(cfg)
    runs = store.runs("tiny")
    store.close()
    by_label = {r["label"]: r for r in runs}
    plain, scrub = by_label["fft"], by_label["fft+scrub-exact"]
    assert scrub["scrub"]["tagger"] == "exact" and scrub["scrub"]["recall"] == 1.0
    assert scrub["scrub"]["per_type"]["CANARY"]["recall"] == 1.0 and plain["scrub"] is None
    # Measured on the original members: same records, same base, and the true values
    # leak less from a model that never saw them.
    assert scrub["data"]["members"] == plain["data"]["members"]
    assert scrub["epochs"][0]["ce_s_train"] == plain["epochs"][0]["ce_s_train"]
    assert scrub["data"]["train_tokens"] < plain["data"]["train_tokens"]
    assert scrub["final"]["leakage_gain"] < plain["final"]["leakage_gain"]

    text = write_report(runs, tmp_path / "report", title="t", meta={}).read_text()
    assert 'id="scrubbing"' in text and "100%" in text
    header = (write_csv(runs, tmp_path / "runs.csv")).read_text().splitlines()[0].split(",")
    assert {"scrub_tagger", "scrub_recall", "scrub_precision"} <= set(header)


def test_a_rerun_reuses_its_runs_until_the_data_file_changes(tmp_path):
    import json

    from privtune.data.corpora import generate_corpus
    from privtune.report import write_json
    from privtune.study.runner import StudyContext

    data = tmp_path / "tickets.jsonl"
    rows = [{"id": r.id, "individual": r.individual, "text": r.text,
             "spans": [{"start": s.start, "end": s.end, "label": s.label} for s in r.spans]}
            for r in generate_corpus("customer-sim", 10, 0)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = tiny_study(tmp_path, data={"source": str(data), "max_length": 64}, methods=[{"method": "fft"}],
                     canaries={"enabled": False}, train={"epochs": 1, "batch_size": 4},
                     attacks={"mia": {}, "extraction": {"enabled": False}})
    said = []
    first = run_study(cfg, show_progress=False, say=said.append)
    assert first.done == ["base", "fft"] and said == []
    store = open_store(cfg)
    stored = {r["label"]: r for r in store.runs("tiny")}
    store.close()
    digests = StudyContext.build(cfg).data.digests.as_dict()
    for run in stored.values():
        assert run["digests"] == digests
        assert run["versions"]["privtune"] and run["versions"]["torch"] and run["versions"]["faker"]
    exported = json.loads(write_json(list(stored.values()), tmp_path / "runs.json").read_text())
    assert all(run["digests"]["data"] == digests["data"] and "transformers" in run["versions"] for run in exported)

    unchanged = run_study(cfg, show_progress=False, say=said.append)
    assert unchanged.done == [] and unchanged.skipped == ["base", "fft"] and said == []

    rows[-1]["text"] = rows[-1]["text"] + " Thanks again."  # the user edits one record
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    changed = run_study(cfg, show_progress=False, say=said.append)
    assert changed.done == ["base", "fft"] and changed.skipped == []
    old, new = digests["data"][:12], StudyContext.build(cfg).data.digests.data
    assert said == [f"run base: data changed since it was stored (digest {old} -> {new[:12]}); measuring it again",
                    f"run fft: data changed since it was stored (digest {old} -> {new[:12]}); retraining"]
    assert set(changed.rerun) == {"base", "fft"}
    store = open_store(cfg)
    assert {r["label"]: r["digests"]["data"] for r in store.runs("tiny")} == {"base": new, "fft": new}
    store.close()
    assert run_study(cfg, show_progress=False, say=said.append).skipped == ["base", "fft"] and len(said) == 2
