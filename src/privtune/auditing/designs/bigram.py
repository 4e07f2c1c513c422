"""The ``bigram`` design: secrets a bigram model of the fine-tuning data finds least likely.

Panda et al. (ICLR 2025) propose it as the model-free design: no forward pass of any
model, only the tokenizer and the data. The bigram model is interpolated,
P(b | a) = λ·c(a b)/c(a) + (1 − λ)·(c(b) + 1)/(N + V), so the least likely words after
any word are those never seen after it and rarest in the data. The pool is the word tokens
(:mod:`~privtune.auditing.designs.word_tokens`) with the lowest count in the members'
text (all that never occur, on a corpus this small); each secret is drawn from it so that
no two neighbours ever occur as a pair in the data.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import numpy as np

from privtune.auditing.designs import DesignInputs, register_canary_design
from privtune.auditing.designs.word_tokens import SECRET_TOKENS, token_canaries, word_tokens
from privtune.data.records import Record

NAME = "bigram"
#: Least frequent share of the word tokens kept when every word occurs in the data.
POOL_SHARE = 0.1
#: The fewest tokens the pool holds (all word tokens, if fewer).
MIN_POOL = 4 * SECRET_TOKENS
#: Draws a secret may take before the data is declared too dense in pairs of rare words.
MAX_DRAWS = 10_000


def corpus_counts(inputs: DesignInputs) -> tuple[Counter, set[tuple[int, int]]]:
    """Token counts and the token pairs seen in the members' text."""
    tokenizer = inputs.tokenizer()
    unigrams, pairs = Counter(), set()
    for ids in tokenizer([r.text for r in inputs.corpus], add_special_tokens=False)["input_ids"]:
        unigrams.update(ids)
        pairs.update(zip(ids, ids[1:]))
    return unigrams, pairs


def bigram_pool(words: np.ndarray, unigrams: Counter) -> np.ndarray:
    """The word tokens least frequent in the data: all that never occur, or the rarest share."""
    counts = np.array([unigrams.get(int(w), 0) for w in words])
    unseen = words[counts == 0]
    if len(unseen) >= MIN_POOL:
        return unseen
    size = min(len(words), max(MIN_POOL, int(POOL_SHARE * len(words))))
    return words[np.argsort(counts, kind="stable")[:size]]


@register_canary_design(NAME)
def bigram_secrets(inputs: DesignInputs) -> list[Record]:
    unigrams, pairs = corpus_counts(inputs)

    def choose(rng: random.Random, pool: Sequence[int]) -> list[int]:
        secret: list[int] = []
        for _ in range(MAX_DRAWS):
            token = rng.choice(pool)
            if token not in secret and (not secret or (secret[-1], token) not in pairs):
                secret.append(token)
                if len(secret) == SECRET_TOKENS:
                    return secret
        raise ValueError(f"no secret of {SECRET_TOKENS} tokens without a pair seen in the data in {MAX_DRAWS} draws")

    return token_canaries(inputs, NAME, bigram_pool(word_tokens(inputs.tokenizer()), unigrams).tolist(), choose)
