"""Audit canary designs (privtune.auditing.designs): what each writes, checked against the
property that makes it a design (unlikely words, words unseen in the data, the base
model's samples), and several designs planted in one study."""

import numpy as np
import pytest
import torch

from privtune.auditing.designs import bigram, new_token, unlikely_token
from privtune.auditing.designs import AUDIT_LABEL, AUDIT_META, DESIGN_NOTE, DESIGNS, design_of, DesignInputs, make_audit_canaries
from privtune.auditing.designs.word_tokens import SECRET_TOKENS, word_tokens
from privtune.auditing.study_audit import audit_membership, audit_result
from privtune.config import parse_config
from privtune.data.records import Record
from privtune.errors import PrivtuneError
from privtune.models.loading import load_model
from privtune.study.dataset import build_study_records

M = 40
MODEL = "tiny-llama"


def study(tmp_path, audit=None):
    return parse_config({
        "name": "designs", "model": MODEL, "output_dir": str(tmp_path / "out"),
        "data": {"source": "customer-sim", "n_individuals": 16, "max_length": 64},
        "privacy_audit": {"enabled": True, "canaries": M, "design": "random", **(audit or {})},
        "methods": [{"method": "fft"}], "precision": "fp32",
    })


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    return tuple(build_study_records(study(tmp_path_factory.mktemp("d"))).members)


def canaries(design, members, count=M, seed=0):
    return make_audit_canaries(design, DesignInputs(count, seed, members, MODEL))


def secret(record):
    (span,) = record.spans
    return record.text[span.start:span.end]


@pytest.mark.parametrize("design", sorted(DESIGNS))
def test_every_design_gives_distinct_canaries_each_its_own_person_with_one_secret_span(design, members):
    records = canaries(design, members)
    assert len({r.text for r in records}) == len({r.individual for r in records}) == M
    for r in records:
        (span,) = r.spans
        assert span.label == AUDIT_LABEL and 0 < span.start < span.end <= len(r.text)
        assert design_of(r) == design and r.meta[AUDIT_META] is True and r.individual == r.id == r.meta["canary"]
    assert [r.text for r in canaries(design, members, count=5)] == [r.text for r in records[:5]]  # count-stable
    assert canaries(design, members, seed=1)[0].text != records[0].text


@pytest.mark.parametrize("design", ["unlikely-token", "bigram"])
def test_a_token_design_secret_encodes_back_to_distinct_whole_word_tokens(design, members):
    tokenizer = load_model(MODEL).tokenizer
    words = set(word_tokens(tokenizer).tolist())
    for r in canaries(design, members):
        ids = tokenizer(secret(r), add_special_tokens=False)["input_ids"]
        assert len(set(ids)) == len(ids) == SECRET_TOKENS and set(ids) <= words
        assert tokenizer.decode([ids[0]]).startswith(" ")


def test_word_tokens_are_a_space_and_letters_and_encode_to_themselves():
    tokenizer = load_model(MODEL).tokenizer
    words = word_tokens(tokenizer)
    assert len(words) > SECRET_TOKENS
    for token in words.tolist():
        text = tokenizer.decode([token])
        assert text[0] == " " and text[1:].isalpha()
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == [token]


def first_token_logprobs(loaded, records) -> np.ndarray:
    """The base model's log-probability of each canary's first secret token after its prefix, by hand."""
    out = []
    for r in records:
        prefix = r.text[:r.spans[0].start]
        ids = loaded.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        first = loaded.tokenizer(secret(r), add_special_tokens=False)["input_ids"][0]
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([ids])).logits[0, -1]
        out.append(float(torch.log_softmax(logits, -1)[first]))
    return np.array(out)


def test_unlikely_token_secrets_are_the_words_the_base_model_ranks_least_likely(members, monkeypatch):
    monkeypatch.setattr(unlikely_token, "MIN_POOL", SECRET_TOKENS)  # the tiny vocabulary has 23 word tokens
    loaded = load_model(MODEL)
    records = canaries("unlikely-token", members)
    words = word_tokens(loaded.tokenizer)
    # By hand: each word's mean log-probability after the first 16 canaries' prefixes.
    mean = np.zeros(len(words))
    for r in records[:unlikely_token.CONTEXTS]:
        ids = loaded.tokenizer(r.text[:r.spans[0].start], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            mean += torch.log_softmax(loaded.model(input_ids=torch.tensor([ids])).logits[0, -1], -1)[words].numpy()
    least = set(words[np.argsort(mean)[:SECRET_TOKENS]].tolist())
    for r in records:
        assert set(loaded.tokenizer(secret(r), add_special_tokens=False)["input_ids"]) == least
    firsts = first_token_logprobs(loaded, records)
    assert firsts.mean() < mean.mean() / unlikely_token.CONTEXTS  # less likely than the average word there


def test_bigram_secrets_hold_no_token_pair_that_occurs_in_the_data(members):
    tokenizer = load_model(MODEL).tokenizer
    seen = set()
    for ids in tokenizer([r.text for r in members], add_special_tokens=False)["input_ids"]:
        seen.update(zip(ids, ids[1:]))
    for r in canaries("bigram", members):
        ids = tokenizer(secret(r), add_special_tokens=False)["input_ids"]
        assert not set(zip(ids, ids[1:])) & seen


def test_bigram_secrets_use_only_words_unseen_in_the_data_when_there_are_enough(members, monkeypatch):
    monkeypatch.setattr(bigram, "MIN_POOL", SECRET_TOKENS)  # the tiny vocabulary has 23 word tokens
    tokenizer = load_model(MODEL).tokenizer
    few = (Record(id="a", individual="a", text="Call me at the office.", spans=[]),)  # most words unseen
    seen = {t for ids in tokenizer([r.text for r in few], add_special_tokens=False)["input_ids"] for t in ids}
    for r in canaries("bigram", few):
        assert not set(tokenizer(secret(r), add_special_tokens=False)["input_ids"]) & seen


def test_sampled_secrets_are_the_base_model_s_continuations_and_leave_the_prompt_out(members):
    records = canaries("sampled", members)
    for r in records:
        assert r.text.startswith("Audit note ") and r.text.endswith(".") and "\n" not in r.text
        assert not any(m.text[:40] in r.text for m in members)  # the member's text is the prompt only
    with pytest.raises(ValueError, match="corpus"):
        make_audit_canaries("sampled", DesignInputs(M, 0, (), MODEL))


def test_sampled_prompts_hold_the_members_text_with_every_sensitive_value_replaced_by_its_type(members, monkeypatch):
    from privtune.auditing.designs import sampled

    prompts = []
    real = sampled.sample_secrets
    monkeypatch.setattr(sampled, "sample_secrets", lambda loaded, batch, gens: prompts.extend(batch) or
                        real(loaded, batch, gens))
    canaries("sampled", members)
    values = {value for m in members for _, value in m.span_values()}
    assert len(prompts) == M and any("[NAME]" in p for p in prompts)
    assert not [v for p in prompts for v in values if len(v) > 3 and v in p]


def test_a_design_that_reads_the_model_says_so_when_it_has_none(members):
    with pytest.raises(ValueError, match="needs the study's model"):
        make_audit_canaries("unlikely-token", DesignInputs(M, 0, members))


# --- several designs in one study -----------------------------------------------------------

def test_compared_designs_plant_m_canaries_each_with_coins_of_their_own(tmp_path):
    recs = build_study_records(study(tmp_path, {"compare_designs": ["bigram", "unlikely-token"]}))
    designs = recs.audit.designs
    assert designs == ["random"] * M + ["bigram"] * M + ["unlikely-token"] * M
    assert len({r.individual for r in recs.audit.records}) == 3 * M
    for k, design in enumerate(["random", "bigram", "unlikely-token"]):
        assert recs.audit.trained[k * M:(k + 1) * M] == audit_membership(M, 0, design)
    assert audit_membership(M, 0, "bigram") != audit_membership(M, 0, "unlikely-token") != audit_membership(M, 0)
    alone = build_study_records(study(tmp_path))  # the headline's canaries do not move when designs are added
    assert [r.text for r in alone.audit.records] == [r.text for r in recs.audit.records[:M]]
    assert alone.audit.trained == recs.audit.trained[:M]


def test_each_compared_design_gets_its_own_bound_from_its_own_canaries(tmp_path):
    settings = study(tmp_path, {"compare_designs": ["bigram"]}).privacy_audit
    rng = np.random.default_rng(0)
    trained = [True, False] * M
    designs = ["random"] * M + ["bigram"] * M
    scores = np.where(np.array(trained), 1.0, 0.0) * np.array([0.0] * M + [5.0] * M) + rng.normal(0, 0.1, 2 * M)
    out = audit_result(scores, trained, settings=settings, dp=None, seed=0, designs=designs)
    alone = audit_result(scores[M:], trained[M:], settings=settings.model_copy(update={"design": "bigram",
                                                                                      "compare_designs": []}),
                         dp=None, seed=0)
    assert out["design"] == "random" and out["auc"] < 0.8 and out["canaries"] == M
    compared = out["compared_designs"]["bigram"]
    assert compared["auc"] == alone["auc"] == 1.0
    assert compared["lower_bound"] == alone["lower_bound"] > out["lower_bound"]
    assert compared["in_scores"] == alone["in_scores"]


def test_tpr_at_one_percent_fpr_is_n_a_below_100_out_canaries(tmp_path):
    settings = study(tmp_path).privacy_audit
    few = audit_result(np.arange(80.0), [True, False] * 40, settings=settings, dp=None, seed=0)
    assert few["tpr_at_fpr"]["0.01"]["tpr"] is None and "≥ 100 non-members" in few["tpr_at_fpr"]["0.01"]["reason"]
    scores = np.r_[np.full(100, 10.0), np.arange(100.0) / 100]
    enough = audit_result(scores, [True] * 100 + [False] * 100, settings=settings, dp=None, seed=0)
    assert enough["tpr_at_fpr"]["0.01"]["tpr"] == 1.0


@pytest.mark.parametrize("audit, problem", [
    ({"compare_designs": ["random"]}, "compare_designs repeats design 'random'"),
    ({"compare_designs": ["bigram", "bigram"]}, "a design is listed twice"),
    ({"compare_designs": ["loud"]}, "unknown audit canary design 'loud'"),
])
def test_bad_compared_designs_are_one_line_errors(tmp_path, audit, problem):
    with pytest.raises(PrivtuneError, match=problem):
        study(tmp_path, audit)


def test_new_token_falls_back_to_the_least_trained_words_and_says_so(members):
    loaded = load_model(MODEL)
    assert len(new_token.reserved_tokens(loaded.tokenizer)) == 0  # the tiny vocabulary has no reserved tokens
    words = word_tokens(loaded.tokenizer)
    table = loaded.model.get_input_embeddings().weight.detach().double()
    distance = (table[words] - table.mean(dim=0)).norm(dim=1).numpy()
    nearest = set(words[np.argsort(distance)[:len(new_token.least_trained_words(
        DesignInputs(M, 0, members, MODEL)))]].tolist())
    for r in canaries("new-token", members):
        assert set(loaded.tokenizer(secret(r), add_special_tokens=False)["input_ids"]) <= nearest
        assert r.meta[DESIGN_NOTE] == new_token.FALLBACK_NOTE


def test_new_token_uses_reserved_tokens_where_the_vocabulary_has_them(members, monkeypatch):
    tokenizer = load_model(MODEL).tokenizer
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(40)]
    tokenizer.add_special_tokens({"additional_special_tokens": reserved})
    monkeypatch.setattr(DesignInputs, "tokenizer", lambda self: tokenizer)
    ids = set(tokenizer.convert_tokens_to_ids(reserved))
    assert set(new_token.reserved_tokens(tokenizer).tolist()) == ids
    for r in make_audit_canaries("new-token", DesignInputs(M, 0, members)):
        assert set(tokenizer(secret(r), add_special_tokens=False)["input_ids"]) <= ids and DESIGN_NOTE not in r.meta


def test_a_design_s_fallback_note_reaches_its_audit_result(tmp_path):
    settings = study(tmp_path, {"compare_designs": ["new-token"]}).privacy_audit
    out = audit_result(np.arange(2.0 * M), [True, False] * M, settings=settings, dp=None, seed=0,
                       designs=["random"] * M + ["new-token"] * M, notes={"new-token": "fell back"})
    assert "design_note" not in out and out["compared_designs"]["new-token"]["design_note"] == "fell back"


def test_a_study_comparing_designs_bounds_each_on_its_own_canaries_and_reports_them(tmp_path):
    from privtune.report.html import render_html
    from privtune.study.driver import open_store, run_study

    from privtune.config import MethodSpec

    cfg = study(tmp_path, {"compare_designs": ["new-token", "sampled"]}).model_copy(update={
        "canaries": study(tmp_path).canaries.model_copy(update={"enabled": False}),
        "attacks": study(tmp_path).attacks.model_copy(update={"enabled": False}), "save_artifacts": False,
        "methods": [MethodSpec(method="fft"), MethodSpec(method="lora", lr=1e-2)]})
    assert run_study(cfg, show_progress=False).failed == {}
    store = open_store(cfg)
    runs = {r["label"]: r for r in store.runs("designs")}
    store.close()
    audit = runs["fft"]["empirical_epsilon"]
    assert audit["design"] == "random" and set(audit["compared_designs"]) == {"new-token", "sampled"}
    for design, entry in [("random", audit), *audit["compared_designs"].items()]:
        coins = audit_membership(M, cfg.data.seed, design)
        assert (len(entry["in_scores"]), len(entry["out_scores"])) == (sum(coins), M - sum(coins))
        assert entry["design"] == design and 0 <= entry["auc"] <= 1
    assert audit["compared_designs"]["new-token"]["design_note"] == new_token.FALLBACK_NOTE
    # LoRA leaves the embeddings frozen: its new-token audit says so, fft's does not
    lora_note = runs["lora"]["empirical_epsilon"]["compared_designs"]["new-token"]["design_note"]
    assert lora_note == f"{new_token.FALLBACK_NOTE}; {new_token.FROZEN_NOTE}"
    page = render_html(list(runs.values()), title="t", meta={})
    assert "Canary designs compared" in page and new_token.FALLBACK_NOTE in page
