"""Scrubbed training sets: one per scrub setting of a study, built on first use.

What is scrubbed is everything a model trains on (member records, canary copies and
poisoned records), since a real user scrubs all of their training text. Canaries are
scrubbed with the same tagger, so whether the tagger catches a canary's 6-digit secret
is a finding of the study, not a choice of the harness. The members and non-members
that leakage, membership inference and extraction are measured on stay untouched: the
question is whether the *true* values leak.

The tagger's quality is measured once per tagger against the data's own spans
(:func:`privtune.data.tagging.span_scores`) over the distinct training texts: the
members and one copy of each canary (poisoned records repeat members). Those spans are
ground truth for the built-in corpora and for files that give spans; for a file the
study had to tag itself, the scores compare two taggers and say so (``truth``).

A scrubbed model's memorisation gap is reported apart on the values its tagger missed
and on those it caught (:meth:`TrainingScrubber.gap_by_catch`), since the two pull in
opposite directions: a missed value is trained on and memorised like any other, while
in place of a caught one the model learns the placeholder (or surrogate) in the
member's context, which makes the true value *less* likely on members than on
non-members and drives that part's gap below zero. Pooled, the second hides the first.
The tagger is run on the non-members too, so both sides of each gap hold the values the
tagger would miss (or catch): the same kinds of value, not addresses on one side and
e-mails on the other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from privtune.config import ScrubSettings
from privtune.data.records import Record, Span
from privtune.data.scrub import merge_spans, replacer, scrub_record
from privtune.data.tagging import (
    missed_spans, presidio_spans, regex_spans, resolve_tagger, span_scores, tagger_precision, tagger_recall)
from privtune.data.tokenize import EncodedDataset, encode_records
from privtune.errors import PrivtuneError
from privtune.measures.leakage import part_gap
from privtune.measures.token_scores import TokenScores

#: Where a study's spans come from when they are the true ones: a built-in corpus, or a file that gives them.
TRUE_SPANS = ("exact", "given")


def find_spans(records: list[Record], tagger: str, truth: str) -> list[list[Span]]:
    """The spans ``tagger`` finds in each record; ``exact`` takes the records' own spans.

    Raises:
        PrivtuneError: ``exact`` when the records' spans came from a tagger (``truth``),
            or ``presidio`` when it is not installed.
    """
    if tagger == "exact":
        if truth not in TRUE_SPANS:
            raise PrivtuneError(f"scrub.tagger 'exact' needs data with its own spans, but these records were "
                                f"labelled by the {truth} tagger",
                                "give spans in the data file, or use scrub.tagger: regex or presidio")
        return [list(r.spans) for r in records]
    find = presidio_spans if resolve_tagger(tagger) == "presidio" else regex_spans
    return [find(r.text) for r in records]


def _distinct(records: list[Record]) -> list[int]:
    """Indices of the records that tagger quality is measured on: no poison, one copy per canary."""
    seen, keep = set(), []
    for i, r in enumerate(records):
        key = r.meta.get("canary", r.id)
        if not r.meta.get("backdoor") and key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def tagger_stats(records: list[Record], found: list[list[Span]]) -> dict:
    """Span-level recall and precision (overall, recall per type), character-level recall
    and precision, and how many spans scrubbing removes from ``records``."""
    rows = _distinct(records)
    truth = [records[i] for i in rows]
    tagged = [dataclasses.replace(records[i], spans=found[i]) for i in rows]
    return {
        **span_scores(truth, tagged),
        "char_recall": tagger_recall(truth, tagged).get("ALL", 1.0),
        "char_precision": tagger_precision(truth, tagged),
        "spans_removed": sum(len(merge_spans(f)) for f in found),
    }


def missed_positions(data: EncodedDataset, found: list[list[Span]], tokenizer, max_length: int) -> np.ndarray:
    """(N, L-1) bool over ``data``'s target positions: the tokens of values that scrubbing
    with ``found`` (spans per record) leaves, wholly or in part."""
    missed = [dataclasses.replace(r, spans=missed_spans(r, f)) for r, f in zip(data.records, found)]
    mask = encode_records(missed, tokenizer, max_length).sensitive
    if mask.shape != data.sensitive.shape:
        raise ValueError(f"re-encoded records have shape {tuple(mask.shape)}, not {tuple(data.sensitive.shape)}")
    # A token shared by a missed and a caught value counts as missed: it still shows part of a value.
    return (mask & data.sensitive)[:, 1:].numpy()


@dataclass
class Scrubbed:
    """A scrubbed training set and what the run's result says about it."""

    data: EncodedDataset
    stats: dict


@dataclass
class TrainingScrubber:
    """Scrubbed copies of one study's training records, cached per setting.

    Attributes:
        records: the training records, in training order.
        truth: where their spans came from (``exact``, ``given``, or a tagger's name).
        seed: seeds the surrogates, so every run with one setting trains on one text.
    """

    records: list[Record]
    truth: str
    tokenizer: object
    max_length: int
    seed: int
    _found: dict[str, list[list[Span]]] = field(default_factory=dict, repr=False)
    _stats: dict[str, dict] = field(default_factory=dict, repr=False)
    _built: dict[tuple[str, str], Scrubbed] = field(default_factory=dict, repr=False)
    _missed: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def training_set(self, settings: ScrubSettings) -> Scrubbed:
        """The training set scrubbed as ``settings`` say, tokenised, with the tagger's stats."""
        key = (settings.tagger, settings.replacement)
        if key not in self._built:
            if settings.tagger not in self._found:
                found = find_spans(self.records, settings.tagger, self.truth)
                self._found[settings.tagger] = found
                self._stats[settings.tagger] = tagger_stats(self.records, found)
            found = self._found[settings.tagger]
            replace = replacer(settings.replacement, self.seed)
            scrubbed = [scrub_record(r, f, replace) for r, f in zip(self.records, found)]
            stats = {"tagger": settings.tagger, "replacement": settings.replacement, "truth": self.truth,
                     **self._stats[settings.tagger]}
            self._built[key] = Scrubbed(encode_records(scrubbed, self.tokenizer, self.max_length), stats)
        return self._built[key]

    def scrub(self, records: list[Record], settings: ScrubSettings) -> list[Record]:
        """Other records (a shadow model's half of the population) scrubbed the same way."""
        replace = replacer(settings.replacement, self.seed)
        found = find_spans(records, settings.tagger, self.truth)
        return [scrub_record(r, f, replace) for r, f in zip(records, found)]

    def missed(self, tagger: str, members: EncodedDataset, nonmembers: EncodedDataset) -> tuple[np.ndarray, np.ndarray]:
        """(members, non-members) masks of the sensitive tokens ``tagger`` misses (computed once per tagger)."""
        if tagger not in self._missed:
            self._missed[tagger] = tuple(
                missed_positions(data, find_spans(data.records, tagger, self.truth), self.tokenizer, self.max_length)
                for data in (members, nonmembers))
        return self._missed[tagger]

    def gap_by_catch(self, tagger: str, members: EncodedDataset, nonmembers: EncodedDataset,
                     model: tuple[TokenScores, TokenScores], base: tuple[TokenScores, TokenScores]) -> dict:
        """The memorisation gap of a model scrubbed with ``tagger``, apart on the sensitive
        values the tagger missed and on those it caught (see the module's docstring), from
        the model's and the base model's (members, non-members) scores.

        Returns ``{"missed": ..., "caught": ...}``, each as
        :func:`privtune.measures.leakage.part_gap` with its net gap's interval clustered
        by person; a part with no token has a reason."""
        missed = self.missed(tagger, members, nonmembers)
        (m_train, m_test), (b_train, b_test) = model, base
        people = tuple(np.array([r.individual for r in data.records]) for data in (members, nonmembers))
        out = {"missed": part_gap(m_train, m_test, b_train, b_test, missed[0], missed[1], people),
               "caught": part_gap(m_train, m_test, b_train, b_test, ~missed[0], ~missed[1], people)}
        if out["missed"]["tokens_train"] == 0:
            why = " (exact removes the data's own spans)" if tagger == "exact" else ""
            out["missed"]["reason"] = f"the {tagger} tagger missed no sensitive value of the members{why}"
        return out
