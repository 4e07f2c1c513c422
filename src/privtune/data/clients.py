"""Federated clients: the training set dealt out by individual.

A client stands for one data holder (a branch, a hospital, a phone), so the unit dealt
is the individual, never the record: all of a person's records sit on one client, as
do all copies of a canary (a secret belongs to one user) and every poisoned record,
which keeps the individual of the member it was made from.

- ``iid``: individuals shuffled and dealt round-robin, so clients differ by one person
  at most.
- ``non-iid``: label skew as in Hsu, Qi and Brown (2019, https://arxiv.org/abs/1909.06335):
  each individual has a *kind* (the ``locale`` of its records where the corpus has one,
  as customer-sim does: clients as regional branches; else the ``template`` of its
  first record; else one kind for all), and for every kind a draw from
  Dirichlet(alpha, ..., alpha) says what share of that kind's people each client gets.
  Lower alpha gives each client fewer kinds. Individuals with no kind of their own
  among the members (canaries) are dealt round-robin as in ``iid``.
"""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np

from privtune.data.records import Record
from privtune.errors import PrivtuneError

#: Record meta keys that give an individual its kind under the non-iid split, in order of preference.
KIND_KEYS = ("locale", "template")


def _kind(records: list[Record]) -> str:
    for key in KIND_KEYS:
        if all(key in r.meta for r in records):
            return str(records[0].meta[key])
    return ""


def _deal(people: list[str], n_clients: int, rng: random.Random, start: int = 0) -> list[list[str]]:
    people = list(people)
    rng.shuffle(people)
    out: list[list[str]] = [[] for _ in range(n_clients)]
    for i, person in enumerate(people):
        out[(start + i) % n_clients].append(person)
    return out


def _dirichlet(by_kind: dict[str, list[str]], n_clients: int, alpha: float, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    out: list[list[str]] = [[] for _ in range(n_clients)]
    for kind in sorted(by_kind):
        people = sorted(by_kind[kind])
        rng.shuffle(people)
        shares = rng.dirichlet([alpha] * n_clients)
        cuts = np.round(np.cumsum(shares) * len(people)).astype(int)[:-1]
        for client, part in enumerate(np.split(np.asarray(people, dtype=object), cuts)):
            out[client].extend(part.tolist())
    return out


def split_clients(records: list[Record], n_clients: int, split: str, alpha: float, seed: int) -> list[list[int]]:
    """The rows of ``records`` each client holds (every row on exactly one client, in row order).

    Raises:
        PrivtuneError: more clients than member individuals, or a client left without records.
    """
    by_person: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_person[r.individual].append(r)
    members = sorted(p for p, rs in by_person.items() if not any("canary" in r.meta for r in rs))
    others = sorted(set(by_person) - set(members))
    if len(members) < n_clients:
        raise PrivtuneError(f"federated.clients is {n_clients} but the training set holds {len(members)} individuals",
                            f"use at most {len(members)} clients, or raise data.n_individuals")
    rng = random.Random(f"clients-{seed}")
    if split == "iid":
        dealt = _deal(members, n_clients, rng)
    else:
        by_kind: dict[str, list[str]] = defaultdict(list)
        for person in members:
            by_kind[_kind(by_person[person])].append(person)
        dealt = _dirichlet(by_kind, n_clients, alpha, seed)
    # Canaries after the people, continuing the deal, so they spread over the clients.
    for client, extra in enumerate(_deal(others, n_clients, rng, start=sum(map(len, dealt)))):
        dealt[client].extend(extra)
    empty = [i for i, people in enumerate(dealt) if not set(people) & set(members)]
    if empty:
        raise PrivtuneError(f"the {split} split leaves client {empty[0]} without any individual's records "
                            f"({len(empty)} of {n_clients} clients empty)",
                            "raise federated.alpha, use fewer federated.clients, or split: iid")
    owner = {person: client for client, people in enumerate(dealt) for person in people}
    rows: list[list[int]] = [[] for _ in range(n_clients)]
    for i, r in enumerate(records):
        rows[owner[r.individual]].append(i)
    return rows


def client_summary(records: list[Record], rows: list[list[int]]) -> list[dict]:
    """Per client: its records, individuals, and kinds (what the non-iid split skews)."""
    out = []
    for client, idx in enumerate(rows):
        held = [records[i] for i in idx]
        people = {r.individual for r in held if "canary" not in r.meta}
        kinds = sorted({_kind([r]) for r in held if "canary" not in r.meta} - {""})
        out.append({"client": client, "records": len(held), "individuals": len(people),
                    "canary_records": sum("canary" in r.meta for r in held),
                    "poisoned_records": sum(bool(r.meta.get("backdoor")) for r in held), "kinds": kinds})
    return out
