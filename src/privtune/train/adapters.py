"""PEFT adapters: the study's settings turned into PEFT configs, applied to a base model.

Every adapter is PEFT's own (https://github.com/huggingface/peft), so it saves with
``save_pretrained`` (adapter weights only) and reloads with ``PeftModel.from_pretrained``
onto the same base model:

- LoRA (Hu et al., 2021) and DoRA (Liu et al., 2024: LoRA plus a learned magnitude per
  output column; ``use_dora=True``), both from the ``lora`` settings;
- IA3 (Liu et al., 2022): learned scaling vectors on keys, values and the feed-forward;
- prefix tuning (Li & Liang, 2021): learned keys and values prepended in every layer's
  attention (through the KV cache, so the logits keep the input's length);
- prompt tuning (Lester et al., 2021): learned input embeddings prepended to the input
  (so the logits gain ``num_virtual_tokens`` leading positions;
  :func:`privtune.models.forward.token_logits` drops them).
"""

from __future__ import annotations

from peft import IA3Config, LoraConfig, PeftConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from torch import nn

from privtune.errors import PrivtuneError


def lora_config(settings, dora: bool = False) -> LoraConfig:
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=settings.target_modules, use_dora=dora, task_type="CAUSAL_LM")


def ia3_config(settings) -> IA3Config:
    return IA3Config(target_modules=settings.target_modules, feedforward_modules=settings.feedforward_modules,
                     task_type="CAUSAL_LM")


def prefix_config(settings) -> PrefixTuningConfig:
    return PrefixTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, task_type="CAUSAL_LM")


def prompt_config(settings) -> PromptTuningConfig:
    # SAMPLE_VOCAB starts from embeddings of random vocabulary tokens: the scale the
    # model expects, unlike RANDOM's N(0, 1), which swamps a small model's embeddings.
    init = "SAMPLE_VOCAB" if settings.init == "vocab" else "RANDOM"
    return PromptTuningConfig(num_virtual_tokens=settings.num_virtual_tokens, prompt_tuning_init=init,
                              task_type="CAUSAL_LM")


def apply_adapter(model: nn.Module, config: PeftConfig, name: str, fix: str) -> nn.Module:
    """``get_peft_model`` with PEFT's refusals turned into one-line errors."""
    try:
        return get_peft_model(model, config)
    except (ValueError, TypeError, NotImplementedError) as e:
        problem = " ".join(str(e).split())
        raise PrivtuneError(f"{name} cannot be applied to this model: {problem}", fix) from None
