"""Log-likelihood of continuations given prefixes, each shared prefix computed once.

Canary exposure scores hundreds of candidate secrets after one canary prefix, and PII
inference scores each true value and its decoys after one record prefix: in both, most
of every row is the same prefix. Hugging Face has no batched scoring with a shared
prefix, so this runs each distinct prefix once, repeats its KV cache per row, and runs
only the rows' own tokens after it.
"""

from __future__ import annotations

import numpy as np
import torch

from privtune.attacks.generation import autocast_context, inference_mode, left_pad, pad_id_of
from privtune.errors import PrivtuneError
from privtune.models.forward import is_prompt_learning, token_logits


def check_fast_tokenizer(tokenizer) -> None:
    """Character offsets, which scoring and span masks need, come from fast tokenizers only."""
    if not getattr(tokenizer, "is_fast", False):
        raise PrivtuneError("the tokenizer is not a fast tokenizer, so it has no character offsets",
                            "use a model whose tokenizer has a tokenizer.json")


def _scored_positions(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens whose characters overlap ``[start, end)``."""
    return [t for t, (a, b) in enumerate(offsets) if b > a and a < end and start < b]


def _encode_rows(tokenizer, prefixes: list[str], continuations: list[str],
                 suffixes: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    check_fast_tokenizer(tokenizer)
    texts = [p + c + s for p, c, s in zip(prefixes, continuations, suffixes)]
    enc = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=True)
    positions = []
    for row, (prefix, cont, offsets) in enumerate(zip(prefixes, continuations, enc["offset_mapping"])):
        pos = _scored_positions(offsets, len(prefix), len(prefix) + len(cont))
        if not pos or pos[0] == 0:
            raise PrivtuneError(f"continuation {row} {'has no tokens' if not pos else 'is the first token'}, so its "
                                "likelihood given the prefix is undefined",
                                "give every continuation a non-empty prefix and non-empty text")
        positions.append(pos)
    return enc["input_ids"], positions


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _groups(prefixes: list[str], ids: list[list[int]], positions: list[list[int]],
            batch_size: int) -> list[tuple[int, list[int]]]:
    """Rows that share a prefix, as (shared token count, rows), at most ``batch_size`` rows each.

    The shared part is the rows' common token prefix, cut before their first scored
    token; it is computed once and its KV cache reused for every row.
    """
    by_prefix: dict[str, list[int]] = {}
    for row, prefix in enumerate(prefixes):
        by_prefix.setdefault(prefix, []).append(row)
    groups = []
    for rows in by_prefix.values():
        for first in range(0, len(rows), batch_size):
            chunk = rows[first: first + batch_size]
            shared = min(_common_prefix([ids[r] for r in chunk]), min(positions[r][0] for r in chunk))
            if shared >= 1:
                groups.append((shared, chunk))
            else:  # tokenisations differ from the first token: no sharing
                groups.extend((positions[r][0], [r]) for r in chunk)
    # Batches pad tails to the longest and prefixes to the longest: sort by both.
    return sorted(groups, key=lambda g: (max(positions[r][-1] for r in g[1]) - g[0], g[0], g[1][0]))


def continuation_losses(model: torch.nn.Module, tokenizer, prefixes: list[str], continuations: list[str], *,
                        suffixes: list[str] | None = None, batch_size: int = 64,
                        device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """Sum of NLL (nats) of the tokens overlapping each continuation, given everything before.

    Row ``i`` is the text ``prefixes[i] + continuations[i] + suffixes[i]``, tokenised as
    training text is (``add_special_tokens=True``); its score sums ``-log p`` of every
    token overlapping the continuation's characters (the technique of
    :func:`privtune.measures.exposure.secret_losses`, which equals this with the canary's
    prefix, secret and suffix). Suffix tokens are never scored; they matter only where
    a tokenizer merges them with the continuation's last characters.

    Rows with the same prefix (a true value and its decoys) run their shared prefix
    once: a left-padded pass over the prefixes fills the KV cache, which is then
    repeated for each row and continued with the rows' own tokens (right-padded). Under
    ``autocast_dtype`` only the forward passes run in low precision; the log-softmax is
    float32.

    Returns:
        float64 array of shape ``(len(prefixes),)``.

    Raises:
        PrivtuneError: mismatched lengths, a continuation without tokens or without a
            prefix, or ``batch_size`` < 1.
    """
    suffixes = [""] * len(prefixes) if suffixes is None else list(suffixes)
    if not len(prefixes) == len(continuations) == len(suffixes):
        raise PrivtuneError(f"got {len(prefixes)} prefixes, {len(continuations)} continuations and "
                            f"{len(suffixes)} suffixes", "pass one of each per row")
    if batch_size < 1:
        raise PrivtuneError(f"batch_size must be at least 1, got {batch_size}", "use 64, say")
    if not prefixes:
        return np.zeros(0)
    ids, positions = _encode_rows(tokenizer, list(prefixes), list(continuations), suffixes)
    device = torch.device(device)
    out = np.zeros(len(prefixes))
    pad = pad_id_of(tokenizer)
    with inference_mode(model):
        if is_prompt_learning(model):
            return _score_rows_alone(model, ids, positions, device, autocast_dtype)
        for batch in _pack(_groups(list(prefixes), ids, positions, batch_size), batch_size):
            rows = [r for _, group in batch for r in group]
            out[rows] = _score_batch(model, batch, ids, positions, pad, device, autocast_dtype)
    return out


def _pack(groups: list[tuple[int, list[int]]], batch_size: int) -> list[list[tuple[int, list[int]]]]:
    """Consecutive groups into batches of at most ``batch_size`` rows."""
    batches, current, size = [], [], 0
    for group in groups:
        if current and size + len(group[1]) > batch_size:
            batches.append(current)
            current, size = [], 0
        current.append(group)
        size += len(group[1])
    return batches + ([current] if current else [])


def _score_batch(model, batch: list[tuple[int, list[int]]], ids: list[list[int]], positions: list[list[int]],
                 pad: int, device: torch.device, autocast_dtype: torch.dtype | None) -> np.ndarray:
    """Continuation losses of the rows of ``batch`` (groups of rows with a shared prefix)."""
    group_of = torch.tensor([g for g, (_, rows) in enumerate(batch) for _ in rows], device=device)
    rows = [r for _, group in batch for r in group]
    shared = [s for s, group in batch for _ in group]
    # Stage 1: the shared prefixes, left-padded: (G, P). Keep the last position's logits.
    prefix_ids, prefix_mask = left_pad([ids[group[0]][:s] for s, group in batch], pad)
    prefix_ids, prefix_mask = prefix_ids.to(device), prefix_mask.to(device)
    with autocast_context(device, autocast_dtype):
        first = model(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=_positions(prefix_mask),
                      use_cache=True, logits_to_keep=1)
    cache = first.past_key_values
    cache.reorder_cache(group_of)  # one copy of its group's prefix cache per row
    # Stage 2: each row's tokens after its shared prefix, up to its last scored token: (R, T).
    tails = [ids[r][s: positions[r][-1] + 1] for r, s in zip(rows, shared)]
    width = max(len(t) for t in tails)
    tail_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    tail_mask = torch.zeros_like(tail_ids)
    for i, tail in enumerate(tails):
        tail_ids[i, : len(tail)] = torch.tensor(tail)
        tail_mask[i, : len(tail)] = 1
    tail_ids, tail_mask = tail_ids.to(device), tail_mask.to(device)
    start = prefix_mask.sum(dim=1)[group_of]  # (R,) real prefix length: first tail position id
    tail_positions = start.unsqueeze(1) + torch.arange(width, device=device).unsqueeze(0)
    with autocast_context(device, autocast_dtype):
        logits = model(input_ids=tail_ids, attention_mask=torch.cat([prefix_mask[group_of], tail_mask], dim=1),
                       position_ids=tail_positions, past_key_values=cache, use_cache=True).logits  # (R, T, V)
    # Token at absolute position t of row i is predicted by the logits before it: the
    # stage-1 last logits when t == shared, else the stage-2 logits at t - shared - 1.
    owner, offset, token = [], [], []
    for i, (r, s) in enumerate(zip(rows, shared)):
        for t in positions[r]:
            owner.append(i)
            offset.append(t - s)
            token.append(ids[r][t])
    owner_t, offset_t = torch.tensor(owner, device=device), torch.tensor(offset, device=device)
    token_t = torch.tensor(token, device=device)
    at_start = offset_t == 0
    picked = torch.cat([first.logits[group_of[owner_t[at_start]], -1],
                        logits[owner_t[~at_start], offset_t[~at_start] - 1]])  # (n, V)
    order = torch.cat([at_start.nonzero().squeeze(1), (~at_start).nonzero().squeeze(1)])
    logp = torch.log_softmax(picked.float(), dim=-1)
    nll = -logp.gather(1, token_t[order].unsqueeze(1)).squeeze(1)
    owner_t = owner_t[order]
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device)
    sums.index_add_(0, owner_t, nll.double())
    return sums.cpu().numpy()


def _score_rows_alone(model, ids: list[list[int]], positions: list[list[int]], device: torch.device,
                      autocast_dtype: torch.dtype | None) -> np.ndarray:
    """Continuation losses one whole, unpadded row at a time: the path for prompt-learning
    models, which cannot continue a shared cache (see :mod:`privtune.models.forward`)."""
    out = np.zeros(len(ids))
    for row, (seq, pos) in enumerate(zip(ids, positions)):
        tokens = torch.tensor([seq[: pos[-1] + 1]], device=device)
        with autocast_context(device, autocast_dtype):
            logits = token_logits(model, tokens, torch.ones_like(tokens))[0]  # (T, V)
        cols = torch.tensor(pos, device=device)
        logp = torch.log_softmax(logits[cols - 1].float(), dim=-1)
        out[row] = float(-logp.gather(1, tokens[0, cols].unsqueeze(1)).double().sum())
    return out


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only (left padding gets 0)."""
    return (mask.cumsum(dim=1) - 1).clamp_min(0)
