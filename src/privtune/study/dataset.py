"""The study's data, built once: records → spans → split by individual → canaries and
poison → tensors."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from privtune.auditing.study_audit import AuditCanaries, build_audit_canaries
from privtune.config import StudyConfig
from privtune.data.backdoor import backdoor_prompts, poison_records
from privtune.data.canaries import Canary, canary_records, make_canaries
from privtune.data.corpora import generate_corpus
from privtune.data.digest import DataDigests, records_digest, tokenizer_digest
from privtune.data.loaders import load_records
from privtune.data.records import Record
from privtune.data.split import check_dataset, split_by_individual
from privtune.data.tagging import tag_records
from privtune.data.tokenize import EncodedDataset, encode_records
from privtune.errors import PrivtuneError


@dataclass
class StudyData:
    """Members (training records about people), non-members, and the training set itself.

    ``train`` is ``members`` plus the inserted canary, audit canary and poisoned records;
    leakage is measured on ``members`` so that canaries (measured by exposure), audit
    canaries (by the privacy audit) and poison (by the backdoor's success rate) do not
    blur it. ``audit``: every audit canary (IN and OUT) encoded, with which are trained on.
    """

    members: EncodedDataset
    nonmembers: EncodedDataset
    train: EncodedDataset
    canaries: list[Canary]
    tagger: str
    #: what these data are, for the cache and every stored result (see ``privtune.data.digest``)
    digests: DataDigests
    #: held-out prompts ending with / without the backdoor trigger (empty without a backdoor)
    backdoor_triggered: list[str] = field(default_factory=list)
    backdoor_clean: list[str] = field(default_factory=list)
    audit: EncodedDataset | None = None
    audit_trained: list[bool] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "members": len(self.members), "nonmembers": len(self.nonmembers),
            "train_records": len(self.train), "canaries": len(self.canaries),
            **({"audit_canaries": len(self.audit), "audit_canaries_trained": sum(self.audit_trained)}
               if self.audit is not None else {}),
            "train_tokens": self.train.n_tokens, "tagger": self.tagger,
            "poisoned_records": sum(bool(r.meta.get("backdoor")) for r in self.train.records),
            "sensitive_token_share": round(float(self.members.sensitive.sum()) / max(1, self.members.n_tokens), 4),
        }


def load_study_records(cfg: StudyConfig):
    """The records named by ``cfg.data`` and the tagger that labelled them."""
    source = cfg.data.source
    if Path(source).suffix.lower() in (".jsonl", ".csv") or Path(source).exists():
        records = load_records(source)
        if all(r.meta.get("spans_given") for r in records):
            return records, "given"
        return tag_records(records, cfg.data.tagger)
    return generate_corpus(source, cfg.data.n_individuals, cfg.data.seed), "exact"


@dataclass
class StudyRecords:
    """The study's records before tokenisation: what ``privtune data export`` writes."""

    members: list[Record]
    nonmembers: list[Record]
    canaries: list[Canary]
    poisoned: list[Record]
    tagger: str
    backdoor_triggered: list[str] = field(default_factory=list)
    backdoor_clean: list[str] = field(default_factory=list)
    audit: AuditCanaries | None = None

    @property
    def train(self) -> list[Record]:
        """What a model of the study trains on: members, canary copies, the IN audit canaries, poison."""
        audit = self.audit.inserted if self.audit else []
        return self.members + canary_records(self.canaries) + audit + self.poisoned

    def digest(self) -> str:
        """The digest of these records, split, canaries, audit canaries and poison (``privtune.data.digest``)."""
        return records_digest(members=self.members, nonmembers=self.nonmembers, canaries=self.canaries,
                              poisoned=self.poisoned, tagger=self.tagger,
                              backdoor_prompts={"triggered": self.backdoor_triggered, "clean": self.backdoor_clean},
                              audit=(self.audit.records, self.audit.trained) if self.audit else None)


def build_study_records(cfg: StudyConfig) -> StudyRecords:
    """Load or generate the records, split them by individual, add canaries and poison."""
    records, tagger = load_study_records(cfg)
    check_dataset(records)
    members, nonmembers = split_by_individual(records, cfg.data.test_fraction, cfg.data.seed)
    canaries = []
    if cfg.canaries.enabled:
        canaries = make_canaries(tuple(cfg.canaries.repetitions), cfg.canaries.per_repetition,
                                 cfg.canaries.n_reference, seed=cfg.data.seed)
    poisoned, triggered, clean = [], [], []
    if cfg.backdoor.enabled:
        b = cfg.backdoor
        poisoned = poison_records(members, b.fraction, b.trigger, b.target, cfg.data.seed)
        triggered, clean = backdoor_prompts(nonmembers, b.n_eval, b.trigger, cfg.data.seed)
    audit = build_audit_canaries(cfg.privacy_audit, cfg.data.seed, members, cfg.model)
    return StudyRecords(members, nonmembers, canaries, poisoned, tagger, triggered, clean, audit)


def study_digests(recs: StudyRecords, tokenizer) -> DataDigests:
    """The digests of a study's data: its records and the tokenizer that encodes them."""
    return DataDigests(records=recs.digest(), tokenizer=tokenizer_digest(tokenizer))


def build_study_data(cfg: StudyConfig, tokenizer, recs: StudyRecords | None = None) -> StudyData:
    """The study's records (``recs``, or built from ``cfg``), tokenised and checked
    against ``data.max_length``."""
    recs = recs if recs is not None else build_study_records(cfg)
    max_len = cfg.data.max_length
    enc_members = encode_records(recs.members, tokenizer, max_len)
    enc_nonmembers = encode_records(recs.nonmembers, tokenizer, max_len)
    if not enc_members.sensitive.any() or not enc_nonmembers.sensitive.any():
        raise PrivtuneError(f"no sensitive tokens survive tokenisation at data.max_length={max_len}",
                            "raise data.max_length or give spans that fall early in the text")
    train = encode_records(recs.train, tokenizer, max_len)
    poisoned = recs.poisoned
    if poisoned and (train.attention_mask[-len(poisoned):].sum(dim=1) >= max_len).any():
        raise PrivtuneError(f"poisoned records do not fit in data.max_length={max_len} tokens, so the backdoor "
                            "target would be cut off", "raise data.max_length or shorten backdoor.trigger/target")
    audit = encode_audit_canaries(recs.audit, tokenizer, max_len) if recs.audit else None
    return StudyData(enc_members, enc_nonmembers, train, recs.canaries, recs.tagger,
                     study_digests(recs, tokenizer), recs.backdoor_triggered, recs.backdoor_clean,
                     audit, list(recs.audit.trained) if recs.audit else [])


def encode_audit_canaries(audit: AuditCanaries, tokenizer, max_len: int) -> EncodedDataset:
    """Every audit canary, encoded for scoring; one that ``max_len`` would cut is an error
    (its secret's last tokens would be neither trained on nor scored)."""
    encoded = encode_records(audit.records, tokenizer, max_len)
    lengths = encoded.attention_mask.sum(dim=1)
    if (lengths >= max_len).any():
        longest = audit.records[int(lengths.argmax())].id
        raise PrivtuneError(f"audit canary {longest} does not fit in data.max_length={max_len} tokens",
                            "raise data.max_length or use another privacy_audit.design")
    return encoded


def shadow_membership(population: list[Record], shadow: int, seed: int) -> list[bool]:
    """Which records shadow model ``shadow`` trains on: a random half of the individuals."""
    people = sorted({r.individual for r in population})
    rng = random.Random(f"shadow-{seed}-{shadow}")
    chosen = set(rng.sample(people, len(people) // 2))
    return [r.individual in chosen for r in population]
