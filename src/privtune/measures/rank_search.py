"""The exact rank of a canary among every secret of its format, by best-first search.

Carlini et al. (2019, §4.3) estimate the rank of a canary among ``|R| = 10^6`` secrets
by extrapolating from a sample, which overstates exactly the memorised canaries (their
rank lies far beyond anything a sample sees). The exact rank is cheap there instead: a
secret's loss is the sum of its scored tokens' NLLs, each ≥ 0, so a token prefix whose
partial loss already reaches the canary's loss leads to no secret that beats it. This
module searches the trie of token sequences of :mod:`privtune.measures.secret_tokens`:

- the shared context runs through the model once; its KV cache is copied per batch;
- the open prefix with the lowest partial loss is expanded first, a batch at a time; one
  next-token distribution prices all children of a prefix;
- children at or above the canary's loss are dropped; complete sequences below it count
  when they are their secret's canonical tokenization.

Rank convention: ``rank = 1 + #{s ≠ canary : loss(s) < loss(canary)}``, the loss of
every secret (the canary's too) summed along its canonical path by this search; a tie
counts in the canary's favour. A float32 log-softmax can put a near-certain token a hair
above log-probability 0; such NLLs count as 0, so partial losses never fall along a path.

At most ``budget`` prefixes are expanded, and the search stops as soon as more prefixes
are open than the budget has left (each needs an expansion of its own, so it could not
finish): an unmemorised canary, whose open prefixes multiply by about ``|alphabet|`` a
level, gives up after a fraction of the budget. When prefixes are still open, the rank
is bounded: below by 1 + the secrets found, above by that plus every secret an open
prefix could still lead to.
"""

from __future__ import annotations

import copy
import heapq
import time
from dataclasses import dataclass

import numpy as np
import torch

from privtune.attacks.generation import autocast_context, inference_mode, left_pad, pad_id_of
from privtune.measures.secret_tokens import SecretTokenSpace
from privtune.models.forward import is_prompt_learning, token_logits


@dataclass(frozen=True)
class RankBounds:
    """What the search proved about the canary's rank (1 = lowest loss).

    Attributes:
        low, high: the rank lies in ``[low, high]``; equal when the search finished.
        loss: the canary's loss (nats) as the search summed it, the threshold.
        expanded: prefixes expanded (rows of next-token distributions), at most the budget.
        forward_passes: batched model calls, the context's included.
        seconds: wall time of the search.
    """

    low: int
    high: int
    loss: float
    expanded: int
    forward_passes: int
    seconds: float

    @property
    def exact(self) -> bool:
        return self.low == self.high


class _NextToken:
    """Next-token log-probabilities after the context and a token path; the context runs once."""

    def __init__(self, model, context: list[int], device: torch.device, autocast_dtype, pad: int):
        self.model, self.context, self.device, self.autocast_dtype, self.pad = model, context, device, autocast_dtype, pad
        self.per_row = is_prompt_learning(model)  # PEFT rebuilds prompt-learning caches: whole rows instead
        ids = torch.tensor([context], device=device)
        with autocast_context(device, autocast_dtype):
            if self.per_row:
                self.cache, logits = None, token_logits(model, ids, torch.ones_like(ids))
            else:
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                self.cache, logits = out.past_key_values, out.logits
        self.root = torch.log_softmax(logits[0, -1].float(), dim=-1).cpu().numpy()
        self.passes = 1

    def __call__(self, paths: list[tuple[int, ...]]) -> np.ndarray:
        """(len(paths), V) float32 log-probabilities of the token after each path."""
        out = np.empty((len(paths), self.root.shape[0]), dtype=np.float32)
        rows = [i for i, p in enumerate(paths) if p]
        out[[i for i, p in enumerate(paths) if not p]] = self.root
        if rows:
            out[rows] = self._rows([paths[i] for i in rows]) if self.per_row else self._batch([paths[i] for i in rows])
        return out

    def _batch(self, paths: list[tuple[int, ...]]) -> np.ndarray:
        # Paths left-padded (R, T) after the cached context (R, C): every row's last token
        # is in the last column; padding is masked and skipped by the position ids.
        ids, mask = left_pad([list(p) for p in paths], self.pad)
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(len(paths))
        n = len(self.context)
        full_mask = torch.cat([torch.ones(len(paths), n, dtype=mask.dtype, device=self.device), mask], dim=1)
        positions = n + (mask.cumsum(dim=1) - 1).clamp_min(0)
        with autocast_context(self.device, self.autocast_dtype):
            logits = self.model(input_ids=ids, attention_mask=full_mask, position_ids=positions,
                                past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        self.passes += 1
        return torch.log_softmax(logits.float(), dim=-1).cpu().numpy()

    def _rows(self, paths: list[tuple[int, ...]]) -> np.ndarray:
        out = []
        for path in paths:
            ids = torch.tensor([self.context + list(path)], device=self.device)
            with autocast_context(self.device, self.autocast_dtype):
                logits = token_logits(self.model, ids, torch.ones_like(ids))[0, -1]
            out.append(torch.log_softmax(logits.float(), dim=-1).cpu().numpy())
            self.passes += 1
        return np.stack(out)


def _path_loss(next_token: _NextToken, space: SecretTokenSpace, path: tuple[int, ...]) -> float:
    """The loss of one token path: the NLLs of its scored tokens."""
    logps = next_token([path[:i] for i in range(len(path))])
    loss, position = 0.0, 0
    for token, logp in zip(path, logps):
        step = space.steps[position]
        j = int(np.flatnonzero(step.ids == token)[0])
        if step.scored[j]:
            loss += max(-float(logp[token]), 0.0)
        position = int(step.ends[j])
    return loss


def search_rank(model: torch.nn.Module, tokenizer, space: SecretTokenSpace, *, budget: int, batch_size: int = 64,
                device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None) -> RankBounds:
    """Bounds on the rank of ``space.canary``'s secret, exact when the search finishes
    within ``budget`` expanded prefixes.

    Raises:
        TokenizationMismatch: a secret the search would count tokenizes outside the trie.
    """
    started = time.perf_counter()
    canary = space.canary
    device = torch.device(device)
    (canary_path,) = space.canonical_paths(tokenizer, [canary.secret])
    with inference_mode(model):
        next_token = _NextToken(model, space.context, device, autocast_dtype, pad_id_of(tokenizer))
        threshold = _path_loss(next_token, space, canary_path)
        heap: list[tuple[float, int, tuple[int, ...], int, str]] = [(0.0, 0, (), 0, "")]
        pushed, expanded, found = 1, 0, set()
        while heap and len(heap) <= budget - expanded:  # each open prefix costs one expansion
            batch = [heapq.heappop(heap) for _ in range(min(batch_size, budget - expanded, len(heap)))]
            expanded += len(batch)
            leaves: dict[str, list[tuple[int, ...]]] = {}
            for (loss, _, path, position, secret), logp in zip(batch, next_token([n[2] for n in batch])):
                step = space.steps[position]
                totals = loss + np.where(step.scored, np.maximum(-logp[step.ids].astype(np.float64), 0.0), 0.0)
                for j in np.flatnonzero(totals < threshold):
                    child = path + (int(step.ids[j]),)
                    end = int(step.ends[j])
                    grown = secret + step.texts[j][max(0, space.secret_start - position): space.secret_end - position]
                    if end < space.secret_end:
                        heapq.heappush(heap, (float(totals[j]), pushed, child, end, grown))
                        pushed += 1
                    elif grown != canary.secret and grown not in found:
                        leaves.setdefault(grown, []).append(child)
            for secret, canonical in zip(leaves, space.canonical_paths(tokenizer, list(leaves))):
                if canonical in leaves[secret]:
                    found.add(secret)
        low = 1 + len(found)
        high = low + _still_possible([n[4] for n in heap], found | {canary.secret}, canary.alphabet, canary.length)
    return RankBounds(low, min(high, canary.space_size), threshold, expanded, next_token.passes,
                      time.perf_counter() - started)


def _still_possible(open_prefixes: list[str], settled: set[str], alphabet: str, length: int) -> int:
    """How many secrets the open prefixes may still lead to, leaving out the ``settled``
    ones (already counted, or the canary itself)."""
    kept: set[str] = set()
    for prefix in sorted(set(open_prefixes), key=len):
        if not any(prefix[:j] in kept for j in range(len(prefix))):
            kept.add(prefix)
    covered = sum(len(alphabet) ** (length - len(p)) for p in kept)
    return covered - sum(any(s[:j] in kept for j in range(length + 1)) for s in settled)
