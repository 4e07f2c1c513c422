import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privtune.data.corpora import generate_corpus
from privtune.data.records import Record, Span
from privtune.data.split import check_dataset, split_by_individual
from privtune.errors import PrivtuneError


def rec(i, person, spans=()):
    return Record(f"r{i}", person, "Ann Lee called.", list(spans))


@settings(max_examples=40, deadline=None)
@given(people=st.lists(st.integers(0, 30), min_size=2, max_size=60).filter(lambda p: len(set(p)) >= 2),
       fraction=st.floats(0.01, 0.99), seed=st.integers(0, 1000))
def test_split_never_shares_an_individual_and_keeps_both_sides(people, fraction, seed):
    records = [rec(i, f"p{p}") for i, p in enumerate(people)]
    train, test = split_by_individual(records, fraction, seed)
    assert train and test
    assert not {r.individual for r in train} & {r.individual for r in test}
    assert sorted(r.id for r in train + test) == sorted(r.id for r in records)
    # order within each side is the input order
    assert [r.id for r in train] == [r.id for r in records if r in train]


def test_split_is_deterministic_and_uses_the_fraction_of_individuals():
    records = generate_corpus("customer-sim", 100, seed=0)
    a = split_by_individual(records, 0.3, seed=4)
    assert a == split_by_individual(records, 0.3, seed=4)
    assert a != split_by_individual(records, 0.3, seed=5)
    assert len({r.individual for r in a[1]}) == 30


def test_split_refuses_impossible_requests():
    with pytest.raises(PrivtuneError, match="1 individual"):
        split_by_individual([rec(0, "p"), rec(1, "p")], 0.5, 0)
    with pytest.raises(PrivtuneError, match="strictly between 0 and 1"):
        split_by_individual([rec(0, "p"), rec(1, "q")], 1.0, 0)


def test_check_dataset():
    check_dataset(generate_corpus("synbio", 3, 0))
    with pytest.raises(PrivtuneError, match="dataset has 1 record"):
        check_dataset([rec(0, "p", [Span(0, 3, "NAME")])])
    with pytest.raises(PrivtuneError, match="dataset has no sensitive spans; give spans in the data, or use tagger"):
        check_dataset([rec(0, "p"), rec(1, "q")])
    with pytest.raises(PrivtuneError, match="occurs more than once"):
        check_dataset([rec(0, "p", [Span(0, 3, "NAME")]), rec(0, "q")])
    with pytest.raises(PrivtuneError, match="overlapping"):
        check_dataset([rec(0, "p", [Span(0, 5, "NAME"), Span(3, 7, "NAME")]), rec(1, "q")])
    with pytest.raises(PrivtuneError, match="outside"):
        check_dataset([rec(0, "p", [Span(0, 99, "NAME")]), rec(1, "q")])
