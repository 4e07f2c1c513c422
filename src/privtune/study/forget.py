"""Forget sets: which members an unlearning run forgets, and which records are theirs.

A forget set is a set of *individuals* (the study's privacy unit, as in the
member/non-member split), not of records: forgetting a person means forgetting every
record about them, so the retrained reference trains on none of them, and a person
with three tickets never has one forgotten and two kept. Canary records and poisoned
records are never in a forget set (canaries belong to no member; poison is a copy of a
member's record and goes with that member).

Every forget set of a study is resolved against the records before any run starts
(:func:`check_forget_sets`), so a typo in an id fails the study at once with one line
instead of failing its unlearning runs after the others trained.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from privtune.config import ForgetSettings, StudyConfig
from privtune.data.records import Record
from privtune.data.tokenize import EncodedDataset
from privtune.errors import PrivtuneError


def _examples(ids: list[str], n: int = 3) -> str:
    return ", ".join(ids[:n]) + (", ..." if len(ids) > n else "")


def resolve_forget_set(settings: ForgetSettings, members: list[Record], nonmembers: list[Record],
                       where: str = "forget") -> frozenset[str]:
    """The individuals ``settings`` name among ``members``.

    Raises:
        PrivtuneError: an id that is nobody in the data, an id of a non-member (never
            trained on, so there is nothing to forget), a fraction that picks no one, or
            a forget set holding every member (nothing would be left to train the
            retrained reference on).
    """
    people = sorted({r.individual for r in members})
    outsiders = {r.individual for r in nonmembers}
    if settings.individuals is not None:
        unknown = [i for i in settings.individuals if i not in outsiders and i not in set(people)]
        if unknown:
            raise PrivtuneError(f"{where}.individuals names no known individual: {_examples(unknown)}",
                                f"use ids of the study's members, e.g. {_examples(people)} "
                                "(privtune data export writes them to members.jsonl)")
        held_out = [i for i in settings.individuals if i in outsiders]
        if held_out:
            raise PrivtuneError(f"{where}.individuals names non-members, whom no model trained on: "
                                f"{_examples(held_out)}", f"name members instead, e.g. {_examples(people)}")
        chosen = frozenset(settings.individuals)
    else:
        n = round(settings.fraction * len(people))
        if n == 0:
            raise PrivtuneError(f"{where}.fraction {settings.fraction} of {len(people)} members picks no one",
                                f"raise it to at least {1 / len(people):.3g}, or name forget.individuals")
        chosen = frozenset(random.Random(f"forget-{settings.seed}").sample(people, n))
    if len(chosen) >= len(people):
        raise PrivtuneError(f"{where} holds all {len(people)} members, so the retrained reference would have "
                            "nothing to train on", "forget fewer individuals")
    return chosen


def check_forget_sets(cfg: StudyConfig) -> None:
    """Resolve every forget set of ``cfg`` against its records (raises on the first bad one)."""
    unlearning = [m for m in cfg.methods if m.is_unlearning]
    if not unlearning:
        return
    from privtune.study.dataset import build_study_records  # the records, without a model

    recs = build_study_records(cfg)
    for m in unlearning:
        resolve_forget_set(m.unlearn.forget, recs.members, recs.nonmembers, where=f"method {m.label}: forget")


@dataclass(frozen=True)
class ForgetSet:
    """The individuals to forget, and the split of any dataset of the study by them."""

    individuals: frozenset[str]

    def is_forgotten(self, record: Record) -> bool:
        return record.individual in self.individuals and not record.meta.get("canary")

    def rows(self, records: list[Record]) -> tuple[list[int], list[int]]:
        """(rows of forget records, rows of the others)."""
        forget = [i for i, r in enumerate(records) if self.is_forgotten(r)]
        chosen = set(forget)
        return forget, [i for i in range(len(records)) if i not in chosen]

    def split(self, data: EncodedDataset) -> tuple[EncodedDataset, EncodedDataset]:
        """(forget records, the rest) of ``data``, each in ``data``'s order."""
        forget, rest = self.rows(data.records)
        return data.subset(forget), data.subset(rest)
