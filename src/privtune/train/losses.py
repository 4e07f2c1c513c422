"""Per-record language-modelling loss.

DP-SGD clips per *record*, so the loss must stay per record until the clipper has seen
it. A record's loss is its mean next-token NLL over real (non-padding) positions; the
batch loss used for non-private training is the mean of those, so private and
non-private runs optimise the same objective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def per_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLL of ``labels[:, t]`` given ``logits[:, t-1]``, in nats, as float32.

    Args:
        logits: (B, T, V) model outputs for ``input_ids`` of shape (B, T).
        labels: (B, T) the ``input_ids`` with ``IGNORE_INDEX`` where no loss is wanted.

    Returns:
        (B, T-1): entry ``[b, t-1]`` is the loss of token ``t``; 0 where ignored.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels.clamp_min(0), reduction="none")
    return nll * (shift_labels != IGNORE_INDEX)


def per_record_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mean next-token NLL of each record over its non-ignored positions."""
    nll = per_token_nll(logits, labels)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).clamp_min(1)
    return nll.sum(dim=1) / counts
