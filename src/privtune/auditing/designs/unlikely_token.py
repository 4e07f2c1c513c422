"""The ``unlikely-token`` design: secrets of the words the base model least expects there.

Panda et al. (*Privacy Auditing of Large Language Models*, ICLR 2025) find that canaries
whose tokens the pre-trained model is unlikely to predict give far stronger audits than
random ones: the base model assigns them almost no probability, so training on a canary
moves its likelihood a long way, and the base model's own score (the calibration in the
audit's membership score) removes what the tokens cost before training. Here the base
model reads the prefixes of the first :data:`CONTEXTS` canaries (however many there are); the pool is the
:data:`POOL_SHARE` of word tokens (:mod:`~privtune.auditing.designs.word_tokens`) with the
lowest mean log-probability at the secret's first position, and each canary's secret is
:data:`~privtune.auditing.designs.word_tokens.SECRET_TOKENS` distinct tokens drawn from the
pool by its own stream. A large pool keeps canaries apart: training on some of them
teaches "rare words follow this prefix" much less than it teaches each secret.
"""

from __future__ import annotations

import numpy as np
import torch

from privtune.auditing.designs import DesignInputs, register_canary_design
from privtune.auditing.designs.word_tokens import SECRET_TOKENS, canary_prefix, content_rng, token_canaries, word_tokens
from privtune.data.records import Record

NAME = "unlikely-token"
#: Canary prefixes the base model reads to rank the words.
CONTEXTS = 16
#: Share of the word tokens in the pool, and the fewest tokens it holds (all there are, if fewer).
POOL_SHARE = 0.1
MIN_POOL = 4 * SECRET_TOKENS


def unlikely_pool(inputs: DesignInputs) -> np.ndarray:
    """The word tokens the base model finds least likely after the canaries' prefixes, least likely first."""
    loaded = inputs.base_model()
    words = word_tokens(loaded.tokenizer)
    contexts = [canary_prefix(content_rng(inputs, NAME, i)) for i in range(CONTEXTS)]
    mean_logprob = torch.zeros(len(loaded.tokenizer), dtype=torch.float64)
    with torch.no_grad():
        for text in contexts:
            ids = torch.tensor([loaded.tokenizer(text, add_special_tokens=False)["input_ids"]])
            logits = loaded.model(input_ids=ids).logits[0, -1].double()
            mean_logprob[: logits.numel()] += torch.log_softmax(logits, dim=-1) / len(contexts)
    scores = mean_logprob[torch.from_numpy(words)].numpy()
    size = min(len(words), max(MIN_POOL, int(POOL_SHARE * len(words))))
    return words[np.argsort(scores, kind="stable")[:size]]


@register_canary_design(NAME)
def unlikely_token_secrets(inputs: DesignInputs) -> list[Record]:
    return token_canaries(inputs, NAME, unlikely_pool(inputs).tolist())
