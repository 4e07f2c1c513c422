"""The difference between two runs' token measures, with a paired 95% interval.

A findings sentence such as "bitfit leaks less than fft" is only true when the
difference is larger than what the choice of records gives. Both runs are scored on the
same records, so the difference is paired: from each run's stored per-record sums
(``record_stats``: log-likelihood and token count per record and level), the
difference of two token means is ``Σ_i D_i / Σ_i T_i``, with ``D_i`` the difference of
record ``i``'s summed losses and ``T_i`` its token count. Its interval is the
delta-method (ratio-estimator) interval clustered by person, since one person's records
are not independent: ``var = C/(C−1) · Σ_c (D_c − d·T_c)² / (Σ T)²`` over the ``C``
people, with Student's t quantile on C − 1 degrees of freedom. Runs stored without per-record statistics, or scored on different records,
have no interval (None), and the sentence then makes no claim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from privtune.measures.intervals import clustered_mean, difference_interval
from privtune.measures.token_scores import missed_level

#: The measures a difference is defined for: (level, records, sign). ``leakage_gain`` is
#: CE_S(θ0; members) − CE_S(θ; members), so run a's minus run b's is CE_S(b) − CE_S(a)
#: on the members' sensitive tokens; ``utility_ce`` is CE_N(θ; non-members).
MEASURES = {"leakage_gain": ("sensitive", "members", -1), "utility_ce": ("non-sensitive", "nonmembers", +1)}


@dataclass(frozen=True)
class Difference:
    """Run a's measure minus run b's, its 95% interval, and what it rests on."""

    value: float
    low: float
    high: float
    records: int
    people: int

    @property
    def measurable(self) -> bool:
        """False when the interval covers 0: the runs cannot be told apart."""
        return not self.low <= 0 <= self.high


def _losses(run: dict, level: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(summed NLL, token count) per population record at ``level`` (``non-sensitive``:
    the record level minus the sensitive level)."""
    stats = run.get("record_stats")
    if not isinstance(stats, Mapping):  # a dict, or one the store reads on demand
        return None
    try:
        def sums(name: str) -> tuple[np.ndarray, np.ndarray]:
            tokens = np.asarray(stats[name]["tokens"], dtype=float)
            nll = -np.asarray([math.nan if v is None else v for v in stats[name]["loglik"]], dtype=float)
            return np.where(tokens > 0, nll, 0.0), tokens
        if level != "non-sensitive":
            return sums(level)
        (rec_nll, rec_tokens), (sens_nll, sens_tokens) = sums("record"), sums("sensitive")
        return rec_nll - sens_nll, rec_tokens - sens_tokens
    except (KeyError, TypeError, ValueError):
        return None


def paired_difference(diff: np.ndarray, tokens: np.ndarray, people: np.ndarray,
                      confidence: float = 0.95) -> Difference | None:
    """The difference of two token means, ``Σ_i D_i / Σ_i T_i`` from each record's summed
    loss difference ``D_i`` and token count ``T_i``, with its delta-method interval
    clustered by ``people`` (one id per record); None when it has no tokens, a NaN, or
    fewer than two people. The quantile is Student's t with (people − 1) degrees of
    freedom, not the normal's: the clustered variance is estimated from one residual per
    person, and with few people (an unlearning forget set of 2) the normal interval
    would be several times too narrow."""
    mean = clustered_mean(diff, tokens, people)
    if mean is None:
        return None
    low, high = mean.interval(confidence)
    return Difference(mean.value, low, high, mean.records, mean.people)


def _paired_losses(a: dict, b: dict, level: str):
    """(a's summed NLL, b's, token counts, person per record) over the population, or
    None when either run lacks per-record statistics or they were scored on other records."""
    found = [_losses(r, level) for r in (a, b)]
    stats_a, stats_b = a.get("record_stats") or {}, b.get("record_stats") or {}
    if None in found or stats_a.get("person") is None or stats_a.get("person") != stats_b.get("person") \
            or stats_a.get("n_members") != stats_b.get("n_members"):
        return None
    (nll_a, tokens), (nll_b, tokens_b) = found
    if tokens.shape != tokens_b.shape or not np.array_equal(tokens, tokens_b):
        return None  # not the same records
    return nll_a, nll_b, tokens, np.asarray(stats_a["person"])


def run_difference(a: dict, b: dict, measure: str, confidence: float = 0.95) -> Difference | None:
    """``measure(a) − measure(b)`` paired over the records both were scored on, or None."""
    level, group, sign = MEASURES[measure]
    paired = _paired_losses(a, b, level)
    if paired is None:
        return None
    nll_a, nll_b, tokens, people = paired
    n_members = int(a["record_stats"]["n_members"])
    rows = slice(0, n_members) if group == "members" else slice(n_members, None)
    return paired_difference(sign * (nll_a - nll_b)[rows], tokens[rows], people[rows], confidence)


def rows_difference(a: dict, b: dict, level: str, rows, confidence: float = 0.95) -> Difference | None:
    """Run a's mean token loss at ``level`` (``sensitive``, ``non-sensitive``, ``record``)
    minus run b's, over the population ``rows`` (indices: members first, then non-members)
    both were scored on, or None."""
    paired = _paired_losses(a, b, level)
    if paired is None:
        return None
    nll_a, nll_b, tokens, people = paired
    rows = np.asarray(rows, dtype=int)
    if rows.size == 0 or rows.max() >= tokens.size:
        return None
    return paired_difference((nll_a - nll_b)[rows], tokens[rows], people[rows], confidence)


def missed_value_difference(scrubbed: dict, source: dict, tagger: str,
                            confidence: float = 0.95) -> tuple[float, float, float] | None:
    """(value, low, high): a scrubbed run's net memorisation gap on the sensitive values its
    ``tagger`` misses, minus the same figure of ``source`` (the method trained on the
    original text), on the same records. The base model cancels, so this is the
    non-members' mean of (scrubbed − source) token loss minus the members': paired by
    record, clustered by person, the two groups independent. Above 0: the scrubbed run
    memorised the missed values more than the unscrubbed one. None when either run lacks
    the statistics."""
    paired = _paired_losses(scrubbed, source, missed_level(tagger))
    if paired is None:
        return None
    nll_a, nll_b, tokens, people = paired
    n = int(scrubbed["record_stats"]["n_members"])
    test, train = (clustered_mean((nll_a - nll_b)[rows], tokens[rows], people[rows])
                   for rows in (slice(n, None), slice(0, n)))
    if test is None or train is None:
        return None
    low, high = difference_interval(test, train, confidence)
    return test.value - train.value, low, high
