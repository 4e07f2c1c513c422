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
bound (the headline) and Mahloujifar et al.'s Gaussian-curve bound. With
``compare_designs``, each further design plants its own m canaries with their own coins
and gets a bound of its own (``compared_designs``), all from the same training runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privtune.attacks.metrics import auc_interval, auc_score, tpr_at_fpr
from privtune.auditing.designs import (DESIGN_NOTE, DesignInputs, design_key, design_of, make_audit_canaries,
                                       new_token)
from privtune.auditing.one_run import empirical_epsilon
from privtune.data.records import Record
from privtune.measures.token_scores import TokenScores
from privtune.train import streams

#: δ of the bound for a run without a DP δ of its own.
DEFAULT_DELTA = 1e-5
SCORE = "calibrated loss: Σ over the secret's tokens of (base model NLL − model NLL), nats"
#: The FPR at which each design's TPR is reported (Panda et al.'s figure of merit).
AUDIT_FPR = 0.01


@dataclass
class AuditCanaries:
    """A study's audit canaries (m of each design, designs in order) and which of them the
    training set holds."""

    records: list[Record]
    trained: list[bool]

    @property
    def designs(self) -> list[str]:
        """Each canary's design, in canary order."""
        return [design_of(r) for r in self.records]

    @property
    def inserted(self) -> list[Record]:
        """The IN canaries, in canary order: what the training set gets."""
        return [r for r, inside in zip(self.records, self.trained) if inside]


#: Index of the designs' coin sub-streams of ``streams.AUDIT_CANARIES`` (random's coins are the stream itself).
COIN_STREAM = 2


def audit_membership(count: int, seed: int, design: str = "random") -> list[bool]:
    """Which of ``count`` canaries of ``design`` are trained on: independent fair coins
    from ``design``'s own sequence in the ``audit-canaries`` stream of ``seed`` (the first
    ``count`` coins of it)."""
    index = () if design == "random" else (COIN_STREAM, design_key(design))
    rng = np.random.default_rng(streams.stream_seed(seed, streams.AUDIT_CANARIES, *index))
    return (rng.random(count) < 0.5).tolist()


def audit_designs(settings) -> list[str]:
    """The designs a study plants: the headline one, then those compared with it."""
    return [settings.design, *settings.compare_designs]


def build_audit_canaries(settings, seed: int, corpus: list[Record], model: str | None = None) -> AuditCanaries | None:
    """The canaries ``settings`` (``privacy_audit``) asks for, or None when the audit is
    off; ``model``: the study's base model, for the designs that read it."""
    if not settings.enabled:
        return None
    records, trained = [], []
    for design in audit_designs(settings):
        records += make_audit_canaries(design, DesignInputs(settings.canaries, seed, tuple(corpus), model))
        trained += audit_membership(settings.canaries, seed, design)
    return AuditCanaries(records, trained)


def design_notes(records: list[Record]) -> dict[str, str]:
    """Each design's fallback note, from its canaries (designs that took none are absent)."""
    return {design_of(r): r.meta[DESIGN_NOTE] for r in records if DESIGN_NOTE in r.meta}


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


def embeddings_frozen(model) -> bool | None:
    """Whether ``model`` left its input embeddings untrained (None: it has none to ask)."""
    try:
        table = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return not any(p.requires_grad for p in table.parameters())


def run_notes(records: list[Record], frozen_embeddings: bool | None) -> dict[str, str]:
    """Each design's notes for one run: its fallback, and for new-token canaries a run
    that left the embeddings frozen (:data:`~privtune.auditing.designs.new_token.FROZEN_NOTE`)."""
    notes = design_notes(records)
    if frozen_embeddings and any(design_of(r) == new_token.NAME for r in records):
        notes[new_token.NAME] = "; ".join(filter(None, (notes.get(new_token.NAME), new_token.FROZEN_NOTE)))
    return notes


def audit_result(scores, trained, *, settings, dp: dict | None, seed: int, designs=None,
                 notes: dict[str, str] | None = None) -> dict:
    """A run's ``empirical_epsilon``: for the headline design, Steinke et al.'s bound
    (``lower_bound``, with every canary's score), the Gaussian-curve bound beside it, the
    canaries' AUC and TPR at 1% FPR, and the ε the run claims; the same for each compared
    design under ``compared_designs``. ``designs``: each canary's design (default: all the
    headline's); ``notes``: a design's fallback note, repeated as its ``design_note``."""
    scores = np.asarray(scores, float)
    inside = np.asarray(trained, bool)
    of_design = np.asarray(designs if designs is not None else [settings.design] * len(scores))
    notes = notes or {}
    results = {design: {**_design_result(scores[of_design == design], inside[of_design == design], design,
                                         settings=settings, dp=dp, seed=seed),
                        **({"design_note": notes[design]} if design in notes else {})}
               for design in audit_designs(settings)}
    headline = results.pop(settings.design)
    return {**headline, **({"compared_designs": results} if results else {})}


def _design_result(scores: np.ndarray, inside: np.ndarray, design: str, *, settings, dp: dict | None,
                   seed: int) -> dict:
    delta, source = audit_delta(settings, dp)
    common = dict(delta=delta, confidence=settings.confidence, seed=seed)
    members, nonmembers = scores[inside], scores[~inside]
    steinke = empirical_epsilon(members, nonmembers, bound="steinke", **common)
    gdp = empirical_epsilon(members, nonmembers, bound="gdp", **common)
    auc = auc_score(members, nonmembers)
    return {**steinke.to_dict(), "delta_source": source, "design": design, "score": SCORE,
            "gdp_lower_bound": gdp.lower_bound, "gdp_method": gdp.method, "gdp_guesses": gdp.guesses,
            "gdp_correct": gdp.correct, "claimed_epsilon": dp.get("epsilon") if dp else None,
            "auc": auc, "auc_ci": auc_interval(auc, members.size, nonmembers.size, settings.confidence),
            "tpr_at_fpr": {str(AUDIT_FPR): tpr_at_fpr(members, nonmembers, AUDIT_FPR, settings.confidence)}}


def not_audited(reason: str, dp: dict | None = None) -> dict:
    """The ``empirical_epsilon`` of a run that has none, and why."""
    return {"lower_bound": None, "gdp_lower_bound": None, "claimed_epsilon": dp.get("epsilon") if dp else None,
            "reason": reason}
