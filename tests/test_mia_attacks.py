"""Score-based attacks against direct computations, and on models that did / did not train."""

import zlib

import numpy as np
import pytest
import torch

from privtune.attacks.mia import ATTACKS, AttackInputs, get_attack, score_attacks
from privtune.attacks.token_frequency import TokenFrequencies
from privtune.data.corpora import generate_corpus
from privtune.data.records import Record, Span
from privtune.data.split import split_by_individual
from privtune.data.tokenize import encode_records
from privtune.errors import PrivtuneError
from privtune.measures.token_scores import TokenScores, score_tokens
from privtune.models.tiny import tiny_model, tiny_tokenizer
from privtune.train.losses import per_record_loss
from privtune.train.precision import Runtime

CPU = Runtime(torch.device("cpu"), "fp32")


def random_scores(n=7, width=12, seed=0):
    rng = np.random.default_rng(seed)
    valid = np.arange(width)[None, :] < rng.integers(1, width + 1, n)[:, None]
    return TokenScores(nll=rng.gamma(2.0, 1.0, (n, width)), mu=rng.normal(-3, 1, (n, width)),
                       sigma=rng.uniform(0.5, 2, (n, width)), valid=valid,
                       sensitive=valid & (rng.random((n, width)) < 0.4))


def test_loss_and_zlib_by_hand():
    nll = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 9.0]])
    valid = np.array([[True, True, True], [True, True, False]])
    s = TokenScores(nll, np.zeros_like(nll), np.ones_like(nll), valid, valid)
    x = AttackInputs(s, valid, np.array([10.0, 4.0]))
    assert get_attack("loss")(x) == pytest.approx([-2.0, -0.5])
    # mean NLL (log-perplexity) over zlib bytes: Carlini et al. 2021, MIMIR's zlib.py
    assert get_attack("zlib")(x) == pytest.approx([-2.0 / 10, -0.5 / 4])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [0.2, 0.5, 1.0])
def test_min_k_and_min_k_pp_equal_a_direct_per_record_loop(seed, k):
    s = random_scores(seed=seed)
    x = AttackInputs(s, s.valid, np.ones(7), k=k)
    got_k, got_pp = get_attack("min_k")(x), get_attack("min_k_pp")(x)
    for i in range(7):
        idx = np.flatnonzero(s.valid[i])
        take = max(1, int(k * len(idx)))  # the papers' code: int(n * k), at least one
        logp = sorted(-s.nll[i, idx])
        assert got_k[i] == pytest.approx(np.mean(logp[:take]))
        z = sorted((-s.nll[i, t] - s.mu[i, t]) / s.sigma[i, t] for t in idx)
        assert got_pp[i] == pytest.approx(np.mean(z[:take]))


def test_min_k_takes_the_floor_of_k_n_tokens():
    """Seven tokens at k = 0.2: floor(1.4) = 1 token, the lowest; at k = 0.5: floor(3.5) = 3."""
    logp = np.array([[-1.0, -5.0, -2.0, -4.0, -3.0, -0.5, -6.0]])
    valid = np.ones_like(logp, dtype=bool)
    s = TokenScores(-logp, np.zeros_like(logp), np.ones_like(logp), valid, valid)
    assert get_attack("min_k")(AttackInputs(s, valid, np.ones(1), k=0.2)) == pytest.approx([-6.0])
    assert get_attack("min_k")(AttackInputs(s, valid, np.ones(1), k=0.5)) == pytest.approx([-5.0])
    assert get_attack("min_k_pp")(AttackInputs(s, valid, np.ones(1), k=0.5)) == pytest.approx([-5.0])
    assert get_attack("min_k")(AttackInputs(s, valid, np.ones(1), k=0.1)) == pytest.approx([-6.0])  # at least 1


def _scored_characters(text: str, kept: list[tuple[int, int]], span: Span) -> str:
    """The characters of ``span`` covered by the kept tokens, found token by token."""
    covered = set()
    for a, b in kept:
        covered.update(range(max(a, span.start), min(b, span.end)))
    return "".join(text[c] for c in sorted(covered))


def test_zlib_scores_exactly_the_trained_window_by_hand():
    """A record truncated at max_length tokens: zlib compresses the text its kept tokens
    cover (and at sensitive level the parts of values they cover), and divides their
    mean NLL by that length."""
    from privtune.attacks.mia import zlib_lengths
    from privtune.data.tokenize import trained_windows

    tok, max_length = tiny_tokenizer(), 14
    long_text = "Call Jane Doe at 555-0100 now, or write to jane.doe@example.com about order 991."
    spans = [Span(long_text.index(v), long_text.index(v) + len(v), label) for v, label in
             (("Jane Doe", "NAME"), ("555-0100", "PHONE"), ("jane.doe@example.com", "EMAIL"))]
    records = [Record("a", "a", long_text, spans), Record("b", "b", "Hi Bo Li!", [Span(3, 8, "NAME")])]
    data = encode_records(records, tok, max_length)
    rng = np.random.default_rng(0)
    valid = data.attention_mask[:, 1:].numpy() == 1
    nll = rng.gamma(2.0, 1.0, valid.shape)
    scores = TokenScores(nll, np.zeros_like(nll), np.ones_like(nll), valid, data.sensitive[:, 1:].numpy() & valid)
    windows = trained_windows(records, tok, max_length)
    for level, positions in (("record", scores.valid), ("sensitive", scores.sensitive)):
        got = get_attack("zlib")(AttackInputs(scores, positions, zlib_lengths(windows, level)))
        for i, record in enumerate(records):
            kept = tok(record.text, return_offsets_mapping=True)["offset_mapping"][:max_length]
            if level == "record":
                text = record.text[:kept[-1][1]]
            else:
                text = " ".join(filter(None, (_scored_characters(record.text, kept, s) for s in record.spans)))
            mean_nll = nll[i][positions[i]].mean()
            assert got[i] == pytest.approx(-mean_nll / len(zlib.compress(text.encode("utf-8")))), (level, i)
    # the long record was truncated inside the phone number (where depends on the
    # tokenizer's merges); the short one is whole
    cut = tok(long_text, return_offsets_mapping=True)["offset_mapping"][max_length - 1][1]
    phone = spans[1]
    assert phone.start < cut < phone.end
    assert windows[0].text == long_text[:cut] and windows[1] == records[1]
    assert [long_text[s.start:s.end] for s in windows[0].spans] == ["Jane Doe", long_text[phone.start:cut]]
    # and the window is what training saw: it tokenises to the same ids
    assert tok(windows[0].text)["input_ids"] == data.input_ids[0, :max_length].tolist()


def test_records_without_scored_tokens_are_dropped_not_fatal():
    s = random_scores()
    s.sensitive[:] = s.valid
    s.sensitive[0] = False
    recs = [Record(str(i), str(i), "x y z", [Span(0, 1, "NAME")]) for i in range(7)]
    rng = np.random.default_rng(0)
    frequencies = tuple(TokenFrequencies(rng.integers(0, 5, s.nll.shape), np.log(rng.uniform(0.01, 0.2, s.nll.shape)))
                        for _ in range(2))
    entries = score_attacks(s, random_scores(seed=1), s, random_scores(seed=1), recs, recs,
                            levels=("sensitive",), frequencies=frequencies)
    assert {e["attack"] for e in entries} == set(ATTACKS)
    assert all(e["n_members"] == 6 for e in entries)


def test_zlib_uses_the_sensitive_values_at_sensitive_level():
    from privtune.attacks.mia import zlib_lengths

    rec = Record("a", "a", "Call Jane Doe now", [Span(5, 13, "NAME")])
    assert zlib_lengths([rec], "sensitive")[0] == len(zlib.compress(b"Jane Doe"))
    assert zlib_lengths([rec], "record")[0] == len(zlib.compress(rec.text.encode()))


def test_errors():
    s = random_scores()
    with pytest.raises(PrivtuneError, match="unknown attack 'lira9'"):
        get_attack("lira9")
    with pytest.raises(PrivtuneError, match="members and non-members"):
        score_attacks(s, s, None, None, [], [Record("a", "a", "x")])
    with pytest.raises(PrivtuneError, match="reference-model scores"):
        recs = [Record(str(i), str(i), "x") for i in range(7)]
        score_attacks(s, s, None, None, recs, recs, attacks=["reference"])


def _member_split():
    records = generate_corpus("customer-sim", 16, seed=3)
    members, nonmembers = split_by_individual(records, 0.5, seed=0)
    tok = tiny_tokenizer()
    return members, nonmembers, encode_records(members, tok, 64), encode_records(nonmembers, tok, 64)


def _auc(entries, attack, level="record"):
    return next(e for e in entries if e["attack"] == attack and e["level"] == level)


def test_overfit_model_is_caught_and_untrained_model_is_at_chance():
    torch.manual_seed(0)
    members, nonmembers, enc_m, enc_n = _member_split()
    base = tiny_model("llama", seed=1)
    model = tiny_model("llama", seed=1)
    base_m, base_n = score_tokens(base, enc_m, CPU), score_tokens(base, enc_n, CPU)
    untrained = score_attacks(base_m, base_n, None, None, members, nonmembers)
    loss = _auc(untrained, "loss")
    assert loss["auc_ci"][0] < 0.5 < loss["auc_ci"][1] and loss["confounded"] is False
    assert loss["advantage"] is None  # the base model has no baseline but itself

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss_value = per_record_loss(model(input_ids=enc_m.input_ids, attention_mask=enc_m.attention_mask).logits,
                                     enc_m.labels).mean()
        opt.zero_grad()
        loss_value.backward()
        opt.step()
    trained = score_attacks(score_tokens(model, enc_m, CPU), score_tokens(model, enc_n, CPU), base_m, base_n,
                            members, nonmembers, base=(base_m, base_n))
    for attack in ("loss", "zlib", "min_k", "min_k_pp", "reference"):
        entry = _auc(trained, attack)
        assert entry["auc"] > 0.8, attack
        # The same attack on the base model, same records: the advantage is the difference.
        assert entry["base_auc"] == pytest.approx(_auc(untrained, attack)["auc"] if attack != "reference" else 0.5)
        assert entry["advantage"] == pytest.approx(entry["auc"] - entry["base_auc"])
        assert entry["advantage_ci"][0] > 0, attack
    # Few records keep a sensitive token within 64 tokens: too few for an AUC.
    sensitive = _auc(trained, "loss", "sensitive")
    kept = [int(s.sensitive.any(axis=1).sum()) for s in (base_m, base_n)]
    assert max(kept) < 10 and sensitive["auc"] is None and sensitive["advantage"] is None
    assert sensitive["auc_reason"] == f"needs ≥ 10 members and 10 non-members, has {kept[0]} and {kept[1]}"
