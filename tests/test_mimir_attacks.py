"""DC-PDD, ReCaLL and GradNorm against slow per-record loops on a tiny model, and in a study."""

from collections import Counter

import numpy as np
import pytest
import torch

from privtune.attacks.mia import AttackInputs, get_attack, score_attacks
from privtune.attacks.model_attacks import ModelAttackInputs, get_model_attack, recall_prefix_rows
from privtune.attacks.token_frequency import reference_frequencies
from privtune.config import parse_config
from privtune.data.corpora import generate_corpus
from privtune.data.split import split_by_individual
from privtune.data.tokenize import encode_records
from privtune.errors import PrivtuneError
from privtune.measures.token_scores import score_tokens
from privtune.models.tiny import tiny_model, tiny_tokenizer
from privtune.train.precision import Runtime

CPU = Runtime(torch.device("cpu"), "fp32")
LEVELS = ("record", "sensitive")


@pytest.fixture(scope="module")
def population():
    records = generate_corpus("customer-sim", 16, seed=3)
    members, nonmembers = split_by_individual(records, 0.5, seed=0)
    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=1)
    enc = encode_records(members, tok, 48), encode_records(nonmembers, tok, 48)
    # both levels are exercised: some records of each side have sensitive tokens, some none
    assert all(0 < e.sensitive.any(dim=1).sum() < len(e) for e in enc)
    return model, tok, enc, tuple(score_tokens(model, e, CPU) for e in enc)


def _record(data, i):
    """(token ids of record i, its (n-1,) target-position masks per level)."""
    n = int(data.attention_mask[i].sum())
    ids = data.input_ids[i, :n]
    sensitive = data.sensitive[i, 1:n].numpy()
    return ids, {"record": np.ones(n - 1, bool), "sensitive": sensitive}


def _nll(model, ids: torch.Tensor) -> np.ndarray:
    """NLL of tokens 1.. of ``ids`` given the ones before, one unpadded sequence, in float64."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, :-1].double()
    return -torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0].numpy()


def test_dc_pdd_equals_a_per_record_loop(population):
    model, tok, (members, nonmembers), scores = population
    frequencies = reference_frequencies(members, nonmembers, len(tok))
    vocab, a = len(tok), 0.01
    corpus = [Counter(_record(nonmembers, i)[0].tolist()) for i in range(len(nonmembers))]
    for side, (data, s, freq) in enumerate(zip((members, nonmembers), scores, frequencies)):
        for level in LEVELS:
            got = get_attack("dc_pdd")(AttackInputs(s, s.valid if level == "record" else s.sensitive,
                                                    np.ones(len(data)), frequencies=freq, dc_pdd_a=a))
            for i in range(len(data)):
                ids, masks = _record(data, i)
                # the reference corpus: every non-member record but this one
                counts = sum((c for j, c in enumerate(corpus) if not (side == 1 and j == i)), Counter())
                total = sum(counts.values())
                probs = np.exp(-_nll(model, ids))
                seen, terms = set(), []
                for t, token in enumerate(ids[1:].tolist()):
                    if masks[level][t] and token not in seen:
                        seen.add(token)
                        f = (1 + counts[token]) / (total + vocab)
                        terms.append(min(probs[t] * np.log(1 / f), a))
                expected = np.mean(terms) if terms else np.nan
                assert got[i] == pytest.approx(expected, rel=1e-5, nan_ok=True), (side, level, i)


def test_dc_pdd_works_through_records_in_blocks_with_the_same_result(population, monkeypatch):
    from privtune.attacks import token_frequency

    _, tok, (members, nonmembers), _ = population
    whole = reference_frequencies(members, nonmembers, len(tok))
    positions = np.random.default_rng(0).random(whole[1].ids.shape) < 0.7
    first = token_frequency.first_occurrences(whole[1].ids, positions)
    monkeypatch.setattr(token_frequency, "BLOCK", 3)  # blocks of 3 records, the last one short
    blocked = reference_frequencies(members, nonmembers, len(tok))
    for a, b in zip(whole, blocked):
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.log_frequency, b.log_frequency)
    assert np.array_equal(token_frequency.first_occurrences(whole[1].ids, positions), first)


def test_recall_equals_a_per_record_loop_and_never_scores_its_prefix(population):
    model, _, (members, nonmembers), scores = population
    inputs = ModelAttackInputs(members, nonmembers, scores, CPU, batch_size=4, seed=5, recall_prefix_records=2)
    got = get_model_attack("recall")(model, inputs)
    rows, scored = recall_prefix_rows(nonmembers, 2, seed=5)
    assert len(set(rows)) == 2
    prefix_people = {nonmembers.records[i].individual for i in rows}
    assert [r.individual not in prefix_people for r in nonmembers.records] == scored.tolist()
    assert not scored[rows].any() and scored.any()
    prefix = torch.cat([_record(nonmembers, i)[0] for i in rows])
    for side, data in enumerate((members, nonmembers)):
        for i in range(len(data)):
            ids, masks = _record(data, i)
            plain = _nll(model, ids)
            conditioned = _nll(model, torch.cat([prefix, ids]))[len(prefix):]  # the record's tokens after its first
            for level in LEVELS:
                pos = masks[level]
                expected = conditioned[pos].mean() / plain[pos].mean() if pos.any() else np.nan
                if side == 1 and not scored[i]:
                    expected = np.nan
                assert got[level][side][i] == pytest.approx(expected, rel=1e-4, nan_ok=True), (side, level, i)
    # another seed draws another prefix
    assert recall_prefix_rows(nonmembers, 2, seed=6)[0] != rows
    with pytest.raises(PrivtuneError, match="leaves none"):
        recall_prefix_rows(nonmembers, len(nonmembers), seed=0)


def test_gradnorm_equals_a_per_record_loop_over_every_parameter_of_a_lora_model(population):
    from peft import LoraConfig, get_peft_model

    _, _, (members, nonmembers), _ = population
    model = get_peft_model(tiny_model("llama", seed=2), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    assert not all(trainable.values())  # the base weights are frozen
    scores = tuple(score_tokens(model, e, CPU) for e in (members, nonmembers))
    got = get_model_attack("gradnorm")(model, ModelAttackInputs(members, nonmembers, scores, CPU))
    assert {name: p.requires_grad for name, p in model.named_parameters()} == trainable  # restored

    reference = get_peft_model(tiny_model("llama", seed=2), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    reference.load_state_dict(model.state_dict())
    params = list(reference.parameters())
    for p in params:
        p.requires_grad_(True)
    for side, data in enumerate((members, nonmembers)):
        for i in range(len(data)):
            ids, masks = _record(data, i)
            for level in LEVELS:
                pos = torch.as_tensor(masks[level])
                if not pos.any():
                    assert np.isnan(got[level][side][i])
                    continue
                reference.zero_grad()
                logits = reference(input_ids=ids[None]).logits[0, :-1].double()
                nll = -torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0]
                nll[pos].mean().backward()
                norms = [p.grad.abs().max().item() for p in params if p.grad is not None]
                assert got[level][side][i] == pytest.approx(-np.mean(norms), rel=1e-4), (side, level, i)


def test_model_attacks_need_their_scores_and_dc_pdd_its_frequencies(population):
    _, _, (members, nonmembers), (sm, sn) = population
    args = (sm, sn, None, None, members.records, nonmembers.records)
    names = {e["attack"] for e in score_attacks(*args)}
    assert "dc_pdd" not in names and "recall" not in names  # by default only what its inputs allow
    with pytest.raises(PrivtuneError, match="recall attack needs the model"):
        score_attacks(*args, attacks=["recall"])
    with pytest.raises(PrivtuneError, match="dc_pdd attack needs"):
        score_attacks(*args, attacks=["dc_pdd"])


def test_config_accepts_the_new_attacks_and_rejects_unknown_ones():
    base = {"name": "t", "model": "tiny-llama", "methods": [{"method": "fft"}]}
    cfg = parse_config({**base, "attacks": {"mia": {"attacks": ["dc_pdd", "recall", "gradnorm"],
                                                    "recall_prefix_records": 2}}})
    assert cfg.attacks.mia.attacks == ["dc_pdd", "recall", "gradnorm"] and cfg.attacks.mia.dc_pdd_a == 0.01
    with pytest.raises(PrivtuneError, match="unknown attack 'recal'.*dc_pdd, recall, gradnorm"):
        parse_config({**base, "attacks": {"mia": {"attacks": ["recal"]}}})


def test_a_study_reports_the_new_attacks_with_their_advantage_over_base(tmp_path):
    from privtune.study.driver import open_store, run_study

    names = ["loss", "dc_pdd", "recall", "gradnorm"]
    cfg = parse_config({
        "name": "tiny", "model": "tiny-llama", "output_dir": str(tmp_path / "out"),
        "data": {"source": "customer-sim", "n_individuals": 40, "max_length": 32},
        "canaries": {"enabled": False}, "train": {"epochs": 1, "batch_size": 4}, "methods": [{"method": "fft"}],
        "attacks": {"mia": {"attacks": names, "recall_prefix_records": 1}, "extraction": {"enabled": False}},
        "precision": "fp32", "eval_batch_size": 8})
    assert run_study(cfg, show_progress=False).failed == {}
    store = open_store(cfg)
    runs = {r["label"]: r for r in store.runs("tiny")}
    store.close()
    for label in ("base", "fft"):
        entries = {(e["attack"], e["level"]): e for e in runs[label]["attacks"]["mia"]}
        assert {name for name, level in entries if level == "record"} == set(names)
        for name in names:
            assert 0 <= entries[name, "record"]["auc"] <= 1
    fft = {e["attack"]: e for e in runs["fft"]["attacks"]["mia"] if e["level"] == "record"}
    assert fft["recall"]["n_nonmembers"] < fft["loss"]["n_nonmembers"]  # the prefix's records are not scored
    for name in ("dc_pdd", "recall", "gradnorm"):
        assert fft[name]["advantage"] == pytest.approx(fft[name]["auc"] - fft[name]["base_auc"])
    assert {"recall attack", "gradnorm attack"} <= {s["stage"] for s in runs["fft"]["timing"]["stages"]}
