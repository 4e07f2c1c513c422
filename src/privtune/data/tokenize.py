"""Tokenisation that keeps every token's sensitivity bit.

A fast tokenizer's character offsets tell which tokens overlap a labelled span; those
tokens get mask bit 1. Records are truncated to ``max_length`` tokens and right-padded,
so a dataset is three dense tensors that batch with plain indexing (DP-SGD's Poisson
sampling picks arbitrary index sets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from privtune.data.records import Record, Span
from privtune.errors import PrivtuneError
from privtune.train.losses import IGNORE_INDEX


@dataclass
class EncodedDataset:
    """Records as padded tensors.

    Attributes:
        records: the source records, in row order.
        input_ids: (N, L) token ids, right-padded with the pad id.
        attention_mask: (N, L) 1 on real tokens.
        sensitive: (N, L) True where a token overlaps a sensitive span.
    """

    records: list[Record]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    sensitive: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def labels(self) -> torch.Tensor:
        """``input_ids`` with padding ignored by the loss."""
        return self.input_ids.masked_fill(self.attention_mask == 0, IGNORE_INDEX)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def subset(self, rows: list[int] | torch.Tensor) -> "EncodedDataset":
        rows = torch.as_tensor(rows, dtype=torch.long)
        return EncodedDataset([self.records[i] for i in rows.tolist()], self.input_ids[rows],
                              self.attention_mask[rows], self.sensitive[rows])


def token_mask(offsets: list[tuple[int, int]], record: Record) -> list[bool]:
    """True for each token whose character range overlaps one of ``record.spans``."""
    mask = []
    for start, end in offsets:
        if end <= start:  # special tokens carry (0, 0)
            mask.append(False)
            continue
        mask.append(any(start < s.end and s.start < end for s in record.spans))
    return mask


def _encode(records: list[Record], tokenizer, max_length: int):
    """The one tokenisation of training and scoring: truncated to ``max_length``, with offsets."""
    if not getattr(tokenizer, "is_fast", False):
        raise PrivtuneError("the tokenizer is not a fast tokenizer, so it has no character offsets",
                            "use a model whose tokenizer has a tokenizer.json")
    return tokenizer([r.text for r in records], return_offsets_mapping=True, truncation=True,
                     max_length=max_length, add_special_tokens=True)


def cut_record(record: Record, end: int) -> Record:
    """``record`` with its text cut at character ``end``: spans past it dropped, a span
    that straddles it clipped to its first part."""
    spans = [Span(s.start, min(s.end, end), s.label) for s in record.spans if s.start < end]
    return Record(record.id, record.individual, record.text[:end], spans, record.meta)


def trained_windows(records: list[Record], tokenizer, max_length: int) -> list[Record]:
    """Each record as training and scoring see it: cut after the last of its first
    ``max_length`` tokens (the end of that token's characters, from the tokenizer's
    offsets). A record shorter than ``max_length`` tokens is returned whole."""
    if not records:
        return []
    enc = _encode(records, tokenizer, max_length)
    out = []
    for record, offsets in zip(records, enc["offset_mapping"]):
        end = max((b for a, b in offsets if b > a), default=0)
        truncated = len(offsets) >= max_length and end < len(record.text)
        out.append(cut_record(record, end) if truncated else record)
    return out


def encode_records(records: list[Record], tokenizer, max_length: int) -> EncodedDataset:
    """Tokenise, truncate to ``max_length`` and right-pad ``records``."""
    enc = _encode(records, tokenizer, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n = len(records)
    input_ids = torch.full((n, max_length), pad_id, dtype=torch.long)
    attention = torch.zeros((n, max_length), dtype=torch.long)
    sensitive = torch.zeros((n, max_length), dtype=torch.bool)
    for row, (ids, offsets, record) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], records)):
        length = len(ids)
        input_ids[row, :length] = torch.tensor(ids)
        attention[row, :length] = 1
        sensitive[row, :length] = torch.tensor(token_mask(offsets, record), dtype=torch.bool)
    # Trim columns no record uses, so short corpora do not pay for max_length.
    width = max(1, int(attention.sum(dim=1).max()))
    return EncodedDataset(records, input_ids[:, :width], attention[:, :width], sensitive[:, :width])
