"""Token logits that line up with the input for every model privtune trains.

Prompt tuning (PEFT) prepends ``num_virtual_tokens`` learned embeddings to the input, so
its logits have that many extra *leading* positions; prefix tuning puts its prefix in
the KV cache instead and keeps the input's length. :func:`token_logits` returns the
logits of the real positions only, so ``logits[:, t]`` predicts token ``t + 1`` of the
input whatever the method, and every loss, measure and attack reads the same thing.

Both prompt-learning methods also defeat the fast paths some attacks take (left-padded
batches with explicit position ids, caches built in one call and continued in another):
PEFT ignores position ids under prompt tuning and replaces any cache passed to a prefix-
tuned model's forward with a fresh prefix. :func:`is_prompt_learning` tells those callers
to take the plain path (one unpadded record per call, whole sequences) instead.
"""

from __future__ import annotations

import torch


def is_prompt_learning(model: torch.nn.Module) -> bool:
    """True for a PEFT prompt-learning model (prefix or prompt tuning)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def token_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits of the T input positions, virtual-token positions dropped."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[:, logits.shape[1] - input_ids.shape[1]:]
