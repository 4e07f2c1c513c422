"""Decoy values for PII inference: plausible values of the same type and shape as a true one.

PII inference ranks a person's true value among ``n`` decoys by the model's likelihood.
Chance is ``1/(n+1)`` only if nothing but memorisation separates the truth from the
decoys, so the decoys must look like the truth: same type, and where possible the same
*shape* (a 16-digit card in groups of four, a date written ``12 March 1985``, an
e-mail ``first.last@domain.tld``, a name of the same length). A decoy in another format
would lose on format alone, for members and non-members alike.

How a decoy is made, in order of preference:

1. a faker-made value of the label (a pool of :data:`POOL_SIZE` values per label and
   seed, drawn from the same locales and formats as the built-in corpora, see
   ``data/corpora/customer_sim.py`` and ``synbio.py``) with the *exact* shape of the
   truth: every character in the same class (digit, upper, lower, or the same
   punctuation mark);
2. a pool value with the same *coarse* shape: letter runs collapsed (``Aa Aa`` for any
   two capitalised words), digits and punctuation still exact; dates of birth start
   here, since their exact shape would fix the month (``May`` is the only 3-letter one);
3. for a mostly-letter value (a company, an address), a pool value with as many words
   and digits: a real name beats a redrawn string of letters;
4. the truth with every digit replaced by a random digit and every letter by a random
   letter of the same case, punctuation and spaces kept (also the only method for a
   label without a pool, and for short values like a card's last four digits).

Choices within a level are random but seeded by ``(seed, label, true value)``, so the
same call gives the same decoys.
"""

from __future__ import annotations

import random
import string
from functools import lru_cache
from typing import Callable

from faker import Faker

from privtune.data.corpora.customer_sim import CARD_TYPES, LOCALES, MONTHS, _ascii
from privtune.data.corpora.synbio import UNIVERSITY_FORMS
from privtune.data.dates import date_of_birth
from privtune.data.scrub import perturb
from privtune.errors import PrivtuneError

POOL_SIZE = 1500
COARSE_FIRST = frozenset({"DOB"})  # labels whose exact shape gives too much away (see above)
_MAX_TRIES = 200  # perturbation draws per wanted decoy before giving up

Maker = Callable[[Faker, random.Random], str]


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _name(fk: Faker, rng: random.Random) -> str:
    first = fk.first_name()
    return first if rng.random() < 0.4 else f"{first} {fk.last_name()}"


def _email(fk: Faker, rng: random.Random) -> str:
    first, last = _ascii(fk.first_name()), _ascii(fk.last_name())
    local = f"{first}{rng.choice(['.', '_', ''])}{last}" if rng.random() < 0.6 else f"{first[:1]}{last}"
    if rng.random() < 0.4:
        local += str(rng.randrange(1, 99))
    return f"{local}@{fk.free_email_domain()}"


def _card(fk: Faker, rng: random.Random) -> str:
    number = fk.credit_card_number(rng.choice(CARD_TYPES))
    sep = rng.choice([" ", "-", ""])
    return sep.join(number[i: i + 4] for i in range(0, len(number), 4))


def _dob(fk: Faker, rng: random.Random) -> str:
    d = date_of_birth(rng, minimum_age=18, maximum_age=85)
    month = MONTHS[d.month - 1]
    return rng.choice([d.isoformat(), f"{month} {d.day}, {d.year}", f"{d.day} {month} {d.year}",
                       f"{d.month:02d}/{d.day:02d}/{d.year}", f"{d.day:02d}/{d.month:02d}/{d.year}"])


def _iban(fk: Faker, rng: random.Random) -> str:
    iban = fk.iban()
    return " ".join(iban[i: i + 4] for i in range(0, len(iban), 4)) if rng.random() < 0.5 else iban


def _university(fk: Faker, rng: random.Random) -> str:
    return rng.choice(UNIVERSITY_FORMS).format(city=fk.city(), last=fk.last_name())


#: label -> how to make one value of it (the registry of labels with a faker pool).
MAKERS: dict[str, Maker] = {
    "NAME": _name,
    "EMAIL": _email,
    "PHONE": lambda fk, rng: fk.phone_number(),
    "ADDRESS": lambda fk, rng: fk.address().replace("\n", ", "),
    "ACCOUNT": lambda fk, rng: rng.choice([_digits(rng, 8), f"AC-{_digits(rng, 8)}",
                                           f"{_digits(rng, 4)}-{_digits(rng, 6)}", f"CU{_digits(rng, 9)}"]),
    "ORDER": lambda fk, rng: rng.choice([f"ORD-{_digits(rng, 7)}", f"{rng.choice('ABCDEFGHKLMNPRSTWX')}{_digits(rng, 9)}",
                                         f"{_digits(rng, 3)}-{_digits(rng, 7)}-{_digits(rng, 4)}"]),
    "CARD": _card,
    "DOB": _dob,
    "IBAN": _iban,
    "CITY": lambda fk, rng: fk.city(),
    "UNIVERSITY": _university,
    "EMPLOYER": lambda fk, rng: fk.company(),
}


def exact_shape(value: str) -> str:
    """Each character as its class: ``9`` digit, ``A`` upper, ``a`` lower, else itself."""
    return "".join("9" if ch.isdigit() else ("A" if ch.isupper() else "a") if ch.isalpha() else ch for ch in value)


def coarse_shape(value: str) -> str:
    """:func:`exact_shape` with each run of letters collapsed: ``Aa`` capitalised word,
    ``A`` all-caps run (two letters or more), ``a`` lower-case run."""
    out, i = [], 0
    while i < len(value):
        if not value[i].isalpha():
            out.append("9" if value[i].isdigit() else value[i])
            i += 1
            continue
        j = i
        while j < len(value) and value[j].isalpha():
            j += 1
        run = value[i:j]
        out.append("A" if run.isupper() and len(run) > 1 else "Aa" if run[0].isupper() else "a")
        i = j
    return "".join(out)


@lru_cache(maxsize=64)
def _pool(label: str, seed: int) -> tuple[dict, dict, dict]:
    """Faker values of ``label`` indexed by exact, coarse and loose shape (distinct, in draw order)."""
    rng = random.Random(f"pii-pool/{label}/{seed}")
    fakers = {}
    for locale, _, _ in LOCALES:
        fakers[locale] = Faker(locale)
        fakers[locale].seed_instance(rng.getrandbits(63))
    locales, weights = [loc for loc, _, _ in LOCALES], [w for _, w, _ in LOCALES]
    seen: set[str] = set()
    by_exact: dict[str, list[str]] = {}
    by_coarse: dict[str, list[str]] = {}
    by_loose: dict[tuple[int, int], list[str]] = {}
    for _ in range(POOL_SIZE):
        value = MAKERS[label](fakers[rng.choices(locales, weights)[0]], rng).strip()
        if value and value not in seen:
            seen.add(value)
            by_exact.setdefault(exact_shape(value), []).append(value)
            by_coarse.setdefault(coarse_shape(value), []).append(value)
            by_loose.setdefault(loose_shape(value), []).append(value)
    return by_exact, by_coarse, by_loose




def loose_shape(value: str) -> tuple[int, int]:
    """(number of words, number of digits)."""
    return len(value.split()), sum(ch.isdigit() for ch in value)


def _perturbation_space(value: str) -> float:
    size = 1.0
    for ch in value:
        size *= 10 if ch.isdigit() else 26 if ch.isalpha() else 1
    return size


def candidates(label: str, true_value: str, n: int, seed: int) -> list[str]:
    """``n`` distinct decoys for ``true_value`` of type ``label``, none equal to it.

    Labels in :data:`MAKERS` draw faker values of the same shape first (see the module
    docstring); any other label, and any value no pool value resembles, falls back to
    redrawing the value's characters within their class.

    Raises:
        PrivtuneError: ``n`` < 1, or the value has too few letters and digits to make
            ``n`` distinct decoys (``"7"`` has only 9).
    """
    if n < 1:
        raise PrivtuneError(f"asked for {n} PII candidates", "ask for at least 1")
    rng = random.Random(f"pii-candidates/{seed}/{label}/{true_value}")
    chosen: list[str] = []
    taken = {true_value}

    def take(values: list[str]) -> None:
        fresh = [v for v in values if v not in taken]
        for value in rng.sample(fresh, min(len(fresh), n - len(chosen))):
            chosen.append(value)
            taken.add(value)

    if label in MAKERS:
        by_exact, by_coarse, by_loose = _pool(label, seed)
        if label not in COARSE_FIRST:
            take(by_exact.get(exact_shape(true_value), []))
        if len(chosen) < n:
            take(by_coarse.get(coarse_shape(true_value), []))
        letters = sum(ch.isalpha() for ch in true_value)
        if len(chosen) < n and letters >= sum(ch.isdigit() for ch in true_value):
            take(by_loose.get(loose_shape(true_value), []))
    if len(chosen) < n and _perturbation_space(true_value) - len(taken) < n - len(chosen):
        raise PrivtuneError(f"a {label} value of {len(true_value)} characters has too few letters and digits "
                            f"to make {n} distinct candidates", "ask for fewer candidates or skip such short values")
    tries = 0
    while len(chosen) < n:
        value = perturb(true_value, rng)
        if value not in taken:
            chosen.append(value)
            taken.add(value)
        tries += 1
        if tries > _MAX_TRIES * n:
            raise PrivtuneError(f"could not make {n} distinct {label} candidates", "ask for fewer candidates")
    return chosen
