"""The ``new-token`` design: secrets of tokens the base model never learnt.

Panda et al. (ICLR 2025) get their strongest audits from canaries made of tokens new to
the model: tokens added to the vocabulary, or unused ones it already has (Llama 3's and
Gemma's reserved tokens). The model knows nothing of them, so whatever a fine-tuned
model knows of such a secret, it learnt from the canary. privtune uses the unused ones: adding
tokens would change the vocabulary, and with it every run, the base model's scores and
the saved artefacts of a study, for the sake of its audit. A vocabulary with enough
reserved tokens (named ``reserved`` or ``unused``) gives the pool; one without (SmolLM2,
Pythia) falls back to the word tokens whose input embeddings are least trained, those
nearest the mean embedding (the indicator of under-trained tokens of Land and Bartolo,
*Fishing for Magikarp*, 2024), and every canary says so in its ``design_note``, which
the run's audit result repeats.

The design needs trainable embedding rows: under LoRA and the other adapters the rows
stay frozen, a model can only learn the tokens through its hidden states, and measured
on SmolLM2 it barely does (README "Canary designs": LoRA's AUC 0.53). A run whose
embeddings were frozen says so in its result (:data:`FROZEN_NOTE`); its canaries stay
those of the study, so every run is audited on the same canaries.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from privtune.auditing.designs import DesignInputs, register_canary_design
from privtune.auditing.designs.word_tokens import SECRET_TOKENS, token_canaries, word_tokens
from privtune.data.records import Record

NAME = "new-token"
RESERVED = re.compile(r"reserved|unused", re.IGNORECASE)
#: Share of the word tokens in the fallback pool, and the fewest tokens a pool holds.
POOL_SHARE = 0.05
MIN_POOL = 4 * SECRET_TOKENS
FROZEN_NOTE = ("this run left the input embeddings frozen, so it could learn these tokens only through its hidden "
               "states: a weak audit of it (use the sampled design for adapter methods)")
FALLBACK_NOTE = ("no reserved tokens in this vocabulary: the secrets are the word tokens whose input embeddings are "
                 "least trained (nearest the mean embedding), not tokens new to the model")


def reserved_tokens(tokenizer) -> np.ndarray:
    """Ids of the vocabulary's reserved or unused tokens that encode to themselves in text."""
    candidates = sorted(i for token, i in tokenizer.get_vocab().items() if RESERVED.search(token))
    texts = [tokenizer.decode([i]) for i in candidates]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return np.array([i for i, ids in zip(candidates, encoded) if ids == [i]], dtype=np.int64)


def least_trained_words(inputs: DesignInputs) -> np.ndarray:
    """Word tokens whose input embeddings lie nearest the mean embedding, nearest first."""
    loaded = inputs.base_model()
    words = word_tokens(loaded.tokenizer)
    with torch.no_grad():
        table = loaded.model.get_input_embeddings().weight.double()
        distance = (table[torch.from_numpy(words)] - table.mean(dim=0)).norm(dim=1).numpy()
    size = min(len(words), max(MIN_POOL, int(POOL_SHARE * len(words))))
    return words[np.argsort(distance, kind="stable")[:size]]


@register_canary_design(NAME)
def new_token_secrets(inputs: DesignInputs) -> list[Record]:
    reserved = reserved_tokens(inputs.tokenizer())
    if len(reserved) >= MIN_POOL:
        return token_canaries(inputs, NAME, reserved.tolist())
    return token_canaries(inputs, NAME, least_trained_words(inputs).tolist(), note=FALLBACK_NOTE)
