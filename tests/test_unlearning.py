"""Unlearning: the objectives against hand computations, the loop on a tiny model, the
plan (retrain reference, dependency order, identity), bad forget sets, and whole tiny
studies whose unlearned models land in the database, reload, and reach the report."""

import copy
import json
import math

import pytest
import torch

from privtune.config import parse_config
from privtune.data.tokenize import encode_records
from privtune.errors import PrivtuneError
from privtune.models.loading import load_model
from privtune.study.dataset import build_study_records
from privtune.study.driver import open_store, run_study
from privtune.study.forget import ForgetSet, check_forget_sets
from privtune.study.plan import plan_study
from privtune.study.runner import StudyContext
from privtune.study.unlearning_plan import execution_phases, retrain_run_id, source_run_id
from privtune.train.losses import per_record_loss
from privtune.train.precision import Runtime
from privtune.train.unlearn import UnlearnPlan, reference_nll, unlearn
from privtune.train.unlearn_objectives import OBJECTIVES, npo_loss, retain_kl, sequence_nll

CPU = Runtime(torch.device("cpu"), "fp32")


def tiny_study(tmp_path, methods=None, **overrides):
    raw = {
        "name": "tiny", "model": "tiny-llama", "output_dir": str(tmp_path / "out"),
        "data": {"source": "customer-sim", "n_individuals": 12, "max_length": 64},
        "canaries": {"enabled": False},
        "attacks": {"mia": {},
                    "extraction": {"max_spans_per_type": 2, "n_samples": 0, "pii_inference": False}},
        "train": {"epochs": 2, "batch_size": 4, "physical_batch_size": 4, "lr": 3e-3},
        "methods": methods or [
            {"method": "fft"},
            {"method": "unlearn-ga", "lr": 1e-3, "unlearn": {"source": "fft", "forget": {"fraction": 0.34}}},
            {"method": "unlearn-npo", "lr": 1e-3, "unlearn": {"source": "fft", "forget": {"fraction": 0.34}}},
        ],
        "precision": "fp32", "eval_batch_size": 8,
    }
    raw.update(overrides)
    return parse_config(raw)


# --- objectives ------------------------------------------------------------------------

def test_npo_loss_matches_the_paper_formula_from_log_probs():
    torch.manual_seed(0)
    logits, ref_logits = torch.randn(3, 6, 11), torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[1, 4:] = -100  # padding
    beta = 0.3
    nll, _ = sequence_nll(logits, labels)
    ref_nll, _ = sequence_nll(ref_logits, labels)
    by_formula = []

    def logprob(lg, b):  # log π(y|x) = Σ_t log p(y_t | y_<t), by hand
        return sum(torch.log_softmax(lg[b, t - 1], -1)[labels[b, t]] for t in range(1, 6) if labels[b, t] >= 0)

    for b in range(3):
        ratio = torch.exp(logprob(logits, b) - logprob(ref_logits, b))
        by_formula.append(2 / beta * torch.log(1 + ratio ** beta))
    assert torch.allclose(npo_loss(nll, ref_nll, beta), torch.stack(by_formula), atol=1e-5)
    # At the start (model == reference) every record costs (2/β) log 2.
    assert torch.allclose(npo_loss(nll, nll, beta), torch.full((3,), 2 / beta * math.log(2)))


def test_kl_term_is_zero_when_the_model_is_the_source_and_positive_otherwise():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    assert torch.allclose(retain_kl(logits, logits.clone(), labels), torch.zeros(2), atol=1e-6)
    assert (retain_kl(logits, logits + torch.randn(2, 5, 7), labels) > 0).all()


def test_retain_weights_are_checked_per_method():
    assert OBJECTIVES["unlearn-ga"].check_retain_weight(1.0)
    assert OBJECTIVES["unlearn-ga-kl"].check_retain_weight(0.0)
    assert OBJECTIVES["unlearn-npo"].check_retain_weight(0.0) is None
    assert OBJECTIVES["unlearn-npo"].check_retain_weight(1.0) is None


# --- the loop ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model fitted to a few records (so there is something to unlearn)."""
    cfg = tiny_study(tmp_path_factory.mktemp("unlearn"))
    recs = build_study_records(cfg)
    loaded = load_model("tiny-llama")
    data = encode_records(recs.members, loaded.tokenizer, 64)
    model = copy.deepcopy(loaded.model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        loss = per_record_loss(model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits,
                               data.labels).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    people = sorted({r.individual for r in recs.members})
    return model, ForgetSet(frozenset(people[:2])).split(data)


def _mean_loss(model, data) -> float:
    with torch.no_grad():
        return float(per_record_loss(model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits,
                                     data.labels).mean())


def _run(trained, method, **kw):
    model, (forget, retain) = trained
    model = copy.deepcopy(model)
    objective = OBJECTIVES[method]
    plan = UnlearnPlan(objective, epochs=3, batch_size=4, physical_batch_size=2, lr=1e-3, weight_decay=0.0, seed=0,
                       beta=0.1 if objective.forget == "npo" else None, **kw)
    reference = copy.deepcopy(model).eval() if objective.retain == "kl" else None
    epochs = []
    result = unlearn(model, forget, retain, plan, CPU, reference=reference,
                     on_epoch_end=lambda e, r: epochs.append(e))
    assert epochs == [1, 2, 3] and result.steps == 3 * -(-len(forget) // 4)
    return model


def test_gradient_ascent_raises_forget_loss_and_npo_more_slowly(trained):
    model, (forget, retain) = trained
    before_f, before_r = _mean_loss(model, forget), _mean_loss(model, retain)
    ga, npo = _run(trained, "unlearn-ga"), _run(trained, "unlearn-npo")
    assert _mean_loss(ga, forget) > before_f + 0.5
    assert before_f < _mean_loss(npo, forget) < _mean_loss(ga, forget)
    # NPO's bounded loss damages the retain set less than GA's unbounded one.
    assert _mean_loss(npo, retain) - before_r < _mean_loss(ga, retain) - before_r


def test_retain_terms_keep_the_retain_set_better_than_ascent_alone(trained):
    model, (forget, retain) = trained
    ga = _mean_loss(_run(trained, "unlearn-ga"), retain)
    for method in ("unlearn-ga-retain", "unlearn-ga-kl"):
        unlearned = _run(trained, method, retain_weight=1.0)
        assert _mean_loss(unlearned, forget) > _mean_loss(model, forget)
        assert _mean_loss(unlearned, retain) < ga


def test_npo_reference_is_the_starting_model(trained):
    model, (forget, _) = trained
    ref = reference_nll(model, forget, CPU, batch_size=3)
    nll, _ = sequence_nll(model(input_ids=forget.input_ids, attention_mask=forget.attention_mask).logits,
                          forget.labels)
    assert torch.allclose(ref, nll.detach(), atol=1e-4)


# --- config and plan -------------------------------------------------------------------

def test_labels_defaults_and_identity(tmp_path):
    cfg = tiny_study(tmp_path)
    plan = plan_study(cfg)
    assert [(r.label, r.role) for r in plan] == [
        ("base", "base"), ("fft", "target"), ("fft+retrain", "retrain"), ("fft+unlearn-ga", "unlearn"),
        ("fft+unlearn-npo", "unlearn")]
    base, fft, retrain, ga, npo = plan
    assert npo.config["method"]["unlearn"]["beta"] == 0.1 and ga.config["method"]["unlearn"]["beta"] is None
    assert source_run_id(ga) == fft.run_id and retrain_run_id(npo) == retrain.run_id
    assert retrain.config["method"] == fft.config["method"]
    # Adding unlearning methods changes no existing run's identity.
    plain = plan_study(tiny_study(tmp_path, methods=[{"method": "fft"}]))
    assert [r.run_id for r in plain] == [base.run_id, fft.run_id]
    # Changing the source makes new unlearning runs.
    other = plan_study(tiny_study(tmp_path, methods=[{"method": "fft", "lr": 1e-3}, {
        "method": "unlearn-ga", "unlearn": {"source": "fft", "forget": {"fraction": 0.34}}}]))
    assert other[3].label == "fft+unlearn-ga" and other[3].run_id != ga.run_id
    # Unlearning runs execute after everything else.
    assert [[r.label for r in p] for p in execution_phases([npo, retrain, ga, fft])] == [
        ["fft+retrain", "fft"], ["fft+unlearn-npo", "fft+unlearn-ga"]]


def test_the_retrained_reference_trains_on_every_record_but_the_forget_sets(tmp_path):
    from privtune.study.unlearning import retrain_training_set

    cfg = tiny_study(tmp_path, backdoor={"enabled": True, "fraction": 0.3, "n_eval": 2},
                     data={"source": "customer-sim", "n_individuals": 12, "max_length": 160},
                     canaries={"repetitions": [2], "n_reference": 1, "n_candidates": 16})
    ctx = StudyContext.build(cfg)
    retrain = next(r for r in plan_study(cfg) if r.role == "retrain")
    kept = retrain_training_set(ctx, retrain, ctx.data.train)
    forgotten = {r.individual for r in ctx.data.members.records} - {r.individual for r in kept.records}
    assert len(forgotten) == 2  # a third of 6 members
    assert not [r for r in kept.records if r.individual in forgotten]  # their poisoned copies too
    assert [r.id for r in kept.records] == [r.id for r in ctx.data.train.records if r.individual not in forgotten]
    assert any(r.meta.get("canary") for r in kept.records) and any(r.meta.get("backdoor") for r in kept.records)


def test_two_forget_sets_get_two_retrain_runs_and_seeds_suffix_labels(tmp_path):
    cfg = tiny_study(tmp_path, seeds=[0, 1], methods=[
        {"method": "fft"},
        {"method": "unlearn-ga", "unlearn": {"source": "fft", "forget": {"fraction": 0.34}}},
        {"method": "unlearn-ga", "label": "forget-two", "unlearn": {"source": "fft", "forget": {"fraction": 0.5}}}])
    labels = [r.label for r in plan_study(cfg) if r.role != "base"]
    assert labels == ["fft-s0", "fft-s1", "fft+retrain-s0", "fft+unlearn-ga-s0", "fft+retrain-2-s0", "forget-two-s0",
                      "fft+retrain-s1", "fft+unlearn-ga-s1", "fft+retrain-2-s1", "forget-two-s1"]


@pytest.mark.parametrize("method, match", [
    ({"method": "unlearn-ga", "unlearn": {"source": "lora", "forget": {"fraction": 0.3}}},
     "unlearn.source 'lora' names no method of the study; use one of: fft"),
    ({"method": "unlearn-ga", "unlearn": {"source": "fft+unlearn-npo", "forget": {"fraction": 0.3}}},
     "is itself an unlearning run"),
    ({"method": "unlearn-ga", "unlearn": {"source": "fft", "forget": {}}}, "exactly one of forget.individuals"),
    ({"method": "unlearn-ga", "unlearn": {"source": "fft", "forget": {"fraction": 0.3}, "retain_weight": 1}},
     "unlearn-ga has no retain term"),
    ({"method": "unlearn-ga-kl", "unlearn": {"source": "fft", "forget": {"fraction": 0.3}, "retain_weight": 0}},
     "needs retain_weight > 0"),
    ({"method": "unlearn-ga", "unlearn": {"source": "fft", "forget": {"fraction": 0.3}, "beta": 0.2}},
     "unlearn.beta is NPO's"),
    ({"method": "unlearn-ga", "lora": {"r": 2}, "unlearn": {"source": "fft", "forget": {"fraction": 0.3}}},
     "takes no lora settings"),
    ({"method": "unlearn-ga"}, "needs unlearn settings"),
    ({"method": "fft", "label": "x", "unlearn": {"source": "fft", "forget": {"fraction": 0.3}}},
     "method fft takes no unlearn settings"),
])
def test_bad_unlearning_configs_fail_on_one_line(tmp_path, method, match):
    methods = [{"method": "fft"}, {"method": "unlearn-npo", "unlearn": {"source": "fft", "forget": {"fraction": 0.3}}},
               method]
    with pytest.raises(PrivtuneError, match=match) as e:
        tiny_study(tmp_path, methods=methods)
    assert "\n" not in str(e.value)


def test_unlearning_needs_saved_artifacts(tmp_path):
    with pytest.raises(PrivtuneError, match="set save_artifacts: true"):
        tiny_study(tmp_path, save_artifacts=False)


@pytest.mark.parametrize("forget, match", [
    ({"individuals": ["nobody-1"]}, "names no known individual: nobody-1; use ids of the study's members, e.g. "),
    ({"fraction": 0.01}, "picks no one"),
    ({"fraction": 0.99}, "holds all 6 members"),
])
def test_bad_forget_sets_fail_the_study_before_anything_runs(tmp_path, forget, match):
    cfg = tiny_study(tmp_path, methods=[{"method": "fft"}, {"method": "unlearn-ga",
                                                            "unlearn": {"source": "fft", "forget": forget}}])
    with pytest.raises(PrivtuneError, match=match):
        run_study(cfg, show_progress=False)
    assert not (tmp_path / "out" / "privtune.db").exists()  # nothing ran, nothing was written


def test_a_non_member_cannot_be_forgotten(tmp_path):
    cfg = tiny_study(tmp_path)
    outsider = build_study_records(cfg).nonmembers[0].individual
    bad = tiny_study(tmp_path, methods=[{"method": "fft"}, {
        "method": "unlearn-ga", "unlearn": {"source": "fft", "forget": {"individuals": [outsider]}}}])
    with pytest.raises(PrivtuneError, match=f"names non-members, whom no model trained on: {outsider}"):
        check_forget_sets(bad)


# --- whole studies -----------------------------------------------------------------------

def _runs(cfg) -> dict:
    store = open_store(cfg)
    try:
        return {r["label"]: r for r in store.runs("tiny")}
    finally:
        store.close()


@pytest.mark.slow
def test_tiny_study_with_fft_source(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_study(tmp_path)
    outcome = run_study(cfg, show_progress=False)
    assert outcome.failed == {}
    assert outcome.done == ["base", "fft", "fft+retrain", "fft+unlearn-ga", "fft+unlearn-npo"]
    runs = _runs(cfg)
    assert {r["role"] for r in runs.values()} == {"base", "target", "retrain", "unlearn"}
    fft, retrain, ga, npo = (runs[k] for k in ("fft", "fft+retrain", "fft+unlearn-ga", "fft+unlearn-npo"))
    forgotten = set(ga["unlearning"]["forget_ids"])
    assert forgotten == set(retrain["unlearning"]["forget_ids"]) and len(forgotten) == 2
    # The retrained reference trained on none of the forget set's records.
    members = len(build_study_records(cfg).members)
    assert retrain["data"]["train_records"] == members  # the study's training set ...
    assert retrain["unlearning"]["forget_records"] + retrain["unlearning"]["retain_records"] == members
    assert retrain["data"]["train_tokens"] < fft["data"]["train_tokens"]  # ... minus the forgotten records
    for run in (retrain, ga, npo):
        section = run["unlearning"]
        assert {"forget_ce_s", "forget_leakage_gain", "retain_ce_n", "utility_ce", "forget_mia_loss_auc", "mia",
                "forget_extraction"} <= set(section)
        assert run["attacks"]["mia"] and run["record_stats"]
    # Epoch 0 of an unlearning run is its source model; ascent raises the forget loss.
    assert ga["epochs"][0]["ce_s_train"] == pytest.approx(fft["final"]["ce_s_train"], abs=1e-4)
    assert ga["unlearning"]["source"]["forget_ce_s"] == pytest.approx(ga["epochs"][0]["forget_ce_s"])
    assert ga["unlearning"]["forget_ce_s"] > ga["unlearning"]["source"]["forget_ce_s"]
    assert ga["epochs"][-1]["forget_ce_s"] > ga["epochs"][0]["forget_ce_s"]
    assert ga["dp"] is None and ga["unlearning"]["retrain_run"] == retrain["run_id"]
    # The unlearned model saves and reloads as the model that was measured.
    ctx = StudyContext.build(cfg)
    reloaded = AutoModelForCausalLM.from_pretrained(ga["artifact"])
    assert ctx.evaluate(reloaded).measures["ce_s_train"] == pytest.approx(ga["final"]["ce_s_train"], abs=1e-5)
    # A rerun skips every finished run.
    assert run_study(cfg, show_progress=False).done == []


@pytest.mark.slow
def test_lora_source_unlearns_its_adapter_only_and_a_lost_source_is_retrained(tmp_path):
    from peft import PeftModel

    methods = [{"method": "lora", "lr": 3e-2, "lora": {"r": 4}},
               {"method": "unlearn-ga-kl", "lr": 1e-2, "epochs": 1,
                "unlearn": {"source": "lora", "forget": {"fraction": 0.34}}}]
    cfg = tiny_study(tmp_path, methods=methods, attacks={"enabled": False})
    outcome = run_study(cfg, show_progress=False)
    assert outcome.failed == {} and outcome.done == ["base", "lora", "lora+retrain", "lora+unlearn-ga-kl"]
    runs = _runs(cfg)
    lora, kl = runs["lora"], runs["lora+unlearn-ga-kl"]
    assert kl["efficiency"]["trainable_params"] == lora["efficiency"]["trainable_params"]
    assert "mia" not in kl["unlearning"]  # attacks off: losses only
    ctx = StudyContext.build(cfg)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(ctx.loaded.model), kl["artifact"])
    assert ctx.evaluate(reloaded).measures["ce_s_train"] == pytest.approx(kl["final"]["ce_s_train"], abs=1e-5)
    assert kl["final"]["ce_s_train"] != pytest.approx(lora["final"]["ce_s_train"], abs=1e-4)
    # Only the adapter changed: the saved adapter holds LoRA weights alone.
    assert json.loads((tmp_path / "out" / "artifacts" / kl["run_id"] / "adapter_config.json").read_text())[
        "peft_type"] == "LORA"
    # The source's saved model went missing: the source is trained again; the rest is done.
    import shutil

    shutil.rmtree(lora["artifact"])
    cfg2 = tiny_study(tmp_path, methods=[*methods, {"method": "unlearn-npo", "epochs": 1,
                                                    "unlearn": {"source": "lora", "forget": {"fraction": 0.34}}}],
                      attacks={"enabled": False})
    again = run_study(cfg2, show_progress=False)
    assert again.failed == {} and again.done == ["lora", "lora+unlearn-npo"]


@pytest.mark.slow
def test_unlearning_section_reaches_the_report_and_the_csv(tmp_path):
    from privtune.report.export import csv_columns, csv_row
    from privtune.report.html import render_html

    cfg = tiny_study(tmp_path, methods=[{"method": "fft"}, {
        "method": "unlearn-ga", "lr": 1e-3, "epochs": 1, "unlearn": {"source": "fft", "forget": {"fraction": 0.34}}}],
        attacks={"mia": {}, "extraction": {"enabled": False}}, train={"epochs": 1, "batch_size": 4})
    assert run_study(cfg, show_progress=False).failed == {}
    runs = list(_runs(cfg).values())
    page = render_html(runs, title="t", meta={})
    assert 'id="unlearning"' in page and "fft+unlearn-ga" in page and "fft+retrain" in page
    assert "forget MIA AUC" in page and "forget extraction" not in page  # extraction was off
    columns = csv_columns(runs)
    assert {"unlearn_forget_ce_s", "unlearn_forget_mia_auc", "unlearn_source_run"} <= set(columns)
    row = csv_row(next(r for r in runs if r["label"] == "fft+unlearn-ga"), columns)
    assert row["unlearn_forget_ce_s"] != "" and row["unlearn_retrain_run"] != ""


@pytest.mark.parametrize("methods, needle", [
    ([{"method": "lora", "lora": {"r": 2}},
      {"method": "unlearn-ga", "unlearn": {"source": "lora", "forget": {"individuals": ["ghost"]}}}],
     "names no known individual: ghost"),
    ([{"method": "unlearn-npo", "unlearn": {"source": "fft", "forget": {"fraction": 0.5}}}],
     "unlearn.source 'fft' names no method of the study"),
])
def test_cli_bad_unlearning_input_is_one_line_and_loses_nothing(tmp_path, monkeypatch, capsys, methods, needle):
    from test_cli import assert_one_line_error, run_cli, write_study

    db = tmp_path / "out" / "privtune.db"
    db.parent.mkdir()
    db.write_bytes(b"")  # an earlier study's database stays as it was
    code, _, err = run_cli(monkeypatch, capsys, "run", str(write_study(tmp_path, methods=methods)))
    assert_one_line_error(code, err, needle)
    assert db.read_bytes() == b""


def test_an_unlearning_run_whose_source_left_no_model_fails_on_one_line(tmp_path):
    from privtune.study.unlearning import load_source

    cfg = tiny_study(tmp_path)
    ga = next(r for r in plan_study(cfg) if r.label == "fft+unlearn-ga")
    with pytest.raises(PrivtuneError, match="starts from the saved model of fft, but .* does not exist") as e:
        load_source(StudyContext.build(cfg), ga)
    assert "fix run fft and run the study again" in e.value.one_line()


def test_npo_counts_its_reference_pass_over_the_forget_set(trained):
    model, (forget, retain) = trained
    counted = {}
    for method in ("unlearn-ga", "unlearn-npo"):
        objective = OBJECTIVES[method]
        plan = UnlearnPlan(objective, epochs=1, batch_size=4, physical_batch_size=2, lr=1e-3, weight_decay=0.0,
                           seed=0, beta=0.1 if objective.forget == "npo" else None)
        counted[method] = unlearn(copy.deepcopy(model), forget, retain, plan, CPU)
    ga, npo = counted["unlearn-ga"], counted["unlearn-npo"]
    assert (ga.records, ga.forward_records) == (len(forget), 0)
    assert (npo.records, npo.forward_records) == (len(forget), len(forget))  # π_ref's NLL, once
    assert npo.forward_positions == len(forget) * forget.input_ids.shape[1]
