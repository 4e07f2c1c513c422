"""Tiny randomly initialised models of each architecture family privtune claims.

They exist so every code path (training, DP, measures, the whole study) can be tested
in seconds on a CPU without any download. Each family keeps the structural quirks of its
real checkpoints: Llama and Gemma tie the input embedding to the output head, GPT-NeoX
fuses Q/K/V into one Linear and uses LayerNorm with biases, Gemma scales embeddings and
uses its own RMSNorm, Qwen has biases on its Q/K/V projections.

The tokenizer is a byte-level BPE with character offsets like the real ones, shipped as
``tiny_tokenizer.json`` beside this module rather than trained at run time: trained on
the faker text of :func:`tokenizer_training_text`, it changed when the text did (the
text once held birth dates counted from today, so 124 of its 512 tokens changed with the
calendar). :func:`train_tiny_tokenizer` rebuilds the file (``python -m
privtune.models.tiny``); a new file is a new tiny tokenizer, so its digest stored in
``tests/test_data_digest.py`` changes with it.
"""

from __future__ import annotations

import random
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    Gemma3TextConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

TINY_FAMILIES = ("llama", "gpt-neox", "gemma", "qwen")
TINY_VOCAB = 512
_HIDDEN, _LAYERS, _HEADS, _KV_HEADS, _FFN = 64, 2, 4, 2, 128


def tiny_config(family: str) -> PretrainedConfig:
    """A two-layer config of ``family`` with the tiny tokenizer's vocabulary."""
    common = dict(vocab_size=TINY_VOCAB, hidden_size=_HIDDEN, num_hidden_layers=_LAYERS,
                  num_attention_heads=_HEADS, intermediate_size=_FFN,
                  max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return LlamaConfig(**common, num_key_value_heads=_KV_HEADS, tie_word_embeddings=True)
    if family == "gpt-neox":
        return GPTNeoXConfig(**common, tie_word_embeddings=False, rotary_pct=0.25,
                             use_parallel_residual=True)
    if family == "gemma":
        return Gemma3TextConfig(**common, num_key_value_heads=_KV_HEADS, head_dim=16,
                                tie_word_embeddings=True, sliding_window=64,
                                layer_types=["sliding_attention", "full_attention"])
    if family == "qwen":
        return Qwen2Config(**common, num_key_value_heads=_KV_HEADS, tie_word_embeddings=False)
    raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}")


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised tiny causal LM of ``family`` (fp32, eval mode off)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)


TOKENIZER_FILE = "tiny_tokenizer.json"


def tokenizer_training_text() -> list[str]:
    """The faker text the shipped tokenizer was trained on (seeded; dates from
    :data:`~privtune.data.dates.REFERENCE_DATE`, never today)."""
    from faker import Faker

    from privtune.data.dates import date_of_birth

    fake = Faker(["en_US", "en_GB"])
    fake.seed_instance(1234)
    rng = random.Random(1234)  # for the dates; a two-locale Faker lends no generator of its own
    lines = []
    for _ in range(400):
        lines.append(f"{fake.name()} <{fake.email()}> {fake.phone_number()} {fake.address()}")
        lines.append(fake.sentence(nb_words=14))
        lines.append(f"Order {fake.bothify('??-#######')} card {fake.credit_card_number()} "
                     f"born {date_of_birth(rng, 0, 115).isoformat()}")
    return lines


def train_tiny_tokenizer() -> str:
    """A freshly trained tiny tokenizer, as JSON: how ``tiny_tokenizer.json`` was made."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(tokenizer_training_text(), trainer)
    return tok.to_str(pretty=True)


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    return resources.files("privtune.models").joinpath(TOKENIZER_FILE).read_text(encoding="utf-8")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 512-token byte-level BPE tokenizer with offsets, pad ``<pad>``, eos ``</s>``."""
    from tokenizers import Tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                   pad_token="<pad>", bos_token="<s>", eos_token="</s>")


if __name__ == "__main__":  # rebuild the shipped file: python -m privtune.models.tiny
    path = Path(__file__).with_name(TOKENIZER_FILE)
    path.write_text(train_tiny_tokenizer() + "\n", encoding="utf-8")
    print(f"wrote {path}")
