"""Per-layer rules of the privtune DP engine: which layers it supports, and how.

A rule replaces a supported module's ``forward`` (on the instance, while the engine is
attached) by the same computation routed through a small ``torch.autograd.Function``
whose backward

* returns the gradient of the layer's *input* only, so autograd never forms the
  ordinary summed weight gradient (which DP-SGD would throw away: it needs the
  *clipped* sum), and
* hands the layer's saved input and its output gradient to the engine as a
  :mod:`~privtune.train.dp.grad_forms` form of the per-record gradients.

Plain forward/backward hooks could deliver the same two tensors, but autograd would
still compute and accumulate ``param.grad`` for every trainable weight: one wasted
weight-gradient matmul per layer, about a third of the backward pass of full
fine-tuning. Skipping it is what lets DP cost close to non-private training.

Only the parameter-dependent last step of each layer is custom; the rest (RMS / layer
normalisation, the embedding scale) stays ordinary autograd code, written as in the
model's own class, so input gradients come from autograd as usual. Rules are registered
per class with :func:`register_layer`; a trainable layer with no rule makes
``attach`` fail (see ``ghost_engine.py``).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from privtune.train.dp.grad_forms import GradForm, Outer, PerSample, Rows


class Recorder(Protocol):
    """What a rule needs of the engine during backward."""

    def use_per_sample(self, tokens: int, d_in: int, d_out: int) -> bool:
        """True to materialise a Linear's per-record weight gradients, False for ghost norms."""

    def record(self, module: nn.Module, forms: dict[str, GradForm]) -> None:
        """Take the per-record gradient forms of ``module``'s parameters, by name."""


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast would run a matmul in on ``device``, or None when it is off."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


# ---------------------------------------------------------------------- autograd functions
class _LinearFn(torch.autograd.Function):
    """y = x W^T + b; backward gives dL/dx and passes (x, dL/dy) to ``on_backward``."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype, on_backward):
        if dtype is not None:  # what autocast does to F.linear, done here so x is saved cast
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        ctx.save_for_backward(x, weight)
        ctx.on_backward = on_backward
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out.matmul(weight.to(grad_out.dtype)) if ctx.needs_input_grad[0] else None
        ctx.on_backward(x, grad_out)
        return grad_x, None, None, None, None


class _EmbeddingFn(torch.autograd.Function):
    """y = W[ids]; backward passes (ids, dL/dy) to ``on_backward`` (ids have no gradient)."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, on_backward):
        ctx.save_for_backward(ids)
        ctx.on_backward = on_backward
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        ctx.on_backward(ids, grad_out)
        return None, None, None, None


class _AffineFn(torch.autograd.Function):
    """y = n * (weight + shift) [+ bias] over the last dims: the trainable end of a norm.

    ``shift`` is 0 for ``w * n`` (LayerNorm, Llama's RMSNorm) and 1 for Gemma's
    ``(1 + w) * n``; d y / d w is ``n`` either way.
    """

    @staticmethod
    def forward(ctx, n, weight, bias, shift, on_backward):
        scale = weight if shift == 0 else shift + weight.float()
        y = n * scale
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(n, scale)
        ctx.on_backward = on_backward
        return y

    @staticmethod
    def backward(ctx, grad_out):
        n, scale = ctx.saved_tensors
        grad_n = (grad_out * scale).to(n.dtype) if ctx.needs_input_grad[0] else None
        ctx.on_backward(n, grad_out)
        return grad_n, None, None, None, None


# ---------------------------------------------------------------------- rules
class LayerRule(ABC):
    """How the engine handles one class of layer."""

    params: tuple[str, ...] = ("weight", "bias")  # own parameters it gives per-record gradients for

    def problem(self, module: nn.Module) -> str | None:
        """Why this instance cannot be supported (a configuration we do not handle), or None."""
        return None

    @abstractmethod
    def forward(self, module: nn.Module, recorder: Recorder) -> Callable[..., torch.Tensor]:
        """The replacement ``forward`` of ``module``: same outputs, forms to ``recorder``."""


def _trainable(module: nn.Module, name: str) -> bool:
    p = getattr(module, name, None)
    return isinstance(p, nn.Parameter) and p.requires_grad


class LinearRule(LayerRule):
    """``nn.Linear`` (fused QKV and PEFT's ``lora_A`` / ``lora_B`` are plain Linears too).

    Per call, the cheaper exact form of the weight's per-record gradients: written out
    (B*i*o numbers) when that is no bigger than the book-kept activations (B*T*(i+o)),
    i.e. i*o <= T*(i+o) - LoRA matrices, short sequences; then forming them costs the
    same matmul as the ordinary weight gradient and the norm and weighted sum are cheap.
    Otherwise ghost norms: i*o > T*(i+o) means T^2*(i+o) < T*i*o, so the Gram matrices
    are cheaper than the per-record gradients in time as well as memory.
    """

    def forward(self, module, recorder):
        def on_backward(x: torch.Tensor, g: torch.Tensor) -> None:
            batch = x.shape[0]
            a = x.reshape(batch, -1, x.shape[-1])
            g = g.reshape(batch, -1, g.shape[-1])
            forms: dict[str, GradForm] = {}
            if _trainable(module, "weight"):
                if recorder.use_per_sample(a.shape[1], a.shape[2], g.shape[2]):
                    forms["weight"] = PerSample(torch.bmm(g.float().transpose(1, 2), a.float()))
                else:
                    forms["weight"] = Outer(a, g)
            if _trainable(module, "bias"):
                forms["bias"] = PerSample(g.float().sum(1))
            recorder.record(module, forms)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return _LinearFn.apply(x, module.weight, module.bias, _autocast_dtype(x.device), on_backward)

        return forward


class EmbeddingRule(LayerRule):
    """``nn.Embedding``: per-record gradients as the rows each record looked up."""

    params = ("weight",)

    def problem(self, module):
        if module.max_norm is not None:
            return "max_norm renormalises the table in place during the forward pass"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq makes a record's gradient depend on the other records"
        return None

    def lookup(self, module: nn.Module, recorder: Recorder) -> Callable[[torch.Tensor], torch.Tensor]:
        def on_backward(ids: torch.Tensor, g: torch.Tensor) -> None:
            batch = ids.shape[0]
            ids2 = ids.reshape(batch, -1)
            g = g.reshape(batch, ids2.shape[1], g.shape[-1])
            recorder.record(module, {"weight": Rows(ids2, g, module.num_embeddings, module.padding_idx)})

        def lookup(ids: torch.Tensor) -> torch.Tensor:
            return _EmbeddingFn.apply(ids, module.weight, module.padding_idx, on_backward)

        return lookup

    def forward(self, module, recorder):
        return self.lookup(module, recorder)


class ScaledEmbeddingRule(EmbeddingRule):
    """Gemma's ``*TextScaledWordEmbedding``: ``embedding(ids) * embed_scale`` (a constant)."""

    def forward(self, module, recorder):
        lookup = self.lookup(module, recorder)

        def forward(ids: torch.Tensor) -> torch.Tensor:
            return lookup(ids) * module.embed_scale.to(module.weight.dtype)

        return forward


def _affine_forms(module: nn.Module, n: torch.Tensor, g: torch.Tensor, dims: int) -> dict[str, GradForm]:
    """Per-record gradients of an elementwise weight (and bias) over the last ``dims`` dims."""
    shape = n.shape[-dims:]
    batch = n.shape[0]
    forms: dict[str, GradForm] = {}
    if _trainable(module, "weight"):
        forms["weight"] = PerSample((g.float() * n.float()).reshape(batch, -1, *shape).sum(1))
    if _trainable(module, "bias"):
        forms["bias"] = PerSample(g.float().reshape(batch, -1, *shape).sum(1))
    return forms


class LayerNormRule(LayerRule):
    """``nn.LayerNorm`` (GPT-NeoX): normalise with autograd, then the custom affine step."""

    def forward(self, module, recorder):
        dims = len(module.normalized_shape)

        def on_backward(n, g):
            recorder.record(module, _affine_forms(module, n, g, dims))

        def forward(x: torch.Tensor) -> torch.Tensor:
            n = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
            return _AffineFn.apply(n, module.weight, module.bias, 0, on_backward)

        return forward


class TorchRMSNormRule(LayerRule):
    """``nn.RMSNorm``."""

    params = ("weight",)

    def forward(self, module, recorder):
        dims = len(module.normalized_shape)

        def on_backward(n, g):
            recorder.record(module, _affine_forms(module, n, g, dims))

        def forward(x: torch.Tensor) -> torch.Tensor:
            n = F.rms_norm(x, module.normalized_shape, None, module.eps)
            return _AffineFn.apply(n, module.weight, None, 0, on_backward)

        return forward


class LlamaRMSNormRule(LayerRule):
    """HF's Llama-style RMSNorm: ``weight * (x / rms(x)).to(input dtype)``, stats in fp32."""

    params = ("weight",)

    def forward(self, module, recorder):
        def on_backward(n, g):
            recorder.record(module, _affine_forms(module, n, g, 1))

        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            input_dtype = hidden_states.dtype
            h = hidden_states.to(torch.float32)
            variance = h.pow(2).mean(-1, keepdim=True)
            h = h * torch.rsqrt(variance + module.variance_epsilon)
            return _AffineFn.apply(h.to(input_dtype), module.weight, None, 0, on_backward)

        return forward


class GemmaRMSNormRule(LayerRule):
    """HF's Gemma RMSNorm: ``((x / rms(x)) * (1 + weight)).type_as(x)``, all in fp32."""

    params = ("weight",)

    def forward(self, module, recorder):
        def on_backward(n, g):
            recorder.record(module, _affine_forms(module, n, g, 1))

        def forward(x: torch.Tensor) -> torch.Tensor:
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.eps)
            return _AffineFn.apply(h, module.weight, None, 1.0, on_backward).type_as(x)

        return forward


# ---------------------------------------------------------------------- registry
LAYER_RULES: dict[type[nn.Module], LayerRule] = {}

# (module, class) of HF layers, registered when this transformers version has them. Only
# classes whose forward is exactly the rule's formula; tests/test_ghost_engine.py checks
# the source of each against the family's reference class.
HF_LAYERS: dict[str, tuple[tuple[str, str], ...]] = {
    "llama-rmsnorm": (
        ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"),
        ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm"),
        ("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm"),
        ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm"),
    ),
    "gemma-rmsnorm": (
        ("transformers.models.gemma.modeling_gemma", "GemmaRMSNorm"),
        ("transformers.models.gemma2.modeling_gemma2", "Gemma2RMSNorm"),
        ("transformers.models.gemma3.modeling_gemma3", "Gemma3RMSNorm"),
    ),
    "scaled-embedding": (
        ("transformers.models.gemma.modeling_gemma", "GemmaTextScaledWordEmbedding"),
        ("transformers.models.gemma3.modeling_gemma3", "Gemma3TextScaledWordEmbedding"),
    ),
}
_HF_RULES = {"llama-rmsnorm": LlamaRMSNormRule(), "gemma-rmsnorm": GemmaRMSNormRule(),
             "scaled-embedding": ScaledEmbeddingRule()}


def register_layer(cls: type[nn.Module], rule: LayerRule) -> None:
    """Let the engine handle layers of exactly class ``cls`` with ``rule``."""
    if not isinstance(rule, LayerRule):
        raise TypeError(f"{type(rule).__name__} is not a LayerRule")
    LAYER_RULES[cls] = rule


def hf_class(module_name: str, class_name: str) -> type | None:
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None  # not in this transformers version


def _register_builtin() -> None:
    register_layer(nn.Linear, LinearRule())
    register_layer(nn.Embedding, EmbeddingRule())
    register_layer(nn.LayerNorm, LayerNormRule())
    register_layer(nn.RMSNorm, TorchRMSNormRule())
    for kind, entries in HF_LAYERS.items():
        for module_name, class_name in entries:
            cls = hf_class(module_name, class_name)
            if cls is not None:
                register_layer(cls, _HF_RULES[kind])


_register_builtin()

# Subclasses that keep their base's forward (e.g. NonDynamicallyQuantizableLinear) compute
# the same thing, so they get the base's rule.
_BASES = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm)


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule for ``module``'s class, or None when the engine does not support it."""
    cls = type(module)
    rule = LAYER_RULES.get(cls)
    if rule is not None:
        return rule
    for base in _BASES:
        if isinstance(module, base) and cls.forward is base.forward:
            return LAYER_RULES[base]
    return None
