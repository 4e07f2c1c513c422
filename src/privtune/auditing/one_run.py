"""Empirical ε lower bounds from one training run with audit canaries.

m canaries, each trained on independently with probability 1/2; after training, an
attack scores each one. The auditor guesses "trained on" for the k highest scores and
abstains on the rest; the number of correct guesses is what a DP guarantee limits.

- **Steinke, Nasr and Jagielski**, "Privacy Auditing with One (1) Training Run"
  (NeurIPS 2023, arXiv:2305.08846), Theorem 3: under (ε, δ)-DP, for W correct guesses
  out of r,  P[W ≥ v] ≤ P[B ≥ v] + 2mδ · max_{1≤i≤v} (P[B ≥ v − i] − P[B ≥ v]) / i,
  with B ~ Binomial(r, e^ε / (1 + e^ε)). The lower bound is the largest ε whose p-value
  is still below 1 − confidence: every smaller ε is rejected. It holds for any
  (ε, δ)-DP mechanism.
- **Mahloujifar, Melis and Chaudhuri**, "Auditing f-Differential Privacy in One Run"
  (ICML 2025, arXiv:2410.22235), their recursive tail bound for an f-DP mechanism
  (the "r, h" recursion of their Algorithm 3, with the cap at one): tighter, but it
  tests a trade-off curve, here the Gaussian one (μ-GDP with μ the smallest that gives
  the claimed (ε, δ)). DP-SGD's subsampled Gaussian is close to Gaussian after many
  steps, not equal to it, so this figure is reported beside Steinke's, never instead.

**Which k.** Choosing k after seeing which canaries were trained on would overstate
the bound. Here k runs over a fixed grid of fractions of m (:data:`GUESS_FRACTIONS`),
chosen before any label is seen, and the confidence is split over the grid
(Bonferroni), so the bound keeps its 95%. ``jax_privacy.auditing`` instead prunes the
thresholds to the ROC curve's hull, which depends on the labels; on the same scores
and the same single threshold the two agree (``tests/test_one_run_audit.py``).
Ties in score are broken by a seeded shuffle that never sees the labels.

Hand-written: the maintained implementation (jax_privacy) imports jax, which privtune
does not depend on; it is the test's reference instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit, ndtr, ndtri
from scipy.stats import binom

from privtune.errors import PrivtuneError

CONFIDENCE = 0.95
#: Guess "trained on" for the top k = fraction · m scores, for each fraction (fixed before
#: the labels are seen, so a Bonferroni split over them keeps the confidence).
GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
#: Fewer canaries than this and the bound is n/a: no ε above zero can be shown.
MIN_CANARIES = 20
#: The search for ε stops here; a bound this high means "the claim is badly broken".
EPSILON_CEILING = 100.0


def steinke_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[≥ ``correct`` right out of ``guesses``] under (ε, δ)-DP (Theorem 3)."""
    q = float(expit(epsilon))  # accuracy of ε-DP randomised response
    tail = float(binom.sf(correct - 1, guesses, q))  # P[B ≥ v]
    if delta == 0 or correct == 0:
        return min(tail, 1.0)
    steps = np.arange(1, correct + 1)
    worst = np.max((binom.sf(correct - steps - 1, guesses, q) - tail) / steps)  # P[B ≥ v − i]
    return min(tail + 2 * canaries * delta * float(worst), 1.0)


def gaussian_mu(epsilon: float, delta: float) -> float:
    """The μ of the Gaussian mechanism that is exactly (ε, δ)-DP (Balle and Wang, 2018)."""
    def delta_at(mu: float) -> float:
        return ndtr(-epsilon / mu + mu / 2) - math.exp(epsilon) * ndtr(-epsilon / mu - mu / 2)
    high = 1.0
    while delta_at(high) < delta:
        high *= 2
    return brentq(lambda mu: delta_at(mu) - delta, 1e-9, high, xtol=1e-12)


def gdp_rejects(canaries: int, guesses: int, correct: int, epsilon: float, delta: float,
                significance: float) -> bool:
    """Whether ``correct`` of ``guesses`` rejects the μ-GDP curve matching (ε, δ).

    Mahloujifar et al.'s recursion: starting from the mass the significance level leaves
    on the observed count (``right`` for correct guesses, ``wrong`` for wrong ones, per
    canary), walk down one correct guess at a time; each step the wrong-guess mass must
    rise to at least f⁻¹ of the right-guess mass (for μ-GDP, x ↦ Φ(Φ⁻¹(x) − μ)), and the
    right-guess mass grows with it. If the two together exceed the share of canaries
    guessed on, no μ-GDP mechanism produces the observation with that probability.
    """
    mu = gaussian_mu(epsilon, delta)
    right = significance * correct / canaries
    wrong = significance * (guesses - correct) / canaries
    for below in range(correct - 1, -1, -1):
        raised = max(wrong, float(ndtr(ndtri(right) - mu)))
        if raised == wrong:
            break  # neither mass can change any more
        right = min(right + below / (guesses - below) * (raised - wrong), 1.0)
        wrong = raised
    return right + wrong > guesses / canaries


def _largest_rejected(rejects) -> float:
    """The supremum of the ε that ``rejects(ε)`` rejects (rejection is monotone in ε)."""
    if not rejects(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejects(high):
        low, high = high, high * 2
        if high > EPSILON_CEILING:
            return EPSILON_CEILING
    while high - low > 1e-7:  # bisection: ``rejects`` is a step function, no root finder needed
        middle = (low + high) / 2
        low, high = (middle, high) if rejects(middle) else (low, middle)
    return low


def steinke_epsilon(canaries: int, guesses: int, correct: int, delta: float, significance: float) -> float:
    """Steinke et al.'s ε lower bound for one guess count, at level ``significance``."""
    return _largest_rejected(lambda eps: steinke_p_value(canaries, guesses, correct, eps, delta) <= significance)


def gdp_epsilon(canaries: int, guesses: int, correct: int, delta: float, significance: float) -> float:
    """Mahloujifar et al.'s ε lower bound (Gaussian trade-off curve) for one guess count."""
    if guesses == 0:
        return 0.0
    return _largest_rejected(lambda eps: gdp_rejects(canaries, guesses, correct, eps, delta, significance))


BOUNDS = {"steinke": steinke_epsilon, "gdp": gdp_epsilon}


@dataclass(frozen=True)
class EmpiricalEpsilon:
    """An ε lower bound and everything needed to recompute it."""

    lower_bound: float | None
    confidence: float
    delta: float
    method: str
    canaries: int
    guesses: int | None
    correct: int | None
    in_scores: tuple[float, ...]
    out_scores: tuple[float, ...]
    reason: str | None = None

    def to_dict(self) -> dict:
        return {"lower_bound": self.lower_bound, "confidence": self.confidence, "delta": self.delta,
                "method": self.method, "canaries": self.canaries, "guesses": self.guesses,
                "correct": self.correct, "reason": self.reason,
                "in_scores": list(self.in_scores), "out_scores": list(self.out_scores)}


def guess_counts(canaries: int) -> list[int]:
    """The k of :data:`GUESS_FRACTIONS` for ``canaries`` canaries, deduplicated."""
    return sorted({max(1, round(f * canaries)) for f in GUESS_FRACTIONS})


def empirical_epsilon(in_scores, out_scores, *, delta: float, bound: str = "steinke",
                      confidence: float = CONFIDENCE, seed: int = 0) -> EmpiricalEpsilon:
    """The ε lower bound from canary scores (higher score = more likely trained on).

    Guesses the top k for every k of :func:`guess_counts`, each at level
    (1 − confidence) / len(grid), and reports the best bound with its k.
    """
    if bound not in BOUNDS:
        raise PrivtuneError(f"unknown audit bound {bound!r}", f"use one of: {', '.join(BOUNDS)}")
    if not 0 < delta < 1:
        raise PrivtuneError(f"audit δ {delta} is not in (0, 1)", "set privacy_audit.delta, e.g. 1e-5")
    inside, outside = np.asarray(in_scores, float), np.asarray(out_scores, float)
    m = inside.size + outside.size
    method = f"{bound}, top-k guesses over k = {GUESS_FRACTIONS} of m, Bonferroni"
    kept = dict(confidence=confidence, delta=delta, method=method, canaries=m,
                in_scores=tuple(inside.tolist()), out_scores=tuple(outside.tolist()))
    if m < MIN_CANARIES:
        return EmpiricalEpsilon(None, guesses=None, correct=None, **kept,
                                reason=f"{m} audit canaries; a bound needs at least {MIN_CANARIES}")
    if not np.isfinite(np.concatenate([inside, outside])).all():
        return EmpiricalEpsilon(None, guesses=None, correct=None, **kept,
                                reason="an audit canary's score is not finite")
    labels = np.concatenate([np.ones(inside.size, bool), np.zeros(outside.size, bool)])
    scores = np.concatenate([inside, outside])
    shuffle = np.random.default_rng(seed).permutation(m)  # ties broken without the labels
    ranked = labels[shuffle][np.argsort(-scores[shuffle], kind="stable")]
    grid = guess_counts(m)
    level = (1 - confidence) / len(grid)
    best = (0.0, grid[0], int(ranked[:grid[0]].sum()))
    for k in grid:
        correct = int(ranked[:k].sum())
        eps = BOUNDS[bound](m, k, correct, delta, level)
        if eps > best[0]:
            best = (eps, k, correct)
    return EmpiricalEpsilon(best[0], guesses=best[1], correct=best[2], **kept)
