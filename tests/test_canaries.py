"""Canary generation: deterministic, distinct, inserted the right number of times with
exact spans, and candidate secrets drawn uniformly from the rest of the format."""

from __future__ import annotations

import pytest

from privtune.data.canaries import (
    CANARY_LABEL,
    Canary,
    _index_of,
    _secret_at,
    candidate_secrets,
    canary_records,
    make_canaries,
)
from privtune.errors import PrivtuneError


def test_make_canaries_is_deterministic_and_seed_dependent():
    assert make_canaries(seed=3) == make_canaries(seed=3)
    assert [c.secret for c in make_canaries(seed=3)] != [c.secret for c in make_canaries(seed=4)]


def test_default_canaries_have_the_documented_layout():
    canaries = make_canaries()
    assert [c.repetitions for c in canaries] == [1, 2, 4, 8, 16, 0, 0]
    assert [c.id for c in canaries] == [f"canary-{i}" for i in range(7)]
    for c in canaries:
        assert c.length == 6 and len(c.secret) == 6 and c.secret.isdigit()
        assert c.text() == c.prefix + c.secret + "."
        assert c.text("000000") == c.prefix + "000000."
        assert c.space_size == 10**6


def test_secrets_and_prefixes_are_distinct():
    canaries = make_canaries(repetitions=(1, 2, 4, 8, 16), per_repetition=10, n_reference=20, seed=1)
    assert len(canaries) == 70
    assert len({c.secret for c in canaries}) == 70
    assert len({c.prefix for c in canaries}) == 70
    assert len({c.prefix.split(" ")[0] for c in canaries}) > 3  # phrasings vary


def test_distinct_secrets_even_when_the_space_is_nearly_full():
    canaries = make_canaries(repetitions=(1,), per_repetition=8, n_reference=2, secret_length=1)
    assert sorted(c.secret for c in canaries) == list("0123456789")


def test_per_repetition_and_secret_length():
    canaries = make_canaries(repetitions=(2, 5), per_repetition=3, n_reference=1, secret_length=4, seed=7)
    assert [c.repetitions for c in canaries] == [2, 2, 2, 5, 5, 5, 0]
    assert all(len(c.secret) == 4 == c.length for c in canaries)


@pytest.mark.parametrize("kwargs", [
    {"repetitions": (0, 1)}, {"repetitions": (-2,)}, {"repetitions": (1.5,)}, {"per_repetition": -1},
    {"n_reference": -1}, {"secret_length": 0},
    {"repetitions": (1,), "per_repetition": 10, "n_reference": 1, "secret_length": 1},
])
def test_make_canaries_rejects_bad_arguments(kwargs):
    with pytest.raises(PrivtuneError):
        make_canaries(**kwargs)


def test_canary_validates_its_format():
    with pytest.raises(PrivtuneError):
        Canary("c", "code ", "12a", length=3)
    with pytest.raises(PrivtuneError):
        Canary("c", "code ", "123", length=4)
    with pytest.raises(PrivtuneError):
        Canary("c", "code ", "123", length=3, repetitions=-1)
    with pytest.raises(PrivtuneError):
        Canary("c", "code ", "aa", alphabet="aab", length=2)


def test_canary_records_repeat_each_canary_r_times_with_exact_spans():
    canaries = make_canaries(repetitions=(1, 3), n_reference=2)
    records = canary_records(canaries)
    assert len(records) == 1 + 3
    by_canary = {}
    for rec in records:
        by_canary.setdefault(rec.individual, []).append(rec)
    assert {k: len(v) for k, v in by_canary.items()} == {"canary-0": 1, "canary-1": 3}
    assert [r.id for r in by_canary["canary-1"]] == ["canary-1-rep-0", "canary-1-rep-1", "canary-1-rep-2"]
    for canary in canaries[:2]:
        for rec in by_canary[canary.id]:
            assert rec.text == canary.text()
            assert rec.meta == {"canary": canary.id, "repetitions": canary.repetitions}
            assert len(rec.spans) == 1 and rec.spans[0].label == CANARY_LABEL
            assert rec.text[rec.spans[0].start:rec.spans[0].end] == canary.secret
            assert rec.span_values() == [(CANARY_LABEL, canary.secret)]
    assert not any(r.individual in ("canary-2", "canary-3") for r in records)  # references stay out


def test_candidates_have_the_format_exclude_the_secret_and_are_distinct():
    canary = make_canaries()[0]
    cands = candidate_secrets(canary, 500, seed=0)
    assert len(cands) == len(set(cands)) == 500
    assert canary.secret not in cands
    assert all(len(s) == 6 and s.isdigit() for s in cands)
    assert cands == candidate_secrets(canary, 500, seed=0)
    assert cands != candidate_secrets(canary, 500, seed=1)


def test_all_candidates_of_a_small_space_are_every_other_secret():
    canary = Canary("c", "code ", "42", length=2)
    cands = candidate_secrets(canary, 99, seed=0)
    assert sorted(cands) == [f"{i:02d}" for i in range(100) if i != 42]
    with pytest.raises(PrivtuneError):
        candidate_secrets(canary, 100, seed=0)
    assert candidate_secrets(canary, 0) == []


def test_candidates_from_an_enormous_space_use_rejection_sampling():
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    canary = Canary("c", "key ", "a" * 20, alphabet=alphabet, length=20)
    cands = candidate_secrets(canary, 50, seed=2)
    assert len(set(cands)) == 50 and all(len(s) == 20 and set(s) <= set(alphabet) for s in cands)


def test_candidate_sampling_is_roughly_uniform():
    canary = Canary("c", "code ", "7", length=1)
    counts = {d: 0 for d in "012345689"}
    for seed in range(900):
        counts[candidate_secrets(canary, 1, seed=seed)[0]] += 1
    assert min(counts.values()) > 60 and max(counts.values()) < 140  # expected 100 each


def test_index_round_trip():
    for alphabet, length in (("0123456789", 3), ("ab", 5), ("xyz", 4)):
        for i in range(len(alphabet) ** length):
            assert _index_of(_secret_at(i, alphabet, length), alphabet) == i
    assert _secret_at(42, "0123456789", 4) == "0042"
