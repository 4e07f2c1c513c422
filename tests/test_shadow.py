"""Shadow-model attacks (LiRA, RMIA) on synthetic populations where the truth is known.

Each record i has a difficulty d_i; a model's statistic on it is Gaussian around d_i,
shifted by Δ when the model trained on it. When difficulty varies a lot across records
a global threshold (the loss attack) barely works and per-record calibration is the
whole game, so the calibrated attacks must beat it by a wide margin; with Δ = 0 they
must be at chance. Closed forms are checked against slow per-record loops, and one
end-to-end test runs the statistics of real tiny models through both attacks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from privtune.attacks.shadow import (
    lira,
    record_statistic,
    rmia,
    rmia_log_ratio,
    sequence_loglik,
    tune_offline_a,
)
from privtune.data.records import Record, Span
from privtune.data.tokenize import encode_records
from privtune.errors import PrivtuneError
from privtune.measures.token_scores import TokenScores, score_tokens
from privtune.models.tiny import tiny_model, tiny_tokenizer
from privtune.train.losses import per_record_loss
from privtune.train.precision import Runtime


# --------------------------------------------------------------------------- synthetic data

def halves(rng: np.random.Generator, n_models: int, n: int) -> np.ndarray:
    """(K, N) bool: each model trains on a random half of the records."""
    return np.array([rng.permutation(n) < n // 2 for _ in range(n_models)])


def gaussian_world(rng, n=400, n_models=16, delta=1.0, spread=3.0, noise=0.5, heterogeneous=False,
                   shadows_train=True):
    """Target membership, target statistic, shadow statistics, shadow membership.

    statistic = d_i + Δ_i·[trained on i] + N(0, noise²), d_i ~ N(0, spread²);
    Δ_i = Δ for all records, or Δ·Exp(1) (some records far more vulnerable) if heterogeneous.
    ``shadows_train=False``: no shadow trains on any record (the offline-only setting).
    """
    difficulty = rng.normal(0.0, spread, n)
    shift = delta * rng.exponential(1.0, n) if heterogeneous else np.full(n, delta)
    member = rng.random(n) < 0.5
    shadow_in = halves(rng, n_models, n) if shadows_train else np.zeros((n_models, n), dtype=bool)
    shadow = difficulty + shift * shadow_in + rng.normal(0.0, noise, (n_models, n))
    target = difficulty + shift * member + rng.normal(0.0, noise, n)
    return member, target, shadow, shadow_in


def sequence_world(rng, n=400, n_models=8, delta=0.06, noise=0.04, references_train=True, paired=False):
    """Like ``gaussian_world`` but in RMIA's signal for texts: the mean token
    log-probability, −d_i for a record of mean NLL d_i, raised by Δ when trained on.

    ``paired``: references 2j and 2j+1 train on complementary halves, so every record has
    an IN and an OUT reference (the online rule's condition).

    Returns membership, target, reference values, reference membership.
    """
    difficulty = rng.uniform(0.5, 4.0, n)
    member = rng.random(n) < 0.5
    ref_in = halves(rng, n_models, n) if references_train else np.zeros((n_models, n), dtype=bool)
    if paired:
        ref_in[1::2] = ~ref_in[0::2]

    def mean_log_prob(inside):
        return -difficulty + delta * inside + rng.normal(0.0, noise, inside.shape)

    return member, mean_log_prob(member), mean_log_prob(ref_in), ref_in


def auc(member, score) -> float:
    keep = np.isfinite(score)
    return roc_auc_score(member[keep], score[keep])


# --------------------------------------------------------------------------- statistics

def scores_by_hand(nll: np.ndarray, positions: np.ndarray) -> TokenScores:
    valid = np.ones_like(positions, dtype=bool)
    zeros = np.zeros_like(nll)
    return TokenScores(nll=nll, mu=zeros, sigma=zeros, valid=valid, sensitive=positions)


def test_record_statistic_is_the_logit_of_the_geometric_mean_probability():
    rng = np.random.default_rng(0)
    nll = rng.uniform(0.0, 6.0, (5, 7)).astype(np.float32)
    positions = rng.random((5, 7)) < 0.6
    positions[0] = False
    got = record_statistic(scores_by_hand(nll, positions), positions)
    assert np.isnan(got[0])
    for i in range(1, 5):
        p = math.exp(-float(nll[i][positions[i]].astype(np.float64).mean()))
        assert got[i] == pytest.approx(math.log(p / (1 - p)), rel=1e-6)  # float32 sums


def test_record_statistic_is_monotone_in_the_loss_and_finite_at_zero_loss():
    losses = np.array([[0.0], [1e-9], [1e-3], [0.1], [1.0], [5.0], [50.0]], dtype=np.float32)
    positions = np.ones_like(losses, dtype=bool)
    stat = record_statistic(scores_by_hand(losses, positions), positions)
    assert np.isfinite(stat).all()
    assert (np.diff(stat) < 0).all()  # lower loss, higher statistic
    assert stat[-1] == pytest.approx(-50.0, abs=1e-6)  # ≈ -loss for hard records


def test_sequence_loglik_sums_log_probs_and_is_nan_without_positions():
    nll = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.0]], dtype=np.float32)
    positions = np.array([[True, False, True], [False, False, False]])
    got = sequence_loglik(scores_by_hand(nll, positions), positions)
    assert got[0] == pytest.approx(-4.0)
    assert np.isnan(got[1])


@pytest.mark.parametrize("fn", [record_statistic, sequence_loglik])
def test_statistics_reject_bad_positions(fn):
    nll = np.ones((2, 3), dtype=np.float32)
    scores = scores_by_hand(nll, np.ones((2, 3), dtype=bool))
    with pytest.raises(PrivtuneError, match="shape"):
        fn(scores, np.ones((2, 4), dtype=bool))
    with pytest.raises(PrivtuneError, match="boolean"):
        fn(scores, np.ones((2, 3), dtype=int))
    scores.valid[1, 2] = False
    with pytest.raises(PrivtuneError, match="padding"):
        fn(scores, np.ones((2, 3), dtype=bool))


# --------------------------------------------------------------------------- LiRA and RMIA power

def test_calibrated_attacks_beat_the_loss_attack_when_difficulty_varies():
    rng = np.random.default_rng(1)
    member, target, shadow, shadow_in = gaussian_world(rng)
    loss_auc = auc(member, target)  # the threshold attack: higher statistic = lower loss
    assert loss_auc < 0.65
    for score in (lira(target, shadow, shadow_in, online=True),
                  lira(target, shadow, shadow_in, online=False),
                  rmia(target, shadow, shadow_in, target, shadow, population_in=shadow_in)):
        assert auc(member, score) > loss_auc + 0.2


def test_rmia_on_sequence_likelihoods_beats_the_loss_attack_online_and_offline():
    rng = np.random.default_rng(2)
    member, target, refs, ref_in = sequence_world(rng, paired=True)
    # held-out population z, OUT of every reference model; only non-members of θ are kept
    z_member, z_target, z_refs, _ = sequence_world(rng, references_train=False)
    z_target = np.where(z_member, np.nan, z_target)
    loss_auc = auc(member, target)
    assert loss_auc < 0.65
    # a tuned on the references; z have no IN reference, so online needs population_in
    online = rmia(target, refs, ref_in, target, refs, population_in=ref_in, online=True)
    offline = rmia(target, refs, ref_in, z_target, z_refs, online=False)
    assert auc(member, online) > loss_auc + 0.15
    assert auc(member, offline) > loss_auc + 0.15
    assert np.nanmin(online) >= 0 and np.nanmax(online) <= 1
    # the paper's image-classifier a = 0.3 would waste the references on token sequences
    assert auc(member, rmia(target, refs, ref_in, z_target, z_refs, online=False, offline_a=0.3)) < \
        auc(member, offline) - 0.1


def test_tune_offline_a_recovers_the_linear_relation_of_single_predictions():
    """Pr_IN = a·Pr_OUT + (1 - a) exactly (plus noise) for confidences in one label."""
    rng = np.random.default_rng(21)
    n, k, true_a = 2000, 8, 0.4
    p_out = rng.uniform(0.05, 0.95, n)
    ref_in = halves(rng, k, n)
    p = np.where(ref_in, true_a * p_out + 1 - true_a, p_out) * np.exp(rng.normal(0, 0.05, (k, n)))
    assert abs(tune_offline_a(np.log(np.minimum(p, 1.0)), ref_in) - true_a) <= 0.21


def test_tune_offline_a_prefers_one_for_token_sequences_and_defaults_without_in_models():
    rng = np.random.default_rng(22)
    _, _, refs, ref_in = sequence_world(rng, n=300)
    assert tune_offline_a(refs, ref_in) >= 0.9
    assert tune_offline_a(refs, np.zeros_like(ref_in)) == 1.0  # nothing to tune on
    assert tune_offline_a(refs[:1], ref_in[:1]) == 1.0


@pytest.mark.parametrize("attack", ["lira_online", "lira_offline", "rmia"])
def test_no_membership_signal_gives_chance_auc(attack):
    rng = np.random.default_rng(4)
    aucs = []
    for _ in range(20):
        member, target, shadow, shadow_in = gaussian_world(rng, n=200, n_models=8, delta=0.0)
        if attack == "rmia":
            score = rmia(target, shadow, shadow_in, target, shadow, population_in=shadow_in)
        else:
            score = lira(target, shadow, shadow_in, online=attack == "lira_online")
        aucs.append(auc(member, score))
    aucs = np.array(aucs)
    half_width = 3 * aucs.std(ddof=1) / math.sqrt(len(aucs))
    assert abs(aucs.mean() - 0.5) < half_width + 0.01
    assert np.all(np.abs(aucs - 0.5) < 0.15)


def test_online_lira_is_at_least_as_strong_as_offline_on_average():
    rng = np.random.default_rng(5)
    gaps = []
    for _ in range(10):
        member, target, shadow, shadow_in = gaussian_world(rng, n=300, n_models=16, heterogeneous=True)
        gaps.append(auc(member, lira(target, shadow, shadow_in, online=True))
                    - auc(member, lira(target, shadow, shadow_in, online=False)))
    assert np.mean(gaps) > 0


# --------------------------------------------------------------------------- LiRA against references

def lira_by_hand(target, shadow, shadow_in, online: bool) -> np.ndarray:
    """Per-record loop with per-record (ddof=1) variances; every record has ≥ 2 IN and OUT."""
    out = []
    for i in range(len(target)):
        ins, outs = shadow[shadow_in[:, i], i], shadow[~shadow_in[:, i], i]
        p_out = stats.norm(outs.mean(), outs.std(ddof=1))
        if online:
            p_in = stats.norm(ins.mean(), ins.std(ddof=1))
            out.append(p_in.logpdf(target[i]) - p_out.logpdf(target[i]))
        else:
            out.append(-math.log(p_out.sf(target[i])))
    return np.array(out)


@pytest.mark.parametrize("online", [True, False])
def test_per_record_lira_matches_a_slow_reference(online):
    rng = np.random.default_rng(6)
    member, target, shadow, shadow_in = gaussian_world(rng, n=40, n_models=64, delta=0.5)
    got = lira(target, shadow, shadow_in, online=online, global_variance=False)
    np.testing.assert_allclose(got, lira_by_hand(target, shadow, shadow_in, online), rtol=1e-7, atol=1e-9)
    # K = 64 is not below the threshold, so auto picks per-record variances
    np.testing.assert_array_equal(lira(target, shadow, shadow_in, online=online), got)


def test_global_and_per_record_variance_agree_when_variances_are_equal():
    """Every record's IN and OUT values are its mean ± 1: equal sample variances everywhere."""
    rng = np.random.default_rng(7)
    n = 50
    difficulty = rng.normal(0, 3, n)
    shadow_in = np.zeros((4, n), dtype=bool)
    shadow = np.zeros((4, n))
    for i in range(n):
        order = rng.permutation(4)
        shadow_in[order[:2], i] = True
        shadow[order, i] = difficulty[i] + np.array([1.0, 1.0, 0.0, 0.0]) + np.array([1.0, -1.0, 1.0, -1.0])
    target = difficulty + rng.normal(0.5, 1.0, n)
    for online in (True, False):
        pooled = lira(target, shadow, shadow_in, online=online, global_variance=True)
        per_record = lira(target, shadow, shadow_in, online=online, global_variance=False)
        np.testing.assert_allclose(pooled, per_record, rtol=1e-10)
        # K = 4 < 64, so auto pools
        np.testing.assert_array_equal(lira(target, shadow, shadow_in, online=online), pooled)


def test_pooled_variance_is_within_record_not_across_records():
    """The spread of difficulties (sd 100 here) must not leak into σ: scores stay sharp."""
    rng = np.random.default_rng(8)
    member, target, shadow, shadow_in = gaussian_world(rng, n=300, n_models=8, spread=100.0, noise=0.5)
    assert auc(member, lira(target, shadow, shadow_in, global_variance=True)) > 0.85


# --------------------------------------------------------------------------- LiRA fallbacks

def test_lira_records_without_in_or_out_shadows_are_still_scored():
    rng = np.random.default_rng(9)
    member, target, shadow, shadow_in = gaussian_world(rng, n=200, n_models=8)
    shadow_in[:, 0] = False        # record 0: only OUT shadows
    shadow_in[:, 1] = True         # record 1: only IN shadows
    shadow[:, 2] = np.nan          # record 2: no shadow value at all
    shadow[:3, 3] = np.nan         # record 3: some shadow values missing
    for online in (True, False):
        for pooled in (True, False):
            score = lira(target, shadow, shadow_in, online=online, global_variance=pooled)
            assert np.isfinite(score).all()
    # record 0 online: μ_in = μ_out + Δ̄, with Δ̄ the average shift of records that have both
    finite = np.isfinite(shadow)
    both = (shadow_in & finite).any(0) & (~shadow_in & finite).any(0)
    mu_in = np.array([shadow[shadow_in[:, i] & finite[:, i], i].mean() for i in np.flatnonzero(both)])
    mu_out = np.array([shadow[~shadow_in[:, i] & finite[:, i], i].mean() for i in np.flatnonzero(both)])
    shift = np.mean(mu_in - mu_out)
    s, m_out = target[0], shadow[:, 0].mean()
    sd_in, sd_out = [math.sqrt(v) for v in _pooled_by_hand(shadow, shadow_in)]
    expected = stats.norm(m_out + shift, sd_in).logpdf(s) - stats.norm(m_out, sd_out).logpdf(s)
    assert lira(target, shadow, shadow_in, global_variance=True)[0] == pytest.approx(expected, rel=1e-6)


def _pooled_by_hand(shadow, shadow_in) -> tuple[float, float]:
    variances = []
    for side in (shadow_in, ~shadow_in):
        squares, dof = 0.0, 0
        for i in range(shadow.shape[1]):
            values = shadow[side[:, i] & np.isfinite(shadow[:, i]), i]
            if values.size:
                squares += ((values - values.mean()) ** 2).sum()
                dof += values.size - 1
        variances.append(squares / dof)
    return variances[0], variances[1]


def test_offline_lira_works_with_out_only_shadows():
    rng = np.random.default_rng(10)
    member, target, shadow, shadow_in = gaussian_world(rng, n=300, n_models=8, shadows_train=False)
    score = lira(target, shadow, shadow_in, online=False)
    assert np.isfinite(score).all()
    assert auc(member, score) > auc(member, target) + 0.2


def test_two_complementary_shadows_still_give_a_variance():
    """K = 2 on complementary halves: one IN and one OUT value per record, no within-record df."""
    rng = np.random.default_rng(11)
    member, target, shadow, _ = gaussian_world(rng, n=300, n_models=2)
    first = rng.permutation(300) < 150
    shadow_in = np.stack([first, ~first])
    score = lira(target, shadow, shadow_in)
    assert np.isfinite(score).all()


def test_nan_target_statistic_is_nan_only_for_that_record():
    rng = np.random.default_rng(12)
    member, target, shadow, shadow_in = gaussian_world(rng, n=50, n_models=4)
    target[7] = np.nan
    score = lira(target, shadow, shadow_in)
    assert np.isnan(score[7]) and np.isfinite(np.delete(score, 7)).all()


# --------------------------------------------------------------------------- LiRA errors

def test_lira_needs_two_shadow_models():
    with pytest.raises(PrivtuneError, match=r"LiRA needs at least 2 shadow models, got K=1; set attacks\.shadow"):
        lira(np.zeros(3), np.zeros((1, 3)), np.array([[True, False, True]]))


@pytest.mark.parametrize("args, match", [
    ((np.zeros(3), np.zeros((2, 4)), np.zeros((2, 4), dtype=bool)), "target_stat has shape"),
    ((np.zeros(4), np.zeros((2, 4)), np.zeros((2, 3), dtype=bool)), "shadow_in has shape"),
    ((np.zeros(4), np.zeros(4), np.zeros(4, dtype=bool)), "must be 2-D"),
    ((np.zeros(4), np.zeros((2, 4)), np.full((2, 4), 0.5)), "True/False"),
    ((np.full(4, np.nan), np.zeros((2, 4)), np.eye(2, 4, dtype=bool)), "no finite value"),
])
def test_lira_rejects_bad_inputs(args, match):
    with pytest.raises(PrivtuneError, match=match):
        lira(*args)


def test_lira_rejects_impossible_memberships_and_options():
    stat, shadow = np.zeros(4), np.random.default_rng(0).normal(size=(3, 4))
    with pytest.raises(PrivtuneError, match="online LiRA needs"):
        lira(stat, shadow, np.zeros((3, 4), dtype=bool), online=True)
    with pytest.raises(PrivtuneError, match="leaves any record out"):
        lira(stat, shadow, np.ones((3, 4), dtype=bool), online=False)
    with pytest.raises(PrivtuneError, match="global_variance"):
        lira(stat, shadow, np.eye(3, 4, dtype=bool), global_variance="yes")
    # 0/1 integers are accepted as memberships
    assert np.isfinite(lira(stat, shadow, np.eye(3, 4, dtype=int) | np.eye(3, 4, k=1, dtype=int))).all()


# --------------------------------------------------------------------------- RMIA against a reference

def rmia_by_hand(target, refs, ref_in, z_target, z_refs, z_in, gamma, a, online=None):
    """Pairwise loop in probability space, the paper's formulas on single predictions,
    with one rule for every record: online only where every x and z has IN and OUT."""
    if online is None:
        online = all((inside & np.isfinite(values)).any() and (~inside & np.isfinite(values)).any()
                     for matrix, member in ((refs, ref_in), (z_refs, z_in))
                     for values, inside in zip(matrix.T, member.T) if np.isfinite(values).any())

    def pr_x(values, inside):
        p_in, p_out = np.exp(values[inside]), np.exp(values[~inside])
        if online:
            return (p_in.mean() + p_out.mean()) / 2
        if not p_out.size:  # offline needs an OUT reference
            return math.nan
        return (1 + a) / 2 * p_out.mean() + (1 - a) / 2

    lr_z = [math.exp(z_target[j]) / pr_x(z_refs[:, j], z_in[:, j]) for j in range(len(z_target))]
    lr_z = [lr for lr in lr_z if not math.isnan(lr)]
    scores = []
    for i in range(len(target)):
        lr_x = math.exp(target[i]) / pr_x(refs[:, i], ref_in[:, i])
        scores.append(math.nan if math.isnan(lr_x) else np.mean([lr_x / lr >= gamma for lr in lr_z]))
    return np.array(scores)


@pytest.mark.parametrize("online", [None, False])
@pytest.mark.parametrize("gamma, a", [(1.0, 0.3), (2.0, 0.0), (1.0, 1.0)])
@pytest.mark.parametrize("k", [2, 6])
def test_rmia_matches_the_pairwise_reference(online, gamma, a, k):
    rng = np.random.default_rng(13)
    n, m = 30, 25
    log_p = lambda shape: np.log(rng.uniform(0.05, 0.99, shape))  # single-prediction probabilities
    target, refs, ref_in = log_p(n), log_p((k, n)), halves(rng, k, n)
    if k > 2:  # every record IN one reference and OUT of another: the online rule applies
        ref_in[1] = ~ref_in[0]
    z_target, z_refs = log_p(m), log_p((k, m))
    z_in = np.zeros((k, m), dtype=bool)
    got = rmia(target, refs, ref_in, z_target, z_refs, gamma=gamma, offline_a=a, online=online)
    np.testing.assert_allclose(got, rmia_by_hand(target, refs, ref_in, z_target, z_refs, z_in, gamma, a, online))
    z_in = ref_in[:, :m]
    got = rmia(target, refs, ref_in, z_target, z_refs, gamma=gamma, offline_a=a, online=online, population_in=z_in)
    np.testing.assert_allclose(got, rmia_by_hand(target, refs, ref_in, z_target, z_refs, z_in, gamma, a, online))


def test_rmia_offline_rule_is_the_papers_at_record_level():
    """Pr(x) = ((1 + a)/2)·mean_OUT Pr(x|θ') + (1 − a)/2, on the record's probability."""
    a = 0.3
    refs = np.array([[-1.2], [-2.0], [-1.5]])
    member = np.array([[False], [True], [False]])  # the IN value plays no part offline
    ratio = rmia_log_ratio(np.array([-0.9]), refs, member, online=False, offline_a=a)
    p_out = (math.exp(-1.2) + math.exp(-1.5)) / 2
    assert ratio[0] == pytest.approx(-0.9 - math.log((1 + a) / 2 * p_out + (1 - a) / 2), rel=1e-12)
    online = rmia_log_ratio(np.array([-0.9]), refs, member, online=True)
    assert online[0] == pytest.approx(-0.9 - math.log((math.exp(-2.0) + p_out) / 2), rel=1e-12)


def test_a_records_score_does_not_depend_on_whether_it_lacks_an_in_shadow():
    """Two shadows on random halves leave a quarter of the records without an IN shadow;
    hiding every IN value (so that no record has one) changes no record's score."""
    rng = np.random.default_rng(23)
    member, target, refs, ref_in = sequence_world(rng, n=200, n_models=2)
    assert (~ref_in.any(axis=0)).sum() > 20 and ref_in.any(axis=0).sum() > 100
    kwargs = dict(offline_a=0.9)  # the audit's a; fixed, since tuning reads the IN values too
    scores = rmia(target, refs, ref_in, target, refs, population_in=ref_in, **kwargs)
    hidden = np.where(ref_in, np.nan, refs)
    np.testing.assert_array_equal(scores, rmia(target, hidden, ref_in, target, hidden, population_in=ref_in,
                                                **kwargs))
    # offline, a record that no shadow left out has no Pr_OUT: no score rather than a made-up one
    assert np.isnan(scores[ref_in.all(axis=0)]).all()
    assert np.isfinite(scores[~ref_in.all(axis=0)]).all()


def test_rmia_score_is_monotone_in_the_log_ratio():
    rng = np.random.default_rng(14)
    member, target, refs, ref_in = sequence_world(rng, n=200)
    score = rmia(target, refs, ref_in, target, refs, population_in=ref_in, gamma=1.5)
    ratio = rmia_log_ratio(target, refs, ref_in)
    keep = np.isfinite(ratio)
    assert (np.diff(score[keep][np.argsort(ratio[keep])]) >= 0).all()


def test_rmia_nan_likelihoods_are_skipped_or_kept_nan():
    rng = np.random.default_rng(15)
    member, target, refs, ref_in = sequence_world(rng, n=60)
    target[3] = np.nan                 # a target with no tokens: NaN score
    refs[:, 4] = np.nan                # no reference value: NaN score
    refs[0, 5] = np.nan                # one missing reference value: still scored
    ref_in[:, 6] = True                # only IN references: no Pr_OUT, NaN under the offline rule
    ref_in[:, 7] = False               # only OUT references: still scored
    z_target = target.copy()           # NaN z are skipped
    score = rmia(target, refs, ref_in, z_target, refs, population_in=ref_in)
    assert np.isnan(score[[3, 4, 6]]).all()
    assert np.isfinite(np.delete(score, [3, 4, 6])).all()


# --------------------------------------------------------------------------- RMIA errors

def test_rmia_refuses_the_offline_rule_on_whole_sequence_likelihoods():
    rng = np.random.default_rng(16)
    member, target, refs, ref_in = sequence_world(rng, n=50)
    total, total_refs = 30 * target, 30 * refs  # summed over 30 tokens, not a mean
    with pytest.raises(PrivtuneError, match="whole-sequence likelihoods"):
        rmia(total, total_refs, ref_in, total, total_refs, offline_a=0.3)
    has_out = ~ref_in.all(axis=0)
    # a tuned a is whatever scored best on the references: no guard
    assert np.isfinite(rmia(total, total_refs, ref_in, total, total_refs, online=False)[has_out]).all()
    # fine on mean log-probabilities, or with a = 1
    assert np.isfinite(rmia(target, refs, ref_in, target, refs, online=False, offline_a=0.3)[has_out]).all()
    assert np.isfinite(rmia(total, total_refs, ref_in, total, total_refs, offline_a=1.0, online=False)[has_out]).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(gamma=0.0), "gamma must be a positive"),
    (dict(gamma=float("nan")), "gamma must be a positive"),
    (dict(offline_a=1.5), "offline_a must lie in"),
    (dict(online=True), "online RMIA needs an IN and an OUT reference for every target record"),
    (dict(population_in=np.zeros((3, 5), dtype=bool)), "population_in has shape"),
])
def test_rmia_rejects_bad_settings(kwargs, match):
    rng = np.random.default_rng(17)
    target, refs = np.log(rng.uniform(0.1, 1, 5)), np.log(rng.uniform(0.1, 1, (2, 5)))
    ref_in = np.array([[True, True, False, False, True], [False, True, True, False, False]])
    with pytest.raises(PrivtuneError, match=match):
        rmia(target, refs, ref_in, target, refs, **kwargs)


def test_rmia_rejects_mismatched_shapes_and_empty_populations():
    rng = np.random.default_rng(18)
    target, refs, ref_in = np.log(rng.uniform(0.1, 1, 5)), np.log(rng.uniform(0.1, 1, (2, 5))), halves(rng, 2, 5)
    with pytest.raises(PrivtuneError, match="same reference models"):
        rmia(target, refs, ref_in, target, refs[:1])
    with pytest.raises(PrivtuneError, match="target_loglik has shape"):
        rmia(target[:4], refs, ref_in, target, refs)
    with pytest.raises(PrivtuneError, match="at least one population sample"):
        rmia(target, refs, ref_in, np.zeros(0), np.zeros((2, 0)))
    with pytest.raises(PrivtuneError, match="no population sample has a finite"):
        rmia(target, refs, ref_in, np.full(5, np.nan), refs)
    with pytest.raises(PrivtuneError, match="at least 1 reference model"):
        rmia(target, np.zeros((0, 5)), np.zeros((0, 5), dtype=bool), target, np.zeros((0, 5)))


# --------------------------------------------------------------------------- end to end on tiny models

def tiny_records(n: int) -> list[Record]:
    rng = np.random.default_rng(19)
    records = []
    for i in range(n):
        name = f"Alex {chr(65 + i)}{chr(97 + (i * 7) % 26)}rn"
        phone = "".join(str(d) for d in rng.integers(0, 10, 9))
        text = f"Customer {name} called from {phone} about order {100 + i}."
        start = text.index(name)
        spans = [Span(start, start + len(name), "NAME"), Span(text.index(phone), text.index(phone) + 9, "PHONE")]
        records.append(Record(id=str(i), individual=f"p{i}", text=text, spans=spans))
    return records


def train_tiny(data, rows: np.ndarray, seed: int, steps: int = 12) -> torch.nn.Module:
    model = tiny_model("llama", seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    part = data.subset(np.flatnonzero(rows).tolist())
    model.train()
    for _ in range(steps):
        logits = model(input_ids=part.input_ids, attention_mask=part.attention_mask).logits
        loss = per_record_loss(logits, part.labels).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.fixture
def one_thread():
    """Tiny models train ~100x faster on one thread than on two busy shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_end_to_end_on_tiny_shadow_models(one_thread):
    torch.manual_seed(0)
    data = encode_records(tiny_records(16), tiny_tokenizer(), max_length=40)
    runtime = Runtime(torch.device("cpu"), "fp32")
    rng = np.random.default_rng(20)
    shadow_in = halves(rng, 4, 16)
    target_in = np.arange(16) < 8
    scores = [score_tokens(train_tiny(data, rows, seed=k), data, runtime)
              for k, rows in enumerate([target_in, *shadow_in])]
    for level in ("valid", "sensitive"):
        stat = np.stack([record_statistic(s, getattr(s, level)) for s in scores])
        loglik = np.stack([sequence_loglik(s, getattr(s, level)) for s in scores])
        assert stat.shape == loglik.shape == (5, 16)
        assert np.isfinite(stat).all() and np.isfinite(loglik).all()
        mean_log_prob = loglik / getattr(scores[0], level).sum(1)
        has_out = (~shadow_in).any(axis=0)
        for online in (True, False):
            lira_score = lira(stat[0], stat[1:], shadow_in, online=online)
            assert lira_score.shape == (16,) and np.isfinite(lira_score).all()
        rmia_score = rmia(mean_log_prob[0], mean_log_prob[1:], shadow_in, mean_log_prob[0], mean_log_prob[1:],
                          population_in=shadow_in)
        assert rmia_score.shape == (16,) and np.isfinite(rmia_score[has_out]).all()
        assert ((rmia_score[has_out] >= 0) & (rmia_score[has_out] <= 1)).all()


def test_study_rmia_uses_the_mean_token_log_probability_and_one_rule():
    """The study feeds RMIA each record's summed log-likelihood over its token count (the
    authors' geometric-mean signal); with two shadows some records lack an IN shadow, so
    the offline rule scores all of them, and the entry says so."""
    from privtune.config import parse_config
    from privtune.study.shadow_attacks import shadow_attack_entries

    rng = np.random.default_rng(24)
    member, target, refs, ref_in = sequence_world(rng, n=80, n_models=2, delta=0.3)
    tokens = rng.integers(5, 40, 80)

    def stats(mean_log_prob):
        level = {"stat": list(mean_log_prob), "loglik": list(mean_log_prob * tokens), "tokens": list(tokens)}
        return {"record": level, "sensitive": level, "n_members": int(member.sum())}

    order = np.argsort(~member, kind="stable")  # the study lists members first
    target, refs, ref_in, member = target[order], refs[:, order], ref_in[:, order], member[order]
    cfg = parse_config({"methods": [{"method": "fft"}], "attacks": {"mia": {"levels": ["record"]}}})
    shadows = [{"record_stats": stats(refs[k]), "shadow_in": ref_in[k].tolist()} for k in range(2)]
    (entry,) = [e for e in shadow_attack_entries(cfg, {"record_stats": stats(target)}, shadows)
                if e["attack"] == "rmia"]
    tuned = tune_offline_a(refs, ref_in)
    by_hand = rmia_by_hand(target, refs, ref_in, target, refs, ref_in, 1.0, tuned)
    keep = np.isfinite(by_hand)
    assert entry["rule"] == "offline" and entry["unscored"] == int((~keep).sum()) == int(ref_in.all(0).sum())
    assert entry["auc"] == pytest.approx(roc_auc_score(member[keep], by_hand[keep]))


def test_shadow_audit_is_the_clopper_pearson_bound_on_base_calibrated_shadow_statistics():
    from privtune.auditing.multi_run import clopper_pearson_epsilon
    from privtune.study.shadow_attacks import add_shadow_attacks, shadow_audit

    rng = np.random.default_rng(31)
    k, n = 8, 120
    difficulty = rng.normal(0, 2, n)
    shadow_in = halves(rng, k, n)
    level = lambda stat: {"stat": list(stat), "loglik": list(stat), "tokens": [10] * n}  # noqa: E731

    def world(shift):
        stats = difficulty + shift * shadow_in + rng.normal(0, 0.3, (k, n))
        shadows = [{"run_id": f"s{i}", "role": "shadow", "status": "done", "label": f"shadow-{i}", "config": {"method": {"method": "fft"}},
                    "record_stats": {"record": level(stats[i]), "sensitive": level(stats[i]), "n_members": n // 2},
                    "shadow_in": shadow_in[i].tolist()} for i in range(k)]
        base = {"record_stats": {"record": level(difficulty), "sensitive": level(difficulty), "n_members": n // 2}}
        return stats, shadows, base

    stats, shadows, base = world(shift=2.0)
    got = shadow_audit(shadows, base, {"delta": 1e-5, "epsilon": 8.0}, seed=0)
    scores = stats - difficulty[None, :]
    want = clopper_pearson_epsilon(scores[shadow_in], scores[~shadow_in], delta=1e-5, seed=0)
    assert got["lower_bound"] == pytest.approx(want.lower_bound) and got["lower_bound"] > 1.0
    assert got["claimed_epsilon"] == 8.0 and got["shadow_models"] == k and "approximate" in got["caveat"]
    _, blind, base = world(shift=0.0)
    assert shadow_audit(blind, base, None, seed=0)["lower_bound"] < 0.3  # no signal, (almost) no bound

    class Store:  # what add_shadow_attacks reads and writes
        def __init__(self, runs):
            self.rows, self.updated = runs, {}

        def runs(self, name, roles=None):
            return [r for r in self.rows if roles is None or r["role"] in roles]

        def update_result(self, run_id, result):
            self.updated[run_id] = result

    from privtune.config import parse_config
    cfg = parse_config({"methods": [{"method": "fft"}, {"method": "lora"}],
                        "attacks": {"mia": {"levels": ["record"]}, "shadow": {"models": k}}})
    stats_of = lambda: {**base["record_stats"], "n_members": n // 2}  # noqa: E731
    runs = shadows + [
        {"run_id": "b", "role": "base", "status": "done", "label": "base", "config": {}, "record_stats": stats_of()},
        {"run_id": "f", "role": "target", "status": "done", "label": "fft", "config": {"method": {"method": "fft"}},
         "dp": None, "record_stats": stats_of()},
        {"run_id": "l", "role": "target", "status": "done", "label": "lora", "config": {"method": {"method": "lora"}},
         "dp": None, "record_stats": stats_of()}]
    for r in runs:
        r["digests"] = {"data": "d"}
    store = Store(runs)
    add_shadow_attacks(cfg, store, "d")
    assert "empirical_epsilon_multi_run" in store.updated["f"]
    assert "empirical_epsilon_multi_run" not in store.updated["l"]  # only the method the shadows replicate
    from privtune.report.audit import audit_section, csv_cells, csv_columns

    fft = {**runs[-2], **store.updated["f"]}
    assert "Multi-run audit from the shadow models" in audit_section([fft])
    assert csv_columns([fft]) == ["empirical_epsilon_multi_run_lower_bound"]
    assert csv_cells(fft)["empirical_epsilon_multi_run_lower_bound"] == fft["empirical_epsilon_multi_run"]["lower_bound"]
