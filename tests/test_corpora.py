import io
import statistics
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from privtune.data.corpora import CORPORA, LABELS, TextBuilder, approx_tokens, generate_corpus
from privtune.data.corpora import customer_sim
from privtune.data.preview import preview_renderable
from privtune.data.records import Span
from privtune.errors import PrivtuneError


def assert_well_formed(records, profile_of=None):
    """Spans exact, sorted, non-overlapping, labelled from the vocabulary; ids unique."""
    assert len({r.id for r in records}) == len(records)
    for r in records:
        assert r.spans, r.id
        prev_end = 0
        for s in r.spans:
            assert prev_end <= s.start < s.end <= len(r.text)
            assert s.label in LABELS
            value = r.text[s.start : s.end]
            assert value == value.strip() and value
            prev_end = s.end


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_same_arguments_same_records_other_seed_other_records(name):
    a = generate_corpus(name, 30, seed=7)
    b = generate_corpus(name, 30, seed=7)
    c = generate_corpus(name, 30, seed=8)
    assert a == b
    assert [r.text for r in a] != [r.text for r in c]


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_smaller_corpus_is_a_prefix_of_a_larger_one(name):
    small, big = generate_corpus(name, 10, 3), generate_corpus(name, 25, 3)
    assert big[: len(small)] == small


@pytest.mark.parametrize("name", sorted(CORPORA))
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_spans_exact_sorted_and_disjoint_for_any_seed(name, seed):
    assert_well_formed(generate_corpus(name, 15, seed))


def test_customer_sim_spans_hold_the_profile_values():
    """The slow obvious reference: rebuild each profile and check every span's value."""
    records = generate_corpus("customer-sim", 40, seed=2)
    from privtune.data.corpora import individual_rng
    for i in range(40):
        profile = customer_sim.make_profile(individual_rng("customer-sim", 2, i))
        allowed = {v for k, v in profile.items() if k not in ("locale", "currency")}
        allowed.add("".join(ch for ch in profile["card"] if ch.isdigit())[-4:])
        for r in (r for r in records if r.individual == f"customer-sim-{i:06d}"):
            for label, value in r.span_values():
                assert value in allowed, (r.id, label, value)


@pytest.mark.parametrize("name,per_person", [("customer-sim", (1, 3)), ("synbio", (1, 2))])
def test_ids_individuals_and_records_per_person(name, per_person):
    records = generate_corpus(name, 60, seed=0)
    counts = Counter(r.individual for r in records)
    assert len(counts) == 60
    assert set(counts.values()) == set(range(per_person[0], per_person[1] + 1))
    for r in records:
        assert r.id.startswith(r.individual + "-")
        assert r.individual.startswith(f"{name}-") and len(r.individual) == len(name) + 7


def test_customer_sim_reuses_a_persons_values_across_records():
    records = generate_corpus("customer-sim", 80, seed=1)
    by_person: dict[str, list] = {}
    for r in records:
        by_person.setdefault(r.individual, []).append({v for _, v in r.span_values()})
    shared = [p for p, sets in by_person.items() if len(sets) > 1 and set.intersection(*sets)]
    multi = [p for p, sets in by_person.items() if len(sets) > 1]
    assert len(shared) >= 0.7 * len(multi)


def test_customer_sim_template_variety_length_and_sensitive_share():
    records = generate_corpus("customer-sim", 200, seed=0)
    first_templates = Counter(r.meta["template"] for r in records)
    assert len(first_templates) >= 12
    assert max(first_templates.values()) <= 0.25 * len(records)
    low, high = customer_sim.TOKEN_BUDGET
    sizes = [approx_tokens(r.text) for r in records]
    assert sum(low <= n <= high for n in sizes) >= 0.95 * len(records)
    assert max(sizes) <= high + 15 and 200 <= statistics.mean(len(r.text) for r in records) <= 400
    share = sum(s.end - s.start for r in records for s in r.spans) / sum(len(r.text) for r in records)
    assert 0.15 <= share <= 0.32
    # A person's records are different scenarios; the wording varies within a scenario.
    for person in {r.individual for r in records}:
        mine = [r.meta["template"] for r in records if r.individual == person]
        assert len(mine) == len(set(mine))
    refunds = [r.text.split("\n")[0] for r in records if r.meta["template"] == "refund_request"]
    assert len({line.split(":")[1][:12] for line in refunds}) >= 2
    assert {"Customer", "Caller", "Client"} <= {r.text.split(":")[0] for r in records}


def test_customer_sim_uses_several_locales_and_labels():
    records = generate_corpus("customer-sim", 200, seed=0)
    assert len(Counter(r.meta["locale"] for r in records)) >= 5
    assert {s.label for r in records for s in r.spans} == {
        "NAME", "EMAIL", "PHONE", "ADDRESS", "ACCOUNT", "ORDER", "CARD", "DOB", "IBAN"}


def test_synbio_covers_its_labels_and_varies_order():
    records = generate_corpus("synbio", 100, seed=0)
    assert {s.label for r in records for s in r.spans} == {
        "NAME", "DOB", "CITY", "UNIVERSITY", "EMPLOYER", "EMAIL", "PHONE"}
    assert len({r.meta["template"] for r in records}) >= 20
    assert all(r.text.startswith(r.span_values()[0][1]) or r.text.startswith("Born") for r in records)


def test_generating_1000_individuals_gives_1000_distinct_people():
    # Its speed is measured by benchmarks/scale.py, not asserted here.
    for corpus in ("customer-sim", "synbio"):
        people = {r.individual for r in generate_corpus(corpus, 1000, seed=0)}
        assert len(people) == 1000, corpus


def test_unknown_corpus_and_bad_size():
    with pytest.raises(PrivtuneError, match="unknown corpus 'nope'; use one of: customer-sim, synbio, or a path"):
        generate_corpus("nope", 10, 0)
    with pytest.raises(PrivtuneError, match="at least 1"):
        generate_corpus("synbio", 0, 0)


def test_approx_tokens_counts_words_digits_and_punctuation():
    assert approx_tokens("Hi Ann, call 555-0101!") == round(1.15 * 13)
    assert approx_tokens("") == 0


def test_text_builder_records_spans_as_it_goes():
    b = TextBuilder().lit("Hi ").val("Ann Lee", "NAME").fill(", mail {email} re {thing}.",
                                                            {"email": ("a@b.co", "EMAIL")}, {"thing": "{x}"})
    text, spans = b.build()
    assert text == "Hi Ann Lee, mail a@b.co re {x}."
    assert spans == [Span(3, 10, "NAME"), Span(17, 23, "EMAIL")]
    with pytest.raises(ValueError):
        TextBuilder().val(" padded", "NAME")


def test_preview_shows_values_labels_and_the_rest_count():
    records = generate_corpus("customer-sim", 6, seed=0)
    console = Console(record=True, width=120, color_system="truecolor", file=io.StringIO())
    console.print(preview_renderable(records, limit=2))
    out = console.export_text(clear=False)
    for label, value in records[0].span_values() + records[1].span_values():
        assert f"[{label}]" in out
    assert records[0].id in out and records[2].id not in out
    assert f"and {len(records) - 2} more records" in out
    styled = console.export_text(styles=True)
    assert "\x1b[" in styled  # highlighted, not plain
