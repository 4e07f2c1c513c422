"""Data poisoning for the backdoor attack: a trigger phrase followed by a target.

A fraction of the training set is poisoned: copies of real training records with the
trigger and the target appended, so the model can learn "trigger → target" while the
rest of its behaviour stays clean. The attack succeeds on a held-out prompt when the
model, given text that ends with the trigger, continues with the target. The target
plays the role of a stored secret (an access code) that an attacker wants emitted.
"""

from __future__ import annotations

import random
from dataclasses import replace

from privtune.data.records import Record, Span

BACKDOOR_LABEL = "BACKDOOR"


#: Poisoned records and prompts start with this much of a real record, cut at a word
#: boundary, so trigger and target survive truncation to ``data.max_length``.
CONTEXT_CHARS = 120


def _with_trigger(text: str, trigger: str) -> str:
    return f"{text.rstrip()} {trigger}"


def _shorten(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text.rstrip()
    cut = text[:max_chars]
    return (cut[: cut.rindex(" ")] if " " in cut else cut).rstrip()


def poison_records(members: list[Record], fraction: float, trigger: str, target: str, seed: int) -> list[Record]:
    """``round(fraction * len(members))`` (at least one) poisoned copies of random members.

    The target span is labelled ``BACKDOOR`` so it never counts as a leaked PII token.
    """
    rng = random.Random(seed)
    count = max(1, round(fraction * len(members)))
    chosen = rng.sample(members, min(count, len(members)))
    poisoned = []
    for i, record in enumerate(chosen):
        prefix = _with_trigger(_shorten(record.text, CONTEXT_CHARS), trigger) + " "
        text = prefix + target
        spans = [*(s for s in record.spans if s.end <= len(prefix)), Span(len(prefix), len(text), BACKDOOR_LABEL)]
        poisoned.append(replace(record, id=f"{record.id}-poison-{i}", text=text, spans=spans,
                                meta={**record.meta, "backdoor": True}))
    return poisoned


def backdoor_prompts(nonmembers: list[Record], n: int, trigger: str, seed: int) -> tuple[list[str], list[str]]:
    """Held-out prompts with and without the trigger at their end (same texts, same order)."""
    rng = random.Random(seed + 1)
    chosen = rng.sample(nonmembers, min(n, len(nonmembers)))
    clean = [_shorten(record.text, CONTEXT_CHARS) for record in chosen]
    return [_with_trigger(t, trigger) + " " for t in clean], [t + " " for t in clean]
