"""The token sequences a canary's secrets are written as, for the exact rank search.

A secret is scored on the canonical tokenization of the whole canary text (see
:func:`privtune.measures.exposure.secret_losses`), and tokenizers may merge a secret's
characters with each other (``"48"``), with the space before it (``" 4"``) or with the
text after it. So :mod:`privtune.measures.rank_search` walks token sequences, not
characters:

- the *context* is the token prefix every secret's text shares, cut before the first
  token that touches the secret (BOS included); the model runs it once;
- after it comes the *window*: the rest of the prefix (e.g. the space before the
  secret), the secret and the suffix. A token may come next where its text matches the
  window: the fixed characters of prefix and suffix, any character of the alphabet
  inside the secret;
- a sequence ends at the first token that reaches the secret's end: later tokens do not
  touch the secret and are not scored. Tokens wholly before the secret cost nothing.

That trie holds every tokenization of every secret, canonical or not (``"4","8"`` as
well as ``"48"``). A complete sequence counts only if it *is* the canonical tokenization
of its secret's text (:meth:`SecretTokenSpace.canonical_path` asks the tokenizer), so
each secret counts once, with the loss it is scored with; other sequences cost search
effort only.

The one assumption, that every secret's canonical tokenization starts with the context
and is made of vocabulary tokens whose text this table knows, holds for tokenizers that
split words apart before merging (byte-level BPE, SentencePiece). It is checked on the
canary, its sampled candidates and every secret the search counts;
:class:`TokenizationMismatch` says where it fails, and the exposure is then estimated.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from privtune.attacks.continuation import check_fast_tokenizer
from privtune.data.canaries import Canary
from privtune.errors import PrivtuneError


class TokenizationMismatch(PrivtuneError):
    """A secret's canonical tokenization leaves the trie (it rewrites the context, or
    uses a token whose text the vocabulary table does not give): no search is exact."""


@lru_cache(maxsize=4)
def token_texts(tokenizer) -> tuple[str, ...]:
    """The text every token id stands for, special tokens as ``""``.

    Decoding a token alone may drop its leading space (SentencePiece decoders strip the
    first one), so each is decoded after an anchor token and the anchor's text removed.
    Tokens that are a fragment of a multi-byte character decode to U+FFFD and match no
    secret.
    """
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][0]
    head = tokenizer.decode([anchor], clean_up_tokenization_spaces=False)
    special = set(tokenizer.all_special_ids)
    pairs = tokenizer.batch_decode([[anchor, i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)
    return tuple("" if i in special or not p.startswith(head) else p[len(head):] for i, p in enumerate(pairs))


@dataclass(frozen=True)
class Step:
    """The tokens that may come next at one window position, as parallel arrays."""

    ids: np.ndarray       # (n,) token ids
    ends: np.ndarray      # (n,) window position after the token
    scored: np.ndarray    # (n,) bool: the token touches the secret, so its NLL counts
    texts: tuple[str, ...]


@dataclass
class SecretTokenSpace:
    """A canary's secret space as token sequences after a shared context.

    Attributes:
        canary: whose format and text this is.
        context: token ids every secret's text starts with, before the window.
        window: the text after the context with the true secret written in; positions
            ``[secret_start, secret_end)`` hold the secret.
        steps: ``steps[k]`` lists the tokens that may start at window position ``k``.
    """

    canary: Canary
    context: list[int]
    window: str
    secret_start: int
    steps: list[Step]

    @property
    def secret_end(self) -> int:
        return self.secret_start + self.canary.length

    @classmethod
    def build(cls, tokenizer, canary: Canary, probes: list[str]) -> "SecretTokenSpace":
        """The space of ``canary``, its context taken from the texts of ``probes``
        (secrets of its format; the canary's own is always added) and checked on them.

        Raises:
            TokenizationMismatch: a probe's canonical tokenization leaves the trie.
        """
        check_fast_tokenizer(tokenizer)
        secrets = [canary.secret] + [s for s in probes if s != canary.secret]
        encodings = tokenizer([canary.text(s) for s in secrets], return_offsets_mapping=True,
                              add_special_tokens=True)
        cut = min(_first_touching(offsets, canary.secret_start, canary.secret_start + canary.length)
                  for offsets in encodings["offset_mapping"])
        context = _common_prefix(encodings["input_ids"], cut)
        if not context:
            raise TokenizationMismatch(f"no token before {canary.id}'s secret is the same for every secret",
                                       "give the canary a prefix, or a tokenizer that adds a BOS token")
        texts = token_texts(tokenizer)
        context_text = "".join(texts[i] for i in context)
        if not canary.prefix.startswith(context_text):
            raise TokenizationMismatch(f"the tokens before {canary.id}'s secret do not spell its prefix",
                                       "use a tokenizer whose tokens decode to the text they encode")
        window = canary.text()[len(context_text):]
        space = cls(canary, context, window, len(canary.prefix) - len(context_text),
                    _steps(texts, window, len(canary.prefix) - len(context_text), canary))
        for secret, ids in zip(secrets, encodings["input_ids"]):
            space.path_from_ids(secret, ids)
        return space

    def canonical_paths(self, tokenizer, secrets: list[str]) -> list[tuple[int, ...]]:
        """Each secret's canonical token sequence after the context, up to the first
        token that reaches the secret's end.

        Raises:
            TokenizationMismatch: a secret's tokenization leaves the trie.
        """
        if not secrets:
            return []
        encodings = tokenizer([self.canary.text(s) for s in secrets], add_special_tokens=True)["input_ids"]
        return [self.path_from_ids(s, ids) for s, ids in zip(secrets, encodings)]

    def path_from_ids(self, secret: str, ids: list[int]) -> tuple[int, ...]:
        """The trie path of ``secret`` given its text's token ids (see :meth:`canonical_paths`)."""
        if list(ids[: len(self.context)]) != self.context:
            raise TokenizationMismatch(f"the secret {secret!r} changes the tokens before {self.canary.id}'s secret",
                                       "use a tokenizer that splits words apart before merging")
        window = self.window[: self.secret_start] + secret + self.window[self.secret_end:]
        path, position = [], 0
        for token in ids[len(self.context):]:
            step = self.steps[position]
            hit = np.flatnonzero(step.ids == token)
            if not hit.size or window[position: step.ends[hit[0]]] != step.texts[hit[0]]:
                raise TokenizationMismatch(f"token {token} of the secret {secret!r} does not spell its text",
                                           "use a tokenizer whose tokens decode to the text they encode")
            path.append(int(token))
            position = int(step.ends[hit[0]])
            if position >= self.secret_end:
                return tuple(path)
        raise TokenizationMismatch(f"the secret {secret!r} has no token reaching its end",
                                   "check the canary's suffix")


def _first_touching(offsets: list[tuple[int, int]], start: int, end: int) -> int:
    """Index of the first token whose characters overlap ``[start, end)``."""
    for t, (a, b) in enumerate(offsets):
        if b > a and a < end and start < b:
            return t
    raise TokenizationMismatch("a secret has no tokens", "give canaries a non-empty secret")


def _common_prefix(seqs: list[list[int]], limit: int) -> list[int]:
    first = seqs[0][:limit]
    for n, token in enumerate(first):
        if any(s[n] != token for s in seqs[1:]):
            return list(first[:n])
    return list(first)


def _steps(texts: tuple[str, ...], window: str, secret_start: int, canary: Canary) -> list[Step]:
    """``steps[k]``: the tokens whose text fits the window at position ``k``, for every
    ``k`` before the secret's end."""
    secret_end = secret_start + canary.length
    alphabet = set(canary.alphabet)
    allowed = alphabet | set(window[:secret_start]) | set(window[secret_end:])
    usable = [(i, t) for i, t in enumerate(texts) if t and set(t) <= allowed]

    def fits(text: str, k: int) -> bool:
        if k + len(text) > len(window):
            return False
        return all(ch in alphabet if secret_start <= k + j < secret_end else ch == window[k + j]
                   for j, ch in enumerate(text))

    steps = []
    for k in range(secret_end):
        fitting = [(i, t) for i, t in usable if fits(t, k)]
        ends = np.array([k + len(t) for _, t in fitting], dtype=np.int64)
        steps.append(Step(np.array([i for i, _ in fitting], dtype=np.int64), ends, ends > secret_start,
                          tuple(t for _, t in fitting)))
    return steps
