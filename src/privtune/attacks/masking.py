"""Masking of sensitive values before they reach a report, a log or a terminal.

An extraction attack that works produces real sensitive values; a report that prints
them would leak what the study measures. What a reader needs is the *shape* of what
leaked (an e-mail, a 16-digit card number in groups of four), not the value, so:

- a value with fewer than :data:`MIN_SHAPED` letters and digits becomes
  ``[LABEL:n chars]``: short values (a first name, the last four digits of a card) are
  too easy to guess from any visible character;
- an e-mail keeps the first character of its local part and of its domain, the ``@``,
  the dots and the top-level domain: ``j***.s****@g****.com``;
- any other value keeps its first character and every space and punctuation mark, and
  every other letter or digit becomes ``*``: ``4*** **** **** ****``, ``M**** **, ****``.

The output never depends on more of the value than its first character(s), its length,
its layout of separators and (for e-mails) its top-level domain.
"""

from __future__ import annotations

MIN_SHAPED = 6  # letters + digits below which only the label and length are shown
STAR = "*"


def placeholder(value: str, label: str) -> str:
    """``[LABEL:n chars]``: nothing of the value but its length."""
    return f"[{label}:{len(value)} chars]"


def _hide_alnum(text: str, keep_first: bool) -> str:
    """Letters and digits to ``*``, except the first character when ``keep_first``."""
    out = []
    for i, ch in enumerate(text):
        out.append(ch if (i == 0 and keep_first) or not ch.isalnum() else STAR)
    return "".join(out)


def _mask_email(value: str) -> str:
    local, _, domain = value.rpartition("@")
    host, dot, tld = domain.rpartition(".")
    if not host:  # no dot in the domain: hide it all but its first character
        return f"{_hide_alnum(local, True)}@{_hide_alnum(domain, True)}"
    return f"{_hide_alnum(local, True)}@{_hide_alnum(host, True)}{dot}{tld}"


def mask_value(value: str, label: str) -> str:
    """A printable stand-in for the sensitive ``value`` of type ``label``."""
    if sum(ch.isalnum() for ch in value) < MIN_SHAPED:
        return placeholder(value, label)
    if label.upper() == "EMAIL" and value.count("@") == 1 and not value.startswith("@"):
        return _mask_email(value)
    return _hide_alnum(value, True)
