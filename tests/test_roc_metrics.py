"""Membership metrics against independent references (scikit-learn, scipy, slow loops)
and their intervals' coverage by simulation, at the sample sizes of a small study."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest, norm
from sklearn.metrics import roc_auc_score, roc_curve

from privtune.attacks.metrics import (
    auc_interval, auc_score, clopper_pearson, paired_difference, placements, quantile_band, roc_metrics,
    selection_half, tpr_at_fpr,
)
from privtune.errors import PrivtuneError


def slow_placements(pos, neg):
    """DeLong's components by their definition, one pair at a time."""
    psi = lambda x, y: 1.0 if x > y else 0.5 if x == y else 0.0  # noqa: E731
    return (np.array([np.mean([psi(x, y) for y in neg]) for x in pos]),
            np.array([np.mean([psi(x, y) for x in pos]) for y in neg]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=4, max_size=60), st.integers(0, 10_000))
def test_auc_and_delong_components_equal_sklearn_and_a_pairwise_loop(values, seed):
    rng = np.random.default_rng(seed)
    scores = np.array(values, float)  # small integers: many ties
    is_member = rng.random(scores.size) < 0.5
    if is_member.all() or not is_member.any():
        is_member[0] = not is_member[0]
    pos, neg = scores[is_member], scores[~is_member]
    assert auc_score(pos, neg) == pytest.approx(roc_auc_score(is_member, scores))
    for got, want in zip(placements(pos, neg), slow_placements(pos, neg)):
        assert got == pytest.approx(want)


def test_auc_is_na_below_ten_per_group_with_the_reason():
    m = roc_metrics(np.r_[np.ones(3), np.zeros(5)], np.r_[np.ones(3, bool), np.zeros(5, bool)])
    assert m["auc"] is None and m["auc_ci"] is None and m["confounded"] is None
    assert m["auc_reason"] == "needs ≥ 10 members and 10 non-members, has 3 and 5"
    assert (m["n_members"], m["n_nonmembers"]) == (3, 5)


def test_auc_interval_does_not_collapse_on_perfect_separation():
    # The bootstrap gave [1.00–1.00] here; a score interval keeps the uncertainty of 10 + 10 records.
    low, high = auc_interval(1.0, 10, 10)
    assert high == 1.0 and 0.75 < low < 0.95
    low, high = auc_interval(0.5, 10, 10)
    assert low == pytest.approx(1 - high) and 0.2 < low < 0.35


@pytest.mark.parametrize("m, n, shift", [(10, 10, 0.0), (12, 15, 1.5), (10, 30, 3.0)])
def test_auc_interval_covers_the_truth_at_small_n(m, n, shift):
    rng = np.random.default_rng(m * 100 + n)
    truth = norm.cdf(shift / math.sqrt(2))  # members N(shift, 1), non-members N(0, 1)
    hits = 0
    for _ in range(400):
        low, high = auc_interval(auc_score(rng.normal(shift, 1, m), rng.normal(0, 1, n)), m, n)
        hits += low <= truth <= high
    assert hits / 400 >= 0.93


def test_paired_covariance_is_delongs_from_a_pairwise_loop():
    rng = np.random.default_rng(0)
    members, nonmembers = rng.normal(1, 1, (14, 2)), rng.normal(0, 1, (11, 2))
    target, base = (members[:, 0], nonmembers[:, 0]), (members[:, 1] + members[:, 0], nonmembers[:, 1])
    got = paired_difference(target, base)
    (t10, t01), (b10, b01) = slow_placements(*target), slow_placements(*base)
    var = (np.var(t10 - b10, ddof=1) / 14 + np.var(t01 - b01, ddof=1) / 11)
    assert got["delong_se"] == pytest.approx(math.sqrt(var))
    assert got["difference"] == pytest.approx(roc_auc_score(np.r_[np.ones(14), np.zeros(11)], np.r_[target])
                                              - roc_auc_score(np.r_[np.ones(14), np.zeros(11)], np.r_[base]))


@pytest.mark.parametrize("m, n, target, base, rho", [(10, 10, 1.0, 0.5, 0.8), (15, 15, 2.5, 2.5, 0.9),
                                                     (20, 20, 1.0, 0.0, 0.5)])
def test_paired_advantage_interval_covers_the_truth_at_small_n(m, n, target, base, rho):
    rng = np.random.default_rng(int(10 * target + m))
    truth = norm.cdf(target / math.sqrt(2)) - norm.cdf(base / math.sqrt(2))
    both = [[1, rho], [rho, 1]]  # each record's scores under the two models are correlated
    hits = 0
    for _ in range(400):
        mem, non = rng.multivariate_normal([target, base], both, m), rng.multivariate_normal([0, 0], both, n)
        low, high = paired_difference((mem[:, 0], non[:, 0]), (mem[:, 1], non[:, 1]))["interval"]
        hits += low <= truth <= high
    assert hits / 400 >= 0.93


def test_a_base_model_that_separates_the_records_flags_the_attack_confounded():
    is_member = np.r_[np.ones(12, bool), np.zeros(12, bool)]
    base = np.r_[np.arange(12) + 100.0, np.arange(12)]  # the records alone separate perfectly
    m = roc_metrics(base + 0.1, is_member, base_scores=base)
    assert m["auc"] == 1.0 and m["base_auc"] == 1.0 and m["advantage"] == 0.0
    assert m["confounded"] and "already scores AUC 1.00" in m["confounded_reason"]
    low, high = m["advantage_ci"]
    assert low < 0 < high  # no memorisation is measurable beyond what the records give
    rng = np.random.default_rng(1)
    clear = roc_metrics(rng.normal(size=24) + is_member, is_member, base_scores=rng.normal(size=24))
    assert clear["confounded"] is False and clear["confounded_reason"] is None


# --- TPR at low FPR ----------------------------------------------------------------------------

def test_tpr_needs_one_over_fpr_nonmembers():
    rng = np.random.default_rng(0)
    is_member = np.r_[np.ones(200, bool), np.zeros(150, bool)]
    m = roc_metrics(rng.normal(size=350) + is_member, is_member, fprs=(0.01, 0.001))
    assert m["tpr_at_fpr"]["0.001"] is None and m["tpr_at_fpr_ci"]["0.001"] is None
    assert m["tpr_at_fpr_reason"] == {"0.001": "needs ≥ 1000 non-members, has 150"}
    assert m["tpr_at_fpr"]["0.01"] is not None and "0.01" not in m["tpr_at_fpr_reason"]
    assert tpr_at_fpr(np.ones(5), np.zeros(99), 0.01)["reason"] == "needs ≥ 100 non-members, has 99"


@settings(max_examples=40, deadline=None)
@given(st.integers(100, 400), st.integers(10, 200), st.sampled_from([0.01, 0.02, 0.05]), st.integers(0, 10_000))
def test_tpr_at_its_threshold_equals_sklearns_roc(n_non, n_mem, fpr, seed):
    rng = np.random.default_rng(seed)
    pos, neg = rng.normal(1, 1, n_mem), rng.normal(0, 1, n_non)
    got = tpr_at_fpr(pos, neg, fpr)
    assert got["threshold"] == pytest.approx(np.quantile(neg, 1 - fpr, method="median_unbiased"))
    labels, scores = np.r_[np.ones(n_mem), np.zeros(n_non)], np.r_[pos, neg]
    fprs, tprs, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    i = np.flatnonzero(thresholds > got["threshold"])[-1]  # sklearn: score ≥ thresholds[i]
    assert got["tpr"] == pytest.approx(tprs[i])
    assert fprs[i] <= fpr + 1 / n_non  # the threshold stands for FPR ≈ fpr
    assert got["ci"][0] <= got["tpr"] <= got["ci"][1]


@pytest.mark.parametrize("successes, trials", [(0, 30), (1, 30), (17, 40), (40, 40), (3, 1000)])
def test_clopper_pearson_equals_scipys_exact_interval(successes, trials):
    want = binomtest(successes, trials).proportion_ci(0.975, method="exact")
    assert clopper_pearson(successes, trials, 0.975) == pytest.approx((want.low, want.high), abs=1e-9)


def test_quantile_band_holds_the_true_quantile():
    rng = np.random.default_rng(0)
    q = norm.ppf(0.99)
    hits = sum(lo <= q <= hi for lo, hi in (quantile_band(rng.normal(size=300), 0.01, 0.975) for _ in range(400)))
    assert hits / 400 >= 0.96


@pytest.mark.parametrize("n_mem, n_non, shift, fpr", [(100, 100, 2.0, 0.01), (100, 300, 1.5, 0.01),
                                                      (200, 1000, 2.0, 0.001)])
def test_tpr_interval_covers_the_truth_and_the_estimate_is_nearly_unbiased(n_mem, n_non, shift, fpr):
    rng = np.random.default_rng(n_non)
    truth = norm.sf(norm.ppf(1 - fpr) - shift)  # members N(shift, 1), non-members N(0, 1)
    hits, estimates = 0, []
    for _ in range(300):
        got = tpr_at_fpr(rng.normal(shift, 1, n_mem), rng.normal(0, 1, n_non), fpr)
        hits += got["ci"][0] <= truth <= got["ci"][1]
        estimates.append(got["tpr"])
    assert hits / 300 >= 0.93
    # The Monte Carlo error of the mean is about 0.005 here; the old rule was 20–50% high.
    assert abs(np.mean(estimates) - truth) < 0.08 * truth + 0.01


# --- halves and the rest -------------------------------------------------------------------------

def test_selection_half_is_by_person_fixed_by_the_seed_and_about_half():
    people = [f"p{i // 3}" for i in range(600)]  # three records per person
    half = selection_half(people, seed=0)
    assert all(half[i] == half[i - i % 3] for i in range(600))  # a person's records stay together
    assert 0.4 < half.mean() < 0.6
    assert (selection_half(people, seed=0) == half).all() and (selection_half(people, seed=1) != half).any()


def test_halves_are_the_same_figures_on_each_half():
    rng = np.random.default_rng(2)
    is_member = rng.random(120) < 0.5
    scores, base = rng.normal(size=120) + is_member, rng.normal(size=120)
    select = rng.random(120) < 0.5
    m = roc_metrics(scores, is_member, base_scores=base, select=select)
    for name, part in (("select", select), ("report", ~select)):
        alone = roc_metrics(scores[part], is_member[part], base_scores=base[part])
        for key in ("auc", "auc_ci", "advantage", "advantage_ci", "n_members", "n_nonmembers"):
            assert m["halves"][name][key] == alone[key]


def test_roc_curve_is_thinned_but_keeps_its_ends():
    rng = np.random.default_rng(0)
    is_member = rng.random(5000) < 0.5
    m = roc_metrics(rng.normal(size=5000), is_member, max_points=100)
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
