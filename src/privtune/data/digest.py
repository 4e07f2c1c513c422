"""Digests of the data a run uses, so a stored result can say which data it was measured on.

A run's config names its data (``customer-sim``, 80 people, seed 0; or a file path) but
does not fix them: a user edits their JSONL file, a checkpoint's tokenizer is replaced.
The study's cache therefore keys each run by its config *and* by :attr:`DataDigests.data`,
a SHA-256 over everything the records and the tokenizer put into a figure:

- ``records``: the members and non-members (the split), with each record's id,
  individual, text, spans and metadata, the canaries, the poisoned records, the backdoor
  prompts, the name of the tagger that labelled the spans, and the audit canaries with
  which of them are trained on (only when the study has them, so the digests of studies
  without them stay what they were);
- ``tokenizer``: the tokenizer's own definition (vocabulary, merges, normaliser,
  pre-tokeniser, post-processor, added tokens), without the padding and truncation state
  that transformers sets on it while encoding.

Every digest is of canonical JSON (sorted keys, no spaces, UTF-8), so it is the same on
every machine and Python version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from privtune.data.canaries import Canary
from privtune.data.records import Record


def digest_of(payload) -> str:
    """SHA-256 (hex) of ``payload`` as canonical JSON."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def record_payload(record: Record) -> dict:
    return {"id": record.id, "individual": record.individual, "text": record.text,
            "spans": [[s.start, s.end, s.label] for s in record.spans], "meta": record.meta}


def records_digest(*, members: list[Record], nonmembers: list[Record], canaries: list[Canary],
                   poisoned: list[Record], backdoor_prompts: dict[str, list[str]], tagger: str,
                   audit: tuple[list[Record], list[bool]] | None = None) -> str:
    """The digest of a study's records (see the module docstring); ``audit``: the audit
    canaries and which are trained on."""
    extra = {} if audit is None else {"audit_canaries": [record_payload(r) for r in audit[0]],
                                      "audit_trained": list(audit[1])}
    return digest_of({
        **extra,
        "members": [record_payload(r) for r in members],
        "nonmembers": [record_payload(r) for r in nonmembers],
        "canaries": [asdict(c) for c in canaries],
        "poisoned": [record_payload(r) for r in poisoned],
        "backdoor_prompts": backdoor_prompts,
        "tagger": tagger,
    })


def tokenizer_digest(tokenizer) -> str:
    """The digest of a fast tokenizer's definition (see the module docstring)."""
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    for state in ("padding", "truncation"):  # set by transformers on each padded call
        definition.pop(state, None)
    return digest_of(definition)


@dataclass(frozen=True)
class DataDigests:
    """What a run's data were: the records' digest, the tokenizer's, and both in one."""

    records: str
    tokenizer: str

    @property
    def data(self) -> str:
        """The digest a run's cache entry is keyed by."""
        return digest_of({"records": self.records, "tokenizer": self.tokenizer})

    def as_dict(self) -> dict[str, str]:
        return {"data": self.data, "records": self.records, "tokenizer": self.tokenizer}


def short(digest: str | None) -> str:
    """The first 12 hex digits, for messages (as config hashes are shown)."""
    return digest[:12] if digest else "none"
