"""Secrets made of chosen tokens, for the designs that choose them (unlikely-token, bigram, new-token).

A design that picks token ids must write them as text (a canary is a record) that the
tokenizer turns back into exactly those ids, or the audit would score tokens the design
never chose. Word tokens (a space and ASCII letters, one vocabulary entry) do: a
byte-level BPE splits text into words before merging, so ``" apple pie"`` is encoded word
by word, and a word that is one token encodes to itself. :func:`word_tokens` keeps the
ids for which that holds, checked by encoding; :func:`token_canaries` checks every
canary's secret again after writing it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np

from privtune.auditing.designs import DesignInputs, audit_record, design_key
from privtune.auditing.designs.random_secret import canary_tag
from privtune.data.records import Record
from privtune.errors import PrivtuneError
from privtune.train import streams

#: Tokens in a secret: each adds evidence (its log-likelihood ratio) to the canary's score.
SECRET_TOKENS = 8
#: Index of the designs' content sub-streams of ``streams.AUDIT_CANARIES`` (random's is 1).
CONTENT_STREAM = 3


def word_tokens(tokenizer) -> np.ndarray:
    """Sorted ids of the tokens that are a space and ASCII letters and encode to themselves."""
    pieces = {token_id: tokenizer.decode([token_id]) for token_id in tokenizer.get_vocab().values()}
    words = sorted(i for i, text in pieces.items()
                   if len(text) >= 3 and text[0] == " " and text[1:].isascii() and text[1:].isalpha())
    encoded = tokenizer([pieces[i] for i in words], add_special_tokens=False)["input_ids"]
    return np.array([i for i, ids in zip(words, encoded) if ids == [i]], dtype=np.int64)


def canary_prefix(rng: random.Random) -> str:
    """A canary's own prefix (three random words, as in the random design), before its secret."""
    return f"Audit note {canary_tag(rng)}: the access code is"


def content_rng(inputs: DesignInputs, design: str, index: int) -> random.Random:
    """Canary ``index``'s own random stream: the first canaries stay the same when ``count`` grows."""
    return random.Random(streams.stream_seed(inputs.seed, streams.AUDIT_CANARIES, CONTENT_STREAM,
                                             design_key(design), index))


def token_canaries(inputs: DesignInputs, design: str, pool: Sequence[int],
                   choose: Callable[[random.Random, Sequence[int]], list[int]] | None = None,
                   note: str | None = None) -> list[Record]:
    """``inputs.count`` canaries of ``design``: each a random prefix, then a secret of
    :data:`SECRET_TOKENS` tokens drawn from ``pool`` (by ``choose``: uniformly, without
    repeats, by default), then a full stop; ``note``: how the design fell back, if it did.
    Raises if a secret does not encode back to its ids."""
    tokenizer = inputs.tokenizer()
    if len(pool) < SECRET_TOKENS:
        raise PrivtuneError(f"the {design} design found only {len(pool)} usable tokens in this tokenizer",
                            "use privacy_audit.design: random")
    choose = choose or (lambda rng, tokens: rng.sample(list(tokens), SECRET_TOKENS))
    out = []
    for i in range(inputs.count):
        rng = content_rng(inputs, design, i)
        prefix, ids = canary_prefix(rng), choose(rng, pool)
        secret = tokenizer.decode(ids)
        if tokenizer(secret, add_special_tokens=False)["input_ids"] != list(ids):
            raise ValueError(f"{design} canary {i}: its secret {secret!r} does not encode back to {ids}")
        out.append(audit_record(i, prefix, secret, ".", design, note))
    return out
