"""Extraction, PII inference, decoy candidates and masking, against slow references."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from privtune.attacks.continuation import continuation_losses
from privtune.attacks.extraction import pii_inference, prefix_extraction, recovered, select_targets
from privtune.attacks.masking import mask_value
from privtune.attacks.pii_candidates import MAKERS, candidates, coarse_shape, exact_shape
from privtune.data.corpora import generate_corpus
from privtune.data.records import Record, Span
from privtune.data.tokenize import encode_records
from privtune.errors import PrivtuneError
from privtune.models.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def split():
    records = generate_corpus("customer-sim", 8, 3)
    individuals = sorted({r.individual for r in records})
    members = [r for r in records if r.individual in individuals[:4]]
    return members, [r for r in records if r.individual not in individuals[:4]]


TRAINED = 256  # the overfit model's max_length: every value of these records fits


@pytest.fixture(scope="module")
def overfit(tok, split):
    """A tiny llama trained on the member records until it reproduces them."""
    torch.manual_seed(0)
    model = tiny_model("llama", seed=0)
    data = encode_records(split[0], tok, TRAINED)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    model.train()
    for _ in range(300):
        loss = model(input_ids=data.input_ids, attention_mask=data.attention_mask, labels=data.labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.03:
            break
    assert loss.item() < 0.1
    return model.eval()


# --------------------------------------------------------------------------- masking

def test_mask_keeps_shape_not_value():
    assert mask_value("john.smith@gmail.com", "EMAIL") == "j***.*****@g****.com"
    assert mask_value("4111 1111 1111 1234", "CARD") == "4*** **** **** ****"
    assert mask_value("+44 20 7946 0958", "PHONE") == "+** ** **** ****"
    assert mask_value("Ann", "NAME") == "[NAME:3 chars]"
    assert mask_value("1234", "CARD") == "[CARD:4 chars]"


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40), st.sampled_from(["EMAIL", "NAME", "CARD", "X"]))
def test_mask_never_leaks(value, label):
    masked = mask_value(value, label)
    alnum = sum(ch.isalnum() for ch in value)
    if alnum < 6:  # only the label and length may show
        assert masked == f"[{label}:{len(value)} chars]"
    else:
        assert value not in masked
        shown = [ch for ch in masked if ch.isalnum()]
        tld = value.rpartition(".")[2] if label == "EMAIL" else ""
        assert len(shown) <= 2 + len(tld)  # first characters (+ the e-mail's TLD) only


# --------------------------------------------------------------------------- candidates

def corpus_values():
    out = {}
    for name in ("customer-sim", "synbio"):
        for record in generate_corpus(name, 40, 0):
            for label, value in record.span_values():
                out.setdefault(label, set()).add(value)
    return {label: sorted(values)[:25] for label, values in out.items()}


def test_candidates_distinct_exclude_truth_same_shape():
    values = corpus_values()
    assert set(values) == set(MAKERS)
    for label, vals in values.items():
        same_shape = 0
        for value in vals:
            decoys = candidates(label, value, 9, seed=0)
            assert len(decoys) == 9 and len(set(decoys)) == 9 and value not in decoys
            assert decoys == candidates(label, value, 9, seed=0)
            same_shape += sum(coarse_shape(d) == coarse_shape(value) for d in decoys)
        assert same_shape >= 0.6 * 9 * len(vals), label


@pytest.mark.parametrize("label,value", [
    ("CARD", "4111 1111 1111 1234"), ("CARD", "4111-1111-1111-1234"), ("CARD", "1234"),
    ("PHONE", "(460)648-7647x5938"), ("PHONE", "05 62 04 87 64"), ("DOB", "1980-02-29"),
    ("ACCOUNT", "AC-12345678"), ("ORDER", "123-1234567-1234"), ("NAME", "Michael Freeman"),
])
def test_digit_layout_and_exact_formats_kept(label, value):
    for decoy in candidates(label, value, 9, seed=1):
        assert exact_shape(decoy) == exact_shape(value)


def test_dob_keeps_the_date_style():
    for value, pattern in (("March 12, 1985", r"[A-Z][a-z]+ \d{1,2}, \d{4}"),
                           ("12 March 1985", r"\d{1,2} [A-Z][a-z]+ \d{4}"), ("03/12/1985", r"\d\d/\d\d/\d{4}")):
        assert all(re.fullmatch(pattern, d) for d in candidates("DOB", value, 9, seed=0))


def test_unknown_label_perturbs_within_class():
    decoys = candidates("BADGE", "Zx-42 q", 20, seed=3)
    assert len(set(decoys)) == 20 and "Zx-42 q" not in decoys
    assert all(exact_shape(d) == "Aa-99 a" for d in decoys)


def test_too_short_value_raises():
    assert len(candidates("BADGE", "7", 9, seed=0)) == 9
    with pytest.raises(PrivtuneError):
        candidates("BADGE", "7", 10, seed=0)
    with pytest.raises(PrivtuneError):
        candidates("BADGE", "--", 1, seed=0)


# --------------------------------------------------------------------------- targets

def test_targets_end_at_token_boundary_skip_copies(tok):
    text = "Customer: order ORD-1234567 is late. Agent: order ORD-1234567 found."
    spans = [Span(text.index("ORD"), text.index("ORD") + 11, "ORDER"),
             Span(text.rindex("ORD"), text.rindex("ORD") + 11, "ORDER")]
    record = Record("r", "p", text, spans)
    (target,) = select_targets([record], tok, max_spans_per_type=5, max_prefix_chars=500, max_length=256, seed=0,
                               tag="member")
    # The prompt ends where the token before the value's first token ends (with or
    # without the space, as the tokenizer split it), and re-tokenises as in training.
    enc = tok(text, return_offsets_mapping=True)
    first = next(t for t, (a, b) in enumerate(enc["offset_mapping"]) if b > spans[0].start)
    assert target.prompt == text[: enc["offset_mapping"][first - 1][1]]
    assert target.target == text[len(target.prompt): spans[0].end] and target.target.endswith("ORD-1234567")
    assert tok(target.prompt)["input_ids"] == enc["input_ids"][:first]
    (short,) = select_targets([record], tok, max_spans_per_type=5, max_prefix_chars=8, max_length=256, seed=0,
                              tag="member")
    assert short.prompt == target.prompt[-len(short.prompt):] and short.prompt.startswith("order")


def test_targets_capped_per_label_and_deterministic(tok, split):
    records = generate_corpus("customer-sim", 30, 0)
    kw = dict(max_spans_per_type=3, max_prefix_chars=200, max_length=256, seed=0, tag="member")
    a = select_targets(records, tok, **kw)
    assert a == select_targets(records, tok, **kw)
    labels = [t.label for t in a]
    assert all(labels.count(label) == 3 for label in set(labels))
    for t in a:
        text = records[t.record].text
        assert text[t.span.start: t.span.end] == t.value and t.value not in text[: t.span.start]
        assert t.target.endswith(t.value) and text.endswith(t.prompt + t.target, 0, t.span.end)


def _inside_trained_window(record: Record, span: Span, tok, max_length: int) -> bool:
    """The value's last character is among those the truncated training encoding covers."""
    kept = tok(record.text, truncation=True, max_length=max_length, return_offsets_mapping=True)["offset_mapping"]
    return max(b for _, b in kept) >= span.end


@pytest.mark.parametrize("max_length", [12, 24, 40, 64])
def test_only_values_wholly_inside_the_trained_window_are_targets(tok, max_length):
    """Members and non-members alike; a value cut by the window is not a target."""
    records = generate_corpus("customer-sim", 12, 5)
    for tag in ("member", "nonmember"):
        got = select_targets(records, tok, max_spans_per_type=1000, max_prefix_chars=200, max_length=max_length,
                             seed=0, tag=tag)
        everything = select_targets(records, tok, max_spans_per_type=1000, max_prefix_chars=200,
                                    max_length=10 ** 6, seed=0, tag=tag)
        # Every target lies inside the window; and a value is a target exactly when one of
        # its person's occurrences does (another record of theirs may carry it instead).
        assert all(_inside_trained_window(records[t.record], t.span, tok, max_length) for t in got)
        want = {(records[t.record].individual, t.value) for t in everything
                if any(_inside_trained_window(r, s, tok, max_length) for r in records
                       if r.individual == records[t.record].individual
                       for s in r.spans if r.text[s.start:s.end] == t.value)}
        assert {(records[t.record].individual, t.value) for t in got} == want
        assert len(want) < len(everything)  # the window does cut some values off
    straddling = Record("r", "p", "My number is 0909 879 0660 thanks", [Span(13, 26, "PHONE")])
    (whole,) = select_targets([straddling], tok, max_spans_per_type=5, max_prefix_chars=200, max_length=64, seed=0,
                              tag="member")
    cut = len(tok(straddling.text[:20])["input_ids"])  # a window that ends inside the number
    assert whole.value == "0909 879 0660"
    assert select_targets([straddling], tok, max_spans_per_type=5, max_prefix_chars=200, max_length=cut, seed=0,
                          tag="member") == []


def test_recovered_needs_the_whole_value():
    assert recovered(" ORD-1234567.", " ORD-1234567")
    assert recovered("ORD-1234567", " ORD-1234567")
    assert not recovered(" ORD-12345678", " ORD-1234567")
    assert not recovered(" ORD-123456", " ORD-1234567")
    assert not recovered(" Johnson", " John") and recovered(" John Smith", " John")


# --------------------------------------------------------------------------- scoring

def slow_losses(model, tok, prefixes, continuations, suffixes):
    out = []
    for p, c, s in zip(prefixes, continuations, suffixes):
        enc = tok(p + c + s, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        pos = [t for t, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < len(p) + len(c) and len(p) < b]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        out.append(-sum(float(logp[t - 1, ids[0, t]]) for t in pos))
    return np.array(out)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_continuation_losses_match_one_row_at_a_time(family, tok):
    model = tiny_model(family, seed=3)
    prefixes = ["Hi, order", "Hi, order", "Call me on", "word " * 40 + "The card is", "The card is", "Hi, order"]
    continuations = [" ORD-1234567", " 12", " 0909 879 0660", " 4111 1111", " 4111 2222 3333", " ORD"]
    suffixes = ["", ".", "", " please", "", "x"]
    want = slow_losses(model, tok, prefixes, continuations, suffixes)
    for batch_size in (1, 4, 64):
        got = continuation_losses(model, tok, prefixes, continuations, suffixes=suffixes, batch_size=batch_size)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_continuation_losses_reject_empty(tok):
    model = tiny_model("llama", seed=0)
    with pytest.raises(PrivtuneError):
        continuation_losses(model, tok, ["Hi"], [""])
    with pytest.raises(PrivtuneError):
        continuation_losses(model, tok, [""], ["Hi"])
    with pytest.raises(PrivtuneError):
        continuation_losses(model, tok, ["Hi", "a"], ["x"])


# --------------------------------------------------------------------------- attacks

def slow_extraction(model, tok, members, nonmembers, **kw):
    """Per target: a cache-free greedy loop; rates counted by hand."""
    counts = {}
    for tag, records in (("member", members), ("nonmember", nonmembers)):
        for t in select_targets(records, tok, seed=0, tag=tag, **kw):
            ids = tok(t.prompt)["input_ids"]
            budget = len(tok(t.target, add_special_tokens=False)["input_ids"]) + 2
            with torch.no_grad():
                for _ in range(budget):
                    ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            new = ids[len(tok(t.prompt)["input_ids"]):]
            ok = recovered(tok.decode(new, skip_special_tokens=True), t.target)
            for label in (t.label, "ALL"):
                counts.setdefault((label, tag), []).append(ok)
    return counts


def test_prefix_extraction_recovers_planted_values(tok, split, overfit):
    members, nonmembers = split
    kw = dict(max_spans_per_type=10, max_prefix_chars=200, max_length=TRAINED)
    result = prefix_extraction(overfit, tok, members, nonmembers, n_samples=2, seed=0, **kw)
    slow = slow_extraction(overfit, tok, members, nonmembers, **kw)
    for label, entry in result["greedy"].items():
        for tag in ("member", "nonmember"):
            got = slow.get((label, tag), [])
            assert entry[f"n_{tag}"] == len(got)
            assert entry[f"{tag}_rate"] == (pytest.approx(np.mean(got)) if got else None)
    assert result["greedy"]["ALL"]["member_rate"] > 0.3
    assert max(e["member_rate"] or 0 for lab, e in result["greedy"].items() if lab != "ALL") == 1.0
    assert result["greedy"]["ALL"]["nonmember_rate"] == 0.0
    assert result["sampling"]["ALL"]["member_rate"] >= result["greedy"]["ALL"]["member_rate"] - 0.2
    assert result["greedy"]["ALL"]["advantage"] == pytest.approx(
        result["greedy"]["ALL"]["member_rate"] - result["greedy"]["ALL"]["nonmember_rate"])


def test_pii_inference_perfect_when_overfit_chance_when_random(tok, split, overfit):
    members, nonmembers = split
    result = pii_inference(overfit, tok, members, nonmembers, max_length=TRAINED, k=10, seed=0)
    assert result["ALL"]["top1"] == 1.0 and result["ALL"]["chance"] == 0.1
    records = generate_corpus("synbio", 60, 1) + generate_corpus("customer-sim", 30, 1)
    random_model = tiny_model("llama", seed=7)
    base = pii_inference(random_model, tok, records[::2], records[1::2], max_length=TRAINED, k=10,
                         max_spans_per_type=30, seed=0)
    assert base["ALL"]["n_member"] > 150
    assert abs(base["ALL"]["member_top1"] - 0.1) < 0.08
    assert abs(base["ALL"]["nonmember_top1"] - 0.1) < 0.08


def test_attacks_reject_bad_settings(tok, split):
    members, nonmembers = split
    model = tiny_model("llama", seed=0)
    with pytest.raises(PrivtuneError):
        prefix_extraction(model, tok, [], nonmembers, max_length=TRAINED)
    with pytest.raises(PrivtuneError):
        prefix_extraction(model, tok, members, nonmembers, max_length=TRAINED, max_spans_per_type=0)
    with pytest.raises(PrivtuneError):
        pii_inference(model, tok, members, nonmembers, max_length=TRAINED, k=1)
    no_spans = [Record("a", "a", "nothing sensitive here")]
    with pytest.raises(PrivtuneError):
        pii_inference(model, tok, no_spans, nonmembers, max_length=TRAINED)
    with pytest.raises(PrivtuneError, match="inside its first 3 tokens"):
        prefix_extraction(model, tok, members, nonmembers, max_length=3)
