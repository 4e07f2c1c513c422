"""An ε lower bound from canaries trained IN and OUT across several runs.

Jagielski, Ullman and Oprea, "Auditing Differentially Private Machine Learning: How
Private is Private SGD?" (NeurIPS 2020): at a threshold t, (ε, δ)-DP implies
TPR ≤ e^ε · FPR + δ, so ε ≥ ln((TPR − δ) / FPR). With Clopper–Pearson bounds (a lower
one on TPR, an upper one on FPR, each at (1 − confidence)/2) the bound holds at the
stated confidence.

The threshold is chosen on a seeded half of the observations (the one maximising the
point estimate) and the bound computed on the other half, so choosing it costs no
confidence and does not see the half it is judged on. The Clopper–Pearson intervals treat
the observations as independent trials: exact with one canary per run (Jagielski et
al.'s setting); with several canaries per run, runs are independent but canaries within
a run share a model, so the bound is then an approximation to say so beside.
"""

from __future__ import annotations

import math

import numpy as np

from privtune.attacks.metrics import clopper_pearson
from privtune.auditing.one_run import CONFIDENCE, MIN_CANARIES, EmpiricalEpsilon


def _point_epsilon(tp: int, fp: int, positives: int, negatives: int, delta: float) -> float:
    """ln((TPR − δ)/FPR) with one pseudo-count each side, so zero counts stay finite."""
    return math.log(max((tp + 0.5) / (positives + 1) - delta, 1e-12) / ((fp + 0.5) / (negatives + 1)))


def _best_threshold(inside: np.ndarray, outside: np.ndarray, delta: float) -> float:
    candidates = np.unique(np.concatenate([inside, outside]))
    estimates = [_point_epsilon(int((inside >= t).sum()), int((outside >= t).sum()),
                                inside.size, outside.size, delta) for t in candidates]
    return float(candidates[int(np.argmax(estimates))])


def clopper_pearson_epsilon(in_scores, out_scores, *, delta: float, confidence: float = CONFIDENCE,
                            seed: int = 0) -> EmpiricalEpsilon:
    """The bound of the module docstring (higher score = more likely trained on)."""
    inside, outside = np.asarray(in_scores, float), np.asarray(out_scores, float)
    kept = dict(confidence=confidence, delta=delta, canaries=inside.size + outside.size,
                method="clopper-pearson, threshold chosen on a seeded half, bound on the other",
                in_scores=tuple(inside.tolist()), out_scores=tuple(outside.tolist()))
    if min(inside.size, outside.size) < MIN_CANARIES:
        return EmpiricalEpsilon(None, guesses=None, correct=None, **kept,
                                reason=f"{inside.size} IN and {outside.size} OUT observations; "
                                       f"the bound needs at least {MIN_CANARIES} of each")
    rng = np.random.default_rng(seed)
    choose_in = rng.permutation(inside.size) < inside.size // 2
    choose_out = rng.permutation(outside.size) < outside.size // 2
    threshold = _best_threshold(inside[choose_in], outside[choose_out], delta)
    judged_in, judged_out = inside[~choose_in], outside[~choose_out]
    tp = int((judged_in >= threshold).sum())
    bound = clopper_pearson_epsilon_at(judged_in, judged_out, threshold, delta, confidence)
    return EmpiricalEpsilon(bound, guesses=tp + int((judged_out >= threshold).sum()), correct=tp, **kept)


def clopper_pearson_epsilon_at(inside: np.ndarray, outside: np.ndarray, threshold: float, delta: float,
                               confidence: float) -> float:
    """The bound at a threshold fixed in advance (never chosen on these scores)."""
    tp, fp = int((inside >= threshold).sum()), int((outside >= threshold).sum())
    # A two-sided interval at ``confidence`` puts (1 − confidence)/2 in each tail: the
    # one-sided bounds this needs, one for TPR and one for FPR.
    tpr_low = clopper_pearson(tp, inside.size, confidence)[0]
    fpr_high = clopper_pearson(fp, outside.size, confidence)[1]
    if tpr_low <= delta or fpr_high <= 0:
        return 0.0
    return max(math.log((tpr_low - delta) / fpr_high), 0.0)
