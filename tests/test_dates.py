"""Dates drawn against the fixed reference date: the ages asked for, and nothing that
follows the calendar."""

import random
from datetime import date, timedelta

import pytest

from privtune.attacks import pii_candidates
from privtune.data.corpora import generate_corpus
from privtune.data.dates import EPOCH, REFERENCE_DATE, calendar_date, date_of_birth
from privtune.data.digest import record_payload
from privtune.data.scrub import surrogate


def age_on(born: date, day: date) -> int:
    """Whole years from ``born`` to ``day``: the obvious way (one's birthday not yet reached
    this year counts one less)."""
    return day.year - born.year - ((day.month, day.day) < (born.month, born.day))


class Edge:
    """A generator that always draws the lowest (or highest) value, to reach the range's ends."""

    def __init__(self, highest: bool):
        self.highest = highest

    def randint(self, a: int, b: int) -> int:
        return b if self.highest else a


@pytest.mark.parametrize("on", [REFERENCE_DATE, date(2024, 2, 29), date(2023, 2, 28), date(2025, 3, 1),
                                date(2025, 12, 31)])
@pytest.mark.parametrize("ages", [(0, 0), (1, 2), (18, 85), (22, 80)])
def test_birth_dates_cover_exactly_the_ages_asked_for(on, ages):
    low, high = ages
    earliest, latest = (date_of_birth(Edge(h), low, high, on) for h in (False, True))
    assert age_on(earliest, on) == high and age_on(earliest - timedelta(days=1), on) == high + 1
    assert age_on(latest, on) == low and age_on(latest + timedelta(days=1), on) == low - 1
    rng = random.Random(0)
    drawn = {age_on(date_of_birth(rng, low, high, on), on) for _ in range(2000)}
    assert drawn == set(range(low, high + 1))


def test_bad_age_range_is_refused():
    with pytest.raises(ValueError):
        date_of_birth(random.Random(0), 30, 20)


def test_calendar_dates_stay_between_the_epoch_and_the_reference_date():
    rng = random.Random(1)
    days = [calendar_date(rng) for _ in range(2000)]
    assert EPOCH <= min(days) and max(days) <= REFERENCE_DATE and len(set(days)) > 1900


def _everything_that_draws_dates():
    pii_candidates._pool.cache_clear()  # the decoy pools are cached per (label, seed)
    return {
        "synbio": [record_payload(r) for r in generate_corpus("synbio", 30, 3)],
        "customer-sim": [record_payload(r) for r in generate_corpus("customer-sim", 30, 3)],
        "surrogates": [surrogate(label, "1987-04-02", seed) for label in ("DOB", "DATE") for seed in range(5)],
        "decoys": pii_candidates.candidates("DOB", "12 March 1985", 20, seed=0),
    }


@pytest.mark.parametrize("days", [400, -3 * 365 - 40])
def test_nothing_that_draws_dates_follows_the_clock(shift_clock, days):
    today = _everything_that_draws_dates()
    shift_clock(days)
    assert _everything_that_draws_dates() == today
