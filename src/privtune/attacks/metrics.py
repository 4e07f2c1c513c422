"""Membership-inference metrics: ROC AUC and TPR at low FPR, with bootstrap intervals.

AUC summarises an attack over all thresholds; TPR at a low FPR (1%, 0.1%) says whether
it can pick out *some* members with confidence, which is what matters for privacy
(Carlini et al., 2022, "Membership inference attacks from first principles"). The ROC
itself comes from scikit-learn; the bootstrap is vectorised here (members and
non-members resampled separately), because 1,000 calls to scikit-learn per attack would
cost more than the attacks themselves.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve

from privtune.errors import PrivtuneError


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


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The highest TPR among ROC points whose FPR is at most ``target``."""
    return float(tpr[fpr <= target].max(initial=0.0))


def _bootstrap_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray, n: int, rng) -> np.ndarray:
    """AUC of ``n`` stratified resamples, via the rank-sum (Mann–Whitney) form."""
    m, k = member_scores.size, nonmember_scores.size
    pos = member_scores[rng.integers(0, m, (n, m))]
    neg = nonmember_scores[rng.integers(0, k, (n, k))]
    ranks = rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # ties get average ranks
    return (ranks[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * k)


def _bootstrap_tpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fprs, n: int, rng) -> np.ndarray:
    """(n, len(fprs)) TPR at each FPR over stratified resamples.

    At FPR ≤ f the best threshold is just above the ``floor(f·k)``-th highest
    non-member score (strictly above it: ties count as false positives).
    """
    m, k = member_scores.size, nonmember_scores.size
    pos = np.sort(member_scores[rng.integers(0, m, (n, m))], axis=1)
    neg = -np.sort(-nonmember_scores[rng.integers(0, k, (n, k))], axis=1)  # descending
    out = np.empty((n, len(fprs)))
    for j, f in enumerate(fprs):
        allowed = int(np.floor(f * k))  # false positives allowed
        threshold = neg[:, allowed] if allowed < k else np.full(n, -np.inf)
        # Count members strictly above the threshold, per resample.
        above = m - np.array([np.searchsorted(row, t, side="right") for row, t in zip(pos, threshold)])
        out[:, j] = above / m
    return out


def _thin(fpr: np.ndarray, tpr: np.ndarray, max_points: int) -> tuple[list[float], list[float]]:
    if fpr.size <= max_points:
        return fpr.tolist(), tpr.tolist()
    # Keep points spread on a log FPR scale (low FPR matters most), plus the ends.
    grid = np.unique(np.concatenate([[0.0], np.logspace(-4, 0, max_points - 2), [1.0]]))
    idx = np.unique(np.clip(np.searchsorted(fpr, grid, side="right") - 1, 0, fpr.size - 1))
    return fpr[idx].tolist(), tpr[idx].tolist()


def roc_metrics(scores, is_member, *, fprs=(0.01, 0.001), n_bootstrap: int = 1000, seed: int = 0,
                max_points: int = 200) -> dict:
    """AUC, TPR at each FPR, their bootstrap 95% intervals, and a thinned ROC curve.

    Higher scores mean "more likely a member". Intervals are percentile intervals over
    ``n_bootstrap`` resamples drawn separately from members and non-members.
    """
    scores = np.asarray(scores, dtype=float)
    is_member = np.asarray(is_member, dtype=bool)
    _check(scores, is_member, fprs)
    fpr, tpr, _ = roc_curve(is_member, scores, drop_intermediate=False)
    auc = float(roc_auc_score(is_member, scores))
    at = {str(f): tpr_at_fpr(fpr, tpr, f) for f in fprs}
    result = {"auc": auc, "auc_ci": [auc, auc], "tpr_at_fpr": at,
              "tpr_at_fpr_ci": {k: [v, v] for k, v in at.items()}}
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        members, nonmembers = scores[is_member], scores[~is_member]
        aucs = _bootstrap_auc(members, nonmembers, n_bootstrap, rng)
        tprs = _bootstrap_tpr(members, nonmembers, fprs, n_bootstrap, rng)
        result["auc_ci"] = np.percentile(aucs, [2.5, 97.5]).tolist()
        result["tpr_at_fpr_ci"] = {str(f): np.percentile(tprs[:, j], [2.5, 97.5]).tolist()
                                   for j, f in enumerate(fprs)}
    roc_fpr, roc_tpr = _thin(fpr, tpr, max_points)
    result.update(roc={"fpr": roc_fpr, "tpr": roc_tpr}, n_members=int(is_member.sum()),
                  n_nonmembers=int((~is_member).sum()))
    return result
