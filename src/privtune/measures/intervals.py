"""Token means over records clustered by person, and intervals for them.

A token-mean measure (a CE, a difference of two models' CEs on the same records) is a
ratio ``Σ_i D_i / Σ_i T_i`` of each record's summed loss ``D_i`` to its token count
``T_i``. One person's records are not independent, so its variance is the delta-method
(ratio-estimator) variance clustered by person: ``C/(C−1) · Σ_c (D_c − r·T_c)² / (Σ T)²``
over the ``C`` people. Intervals use Student's t, not the normal: the variance rests on
one residual per person, and with few people the normal interval is several times too
narrow. Written here rather than taken from a library because none clusters a ratio
estimator by person (statsmodels clusters regression coefficients, not ratios of sums).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t


@dataclass(frozen=True)
class ClusteredMean:
    """A token mean, its standard error clustered by person, and what it rests on."""

    value: float
    se: float
    records: int
    people: int

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Its interval, Student's t on (people − 1) degrees of freedom."""
        q = student_t.ppf(0.5 + confidence / 2, self.people - 1)
        return self.value - q * self.se, self.value + q * self.se


def clustered_mean(sums: np.ndarray, tokens: np.ndarray, people: np.ndarray) -> ClusteredMean | None:
    """``Σ sums / Σ tokens`` with its person-clustered standard error; None with no token,
    a NaN, or fewer than two people."""
    sums, tokens = np.asarray(sums, float), np.asarray(tokens, float)
    if tokens.sum() == 0 or np.isnan(sums).any():
        return None
    value = float(sums.sum() / tokens.sum())
    _, cluster = np.unique(np.asarray(people), return_inverse=True)
    by_person = np.bincount(cluster, weights=sums - value * tokens)
    c = by_person.size
    if c < 2:
        return None
    se = math.sqrt(c / (c - 1) * np.sum(by_person ** 2)) / tokens.sum()
    return ClusteredMean(value, se, int(tokens.size), c)


def difference_interval(a: ClusteredMean, b: ClusteredMean, confidence: float = 0.95) -> tuple[float, float]:
    """The interval of ``a − b`` for means over different people (independent groups):
    variances add, Student's t on Welch–Satterthwaite degrees of freedom."""
    va, vb = a.se ** 2, b.se ** 2
    if va + vb == 0:
        return a.value - b.value, a.value - b.value
    df = (va + vb) ** 2 / (va ** 2 / (a.people - 1) + vb ** 2 / (b.people - 1))
    q = student_t.ppf(0.5 + confidence / 2, df)
    half = q * math.sqrt(va + vb)
    return a.value - b.value - half, a.value - b.value + half
