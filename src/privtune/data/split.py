"""Split records into members and non-members by individual, and sanity-check a dataset.

The leakage measures compare a model's loss on sensitive values it trained on with
values it never saw. That comparison is only fair when no person sits on both sides:
a held-out ticket that repeats a member's e-mail would count memorisation as
generalisation. So the unit of the split is ``Record.individual``, never the record.
"""

from __future__ import annotations

import random
from collections import Counter

from privtune.data.records import Record
from privtune.errors import PrivtuneError


def split_by_individual(records: list[Record], test_fraction: float,
                        seed: int) -> tuple[list[Record], list[Record]]:
    """(train, test): ``test_fraction`` of the individuals, chosen at random, go to test.

    Deterministic for a given ``seed``; records keep their input order on each side.
    The number of test individuals is rounded and then clamped so both sides get at
    least one individual.

    Raises:
        PrivtuneError: ``test_fraction`` outside (0, 1), or fewer than two individuals.
    """
    if not 0 < test_fraction < 1:
        raise PrivtuneError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}",
                            "use e.g. 0.5 to hold out half of the individuals")
    people = sorted({r.individual for r in records})
    if len(people) < 2:
        raise PrivtuneError(f"the data holds {len(people)} individual(s); a member/non-member split needs two or more",
                            "add records about other people, or give each record its own individual")
    random.Random(seed).shuffle(people)
    n_test = min(max(round(len(people) * test_fraction), 1), len(people) - 1)
    test_people = set(people[:n_test])
    train = [r for r in records if r.individual not in test_people]
    test = [r for r in records if r.individual in test_people]
    return train, test


def check_dataset(records: list[Record]) -> None:
    """Raise a :class:`PrivtuneError` if ``records`` cannot support a privacy study.

    Checks: at least two records, unique ids, spans inside their text, sorted and
    non-overlapping, and at least one sensitive span somewhere (without one there is
    nothing to measure leakage on).
    """
    if len(records) < 2:
        raise PrivtuneError(f"dataset has {len(records)} record(s)", "give at least two records")
    dup = [i for i, n in Counter(r.id for r in records).items() if n > 1]
    if dup:
        raise PrivtuneError(f"record id '{dup[0]}' occurs more than once", "give every record a unique id")
    for r in records:
        prev_end = 0
        for s in r.spans:
            if not (prev_end <= s.start < s.end <= len(r.text)):
                raise PrivtuneError(f"record '{r.id}' has a span ({s.start}, {s.end}, {s.label}) that is empty, outside "
                                    f"its {len(r.text)}-character text, out of order or overlapping another",
                                    "give sorted, non-overlapping spans with 0 <= start < end <= len(text)")
            prev_end = s.end
    if not any(r.spans for r in records):
        raise PrivtuneError("dataset has no sensitive spans",
                            "give spans in the data, or use tagger 'regex' or 'presidio' to find them")
