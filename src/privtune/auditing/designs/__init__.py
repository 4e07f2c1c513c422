"""Audit canary designs: how the records a one-run privacy audit plants are written.

A design is one file in this package, registered where it is defined with
:func:`register_canary_design`; a design gets a :class:`DesignInputs` and returns
``count`` records, each its own individual, whose secret is the span
(label :data:`AUDIT_LABEL`) the audit scores. The audit is only as strong as its
canaries (Panda et al., *Privacy Auditing of Large Language Models*, ICLR 2025): the
designs here are ``random`` (the baseline), ``unlikely-token`` (secrets of the words the
base model least expects), ``bigram`` (of words a bigram model of the fine-tuning data
finds least likely), ``new-token`` (of tokens the base model never learnt) and
``sampled`` (text the base model writes at a high temperature, after Mitchell and
Andrew, 2026). Every file must be imported at the bottom of this module: registration
happens at import.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from privtune.data.records import Record, Span
from privtune.registry import Registry

#: The label of an audit canary's secret span.
AUDIT_LABEL = "AUDIT_CANARY"
#: The record ``meta`` key that marks an audit canary. Audit canaries also carry ``canary``
#: (their id), so the code that treats exposure canaries as individuals of their own
#: (federated dealing, forget sets, scrubbing's tagger figures) treats them alike.
AUDIT_META = "audit_canary"
#: The record ``meta`` key of an audit canary's design; ``random`` canaries, written
#: before there were other designs, carry none (so their records, and the studies that
#: stored them, keep their digest).
AUDIT_DESIGN = "audit_design"


def design_of(record: Record) -> str:
    """The design that wrote audit canary ``record``."""
    return record.meta.get(AUDIT_DESIGN, "random")


@dataclass(frozen=True)
class DesignInputs:
    """What a design may draw on: how many canaries, the seed of their content (a stream
    of its own, apart from the IN/OUT draw), the members (for designs that model the
    fine-tuning data, such as bigram canaries) and the study's base model (its tokenizer
    and weights, loaded only by the designs that ask for them)."""

    count: int
    seed: int
    corpus: tuple[Record, ...] = ()
    model: str | None = None

    def tokenizer(self):
        """The base model's tokenizer."""
        return _tokenizer(self._model_ref())

    def base_model(self):
        """The base model (fp32, CPU, eval mode) and its tokenizer: a ``LoadedModel``."""
        return _loaded(self._model_ref())

    def _model_ref(self) -> str:
        if self.model is None:
            raise ValueError("this canary design needs the study's model (DesignInputs.model)")
        return self.model


@cache
def _tokenizer(model: str):
    from privtune.models.loading import load_tokenizer  # imported here: transformers

    return load_tokenizer(model)


@cache
def _loaded(model: str):
    from privtune.models.loading import load_model  # imported here: transformers

    return load_model(model)


def design_key(design: str) -> int:
    """A stable non-negative int for ``design``: its index in the random streams."""
    return int.from_bytes(hashlib.blake2b(design.encode(), digest_size=4).digest(), "little")


Design = Callable[[DesignInputs], list[Record]]
DESIGNS: Registry[Design] = Registry("audit canary design")
register_canary_design = DESIGNS.register


#: The record ``meta`` key of a design's note: how it fell back where it could not apply as designed.
DESIGN_NOTE = "design_note"


def audit_record(index: int, prefix: str, secret: str, suffix: str, design: str = "random",
                 note: str | None = None) -> Record:
    """Audit canary ``index`` of ``design``: ``prefix + secret + suffix``, its own
    individual, the secret a span (``random`` canaries keep the ids they always had);
    ``note``: the design's fallback, if it took one."""
    name = f"audit-canary-{index}" if design == "random" else f"audit-{design}-{index}"
    return Record(id=name, individual=name, text=prefix + secret + suffix,
                  spans=[Span(len(prefix), len(prefix) + len(secret), AUDIT_LABEL)],
                  meta={"canary": name, AUDIT_META: True, **({AUDIT_DESIGN: design} if design != "random" else {}),
                        **({DESIGN_NOTE: note} if note else {})})


def make_audit_canaries(design: str, inputs: DesignInputs) -> list[Record]:
    """``inputs.count`` audit canaries of ``design``."""
    records = DESIGNS.lookup(design)(inputs)
    if len(records) != inputs.count or len({r.individual for r in records}) != inputs.count:
        raise ValueError(f"design {design!r} gave {len(records)} canaries of distinct individuals, "
                         f"not {inputs.count}")
    return records


from privtune.auditing.designs import (  # noqa: E402,F401  (registration)
    bigram,
    new_token,
    random_secret,
    sampled,
    unlikely_token,
)
