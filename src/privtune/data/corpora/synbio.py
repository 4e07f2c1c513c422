"""``synbio``: short synthetic biographies (in the spirit of the bioS data of Allen-Zhu & Li,
"Physics of Language Models: Part 3.1", arXiv:2309.14316).

Each individual has a name, birth date, birth city, university, employer, e-mail and
phone, and appears in one or two biographies. A biography opens with the person's
name and then gives the facts in a shuffled order, each sentence in one of several
phrasings, so the facts are memorised as facts about a person rather than as one
fixed string.
"""

from __future__ import annotations

import random

from privtune.data.corpora import TextBuilder, individual_rng, register_corpus
from privtune.data.corpora.customer_sim import MONTHS, _ascii, draw_person
from privtune.data.dates import date_of_birth
from privtune.data.records import Record

NAME = "synbio"

# Sentences about one fact each. {P}/{p} is the pronoun (capitalised / not), {Poss} the
# possessive; other fields are sensitive values.
INTROS = (
    "{name} was born on {dob} in {city}.",
    "{name} is {job} from {city}, born on {dob}.",
    "Born in {city} on {dob}, {name} grew up there.",
    "{name} (born {dob}) comes from {city}.",
)
FACTS: dict[str, tuple[str, ...]] = {
    "study": (
        "{P} studied {subject} at {university}.",
        "{P} graduated from {university} with a degree in {subject}.",
        "After school, {first} went to {university} to read {subject}.",
        "{Poss} degree in {subject} is from {university}.",
    ),
    "work": (
        "{P} now works as {job} at {employer}.",
        "Today {first} is employed by {employer}.",
        "{P} joined {employer} as {job}.",
        "{Poss} employer is {employer}, where {p} is {job}.",
    ),
    "contact": (
        "{P} can be reached at {email}.",
        "{Poss} e-mail address is {email}.",
        "Contact: {email}, phone {phone}.",
        "{P} answers e-mails at {email} and calls on {phone}.",
    ),
    "hobby": (
        "In {Poss_l} free time {p} enjoys {hobby}.",
        "At weekends {p} is usually busy with {hobby}.",
        "Friends know {first} for {Poss_l} love of {hobby}.",
    ),
}
SUBJECTS = ("history", "computer science", "economics", "biology", "law", "mathematics",
            "architecture", "nursing", "chemistry", "music", "philosophy", "engineering")
JOBS = ("a teacher", "a software engineer", "an accountant", "a nurse", "a designer", "an analyst",
        "a project manager", "a pharmacist", "a journalist", "an electrician", "a chef", "a consultant")
HOBBIES = ("hiking", "chess", "painting", "cycling", "baking", "photography", "gardening",
           "playing the piano", "running", "birdwatching")
UNIVERSITY_FORMS = ("University of {city}", "{city} State University", "{last} College",
                    "{city} Institute of Technology", "{last} University")


def _date(d, rng: random.Random) -> str:
    return rng.choice((f"{MONTHS[d.month - 1]} {d.day}, {d.year}", f"{d.day} {MONTHS[d.month - 1]} {d.year}"))


def make_profile(rng: random.Random) -> dict:
    """One synthetic person with biography facts."""
    _, fk, female, first, last = draw_person(rng)
    uni = rng.choice(UNIVERSITY_FORMS).format(city=fk.city(), last=fk.last_name())
    return {
        "first": first, "name": f"{first} {last}", "female": female,
        "dob": _date(date_of_birth(rng, minimum_age=22, maximum_age=80), rng),
        "city": fk.city(), "university": uni, "employer": fk.company(),
        "email": f"{_ascii(first)}.{_ascii(last)}@{fk.free_email_domain()}", "phone": fk.phone_number(),
        "subject": rng.choice(SUBJECTS), "job": rng.choice(JOBS), "hobby": rng.choice(HOBBIES),
    }


def render(profile: dict, rng: random.Random) -> tuple[str, list, str]:
    """Text, spans and a template name (intro number + fact order) of one biography."""
    values = {
        "name": (profile["name"], "NAME"), "first": (profile["first"], "NAME"), "dob": (profile["dob"], "DOB"),
        "city": (profile["city"], "CITY"), "university": (profile["university"], "UNIVERSITY"),
        "employer": (profile["employer"], "EMPLOYER"), "email": (profile["email"], "EMAIL"),
        "phone": (profile["phone"], "PHONE"),
    }
    she = profile["female"]
    plain = {"P": "She" if she else "He", "p": "she" if she else "he", "Poss": "Her" if she else "His",
             "Poss_l": "her" if she else "his", "subject": profile["subject"], "job": profile["job"],
             "hobby": profile["hobby"]}
    intro = rng.randrange(len(INTROS))
    facts = ["study", "work", "contact"] + (["hobby"] if rng.random() < 0.5 else [])
    rng.shuffle(facts)
    b = TextBuilder().fill(INTROS[intro], values, plain)
    for fact in facts:
        b.lit(" ").fill(rng.choice(FACTS[fact]), values, plain)
    text, spans = b.build()
    return text, spans, f"intro{intro}:" + "-".join(facts)


@register_corpus(NAME)
def generate(n_individuals: int, seed: int) -> list[Record]:
    """One or two biographies for each of ``n_individuals`` people."""
    records = []
    for i in range(n_individuals):
        rng = individual_rng(NAME, seed, i)
        profile = make_profile(rng)
        individual = f"{NAME}-{i:06d}"
        for k in range(1, rng.choice((1, 2)) + 1):
            text, spans, template = render(profile, rng)
            records.append(Record(f"{individual}-{k}", individual, text, spans, {"template": template}))
    return records
