"""The exact rank search against brute force: every secret of a small space scored with
:func:`secret_losses` (itself checked against one-text-at-a-time forward passes in
test_exposure.py) and ranked by ``1 + #{s ≠ canary : loss(s) < loss(canary)}``.

The tiny tokenizer merges digits ("59", "29") and sometimes the space before a secret
with its first digit ("Ġ8"), and merges letters into words: neither format is one token
per character."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_exposure import _overfit
from test_prompt_learning import shaken

from privtune.data.canaries import Canary, candidate_secrets, make_canaries
from privtune.measures.exposure import canary_exposure, exposure_from_rank, secret_losses
from privtune.measures.rank_search import _still_possible, search_rank
from privtune.measures.secret_tokens import SecretTokenSpace
from privtune.models.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def brute_force_rank(model, tokenizer, canary: Canary, tolerance: float = 1e-4) -> tuple[int, int]:
    """(lowest, highest) rank over every secret of the format that float noise allows: a
    secret within ``tolerance`` nats of the canary may fall either side of it when the
    losses are summed in another batch layout, so it may or may not count."""
    others = candidate_secrets(canary, canary.space_size - 1, seed=0)
    losses = secret_losses(model, tokenizer, canary, [canary.secret] + others, batch_size=512)
    return 1 + int(np.sum(losses[1:] < losses[0] - tolerance)), 1 + int(np.sum(losses[1:] < losses[0] + tolerance))


@pytest.fixture(scope="module")
def four_digit_case(tokenizer):
    """A tiny Llama overfit on one 4-digit canary, that canary, and an unseen one."""
    torch.manual_seed(0)
    hot, cold = make_canaries(repetitions=(16,), n_reference=1, seed=4, secret_length=4)
    model = _overfit(tiny_model("llama", seed=0), tokenizer, hot.text(), steps=10).eval()
    return model, hot, cold, {c.id: brute_force_rank(model, tokenizer, c) for c in (hot, cold)}


def test_every_exposure_on_a_four_digit_space_is_exact(four_digit_case, tokenizer):
    model, hot, cold, truth = four_digit_case
    rows = {r["canary"]: r for r in canary_exposure(model, tokenizer, [hot, cold], n_candidates=64,
                                                                  search_budget=10**5)}
    for canary in (hot, cold):
        low, high = truth[canary.id]
        row = rows[canary.id]
        assert row["exposure_method"] == "exact" and row["rank"] == row["rank_low"] == row["rank_high"]
        assert low <= row["rank"] <= high
        assert row["exposure"] == pytest.approx(exposure_from_rank(row["rank"], 10**4), abs=1e-12)
        assert row["exposure_low"] == row["exposure_high"] == row["exposure"]
    assert 1 < truth[hot.id][0] <= truth[hot.id][1] < 200 < truth[cold.id][0]  # memorised, yet not ranked first
    assert rows[hot.id]["search_expanded"] < rows[cold.id]["search_expanded"]  # cheap where it matters


def test_an_exhausted_budget_gives_bounds_that_hold(four_digit_case, tokenizer):
    model, hot, cold, truth = four_digit_case
    space = SecretTokenSpace.build(tokenizer, cold, candidate_secrets(cold, 64))
    for budget in (1, 20, 400):
        bounds = search_rank(model, tokenizer, space, budget=budget)
        assert not bounds.exact and bounds.expanded <= budget
        assert bounds.low <= truth[cold.id][1] and truth[cold.id][0] <= bounds.high
    full = search_rank(model, tokenizer, SecretTokenSpace.build(tokenizer, hot, candidate_secrets(hot, 64)),
                       budget=10**5)
    assert full.exact and full.expanded > 2
    # One prefix fewer than the full search needs: it cannot finish (how many that is
    # depends on the tokenizer's merges, so the budget is derived, not fixed).
    (row,) = canary_exposure(model, tokenizer, [hot], n_candidates=64, search_budget=full.expanded - 1)
    assert row["exposure_method"] == "bounded" and row["rank"] is None
    assert truth[hot.id][0] == truth[hot.id][1]  # no near tie: the memorised canary's rank is sharp
    assert row["rank_low"] <= truth[hot.id][0] <= row["rank_high"]
    assert row["exposure_low"] <= exposure_from_rank(truth[hot.id][0], 10**4) <= row["exposure_high"]
    assert row["exposure_low"] <= row["exposure"] <= row["exposure_high"]
    assert row["exposure"] < row["max_exposure"]  # the rank is not proven 1: never the cap


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_exact_rank_on_every_family(family, tokenizer):
    model = tiny_model(family, seed=2).eval()
    canary = make_canaries(repetitions=(1,), n_reference=0, seed=9, secret_length=3)[0]
    low, high = brute_force_rank(model, tokenizer, canary)
    bounds = search_rank(model, tokenizer, SecretTokenSpace.build(tokenizer, canary, []), budget=10**5)
    assert bounds.exact and low <= bounds.low == bounds.high <= high


def test_exact_rank_on_a_letter_format(tokenizer):
    # Letters merge into word pieces ("er", "ing"): multi-character tokens inside the secret.
    canary = Canary("letters", "The passphrase of Ada Byron is ", "read", alphabet="adeginr", length=4,
                    repetitions=8)
    model = _overfit(tiny_model("qwen", seed=1), tokenizer, canary.text(), steps=20).eval()
    space = SecretTokenSpace.build(tokenizer, canary, candidate_secrets(canary, 64))
    assert any(len(t) > 1 for step in space.steps for t in step.texts if t.strip() and t != " ")
    low, high = brute_force_rank(model, tokenizer, canary)
    bounds = search_rank(model, tokenizer, space, budget=10**5)
    assert bounds.exact and low <= bounds.low == bounds.high <= high


def test_prompt_tuned_model_takes_the_whole_row_path(tokenizer):
    model = shaken("prompt-tuning", "llama")
    canary = Canary("c", "The locker of Ada Byron is ", "42", length=2)
    low, high = brute_force_rank(model, tokenizer, canary)
    bounds = search_rank(model, tokenizer, SecretTokenSpace.build(tokenizer, canary, []), budget=10**4)
    assert bounds.exact and low <= bounds.low == bounds.high <= high


def test_ties_count_for_the_canary(tokenizer):
    # A model with zero logits gives every token log(1/V): a secret's loss is its number
    # of scored tokens times log V, so the rank is 1 + #secrets written in fewer tokens.
    model = tiny_model("gpt-neox", seed=0).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    canary = make_canaries(repetitions=(1,), n_reference=0, seed=3, secret_length=3)[0]
    space = SecretTokenSpace.build(tokenizer, canary, [])
    everyone = [canary.secret] + candidate_secrets(canary, 999)
    scored = [_scored_count(space, p) for p in space.canonical_paths(tokenizer, everyone)]
    expected = 1 + sum(n < scored[0] for n in scored[1:])
    bounds = search_rank(model, tokenizer, space, budget=10**4)
    assert bounds.exact and bounds.low == expected
    assert bounds.loss == pytest.approx(scored[0] * math.log(model.config.vocab_size), rel=1e-6)


def _scored_count(space: SecretTokenSpace, path: tuple[int, ...]) -> int:
    count, position = 0, 0
    for token in path:
        step = space.steps[position]
        j = int(np.flatnonzero(step.ids == token)[0])
        count += bool(step.scored[j])
        position = int(step.ends[j])
    return count


def test_still_possible_counts_each_open_secret_once():
    # Open prefixes "1" (100 secrets) and "12" (inside "1") and "3" (100); the counted
    # secret "123" and the canary "999" do not count again.
    assert _still_possible(["1", "12", "3", "1"], {"123", "999"}, "0123456789", 3) == 199
    assert _still_possible([""], {"000"}, "01", 3) == 7
    assert _still_possible([], {"000"}, "01", 3) == 0
