"""Token-level leakage and utility (DESIGN.md §1).

Sensitive and non-sensitive tokens are scored apart: memorising a customer's phone
number shows up as a falling loss on *sensitive training* tokens, while the usefulness
of the model shows up on *non-sensitive test* tokens. All means are over tokens (every
sensitive token of the set weighs the same); the quantiles are over records, because a
mean hides the few records a model has learnt by heart.

Directions: leakage measures are higher-is-worse; ``utility_ce``/``utility_ppl`` are
lower-is-better; ``utility_gain`` is higher-is-better.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from privtune.measures.intervals import ClusteredMean, clustered_mean, difference_interval
from privtune.measures.token_scores import TokenScores

QUANTILES = (10, 50, 90)

#: For reports: +1 where a higher value is better, -1 where lower is better.
HIGHER_IS_BETTER = {
    "leakage_gain": -1, "memorisation_gap": -1, "memorisation_gap_net": -1,
    "utility_ce": -1, "utility_ppl": -1, "utility_gain": +1,
    "ce_s_train": +1, "ce_s_test": +1, "ce_n_train": -1, "ce_n_test": -1,
}


def mean_loss(scores: TokenScores, sensitive: bool) -> float:
    """CE_S (``sensitive=True``) or CE_N: mean NLL over the chosen token positions."""
    positions = scores.sensitive if sensitive else scores.valid & ~scores.sensitive
    if not positions.any():
        return math.nan
    return float(scores.nll[positions].mean())


def record_quantiles(scores: TokenScores, prefix: str) -> dict[str, float]:
    """p10/p50/p90 over records of each record's mean sensitive-token loss."""
    per_record = scores.record_mean(scores.sensitive)
    per_record = per_record[~np.isnan(per_record)]
    if per_record.size == 0:
        return {f"{prefix}_record_p{q}": math.nan for q in QUANTILES}
    values = np.percentile(per_record, QUANTILES)
    return {f"{prefix}_record_p{q}": float(v) for q, v in zip(QUANTILES, values)}


def leakage_measures(model_train: TokenScores, model_test: TokenScores,
                     base_train: TokenScores, base_test: TokenScores) -> dict[str, float]:
    """Every token-level measure of one model against the base model."""
    ce_s_train, ce_s_test = mean_loss(model_train, True), mean_loss(model_test, True)
    ce_n_train, ce_n_test = mean_loss(model_train, False), mean_loss(model_test, False)
    base_s_train, base_s_test = mean_loss(base_train, True), mean_loss(base_test, True)
    base_n_test = mean_loss(base_test, False)
    gap = ce_s_test - ce_s_train
    return {
        "ce_s_train": ce_s_train, "ce_s_test": ce_s_test,
        "ce_n_train": ce_n_train, "ce_n_test": ce_n_test,
        "leakage_gain": base_s_train - ce_s_train,
        "memorisation_gap": gap,
        "memorisation_gap_net": gap - (base_s_test - base_s_train),
        "utility_ce": ce_n_test,
        "utility_ppl": math.exp(ce_n_test) if ce_n_test < 50 else math.inf,
        "utility_gain": base_n_test - ce_n_test,
        **record_quantiles(model_train, "ce_s_train"),
        **record_quantiles(model_test, "ce_s_test"),
    }


def _on(scores: TokenScores, positions: np.ndarray) -> TokenScores:
    return dataclasses.replace(scores, sensitive=scores.sensitive & positions)


def part_gap(model_train: TokenScores, model_test: TokenScores, base_train: TokenScores, base_test: TokenScores,
             train_part: np.ndarray, test_part: np.ndarray,
             people: tuple[np.ndarray, np.ndarray] | None = None, confidence: float = 0.95) -> dict:
    """The memorisation gap, plain and net of the base model's, on a part of the
    sensitive tokens (``*_part``: (N, L-1) bool masks over the train and test scores), with
    its CE_S on each side and how many tokens each rests on. A part with no token on a
    side has no gap: the figures are None and ``reason`` says why.

    Token means weigh every token alike, so a part's CE_S on one side and the rest's,
    weighted by their token counts, give the whole CE_S on that side back.

    With ``people`` (each record's person, train and test), the net gap gets its
    ``confidence`` interval (``memorisation_gap_net_ci``): it is the non-members' mean of
    (model − base) loss minus the members', two person-clustered token means over
    different people (:mod:`privtune.measures.intervals`); None with fewer than two
    people on a side."""
    train, test = _on(model_train, train_part), _on(model_test, test_part)
    out = {"tokens_train": int(train.sensitive.sum()), "tokens_test": int(test.sensitive.sum()),
           "ce_s_train": None, "ce_s_test": None, "memorisation_gap": None, "memorisation_gap_net": None,
           "reason": None}
    empty = [side for side, n in (("members", out["tokens_train"]), ("non-members", out["tokens_test"])) if n == 0]
    if empty:
        out["reason"] = f"no such sensitive token on the {' or the '.join(empty)}"
        return out
    ce_train, ce_test = mean_loss(train, True), mean_loss(test, True)
    base_gap = mean_loss(_on(base_test, test_part), True) - mean_loss(_on(base_train, train_part), True)
    out.update(ce_s_train=ce_train, ce_s_test=ce_test, memorisation_gap=ce_test - ce_train,
               memorisation_gap_net=ce_test - ce_train - base_gap)
    if people is not None:
        sides = [_shift_over_base(m, b, part, who) for m, b, part, who in
                 ((model_test, base_test, test_part, people[1]), (model_train, base_train, train_part, people[0]))]
        out["memorisation_gap_net_ci"] = (list(difference_interval(*sides, confidence))
                                          if None not in sides else None)
    return out


def _shift_over_base(model: TokenScores, base: TokenScores, part: np.ndarray, people) -> ClusteredMean | None:
    """The mean of (model − base) NLL over a part's sensitive tokens, clustered by person."""
    mask = model.sensitive & part
    sums = np.where(mask, model.nll - base.nll, 0.0).sum(axis=1)
    return clustered_mean(sums, mask.sum(axis=1), np.asarray(people))
