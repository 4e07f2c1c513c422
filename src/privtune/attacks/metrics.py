"""Membership-inference metrics: AUC, TPR at low FPR and the advantage over the base
model, each with an interval that keeps its coverage at the sample sizes of a study.

- **AUC** is the Mann–Whitney statistic (equal to scikit-learn's ``roc_auc_score``).
  Its 95% interval is Newcombe's score interval ("Confidence intervals for an effect
  size measure based on the Mann–Whitney statistic. Part 2", Stat. Med. 2006): the
  Hanley–McNeil variance with ``N* = (m + n)/2`` evaluated at the *candidate* AUC, as
  Wilson's interval does for a proportion, so it does not collapse to a point when the
  sample separates perfectly (a bootstrap does). Below :data:`MIN_PER_GROUP` members or
  non-members the AUC is ``null`` with a reason: three members say nothing.
- **TPR at FPR α** (Carlini et al., 2022, "Membership inference attacks from first
  principles") needs at least ``⌈1/α⌉`` non-members: with fewer, the threshold sits
  above every non-member and the figure is TPR at zero false positives. The threshold
  is the ``1 − α`` quantile of the non-member scores (Hyndman–Fan type 8, median-
  unbiased: in simulation with normal scores its TPR is within 4% of the truth from
  ``1/α`` non-members on, where the highest TPR at an empirical FPR ≤ α reads 20–50%
  high at ``1/α`` non-members). Its interval accounts for the threshold's own
  uncertainty: an exact order-statistic band for the true quantile (2.5%) and a
  Clopper–Pearson interval on the members above each end of the band (2.5%), a
  Bonferroni split of 5%.
- **Advantage over the base model** (Duan et al., 2024; Meeus et al., 2024, "SoK:
  membership inference attacks on LLMs are rushing nowhere"): ``AUC_θ − AUC_θ0`` on the
  same records. The base model never saw them, so its AUC is the blind baseline: what
  the records' own differences give. The interval is Zou & Donner's MOVER (2008),
  square-and-add on the two score intervals with their correlation from DeLong's paired
  covariance (DeLong et al., 1988); DeLong's Wald interval alone collapses when both
  models separate perfectly. An attack whose base-model AUC is far from 0.5 (its
  interval misses ``[0.5 − CONFOUND_MARGIN, 0.5 + CONFOUND_MARGIN]``) is ``confounded``.
- **Selection half**: the report's strongest attack is the largest of ~10 attack ×
  level variants, biased upward if chosen and reported on the same records; so every
  entry also carries its advantage on a seeded half of the individuals (to choose on)
  and its figures on the other half (to report), see :mod:`privtune.report.headline`.

Hand-written because scikit-learn has no AUC interval and no library here has these.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import brentq
from scipy.stats import beta, binom, norm
from sklearn.metrics import roc_curve

from privtune.errors import PrivtuneError

#: Fewer members or non-members than this and an AUC (and anything built on it) is n/a.
MIN_PER_GROUP = 10
#: A base-model AUC whose interval misses 0.5 ± this is confounded.
CONFOUND_MARGIN = 0.05
CONFIDENCE = 0.95


def _check(scores: np.ndarray, is_member: np.ndarray, fprs) -> None:
    if scores.shape != is_member.shape:
        raise PrivtuneError(f"{scores.shape[0]} scores but {is_member.shape[0]} membership labels",
                            "give one score per record")
    if not is_member.any() or is_member.all():
        which = "member" if not is_member.any() else "non-member"
        raise PrivtuneError(f"the {which} set is empty, so membership inference has nothing to compare",
                            "use a dataset with records on both sides of the split")
    if np.isnan(scores).any():
        raise PrivtuneError("membership scores contain NaN", "drop records without scored tokens first")
    bad = [f for f in fprs if not 0 < f < 1]
    if bad:
        raise PrivtuneError(f"FPR {bad[0]} is outside (0, 1)", "use values such as 0.01 and 0.001")


# --- AUC -------------------------------------------------------------------------------

def placements(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components: for each member the share of non-members it
    out-scores, for each non-member the share of members that out-score it (ties ½).
    Their means are both the AUC."""
    neg, pos = np.sort(nonmembers), np.sort(members)
    v10 = (np.searchsorted(neg, members, "left") + np.searchsorted(neg, members, "right")) / (2 * neg.size)
    v01 = 1 - (np.searchsorted(pos, nonmembers, "left") + np.searchsorted(pos, nonmembers, "right")) / (2 * pos.size)
    return v10, v01


def auc_score(members: np.ndarray, nonmembers: np.ndarray) -> float:
    return float(placements(members, nonmembers)[0].mean())


def score_variance(theta: float, m: int, n: int) -> float:
    """Newcombe's (2006) Hanley–McNeil variance of an AUC ``theta`` from ``m`` and ``n``
    records, with ``N* = (m + n)/2`` in place of each group size."""
    n_star = (m + n) / 2
    return theta * (1 - theta) / (m * n) * (1 + (n_star - 1) * ((1 - theta) / (2 - theta) + theta / (1 + theta)))


def auc_interval(auc: float, m: int, n: int, confidence: float = CONFIDENCE) -> list[float]:
    """Newcombe's score interval: the θ with ``|auc − θ| ≤ z·sqrt(V(θ))``."""
    z = norm.ppf(0.5 + confidence / 2)

    def gap(theta: float) -> float:
        return abs(auc - theta) - z * math.sqrt(score_variance(theta, m, n))

    def end(target: float) -> float:
        if auc == target:
            return target
        inner = auc
        if gap(inner) >= 0:  # zero variance at auc ∈ {0, 1}: step inside, where it is positive
            inner = auc + (target - auc) * 1e-9
        return brentq(gap, min(inner, target), max(inner, target), xtol=1e-10)

    return [end(0.0), end(1.0)]


def paired_difference(target: tuple[np.ndarray, np.ndarray], base: tuple[np.ndarray, np.ndarray],
                      confidence: float = CONFIDENCE) -> dict:
    """``AUC(target) − AUC(base)`` on the same records (``(members, non-members)`` scores
    of each model, in the same record order) with Zou & Donner's MOVER interval."""
    (tm, tn), (bm, bn) = target, base
    m, n = tm.size, tn.size
    t10, t01 = placements(tm, tn)
    b10, b01 = placements(bm, bn)
    auc_t, auc_b = float(t10.mean()), float(b10.mean())
    # DeLong's paired (co)variances: members' and non-members' components, each over its group.
    cov = np.cov(np.vstack([t10, b10]), ddof=1) / m + np.cov(np.vstack([t01, b01]), ddof=1) / n
    r = cov[0, 1] / math.sqrt(cov[0, 0] * cov[1, 1]) if cov[0, 0] > 0 and cov[1, 1] > 0 else 0.0
    r = float(np.clip(r, -1, 1))
    (lt, ut), (lb, ub) = auc_interval(auc_t, m, n, confidence), auc_interval(auc_b, m, n, confidence)
    d = auc_t - auc_b
    low = d - math.sqrt(max(0.0, (auc_t - lt) ** 2 + (ub - auc_b) ** 2 - 2 * r * (auc_t - lt) * (ub - auc_b)))
    high = d + math.sqrt(max(0.0, (ut - auc_t) ** 2 + (auc_b - lb) ** 2 - 2 * r * (ut - auc_t) * (auc_b - lb)))
    return {"difference": d, "interval": [max(-1.0, low), min(1.0, high)], "correlation": r,
            "delong_se": math.sqrt(max(0.0, cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]))}


def too_few(m: int, n: int, minimum: int = MIN_PER_GROUP) -> str | None:
    """Why an AUC cannot be measured on ``m`` members and ``n`` non-members, or None."""
    if m >= minimum and n >= minimum:
        return None
    return f"needs ≥ {minimum} members and {minimum} non-members, has {m} and {n}"


def confounded_reason(base_auc: float, base_ci: Sequence[float]) -> str | None:
    """Why a base-model AUC makes an attack's figure a property of the records, or None."""
    low, high = base_ci
    if low <= 0.5 + CONFOUND_MARGIN and high >= 0.5 - CONFOUND_MARGIN:
        return None
    return (f"the base model, which never saw these records, already scores AUC {base_auc:.2f} "
            f"[{low:.2f}–{high:.2f}] on them: the attack measures the records, not memorisation")


# --- TPR at low FPR ----------------------------------------------------------------------

def needed_nonmembers(fpr: float) -> int:
    """The fewest non-members at which FPR ``fpr`` is one false positive or more."""
    return math.ceil(1 / fpr - 1e-9)


def clopper_pearson(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low = beta.ppf(tail, successes, trials - successes + 1) if successes > 0 else 0.0
    high = beta.ppf(1 - tail, successes + 1, trials - successes) if successes < trials else 1.0
    return float(low), float(high)


def quantile_band(nonmembers: np.ndarray, fpr: float, confidence: float) -> tuple[float, float]:
    """Order statistics that hold the non-members' true ``1 − fpr`` quantile with
    probability ≥ ``confidence`` (distribution-free: the count below it is binomial)."""
    k, tail = nonmembers.size, (1 - confidence) / 2
    ordered = np.sort(nonmembers)
    counts = np.arange(k + 2)
    # r: the largest rank with P(count below < r) ≤ tail; s: the smallest with P(count ≥ s) ≤ tail.
    r = int(counts[binom.cdf(counts - 1, k, 1 - fpr) <= tail].max())
    s = int(counts[binom.sf(counts - 1, k, 1 - fpr) <= tail].min())
    low = ordered[r - 1] if r >= 1 else -np.inf
    high = ordered[s - 1] if s <= k else np.inf
    return float(low), float(high)


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float, confidence: float = CONFIDENCE) -> dict:
    """TPR at FPR ``fpr``, its interval and threshold; ``tpr: None`` with a reason when
    there are too few non-members to measure it."""
    need = needed_nonmembers(fpr)
    if nonmembers.size < need:
        return {"tpr": None, "ci": None, "reason": f"needs ≥ {need} non-members, has {nonmembers.size}"}
    threshold = float(np.quantile(nonmembers, 1 - fpr, method="median_unbiased"))
    share = 1 - (1 - confidence) / 2  # half of the error to the threshold, half to the members
    low_t, high_t = quantile_band(nonmembers, fpr, share)
    m = members.size
    low = clopper_pearson(int((members > high_t).sum()), m, share)[0]
    high = clopper_pearson(int((members > low_t).sum()), m, share)[1]
    return {"tpr": float((members > threshold).mean()), "ci": [low, high], "threshold": threshold, "reason": None}


# --- one entry ----------------------------------------------------------------------------

def selection_half(individuals: Sequence[str], seed: int) -> np.ndarray:
    """A fixed half of the individuals (by a seeded hash, so every attack and every run
    of a study splits the same way): True where the strongest attack is chosen."""
    def bit(person: str) -> bool:
        return hashlib.sha256(f"privtune-selection-{seed}-{person}".encode()).digest()[0] < 128
    return np.array([bit(p) for p in individuals], dtype=bool)


def _thin(fpr: np.ndarray, tpr: np.ndarray, max_points: int) -> tuple[list[float], list[float]]:
    if fpr.size <= max_points:
        return fpr.tolist(), tpr.tolist()
    # Keep points spread on a log FPR scale (low FPR matters most), plus the ends.
    grid = np.unique(np.concatenate([[0.0], np.logspace(-4, 0, max_points - 2), [1.0]]))
    idx = np.unique(np.clip(np.searchsorted(fpr, grid, side="right") - 1, 0, fpr.size - 1))
    return fpr[idx].tolist(), tpr[idx].tolist()


def auc_figures(scores: np.ndarray, is_member: np.ndarray, base_scores: np.ndarray | None) -> dict:
    """AUC with its interval and group sizes, and, given the base model's scores on the
    same records, its AUC, the advantage over it and whether the attack is confounded."""
    m, n = int(is_member.sum()), int((~is_member).sum())
    out = {"auc": None, "auc_ci": None, "n_members": m, "n_nonmembers": n, "auc_reason": too_few(m, n),
           "base_auc": None, "base_auc_ci": None, "advantage": None, "advantage_ci": None,
           "confounded": None, "confounded_reason": None}
    if out["auc_reason"]:
        return out
    groups = scores[is_member], scores[~is_member]
    out["auc"] = auc_score(*groups)
    out["auc_ci"] = auc_interval(out["auc"], m, n)
    own = base_scores is None  # the base model's own entry: its AUC is the baseline
    base_auc, base_ci = (out["auc"], out["auc_ci"]) if own else (None, None)
    if not own:
        base_groups = base_scores[is_member], base_scores[~is_member]
        diff = paired_difference(groups, base_groups)
        base_auc = auc_score(*base_groups)
        base_ci = auc_interval(base_auc, m, n)
        out.update(base_auc=base_auc, base_auc_ci=base_ci, advantage=diff["difference"],
                   advantage_ci=diff["interval"])
    reason = confounded_reason(base_auc, base_ci)
    out.update(confounded=reason is not None, confounded_reason=reason)
    return out


def roc_metrics(scores, is_member, *, fprs=(0.01, 0.001), base_scores=None, select=None,
                max_points: int = 200) -> dict:
    """Every figure of one attack: AUC and TPR at each FPR with intervals, the advantage
    over the base model (``base_scores``: its scores on the same records), the figures
    on each half of ``select`` (bool per record, True = selection half) and a thinned ROC.

    Higher scores mean "more likely a member".
    """
    scores = np.asarray(scores, dtype=float)
    is_member = np.asarray(is_member, dtype=bool)
    _check(scores, is_member, fprs)
    if base_scores is not None:
        base_scores = np.asarray(base_scores, dtype=float)
        _check(base_scores, is_member, fprs)
    members, nonmembers = scores[is_member], scores[~is_member]
    tprs = {str(f): tpr_at_fpr(members, nonmembers, f) for f in fprs}
    fpr, tpr, _ = roc_curve(is_member, scores, drop_intermediate=False)
    roc_fpr, roc_tpr = _thin(fpr, tpr, max_points)
    result = {**auc_figures(scores, is_member, base_scores),
              "tpr_at_fpr": {k: v["tpr"] for k, v in tprs.items()},
              "tpr_at_fpr_ci": {k: v["ci"] for k, v in tprs.items()},
              "tpr_at_fpr_reason": {k: v["reason"] for k, v in tprs.items() if v["reason"]},
              "roc": {"fpr": roc_fpr, "tpr": roc_tpr}}
    if select is not None and base_scores is not None:
        select = np.asarray(select, dtype=bool)
        halves = {}
        for name, part in (("select", select), ("report", ~select)):
            if not is_member[part].any() or is_member[part].all():
                halves[name] = {"n_members": int(is_member[part].sum()),
                                "n_nonmembers": int((~is_member[part]).sum()), "auc_reason": "an empty group"}
                continue
            halves[name] = auc_figures(scores[part], is_member[part], base_scores[part])
        result["halves"] = halves
    return result
