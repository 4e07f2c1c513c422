"""Scrubbing: replacement with offset bookkeeping, surrogates, tagger span scores, and
the study's scrubbed training sets."""

import random

import numpy as np
import pytest

from privtune.config import ScrubSettings
from privtune.data.corpora import generate_corpus
from privtune.data.records import Record, Span
from privtune.data.scrub import perturb
from privtune.data.scrub import merge_spans, placeholder, replace_spans, replacer, scrub_record, surrogate
from privtune.data.tagging import regex_spans, span_scores
from privtune.errors import PrivtuneError
from privtune.study.scrubbing import find_spans, tagger_stats

TEXT = "Mail ann@x.org or call 555-1234, Ann Lee."
EMAIL, PHONE, NAME = Span(5, 14, "EMAIL"), Span(23, 31, "PHONE"), Span(33, 40, "NAME")


def test_placeholders_and_spans_at_their_new_offsets():
    assert (TEXT[EMAIL.start:EMAIL.end], TEXT[PHONE.start:PHONE.end], TEXT[NAME.start:NAME.end]) == (
        "ann@x.org", "555-1234", "Ann Lee")
    text, spans = replace_spans(TEXT, [EMAIL, PHONE], [EMAIL, PHONE, NAME], placeholder)
    assert text == "Mail [EMAIL] or call [PHONE], Ann Lee."
    # Removed values: the span covers the placeholder; a missed value moved with the text.
    assert [(s.label, text[s.start:s.end]) for s in spans] == [
        ("EMAIL", "[EMAIL]"), ("PHONE", "[PHONE]"), ("NAME", "Ann Lee")]


def test_partly_removed_value_keeps_its_remainder_in_the_span():
    text, spans = replace_spans(TEXT, [Span(33, 36, "NAME")], [NAME], placeholder)
    assert text == "Mail ann@x.org or call 555-1234, [NAME] Lee."
    assert [text[s.start:s.end] for s in spans] == ["[NAME] Lee"]
    # A removal that starts inside a value and runs past it covers both.
    text, spans = replace_spans(TEXT, [Span(37, 41, "X")], [NAME], placeholder)
    assert text == "Mail ann@x.org or call 555-1234, Ann [X]" and [text[s.start:s.end] for s in spans] == ["Ann [X]"]


def test_overlapping_removals_become_one_adjacent_ones_stay_two():
    assert merge_spans([Span(5, 9, "A"), Span(0, 6, "B"), Span(12, 14, "C"), Span(9, 12, "D"), Span(3, 3, "E")]) == [
        Span(0, 9, "B"), Span(9, 12, "D"), Span(12, 14, "C")]
    text, _ = replace_spans("abcdefgh", [Span(1, 4, "X"), Span(2, 6, "Y")], [], placeholder)
    assert text == "a[X]gh"
    text, spans = replace_spans("abcdefgh", [Span(1, 3, "X"), Span(3, 6, "Y")], [Span(1, 3, "X"), Span(3, 6, "Y")],
                                placeholder)
    assert text == "a[X][Y]gh" and [text[s.start:s.end] for s in spans] == ["[X]", "[Y]"]
    # Two kept values that grow into one removal become one span.
    text, spans = replace_spans("ab cd ef", [Span(1, 4, "Z")], [Span(0, 2, "A"), Span(3, 5, "B")], placeholder)
    assert text == "a[Z]d ef" and spans == [Span(0, 5, "A")]


def reference_text(text, remove, replace):
    """Character by character: emit the replacement where a removal starts, skip its inside."""
    out, i = [], 0
    for s in remove:  # sorted, not overlapping
        out.append(text[i:s.start])
        out.append(replace(s, text[s.start:s.end]))
        i = s.end
    return "".join(out) + text[i:]


def test_random_replacements_against_a_character_reference():
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice("ab ") for _ in range(rng.randrange(1, 40)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 2 * rng.randrange(0, 5))))
        keep = [Span(a, b, "K") for a, b in zip(cuts[::2], cuts[1::2]) if b > a]
        starts = rng.sample(range(len(text)), min(3, len(text)))
        remove = merge_spans([Span(a, min(len(text), a + rng.randrange(1, 6)), "R") for a in starts])
        # Replacements of other lengths than what they replace, drawn once per span.
        drawn = {s: "#" * rng.randrange(0, 4) + "<>" for s in remove}
        text2, spans = replace_spans(text, remove, keep, lambda s, v: drawn[s])
        assert text2 == reference_text(text, remove, lambda s, v: drawn[s])
        for k in keep:
            touched = [r for r in remove if r.start < k.end and k.start < r.end]
            if not touched:  # a value no removal touched is still there, whole, under its span
                assert any(text2[s.start:s.end] == text[k.start:k.end] for s in spans)
            for r in touched:  # a touched value's span covers the replacement
                assert any(drawn[r] in text2[s.start:s.end] for s in spans)
        assert all(a.end <= b.start for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("label, value", [
    ("NAME", "Ann Lee"), ("NAME", "Ann"), ("EMAIL", "ann@x.org"), ("PHONE", "+44 20 7946 0958"),
    ("CARD", "4111 1111 1111 1111"), ("ORDER", "ORD-2024117"), ("CANARY", "482915"), ("DOB", "1985-03-14"),
    ("IBAN", "GB82 WEST 1234 5698 7654 32"), ("CUSTOM", "x7")])
def test_surrogates_have_the_type_and_are_deterministic(label, value):
    fake = surrogate(label, value, seed=1)
    assert fake != value and fake == surrogate(label, value, seed=1)
    assert len({surrogate(label, value, seed) for seed in range(10)}) >= 5  # the seed matters
    if label == "EMAIL":
        assert "@" in fake
    if label == "NAME":
        assert (" " in fake) == (" " in value)
    if label in ("CARD", "ORDER", "CANARY"):  # no faker type: same shape, new characters
        assert [c.isdigit() for c in fake] == [c.isdigit() for c in value] and len(fake) == len(value)


def test_surrogate_is_never_the_value_even_when_little_can_change():
    assert all(surrogate("PIN", "7", seed) != "7" for seed in range(300))
    assert surrogate("SEP", "--", 0) == "[SEP]"  # nothing to redraw: the placeholder
    assert perturb("AB-12 x", random.Random(0))[2::3] == "- "


def test_scrub_record_with_surrogates():
    record = Record("r", "p", TEXT, [EMAIL, PHONE, NAME])
    out = scrub_record(record, [EMAIL, NAME], replacer("surrogate", seed=3))
    values = dict((label, out.text[s.start:s.end]) for s, label in zip(out.spans, ("EMAIL", "PHONE", "NAME")))
    assert "ann@x.org" not in out.text and "Ann Lee" not in out.text and "555-1234" in out.text
    assert "@" in values["EMAIL"] and values["PHONE"] == "555-1234" and " " in values["NAME"]
    assert record.text == TEXT  # the original is left alone
    with pytest.raises(ValueError, match="placeholder, surrogate"):
        replacer("redact")


def direct_count(truth, tagged):
    """The rules of span_scores written out per character set."""
    caught = total = correct = n_tagged = 0
    for t, g in zip(truth, tagged):
        chars = {i for s in g.spans for i in range(s.start, s.end)}
        true_chars = {i for s in t.spans for i in range(s.start, s.end)}
        for s in t.spans:
            total += 1
            caught += {i for i in range(s.start, s.end) if not t.text[i].isspace()} <= chars
        for s in g.spans:
            n_tagged += 1
            correct += bool(set(range(s.start, s.end)) & true_chars)
    return caught / total, correct / n_tagged


def test_span_scores_on_hand_made_spans():
    truth = [Record("a", "a", TEXT, [EMAIL, PHONE, NAME]), Record("b", "b", "Born 1985-03-14.", [Span(5, 15, "DOB")])]
    tagged = [Record("a", "a", TEXT, [EMAIL, Span(23, 27, "PHONE"), Span(33, 36, "NAME"), Span(36, 40, "NAME"),
                                      Span(0, 4, "X")]),
              Record("b", "b", truth[1].text, [Span(4, 15, "DATE")])]
    scores = span_scores(truth, tagged)
    # EMAIL caught; PHONE half; NAME whole but for its space; DOB caught. "Mail" is a false positive.
    assert scores["per_type"] == {"DOB": {"spans": 1, "caught": 1, "recall": 1.0},
                                  "EMAIL": {"spans": 1, "caught": 1, "recall": 1.0},
                                  "NAME": {"spans": 1, "caught": 1, "recall": 1.0},
                                  "PHONE": {"spans": 1, "caught": 0, "recall": 0.0}}
    assert (scores["recall"], scores["precision"]) == (0.75, 5 / 6) == direct_count(truth, tagged)
    assert (scores["spans_true"], scores["spans_caught"], scores["spans_tagged"]) == (4, 3, 6)


def test_span_scores_match_a_direct_count_on_a_corpus():
    truth = generate_corpus("customer-sim", 40, seed=2)
    tagged = [Record(r.id, r.individual, r.text, regex_spans(r.text)) for r in truth]
    scores = span_scores(truth, tagged)
    assert (scores["recall"], scores["precision"]) == pytest.approx(direct_count(truth, tagged))
    assert 0.5 < scores["recall"] < 1.0  # the regex tagger misses some values ("ending 1234", names)


def test_exact_needs_true_spans_and_canaries_count_once():
    records = generate_corpus("customer-sim", 6, seed=1)
    with pytest.raises(PrivtuneError, match="labelled by the regex tagger; give spans in the data file, or use "
                                            "scrub.tagger: regex or presidio"):
        find_spans(records, "exact", truth="regex")
    assert find_spans(records, "exact", truth="given") == [r.spans for r in records]
    canary = Record("canary-0-rep-0", "canary-0", "The PIN is 482915.", [Span(11, 17, "CANARY")], {"canary": "canary-0"})
    copy = Record("canary-0-rep-1", "canary-0", canary.text, canary.spans, {"canary": "canary-0"})
    found = find_spans(records + [canary, copy], "regex", truth="exact")
    stats = tagger_stats(records + [canary, copy], found)
    assert stats["per_type"]["CANARY"] == {"spans": 1, "caught": 1, "recall": 1.0}  # 6 digits: an ACCOUNT to regex
    assert stats["spans_removed"] == sum(len(f) for f in found)


def test_scrub_settings_are_strict():
    assert ScrubSettings(tagger="regex").replacement == "placeholder"
    with pytest.raises(ValueError):
        ScrubSettings(tagger="spacy")
    with pytest.raises(ValueError):
        ScrubSettings(tagger="regex", mode="x")


def test_training_scrubber_tags_once_per_tagger(monkeypatch):
    from privtune.models.tiny import tiny_tokenizer
    from privtune.study import scrubbing

    records = generate_corpus("customer-sim", 8, seed=4)
    calls = []
    monkeypatch.setattr(scrubbing, "regex_spans", lambda text: calls.append(text) or regex_spans(text))
    scrubber = scrubbing.TrainingScrubber(records, "exact", tiny_tokenizer(), 256, seed=0)
    placeholders = scrubber.training_set(ScrubSettings(tagger="regex"))
    surrogates = scrubber.training_set(ScrubSettings(tagger="regex", replacement="surrogate"))
    assert len(calls) == len(records) and scrubber.training_set(ScrubSettings(tagger="regex")) is placeholders
    assert placeholders.stats == {**surrogates.stats, "replacement": "placeholder"}
    assert placeholders.stats["truth"] == "exact" and 0 < placeholders.stats["recall"] < 1
    # Other records (a shadow model's half) are scrubbed the same way.
    shadow_half = scrubber.scrub(records[2:5], ScrubSettings(tagger="regex"))
    assert [r.text for r in shadow_half] == [r.text for r in placeholders.data.records[2:5]]
    texts = [r.text for r in surrogates.data.records]
    assert "[EMAIL]" not in "".join(texts) and "[EMAIL]" in "".join(r.text for r in placeholders.data.records)
    for before, after in zip(records, surrogates.data.records):  # e-mails are always caught: none survives
        assert not any(v in after.text for label, v in before.span_values() if label == "EMAIL")
        assert len(after.spans) <= len(before.spans)


# --- the memorisation gap on missed and caught values ---------------------------------------------

def scored_split(tagger: str):
    """A regex- or exact-scrubbed split, scored by two tiny random models (one the "base")."""
    import torch

    from privtune.data.tokenize import encode_records
    from privtune.measures.token_scores import score_tokens
    from privtune.models.tiny import tiny_model, tiny_tokenizer
    from privtune.study import scrubbing
    from privtune.train.precision import Runtime

    tokenizer, runtime = tiny_tokenizer(), Runtime(torch.device("cpu"), "fp32")
    records = generate_corpus("customer-sim", 16, seed=3)
    members, nonmembers = (encode_records(part, tokenizer, 96) for part in (records[::2], records[1::2]))
    model, base = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    scores = [tuple(score_tokens(m, d, runtime) for d in (members, nonmembers)) for m in (model, base)]
    scrubber = scrubbing.TrainingScrubber(records[::2], "exact", tokenizer, 96, seed=0)
    return scrubber.gap_by_catch(tagger, members, nonmembers, *scores), scores, members


def test_the_gap_on_missed_and_caught_values_adds_up_to_the_pooled_gap():
    from privtune.measures.leakage import leakage_measures, mean_loss

    split, ((m_train, m_test), (b_train, b_test)), members = scored_split("regex")
    missed, caught = split["missed"], split["caught"]
    assert min(missed["tokens_train"], caught["tokens_train"], missed["tokens_test"], caught["tokens_test"]) > 0
    assert missed["reason"] is None and caught["reason"] is None
    # Every sensitive token is in exactly one part, and each side's CE_S is the parts' token-weighted mean.
    assert missed["tokens_train"] + caught["tokens_train"] == m_train.sensitive.sum()
    assert missed["tokens_test"] + caught["tokens_test"] == m_test.sensitive.sum()
    for side, scores in (("train", m_train), ("test", m_test)):
        n_missed, n_caught = missed[f"tokens_{side}"], caught[f"tokens_{side}"]
        weighted = (n_missed * missed[f"ce_s_{side}"] + n_caught * caught[f"ce_s_{side}"]) / (n_missed + n_caught)
        assert weighted == pytest.approx(mean_loss(scores, True), rel=1e-6)
    pooled = leakage_measures(m_train, m_test, b_train, b_test)
    share = {side: missed[f"tokens_{side}"] / (missed[f"tokens_{side}"] + caught[f"tokens_{side}"])
             for side in ("train", "test")}
    recomposed = (share["test"] * missed["ce_s_test"] + (1 - share["test"]) * caught["ce_s_test"]
                  - share["train"] * missed["ce_s_train"] - (1 - share["train"]) * caught["ce_s_train"])
    assert recomposed == pytest.approx(pooled["memorisation_gap"], abs=1e-6)  # float32 token means


def test_each_part_s_net_gap_has_a_person_clustered_interval_computed_by_hand():
    from privtune.data.tokenize import encode_records
    from privtune.measures.intervals import clustered_mean, difference_interval
    from privtune.models.tiny import tiny_tokenizer
    from privtune.study.scrubbing import find_spans, missed_positions

    split, ((m_train, m_test), (b_train, b_test)), _ = scored_split("regex")
    records = generate_corpus("customer-sim", 16, seed=3)
    halves = (records[::2], records[1::2])
    tokenizer = tiny_tokenizer()
    # the missed mask is checked by character elsewhere; here it picks each part's tokens
    missed = [missed_positions(encode_records(h, tokenizer, 96), find_spans(h, "regex", "exact"), tokenizer, 96)
              for h in halves]
    for part, entry in split.items():
        low, high = entry["memorisation_gap_net_ci"]
        assert low < entry["memorisation_gap_net"] < high
        sides = []
        for model, base, half, mask in ((m_test, b_test, halves[1], missed[1]), (m_train, b_train, halves[0], missed[0])):
            sums, tokens = [], []
            for row in range(model.nll.shape[0]):  # one record at a time: its part's sensitive tokens
                chosen = [j for j in range(model.nll.shape[1])
                          if model.sensitive[row, j] and bool(mask[row, j]) == (part == "missed")]
                sums.append(sum(float(model.nll[row, j]) - float(base.nll[row, j]) for j in chosen))
                tokens.append(len(chosen))
            sides.append(clustered_mean(np.array(sums), np.array(tokens), np.array([r.individual for r in half])))
        assert sides[0].value - sides[1].value == pytest.approx(entry["memorisation_gap_net"], abs=1e-5)
        assert difference_interval(*sides) == pytest.approx((low, high), abs=1e-5)


def test_missed_positions_are_the_tokens_of_values_the_tagger_left_checked_by_character():
    from privtune.data.tokenize import encode_records
    from privtune.models.tiny import tiny_tokenizer
    from privtune.study.scrubbing import missed_positions

    tokenizer = tiny_tokenizer()
    records = generate_corpus("customer-sim", 10, seed=5)
    data = encode_records(records, tokenizer, 96)
    found = [regex_spans(r.text) for r in records]
    mask = missed_positions(data, found, tokenizer, 96)
    assert mask.any() and not mask.all()
    for row, (record, tagged) in enumerate(zip(records, found)):
        removed = {i for f in tagged for i in range(f.start, f.end)}
        left = [s for s in record.spans
                if any(i not in removed and not record.text[i].isspace() for i in range(s.start, s.end))]
        offsets = tokenizer(record.text, truncation=True, max_length=96, return_offsets_mapping=True)["offset_mapping"]
        expected = [b > a and any(a < s.end and s.start < b for s in left) for a, b in offsets[1:]]
        assert mask[row, :len(expected)].tolist() == expected and not mask[row, len(expected):].any()


def test_an_exact_scrub_misses_nothing_and_says_so():
    split, ((m_train, _), _), _ = scored_split("exact")
    assert split["missed"]["tokens_train"] == 0 and split["missed"]["memorisation_gap_net"] is None
    assert split["missed"]["reason"] == ("the exact tagger missed no sensitive value of the members "
                                         "(exact removes the data's own spans)")
    assert split["caught"]["tokens_train"] == m_train.sensitive.sum()


def test_the_report_shows_the_missed_and_caught_gaps_apart_and_says_what_below_zero_means():
    from privtune.report.export import scrub_gap_cells
    from privtune.report.html import scrub_section

    regex, _, _ = scored_split("regex")
    exact, _, _ = scored_split("exact")
    runs = [{"label": label, "status": "done", "final": {}, "scrub": {"tagger": tagger, "replacement": "placeholder",
                                                                       "truth": "exact", "by_catch": split}}
            for label, tagger, split in (("fft+scrub-regex", "regex", regex), ("fft+scrub-exact", "exact", exact))]
    page = scrub_section(runs)
    assert "mem. gap (net), missed values" in page and "mem. gap (net), caught values" in page
    assert "placeholder effect" in page
    low, high = regex["missed"]["memorisation_gap_net_ci"]
    assert (f'{regex["missed"]["memorisation_gap_net"]:+.3f} <small>[{low:+.3f}, {high:+.3f}] '
            f'{regex["missed"]["tokens_train"]}/') in page
    assert "n/a <small" in page and "(exact removes the data&#x27;s own spans)" in page
    cells = scrub_gap_cells(runs[1])
    assert cells["scrub_gap_net_missed"] is None and cells["scrub_tokens_missed_members"] == 0
    assert cells["scrub_gap_missed_na"].startswith("the exact tagger missed no sensitive value")
    assert scrub_gap_cells(runs[0])["scrub_gap_net_caught"] == regex["caught"]["memorisation_gap_net"]
    assert (scrub_gap_cells(runs[0])["scrub_gap_net_missed_low"], scrub_gap_cells(runs[0])["scrub_gap_net_missed_high"]) \
        == (low, high)
    one_person = {**regex, "missed": {**regex["missed"], "memorisation_gap_net_ci": None}}
    runs[0]["scrub"]["by_catch"] = one_person
    assert "no interval (fewer than 2 people on a side)" in scrub_section(runs)


def test_a_scrubbed_run_is_compared_with_its_unscrubbed_method_on_the_values_the_tagger_missed(tmp_path):
    from privtune.config import parse_config
    from privtune.measures.intervals import clustered_mean
    from privtune.measures.token_scores import missed_level
    from privtune.report.differences import missed_value_difference
    from privtune.report.html import scrub_section, unscrubbed_source
    from privtune.study.driver import open_store, run_study

    cfg = parse_config({
        "name": "missed", "model": "tiny-llama", "output_dir": str(tmp_path / "out"), "precision": "fp32",
        "data": {"source": "customer-sim", "n_individuals": 16, "max_length": 96},
        "canaries": {"enabled": False}, "attacks": {"enabled": False}, "save_artifacts": False,
        "train": {"epochs": 1, "batch_size": 4, "physical_batch_size": 4, "lr": 1e-3},
        "methods": [{"method": "fft"}, {"method": "fft", "scrub": {"tagger": "regex"}}]})
    assert run_study(cfg, show_progress=False).failed == {}
    store = open_store(cfg)
    runs = {r["label"]: r for r in store.runs("missed")}
    store.close()
    base, plain, scrubbed = runs["base"], runs["fft"], runs["fft+scrub-regex"]
    assert unscrubbed_source(scrubbed, list(runs.values())) is plain
    level = missed_level("regex")
    missed = scrubbed["scrub"]["by_catch"]["missed"]
    n = scrubbed["record_stats"]["n_members"]
    tokens = np.array(plain["record_stats"][level]["tokens"])
    assert (tokens[:n].sum(), tokens[n:].sum()) == (missed["tokens_train"], missed["tokens_test"])

    def net_gap(run):  # by hand from the stored sums: (run − base) mean on non-members minus on members
        nll = -np.nan_to_num(np.array(run["record_stats"][level]["loglik"], dtype=float))
        base_nll = -np.nan_to_num(np.array(base["record_stats"][level]["loglik"], dtype=float))
        people = np.array(run["record_stats"]["person"])
        test, train = (clustered_mean((nll - base_nll)[rows], tokens[rows], people[rows])
                       for rows in (slice(n, None), slice(0, n)))
        return test.value - train.value

    assert net_gap(scrubbed) == pytest.approx(missed["memorisation_gap_net"], abs=1e-5)
    value, low, high = missed_value_difference(scrubbed, plain, "regex")
    assert value == pytest.approx(net_gap(scrubbed) - net_gap(plain), abs=1e-9) and low < value < high
    assert f"{value:+.3f} <small>[{low:+.3f}, {high:+.3f}] vs fft</small>" in scrub_section(list(runs.values()))
