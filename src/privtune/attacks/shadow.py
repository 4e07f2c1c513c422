"""Shadow-model membership inference: LiRA (online / offline) and RMIA.

- LiRA: Carlini et al., "Membership Inference Attacks From First Principles"
  (IEEE S&P 2022, https://arxiv.org/abs/2112.03570).
- RMIA: Zarifzadeh et al., "Low-Cost High-Power Membership Inference Attacks"
  (ICML 2024, https://arxiv.org/abs/2312.03262).

Both calibrate per record: a record that every model finds easy (a short greeting) has a
low loss whether or not it was trained on, so a global loss threshold confuses "easy"
with "member". Shadow (reference) models, each trained on a random half of the
population, show how the record's statistic is distributed when it is IN and when it is
OUT of training; the target model's value is then judged against those.

This module is the maths only (numpy/scipy) on per-record arrays the study computes once
per model from the per-token cache (:class:`~privtune.measures.token_scores.TokenScores`):
``record_statistic`` for LiRA, ``sequence_loglik`` for RMIA. No library implements these
attacks on precomputed LM statistics (ml_privacy_meter and the papers' code are tied to
their own image-classifier pipelines), hence written here.

RMIA follows the paper's rules at record level, with the authors' own signal for a text
(its geometric-mean token probability, see :func:`rmia`) and one rule for every record;
its offline parameter a is tuned on the reference models, as the paper does, rather than
fixed at the 0.3 made for image classifiers (:data:`DEFAULT_OFFLINE_A`).

Conventions shared by every function:

- shapes: N target records, K shadow/reference models, M population samples;
  ``*_in[k, i]`` is True when model k trained on record i;
- higher score = more likely a member;
- a record with no usable positions (e.g. no sensitive token at the "sensitive" level)
  has a NaN statistic; its score is NaN and only its score: drop NaN scores before
  computing a ROC. NaN shadow values are treated as missing, not propagated.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score

from privtune.errors import PrivtuneError
from privtune.measures.token_scores import TokenScores

GLOBAL_VARIANCE_BELOW_K = 64
"""``global_variance=None`` pools the variance when K is below this (Carlini et al. §5:
per-example variances need many shadow models; with few, a global one is better)."""

_MIN_VARIANCE = 1e-12
_MIN_LOG_PROB_STEP = 1e-12  # smallest mean NLL, so a perfect record maps to a finite logit


# --------------------------------------------------------------------------- statistics

def _check_positions(scores: TokenScores, positions: np.ndarray) -> np.ndarray:
    positions = np.asarray(positions)
    if positions.shape != scores.nll.shape:
        raise PrivtuneError(f"positions have shape {positions.shape} but the token scores have shape "
                            f"{scores.nll.shape}", "pass scores.valid, scores.sensitive or a mask of that shape")
    if positions.dtype != bool:
        raise PrivtuneError(f"positions must be a boolean mask, got dtype {positions.dtype}",
                            "pass scores.valid, scores.sensitive or another bool array")
    if (positions & ~scores.valid.astype(bool)).any():
        raise PrivtuneError("positions include padding (positions where scores.valid is False)",
                            "restrict the mask to real tokens, e.g. mask & scores.valid")
    return positions


def record_statistic(scores: TokenScores, positions: np.ndarray) -> np.ndarray:
    """LiRA's per-record statistic: the logit of the geometric-mean token probability.

    Carlini et al. (§4) model ``φ(p) = log(p / (1 - p))`` of the model's confidence as
    Gaussian. For a sequence we take ``p̄ = exp(-ℓ̄)``, where ``ℓ̄`` is the record's mean
    token NLL over ``positions`` (its loss, exactly what training minimises), so

        stat = log p̄ - log(1 - p̄) = -ℓ̄ - log(1 - exp(-ℓ̄)).

    Why this rather than the arithmetic mean of token probabilities: ``p̄`` is a strictly
    decreasing function of the record's loss, so the statistic orders records exactly as
    the loss attack does and LiRA differs from it only by calibration; the arithmetic
    mean is dominated by a few easy tokens and is not monotone in the loss. Why the logit:
    well-memorised records have ``ℓ̄ → 0`` where the mean log-likelihood bunches up; the
    logit stretches that end (``-log ℓ̄`` as ``ℓ̄ → 0``), the same reason the paper applies
    it, and it is ``≈ -ℓ̄`` for hard records, where ``-ℓ̄`` is already close to Gaussian.

    Args:
        scores: the per-token cache of one model on one dataset.
        positions: (N, L-1) bool, the target positions to average over (``scores.valid``
            for the record level, ``scores.sensitive`` for the sensitive level).

    Returns:
        (N,) float64; NaN for a record with no position.

    Raises:
        PrivtuneError: ``positions`` has the wrong shape or dtype, or covers padding.
    """
    positions = _check_positions(scores, positions)
    mean_nll = scores.record_mean(positions).astype(np.float64)
    mean_nll = np.maximum(mean_nll, _MIN_LOG_PROB_STEP)  # NaN stays NaN
    return -mean_nll - np.log(-np.expm1(-mean_nll))


def sequence_loglik(scores: TokenScores, positions: np.ndarray) -> np.ndarray:
    """The summed token log-probability over ``positions``: log of the sequence's probability.

    Returns (N,) float64 in nats; NaN (not 0) for a record with no position, since an
    empty sum would read as probability 1, the most member-like value there is. Divided
    by the token count ``positions.sum(1)`` it is RMIA's per-record signal (see :func:`rmia`).
    """
    positions = _check_positions(scores, positions)
    total = -np.where(positions, scores.nll, 0.0).astype(np.float64).sum(axis=1)
    return np.where(positions.any(axis=1), total, np.nan)


# --------------------------------------------------------------------------- validation

def _as_membership(name: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    value = np.asarray(value)
    if value.shape != shape:
        raise PrivtuneError(f"{name} has shape {value.shape}, expected {shape} (models × records)",
                            f"pass one row per model and one column per record in {name}")
    if value.dtype != bool:
        if not np.isin(value, (0, 1)).all():
            raise PrivtuneError(f"{name} must hold True/False (or 0/1), got dtype {value.dtype}",
                                f"pass {name} as a bool array: True where the model trained on the record")
        value = value.astype(bool)
    return value


def _as_matrix(name: str, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value, dtype=np.float64)
    if value.ndim != 2:
        raise PrivtuneError(f"{name} must be 2-D (models × records), got shape {value.shape}",
                            f"stack one row per model into {name}")
    return value


def _as_vector(name: str, value: np.ndarray, length: int, what: str) -> np.ndarray:
    value = np.asarray(value, dtype=np.float64)
    if value.shape != (length,):
        raise PrivtuneError(f"{name} has shape {value.shape}, expected ({length},) to match {what}",
                            f"pass one value per record in {name}, in the same order")
    return value


def _check_some_finite(name: str, value: np.ndarray) -> None:
    if not np.isfinite(value).any():
        raise PrivtuneError(f"{name} holds no finite value, so no record can be scored",
                            "check that the records have tokens at this level (e.g. any sensitive token)")


# --------------------------------------------------------------------------- LiRA

def _group_means(stats_: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-record count and mean of ``stats_`` over ``mask`` (NaN mean where count is 0)."""
    count = mask.sum(axis=0)
    total = np.where(mask, stats_, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return count, np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _pooled_variance(stats_: np.ndarray, mask: np.ndarray, mean: np.ndarray) -> float | None:
    """Within-record variance pooled over records: Σ(x - μ_i)² / Σ(n_i - 1); None if no df.

    Deliberately *within* record: the variance of all values together would add the
    spread of difficulty across records, exactly what calibration is there to remove.
    """
    count = mask.sum(axis=0)
    dof = int(np.maximum(count - 1, 0).sum())
    if dof == 0:
        return None
    squares = np.where(mask, (stats_ - np.where(np.isnan(mean), 0.0, mean)) ** 2, 0.0).sum()
    return float(squares) / dof


def _global_variances(stats_, in_mask, out_mask, mu_in, mu_out) -> tuple[float, float]:
    """Pooled IN and OUT variances, each falling back on the other, then on IN−OUT pairs.

    With K = 2 and complementary halves every record has one IN and one OUT value, so no
    within-record variance exists; then Var(x_in - x_out)/2 across records estimates the
    noise (an upper bound, since it also holds any spread of the IN−OUT shift), and as a
    last resort the variance of all values.
    """
    var_in = _pooled_variance(stats_, in_mask, mu_in)
    var_out = _pooled_variance(stats_, out_mask, mu_out)
    if var_in is None and var_out is None:
        both = ~np.isnan(mu_in) & ~np.isnan(mu_out)
        diffs = (mu_in - mu_out)[both]
        if diffs.size >= 2:
            var_in = var_out = float(np.var(diffs, ddof=1)) / 2
        else:
            var_in = var_out = float(np.nanvar(np.where(in_mask | out_mask, stats_, np.nan)))
    var_in = var_out if var_in is None else var_in
    var_out = var_in if var_out is None else var_out
    return max(var_in, _MIN_VARIANCE), max(var_out, _MIN_VARIANCE)


def _per_record_variance(stats_, mask, mean, fallback: float) -> np.ndarray:
    """Sample variance (ddof=1) per record; ``fallback`` where a record has < 2 values."""
    count = mask.sum(axis=0)
    squares = np.where(mask, (stats_ - np.where(np.isnan(mean), 0.0, mean)) ** 2, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(count >= 2, squares / np.maximum(count - 1, 1), fallback)
    return np.maximum(var, _MIN_VARIANCE)


def _fill_missing_means(mu_in: np.ndarray, mu_out: np.ndarray, stats_, in_mask, out_mask
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Fill the IN/OUT mean of records that lack IN (or OUT) shadows.

    A record with only OUT shadows gets ``μ_in = μ_out + Δ̄`` (and vice versa), where Δ̄
    is the average IN−OUT shift of the records that have both: it keeps the record's
    own calibration and borrows only the typical memorisation effect. A record with no
    shadow value at all gets the global IN/OUT means: it is scored like a global
    threshold attack, uncalibrated but not lost.
    """
    both = ~np.isnan(mu_in) & ~np.isnan(mu_out)
    global_in = float(stats_[in_mask].mean()) if in_mask.any() else np.nan
    global_out = float(stats_[out_mask].mean()) if out_mask.any() else np.nan
    shift = float(np.mean(mu_in[both] - mu_out[both])) if both.any() else global_in - global_out
    if np.isnan(shift):  # only one side exists anywhere (offline with OUT-only shadows)
        shift = 0.0
    none = np.isnan(mu_in) & np.isnan(mu_out)
    mu_in = np.where(none, global_in, mu_in)
    mu_out = np.where(none, global_out, mu_out)
    mu_in = np.where(np.isnan(mu_in), mu_out + shift, mu_in)
    mu_out = np.where(np.isnan(mu_out), mu_in - shift, mu_out)
    return mu_in, mu_out


def lira(target_stat: np.ndarray, shadow_stats: np.ndarray, shadow_in: np.ndarray, *,
         online: bool = True, global_variance: bool | None = None) -> np.ndarray:
    """LiRA scores of the target model's records (Carlini et al. 2022, §4).

    For each record i, fit Gaussians to its shadow statistics: ``N(μ_in_i, σ_in²)`` over
    the shadows that trained on it and ``N(μ_out_i, σ_out²)`` over those that did not.

    - online: ``log N(s; μ_in, σ_in²) - log N(s; μ_out, σ_out²)`` (the likelihood ratio);
    - offline: ``-log Pr[Z ≥ s]`` for ``Z ~ N(μ_out, σ_out²)``: the paper's one-sided test
      ``1 - Pr[Z > s]`` made readable at the far tail (same ordering, no saturation at 1,
      which matters for TPR at 0.1% FPR).

    Variances: per record (``global_variance=False``) needs many shadows, pooled over
    records (``True``) is better with few; ``None`` picks pooled when K < 64. The pooled
    variance is within-record (see :func:`_pooled_variance`). A record with fewer than
    two IN (or OUT) values uses the pooled variance even in per-record mode.

    Fallbacks (never a crash, never NaN beyond records whose own target statistic is
    NaN): a record without IN shadows gets ``μ_in = μ_out + Δ̄``, one without OUT shadows
    ``μ_out = μ_in - Δ̄`` (Δ̄: the mean IN−OUT shift over records that have both); a
    record without any shadow value is scored against the global IN/OUT means.

    Args:
        target_stat: (N,) :func:`record_statistic` of the target model.
        shadow_stats: (K, N) the same statistic under each shadow model.
        shadow_in: (K, N) bool, True where shadow k trained on record i.
        online: use the IN distribution too (stronger, needs IN shadows).
        global_variance: pooled (True) or per-record (False) variance; None = auto.

    Returns:
        (N,) float64 scores, higher = more likely a member.

    Raises:
        PrivtuneError: K < 2, shapes disagree, memberships are not boolean, no finite
        target statistic, no shadow leaves any record out, or (online) no shadow trained
        on any record.
    """
    shadow_stats = _as_matrix("shadow_stats", shadow_stats)
    n_models, n_records = shadow_stats.shape
    if n_models < 2:
        raise PrivtuneError(f"LiRA needs at least 2 shadow models, got K={n_models}",
                            "set attacks.shadow.models to 2 or more (more is better; the paper uses 64+)")
    shadow_in = _as_membership("shadow_in", shadow_in, shadow_stats.shape)
    target_stat = _as_vector("target_stat", target_stat, n_records, "the columns of shadow_stats")
    _check_some_finite("target_stat", target_stat)
    if global_variance not in (None, True, False):
        raise PrivtuneError(f"global_variance must be True, False or None, got {global_variance!r}",
                            "pass None to pool the variance automatically when K < 64")

    finite = np.isfinite(shadow_stats)
    in_mask, out_mask = shadow_in & finite, ~shadow_in & finite
    if not out_mask.any():
        raise PrivtuneError("no shadow model leaves any record out, so there is no OUT distribution",
                            "train each shadow model on a random half of the population")
    if online and not in_mask.any():
        raise PrivtuneError("online LiRA needs shadow models trained on the target records, but none is",
                            "use online=False (offline LiRA) or train shadows on halves of the population")

    _, mu_in = _group_means(shadow_stats, in_mask)
    _, mu_out = _group_means(shadow_stats, out_mask)
    var_in, var_out = _global_variances(shadow_stats, in_mask, out_mask, mu_in, mu_out)
    pooled = n_models < GLOBAL_VARIANCE_BELOW_K if global_variance is None else global_variance
    if pooled:
        var_in_i, var_out_i = np.full(n_records, var_in), np.full(n_records, var_out)
    else:
        var_in_i = _per_record_variance(shadow_stats, in_mask, mu_in, var_in)
        var_out_i = _per_record_variance(shadow_stats, out_mask, mu_out, var_out)
    mu_in, mu_out = _fill_missing_means(mu_in, mu_out, shadow_stats, in_mask, out_mask)

    sd_out = np.sqrt(var_out_i)
    if not online:
        return -stats.norm.logsf(target_stat, loc=mu_out, scale=sd_out)
    return (stats.norm.logpdf(target_stat, loc=mu_in, scale=np.sqrt(var_in_i))
            - stats.norm.logpdf(target_stat, loc=mu_out, scale=sd_out))


# --------------------------------------------------------------------------- RMIA

def _log_mean_exp(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """log of the mean of exp(values) over ``mask`` per column; NaN where none is selected."""
    count = mask.sum(axis=0)
    masked = np.where(mask, values, -np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        total = logsumexp(masked, axis=0)
        return np.where(count > 0, total - np.log(np.maximum(count, 1)), np.nan)


def _references_per_record(logliks: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per record: whether it has any reference value, an IN one, an OUT one (finite only)."""
    finite = np.isfinite(logliks)
    return finite.any(axis=0), (member & finite).any(axis=0), (~member & finite).any(axis=0)


def online_possible(reference_logliks: np.ndarray, reference_in: np.ndarray) -> bool:
    """True when every record with a reference value has both an IN and an OUT one.

    Only then can the online rule score *every* record; otherwise :func:`rmia` (with
    ``online=None``) uses the offline rule for all, so that no record's score depends on
    whether it happens to lack an IN reference.
    """
    reference_logliks = _as_matrix("reference_logliks", reference_logliks)
    reference_in = _as_membership("reference_in", reference_in, reference_logliks.shape)
    scored, has_in, has_out = _references_per_record(reference_logliks, reference_in)
    return bool((has_in & has_out)[scored].all())


def _log_px(logliks: np.ndarray, member: np.ndarray, *, online: bool, offline_a: float) -> np.ndarray:
    """log Pr(x), the record's probability averaged over reference models (§3 of the paper).

    - online: ``½(mean_IN Pr(x|θ') + mean_OUT Pr(x|θ'))``, balanced so that an uneven
      split of few models does not tilt it; every record must have both.
    - offline: ``((1 + a)/2)·mean_OUT Pr(x|θ') + (1 - a)/2``, the paper's rule, from
      ``Pr_IN ≈ a·Pr_OUT + (1 - a)`` and ``Pr(x) = ½(Pr_IN + Pr_OUT)``. A record no
      reference left out has no Pr_OUT: NaN (it cannot be scored offline).
    """
    finite = np.isfinite(logliks)
    lme_out = _log_mean_exp(logliks, ~member & finite)
    with np.errstate(invalid="ignore", divide="ignore"):
        if online:
            return np.logaddexp(_log_mean_exp(logliks, member & finite), lme_out) - math.log(2)
        if offline_a >= 1:
            return lme_out
        return np.logaddexp(math.log((1 + offline_a) / 2) + lme_out, math.log((1 - offline_a) / 2))


def _log_ratio(target, logliks, member, *, online: bool, offline_a: float) -> np.ndarray:
    return target - _log_px(logliks, member, online=online, offline_a=offline_a)


DEFAULT_OFFLINE_A = 1.0
"""a when it cannot be tuned (no reference trained on any record, or one reference).
The paper's 0.3 suits a classifier's confidence in one label, which training pushes
towards 1; an LM's mean token probability moves by a *factor* when trained on
(Pr_IN ≈ c·Pr_OUT), under which Pr(x) ∝ Pr_OUT(x), i.e. a = 1 ranks exactly right.
Measured on the synthetic texts of ``tests/test_shadow.py`` (seed 2, 8 references), offline
RMIA's AUC went 0.51 / 0.55 / 0.72 / 0.84 for a = 0.3 / 0.9 / 0.99 / 1 (loss attack 0.50,
online 0.85), and tuning picked 1."""

OFFLINE_A_GRID = tuple(np.round(np.linspace(0.0, 1.0, 11), 1))


def tune_offline_a(reference_logliks: np.ndarray, reference_in: np.ndarray, *, max_pseudo_targets: int = 4) -> float:
    """The paper's tuning of a: attack reference models whose membership is known.

    Each of up to ``max_pseudo_targets`` reference models plays the target, the other
    references serve as references (offline rule: their OUT values only), and the a in
    {0, 0.1, ..., 1} with the best mean AUC wins, as the authors' code does
    (ml_privacy_meter's ``tune_offline_a``, which attacks a paired reference model over
    the same grid). No target label is used. With a fixed γ the RMIA score ranks like the
    likelihood ratio, so the AUC needs no population samples. Returns
    :data:`DEFAULT_OFFLINE_A` when no reference model has both IN and OUT records, or
    there is only one reference.
    """
    reference_logliks = _as_matrix("reference_logliks", reference_logliks)
    reference_in = _as_membership("reference_in", reference_in, reference_logliks.shape)
    n_models = reference_logliks.shape[0]
    pseudo = [k for k in range(n_models)
              if reference_in[k].any() and (~reference_in[k]).any()][:max_pseudo_targets]
    if n_models < 2 or not pseudo:
        return DEFAULT_OFFLINE_A
    mean_auc = []
    for a in OFFLINE_A_GRID:
        aucs = []
        for k in pseudo:
            rest = np.arange(n_models) != k
            ratio = _log_ratio(reference_logliks[k], reference_logliks[rest], reference_in[rest],
                               online=False, offline_a=float(a))
            keep = np.isfinite(ratio)
            labels = reference_in[k][keep]
            if labels.all() or not labels.any():
                continue
            aucs.append(roc_auc_score(labels, ratio[keep]))
        mean_auc.append(np.mean(aucs) if aucs else -np.inf)
    if not np.isfinite(max(mean_auc)):
        return DEFAULT_OFFLINE_A
    return float(OFFLINE_A_GRID[int(np.argmax(mean_auc))])


def _check_offline_a(offline_a: float) -> None:
    if not 0.0 <= offline_a <= 1.0:
        raise PrivtuneError(f"offline_a must lie in [0, 1], got {offline_a}",
                            "pass None to tune it on the reference models, or 1 to take Pr(x) from OUT models")


def _check_approximation_scale(logliks, member, offline_a: float) -> None:
    """Refuse the offline rule on values that look like whole-sequence likelihoods.

    The rule is made for the probability of one prediction; when log Pr_OUT(x) is far
    below log((1-a)/(1+a)) for the typical record, Pr(x) is the constant (1-a)/2 and
    RMIA silently degrades to the uncalibrated likelihood attack.
    """
    if offline_a >= 1:
        return
    lme_out = _log_mean_exp(logliks, ~member & np.isfinite(logliks))
    lme_out = lme_out[np.isfinite(lme_out)]
    if lme_out.size and np.median(lme_out) < math.log((1 - offline_a) / (1 + offline_a)) - 10:
        raise PrivtuneError("offline RMIA's rule needs the probability of one prediction per record, but these "
                            "look like whole-sequence likelihoods, whose scale its constant term swamps",
                            "pass the mean token log-probability (log-likelihood / token count), or offline_a=1")


_TARGET = ("target_loglik", "reference_logliks", "reference_in", "target record")
_POPULATION = ("population_target", "population_reference", "population_in", "population sample")


def _ratio(names: tuple[str, str, str, str], target, logliks, member, *, online: bool, offline_a: float,
           guard: bool) -> np.ndarray:
    """Check one set of records (targets or population samples) and take its log ratio."""
    target_name, logliks_name, member_name, what = names
    logliks = _as_matrix(logliks_name, logliks)
    member = _as_membership(member_name, member, logliks.shape)
    target = _as_vector(target_name, target, logliks.shape[1], f"the columns of {logliks_name}")
    if online and not online_possible(logliks, member):
        raise PrivtuneError(f"online RMIA needs an IN and an OUT reference for every {what}, but some lack one",
                            "use online=None (then the offline rule scores every record) or online=False")
    if guard and not online:
        _check_approximation_scale(logliks, member, offline_a)
    return _log_ratio(target, logliks, member, online=online, offline_a=offline_a)


def rmia_log_ratio(target_loglik: np.ndarray, reference_logliks: np.ndarray, reference_in: np.ndarray, *,
                   online: bool | None = None, offline_a: float | None = None) -> np.ndarray:
    """``log Pr(x|θ) - log Pr(x)``: RMIA's likelihood ratio of each record, in log space.

    Same arguments as :func:`rmia` for the target records. With a fixed γ, :func:`rmia`'s
    score is a non-decreasing function of this ratio, so ranking by it gives the same ROC
    without the ties of a fraction over M population samples (useful at tiny FPRs).
    """
    guard = offline_a is not None
    if offline_a is None:
        offline_a = tune_offline_a(reference_logliks, reference_in)
    _check_offline_a(offline_a)
    if online is None:
        online = online_possible(reference_logliks, reference_in)
    return _ratio(_TARGET, target_loglik, reference_logliks, reference_in, online=online, offline_a=offline_a,
                  guard=guard)


def rmia(target_loglik: np.ndarray, reference_logliks: np.ndarray, reference_in: np.ndarray,
         population_target: np.ndarray, population_reference: np.ndarray, *,
         gamma: float = 1.0, offline_a: float | None = None, online: bool | None = None,
         population_in: np.ndarray | None = None) -> np.ndarray:
    """RMIA scores of the target model's records (Zarifzadeh et al. 2024).

    ``LR(x) = Pr(x|θ) / Pr(x)`` with Pr(x) the probability averaged over reference models
    (:func:`_log_px`). The score is the fraction of population samples z that x
    dominates: ``#{z : LR(x) / LR(z) ≥ γ} / M``. Everything is in log space.

    What Pr(x|θ) is for a text: the rule is written for the probability of one
    prediction, so pass one per record. For a language model the authors' code
    (ml_privacy_meter, ``get_signals.get_softmax``) takes the geometric-mean token
    probability ``exp(mean log p)``; privtune passes the same (the record's summed
    log-probability over its token count), which keeps the offline rule's constant
    ``(1 - a)/2`` on the scale it was made for.

    One rule for every record. ``online=None`` (default) uses the online rule when every
    target record and every z with a reference value has both an IN and an OUT
    reference (:func:`online_possible`), else the offline rule for all of them: a
    record's score never depends on whether it happens to lack an IN reference. Offline,
    a record no reference left out has no Pr_OUT and gets NaN.

    Population samples z: records from the same distribution as the targets, ideally not
    members of the target model (then the score reads as one minus a p-value against
    non-members). Records not trained on by any reference model: leave
    ``population_in=None`` and they are treated as OUT everywhere (as in the authors'
    code). Records of the shadow population (e.g. the other target records): pass their
    membership matrix as ``population_in``, and Pr(z) is computed exactly like Pr(x).
    Including target members, or x itself, among the z does not change the ranking
    (hence AUC and TPR at any FPR) for a fixed γ, only the scale; a small M does make
    ties (see :func:`rmia_log_ratio`). z with a NaN ratio are skipped.

    Args:
        target_loglik: (N,) log Pr(x|θ) of each target record under θ (see above).
        reference_logliks: (K, N) the same under each reference (shadow) model.
        reference_in: (K, N) bool, True where reference k trained on record i.
        population_target: (M,) log Pr(z|θ) of each z.
        population_reference: (K, M) log Pr(z|θ') under each reference.
        gamma: the pairwise threshold γ > 0 (the paper uses 1 or a little above).
        offline_a: a ∈ [0, 1] of ``Pr_IN ≈ a·Pr_OUT + (1 - a)``, used by the offline
            rule. None (default): tuned on the reference models by
            :func:`tune_offline_a` (the paper's procedure; its fixed 0.3 suits image
            classifiers, not token sequences, see :data:`DEFAULT_OFFLINE_A`).
        online: True / False forces the online / offline rule (True fails when a record
            lacks an IN or OUT reference); None picks as above.
        population_in: (K, M) bool membership of the z in the references, or None.

    Returns:
        (N,) float64 scores in [0, 1]; NaN only for records whose own likelihood, or
        every reference value the rule needs, is NaN.

    Raises:
        PrivtuneError: shapes disagree, K < 1, M < 1, γ ≤ 0, a outside [0, 1], online
        forced where a record lacks a reference, no usable population sample, or an
        explicit a < 1 on what look like whole-sequence likelihoods.
    """
    reference_logliks = _as_matrix("reference_logliks", reference_logliks)
    population_reference = _as_matrix("population_reference", population_reference)
    n_models = reference_logliks.shape[0]
    if n_models < 1:
        raise PrivtuneError("RMIA needs at least 1 reference model, got K=0",
                            "set attacks.shadow.models to 2 or more")
    if population_reference.shape[0] != n_models:
        raise PrivtuneError(f"population_reference has {population_reference.shape[0]} models but "
                            f"reference_logliks has {n_models}",
                            "score the population samples with the same reference models, in the same order")
    n_population = population_reference.shape[1]
    if n_population < 1:
        raise PrivtuneError("RMIA needs at least one population sample z, got none",
                            "pass held-out records (or the other target records) as the population")
    if population_in is None:
        population_in = np.zeros(population_reference.shape, dtype=bool)
    if not (np.isfinite(gamma) and gamma > 0):
        raise PrivtuneError(f"gamma must be a positive number, got {gamma}", "use gamma=1 (the paper's default)")
    guard = offline_a is not None
    if offline_a is None:  # tuned once, on the target records' references, for x and z alike
        offline_a = tune_offline_a(reference_logliks, reference_in)
    _check_offline_a(offline_a)
    if online is None:
        online = online_possible(reference_logliks, reference_in) and \
            online_possible(population_reference, population_in)
    ratio_x = _ratio(_TARGET, target_loglik, reference_logliks, reference_in, online=online,
                     offline_a=offline_a, guard=guard)
    ratio_z = _ratio(_POPULATION, population_target, population_reference, population_in, online=online,
                     offline_a=offline_a, guard=guard)
    _check_some_finite("target_loglik", ratio_x)
    ratio_z = np.sort(ratio_z[np.isfinite(ratio_z)])
    if ratio_z.size == 0:
        raise PrivtuneError("no population sample has a finite likelihood ratio",
                            "pass population samples that have tokens at this level")
    # LR(x)/LR(z) ≥ γ  ⇔  log LR(z) ≤ log LR(x) - log γ; searchsorted counts those z.
    dominated = np.searchsorted(ratio_z, ratio_x - math.log(gamma), side="right") / ratio_z.size
    return np.where(np.isnan(ratio_x), np.nan, dominated)
