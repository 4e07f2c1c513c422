"""Scrubbing: span replacement with its offset book-keeping, the tagger's recall, and a
study whose scrubbed run never trains on a member's value but is measured on them."""

import re

import pytest

from privtune.config import parse_config
from privtune.data.records import Record, Span
from privtune.data.scrub import replace_spans, scrub_records
from privtune.errors import PrivtuneError
from privtune.study import runner
from privtune.study.driver import open_store, run_study

TEXT = "Jane Doe (jane@x.org) paid order ORD-12345678."
SPANS = [Span(0, 8, "NAME"), Span(10, 20, "EMAIL"), Span(33, 45, "ORDER")]


def record(spans=SPANS):
    return Record("r1", "p1", TEXT, list(spans))


def test_placeholders_replace_every_span_and_spans_follow_the_new_text():
    out = replace_spans(record(), SPANS, "placeholder")
    assert out.text == "[NAME] ([EMAIL]) paid order [ORDER]."
    assert [out.text[s.start:s.end] for s in out.spans] == ["[NAME]", "[EMAIL]", "[ORDER]"]
    assert [s.label for s in out.spans] == ["NAME", "EMAIL", "ORDER"]
    assert record().text == TEXT  # the original is untouched


def test_adjacent_spans_and_no_spans():
    adjacent = Record("r", "p", "AB12", [Span(0, 2, "X"), Span(2, 4, "Y")])
    out = replace_spans(adjacent, adjacent.spans, "placeholder")
    assert out.text == "[X][Y]" and [(s.start, s.end) for s in out.spans] == [(0, 3), (3, 6)]
    assert replace_spans(record(), [], "placeholder").text == TEXT
    with pytest.raises(PrivtuneError, match="overlap"):
        replace_spans(record(), [Span(0, 8, "NAME"), Span(5, 12, "EMAIL")], "placeholder")


def test_surrogates_keep_the_type_differ_from_the_value_and_are_deterministic():
    a = replace_spans(record(), SPANS, "surrogate", seed=1)
    b = replace_spans(record(), SPANS, "surrogate", seed=1)
    assert a.text == b.text
    values = [a.text[s.start:s.end] for s in a.spans]
    originals = [TEXT[s.start:s.end] for s in SPANS]
    assert all(v != o for v, o in zip(values, originals))
    assert "@" in values[1] and re.fullmatch(r"[A-Z]{3}-\d{8}", values[2])  # same shape
    assert a.text.endswith(".") and " paid order " in a.text


def test_recall_and_precision_count_characters_against_the_true_spans():
    # The regex tagger finds the e-mail and the order number, not the name.
    scrubbed, stats = scrub_records([record()], "regex", "placeholder")
    assert "Jane Doe" in scrubbed[0].text and "jane@x.org" not in scrubbed[0].text
    found = {s.label for s in scrubbed[0].spans}
    assert "NAME" not in found
    assert stats["recall_NAME"] == 0.0 and stats["recall_EMAIL"] == 1.0
    assert stats["recall"] == pytest.approx((10 + 12) / (8 + 10 + 12))
    assert stats["precision"] == 1.0 and stats["spans_replaced"] == 2
    exact, stats = scrub_records([record()], "exact", "placeholder")
    assert stats["recall"] == 1.0 and exact[0].text == "[NAME] ([EMAIL]) paid order [ORDER]."


def test_exact_tagger_without_spans_is_an_error():
    with pytest.raises(PrivtuneError, match="exact"):
        scrub_records([record(spans=[])], "exact", "placeholder")


def test_default_label_names_the_scrubber():
    cfg = parse_config({"methods": [{"method": "fft"}, {"method": "fft", "scrub": {"tagger": "exact"}}]})
    assert [m.label for m in cfg.methods] == ["fft", "fft+scrub-exact"]


@pytest.mark.slow
def test_scrubbed_run_trains_without_member_values_and_is_measured_on_them(tmp_path, monkeypatch):
    cfg = parse_config({
        "name": "tiny", "model": "tiny-llama", "output_dir": str(tmp_path / "out"),
        "data": {"source": "customer-sim", "n_individuals": 8, "max_length": 64},
        "canaries": {"repetitions": [2], "n_reference": 1, "n_candidates": 16},
        "attacks": {"extraction": {"enabled": False}, "mia": {"n_bootstrap": 20}},
        "train": {"epochs": 1, "batch_size": 4, "physical_batch_size": 4, "lr": 3e-3},
        "methods": [{"method": "fft"}, {"method": "fft", "scrub": {"tagger": "exact"}}],
        "precision": "fp32", "save_artifacts": False,
    })
    trained_on: dict[str, list[str]] = {}
    real_train = runner.train

    def recording_train(model, data, *args, **kwargs):
        trained_on[len(trained_on)] = [r.text for r in data.records]
        return real_train(model, data, *args, **kwargs)

    monkeypatch.setattr(runner, "train", recording_train)
    assert run_study(cfg, show_progress=False).failed == {}
    store = open_store(cfg)
    runs = {r["label"]: r for r in store.runs("tiny")}
    store.close()

    plain, scrubbed = trained_on[0], trained_on[1]
    members = [r for r in runner.StudyContext.build(cfg).data.members.records]
    values = [value for r in members for _, value in r.span_values()]
    assert any(v in text for v in values for text in plain)
    assert not any(v in text for v in values for text in scrubbed)
    stats = runs["fft+scrub-exact"]["scrub"]
    assert stats["recall"] == 1.0 and stats["tagger"] == "exact" and stats["spans_replaced"] > 0
    # Both runs are measured on the same unscrubbed members.
    assert runs["fft+scrub-exact"]["data"] == runs["fft"]["data"]
    assert runs["fft+scrub-exact"]["final"]["ce_s_train"] > runs["fft"]["final"]["ce_s_train"]
    assert "scrub" not in runs["fft"]
    from privtune.report import write_report

    page = write_report(list(runs.values()), tmp_path / "report", title="tiny", meta={}).read_text()
    assert "exact → placeholder, recall 100.0%" in page
