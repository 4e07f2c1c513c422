import dataclasses

import pytest

from privtune.data.corpora import generate_corpus
from privtune.data.records import Record, Span
from privtune.data import tagging
from privtune.data.tagging import (iban_ok, luhn_ok, regex_spans, resolve, Candidate, tag_records,
                                   tagger_precision, tagger_recall)
from privtune.errors import PrivtuneError


def stripped(records):
    return [dataclasses.replace(r, spans=[], meta={}) for r in records]


def values(text):
    return [(s.label, text[s.start : s.end]) for s in regex_spans(text)]


def luhn_reference(number: str) -> bool:
    """Textbook Luhn: double every second digit from the right, sum the digits of the products."""
    digits = [int(d) for d in number]
    for i in range(len(digits) - 2, -1, -2):
        digits[i] = sum(int(c) for c in str(digits[i] * 2))
    return sum(digits) % 10 == 0


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    for n in range(10_000_000, 10_002_000):
        assert luhn_ok(str(n)) == luhn_reference(str(n))
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and iban_ok("DE89370400440532013000")
    assert not iban_ok("GB82 WEST 1234 5698 7654 33")


@pytest.mark.parametrize("text,expected", [
    ("mail jane.o'doe@example.co.uk.", [("EMAIL", "jane.o'doe@example.co.uk")]),
    ("mail jane.doe@mail.example.co.uk.", [("EMAIL", "jane.doe@mail.example.co.uk")]),
    ("card 4111 1111 1111 1111 ok", [("CARD", "4111 1111 1111 1111")]),
    ("card 4111-1111-1111-1112 bad checksum", [("ACCOUNT", "4111-1111-1111-1112")]),
    ("IBAN GB82 WEST 1234 5698 7654 32 thanks", [("IBAN", "GB82 WEST 1234 5698 7654 32")]),
    ("SSN 123-45-6789.", [("NATIONAL_ID", "123-45-6789")]),
    ("born 1985-03-14, 14/03/1985 or 3rd March 1985 or March 3, 1985",
     [("DATE", "1985-03-14"), ("DATE", "14/03/1985"), ("DATE", "3rd March 1985"), ("DATE", "March 3, 1985")]),
    ("not a date 1985-13-45", [("ACCOUNT", "1985-13-45")]),  # no month 13: just a long number
    ("call +44 20 7946 0958 or (331)770-6690x7439 or 06 56 31 70 66",
     [("PHONE", "+44 20 7946 0958"), ("PHONE", "(331)770-6690x7439"), ("PHONE", "06 56 31 70 66")]),
    ("account AC-59116833 and order ORD-2024117", [("ACCOUNT", "AC-59116833"), ("ACCOUNT", "ORD-2024117")]),
    ("I live at 12 Baker Street, London NW1 6XE", [("ADDRESS", "12 Baker Street"), ("ADDRESS", "NW1 6XE")]),
    ("Dear Ms. Alvarez, my name is Jo Kim. I'm Sorry but I'm Ann Lee.",
     [("NAME", "Alvarez"), ("NAME", "Jo Kim"), ("NAME", "Ann Lee")]),
    ("It costs $1234.56, ships in 10 days, version 2.5.1, in 2024.", []),
])
def test_regex_rules(text, expected):
    assert values(text) == expected


def test_resolve_prefers_priority_then_length():
    spans = resolve([Candidate(0, 10, "A", 1), Candidate(5, 12, "B", 2), Candidate(12, 14, "C", 1),
                     Candidate(0, 4, "D", 1)])
    assert spans == [Span(0, 4, "D"), Span(5, 12, "B"), Span(12, 14, "C")]


@pytest.mark.parametrize("name", ["customer-sim", "synbio"])
def test_regex_tagger_recall_and_precision_on_exact_corpora(name):
    truth = generate_corpus(name, 150, seed=5)
    tagged, used = tag_records(stripped(truth), "regex")
    assert used == "regex" and all(r.meta["tagger"] == "regex" for r in tagged)
    recall = tagger_recall(truth, tagged)
    assert recall["EMAIL"] == 1.0
    assert recall["DOB"] == 1.0
    assert recall["PHONE"] >= 0.85
    assert tagger_precision(truth, tagged) >= 0.97
    if name == "customer-sim":
        assert recall["IBAN"] == 1.0 and recall["ORDER"] >= 0.95 and recall["ACCOUNT"] >= 0.95
        assert recall["CARD"] >= 0.75  # card numbers are found; "ending 1234" is not
        assert 0.55 <= recall["ALL"] < 1.0
    else:
        assert recall["CITY"] == 0.0  # no cue, no tag: what an honest regex tagger leaves behind


def test_tag_records_keeps_given_spans_and_explicit_empty_lists():
    given = Record("a", "a", "Mail a@b.org", [Span(0, 4, "X")], {"spans_given": True})
    empty = Record("b", "b", "Mail c@d.org", [], {"spans_given": True})
    blank = Record("c", "c", "Mail e@f.org", [], {"spans_given": False})
    out, _ = tag_records([given, empty, blank], "regex")
    assert out[0] is given and out[1] is empty
    assert out[2].span_values() == [("EMAIL", "e@f.org")] and blank.spans == []


def test_unknown_tagger_and_missing_presidio(monkeypatch):
    with pytest.raises(PrivtuneError, match="unknown tagger 'spacy'; use one of: auto, regex, presidio"):
        tag_records([], "spacy")
    monkeypatch.setattr(tagging, "presidio_available", lambda: False)
    assert tag_records([], "auto")[1] == "regex"
    with pytest.raises(PrivtuneError, match="pip install presidio-analyzer"):
        tag_records([], "presidio")


def test_recall_reference_on_a_hand_example():
    truth = [Record("r", "p", "Ann Lee, ann@x.org", [Span(0, 7, "NAME"), Span(9, 18, "EMAIL")])]
    tagged = [Record("r", "p", truth[0].text, [Span(0, 3, "NAME"), Span(9, 18, "URL")])]
    assert tagger_recall(truth, tagged) == {"ALL": 12 / 16, "EMAIL": 1.0, "NAME": 3 / 7}
    assert tagger_recall(truth, tagged, match_label=True) == {"ALL": 3 / 16, "EMAIL": 0.0, "NAME": 3 / 7}
    assert tagger_precision(truth, tagged) == 1.0
    with pytest.raises(PrivtuneError, match="no tagged counterpart"):
        tagger_recall(truth, [])


def test_presidio_tagger_finds_names_the_regex_misses():
    pytest.importorskip("presidio_analyzer")
    if not tagging.presidio_available():
        pytest.skip("no small English spaCy model installed")
    truth = generate_corpus("synbio", 12, seed=3) + generate_corpus("customer-sim", 10, seed=3)
    tagged, used = tag_records(stripped(truth), "presidio")
    assert used == "presidio" and tag_records([], "auto")[1] == "presidio"
    recall = tagger_recall(truth, tagged)
    assert recall["EMAIL"] == 1.0
    assert recall["NAME"] >= 0.7  # regex finds none of synbio's names
    assert recall["ALL"] >= tagger_recall(truth, tag_records(stripped(truth), "regex")[0])["ALL"]
    assert tagger_precision(truth, tagged) >= 0.85
