"""One forward pass per (model, dataset): the per-token cache every measure reads.

Leakage, utility and (later) every score-based membership attack need only per-token
quantities, so they are computed once here and shared:

- ``nll[b, t]``: -log p(x_{t+1} | x_{<=t}) of the (t+1)-th token, in nats;
- ``mu``, ``sigma``: mean and standard deviation of log p(z | x_{<=t}) over the vocabulary
  under the model's own distribution — the normalisers of Min-K%++ (Zhang et al., 2024),
  cheap to take while the logits are in memory;
- ``valid`` / ``sensitive``: which target positions are real tokens / sensitive tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from privtune.data.tokenize import EncodedDataset
from privtune.train.losses import per_token_nll
from privtune.train.precision import Runtime


@dataclass
class TokenScores:
    """Per-target-token arrays of shape (N, L-1), aligned with ``EncodedDataset`` rows."""

    nll: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    valid: np.ndarray
    sensitive: np.ndarray

    def record_mean(self, positions: np.ndarray) -> np.ndarray:
        """Mean NLL per record over ``positions`` (N, L-1) bool; NaN where a record has none."""
        counts = positions.sum(axis=1)
        sums = np.where(positions, self.nll, 0.0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


@torch.no_grad()
def score_tokens(model: torch.nn.Module, data: EncodedDataset, runtime: Runtime,
                 batch_size: int = 16, progress=None) -> TokenScores:
    """Run ``model`` over ``data`` once and collect the per-token cache."""
    was_training = model.training
    model.eval()
    parts = {k: [] for k in ("nll", "mu", "sigma")}
    labels = data.labels
    for start in range(0, len(data), batch_size):
        rows = slice(start, start + batch_size)
        ids = data.input_ids[rows].to(runtime.device)
        attn = data.attention_mask[rows].to(runtime.device)
        with runtime.autocast():
            logits = model(input_ids=ids, attention_mask=attn).logits
        parts["nll"].append(per_token_nll(logits, labels[rows].to(runtime.device)).cpu())
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        p = logp.exp()
        mu = (p * logp).sum(-1)
        var = (p * logp.square()).sum(-1) - mu.square()
        parts["mu"].append(mu.cpu())
        parts["sigma"].append(var.clamp_min(0).sqrt().cpu())
        del logits, logp, p
        if progress is not None:
            progress(min(batch_size, len(data) - start))
    model.train(was_training)
    valid = (data.attention_mask[:, 1:] == 1).numpy()
    return TokenScores(
        nll=torch.cat(parts["nll"]).numpy(), mu=torch.cat(parts["mu"]).numpy(),
        sigma=torch.cat(parts["sigma"]).numpy(), valid=valid,
        sensitive=data.sensitive[:, 1:].numpy() & valid,
    )
