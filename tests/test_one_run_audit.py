"""Empirical ε lower bounds against Google's maintained implementation (jax_privacy's
``auditing.py``, loaded by file path so jax is never imported), an exact rational-arithmetic
reading of Steinke et al.'s Theorem 3, and simulated mechanisms of known ε."""

import importlib.util
import math
import sys
from fractions import Fraction

import numpy as np
import pytest

from privtune.auditing.multi_run import clopper_pearson_epsilon, clopper_pearson_epsilon_at
from privtune.auditing.one_run import (
    MIN_CANARIES, empirical_epsilon, gaussian_mu, gdp_epsilon, guess_counts, steinke_epsilon, steinke_p_value,
)
from privtune.errors import PrivtuneError

DELTA = 1e-5


@pytest.fixture(scope="module")
def jax_auditing():
    """``jax_privacy/auditing.py`` without its package ``__init__`` (which imports jax)."""
    pytest.importorskip("dp_accounting")
    found = importlib.util.find_spec("jax_privacy")
    if found is None:
        pytest.skip("jax-privacy is not installed (make install adds it with --no-deps)")
    path = f"{found.submodule_search_locations[0]}/auditing.py"
    spec = importlib.util.spec_from_file_location("jax_privacy_auditing", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up here
    spec.loader.exec_module(module)
    return module


def scores_with(guesses: int, correct: int, canaries: int):
    """IN/OUT scores whose top ``guesses`` hold exactly ``correct`` IN canaries (half are IN)."""
    n_in = canaries // 2
    top = np.arange(canaries, canaries - guesses, -1, dtype=float)
    rest = np.arange(canaries - guesses, 0, -1, dtype=float)
    inside = np.concatenate([top[:correct], rest[:n_in - correct]])
    outside = np.concatenate([top[correct:], rest[n_in - correct:]])
    return inside, outside, float(top[-1])


CASES = [(200, 100, 100), (200, 20, 20), (200, 100, 80), (1000, 100, 90), (1000, 500, 500), (50, 10, 9),
         (400, 40, 25)]


@pytest.mark.parametrize("canaries,guesses,correct", CASES)
def test_steinke_and_gdp_bounds_equal_jax_privacy_at_one_threshold(jax_auditing, canaries, guesses, correct):
    inside, outside, threshold = scores_with(guesses, correct, canaries)
    auditor = jax_auditing.CanaryScoreAuditor(inside, outside)
    at = jax_auditing.Explicit(threshold)
    want = auditor.epsilon_one_run(0.05, DELTA, threshold_strategy=at)
    assert steinke_epsilon(canaries, guesses, correct, DELTA, 0.05) == pytest.approx(want, rel=0.01, abs=1e-4)
    want_gdp = auditor.epsilon_one_run_fdp(0.05, DELTA, threshold_strategy=at)
    assert gdp_epsilon(canaries, guesses, correct, DELTA, 0.05) == pytest.approx(want_gdp, rel=0.01, abs=1e-4)


@pytest.mark.parametrize("bound,jax_method", [("steinke", "epsilon_one_run"), ("gdp", "epsilon_one_run_fdp")])
def test_the_grid_bound_is_jax_privacy_at_each_grid_threshold_with_bonferroni(jax_auditing, bound, jax_method):
    rng = np.random.default_rng(3)
    inside, outside = rng.normal(2.0, 1, 150), rng.normal(0, 1, 150)
    got = empirical_epsilon(inside, outside, delta=DELTA, bound=bound)
    ranked = np.sort(np.concatenate([inside, outside]))[::-1]
    grid = guess_counts(300)
    auditor = jax_auditing.CanaryScoreAuditor(inside, outside)
    want = max(getattr(auditor, jax_method)(0.05 / len(grid), DELTA, threshold_strategy=jax_auditing.Explicit(ranked[k - 1]))
               for k in grid)
    assert got.lower_bound == pytest.approx(want, rel=0.01)
    assert got.lower_bound > 0.5  # a strong separation gives a bound worth reporting


def test_clopper_pearson_bound_equals_jax_privacy_at_one_threshold(jax_auditing):
    rng = np.random.default_rng(5)
    inside, outside = rng.normal(1.5, 1, 400), rng.normal(0, 1, 400)
    auditor = jax_auditing.CanaryScoreAuditor(inside, outside)
    for threshold in (0.5, 1.5, 2.5):
        want = auditor.epsilon_clopper_pearson(0.05, DELTA, threshold_strategy=jax_auditing.Explicit(threshold))
        assert clopper_pearson_epsilon_at(inside, outside, threshold, DELTA, 0.95) == pytest.approx(want, rel=0.01)


def exact_p_value(m: int, r: int, v: int, eps: Fraction, delta: Fraction) -> Fraction:
    """Theorem 3 of Steinke et al. by definition, in exact rationals (e^ε given as a fraction)."""
    q = eps / (1 + eps)  # eps here is e^ε
    def at_least(k):
        return sum(math.comb(r, j) * q ** j * (1 - q) ** (r - j) for j in range(max(k, 0), r + 1))
    tail = at_least(v)
    worst = max((at_least(v - i) - tail) / i for i in range(1, v + 1))
    return min(tail + 2 * m * delta * worst, Fraction(1))


@pytest.mark.parametrize("m,r,v", [(100, 30, 28), (60, 20, 20), (200, 50, 35)])
def test_steinke_p_value_equals_the_theorem_in_exact_arithmetic(m, r, v):
    for e_eps in (Fraction(1), Fraction(3), Fraction(20)):
        want = exact_p_value(m, r, v, e_eps, Fraction(1, 10 ** 5))
        got = steinke_p_value(m, r, v, math.log(e_eps), DELTA)
        assert got == pytest.approx(float(want), rel=1e-9, abs=1e-300)


def randomised_response(epsilon: float, canaries: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """An ε-DP mechanism per canary: its score shows the IN/OUT bit, flipped w.p. 1/(1+e^ε)."""
    bits = rng.random(canaries) < 0.5
    shown = np.where(rng.random(canaries) < 1 / (1 + math.exp(epsilon)), ~bits, bits)
    scores = shown + rng.random(canaries) * 1e-3  # label-blind jitter: post-processing
    return scores[bits], scores[~bits]


def test_the_bound_holds_for_an_epsilon_dp_mechanism_and_catches_a_weaker_one():
    rng = np.random.default_rng(0)
    honest = [empirical_epsilon(*randomised_response(1.0, 500, rng), delta=DELTA).lower_bound for _ in range(20)]
    assert max(honest) <= 1.0  # at 95% each; the grid's Bonferroni makes exceeding rarer still
    assert min(honest) > 0.3  # and it is not vacuous: all 500 guesses are informative
    broken = empirical_epsilon(*randomised_response(3.0, 500, rng), delta=DELTA)
    assert broken.lower_bound > 1.0  # claimed 1, delivered 3: the audit rejects the claim


def test_gaussian_mu_gives_the_claimed_delta():
    from scipy.stats import norm
    for eps in (0.5, 2.0, 8.0):
        mu = gaussian_mu(eps, DELTA)
        delta = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
        assert delta == pytest.approx(DELTA, rel=1e-6)


def test_too_few_canaries_and_bad_input_are_said_not_guessed():
    few = empirical_epsilon([1.0] * 5, [0.0] * 5, delta=DELTA)
    assert few.lower_bound is None and str(MIN_CANARIES) in few.reason
    nan = empirical_epsilon([float("nan")] + [1.0] * 20, [0.0] * 20, delta=DELTA)
    assert nan.lower_bound is None and "not finite" in nan.reason
    with pytest.raises(PrivtuneError, match="δ"):
        empirical_epsilon([1.0] * 20, [0.0] * 20, delta=0)
    with pytest.raises(PrivtuneError, match="unknown audit bound"):
        empirical_epsilon([1.0] * 20, [0.0] * 20, delta=DELTA, bound="lira")
    assert clopper_pearson_epsilon([1.0] * 5, [0.0] * 50, delta=DELTA).lower_bound is None


def test_ties_are_broken_without_the_labels():
    # Every score equal: any guess is a coin flip, so the bound is (close to) zero.
    result = empirical_epsilon([0.0] * 100, [0.0] * 100, delta=DELTA)
    assert result.lower_bound < 0.5
    assert result.to_dict()["in_scores"] == [0.0] * 100
