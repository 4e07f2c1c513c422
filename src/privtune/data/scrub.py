"""Scrubbing: sensitive values cut out of a text before training, spans kept in step.

"Does scrubbing PII before training suffice?" To answer it, a study trains on copies of
its records in which every span a tagger found is replaced by a placeholder of its type
(``[EMAIL]``) or by a *surrogate*, a fake value of the same type drawn with faker, and
then measures leakage of the true values on the original records.

Replacing text shifts every later character offset, so :func:`replace_spans` also moves
the record's own spans: a span the tagger missed keeps its value at its new place, and a
span the tagger (partly) removed grows to cover what replaced it. Tokenisation then
still marks the tokens where a sensitive value, or its stand-in, sits.
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
from collections.abc import Callable
from functools import lru_cache

from faker import Faker

from privtune.data.dates import calendar_date, date_of_birth
from privtune.data.records import Record, Span

REPLACEMENTS = ("placeholder", "surrogate")

#: (span, the text it covers) -> the text that replaces it
Replacer = Callable[[Span, str], str]


def merge_spans(spans: list[Span]) -> list[Span]:
    """Sorted spans with overlapping ones united, keeping the label of the one that starts first.

    Adjacent spans (one ends where the next starts) stay apart: two values written
    back to back are two values. Empty spans are dropped.
    """
    merged: list[Span] = []
    for s in sorted((s for s in spans if s.end > s.start), key=lambda s: (s.start, -s.end)):
        if merged and s.start < merged[-1].end:
            last = merged[-1]
            merged[-1] = Span(last.start, max(last.end, s.end), last.label)
        else:
            merged.append(s)
    return merged


def replace_spans(text: str, remove: list[Span], keep: list[Span], replace: Replacer) -> tuple[str, list[Span]]:
    """``text`` with each span of ``remove`` replaced by ``replace(span, value)``, and
    ``keep`` moved to the new offsets.

    ``remove`` may overlap (overlapping spans are replaced as one, see
    :func:`merge_spans`). A kept span that overlaps a removed one grows to cover its
    whole replacement; kept spans that come to overlap that way are merged.
    """
    placed: list[tuple[int, int, int, int]] = []  # (old start, old end, new start, new end)
    pieces: list[str] = []
    pos = shift = 0
    for s in merge_spans(remove):
        new = replace(s, text[s.start : s.end])
        pieces += [text[pos : s.start], new]
        placed.append((s.start, s.end, s.start + shift, s.start + shift + len(new)))
        shift += len(new) - (s.end - s.start)
        pos = s.end
    pieces.append(text[pos:])

    def moved_start(p: int) -> int:
        offset = 0
        for old_s, old_e, new_s, new_e in placed:
            if old_s <= p < old_e:
                return new_s
            if p < old_s:
                break
            offset = new_e - old_e
        return p + offset

    def moved_end(p: int) -> int:
        offset = 0
        for old_s, old_e, new_s, new_e in placed:
            if old_s < p <= old_e:
                return new_e
            if p <= old_s:
                break
            offset = new_e - old_e
        return p + offset

    moved = [Span(moved_start(s.start), moved_end(s.end), s.label) for s in keep]
    return "".join(pieces), merge_spans(moved)


def placeholder(span: Span, value: str) -> str:
    """The span's type in brackets: ``[EMAIL]``."""
    return f"[{span.label}]"


# Labels with a faker generator of their own; any other label (account, order and card
# numbers, canary secrets, labels of user data) gets a random value of the same shape.
_FAKERS: dict[str, Callable[[Faker, str], str]] = {
    "NAME": lambda f, v: f.name() if " " in v.strip() else f.first_name(),
    "EMAIL": lambda f, v: f.email(),
    "PHONE": lambda f, v: f.phone_number(),
    "ADDRESS": lambda f, v: f.address().replace("\n", ", "),
    "DOB": lambda f, v: date_of_birth(f.random, minimum_age=18, maximum_age=85).isoformat(),
    "DATE": lambda f, v: calendar_date(f.random).isoformat(),
    "IBAN": lambda f, v: f.iban(),
    "CITY": lambda f, v: f.city(),
    "EMPLOYER": lambda f, v: f.company(),
    "UNIVERSITY": lambda f, v: f"University of {f.city()}",
}
_DRAWS = 20  # tries for a surrogate that differs from the value


@lru_cache(maxsize=1)
def _faker() -> Faker:
    return Faker("en_US")


def perturb(value: str, rng: random.Random) -> str:
    """``value`` with every digit and letter redrawn within its class (case kept); a
    leading ``+`` country code (``+44``) is kept, as decoys from another country would
    stand out."""
    code = re.match(r"\+\d{1,3}(?=\D)", value)
    keep = code.end() if code else 0
    out = [value[:keep]]
    for ch in value[keep:]:
        if ch.isdigit():
            out.append(rng.choice(string.digits))
        elif ch.isalpha():
            out.append(rng.choice(string.ascii_uppercase if ch.isupper() else string.ascii_lowercase))
        else:
            out.append(ch)
    return "".join(out)


def surrogate(label: str, value: str, seed: int = 0) -> str:
    """A fake value of type ``label`` that is never ``value``.

    Deterministic in (``seed``, ``label``, ``value``): a value repeated across a
    person's records, or a canary inserted 16 times, gets one surrogate, as a
    pseudonymisation tool would do. A value with nothing to redraw (no letters or
    digits, and no faker generator) gets its placeholder.
    """
    rng = random.Random(f"surrogate/{seed}/{label}/{value}")
    make = _FAKERS.get(label)
    for _ in range(_DRAWS):
        if make is None:
            fake = perturb(value, rng)  # same shape, every letter and digit redrawn
        else:
            f = _faker()
            f.seed_instance(rng.getrandbits(63))
            fake = make(f, value)
        if fake != value:
            return fake
    return placeholder(Span(0, 0, label), value)


def replacer(mode: str, seed: int = 0) -> Replacer:
    """The :data:`Replacer` of a replacement mode: ``placeholder`` or ``surrogate``."""
    if mode == "placeholder":
        return placeholder
    if mode == "surrogate":
        return lambda span, value: surrogate(span.label, value, seed)
    raise ValueError(f"unknown replacement {mode!r}; use one of: {', '.join(REPLACEMENTS)}")


def scrub_record(record: Record, found: list[Span], replace: Replacer) -> Record:
    """A copy of ``record`` with the ``found`` spans replaced and its own spans moved."""
    text, spans = replace_spans(record.text, found, record.spans, replace)
    return dataclasses.replace(record, text=text, spans=spans)
