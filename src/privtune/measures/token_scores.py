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
from privtune.errors import PrivtuneError
from privtune.models.forward import token_logits
from privtune.train.precision import Runtime


@dataclass
class TokenScores:
    """Per-target-token arrays of shape (N, L-1), aligned with ``EncodedDataset`` rows."""

    nll: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    valid: np.ndarray
    sensitive: np.ndarray

    def rows(self, rows: list[int]) -> "TokenScores":
        """The scores of some records only (a client's, a forget set's)."""
        return TokenScores(self.nll[rows], self.mu[rows], self.sigma[rows], self.valid[rows], self.sensitive[rows])

    def record_mean(self, positions: np.ndarray) -> np.ndarray:
        """Mean NLL per record over ``positions`` (N, L-1) bool; NaN where a record has none."""
        return masked_mean(self.nll, positions)


def missed_level(tagger: str) -> str:
    """The name of the per-record statistics level on the sensitive tokens ``tagger``
    misses (a study with scrubbed methods stores one per tagger in ``record_stats``)."""
    return f"sensitive-missed-{tagger}"


def level_positions(scores: TokenScores, level: str) -> np.ndarray:
    """The positions an attack scores at ``level``: every token of the record, or its sensitive ones."""
    if level not in ("record", "sensitive"):
        raise PrivtuneError(f"unknown attack level {level!r}", "use record or sensitive")
    return scores.valid if level == "record" else scores.sensitive


def masked_mean(values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Mean of (N, L-1) ``values`` per record over ``positions``; NaN where a record has none."""
    counts = positions.sum(axis=1)
    sums = np.where(positions, values, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


#: Vocabulary rows processed at once: small enough that the float32 working set stays
#: in cache (64 x 49k x 4 B = 12.5 MB); the naive whole-batch version was 4x slower.
_ROWS_PER_CHUNK = 64


def _token_statistics(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """NLL of ``targets`` and mean/std of log p over the vocabulary, for (R, V) logits rows."""
    nll, mu, sigma = [], [], []
    for start in range(0, logits.shape[0], _ROWS_PER_CHUNK):
        logp = torch.log_softmax(logits[start:start + _ROWS_PER_CHUNK].float(), dim=-1)
        nll.append(-logp.gather(-1, targets[start:start + _ROWS_PER_CHUNK, None])[:, 0])
        p = logp.exp()
        mean = torch.linalg.vecdot(p, logp)
        # Centred (two-pass) variance: E[logp^2] - mu^2 loses its digits to cancellation in
        # float32 (mu^2 ~ 40 for a spread ~ 0.03: sigma off by up to 6e-5). In place: logp is done with.
        variance = torch.linalg.vecdot(p, logp.sub_(mean[:, None]).square_())
        mu.append(mean)
        sigma.append(variance.sqrt())
    return torch.cat(nll), torch.cat(mu), torch.cat(sigma)


@torch.no_grad()
def score_tokens(model: torch.nn.Module, data: EncodedDataset, runtime: Runtime,
                 batch_size: int = 16, progress=None) -> TokenScores:
    """Run ``model`` over ``data`` once and collect the per-token cache.

    Records go through longest first, each batch cut to its longest record: rows are
    right-padded and the model causal, so a real position never sees the padding after
    it, and cutting that padding changes only the work (on ``customer-sim`` at
    ``max_length`` 128, SmolLM2's records fill 87% of their padded width).
    """
    was_training = model.training
    model.eval()
    n, width = data.input_ids.shape
    valid = data.attention_mask[:, 1:] == 1
    lengths = data.attention_mask.sum(dim=1)
    order = torch.argsort(lengths, descending=True, stable=True)
    out = {k: torch.zeros(n, width - 1) for k in ("nll", "mu", "sigma")}
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        used = max(2, int(lengths[rows].max()))  # columns up to the batch's longest record
        ids = data.input_ids[rows, :used].to(runtime.device)
        with runtime.autocast():
            logits = token_logits(model, ids, data.attention_mask[rows, :used].to(runtime.device))
        # Only real target positions: padding rows cost nothing.
        keep = valid[rows, :used - 1]
        on_device = keep.to(runtime.device)
        stats = _token_statistics(logits[:, :-1][on_device], ids[:, 1:][on_device])
        for name, values in zip(("nll", "mu", "sigma"), stats):
            block = out[name][rows, :used - 1]  # a copy (rows are indexed): filled, then written back
            block[keep] = values.float().cpu()
            out[name][rows, :used - 1] = block
        del logits
        if progress is not None:
            progress(len(rows))
    model.train(was_training)
    valid_np = valid.numpy()
    return TokenScores(nll=out["nll"].numpy(), mu=out["mu"].numpy(), sigma=out["sigma"].numpy(), valid=valid_np,
                       sensitive=data.sensitive[:, 1:].numpy() & valid_np)
