"""``customer-sim``: customer-service dialogues and tickets about synthetic people.

Each individual is one faker profile (name, e-mail, phone, street address, account,
order and card numbers, date of birth, IBAN) drawn from one of several locales, and
appears in 1-3 records: different tickets that reuse the same values. That reuse is
what a model can memorise about a *person*, and what the leakage measures look for.

Sixteen scenarios (order missing, address change, refund, blocked card, login trouble,
...) each have several phrasings per turn, three speaker styles and optional closing
lines, so no template dominates and a model cannot score well by copying one. Records
are kept to 60-120 tokens (about 200-400 characters: digits and e-mail addresses cost
many tokens), so they fit the default ``data.max_length`` of 128; sensitive values are
about a quarter of the characters.
"""

from __future__ import annotations

import random
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from faker import Faker

from privtune.data.corpora import TextBuilder, approx_tokens, individual_rng, register_corpus
from privtune.data.dates import date_of_birth
from privtune.data.records import Record

NAME = "customer-sim"
TOKEN_BUDGET = (60, 120)  # approximate tokens per record (see approx_tokens)

# (faker locale, weight, currency symbol). Text stays English; names, phones, addresses
# and IBANs follow the locale.
LOCALES: tuple[tuple[str, float, str], ...] = (
    ("en_US", 0.32, "$"), ("en_GB", 0.22, "£"), ("en_AU", 0.1, "A$"), ("en_CA", 0.1, "C$"),
    ("en_IE", 0.08, "€"), ("de_DE", 0.09, "€"), ("fr_FR", 0.09, "€"),
)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
CARD_TYPES = ("visa16", "mastercard", "amex", "discover", "visa16", "mastercard")
SHOPS = ("Northwind", "BrightCart", "Harbor & Pine", "Kestrel Home", "Urbanloop", "Maple Lane Goods")
PRODUCTS = ("wireless headphones", "coffee grinder", "winter jacket", "desk lamp", "running shoes",
            "blender", "phone case", "backpack", "set of saucepans", "smart watch", "bookshelf",
            "electric kettle", "yoga mat", "office chair")
WHEN = ("last Tuesday", "on Monday", "two days ago", "yesterday", "at the weekend",
        "earlier this week", "last Friday", "a week ago")
SPEAKERS = (("Customer", "Agent"), ("Customer", "Agent"), ("Caller", "Advisor"), ("Client", "Support"))


@dataclass(frozen=True)
class Template:
    """One scenario: a list of turns, each a tuple of alternative phrasings.

    ``{C}`` and ``{A}`` are the speakers; other ``{fields}`` are profile values (see
    :func:`_values`) or plain fillers (see :func:`_plain`).
    """

    name: str
    turns: tuple[tuple[str, ...], ...]
    dialogue: bool = True


TEMPLATES: tuple[Template, ...] = (
    Template("order_missing", (
        ("{C}: Hi, order {order} never arrived.",
         "{C}: Hello, I'm {name}; order {order} is missing.",
         "{C}: My parcel, order {order}, was due {when} and hasn't come."),
        ("{A}: Sorry! Name and e-mail on the order?",
         "{A}: I'm sorry. Can you confirm your name and e-mail?"),
        ("{C}: {name}, {email}.", "{C}: It's {name}, e-mail {email}."),
        ("{A}: It shows as delivered to {address}.",
         "{A}: The courier says it was left at {address}."),
        ("{C}: That's me, but nothing came. Call me on {phone}.",
         "{C}: Nothing was left. My number is {phone}."),
        ("{A}: I've opened a trace and will update you.",
         "{A}: Claim raised; we'll resend it if it isn't found."),
    )),
    Template("address_change", (
        ("{C}: Hi, I've moved and need to update my address.",
         "{C}: Can I change the address on my account?"),
        ("{A}: Sure. Account number and date of birth?",
         "{A}: Of course. Your account number and date of birth, please."),
        ("{C}: {account}, born {dob}.", "{C}: It's {account}; date of birth {dob}."),
        ("{A}: Thanks {first}. The new address?", "{A}: Verified. What's the new address?"),
        ("{C}: {new_address}.", "{C}: Please change {address} to {new_address}."),
        ("{A}: Done, future orders go there.", "{A}: Updated; a confirmation is going to {email}."),
    )),
    Template("refund_request", (
        ("{C}: I returned a {product} {when}. Where's my refund?",
         "{C}: Hi, I'm still waiting for my refund of {amount}."),
        ("{A}: Let me check. Order number and e-mail?",
         "{A}: Which order was it, and the e-mail on it?"),
        ("{C}: {order}, {email}.", "{C}: Order {order}; e-mail {email}."),
        ("{A}: {amount} went back to the card ending {card4}.",
         "{A}: It was refunded to your card ending in {card4}."),
        ("{C}: That card is closed. Please pay IBAN {iban} instead.",
         "{C}: I cancelled that card; my IBAN is {iban}."),
        ("{A}: Noted, {first}. A bank transfer is arranged.",
         "{A}: No problem, {name}; I've set up a transfer."),
    )),
    Template("card_blocked", (
        ("{C}: My card was declined {when} and now it's blocked.",
         "{C}: Hi, why is my card blocked?"),
        ("{A}: I can help. Card number and cardholder name?",
         "{A}: Let's sort it. What's the card number and your name?"),
        ("{C}: {card}, {name}.", "{C}: It's {card}, name {name}."),
        ("{A}: Thanks. Date of birth and phone number?",
         "{A}: For security, your date of birth and phone?"),
        ("{C}: {dob}, {phone}.", "{C}: Born {dob}; phone {phone}."),
        ("{A}: A fraud check stopped it. It's unblocked now.",
         "{A}: Block lifted; we'll text {phone} if it happens again."),
    )),
    Template("login_trouble", (
        ("{C}: I can't log in; it says my password is wrong.",
         "{C}: Hi, I'm locked out of my account.",
         "{C}: The password reset e-mail never arrives."),
        ("{A}: Sorry about that. Your login e-mail?",
         "{A}: Let me help. Login e-mail and account number?"),
        ("{C}: {email}, account {account}.", "{C}: It's {email}; account {account}."),
        ("{A}: And the phone number on file?", "{A}: To check it's you, your phone number?"),
        ("{C}: {phone}.", "{C}: It should be {phone}."),
        ("{A}: That matches. A reset link is on its way to {email}.",
         "{A}: Verified, {first}. I've unlocked the account."),
    )),
    Template("delivery_reschedule", (
        ("{C}: I'm out for my delivery. Can I change the day?",
         "{C}: Hi, can I rearrange delivery of order {order}?"),
        ("{A}: Sure. Order number and address?",
         "{A}: Of course. Please confirm the delivery address."),
        ("{C}: Order {order}, to {address}.", "{C}: It's going to {address}."),
        ("{A}: Thanks, {name}. Thursday or Saturday?", "{A}: Got it. Thursday or Saturday?"),
        ("{C}: Saturday. Text {phone} when the driver is close.",
         "{C}: Thursday, please. My mobile is {phone}."),
        ("{A}: Booked; confirmation sent to {email}.", "{A}: All set."),
    )),
    Template("wrong_item", (
        ("{C}: I ordered a {product} but got something else.",
         "{C}: Hi, order {order} had the wrong item in it."),
        ("{A}: Apologies! Order number and your name?",
         "{A}: Sorry about that. Who is the order under?"),
        ("{C}: {name}, order {order}.", "{C}: It's under {name}, order {order}."),
        ("{A}: I'll e-mail a return label to {email}.",
         "{A}: A return label is going to {email}."),
        ("{C}: Can the courier collect it from {address}?",
         "{C}: Send the replacement to {address}, please."),
        ("{A}: Yes; we'll call {phone} with a time.", "{A}: Done, {first}. It ships today."),
    )),
    Template("double_charge", (
        ("{C}: I've been charged twice for one order.",
         "{C}: Hello, there are two payments of {amount} on my statement."),
        ("{A}: Sorry. Which card, and which order?",
         "{A}: Let me check. Card number and order number?"),
        ("{C}: Card {card}, order {order}.", "{C}: Card number {card}; order {order}."),
        ("{A}: Thanks, {name}. I see the duplicate of {amount}.",
         "{A}: Found it: the second {amount} was a duplicate."),
        ("{C}: Please refund it. My account number is {account}.",
         "{C}: Can you confirm by e-mail? It's {email}."),
        ("{A}: Reversed; it shows in {days} working days.", "{A}: Refund issued."),
    )),
    Template("contact_update", (
        ("{C}: I'd like to update my phone number.",
         "{C}: Hi, I've got a new mobile number."),
        ("{A}: Sure. Full name and date of birth?",
         "{A}: No problem. Can you confirm your name and date of birth?"),
        ("{C}: {name}, born {dob}.", "{C}: I'm {name}, date of birth {dob}."),
        ("{A}: Thanks. The new number?", "{A}: Verified. What's the new number?"),
        ("{C}: Change {phone} to {new_phone}.", "{C}: It's {new_phone}; remove {phone}."),
        ("{A}: Updated, {first}. A code is on its way to {new_phone}.",
         "{A}: Done; confirmation sent to {email}."),
    )),
    Template("cancel_subscription", (
        ("{C}: I want to cancel my monthly subscription.",
         "{C}: Hello, please stop my membership renewing."),
        ("{A}: I can do that. Account number and e-mail?",
         "{A}: Sorry to see you go. Your account number?"),
        ("{C}: {account}, {email}.", "{C}: It's {account}. I'm {name}."),
        ("{A}: The next {amount} would come from the card ending {card4}.",
         "{A}: I see a renewal of {amount} on your card ending {card4}."),
        ("{C}: Please cancel it before then.", "{C}: Yes, stop that payment."),
        ("{A}: Cancelled, {first}. Confirmation sent to {email}.",
         "{A}: Done; you won't be charged again, {name}."),
    )),
    Template("bank_details", (
        ("{C}: I've changed banks; can I update my direct debit?",
         "{C}: Hi, I want to pay by direct debit from a new account."),
        ("{A}: Sure. Your name and customer number?",
         "{A}: Of course. Account holder and account number?"),
        ("{C}: {name}, customer number {account}.", "{C}: {name}, account {account}."),
        ("{A}: Thanks. And the new IBAN?", "{A}: Thank you. Please read out the IBAN."),
        ("{C}: {iban}.", "{C}: The IBAN is {iban}."),
        ("{A}: Saved. The mandate will be posted to {address}.",
         "{A}: Updated; we'll confirm at {email}."),
    )),
    Template("fraud_report", (
        ("{C}: There's a payment on my card I didn't make.",
         "{C}: Hi, I think someone used my card."),
        ("{A}: I'm sorry. Card number and your name?",
         "{A}: Let's secure it now. The card number, please?"),
        ("{C}: {card}, {name}.", "{C}: It's {card}; I'm {name}."),
        ("{A}: Frozen. Your date of birth and address?",
         "{A}: The card is frozen. To verify, date of birth and address?"),
        ("{C}: {dob}, {address}.", "{C}: Born {dob}; I live at {address}."),
        ("{A}: Thanks. We'll investigate the {amount} payment.",
         "{A}: Verified. A new card is on its way."),
    )),
    Template("damaged_item", (
        ("{C}: My {product} arrived broken.",
         "{C}: Hi, the {product} from order {order} was damaged."),
        ("{A}: Sorry! Order number and e-mail?",
         "{A}: Apologies. Which e-mail did you order with?"),
        ("{C}: {order}, {email}.", "{C}: It's {email}, order {order}."),
        ("{A}: Thanks, {name}. Replacement or refund?",
         "{A}: I can send a new one or refund {amount}."),
        ("{C}: A replacement, to {address}.", "{C}: A refund to the card ending {card4}, please."),
        ("{A}: Arranged. We'll call {phone} if needed.", "{A}: Done, {first}."),
    )),
    Template("account_closure", (
        ("{C}: Please close my account and delete my details.",
         "{C}: Hi, I'd like to close my account with {shop}."),
        ("{A}: I can help. Account number and full name?",
         "{A}: First I need to verify you. Account number?"),
        ("{C}: {account}, {name}.", "{C}: It's {account}; name {name}."),
        ("{A}: Date of birth and postal address?",
         "{A}: Thanks. Please confirm your date of birth and address."),
        ("{C}: {dob}, {address}.", "{C}: {dob}; {address}."),
        ("{A}: Verified. It's closed; a final statement goes to {email}.",
         "{A}: All done, {first}. We'll confirm at {email}."),
    )),
    Template("web_form", (
        ("Web ticket ({shop})\nName: {name}\nEmail: {email}\nPhone: {phone}",
         "New enquiry ({shop})\nFrom: {name} <{email}>\nTel: {phone}"),
        ("Subject: Order {order}", "Subject: Question about order {order}"),
        ("Message: My {product} hasn't shipped. It goes to {address}.",
         "Message: Tracking for my {product} hasn't moved since {when}. "
         "I paid with the card ending {card4}."),
        ("Reply: Hi {first}, sorry for the delay; it ships today.",
         "Reply: Dear {name}, we've chased the courier and will update you."),
    ), dialogue=False),
    Template("callback_note", (
        ("Call note ({shop}): {name}, DOB {dob}, on {phone}.",
         "Callback log: {name} (born {dob}) called from {phone}."),
        ("Reason: card {card} declined for order {order}.",
         "Reason: order {order} failed; card on file {card}."),
        ("Verified with account {account} and e-mail {email}.",
         "ID check passed: account {account}, {email}."),
        ("Outcome: payment retried; confirmation sent.",
         "Outcome: customer will use another card; follow-up booked."),
    ), dialogue=False),
)

CLOSINGS: tuple[str, ...] = (
    "{C}: Thanks for your help.\n{A}: You're welcome, {first}.",
    "{C}: Great, that's all.\n{A}: Thanks for contacting {shop}.",
    "{C}: Perfect, thank you.\n{A}: Anything else I can do?",
    "{C}: OK, thanks.\n{A}: Thank you for your patience, {name}.",
)


@lru_cache(maxsize=None)
def _faker(locale: str) -> Faker:
    return Faker(locale)


def _ascii(text: str) -> str:
    """Letters only, accents folded: 'Prévost-Lamy' -> 'prevostlamy' (for e-mail local parts)."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in folded if ch.isalnum()).lower()


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def _grouped(s: str, sep: str, size: int = 4) -> str:
    return sep.join(s[i : i + size] for i in range(0, len(s), size))


def _format_date(d, locale: str, rng: random.Random) -> str:
    """A date in one of the styles people write in that locale."""
    style = rng.randrange(3)
    if style == 0:
        return d.isoformat()
    if locale == "en_US":
        return f"{MONTHS[d.month - 1]} {d.day}, {d.year}" if style == 1 else f"{d.month:02d}/{d.day:02d}/{d.year}"
    return f"{d.day} {MONTHS[d.month - 1]} {d.year}" if style == 1 else f"{d.day:02d}/{d.month:02d}/{d.year}"


class Person(NamedTuple):
    """Where every corpus's person starts: a locale, a faker seeded for them, a name."""

    locale: str
    faker: Faker
    female: bool
    first: str
    last: str


def draw_person(rng: random.Random) -> Person:
    """A person's locale (weighted as :data:`LOCALES`), seeded faker and name, from ``rng``."""
    locale = rng.choices([loc for loc, _, _ in LOCALES], weights=[w for _, w, _ in LOCALES])[0]
    fk = _faker(locale)
    fk.seed_instance(rng.getrandbits(63))
    female = rng.random() < 0.5
    first = fk.first_name_female() if female else fk.first_name_male()
    return Person(locale, fk, female, first, fk.last_name())


def make_profile(rng: random.Random) -> dict:
    """One synthetic person: every sensitive value the templates may mention."""
    locale, fk, _, first, last = draw_person(rng)
    sep = rng.choice([".", "_", "", "."])
    local = f"{_ascii(first)}{sep}{_ascii(last)}" if rng.random() < 0.6 else f"{_ascii(first)[0]}{_ascii(last)}"
    if rng.random() < 0.4:
        local += str(rng.randrange(1, 99))
    card_sep = rng.choice([" ", " ", "-", ""])
    iban = fk.iban()
    return {
        "locale": locale,
        "currency": next(cur for loc, _, cur in LOCALES if loc == locale),
        "first": first,
        "name": f"{first} {last}",
        "email": f"{local}@{fk.free_email_domain()}",
        "phone": fk.phone_number(),
        "new_phone": fk.phone_number(),
        "address": fk.address().replace("\n", ", "),
        "new_address": fk.address().replace("\n", ", "),
        "account": rng.choice([_digits(rng, 8), f"AC-{_digits(rng, 8)}", f"{_digits(rng, 4)}-{_digits(rng, 6)}",
                               f"CU{_digits(rng, 9)}"]),
        "order": rng.choice([f"ORD-{_digits(rng, 7)}", f"{rng.choice('ABCDEFGHKLMNPRSTWX')}{_digits(rng, 9)}",
                             f"{_digits(rng, 3)}-{_digits(rng, 7)}-{_digits(rng, 4)}"]),
        "card": _grouped(fk.credit_card_number(rng.choice(CARD_TYPES)), card_sep),
        "dob": _format_date(date_of_birth(rng, minimum_age=18, maximum_age=85), locale, rng),
        "iban": _grouped(iban, " ") if rng.random() < 0.5 else iban,
    }


def _values(p: dict) -> dict[str, tuple[str, str]]:
    """Template field -> (value, label) for the sensitive fields."""
    digits = [ch for ch in p["card"] if ch.isdigit()]
    return {
        "name": (p["name"], "NAME"), "first": (p["first"], "NAME"), "email": (p["email"], "EMAIL"),
        "phone": (p["phone"], "PHONE"), "new_phone": (p["new_phone"], "PHONE"),
        "address": (p["address"], "ADDRESS"), "new_address": (p["new_address"], "ADDRESS"),
        "account": (p["account"], "ACCOUNT"), "order": (p["order"], "ORDER"), "card": (p["card"], "CARD"),
        "card4": ("".join(digits[-4:]), "CARD"), "dob": (p["dob"], "DOB"), "iban": (p["iban"], "IBAN"),
    }


def _plain(p: dict, rng: random.Random) -> dict[str, str]:
    """Non-sensitive fillers: shop, product, amounts, times, speakers."""
    customer, agent = rng.choice(SPEAKERS)
    return {
        "C": customer, "A": agent, "shop": rng.choice(SHOPS), "product": rng.choice(PRODUCTS),
        "when": rng.choice(WHEN), "days": str(rng.choice((2, 3, 5, 7, 10))),
        "amount": f"{p['currency']}{rng.randrange(8, 400)}.{rng.randrange(100):02d}",
    }


def _build(lines: list[str], values: dict, plain: dict) -> tuple[str, list]:
    b = TextBuilder()
    for i, line in enumerate(lines):
        b.lit("\n" if i else "").fill(line, values, plain)
    return b.build()


def render(template: Template, profile: dict, rng: random.Random) -> tuple[str, list]:
    """Text and spans of one record whose length is within :data:`TOKEN_BUDGET`.

    A dialogue may gain a closing exchange or lose its last agent line to fit; if no
    variant fits, the phrasings are drawn again.
    """
    values = _values(profile)
    low, high = TOKEN_BUDGET
    best, best_miss = None, float("inf")
    for _ in range(50):
        plain = _plain(profile, rng)
        lines = [rng.choice(turn) for turn in template.turns]
        variants = [lines]
        if template.dialogue:
            closing = [rng.choice(CLOSINGS)]
            variants = [lines + closing, lines, lines[:-1]] if rng.random() < 0.4 else [lines, lines[:-1], lines + closing]
        # Measure with a plain str.format (fast); build spans only for the variant kept.
        everything = {**{k: v for k, (v, _) in values.items()}, **plain}
        for variant in variants:
            size = approx_tokens("\n".join(variant).format(**everything))
            miss = max(low - size, size - high, 0)
            if miss < best_miss:
                best, best_miss = (variant, plain), miss
            if miss == 0:
                break
        if best_miss == 0:
            break
    # best_miss > 0 only for very long values (an address with a suite number, say).
    return _build(best[0], values, best[1])


@register_corpus(NAME)
def generate(n_individuals: int, seed: int) -> list[Record]:
    """1-3 tickets for each of ``n_individuals`` people, each ticket a different scenario."""
    records = []
    for i in range(n_individuals):
        rng = individual_rng(NAME, seed, i)
        profile = make_profile(rng)
        individual = f"{NAME}-{i:06d}"
        n_records = rng.choices((1, 2, 3), weights=(0.4, 0.35, 0.25))[0]
        for k, template in enumerate(rng.sample(TEMPLATES, n_records), start=1):
            text, spans = render(template, profile, rng)
            records.append(Record(f"{individual}-{k}", individual, text, spans,
                                  {"template": template.name, "locale": profile["locale"]}))
    return records
