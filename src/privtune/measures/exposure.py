"""Canary exposure: how many bits of a planted random secret the model has memorised.

Carlini et al., "The Secret Sharer" (USENIX Security 2019, https://arxiv.org/abs/1802.08232).
Order all ``|R|`` secrets of a canary's format by the model's loss on them (NLL of the
secret's tokens after the prefix); with the true secret at ``rank`` (1 = lowest loss)

    exposure = log2 |R| - log2 rank,

from 0 (the model prefers every other secret) to ``log2 |R|`` (it prefers the true one).

Scoring ``|R| = 10^6`` secrets per canary is too slow, so the rank is estimated from
``m`` sampled candidates in two ways:

- *extrapolation* (the paper's §4.3, the headline number): fit a skew-normal to the
  candidates' losses and take ``exposure ≈ -log2 CDF_fit(loss_canary)``, clipped to
  ``[0, log2 |R|]``. It reaches far beyond ``log2(m + 1)`` bits, which is where the
  memorised canaries sit.
- *empirical*: the canary's rank among the ``m + 1`` scored secrets,
  ``(1 + #{candidates with loss ≤ canary loss}) / (m + 1)``, i.e. the fraction of sampled
  candidates that beat or tie it, floored at ``1/(m + 1)``; it saturates at
  ``log2(m + 1)`` bits but assumes no distribution. Ties count against the canary.
  With ``m = |R| - 1`` it is the exact exposure.

The losses are computed here rather than read from the per-token cache of
:mod:`privtune.measures.token_scores`, because candidates are texts that are not in any
dataset; they are batched forward passes that sum the NLL of every token overlapping
the secret's characters (different secrets tokenise into different numbers of tokens).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from scipy import stats

from privtune.data.canaries import Canary, candidate_secrets
from privtune.errors import PrivtuneError
from privtune.models.forward import token_logits


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


def _secret_token_positions(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens whose characters overlap ``[start, end)``."""
    return [t for t, (a, b) in enumerate(offsets) if b > a and a < end and start < b]


def _encode(tokenizer, canary: Canary, secrets: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each canary text, and the positions of the tokens covering its secret."""
    if not getattr(tokenizer, "is_fast", False):
        raise PrivtuneError("the tokenizer is not a fast tokenizer, so it has no character offsets",
                            "use a model whose tokenizer has a tokenizer.json")
    enc = tokenizer([canary.text(s) for s in secrets], return_offsets_mapping=True, add_special_tokens=True)
    start = canary.secret_start
    positions = []
    for secret, offsets in zip(secrets, enc["offset_mapping"]):
        pos = _secret_token_positions(offsets, start, start + len(secret))
        if not pos or pos[0] == 0:
            raise PrivtuneError(f"canary {canary.id}: the secret {'has no tokens' if not pos else 'is the first token'}, "
                                "so its likelihood given the prefix is undefined",
                                "give the canary a non-empty prefix and a non-empty secret")
        positions.append(pos)
    return enc["input_ids"], positions


@torch.no_grad()
def secret_losses(model: torch.nn.Module, tokenizer, canary: Canary, secrets: list[str], *,
                  batch_size: int = 64, device: str | torch.device = "cpu",
                  autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """Sum of per-token NLL (nats) of the tokens covering each secret, given all tokens
    before them, with the secret written into ``canary``'s prefix and suffix.

    Texts are right-padded into batches with an attention mask; padding sits after every
    real token, so it cannot change a causal model's outputs. Under ``autocast_dtype``
    (e.g. ``torch.bfloat16``) only the forward pass runs in low precision: the
    log-softmax is taken in float32.

    Returns:
        float64 array of shape ``(len(secrets),)``.
    """
    if batch_size < 1:
        raise PrivtuneError(f"batch_size must be at least 1, got {batch_size}", "use 64, say")
    if not secrets:
        return np.zeros(0)
    device = torch.device(device)
    input_ids, positions = _encode(tokenizer, canary, list(secrets))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        out = []
        for first in range(0, len(secrets), batch_size):
            rows = slice(first, first + batch_size)
            out.append(_batch_losses(model, input_ids[rows], positions[rows], pad_id if pad_id is not None else 0, device, autocast_dtype))
    finally:
        model.train(was_training)
    return np.concatenate(out).astype(np.float64)


def _batch_losses(model: torch.nn.Module, input_ids: list[list[int]], positions: list[list[int]],
                  pad_id: int, device: torch.device, autocast_dtype: torch.dtype | None) -> np.ndarray:
    """Secret losses of one batch (see :func:`secret_losses`)."""
    width = max(len(ids) for ids in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, seq in enumerate(input_ids):
        ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype)
                if autocast_dtype is not None else contextlib.nullcontext())
    ids, attention = ids.to(device), attention.to(device)
    with autocast:
        logits = token_logits(model, ids, attention)  # (B, T, V)
    # Token t is predicted by the logits at t-1; gather just those rows before the
    # float32 log-softmax, so memory stays (n_secret_tokens, V) rather than (B, T, V).
    rows = torch.tensor([r for r, pos in enumerate(positions) for _ in pos], device=device)
    cols = torch.tensor([t for pos in positions for t in pos], device=device)
    logp = torch.log_softmax(logits[rows, cols - 1].float(), dim=-1)  # (n, V)
    nll = -logp.gather(1, ids[rows, cols].unsqueeze(1)).squeeze(1)  # (n,)
    sums = torch.zeros(len(input_ids), dtype=torch.float64, device=device)
    sums.index_add_(0, rows, nll.double())
    return sums.cpu().numpy()


def canary_exposure(model: torch.nn.Module, tokenizer, canaries: list[Canary], *, n_candidates: int = 256,
                    seed: int = 0, batch_size: int = 64, device: str | torch.device = "cpu",
                    autocast_dtype: torch.dtype | None = None) -> list[dict]:
    """Exposure of every canary (inserted and reference) under ``model``.

    The true secret and its ``m = min(n_candidates, |R| - 1)`` candidates are scored in
    the same call (the true secret first, so in the first batch), under identical
    precision and padding.

    Returns:
        One dict per canary: ``canary`` (id), ``repetitions``, ``loss`` (nats, the true
        secret's), ``exposure`` (skew-normal extrapolation, in ``[0, log2 |R|]``),
        ``exposure_empirical`` (rank among the scored secrets), ``max_exposure``
        (``log2 |R|``) and ``n_candidates`` (``m``). Higher exposure = more memorised.
    """
    if n_candidates < 3:
        raise PrivtuneError(f"n_candidates must be at least 3 to fit a distribution, got {n_candidates}",
                            "use a few hundred, e.g. 256")
    results = []
    for canary in canaries:
        m = min(n_candidates, canary.space_size - 1)
        secrets = [canary.secret] + candidate_secrets(canary, m, seed)
        losses = secret_losses(model, tokenizer, canary, secrets, batch_size=batch_size, device=device,
                               autocast_dtype=autocast_dtype)
        loss, candidates = float(losses[0]), losses[1:]
        results.append({
            "canary": canary.id, "repetitions": canary.repetitions, "loss": loss,
            "exposure": extrapolated_exposure(candidates, loss, canary.space_size),
            "exposure_empirical": empirical_exposure(candidates, loss, canary.space_size),
            "max_exposure": math.log2(canary.space_size), "n_candidates": m,
        })
    return results
