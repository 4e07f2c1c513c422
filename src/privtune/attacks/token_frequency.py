"""Token frequencies of a reference corpus: the calibration of DC-PDD (Zhang et al., 2024).

DC-PDD compares a token's probability under the model with how common the token is in
text in general. The paper estimates that from a large public corpus (MIMIR: 15 shards
of C4); no corpus can be downloaded here, so the reference corpus is the study's own
**non-member records** as scored (every real token of each record's trained window,
tokenised by the study's tokenizer): text of the same kind that the model never trained
on. A record's own tokens are never part of its reference: members are not in the
corpus, and each non-member is calibrated against the corpus *without itself* (leave
one out), so neither side's score reads its own text.

Frequencies are Laplace-smoothed over the tokenizer's vocabulary V, as in the paper's
code and MIMIR's ``dc_pdd.py``: ``f(t) = (1 + count(t)) / (total + V)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privtune.data.tokenize import EncodedDataset
from privtune.errors import PrivtuneError


@dataclass
class TokenFrequencies:
    """Per target token of a set of records, shapes (N, L-1), aligned with ``TokenScores``."""

    ids: np.ndarray  # the target token's id (position t holds token t + 1 of the record)
    log_frequency: np.ndarray  # log f(id) in the reference corpus without this record


def _real_tokens(data: EncodedDataset) -> np.ndarray:
    """(N, L) ids with -1 on padding."""
    return np.where(data.attention_mask.numpy() == 1, data.input_ids.numpy(), -1)


#: Records compared at once: the comparisons below are (rows, L, L) arrays, so at 128
#: tokens a block of 512 records holds 8 MB of booleans, whatever the number of records.
BLOCK = 512


def _own_counts(tokens: np.ndarray) -> np.ndarray:
    """(N, L-1): how often each target token occurs among all real tokens of its own record."""
    out = np.zeros((tokens.shape[0], max(tokens.shape[1] - 1, 0)), dtype=np.int64)
    for start in range(0, tokens.shape[0], BLOCK):
        block = tokens[start:start + BLOCK]
        out[start:start + BLOCK] = ((block[:, 1:, None] == block[:, None, :]) & (block[:, None, :] >= 0)).sum(axis=2)
    return out


def reference_frequencies(members: EncodedDataset, nonmembers: EncodedDataset,
                          vocab_size: int) -> tuple[TokenFrequencies, TokenFrequencies]:
    """Log frequency of every target token of (members, non-members) in the non-member
    corpus, each non-member's own tokens left out of its own reference."""
    corpus = _real_tokens(nonmembers)
    real = corpus[corpus >= 0]
    if real.size and real.max() >= vocab_size:
        raise PrivtuneError(f"token id {int(real.max())} is outside the vocabulary of {vocab_size}",
                            "score the records with the tokenizer they were encoded with")
    counts = np.bincount(real, minlength=vocab_size).astype(float)
    total = counts.sum()

    def table(data: EncodedDataset, leave_out: bool) -> TokenFrequencies:
        tokens = _real_tokens(data)
        ids = np.maximum(tokens[:, 1:], 0)  # padding: any id, never scored
        own = _own_counts(tokens) if leave_out else 0
        own_total = (tokens >= 0).sum(axis=1, keepdims=True) if leave_out else 0
        log_f = np.log(1 + counts[ids] - own) - np.log(total - own_total + vocab_size)
        return TokenFrequencies(ids, log_f)

    return table(members, False), table(nonmembers, True)


def first_occurrences(ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(N, L-1) bool: the positions whose token id occurs at no earlier position of ``positions``."""
    width = ids.shape[1]
    earlier = np.tril(np.ones((width, width), dtype=bool), k=-1)  # [t, s]: s < t
    repeated = np.zeros(ids.shape, dtype=bool)
    for start in range(0, ids.shape[0], BLOCK):  # (rows, L, L) at a time, as in _own_counts
        rows = slice(start, start + BLOCK)
        repeated[rows] = ((ids[rows, :, None] == ids[rows, None, :]) & earlier[None]
                          & positions[rows, None, :]).any(axis=2)
    return positions & ~repeated
