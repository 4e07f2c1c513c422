"""Built-in synthetic corpora with exact sensitive spans, and the registry that names them.

A corpus is a function ``(n_individuals, seed) -> list[Record]`` registered under a name
with :func:`register_corpus` in the module that defines it (``customer_sim.py``,
``synbio.py``; both are imported at the bottom of this file so they register).

Texts are written piece by piece with :class:`TextBuilder`: a literal chunk, then a
value chunk with its label, and so on. Spans therefore come from construction, never
from searching the finished text, so they are exact even when a value also occurs
elsewhere by chance (a first name inside an e-mail address, a year inside an IBAN).
"""

from __future__ import annotations

import random
import re
from typing import Callable

from privtune.data.records import Record, Span
from privtune.errors import PrivtuneError
from privtune.registry import Registry

#: Labels the built-in corpora use; every span carries one of them.
LABELS: tuple[str, ...] = (
    "NAME", "EMAIL", "PHONE", "ADDRESS", "ACCOUNT", "ORDER", "CARD", "DOB", "IBAN",
    "CITY", "UNIVERSITY", "EMPLOYER",
)

CorpusFn = Callable[[int, int], list[Record]]

#: name -> generator ``(n_individuals, seed) -> records``.
CORPORA: Registry[CorpusFn] = Registry("corpus", alternative="or a path to a .jsonl/.csv file", sort=True)
#: Decorator: make a generator available to :func:`generate_corpus` as ``name``.
register_corpus = CORPORA.register


def generate_corpus(name: str, n_individuals: int, seed: int) -> list[Record]:
    """Records about ``n_individuals`` synthetic people; same arguments, same records.

    Raises:
        PrivtuneError: unknown ``name`` or ``n_individuals`` < 1.
    """
    generate = CORPORA.lookup(name)
    if n_individuals < 1:
        raise PrivtuneError(f"n_individuals must be at least 1, got {n_individuals}",
                            "ask for one or more individuals")
    return generate(n_individuals, seed)


def individual_rng(corpus: str, seed: int, index: int) -> random.Random:
    """A generator private to one individual.

    Seeding per individual (a string seed is hashed with SHA-512, stable across runs and
    machines) makes person ``i`` the same whatever ``n_individuals`` is, so a smaller
    corpus is a prefix of a larger one.
    """
    return random.Random(f"{corpus}/{seed}/{index}")


_PIECES = re.compile(r"\d|[A-Za-z]+|[^\sA-Za-z\d]")


def approx_tokens(text: str) -> int:
    """Roughly how many tokens a BPE tokenizer of a small LM makes of ``text``.

    Counts words, single digits and punctuation marks, times 1.15: within about 5 %
    of SmolLM2's tokenizer on both corpora. Digit-heavy texts (card numbers, phones)
    cost many more tokens than characters suggest, so record lengths are budgeted in
    tokens, not characters, to fit the default ``data.max_length`` of 128.
    """
    return round(1.15 * len(_PIECES.findall(text)))


class TextBuilder:
    """Accumulates text chunk by chunk, recording a span for every value chunk."""

    _FIELD = re.compile(r"\{(\w+)\}")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._spans: list[Span] = []
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def lit(self, text: str) -> "TextBuilder":
        """Append non-sensitive text."""
        self._parts.append(text)
        self._length += len(text)
        return self

    def val(self, value: str, label: str) -> "TextBuilder":
        """Append a sensitive value and remember where it sits."""
        if not value or value != value.strip():
            raise ValueError(f"sensitive value must be non-empty without outer spaces: {value!r}")
        self._spans.append(Span(self._length, self._length + len(value), label))
        return self.lit(value)

    def fill(self, template: str, values: dict[str, tuple[str, str]], plain: dict[str, str]) -> "TextBuilder":
        """Append ``template``, replacing ``{field}`` by a labelled value or plain text.

        ``values`` maps a field to ``(value, label)``; ``plain`` maps a field to
        non-sensitive text. A field in neither is a template bug (KeyError).
        """
        pos = 0
        for m in self._FIELD.finditer(template):
            self.lit(template[pos : m.start()])
            field = m.group(1)
            if field in values:
                self.val(*values[field])
            else:
                self.lit(plain[field])
            pos = m.end()
        return self.lit(template[pos:])

    def build(self) -> tuple[str, list[Span]]:
        return "".join(self._parts), list(self._spans)


# Imported last: each module registers itself with the registry defined above.
from privtune.data.corpora import customer_sim, synbio  # noqa: E402,F401
