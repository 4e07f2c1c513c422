"""ROC metrics against scikit-learn and a brute-force threshold sweep."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from privtune.attacks.metrics import roc_metrics
from privtune.errors import PrivtuneError


def brute_tpr_at_fpr(scores, is_member, target):
    best = 0.0
    neg, pos = scores[~is_member], scores[is_member]
    for t in np.r_[np.unique(scores), np.inf]:
        if (neg >= t).mean() <= target:
            best = max(best, (pos >= t).mean())
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=4, max_size=60), st.integers(0, 10_000))
def test_auc_and_tpr_equal_sklearn_and_brute_force(values, seed):
    rng = np.random.default_rng(seed)
    scores = np.array(values, float)  # small integers: many ties
    is_member = rng.random(scores.size) < 0.5
    if is_member.all() or not is_member.any():
        is_member[0] = not is_member[0]
    m = roc_metrics(scores, is_member, fprs=(0.25, 0.1, 0.01), n_bootstrap=0)
    assert m["auc"] == pytest.approx(roc_auc_score(is_member, scores))
    for f in (0.25, 0.1, 0.01):
        assert m["tpr_at_fpr"][str(f)] == pytest.approx(brute_tpr_at_fpr(scores, is_member, f))


def test_bootstrap_intervals_cover_the_estimate_and_match_resampled_sklearn():
    rng = np.random.default_rng(0)
    is_member = np.r_[np.ones(60, bool), np.zeros(60, bool)]
    scores = rng.normal(size=120) + 0.8 * is_member
    m = roc_metrics(scores, is_member, fprs=(0.1,), n_bootstrap=2000, seed=1)
    lo, hi = m["auc_ci"]
    assert lo < m["auc"] < hi and 0.05 < hi - lo < 0.3
    # Same resampling scheme with scikit-learn in a loop gives the same interval (to MC error).
    r = np.random.default_rng(7)
    pos, neg = scores[is_member], scores[~is_member]
    aucs = []
    for _ in range(2000):
        p, q = pos[r.integers(0, 60, 60)], neg[r.integers(0, 60, 60)]
        aucs.append(roc_auc_score(np.r_[np.ones(60), np.zeros(60)], np.r_[p, q]))
    assert np.percentile(aucs, [2.5, 97.5]) == pytest.approx([lo, hi], abs=0.02)
    tlo, thi = m["tpr_at_fpr_ci"]["0.1"]
    assert tlo <= m["tpr_at_fpr"]["0.1"] <= thi


def test_roc_curve_is_thinned_but_keeps_its_ends():
    rng = np.random.default_rng(0)
    is_member = rng.random(5000) < 0.5
    m = roc_metrics(rng.normal(size=5000), is_member, n_bootstrap=0, max_points=100)
    assert len(m["roc"]["fpr"]) <= 100 and m["roc"]["fpr"][0] == 0.0 and m["roc"]["tpr"][-1] == 1.0
    assert m["n_members"] == is_member.sum()


@pytest.mark.parametrize("scores, members, fprs, needle", [
    ([1.0, 2.0], [True, True], (0.01,), "non-member set is empty"),
    ([1.0, 2.0], [False, False], (0.01,), "member set is empty"),
    ([1.0, np.nan], [True, False], (0.01,), "NaN"),
    ([1.0, 2.0], [True, False], (1.5,), "outside"),
])
def test_bad_input(scores, members, fprs, needle):
    with pytest.raises(PrivtuneError, match=needle):
        roc_metrics(scores, members, fprs=fprs)
