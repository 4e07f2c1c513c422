"""Fine-tuning methods as small strategy objects.

A method decides *which parameters train* and *whether the update is private*; the one
training loop does the rest. Registering a method here makes it available to study
configs by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model

from privtune.errors import PrivtuneError


@dataclass(frozen=True)
class Method:
    """How a method prepares a model for training.

    Attributes:
        name: the name study configs use.
        private: trains with record-level DP-SGD.
        adapter: trains a PEFT adapter (saved apart from the frozen base).
    """

    name: str
    private: bool
    adapter: bool

    def prepare(self, model: torch.nn.Module, lora=None) -> torch.nn.Module:
        """Return the model to train, with ``requires_grad`` set for this method."""
        if not self.adapter:
            for p in model.parameters():
                p.requires_grad_(True)
            return model
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.target_modules, task_type="CAUSAL_LM")
        try:
            return get_peft_model(model, config)
        except ValueError as e:
            raise PrivtuneError(f"LoRA cannot be applied to this model: {e}",
                                "set lora.target_modules to names of its Linear layers") from None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("fft", private=False, adapter=False),
        Method("lora", private=False, adapter=True),
        Method("dp-fft", private=True, adapter=False),
        Method("dp-lora", private=True, adapter=True),
    )
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise PrivtuneError(f"unknown method {name!r}", f"use one of: {', '.join(METHODS)}") from None
