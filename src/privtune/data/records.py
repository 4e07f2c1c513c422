"""The unit of data: a text with labelled sensitive character spans.

Every corpus, loader and tagger produces :class:`Record` objects; tokenisation turns
their spans into a per-token sensitivity mask. ``individual`` is the privacy unit used
to split train and test, so one person's values never sit on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    """Characters ``text[start:end]`` hold a sensitive value of type ``label``."""

    start: int
    end: int
    label: str


@dataclass
class Record:
    """One training or evaluation example.

    Attributes:
        id: unique within a dataset.
        individual: who the record is about; train/test splits never share one.
        text: the raw text.
        spans: sensitive spans, sorted, non-overlapping, inside ``text``.
        meta: free-form extras (template name, canary repetitions, ...).
    """

    id: str
    individual: str
    text: str
    spans: list[Span] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def span_values(self) -> list[tuple[str, str]]:
        """(label, value) for every sensitive span."""
        return [(s.label, self.text[s.start : s.end]) for s in self.spans]
