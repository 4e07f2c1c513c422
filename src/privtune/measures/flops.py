"""Estimated training FLOPs: the matrix products a training run computes, from the model's shapes.

Kaplan et al. (2020, "Scaling Laws for Neural Language Models",
https://arxiv.org/abs/2001.08361, section 2.1) count 2 FLOPs per weight per token forward
and twice that backward ("6N"). That shorthand was off by up to a third here (issue 16):
it charged the input-embedding lookup as a matmul, skipped prompt and prefix tuning's
virtual tokens and the DP engines' per-record work. This estimate keeps Kaplan's
accounting (a multiply-add is 2 FLOPs, only matrix products count) but follows what each
method computes, as ``torch.utils.flop_counter.FlopCounterMode`` counts it:

* forward: 2 per weight of each matmul layer (``nn.Linear``: projections, MLP, LoRA
  matrices, the output head) per position, plus attention's scores and weighted values,
  4 * S_q * S_k * d_attn per block and record (``d_attn`` = query heads x head size);
* backward, input gradients: 2 per weight of each matmul layer whose input depends on a
  trainable parameter (autograd computes no others: with only an untied head training,
  none), and 10 * S_q * S_k * d_attn in each block the gradient reaches (SDPA kernels
  recompute the scores, as torch's counter assumes);
* backward, weight gradients: 2 per trainable matmul weight per position;
* DP-SGD: the clipping engine's per-record work (:data:`CLIPPING_FLOPS`).

Positions are what is computed: every position of the padded batch (the loop pads to the
data set's longest record), and under prompt tuning the virtual tokens too (S = length +
virtual tokens, through every layer and the head); prefix tuning adds its keys to every
attention (S_k = length + prefix). Not counted: elementwise work (norms, activations,
softmax, the loss, the optimiser), biases, the input-embedding lookup and its gradient (a
gather and a scatter-add: no multiply), DP noise, DoRA's weight norm (once per batch, not
per position), and under user-level DP the privtune engine's larger Gram matrices of a
person's records laid end to end (priced here per record). Which matmul layers run, and which
back-propagate, is read off one forward pass of two tokens (:func:`flop_profile`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from privtune.errors import PrivtuneError
from privtune.train.dp.ghost_engine import linear_uses_per_sample
from privtune.train.selective import transformer_blocks


@dataclass(frozen=True)
class MatmulUse:
    """One call of a matmul layer in a forward pass."""

    d_in: int
    d_out: int
    trainable: bool  # its weight trains: a weight-gradient matmul backward
    input_grad: bool  # its input depends on a trainable parameter: an input-gradient matmul backward
    block: int | None  # the transformer block it sits in (None: the head, or outside the blocks)
    input: int  # which input tensor it reads: q/k/v projections share one (numbered in call order)


@dataclass(frozen=True)
class FlopProfile:
    """What a position costs in a model prepared for training (see the module docstring)."""

    matmuls: tuple[MatmulUse, ...]
    blocks: int
    attention_width: int  # query heads x head size
    virtual_tokens: int  # prompt tuning: positions before the input, through every layer
    prefix_tokens: int  # prefix tuning: extra keys and values in every block's attention
    trainable_params: int  # tied weights once
    dense_params: int  # trainable parameters neither a matmul weight nor a lookup table: norms, biases

    @property
    def backward_blocks(self) -> int:
        """Blocks whose attention the gradient passes: those with a back-propagating matmul."""
        return len({m.block for m in self.matmuls if m.input_grad and m.block is not None})


def _trainable_uses(matmuls) -> list[MatmulUse]:
    return [m for m in matmuls if m.trainable]


def _attention_width(config) -> int:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim


def _prompt_learning(model: nn.Module) -> tuple[int, int]:
    """(virtual tokens, prefix tokens) of a PEFT prompt-learning model; (0, 0) otherwise."""
    config = getattr(model, "active_peft_config", None)
    if not getattr(config, "is_prompt_learning", False):
        return 0, 0
    tokens = config.num_virtual_tokens * getattr(config, "num_transformer_submodules", 1)
    return (0, tokens) if str(config.peft_type).endswith("PREFIX_TUNING") else (tokens, 0)


def flop_profile(model: nn.Module) -> FlopProfile:
    """Read the matmul layers of ``model`` off one forward pass of two tokens (in eval
    mode, so no dropout draws from the run's random streams)."""
    blocks = transformer_blocks(model)
    block_of = {id(m): k for k, block in enumerate(blocks) for m in block.modules()}
    uses: list[MatmulUse] = []
    inputs_seen: dict[tuple, int] = {}
    alive: list[torch.Tensor] = []  # so no input's memory is reused by a later one during the pass

    def record(module: nn.Module, inputs, output) -> None:
        x = inputs[0]
        alive.append(x)
        key = (x.data_ptr(), tuple(x.shape), x.stride())
        uses.append(MatmulUse(*_features(module), module.weight.requires_grad,
                              bool(x.requires_grad), block_of.get(id(module)),
                              inputs_seen.setdefault(key, len(inputs_seen))))

    linears = [m for m in model.modules() if isinstance(m, MATMUL_MODULES)]
    if not linears:
        raise PrivtuneError(f"{type(model).__name__} has no nn.Linear layers to count FLOPs of",
                            "use a Hugging Face causal language model")
    handles = [m.register_forward_hook(record) for m in linears]
    was_training = model.training
    device = next(model.parameters()).device
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    try:
        model.eval()
        with torch.enable_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    virtual, prefix = _prompt_learning(model)
    matmul_weights = {id(m.weight) for m in linears}  # a head tied to the input embedding is one
    seen: set[int] = set()
    trainable = dense = 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            trainable += p.numel()
            if id(p) not in matmul_weights and not isinstance(module, nn.Embedding):
                dense += p.numel()
    return FlopProfile(tuple(uses), len(blocks), _attention_width(model.config), virtual, prefix, trainable, dense)


#: The layers whose weights are matrix products: GPT-2-style models use ``Conv1D``.
MATMUL_MODULES = (nn.Linear, Conv1D)


def _features(module: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of a matmul layer: ``Conv1D`` (GPT-2's) stores its weight (in, out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    d_in, d_out = module.weight.shape
    return d_in, d_out


def _opacus_flops(profile: FlopProfile, positions: int) -> int:
    """Opacus hooks (``opacus/grad_sample/linear.py``): an einsum per trainable Linear
    forms each record's weight gradient (2 per weight per position) while autograd still
    forms the summed one; the clipped sum is one more einsum over every trainable
    parameter's per-record gradients (``opacus_engine.py``: 2 per parameter)."""
    per_sample = sum(2 * positions * m.d_in * m.d_out for m in _trainable_uses(profile.matmuls))
    return per_sample + 2 * profile.trainable_params


def _ghost_flops(profile: FlopProfile, positions: int) -> int:
    """privtune's engine (``ghost_engine.py``, ``layers.LinearRule``) replaces autograd's
    weight gradient by a same-cost matmul and adds, per trainable Linear, either the
    clipped sum of written-out per-record gradients (2 per weight) or, where it picks
    ghost norms, the Gram matrices of output gradients and inputs (2 T^2 d_out, and
    2 T^2 d_in once per input: ``GramCache`` shares it between q, k and v); norms and
    biases add their clipped sums (2 per parameter). Embedding rows are index-adds (no
    multiply); the cross term of a head tied to the input embedding (2 T^2 d) is left out."""
    total = 2 * profile.dense_params
    grams: set[int] = set()
    for m in _trainable_uses(profile.matmuls):
        if linear_uses_per_sample("auto", positions, m.d_in, m.d_out):
            total += 2 * m.d_in * m.d_out
            continue
        total += 2 * positions ** 2 * m.d_out
        if m.input not in grams:
            grams.add(m.input)
            total += 2 * positions ** 2 * m.d_in
    return total


#: per DP engine name: the matmul FLOPs its clipping adds per record of ``positions``
CLIPPING_FLOPS = {"opacus": _opacus_flops, "privtune": _ghost_flops}


def _per_record(profile: FlopProfile, width: float, backward: bool) -> float:
    """Matmul FLOPs of one record padded to ``width`` positions: forward, and backward if asked."""
    length = width + profile.virtual_tokens  # positions through every layer and the head
    attention = length * (length + profile.prefix_tokens) * profile.attention_width
    flops = 2 * length * sum(m.d_in * m.d_out for m in profile.matmuls) + 4 * attention * profile.blocks
    if backward:
        backprop = sum(m.d_in * m.d_out for m in profile.matmuls if m.input_grad)
        weight_grads = sum(m.d_in * m.d_out for m in _trainable_uses(profile.matmuls))
        flops += 2 * length * (backprop + weight_grads) + 10 * attention * profile.backward_blocks
    return flops


def training_flops(profile: FlopProfile, records: int, positions: int, dp_engine: str | None = None,
                   forward_records: int = 0, forward_positions: int = 0) -> float:
    """Estimated matmul FLOPs of training on ``records`` padded records of ``positions``
    positions in all, forward and backward, with ``dp_engine``'s clipping work per record
    for a DP-SGD run, plus ``forward_records`` of ``forward_positions`` run forward only
    (a frozen reference model of the same shape). The linear layers' FLOPs are exact;
    attention's use the mean width, exact where every batch has one width and a slight
    underestimate where widths differ (the training loop cuts each batch to its longest
    record; unlearning mixes the forget and retain sets' widths)."""
    flops = 0.0
    if records:
        width = positions / records
        per_record = _per_record(profile, width, backward=True)
        if dp_engine is not None:
            per_record += CLIPPING_FLOPS[dp_engine](profile, round(width) + profile.virtual_tokens)
        flops += records * per_record
    if forward_records:
        flops += forward_records * _per_record(profile, forward_positions / forward_records, backward=False)
    return float(flops)
