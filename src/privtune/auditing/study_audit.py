"""The one-run privacy audit of a study: every run's empirical ε lower bound.

The study plants m audit canaries (:mod:`privtune.auditing.designs`), each its own
individual; each is trained on independently with probability 1/2, drawn once per study
from the ``audit-canaries`` stream of the data seed, so every method of the study trains
on the same IN canaries and their bounds are comparable. The IN canaries join the
training set (so DP accounting counts them); no canary is a member or non-member of the
leakage measures and attacks. After training, each canary is scored by the loss
calibrated by the base model on its secret's tokens:

    score = Σ_secret tokens (NLL_base − NLL_model)

(higher = more likely trained on; the log-likelihood ratio of the secret given its
prefix, so a canary the base model finds easy is not mistaken for a memorised one), and
:func:`privtune.auditing.one_run.empirical_epsilon` turns the scores into Steinke et al.'s
bound (the headline) and Mahloujifar et al.'s Gaussian-curve bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privtune.auditing.designs import DesignInputs, make_audit_canaries
from privtune.auditing.one_run import empirical_epsilon
from privtune.data.records import Record
from privtune.measures.token_scores import TokenScores
from privtune.train import streams

#: δ of the bound for a run without a DP δ of its own.
DEFAULT_DELTA = 1e-5
SCORE = "calibrated loss: Σ over the secret's tokens of (base model NLL − model NLL), nats"


@dataclass
class AuditCanaries:
    """A study's audit canaries (all m) and which of them the training set holds."""

    records: list[Record]
    trained: list[bool]

    @property
    def inserted(self) -> list[Record]:
        """The IN canaries, in canary order: what the training set gets."""
        return [r for r, inside in zip(self.records, self.trained) if inside]


def audit_membership(count: int, seed: int) -> list[bool]:
    """Which of ``count`` canaries are trained on: independent fair coins from the
    ``audit-canaries`` stream of ``seed`` (the first ``count`` coins of one sequence)."""
    rng = np.random.default_rng(streams.stream_seed(seed, streams.AUDIT_CANARIES))
    return (rng.random(count) < 0.5).tolist()


def build_audit_canaries(settings, seed: int, corpus: list[Record]) -> AuditCanaries | None:
    """The canaries ``settings`` (``privacy_audit``) asks for, or None when the audit is off."""
    if not settings.enabled:
        return None
    records = make_audit_canaries(settings.design, DesignInputs(settings.canaries, seed, tuple(corpus)))
    return AuditCanaries(records, audit_membership(settings.canaries, seed))


def canary_scores(model: TokenScores, base: TokenScores) -> np.ndarray:
    """Each canary's membership score (:data:`SCORE`), from token scores on the canaries."""
    secret = model.sensitive & model.valid
    return np.where(secret, base.nll - model.nll, 0.0).sum(axis=1)


def audit_delta(settings, dp: dict | None) -> tuple[float, str]:
    """(δ of the bound, where it comes from)."""
    if settings.delta is not None:
        return settings.delta, "privacy_audit.delta"
    if dp and dp.get("delta") is not None:
        return float(dp["delta"]), "the run's DP δ"
    return DEFAULT_DELTA, f"{DEFAULT_DELTA:g}: the run has no DP δ"


def audit_result(scores, trained, *, settings, dp: dict | None, seed: int) -> dict:
    """A run's ``empirical_epsilon``: Steinke et al.'s bound (``lower_bound``, with every
    canary's score), the Gaussian-curve bound beside it, and the ε the run claims."""
    scores = np.asarray(scores, float)
    inside = np.asarray(trained, bool)
    delta, source = audit_delta(settings, dp)
    common = dict(delta=delta, confidence=settings.confidence, seed=seed)
    steinke = empirical_epsilon(scores[inside], scores[~inside], bound="steinke", **common)
    gdp = empirical_epsilon(scores[inside], scores[~inside], bound="gdp", **common)
    return {**steinke.to_dict(), "delta_source": source, "design": settings.design, "score": SCORE,
            "gdp_lower_bound": gdp.lower_bound, "gdp_method": gdp.method, "gdp_guesses": gdp.guesses,
            "gdp_correct": gdp.correct, "claimed_epsilon": dp.get("epsilon") if dp else None}


def not_audited(reason: str, dp: dict | None = None) -> dict:
    """The ``empirical_epsilon`` of a run that has none, and why."""
    return {"lower_bound": None, "gdp_lower_bound": None, "claimed_epsilon": dp.get("epsilon") if dp else None,
            "reason": reason}
