"""DP variants of the parameter-efficient methods: per-record norms and clipped sums from
both engines against a per-example reference (as in ``test_dp_engine.py``), and the
methods without a DP variant failing loudly at the engines too."""

from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch
from test_dp_engine import flat_norm, make_batch, rel_err
from test_methods import prepared

from privtune.errors import PrivtuneError
from privtune.models.forward import token_logits
from privtune.train import dp
from privtune.train.losses import per_record_loss
from privtune.train.methods import METHODS, NO_DP_VARIANT

CASES = [("head-only", "llama"), ("head-only", "gemma"), ("head-only", "gpt-neox"),
         ("bitfit", "llama"), ("bitfit", "qwen"), ("bitfit", "gpt-neox"),
         ("prefix-tuning", "llama"), ("prefix-tuning", "gpt-neox")]


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


@lru_cache(maxsize=None)
def case(name: str, family: str):
    """(model, batch, per-record gradients from one plain backward pass per record)."""
    model = prepared(name, family, seed=1).train()
    batch = make_batch(6, seed=7)
    ref_model = copy.deepcopy(model)
    ids, attn, labels = batch
    ref = []
    for i in range(ids.shape[0]):
        ref_model.zero_grad(set_to_none=True)
        per_record_loss(token_logits(ref_model, ids[i:i + 1], attn[i:i + 1]), labels[i:i + 1]).sum().backward()
        ref.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in _trainable(ref_model)])
    return model, batch, ref


def engine_sum(engine: str, model, batch, c: float):
    clipper = dp.make_clipper(engine)
    module = clipper.attach(model)
    try:
        ids, attn, labels = batch
        norms = clipper.accumulate_clipped(per_record_loss(token_logits(module, ids, attn), labels), c)
        clipper.finish_step(0.0, c, 1.0, torch.Generator().manual_seed(0))
        return norms, [p.grad.clone() for p in clipper.params]
    finally:
        clipper.detach()
        model.zero_grad(set_to_none=True)


def test_dp_variants_are_those_tested_here():
    assert {n for n in METHODS if n.startswith("dp-")} == {"dp-fft", "dp-lora"} | {f"dp-{n}" for n, _ in CASES}


@pytest.mark.parametrize("engine", ["privtune", "opacus"])
@pytest.mark.parametrize("name,family", CASES)
def test_clipped_sum_matches_per_example_reference(name, family, engine):
    model, batch, ref = case(name, family)
    want_norms = torch.stack([flat_norm(g) for g in ref])
    c = float(want_norms.median())  # some records clipped, some not
    factors = (c / want_norms).clamp(max=1.0)
    assert (factors < 1).any() and (factors == 1).any() and (want_norms > 0).all()
    want = [sum(float(f) * g[k].double() for f, g in zip(factors, ref)) for k in range(len(ref[0]))]
    norms, got = engine_sum(engine, model, batch, c)
    assert torch.allclose(norms.double(), want_norms, rtol=1e-5, atol=0)
    assert rel_err(got, want) <= 1e-5
    unclipped = [sum(g[k].double() for g in ref) for k in range(len(ref[0]))]
    assert rel_err(unclipped, want) > 1e-2  # the check has teeth


@pytest.mark.parametrize("engine", ["privtune", "opacus"])
@pytest.mark.parametrize("name", sorted(n.removeprefix("dp-") for n in NO_DP_VARIANT))
def test_methods_without_a_dp_variant_are_refused_by_the_engines_too(name, engine):
    model = prepared(name, "llama").train()
    ids, attn, labels = make_batch(3)
    clipper = dp.make_clipper(engine)
    with pytest.raises((PrivtuneError, RuntimeError, TypeError)):
        module = clipper.attach(model)
        clipper.accumulate_clipped(per_record_loss(token_logits(module, ids, attn), labels), 1.0)
    clipper.detach()
