"""Fine-tuning methods as small strategy objects.

A method decides *which parameters train* and *whether the update is private*; the one
training loop does the rest. Registering a method here makes it available to study
configs by name; ``dp-<name>`` is its DP-SGD variant where a DP engine computes exact
per-record gradients for every parameter it trains:

- both engines (privtune: ``train/dp/layers.py``; Opacus: its hooks) cover Linear,
  Embedding and the norms, hence fft, LoRA, head-only, BitFit and prefix tuning, whose
  learned keys/values come from an ``nn.Embedding`` looked up once per record
  (batch-first), so each record's gradient is its own rows;
- neither covers DoRA's magnitude vector (a norm over the whole adapted weight, applied
  through PEFT-internal calls), IA3's scaling vectors (plain parameters multiplied into
  a layer's input or output, held in a ``ParameterDict`` with no forward of its own), or
  prompt tuning, whose virtual tokens PEFT looks up once per batch and repeats, so no
  per-record gradient exists in the graph. ``dp-dora``, ``dp-ia3`` and
  ``dp-prompt-tuning`` are refused with the reason rather than run unclipped (the
  engines also refuse them at attach, loudly, as the tests check).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from privtune.errors import PrivtuneError
from privtune.train import adapters, selective


def _full(model: torch.nn.Module, settings) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _lora(model, settings):
    return adapters.apply_adapter(model, adapters.lora_config(settings), "LoRA",
                                  "set lora.target_modules to names of its Linear layers")


def _dora(model, settings):
    return adapters.apply_adapter(model, adapters.lora_config(settings, dora=True), "DoRA",
                                  "set lora.target_modules to names of its Linear layers")


def _ia3(model, settings):
    return adapters.apply_adapter(model, adapters.ia3_config(settings), "IA3",
                                  "set ia3.target_modules and ia3.feedforward_modules to names of its Linear layers")


def _prefix(model, settings):
    return adapters.apply_adapter(model, adapters.prefix_config(settings), "prefix tuning",
                                  "use lora or prompt-tuning for this model")


def _prompt(model, settings):
    return adapters.apply_adapter(model, adapters.prompt_config(settings), "prompt tuning",
                                  "use lora or prefix-tuning for this model")


@dataclass(frozen=True)
class Method:
    """How a method prepares a model for training.

    Attributes:
        name: the name study configs use.
        private: trains with record-level DP-SGD.
        adapter: trains a PEFT adapter (saved apart from the frozen base).
        settings: the field of a ``methods`` entry it reads (``lora``, ``prefix``, ...), if any.
        no_dp_reason: (non-private methods) why it has no ``dp-`` variant; empty when it
            has one (both DP engines are exact for its trainable parameters).
    """

    name: str
    private: bool
    adapter: bool
    build: Callable[[torch.nn.Module, object], torch.nn.Module]
    settings: str | None = None
    no_dp_reason: str = ""

    def prepare(self, model: torch.nn.Module, settings=None) -> torch.nn.Module:
        """Return the model to train, with ``requires_grad`` set for this method."""
        return self.build(model, settings)

    def private_variant(self) -> "Method":
        return Method(f"dp-{self.name}", True, self.adapter, self.build, self.settings)


_PLAIN = (
    Method("fft", False, False, _full),
    Method("lora", False, True, _lora, "lora"),
    Method("dora", False, True, _dora, "lora",
           no_dp_reason="no DP engine has per-record gradients for DoRA's magnitude vector; use dp-lora"),
    Method("ia3", False, True, _ia3, "ia3",
           no_dp_reason="no DP engine has per-record gradients for IA3's scaling vectors; use dp-lora or dp-bitfit"),
    Method("prefix-tuning", False, True, _prefix, "prefix"),
    Method("prompt-tuning", False, True, _prompt, "prompt",
           no_dp_reason="PEFT computes the virtual tokens once per batch and repeats them, so no DP engine "
                        "sees per-record gradients; use dp-prefix-tuning or dp-lora"),
    Method("head-only", False, False, lambda m, s: selective.train_head_only(m)),
    Method("bitfit", False, False, lambda m, s: selective.train_bitfit(m)),
)

METHODS: dict[str, Method] = {m.name: m for m in _PLAIN} | {
    f"dp-{m.name}": m.private_variant() for m in _PLAIN if not m.no_dp_reason}

#: Names of DP variants that do not exist, with the reason (for a helpful config error).
NO_DP_VARIANT: dict[str, str] = {f"dp-{m.name}": m.no_dp_reason for m in _PLAIN if m.no_dp_reason}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        if name in NO_DP_VARIANT:
            raise PrivtuneError(f"method {name!r} is not available: {NO_DP_VARIANT[name]}") from None
        raise PrivtuneError(f"unknown method {name!r}", f"use one of: {', '.join(METHODS)}") from None
