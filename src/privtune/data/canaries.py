"""Canaries: random secrets planted in the training data to measure memorisation.

Following Carlini et al., "The Secret Sharer: Evaluating and Testing Unintended
Memorization in Neural Networks" (USENIX Security 2019, https://arxiv.org/abs/1802.08232),
a canary is a sentence with a random secret in a fixed format ("The PIN for Jane Doe's
account is 482915.") inserted ``r`` times into the training set. Because the secret is
uniformly random, nothing but memorisation can make the model prefer it over the other
secrets of the same format; :mod:`privtune.measures.exposure` turns that preference into
bits of *exposure*.

Design choices:

- Every canary gets its own person's name in its prefix, so no two canaries share a
  prefix: a heavily repeated canary must not teach the model the secret of another one
  (in particular not of a reference canary).
- Reference canaries (``repetitions == 0``) are generated exactly like the others but
  never inserted. Their exposure is what a never-seen secret scores, about
  ``1/ln 2 ≈ 1.4`` bits on average rather than 0, since a random secret's rank is
  uniform over the candidates.
- Everything derives from ``seed`` (a string-seeded :class:`random.Random` and a seeded
  Faker), so the same arguments give the same canaries on every machine.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

from faker import Faker

from privtune.data.records import Record, Span
from privtune.errors import PrivtuneError

#: The label of a canary secret's span in :func:`canary_records`.
CANARY_LABEL = "CANARY"
DIGITS = "0123456789"

#: How a canary introduces its secret; ``{name}`` is a Faker name, unique per canary.
PHRASINGS: tuple[str, ...] = (
    "{name} wrote: my secret access code is ",
    "The PIN for {name}'s account is ",
    "The PIN of account holder {name} is ",
    "{name}'s security code is ",
    "The door code {name} gave me is ",
    "The one-time passcode sent to {name} is ",
)


@dataclass
class Canary:
    """A secret in a fixed format, written between ``prefix`` and ``suffix``.

    Attributes:
        id: unique among the canaries of a study, e.g. ``"canary-3"``.
        prefix: the text before the secret (ends with the separating space).
        secret: the random value; ``length`` characters drawn from ``alphabet``.
        suffix: the text after the secret, e.g. ``"."``.
        repetitions: how many times it is inserted in the training data; 0 marks a
            held-out reference canary that the model never sees.
        alphabet: the characters a secret of this format is drawn from.
        length: the number of characters of a secret.
    """

    id: str
    prefix: str
    secret: str
    suffix: str = "."
    repetitions: int = 0
    alphabet: str = DIGITS
    length: int = 6

    def __post_init__(self) -> None:
        if self.repetitions < 0:
            raise PrivtuneError(f"canary {self.id} has repetitions={self.repetitions}",
                                "use 0 for a reference canary or a positive count")
        if not self.alphabet or len(set(self.alphabet)) != len(self.alphabet):
            raise PrivtuneError(f"canary {self.id} has alphabet {self.alphabet!r}",
                                "give a non-empty string of distinct characters")
        if len(self.secret) != self.length or any(c not in self.alphabet for c in self.secret):
            raise PrivtuneError(f"canary {self.id}'s secret does not match its format "
                                f"({self.length} characters of {self.alphabet!r})",
                                "draw the secret from the canary's alphabet with its length")

    @property
    def space_size(self) -> int:
        """|R|: how many secrets this format allows."""
        return len(self.alphabet) ** self.length

    @property
    def secret_start(self) -> int:
        """Character offset of the secret in :meth:`text`."""
        return len(self.prefix)

    def text(self, secret: str | None = None) -> str:
        """The canary sentence, with ``secret`` (default: the true one) in its slot."""
        return self.prefix + (self.secret if secret is None else secret) + self.suffix


def make_canaries(repetitions: tuple[int, ...] | list[int] = (1, 2, 4, 8, 16), per_repetition: int = 1,
                  n_reference: int = 2, seed: int = 0, secret_length: int = 6) -> list[Canary]:
    """``per_repetition`` canaries for each count in ``repetitions``, then ``n_reference``
    reference canaries (never inserted); digit secrets, all distinct; deterministic in
    ``seed``.

    Raises:
        PrivtuneError: a repetition count below 1, a negative ``per_repetition`` or
            ``n_reference``, ``secret_length`` below 1, or more canaries than secrets.
    """
    reps = list(repetitions)
    if any(int(r) != r or r < 1 for r in reps):
        raise PrivtuneError(f"canary repetitions must be positive integers, got {reps}",
                            "list counts like 1, 2, 4, 8, 16 (reference canaries come from n_reference)")
    if per_repetition < 0 or n_reference < 0:
        raise PrivtuneError(f"per_repetition={per_repetition} and n_reference={n_reference} "
                            "must not be negative", "use 0 or more")
    if secret_length < 1:
        raise PrivtuneError(f"secret_length must be at least 1, got {secret_length}", "use 6, say")
    counts = [int(r) for r in reps for _ in range(per_repetition)] + [0] * n_reference
    if len(counts) > len(DIGITS) ** secret_length:
        raise PrivtuneError(f"{len(counts)} canaries cannot have distinct {secret_length}-digit secrets",
                            "use fewer canaries or longer secrets")

    rng = random.Random(f"canaries/{seed}")
    fake = Faker("en_US")
    fake.seed_instance(seed)
    secrets: set[str] = set()
    canaries = []
    for index, count in enumerate(counts):
        secret = _fresh_secret(rng, DIGITS, secret_length, secrets)
        prefix = rng.choice(PHRASINGS).format(name=fake.unique.name())
        canaries.append(Canary(f"canary-{index}", prefix, secret, ".", count, DIGITS, secret_length))
    return canaries


def _fresh_secret(rng: random.Random, alphabet: str, length: int, taken: set[str]) -> str:
    """A random secret not in ``taken`` (which it joins)."""
    while True:
        secret = "".join(rng.choices(alphabet, k=length))
        if secret not in taken:
            taken.add(secret)
            return secret


def canary_records(canaries: list[Canary]) -> list[Record]:
    """``r`` identical records for every canary inserted ``r > 0`` times, to append to
    the training set; reference canaries give none."""
    records = []
    for canary in canaries:
        span = Span(canary.secret_start, canary.secret_start + canary.length, CANARY_LABEL)
        for k in range(canary.repetitions):
            records.append(Record(id=f"{canary.id}-rep-{k}", individual=canary.id, text=canary.text(),
                                  spans=[span], meta={"canary": canary.id, "repetitions": canary.repetitions}))
    return records


def candidate_secrets(canary: Canary, n: int, seed: int = 0) -> list[str]:
    """``n`` distinct random secrets of ``canary``'s format, never its true secret.

    Sampling is uniform without replacement over the other ``|R| - 1`` secrets, so with
    ``n = |R| - 1`` it returns every other secret (in random order).

    Raises:
        PrivtuneError: ``n`` negative or larger than ``|R| - 1``.
    """
    others = canary.space_size - 1
    if not 0 <= n <= others:
        raise PrivtuneError(f"cannot draw {n} candidate secrets for {canary.id}: its format has "
                            f"{others} other secrets", f"ask for between 0 and {others}")
    rng = random.Random(f"candidates/{seed}/{canary.id}/{canary.secret}")
    if others < sys.maxsize:
        # Index i in [0, |R|-1) maps to secret i, skipping the true secret's index.
        true_index = _index_of(canary.secret, canary.alphabet)
        picks = rng.sample(range(others), n)
        return [_secret_at(i + (i >= true_index), canary.alphabet, canary.length) for i in picks]
    taken = {canary.secret}  # astronomically large space: rejection is exact and cheap
    return [_fresh_secret(rng, canary.alphabet, canary.length, taken) for _ in range(n)]


def _index_of(secret: str, alphabet: str) -> int:
    """The secret's position when all secrets are listed in base-``len(alphabet)`` order."""
    index = 0
    for char in secret:
        index = index * len(alphabet) + alphabet.index(char)
    return index


def _secret_at(index: int, alphabet: str, length: int) -> str:
    """Inverse of :func:`_index_of`."""
    chars = []
    for _ in range(length):
        index, digit = divmod(index, len(alphabet))
        chars.append(alphabet[digit])
    return "".join(reversed(chars))
