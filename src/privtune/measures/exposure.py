"""Canary exposure: how many bits of a planted random secret the model has memorised.

Carlini et al., "The Secret Sharer" (USENIX Security 2019, https://arxiv.org/abs/1802.08232).
Order all ``|R|`` secrets of a canary's format by the model's loss on them (NLL of the
secret's tokens after the prefix); with the true secret at ``rank`` (1 = lowest loss)

    exposure = log2 |R| - log2 rank,

from 0 (the model prefers every other secret) to ``log2 |R|`` (it prefers the true one).

Every exposure says how it was obtained (``exposure_method``):

- ``exact``: :mod:`privtune.measures.rank_search` found the rank among all ``|R|``
  secrets (``rank = 1 + #{s ≠ canary : loss(s) < loss(canary)}``) within its budget of
  expanded token prefixes. Cheap for memorised canaries, whose low loss leaves few
  prefixes to expand.
- ``bounded``: the budget ran out; the search proved ``rank_low <= rank <= rank_high``,
  i.e. ``exposure_low <= exposure <= exposure_high``, and ``exposure`` is the sampled
  estimate below clamped into that interval.
- ``estimated``: no search ran (``search_budget`` 0, or a tokenizer that rewrites the
  text before the secret), or it proved nothing (an unmemorised canary opens too many
  prefixes to finish); ``exposure_reason`` says which. ``exposure`` is the sampled
  estimate, with no proven bounds.

The sampled estimate is the canary's rank among itself and ``m`` uniformly sampled
candidates, ``(1 + #{candidates with loss <= canary loss}) / (m + 1)`` as a fraction of
``|R|`` (ties count against the canary). It is unbiased and assumes no distribution, but
saturates at ``log2(m + 1)`` bits. The paper's skew-normal extrapolation
(``exposure_extrapolated``) reaches further but is kept for comparison only: its fitted
tail is too light, and against exact ranks it overstated memorised canaries by 1 to 4
bits, often up to the ``log2 |R|`` cap.

The candidates' losses are computed here rather than read from the per-token cache of
:mod:`privtune.measures.token_scores`, because candidates are texts that are not in any
dataset; they are batched forward passes that sum the NLL of every token overlapping
the secret's characters (different secrets tokenise into different numbers of tokens).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats

from privtune.attacks.continuation import continuation_losses
from privtune.data.canaries import Canary, candidate_secrets
from privtune.errors import PrivtuneError
from privtune.measures.rank_search import RankBounds, search_rank
from privtune.measures.secret_tokens import SecretTokenSpace, TokenizationMismatch


def exposure_from_rank(rank: float, space_size: int) -> float:
    """``log2 |R| - log2 rank`` for a rank in ``[1, |R|]`` (1 = the most likely secret).

    Raises:
        PrivtuneError: ``space_size`` below 1 or ``rank`` outside ``[1, space_size]``.
    """
    if space_size < 1:
        raise PrivtuneError(f"the secret space has size {space_size}", "give a size of at least 1")
    if not 1 <= rank <= space_size:
        raise PrivtuneError(f"rank {rank} is outside [1, {space_size}]", "pass a 1-based rank within the space")
    return math.log2(space_size) - math.log2(rank)


def empirical_exposure(candidate_losses: np.ndarray, canary_loss: float, space_size: int) -> float:
    """Exposure from the canary's rank among itself and the ``m`` sampled candidates.

    The rank fraction ``(1 + #{candidate loss <= canary loss}) / (m + 1)`` estimates
    ``rank / |R|``; it is never below ``1/(m + 1)``, so the result is at most
    ``log2(m + 1)`` bits (and at most ``log2 |R|``, since ``m < |R|``).
    """
    losses = _finite_losses(candidate_losses, minimum=1)
    fraction = (1 + int(np.sum(losses <= canary_loss))) / (len(losses) + 1)
    return min(-math.log2(fraction), math.log2(space_size))


def extrapolated_exposure(candidate_losses: np.ndarray, canary_loss: float, space_size: int) -> float:
    """``-log2 CDF(canary_loss)`` under a skew-normal fitted to the candidates' losses,
    clipped to ``[0, log2 |R|]``.

    The fit runs on standardised losses (well-conditioned whatever the loss scale). When
    the candidates all have the same loss there is nothing to fit: the canary then
    scores the full ``log2 |R|`` if its loss is lower, else the empirical estimate.

    Raises:
        PrivtuneError: fewer than 3 finite candidate losses, or a non-finite canary loss.
    """
    losses = _finite_losses(candidate_losses, minimum=3)
    if not math.isfinite(canary_loss):
        raise PrivtuneError(f"the canary's loss is {canary_loss}", "check the model's outputs for NaN/inf")
    cap = math.log2(space_size)
    mean, std = float(losses.mean()), float(losses.std())
    if std <= 1e-12 * max(1.0, abs(mean)):
        return cap if canary_loss < mean else empirical_exposure(losses, canary_loss, space_size)
    z = (losses - mean) / std
    shape, loc, scale = stats.skewnorm.fit(z)
    log_cdf = float(stats.skewnorm.logcdf((canary_loss - mean) / std, shape, loc, scale))
    return float(np.clip(-log_cdf / math.log(2), 0.0, cap))  # logcdf = -inf gives the cap


def _finite_losses(losses: np.ndarray, minimum: int) -> np.ndarray:
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 1 or losses.size < minimum or not np.all(np.isfinite(losses)):
        raise PrivtuneError(f"need at least {minimum} finite candidate losses, got shape {losses.shape} "
                            f"with {int(np.sum(~np.isfinite(losses)))} non-finite",
                            "sample more candidates and check the model's outputs for NaN/inf")
    return losses


def secret_losses(model: torch.nn.Module, tokenizer, canary: Canary, secrets: list[str], *,
                  batch_size: int = 64, device: str | torch.device = "cpu",
                  autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """Sum of per-token NLL (nats) of the tokens covering each secret, given all tokens
    before them, with the secret written into ``canary``'s prefix and suffix.

    Every candidate shares the canary's prefix, so :func:`continuation_losses` runs it
    once per batch. Under ``autocast_dtype`` (e.g. ``torch.bfloat16``) only the forward
    passes run in low precision: the log-softmax is taken in float32.

    Returns:
        float64 array of shape ``(len(secrets),)``.
    """
    n = len(secrets)
    return continuation_losses(model, tokenizer, [canary.prefix] * n, list(secrets), suffixes=[canary.suffix] * n,
                               batch_size=batch_size, device=device, autocast_dtype=autocast_dtype)


def canary_exposure(model: torch.nn.Module, tokenizer, canaries: list[Canary], *, n_candidates: int = 256,
                    search_budget: int = 1024, seed: int = 0, batch_size: int = 64,
                    device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None) -> list[dict]:
    """Exposure of every canary (inserted and reference) under ``model``.

    The true secret and its ``m = min(n_candidates, |R| - 1)`` sampled candidates are
    scored in the same call (the true secret first, so in the first batch), under
    identical precision and padding; then the rank search expands at most
    ``search_budget`` token prefixes (0: no search, the exposure is estimated).

    Returns:
        One dict per canary: ``canary`` (id), ``repetitions``, ``loss`` (nats, the true
        secret's), ``exposure`` (bits, higher = more memorised), ``exposure_method``
        (``exact``, ``bounded`` or ``estimated``), ``exposure_low`` / ``exposure_high``
        and ``rank`` / ``rank_low`` / ``rank_high`` (what the search proved; ``rank`` only
        when exact, all None when estimated), ``exposure_reason`` (why estimated, else
        None), ``exposure_empirical`` (the sampled estimate), ``exposure_extrapolated``
        (the skew-normal fit, for comparison), ``max_exposure`` (``log2 |R|``),
        ``n_candidates`` (``m``), and the search's cost ``search_expanded``,
        ``search_forward_passes`` and ``search_seconds``.
    """
    if n_candidates < 3:
        raise PrivtuneError(f"n_candidates must be at least 3 to fit a distribution, got {n_candidates}",
                            "use a few hundred, e.g. 256")
    if search_budget < 0:
        raise PrivtuneError(f"search_budget must not be negative, got {search_budget}",
                            "use 0 to skip the exact search, or a few thousand")
    results = []
    for canary in canaries:
        m = min(n_candidates, canary.space_size - 1)
        candidates = candidate_secrets(canary, m, seed)
        losses = secret_losses(model, tokenizer, canary, [canary.secret] + candidates, batch_size=batch_size,
                               device=device, autocast_dtype=autocast_dtype)
        loss, candidate_losses = float(losses[0]), losses[1:]
        empirical = empirical_exposure(candidate_losses, loss, canary.space_size)
        bounds, reason = None, "search_budget is 0"
        if search_budget > 0:
            try:
                space = SecretTokenSpace.build(tokenizer, canary, candidates)
                bounds = search_rank(model, tokenizer, space, budget=search_budget, batch_size=batch_size,
                                     device=device, autocast_dtype=autocast_dtype)
            except TokenizationMismatch as err:
                reason = err.one_line()
        results.append({
            "canary": canary.id, "repetitions": canary.repetitions, "loss": loss,
            **exposure_figures(bounds, empirical, canary.space_size, reason),
            "exposure_empirical": empirical,
            "exposure_extrapolated": extrapolated_exposure(candidate_losses, loss, canary.space_size),
            "max_exposure": math.log2(canary.space_size), "n_candidates": m,
            "search_expanded": bounds.expanded if bounds else 0,
            "search_forward_passes": bounds.forward_passes if bounds else 0,
            "search_seconds": bounds.seconds if bounds else 0.0,
        })
    return results


def exposure_figures(bounds: RankBounds | None, estimate: float, space_size: int, reason: str | None = None) -> dict:
    """The exposure fields of one canary from what the search proved (None: no search)
    and the sampled ``estimate`` (bits); see the module docstring for the three methods.
    A search that proved nothing (rank in ``[1, |R|]``) counts as no search."""
    if bounds is not None and bounds.low == 1 and bounds.high >= space_size > 1:
        bounds, reason = None, (f"the rank search gave up after {bounds.expanded} prefixes, with more open "
                                "than its budget had left, and proved no bound")
    if bounds is None:
        return {"exposure": estimate, "exposure_method": "estimated", "exposure_low": None, "exposure_high": None,
                "rank": None, "rank_low": None, "rank_high": None, "exposure_reason": reason}
    low, high = exposure_from_rank(bounds.high, space_size), exposure_from_rank(bounds.low, space_size)
    return {"exposure": high if bounds.exact else min(max(estimate, low), high),
            "exposure_method": "exact" if bounds.exact else "bounded", "exposure_low": low, "exposure_high": high,
            "rank": bounds.low if bounds.exact else None, "rank_low": bounds.low, "rank_high": bounds.high,
            "exposure_reason": None}
