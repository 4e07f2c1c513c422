"""privtune's ghost-norm / book-keeping DP engine, checked against slow obvious references.

The reference for every per-record quantity is the one ``tests/test_dp_engine.py`` uses
for the Opacus engine (imported from there, not copied): a plain copy of the model run
one record at a time with an ordinary backward pass. Records have different lengths
(right padding). Each Linear can take two exact routes (ghost norms or written-out
per-record gradients), so the model-level checks run with each route forced as well as
with the engine's own choice.
"""

from __future__ import annotations

import inspect
import math
import re
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dp_engine import (
    CASES,
    case,
    clipped_dp_sum,
    dp_accumulate,
    flat_norm,
    make_batch,
    make_model,
    reference_grads,
    rel_err,
    trainable,
)
from torch import nn

from privtune.errors import PrivtuneError
from privtune.models.tiny import TINY_FAMILIES
from privtune.train import dp
from privtune.train.dp import GhostClipper
from privtune.train.dp.ghost_engine import linear_uses_per_sample
from privtune.train.dp.grad_forms import GramCache, Outer, PerSample, Rows, inner, total_sq_norms, total_weighted_sum
from privtune.train.dp.layers import HF_LAYERS, LAYER_RULES, hf_class, rule_for
from privtune.train.losses import per_record_loss

MODES = ("auto", "ghost", "per-sample")


def ghost_dp_sum(model, batch, max_grad_norm, linear_mode="auto"):
    """(per-record norms, clipped gradient sum, choices) from the privtune engine, noise off."""
    clipper = GhostClipper(linear_mode)
    module = clipper.attach(model)
    try:
        norms = dp_accumulate(clipper, module, batch, max_grad_norm)
        choices = clipper.last_choices
        clipper.finish_step(0.0, max_grad_norm, 1.0, torch.Generator().manual_seed(0))
        return norms, [p.grad.clone() for p in clipper.params], choices
    finally:
        clipper.detach()
        model.zero_grad(set_to_none=True)


def ref_norms(ref) -> torch.Tensor:
    return torch.stack([flat_norm(g) for g in ref])


def clipped_reference(ref, c):
    factors = (c / ref_norms(ref)).clamp(max=1.0)
    return factors, [sum(float(f) * g[k].double() for f, g in zip(factors, ref)) for k in range(len(ref[0]))]


# ---------------------------------------------------------------------------- gradient forms
def _random_forms(draw_seed: int, batch: int, length: int, d_in: int, d_out: int):
    g = torch.Generator().manual_seed(draw_seed)
    a = torch.randn(batch, length, d_in, generator=g)
    gr = torch.randn(batch, length, d_out, generator=g)
    ids = torch.randint(0, d_out, (batch, length), generator=g)
    ids2 = torch.randint(0, d_out, (batch, length + 1), generator=g)
    # Weight shape (d_out, d_in) for all: Rows tables have d_out rows of width d_in.
    return [
        Outer(a, gr),
        Outer(torch.randn(batch, length + 2, d_in, generator=g), torch.randn(batch, length + 2, d_out, generator=g)),
        Rows(ids, torch.randn(batch, length, d_in, generator=g), d_out, padding_idx=0),
        Rows(ids2, torch.randn(batch, length + 1, d_in, generator=g), d_out),
        PerSample(torch.randn(batch, d_out, d_in, generator=g)),
    ]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 3), length=st.integers(1, 5),
       d_in=st.integers(1, 4), d_out=st.integers(1, 6))
def test_each_form_matches_its_materialised_gradients(seed, batch, length, d_in, d_out):
    forms = _random_forms(seed, batch, length, d_in, d_out)
    factors = torch.rand(batch, generator=torch.Generator().manual_seed(seed))
    for f in forms:
        dense = f.materialize().double()
        assert dense.shape == (batch, d_out, d_in)
        torch.testing.assert_close(f.sq_norms(GramCache()).double(), dense.flatten(1).pow(2).sum(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(f.weighted_sum(factors).double(), torch.einsum("b,b...->...", factors.double(), dense),
                                   rtol=1e-5, atol=1e-5)
    for x in forms:
        for y in forms:
            want = (x.materialize().double() * y.materialize().double()).flatten(1).sum(1)
            torch.testing.assert_close(inner(x, y).double(), want, rtol=1e-5, atol=1e-4)


def test_rows_ignore_the_padding_row():
    ids = torch.tensor([[0, 2, 0, 2]])
    form = Rows(ids, torch.ones(1, 4, 3), num_rows=4, padding_idx=0)
    dense = form.materialize()
    assert torch.equal(dense[0, 0], torch.zeros(3)) and torch.equal(dense[0, 2], torch.full((3,), 2.0))
    assert float(form.sq_norms()) == pytest.approx(12.0)


def test_sum_of_uses_includes_cross_terms():
    """A tied parameter's per-record gradient is the sum of its uses: the norms do not add."""
    forms = _random_forms(3, batch=2, length=4, d_in=3, d_out=5)
    total = sum(f.materialize().double() for f in forms)
    torch.testing.assert_close(total_sq_norms(forms).double(), total.flatten(1).pow(2).sum(1), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(sum(f.sq_norms() for f in forms).double(), total.flatten(1).pow(2).sum(1), rtol=1e-2)
    factors = torch.tensor([0.3, 1.0])
    torch.testing.assert_close(total_weighted_sum(forms, factors).double(),
                               torch.einsum("b,b...->...", factors.double(), total), rtol=1e-5, atol=1e-4)


def test_gram_cache_keeps_a_shared_input_until_its_last_expected_use():
    x = torch.randn(2, 3, 4)
    cache = GramCache.for_forms([Outer(x, torch.randn(2, 3, 1)), Outer(x.view(2, 3, 4), torch.randn(2, 3, 5))])
    first = cache.gram(x)
    torch.testing.assert_close(first, x @ x.transpose(1, 2))
    assert cache.gram(x.view(2, 3, 4)) is first  # same memory: computed once
    assert cache.gram(x) is not first  # past its expected uses: recomputed, nothing kept
    assert not cache._grams
    y = torch.randn(2, 3, 4)
    assert cache.gram(y) is not cache.gram(y)  # never announced: never kept


# ---------------------------------------------------------------------------- the cost choice
def test_linear_cost_choice():
    # LoRA A (576 -> 8) at 128 tokens: per-record gradients are small; a 576x576 weight is not.
    assert linear_uses_per_sample("auto", 128, 576, 8)
    assert not linear_uses_per_sample("auto", 128, 576, 576)
    assert linear_uses_per_sample("auto", 4096, 576, 576)  # long sequences: Gram matrices cost more
    assert linear_uses_per_sample("per-sample", 1, 4096, 4096)
    assert not linear_uses_per_sample("ghost", 1000, 2, 2)


def test_auto_mode_uses_ghost_norms_for_big_layers_and_per_record_gradients_for_lora():
    model, batch, _ = case("llama", "fft")
    *_, choices = ghost_dp_sum(model, batch, 1.0)
    assert choices["Linear.weight:Outer"] == 15  # 14 projections and the tied head, 12 tokens
    assert choices["Embedding.weight:Rows"] == 1 and choices["LlamaRMSNorm.weight:PerSample"] == 5
    model, batch, _ = case("llama", "lora")
    *_, choices = ghost_dp_sum(model, batch, 1.0)
    assert choices == {"Linear.weight:PerSample": 8}


# ---------------------------------------------------------------------------- per-record gradients
@pytest.mark.parametrize("linear_mode", MODES)
@pytest.mark.parametrize("family,mode", CASES)
def test_norms_and_clipped_sum_match_per_example_backward(family, mode, linear_mode):
    model, batch, ref = case(family, mode)
    want_norms = ref_norms(ref).float()
    c = float(want_norms.median())  # some records clipped, some not
    factors, want = clipped_reference(ref, c)
    assert (factors < 1).any() and (factors == 1).any() and (want_norms > 0).all()
    norms, got, _ = ghost_dp_sum(model, batch, c, linear_mode)
    assert norms.dtype == torch.float32
    assert torch.allclose(norms, want_norms, rtol=1e-5, atol=0), (norms, want_norms)
    assert rel_err(got, want) <= 1e-5
    unclipped = [sum(g[k].double() for g in ref) for k in range(len(ref[0]))]
    assert rel_err(unclipped, want) > 1e-2  # the check has teeth


@pytest.mark.parametrize("family,mode", CASES)
def test_same_output_as_the_opacus_engine(family, mode):
    model, batch, ref = case(family, mode)
    c = float(ref_norms(ref).median())
    norms_o, grads_o = clipped_dp_sum(model, batch, c)
    norms_g, grads_g, _ = ghost_dp_sum(model, batch, c)
    assert torch.allclose(norms_g, norms_o, rtol=1e-5)
    assert rel_err(grads_g, grads_o) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("linear_mode", ["ghost", "per-sample"])
def test_tied_embedding_gradient_sums_both_uses(family, linear_mode):
    """Input embedding = output head: the per-record gradient is the sum of both uses."""
    model, batch, ref = case(family, "fft")
    emb = model.get_input_embeddings()
    assert emb.weight is model.get_output_embeddings().weight
    k = next(i for i, p in enumerate(trainable(model)) if p is emb.weight)
    c = float(ref_norms(ref).median())
    factors, want = clipped_reference(ref, c)
    _, got, choices = ghost_dp_sum(model, batch, c, linear_mode)
    head_form = "Outer" if linear_mode == "ghost" else "PerSample"
    assert choices[f"Linear.weight:{head_form}"] >= 1 and choices[f"{type(emb).__name__}.weight:Rows"] == 1
    assert rel_err([got[k]], [want[k]]) <= 1e-5


class _SharedToy(nn.Module):
    """Every way a parameter can be used twice: a tied head, a Linear and a norm called twice."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.lin = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        h = self.norm(self.lin(torch.tanh(self.lin(h))) + h)
        h = self.norm(h)
        return SimpleNamespace(logits=self.head(h))


@pytest.mark.parametrize("linear_mode", MODES)
def test_parameters_used_twice(linear_mode):
    torch.manual_seed(0)
    model = _SharedToy()
    ids, attn, labels = make_batch(5, length=7, seed=4)
    batch = (ids % 11, attn, labels.where(labels < 0, labels % 11))
    ref = reference_grads(model, batch)
    c = float(ref_norms(ref).median())
    factors, want = clipped_reference(ref, c)
    norms, got, _ = ghost_dp_sum(model, batch, c, linear_mode)
    assert torch.allclose(norms, ref_norms(ref).float(), rtol=1e-5)
    assert rel_err(got, want) <= 1e-5


# ---------------------------------------------------------------------------- DP steps
@pytest.mark.parametrize("family,mode", [(f, "fft") for f in TINY_FAMILIES] + [("gpt-neox", "lora"), ("gemma", "lora")])
def test_dp_step_without_noise_or_clipping_equals_plain_step(family, mode):
    batch = make_batch(5, seed=3)
    private, plain = make_model(family, mode), make_model(family, mode)
    opt_private = torch.optim.SGD(trainable(private), lr=0.5)
    opt_plain = torch.optim.SGD(trainable(plain), lr=0.5)

    clipper = GhostClipper()
    module = clipper.attach(private)
    dp_accumulate(clipper, module, batch, 1e9)
    clipper.finish_step(0.0, 1e9, 5.0, torch.Generator())
    opt_private.step()
    clipper.detach()

    ids, attn, labels = batch
    (per_record_loss(plain(input_ids=ids, attention_mask=attn).logits, labels).sum() / 5).backward()
    opt_plain.step()

    before = [p.detach() for p in trainable(make_model(family, mode))]
    assert max((a - b).abs().max() for a, b in zip(trainable(plain), before)) > 1e-4
    assert rel_err([p.detach() - b for p, b in zip(trainable(private), before)],
                   [p.detach() - b for p, b in zip(trainable(plain), before)]) <= 1e-5


@pytest.mark.parametrize("family,mode", [("llama", "fft"), ("gpt-neox", "lora")])
def test_two_chunks_of_four_equal_one_chunk_of_eight(family, mode):
    model = make_model(family, mode)
    batch = make_batch(8, seed=11)
    norms, _, _ = ghost_dp_sum(model, batch, 1e9)
    c = float(norms.median())
    norms_one, grads_one, _ = ghost_dp_sum(model, batch, c)

    clipper = GhostClipper()
    module = clipper.attach(model)
    first = dp_accumulate(clipper, module, batch, c, rows=slice(0, 4))
    second = dp_accumulate(clipper, module, batch, c, rows=slice(4, 8))
    assert clipper.records_in_step == 8
    clipper.finish_step(0.0, c, 1.0, torch.Generator())
    grads_two = [p.grad.clone() for p in clipper.params]
    clipper.detach()
    assert torch.allclose(torch.cat([first, second]), norms_one, rtol=1e-5)
    assert rel_err(grads_two, grads_one) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt-neox"])
def test_lora_weights_change_after_a_dp_step(family):
    """Opacus #820 (adapters silently left untouched) must not happen here either."""
    model = make_model(family, "lora", lora_init=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(trainable(model), lr=0.1)
    clipper = GhostClipper()
    module = clipper.attach(model)
    for seed in (0, 1):  # first step moves lora_B (A's gradient is 0 while B is 0), second both
        dp_accumulate(clipper, module, make_batch(4, seed=5), 1.0)
        clipper.finish_step(0.0, 1.0, 4.0, torch.Generator().manual_seed(seed))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    clipper.detach()
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p.detach()) != p.requires_grad, n


def test_bf16_autocast_gives_float32_results_close_to_fp32():
    for family, mode in (("qwen", "lora"), ("llama", "fft")):
        model, batch, _ = case(family, mode)
        norms32, grads32, _ = ghost_dp_sum(model, batch, 1e9)
        clipper = GhostClipper()
        module = clipper.attach(model)
        ids, attn, labels = batch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = module(input_ids=ids, attention_mask=attn).logits
        norms16 = clipper.accumulate_clipped(per_record_loss(logits, labels), 1e9)
        clipper.finish_step(0.0, 1e9, 1.0, torch.Generator())
        grads16 = [p.grad.clone() for p in clipper.params]
        clipper.detach()
        model.zero_grad(set_to_none=True)
        assert norms16.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads16)
        assert torch.allclose(norms16, norms32, rtol=5e-2)
        assert rel_err(grads16, grads32) < 5e-2


def test_gradients_left_from_finish_step_are_kept_apart():
    """A second accumulate before zero_grad must neither fail nor mix the old .grad in."""
    model, batch, _ = case("llama", "lora")
    norms_once, grads_once, _ = ghost_dp_sum(model, batch, 1.0)
    clipper = GhostClipper()
    module = clipper.attach(model)
    dp_accumulate(clipper, module, batch, 1.0)
    clipper.finish_step(0.0, 1.0, 1.0, torch.Generator())
    dp_accumulate(clipper, module, batch, 1.0)  # p.grad still set from the step above
    clipper.finish_step(0.0, 1.0, 1.0, torch.Generator())
    assert rel_err([p.grad for p in clipper.params], grads_once) <= 1e-6
    clipper.detach()
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- attach / detach / refusals
def test_detach_restores_a_plain_model_and_allows_reattaching():
    model = make_model("gemma", "fft")
    batch = make_batch(2)
    ids, attn, labels = batch
    with torch.no_grad():
        plain_logits = model(input_ids=ids, attention_mask=attn).logits
    clipper = GhostClipper()
    module = clipper.attach(model)
    assert module is model
    with torch.no_grad():  # the replaced forwards compute the same outputs
        torch.testing.assert_close(module(input_ids=ids, attention_mask=attn).logits, plain_logits, rtol=1e-5, atol=1e-5)
    dp_accumulate(clipper, module, batch, 1.0)
    clipper.detach()
    assert not any("forward" in m.__dict__ for m in model.modules())
    per_record_loss(model(input_ids=ids, attention_mask=attn).logits, labels).sum().backward()
    assert all(p.grad is not None for p in trainable(model))
    model.zero_grad(set_to_none=True)
    again = GhostClipper()
    dp_accumulate(again, again.attach(model), batch, 1.0)
    again.detach()


def test_attaching_twice_is_refused():
    clipper = GhostClipper()
    clipper.attach(make_model("llama", "lora"))
    with pytest.raises(RuntimeError, match="already attached"):
        clipper.attach(make_model("llama", "lora"))
    clipper.detach()


def test_backward_outside_accumulate_is_refused():
    model = make_model("llama", "lora")
    clipper = GhostClipper()
    module = clipper.attach(model)
    ids, attn, labels = make_batch(2)
    with pytest.raises(RuntimeError, match="outside accumulate_clipped"):
        per_record_loss(module(input_ids=ids, attention_mask=attn).logits, labels).sum().backward()
    clipper.detach()


class _WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.lin(x))


class _OwnParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.weight


@pytest.mark.parametrize("model,kind", [(_WithBatchNorm(), "BatchNorm1d"), (_OwnParameter(), "_OwnParameter"),
                                        (nn.Embedding(5, 3, max_norm=1.0), "max_norm"),
                                        (nn.Embedding(5, 3, scale_grad_by_freq=True), "scale_grad_by_freq")])
def test_unsupported_trainable_layers_fail_at_attach(model, kind):
    with pytest.raises(PrivtuneError, match=kind) as err:
        GhostClipper().attach(model)
    assert "freeze" in str(err.value) and "\n" not in str(err.value)


def test_frozen_unsupported_layers_are_fine():
    model = _WithBatchNorm()
    model.bn.requires_grad_(False)
    clipper = GhostClipper()
    assert clipper.attach(model) is model and len(clipper.params) == 2
    clipper.detach()


class _Bypass(nn.Module):
    """Uses its Linear's weight directly too: that use would escape clipping."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x) + x @ self.lin.weight


class _NotBatchFirst(nn.Module):
    """A learned position table looked up with (1, T) ids, shared by all records."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(8, 3)

    def forward(self, x):
        return x + self.pos(torch.arange(x.shape[1])[None])


@pytest.mark.parametrize("model,message", [(_Bypass(), "outside the layers"), (_NotBatchFirst(), "batch-first")])
def test_uses_that_would_escape_clipping_fail_loudly(model, message):
    clipper = GhostClipper()
    module = clipper.attach(model)
    with pytest.raises(RuntimeError, match=message):
        clipper.accumulate_clipped(module(torch.randn(2, 4, 3)).pow(2).sum((1, 2)), 1.0)
    clipper.detach()


def test_bad_arguments():
    with pytest.raises(PrivtuneError, match="unknown linear mode 'fast'; use one of: auto, ghost, per-sample"):
        GhostClipper("fast")
    clipper = GhostClipper()
    with pytest.raises(RuntimeError, match="before attach"):
        clipper.accumulate_clipped(torch.ones(2), 1.0)
    clipper.attach(make_model("llama", "lora"))
    with pytest.raises(ValueError, match="non-empty"):
        clipper.accumulate_clipped(torch.ones(2, 2), 1.0)
    with pytest.raises(PrivtuneError, match="max_grad_norm"):
        clipper.accumulate_clipped(torch.ones(2), 0.0)
    clipper.detach()


# ---------------------------------------------------------------------------- registries
def test_engine_is_registered_as_privtune():
    assert dp.DP_ENGINES["privtune"] is GhostClipper
    assert isinstance(dp.make_clipper("privtune"), GhostClipper)


def _forward_source(cls) -> str:
    """The code of ``forward`` (and Gemma's ``_norm``), comments and blank lines dropped."""
    source = inspect.getsource(cls.forward) + "".join(
        inspect.getsource(getattr(cls, m)) for m in ("_norm",) if m in cls.__dict__)
    lines = (re.sub(r"#.*", "", line).rstrip() for line in source.replace(cls.__name__, "CLS").splitlines())
    return "\n".join(line for line in lines if line)


@pytest.mark.parametrize("kind", list(HF_LAYERS))
def test_registered_hf_layers_compute_what_their_rule_assumes(kind):
    """Each HF class a rule claims must have the reference class's forward, to the letter."""
    classes = [hf_class(*entry) for entry in HF_LAYERS[kind]]
    present = [c for c in classes if c is not None]
    assert present, kind
    reference = {"llama-rmsnorm": "LlamaRMSNorm", "gemma-rmsnorm": "Gemma3RMSNorm",
                 "scaled-embedding": "Gemma3TextScaledWordEmbedding"}[kind]
    ref_cls = next(c for c in present if c.__name__ == reference)
    for cls in present:
        assert _forward_source(cls) == _forward_source(ref_cls), cls.__name__
        assert LAYER_RULES[cls] is LAYER_RULES[ref_cls]


def test_subclasses_with_their_own_forward_are_not_taken_for_their_base():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    assert rule_for(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2)) is LAYER_RULES[nn.Linear]
    assert rule_for(Doubled(2, 2)) is None
    assert rule_for(nn.RMSNorm(4)) is not None and rule_for(nn.Conv1d(2, 2, 1)) is None


# ---------------------------------------------------------------------------- with the training loop
@pytest.mark.parametrize("mode", ["fft", "lora"])
def test_training_loop_runs_with_the_privtune_engine(mode):
    from privtune.config import DPSettings
    from privtune.data.tokenize import EncodedDataset
    from privtune.train.loop import TrainPlan, train
    from privtune.train.precision import Runtime

    ids, attn, _ = make_batch(12, seed=9)
    data = EncodedDataset(records=[None] * 12, input_ids=ids, attention_mask=attn,
                          sensitive=torch.zeros_like(ids, dtype=torch.bool))
    model = make_model("gemma", mode, lora_init=True)
    before = [p.detach().clone() for p in trainable(model)]
    plan = TrainPlan(epochs=1, batch_size=4, physical_batch_size=2, lr=1e-2, weight_decay=0.0, seed=0,
                     dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp", engine="privtune",
                                   unit="record"))  # records without individuals
    result = train(model, data, plan, Runtime(torch.device("cpu"), "fp32"))
    assert result.steps == 3 and 0 < result.privacy.epsilon < math.inf
    assert result.privacy.epsilon == pytest.approx(dp.epsilon_for(1.0, result.privacy.delta, 4 / 12, 3, accountant="rdp"))
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, trainable(model)))
    assert not any("forward" in m.__dict__ for m in model.modules())  # the loop detached the engine
