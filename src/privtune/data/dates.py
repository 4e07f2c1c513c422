"""Dates drawn against a fixed reference date, so the built-in data never follow the calendar.

Faker's ``date_of_birth()`` and ``date()`` draw relative to *today* (through the local
time zone, too): with one seed, the built-in corpora, the scrubber's surrogate dates, the
PII-inference decoys and the tiny test tokenizer changed from one day to the next, and
so did every figure measured on them. Here an age is counted on :data:`REFERENCE_DATE`
and the day is drawn with the caller's seeded generator, so the data are a function of
the seed and privtune's version alone. Moving the reference date changes the built-in
data: it belongs in a new privtune version, with the new digests stored in
``tests/test_data_digest.py``.
"""

from __future__ import annotations

import random
from datetime import date, timedelta

#: The day every age is counted on.
REFERENCE_DATE = date(2026, 1, 1)
#: The first day :func:`calendar_date` draws (as Faker's ``date()``: the Unix epoch).
EPOCH = date(1970, 1, 1)


def years_before(day: date, years: int) -> date:
    """The same day ``years`` earlier; 29 February becomes the 28th in a common year."""
    try:
        return day.replace(year=day.year - years)
    except ValueError:
        return date(day.year - years, 2, 28)


def date_between(rng: random.Random, first: date, last: date) -> date:
    """A day drawn uniformly from ``first`` to ``last``, both included."""
    return date.fromordinal(rng.randint(first.toordinal(), last.toordinal()))


def date_of_birth(rng: random.Random, minimum_age: int, maximum_age: int, on: date = REFERENCE_DATE) -> date:
    """The birth date of someone ``minimum_age`` to ``maximum_age`` whole years old on
    ``on`` (both ages included, as in Faker's ``date_of_birth``), uniform over the days."""
    if not 0 <= minimum_age <= maximum_age:
        raise ValueError(f"ages {minimum_age}..{maximum_age}: need 0 <= minimum_age <= maximum_age")
    earliest = years_before(on, maximum_age + 1) + timedelta(days=1)  # turns maximum_age + 1 the next day
    return date_between(rng, earliest, years_before(on, minimum_age))


def calendar_date(rng: random.Random) -> date:
    """A day from :data:`EPOCH` to :data:`REFERENCE_DATE` (Faker's ``date()`` ends today)."""
    return date_between(rng, EPOCH, REFERENCE_DATE)
