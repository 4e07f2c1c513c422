"""The accountant wrappers, against Opacus's accountants stepped one step at a time, and
the ε they report against an accountant privtune does not use: Google's PLD accountant
(``dp_accounting``), the tightest established analysis of the Poisson-subsampled Gaussian."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from opacus.accountants import PRVAccountant, RDPAccountant

from privtune.errors import PrivtuneError
from privtune.train import dp

OPACUS = {"prv": PRVAccountant, "rdp": RDPAccountant}
SETTINGS = [(0.05, 1.0, 40, 1e-5), (0.2, 2.5, 25, 1e-4), (0.01, 0.8, 300, 1e-6)]  # (q, sigma, steps, delta)


def opacus_epsilon(name: str, q: float, sigma: float, steps: int, delta: float) -> float:
    accountant = OPACUS[name]()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def pld_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """ε of ``steps`` Poisson-subsampled Gaussian steps by Google's PLD accountant (pessimistic)."""
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


# Near the default study's DP runs: q = 8/115 (records or people), 2 epochs of 15 steps.
PLD_SETTINGS = SETTINGS + [(8 / 115, 0.9, 30, 1 / 400)]


@pytest.mark.parametrize("q,sigma,steps,delta", PLD_SETTINGS)
def test_reported_epsilon_agrees_with_googles_pld_accountant_on_the_safe_side(q, sigma, steps, delta):
    """PRV (the default) is within 0.02 of PLD and never below it; RDP, the looser classic
    bound, is never below it either. Below PLD would be an ε the mechanism does not keep."""
    reference = pld_epsilon(q, sigma, steps, delta)
    prv = dp.epsilon_for(sigma, delta, q, steps, accountant="prv")
    assert reference - 1e-3 <= prv <= reference + 0.02
    assert dp.epsilon_for(sigma, delta, q, steps, accountant="rdp") >= reference - 1e-3


@pytest.mark.parametrize("name", dp.ACCOUNTANTS)
def test_noise_for_a_target_keeps_the_target_under_pld(name):
    q, steps, delta, target = 8 / 115, 30, 1 / 400, 8.0
    sigma = dp.noise_for_target_epsilon(target, delta, q, steps, accountant=name)
    assert pld_epsilon(q, sigma, steps, delta) <= target


@pytest.mark.parametrize("name", dp.ACCOUNTANTS)
@pytest.mark.parametrize("q,sigma,steps,delta", SETTINGS)
def test_epsilon_for_equals_opacus_stepped_directly(name, q, sigma, steps, delta):
    want = opacus_epsilon(name, q, sigma, steps, delta)
    assert 0 < want < math.inf
    assert dp.epsilon_for(sigma, delta, q, steps, accountant=name) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("name", dp.ACCOUNTANTS)
def test_ledger_tracks_steps_like_opacus(name):
    ledger = dp.PrivacyLedger(name)
    assert ledger.epsilon(1e-5) == 0.0
    reference = OPACUS[name]()
    for step in range(30):
        sigma = 1.0 if step < 20 else 1.5  # a change of noise mid-run starts a new segment
        ledger.step(sigma, 0.05)
        reference.step(noise_multiplier=sigma, sample_rate=0.05)
    assert ledger.steps == 30
    assert ledger.history == [(1.0, 0.05, 20), (1.5, 0.05, 10)]
    assert ledger.epsilon(1e-5) == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
    single = dp.PrivacyLedger(name)
    for _ in range(20):
        single.step(1.0, 0.05)
    assert single.epsilon(1e-5) == pytest.approx(dp.epsilon_for(1.0, 1e-5, 0.05, 20, name), rel=1e-9)
    assert single.epsilon(1e-5) < ledger.epsilon(1e-5)


def test_no_noise_means_no_privacy():
    assert dp.epsilon_for(0.0, 1e-5, 0.05, 10) == math.inf
    ledger = dp.PrivacyLedger("prv")
    ledger.step(1.0, 0.05)
    ledger.step(0.0, 0.05)
    assert ledger.epsilon(1e-5) == math.inf
    assert dp.epsilon_for(1.0, 1e-5, 0.05, 0) == 0.0


@pytest.mark.parametrize("name,target", [("prv", 3.0), ("rdp", 1.0), ("rdp", 8.0)])
def test_noise_for_target_epsilon_round_trips(name, target):
    sigma = dp.noise_for_target_epsilon(target, 1e-5, 0.05, 60, accountant=name)
    eps = dp.epsilon_for(sigma, 1e-5, 0.05, 60, accountant=name)
    assert eps <= target  # never spends more than asked
    assert eps == pytest.approx(target, rel=0.01)


def test_more_steps_need_more_noise():
    few = dp.noise_for_target_epsilon(2.0, 1e-5, 0.05, 20, accountant="rdp")
    many = dp.noise_for_target_epsilon(2.0, 1e-5, 0.05, 200, accountant="rdp")
    assert many > few


def test_valid_settings_pass():
    dp.check_dp_settings(n_records=100, delta=1e-3, sample_rate=0.08, max_grad_norm=1.0,
                         target_epsilon=8.0, steps=25, accountant="rdp")


def test_delta_must_be_below_one_over_n():
    with pytest.raises(PrivtuneError) as err:
        dp.check_dp_settings(n_records=100, delta=0.02, sample_rate=0.08, max_grad_norm=1.0)
    assert str(err.value) == ("delta 0.02 must be below 1/N = 0.01 (N = 100 training records); "
                              "use delta <= 0.001, i.e. 1/(10N), or leave it unset.")


def test_unreachable_epsilon_is_reported():
    message = "target epsilon 0.01 is unreachable with 40 steps at sample rate 0.05"
    with pytest.raises(PrivtuneError, match=message) as err:
        dp.noise_for_target_epsilon(0.01, 1e-5, 0.05, 40, accountant="rdp")
    assert "raise dp.target_epsilon" in str(err.value)
    with pytest.raises(PrivtuneError, match=message):
        dp.check_dp_settings(n_records=1000, delta=1e-5, sample_rate=0.05, max_grad_norm=1.0,
                             target_epsilon=0.01, steps=40, accountant="rdp")


@pytest.mark.parametrize("changes,message", [
    (dict(target_epsilon=0.0), "target epsilon must be positive"),
    (dict(target_epsilon=-1.0), "target epsilon must be positive"),
    (dict(max_grad_norm=0.0), "max_grad_norm must be positive"),
    (dict(sample_rate=0.0), r"sample rate must be in \(0, 1\]"),
    (dict(sample_rate=1.2), r"sample rate must be in \(0, 1\]"),
    (dict(delta=0.0), r"delta must be in \(0, 1\)"),
    (dict(noise_multiplier=-0.5), "noise multiplier must be >= 0"),
    (dict(steps=0), "at least one step"),
    (dict(accountant="gdp"), "unknown accountant 'gdp'; use one of: prv, rdp"),
])
def test_impossible_settings_are_refused(changes, message):
    settings = dict(n_records=100, delta=1e-3, sample_rate=0.1, max_grad_norm=1.0)
    settings.update(changes)
    with pytest.raises(PrivtuneError, match=message):
        dp.check_dp_settings(**settings)


def test_all_problems_are_reported_at_once():
    with pytest.raises(PrivtuneError) as err:
        dp.check_dp_settings(n_records=10, delta=0.5, sample_rate=2.0, max_grad_norm=-1.0)
    text = str(err.value)
    assert text.startswith("the DP settings have several problems")
    for part in ("sample rate", "delta 0.5 must be below 1/N", "max_grad_norm"):
        assert part in text


def test_noise_search_validates_its_inputs():
    with pytest.raises(PrivtuneError, match="target epsilon must be positive"):
        dp.noise_for_target_epsilon(0.0, 1e-5, 0.05, 40)
    with pytest.raises(PrivtuneError, match="unknown accountant"):
        dp.PrivacyLedger("moments")
