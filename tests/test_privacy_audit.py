"""The privacy audit of a study: audit canaries in the data, every run's empirical ε,
and where they show (runs.json, the CSV, the report)."""

import copy
import csv
import json

import numpy as np
import pytest
import torch

from privtune.auditing.designs import AUDIT_META, DesignInputs, make_audit_canaries
from privtune.auditing.one_run import MIN_CANARIES, empirical_epsilon
from privtune.auditing.study_audit import audit_membership, audit_result, canary_scores
from privtune.config import parse_config
from privtune.data.clients import split_clients
from privtune.data.tokenize import encode_records
from privtune.errors import PrivtuneError
from privtune.measures.token_scores import score_tokens
from privtune.models.loading import load_model
from privtune.study.dataset import build_study_data, build_study_records, encode_audit_canaries
from privtune.study.plan import plan_study
from privtune.train import streams
from privtune.train.loop import privacy_units
from privtune.train.precision import resolve_runtime

M = 40


def study(tmp_path, audit=None, **overrides):
    raw = {
        "name": "audited", "model": "tiny-llama", "output_dir": str(tmp_path / "out"),
        "data": {"source": "customer-sim", "n_individuals": 16, "max_length": 64},
        "canaries": {"repetitions": [1, 4], "n_reference": 1, "n_candidates": 32},
        # the random design: these tests are about the audit, not the canaries (test_canary_designs.py)
        "privacy_audit": {"enabled": True, "canaries": M, "design": "random"} if audit is None else audit,
        "train": {"epochs": 1, "batch_size": 4, "physical_batch_size": 4, "lr": 3e-3},
        "methods": [{"method": "fft"}, {"method": "dp-fft", "dp": {"noise_multiplier": 1.0}}],
        "precision": "fp32", "eval_batch_size": 8,
    }
    raw.update(overrides)
    return parse_config(raw)


# --- config ------------------------------------------------------------------------------

def test_the_audit_is_off_by_default_and_its_fields_have_their_documented_defaults(tmp_path):
    settings = study(tmp_path, audit={}).privacy_audit
    assert (settings.enabled, settings.canaries, settings.design, settings.delta, settings.confidence) == \
        (False, 200, "sampled", None, 0.95)


@pytest.mark.parametrize("audit, problem", [
    ({"canaries": MIN_CANARIES - 1}, "privacy_audit.canaries"),
    ({"design": "loud"}, "privacy_audit.design: unknown audit canary design 'loud'; use one of: random"),
    ({"delta": 1.5}, "privacy_audit.delta"),
    ({"confidence": 1.0}, "privacy_audit.confidence"),
])
def test_bad_audit_settings_are_one_line_errors_naming_the_field(tmp_path, audit, problem):
    with pytest.raises(PrivtuneError) as caught:
        study(tmp_path, audit={"enabled": True, **audit})
    assert problem in str(caught.value) and "\n" not in str(caught.value)


def test_the_audit_settings_are_part_of_a_run_identity_only_when_on(tmp_path):
    off = {s.label: s.run_id for s in plan_study(study(tmp_path, audit={"enabled": False, "canaries": 50}))}
    assert off == {s.label: s.run_id for s in plan_study(study(tmp_path, audit={}))}
    on = {s.label: s.run_id for s in plan_study(study(tmp_path))}
    assert set(on.values()).isdisjoint(off.values())


# --- data ----------------------------------------------------------------------------------

def test_audit_canaries_are_trained_on_when_in_and_never_members_nonmembers_or_exposure_canaries(tmp_path):
    recs = build_study_records(study(tmp_path))
    plain = build_study_records(study(tmp_path, audit={}))
    assert len(recs.audit.records) == M and 0 < sum(recs.audit.trained) < M
    # the records every measure and attack reads are those of the study without the audit
    for part in ("members", "nonmembers", "canaries", "poisoned"):
        assert getattr(recs, part) == getattr(plain, part)
    audit_ids = {r.id for r in recs.audit.records}
    inside = {r.id for r, t in zip(recs.audit.records, recs.audit.trained) if t}
    assert {r.id for r in recs.train} - {r.id for r in plain.train} == inside
    assert audit_ids.isdisjoint(r.id for r in recs.members + recs.nonmembers)
    assert all(r.individual == r.id and r.meta[AUDIT_META] for r in recs.audit.records)  # each its own person


def test_the_in_out_draw_is_the_same_for_every_method_and_training_seed_and_comes_from_its_own_stream(tmp_path):
    trained = build_study_records(study(tmp_path)).audit.trained
    other = build_study_records(study(tmp_path, methods=[{"method": "lora", "lora": {"r": 4}}], seeds=[3, 4],
                                      canaries={"enabled": False}, backdoor={"enabled": True}))
    assert other.audit.trained == trained == audit_membership(M, 0)
    expected = np.random.default_rng(streams.stream_seed(0, streams.AUDIT_CANARIES)).random(M) < 0.5
    assert trained == expected.tolist()
    batches = np.random.default_rng(streams.stream_seed(0, streams.BATCHES)).random(M) < 0.5
    assert trained != batches.tolist()
    assert audit_membership(2 * M, 0)[:M] == trained  # more canaries keep the draw of the first ones
    assert build_study_records(study(tmp_path, data={"source": "customer-sim", "n_individuals": 16,
                                                     "max_length": 64, "seed": 1})).audit.trained != trained


def test_the_data_digest_holds_the_audit_canaries_and_their_draw(tmp_path):
    recs = build_study_records(study(tmp_path))
    assert recs.digest() != build_study_records(study(tmp_path, audit={})).digest()
    flipped = copy.deepcopy(recs)
    flipped.audit.trained[0] = not flipped.audit.trained[0]
    assert flipped.digest() != recs.digest()


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def test_dp_counts_each_in_audit_canary_as_a_person_of_its_own(tmp_path, tiny):
    cfg = study(tmp_path)
    data = build_study_data(cfg, tiny.tokenizer)
    plain = build_study_data(study(tmp_path, audit={}), tiny.tokenizer)
    for unit in ("individual", "record"):
        assert privacy_units(data.train, unit).count == \
            privacy_units(plain.train, unit).count + sum(data.audit_trained)
    assert len(data.audit) == M and data.summary()["audit_canaries_trained"] == sum(data.audit_trained)


def test_an_audit_canary_longer_than_max_length_is_an_error(tmp_path, tiny):
    recs = build_study_records(study(tmp_path))
    with pytest.raises(PrivtuneError, match="audit canary audit-canary-.* does not fit in data.max_length=16"):
        encode_audit_canaries(recs.audit, tiny.tokenizer, 16)


def test_federated_clients_share_out_audit_canaries_like_exposure_canaries(tmp_path):
    recs = build_study_records(study(tmp_path))
    plain = build_study_records(study(tmp_path, audit={}))
    rows = split_clients(recs.train, 3, "iid", 1.0, seed=0)
    owner = {i: c for c, rs in enumerate(rows) for i in rs}
    assert sorted(owner) == list(range(len(recs.train)))
    holders = {owner[i] for i, r in enumerate(recs.train) if r.meta.get(AUDIT_META)}
    assert len(holders) == 3  # spread over the clients, each canary on one
    # members sit with the same clients as without the audit
    assert [[i for i in r if i < len(recs.members)] for r in rows] == \
        [[i for i in r if i < len(plain.members)] for r in split_clients(plain.train, 3, "iid", 1.0, seed=0)]


# --- scores and the bound ------------------------------------------------------------------

def test_canary_scores_match_a_per_canary_loop_over_the_secret_tokens(tmp_path, tiny):
    records = make_audit_canaries("random", DesignInputs(6, seed=0))
    data = encode_records(records, tiny.tokenizer, 64)
    trained = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    runtime = resolve_runtime("cpu", "fp32")
    fast = canary_scores(score_tokens(trained, data, runtime, batch_size=4),
                         score_tokens(tiny.model, data, runtime, batch_size=4))

    def secret_nll(model, record) -> float:
        enc = tiny.tokenizer(record.text, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        span = record.spans[0]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        return -sum(float(logp[t - 1, ids[0, t]]) for t, (a, b) in enumerate(enc["offset_mapping"])
                    if t > 0 and a < span.end and span.start < b)

    slow = [secret_nll(tiny.model, r) - secret_nll(trained, r) for r in records]
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-4)


def test_the_bound_uses_the_runs_dp_delta_else_the_configured_or_default_one(tmp_path):
    settings = study(tmp_path).privacy_audit
    rng = np.random.default_rng(0)
    trained = rng.random(200) < 0.5
    scores = rng.normal(size=200) + 4 * trained
    dp = {"epsilon": 8.0, "delta": 1e-4}
    out = audit_result(scores, trained, settings=settings, dp=dp, seed=0)
    assert (out["delta"], out["delta_source"], out["claimed_epsilon"]) == (1e-4, "the run's DP δ", 8.0)
    reference = empirical_epsilon(scores[trained], scores[~trained], delta=1e-4, seed=0)
    assert out["lower_bound"] == reference.lower_bound > 0
    assert out["gdp_lower_bound"] == empirical_epsilon(scores[trained], scores[~trained], delta=1e-4, seed=0,
                                                       bound="gdp").lower_bound
    plain = audit_result(scores, trained, settings=settings, dp=None, seed=0)
    assert (plain["delta"], plain["claimed_epsilon"]) == (1e-5, None)
    fixed = audit_result(scores, trained, settings=settings.model_copy(update={"delta": 1e-6}), dp=dp, seed=0)
    assert (fixed["delta"], fixed["delta_source"]) == (1e-6, "privacy_audit.delta")


def test_too_few_canaries_give_no_bound_but_a_reason(tmp_path):
    settings = study(tmp_path).privacy_audit
    out = audit_result(np.arange(10.0), [True, False] * 5, settings=settings, dp=None, seed=0)
    assert out["lower_bound"] is None and out["gdp_lower_bound"] is None
    assert f"at least {MIN_CANARIES}" in out["reason"]


def test_a_study_stores_each_runs_bound_on_its_canary_scores_and_reports_it(tmp_path):
    from privtune.report.export import write_csv, write_json
    from privtune.report.html import render_html
    from privtune.study.driver import open_store, run_study

    cfg = study(tmp_path, methods=[{"method": "fft"}], canaries={"enabled": False},
                attacks={"enabled": False}, save_artifacts=False)
    assert run_study(cfg, show_progress=False).failed == {}
    store = open_store(cfg)
    runs = {r["label"]: r for r in store.runs("audited")}
    store.close()
    audit = runs["fft"]["empirical_epsilon"]
    trained = build_study_records(cfg).audit.trained
    assert (len(audit["in_scores"]), len(audit["out_scores"])) == (sum(trained), M - sum(trained))
    again = empirical_epsilon(audit["in_scores"], audit["out_scores"], delta=audit["delta"],
                              confidence=audit["confidence"], seed=cfg.data.seed)
    assert audit["lower_bound"] == again.lower_bound and (audit["guesses"], audit["correct"]) == \
        (again.guesses, again.correct)
    assert audit["claimed_epsilon"] is None and audit["delta_source"].startswith("1e-05")
    assert runs["base"]["empirical_epsilon"]["lower_bound"] is None
    assert "not trained" in runs["base"]["empirical_epsilon"]["reason"]
    assert any(s["stage"] == "privacy audit" for s in runs["fft"]["timing"]["stages"])
    assert runs["fft"]["data"]["audit_canaries"] == M

    listed = list(runs.values())
    exported = json.loads(write_json(listed, tmp_path / "runs.json").read_text())
    assert next(r for r in exported if r["label"] == "fft")["empirical_epsilon"]["in_scores"] == audit["in_scores"]
    rows = {r["label"]: r for r in csv.DictReader(open(write_csv(listed, tmp_path / "runs.csv")))}
    assert float(rows["fft"]["empirical_epsilon_lower_bound"]) == audit["lower_bound"]
    assert rows["base"]["empirical_epsilon_lower_bound"] == "" and "not trained" in rows["base"]["empirical_epsilon_na"]
    page = render_html(listed, title="t", meta={})
    section = page[page.index('id="empirical-epsilon"'):]
    section = section[:section.index("</section>")]
    assert "it is not an estimate of the true ε" in section and "none <small>(not DP)</small>" in section
    assert f"{audit['lower_bound']:.3g}</td>" in section and "n/a <small>the base model is not trained" in section


def test_a_study_without_the_audit_reports_no_section(tmp_path):
    from privtune.report.html import render_html

    run = {"label": "fft", "method": "fft", "status": "done",
           "empirical_epsilon": {"lower_bound": None, "gdp_lower_bound": None, "claimed_epsilon": None,
                                 "reason": "privacy_audit is off"}}
    assert 'id="empirical-epsilon"' not in render_html([run], title="t", meta={})


def test_no_forget_set_holds_an_audit_canary(tmp_path):
    from privtune.config import ForgetSettings
    from privtune.study.forget import ForgetSet, resolve_forget_set

    recs = build_study_records(study(tmp_path))
    forget = ForgetSet(resolve_forget_set(ForgetSettings(fraction=0.5), recs.members, recs.nonmembers))
    rows, rest = forget.rows(recs.train)
    assert rows and not any(recs.train[i].meta.get(AUDIT_META) for i in rows)
    with pytest.raises(PrivtuneError, match="names no known individual"):
        resolve_forget_set(ForgetSettings(individuals=[recs.audit.records[0].individual]),
                           recs.members, recs.nonmembers)
