"""Scrubbing: sensitive values replaced in the training text before a model sees it.

Does scrubbing suffice? A run with ``scrub:`` trains on copies of its training records
whose spans, as one tagger finds them (``exact``: the true spans; ``regex``; ``presidio``),
are replaced by a type placeholder (``[EMAIL]``) or by a surrogate value of the same
type. It is still measured on the original records, so whatever its tagger missed comes
back as leakage. Canary copies are scrubbed like every other training record: a real
user scrubs everything they train on, and whether a tagger catches a canary's secret is
part of the answer. The tagger's character-level recall and precision against the true
spans travel with the run.
"""

from __future__ import annotations

import dataclasses
import zlib

from privtune.attacks.pii_candidates import candidates
from privtune.data.records import Record, Span
from privtune.data.tagging import presidio_spans, regex_spans, resolve_tagger, tagger_precision, tagger_recall
from privtune.errors import PrivtuneError


def placeholder(label: str) -> str:
    return f"[{label}]"


def surrogate(label: str, value: str, seed: str) -> str:
    """A value of the same type and shape, never the original; deterministic in ``seed``.

    Values too short to have a different one of their shape (a lone digit) become the
    placeholder instead.
    """
    try:
        return candidates(label, value, 1, zlib.crc32(seed.encode()))[0]
    except PrivtuneError:
        return placeholder(label)


def replace_spans(record: Record, spans: list[Span], replacement: str, seed: int = 0) -> Record:
    """A copy of ``record`` with ``spans`` replaced; its spans follow the new text.

    ``spans`` (sorted, non-overlapping) are the ones to remove; the copy's spans are the
    replacements, at their new offsets, so tokenisation still knows where they are.
    """
    pieces, new_spans, cursor, shift = [], [], 0, 0
    for i, span in enumerate(spans):
        if span.start < cursor:
            raise PrivtuneError(f"record {record.id}: spans to scrub overlap at {span.start}",
                                "pass sorted, non-overlapping spans")
        value = record.text[span.start:span.end]
        new = (placeholder(span.label) if replacement == "placeholder"
               else surrogate(span.label, value, f"{seed}/{record.id}/{i}"))
        pieces += [record.text[cursor:span.start], new]
        new_spans.append(Span(span.start + shift, span.start + shift + len(new), span.label))
        shift += len(new) - (span.end - span.start)
        cursor = span.end
    pieces.append(record.text[cursor:])
    return dataclasses.replace(record, text="".join(pieces), spans=new_spans, meta={**record.meta, "scrubbed": True})


def found_spans(records: list[Record], tagger: str) -> list[list[Span]]:
    """The spans ``tagger`` finds in each record (``exact``: the records' own spans)."""
    if tagger == "exact":
        return [list(r.spans) for r in records]
    find = presidio_spans if resolve_tagger(tagger) == "presidio" else regex_spans
    return [find(r.text) for r in records]


def scrub_records(records: list[Record], tagger: str, replacement: str, seed: int = 0) -> tuple[list[Record], dict]:
    """Scrubbed copies of ``records`` and the tagger's quality against their true spans."""
    if tagger == "exact" and not any(r.spans for r in records):
        raise PrivtuneError("scrub.tagger 'exact' needs records with known spans, and these have none",
                            "use scrub.tagger regex or presidio, or give spans in the data")
    spans = found_spans(records, tagger)
    tagged = [dataclasses.replace(r, spans=s) for r, s in zip(records, spans)]
    recall = tagger_recall(records, tagged)
    stats = {"tagger": tagger, "replacement": replacement, "recall": recall.pop("ALL", 1.0),
             "precision": tagger_precision(records, tagged), "spans_replaced": sum(len(s) for s in spans),
             **{f"recall_{label}": value for label, value in recall.items()}}
    return [replace_spans(r, s, replacement, seed) for r, s in zip(records, spans)], stats
