"""Canary exposure: the rank formula by hand, the skew-normal extrapolation against
analytic truth, batched secret losses against a one-text-at-a-time reference on every
tiny family, and an overfit model that must expose its canary. The exact rank search is
checked against brute force in test_rank_search.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from privtune.data.canaries import Canary, candidate_secrets, make_canaries
from privtune.errors import PrivtuneError
from privtune.measures.exposure import (
    canary_exposure,
    empirical_exposure,
    exposure_from_rank,
    extrapolated_exposure,
    secret_losses,
)
from privtune.models.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


# --- the pure functions -----------------------------------------------------------------

def test_exposure_from_rank_by_hand():
    assert exposure_from_rank(1, 100) == pytest.approx(6.643856, abs=1e-6)  # log2 100
    assert exposure_from_rank(100, 100) == 0.0
    assert exposure_from_rank(4, 1024) == pytest.approx(8.0)  # 10 - 2
    assert exposure_from_rank(25, 100) == pytest.approx(2.0)
    assert exposure_from_rank(1, 10**6) == pytest.approx(19.931569, abs=1e-6)
    for bad in (0, 101, -1):
        with pytest.raises(PrivtuneError):
            exposure_from_rank(bad, 100)
    with pytest.raises(PrivtuneError):
        exposure_from_rank(1, 0)


def test_empirical_exposure_is_the_rank_among_scored_secrets():
    cands = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])  # m = 7, m + 1 = 8
    assert empirical_exposure(cands, 0.5, 10**6) == pytest.approx(3.0)  # rank 1 of 8: floor 1/8
    assert empirical_exposure(cands, 3.5, 10**6) == pytest.approx(1.0)  # rank 4 of 8
    assert empirical_exposure(cands, 3.0, 10**6) == pytest.approx(1.0)  # a tie counts against the canary
    assert empirical_exposure(cands, 2.9, 10**6) == pytest.approx(-math.log2(3 / 8))
    assert empirical_exposure(cands, 99.0, 10**6) == 0.0
    with pytest.raises(PrivtuneError):
        empirical_exposure(np.array([]), 1.0, 100)


@pytest.mark.parametrize("seed", range(5))
def test_skew_normal_extrapolation_matches_normal_truth_within_a_bit(seed):
    rng = np.random.default_rng(seed)
    losses = rng.normal(20.0, 3.0, size=1000)
    for z in (-1.0, -2.0):
        truth = -math.log2(stats.norm.cdf(z))
        assert extrapolated_exposure(losses, 20.0 + 3.0 * z, 10**6) == pytest.approx(truth, abs=1.0)


def test_skew_normal_extrapolation_reaches_past_the_sample():
    rng = np.random.default_rng(0)
    losses = rng.normal(20.0, 3.0, size=1000)
    truth = -math.log2(stats.norm.cdf(-3.5))  # ~12.3 bits, beyond log2(1001) ~ 10
    assert extrapolated_exposure(losses, 20.0 - 3.0 * 3.5, 10**6) == pytest.approx(truth, abs=1.0)


def test_skew_normal_extrapolation_on_skewed_losses():
    rng = np.random.default_rng(1)
    losses = stats.skewnorm.rvs(4.0, loc=10.0, scale=3.0, size=1000, random_state=rng)
    for q in (0.3, 0.05):
        canary = stats.skewnorm.ppf(q, 4.0, loc=10.0, scale=3.0)
        assert extrapolated_exposure(losses, canary, 10**6) == pytest.approx(-math.log2(q), abs=1.0)


def test_extrapolation_is_capped_and_handles_degenerate_samples():
    losses = np.random.default_rng(0).normal(10.0, 1.0, size=256)
    assert extrapolated_exposure(losses, -1e6, 10**6) == pytest.approx(math.log2(10**6))
    assert extrapolated_exposure(losses, 1e6, 10**6) == 0.0
    flat = np.full(64, 5.0)
    assert extrapolated_exposure(flat, 1.0, 100) == pytest.approx(math.log2(100))
    assert extrapolated_exposure(flat, 9.0, 100) == 0.0
    with pytest.raises(PrivtuneError):
        extrapolated_exposure(np.array([1.0, 2.0]), 0.0, 100)
    with pytest.raises(PrivtuneError):
        extrapolated_exposure(np.array([1.0, np.nan, 3.0, 4.0]), 0.0, 100)
    with pytest.raises(PrivtuneError):
        extrapolated_exposure(losses, float("nan"), 100)


# --- secret losses against a slow reference -----------------------------------------------

def _reference_secret_loss(model, tokenizer, canary: Canary, secret: str) -> float:
    """One unbatched forward pass; sum -log p of each token touching the secret's characters."""
    text = canary.text(secret)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    lo, hi = canary.secret_start, canary.secret_start + len(secret)
    total = 0.0
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and a < hi and lo < b:
            total -= float(logp[t - 1, enc["input_ids"][t]])
    return total


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_secret_losses_match_unbatched_reference(family, tokenizer):
    model = tiny_model(family, seed=1)
    canary = make_canaries(repetitions=(1,), n_reference=0, seed=2)[0]
    # Mixed lengths: secrets of other formats tokenise into different numbers of tokens.
    secrets = [canary.secret] + candidate_secrets(canary, 8, seed=0) + ["1", "12345678901", "999"]
    batched = secret_losses(model, tokenizer, canary, secrets, batch_size=8)
    single = secret_losses(model, tokenizer, canary, secrets, batch_size=1)
    reference = np.array([_reference_secret_loss(model, tokenizer, canary, s) for s in secrets])
    assert batched.shape == (len(secrets),) and batched.dtype == np.float64
    np.testing.assert_allclose(batched, single, atol=1e-5, rtol=0)
    np.testing.assert_allclose(batched, reference, atol=1e-4, rtol=0)
    assert np.all(batched > 0)


def test_secret_losses_under_bf16_autocast_stay_close(tokenizer):
    model = tiny_model("llama", seed=0)
    canary = make_canaries(repetitions=(1,), n_reference=0)[0]
    secrets = candidate_secrets(canary, 16, seed=0)
    fp32 = secret_losses(model, tokenizer, canary, secrets)
    bf16 = secret_losses(model, tokenizer, canary, secrets, autocast_dtype=torch.bfloat16)
    assert bf16.dtype == np.float64
    np.testing.assert_allclose(bf16, fp32, rtol=0.05)


def test_secret_losses_edge_cases(tokenizer):
    model = tiny_model("llama", seed=0)
    canary = Canary("c", "", "123456")
    with pytest.raises(PrivtuneError):  # nothing before the secret to condition on
        secret_losses(model, tokenizer, canary, ["123456"])
    with pytest.raises(PrivtuneError):
        secret_losses(model, tokenizer, make_canaries()[0], ["1"], batch_size=0)
    assert secret_losses(model, tokenizer, make_canaries()[0], []).shape == (0,)


def test_secret_losses_leave_the_training_flag_alone(tokenizer):
    model = tiny_model("llama", seed=0).train()
    secret_losses(model, tokenizer, make_canaries()[0], ["123456"])
    assert model.training


# --- exact rank on a small space ------------------------------------------------------------

def test_exact_rank_on_a_two_digit_space(tokenizer):
    model = tiny_model("qwen", seed=3)
    canary = Canary("c-small", "The locker number of Ada Byron is ", "42", length=2, repetitions=1)
    everything = [canary.secret] + candidate_secrets(canary, 99, seed=0)
    assert sorted(everything) == [f"{i:02d}" for i in range(100)]
    losses = secret_losses(model, tokenizer, canary, everything, batch_size=32)
    rank = 1 + int(np.sum(losses[1:] <= losses[0]))  # ties count against the canary
    exact = exposure_from_rank(rank, 100)
    assert exact == pytest.approx(math.log2(100) - math.log2(rank))

    (row,) = canary_exposure(model, tokenizer, [canary], n_candidates=256, batch_size=32)
    assert row["n_candidates"] == 99  # capped at |R| - 1: every other secret is scored
    assert row["max_exposure"] == pytest.approx(math.log2(100))
    assert row["loss"] == pytest.approx(losses[0], abs=1e-9)
    assert row["exposure_empirical"] == pytest.approx(exact, abs=1e-12)
    strict = 1 + int(np.sum(losses[1:] < losses[0]))  # the search's convention: ties count for the canary
    assert row["exposure_method"] == "exact" and row["rank"] == strict
    assert row["exposure"] == pytest.approx(exposure_from_rank(strict, 100), abs=1e-12)


# --- an overfit model exposes its canary -------------------------------------------------------

def _overfit(model, tokenizer, text: str, steps: int = 60, lr: float = 3e-3):
    """Plain AdamW on the one text; 60 steps take the secret's loss from ~35 to ~0.2 nats."""
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def test_overfit_canary_is_exposed_and_reference_is_not(tokenizer):
    torch.manual_seed(0)
    inserted, reference = make_canaries(repetitions=(16,), n_reference=1, seed=5)
    model = _overfit(tiny_model("llama", seed=0), tokenizer, inserted.text())
    rows = canary_exposure(model, tokenizer, [inserted, reference], n_candidates=128, seed=0)
    by_id = {r["canary"]: r for r in rows}
    hot, cold = by_id[inserted.id], by_id[reference.id]
    assert set(hot) == {"canary", "repetitions", "loss", "exposure", "exposure_method", "exposure_low",
                        "exposure_high", "rank", "rank_low", "rank_high", "exposure_reason", "exposure_empirical",
                        "exposure_extrapolated", "max_exposure", "n_candidates", "search_expanded",
                        "search_forward_passes", "search_seconds"}
    assert hot["repetitions"] == 16 and cold["repetitions"] == 0
    assert hot["n_candidates"] == 128 and hot["max_exposure"] == pytest.approx(math.log2(10**6))
    # Ranked first among all 10^6 secrets, proven by expanding a handful of prefixes.
    assert hot["exposure_method"] == "exact" and hot["rank"] == 1 and hot["search_expanded"] < 20
    assert hot["exposure"] == pytest.approx(hot["max_exposure"])
    assert hot["exposure_empirical"] == pytest.approx(math.log2(129))  # beats every candidate
    # The unseen canary opens too many prefixes to finish: the search gives up early,
    # proves nothing, and the exposure is the sampled estimate.
    assert cold["exposure_method"] == "estimated" and "gave up" in cold["exposure_reason"]
    assert 0 < cold["search_expanded"] < 2048 and cold["exposure_low"] is cold["rank"] is None
    assert cold["exposure"] == cold["exposure_empirical"] < 5.0
    assert hot["loss"] < cold["loss"]
    assert model.training  # canary_exposure put it back as it found it


def test_canary_exposure_rejects_too_few_candidates(tokenizer):
    with pytest.raises(PrivtuneError):
        canary_exposure(tiny_model("llama"), tokenizer, make_canaries()[:1], n_candidates=2)
    with pytest.raises(PrivtuneError):
        canary_exposure(tiny_model("llama"), tokenizer, make_canaries()[:1], search_budget=-1)


def test_without_a_search_the_exposure_is_the_sampled_estimate(tokenizer):
    (row,) = canary_exposure(tiny_model("llama"), tokenizer, make_canaries()[:1], n_candidates=32, search_budget=0)
    assert row["exposure_method"] == "estimated" and row["exposure_reason"] == "search_budget is 0"
    assert row["exposure"] == row["exposure_empirical"] <= math.log2(33)
    assert row["exposure_low"] is row["exposure_high"] is row["rank"] is row["rank_low"] is None
    assert row["search_expanded"] == row["search_forward_passes"] == 0
