"""DP-SGD clipping engine, noise and sampling, checked against slow obvious references.

The reference for every per-record quantity is a plain copy of the model, run one record
at a time with an ordinary ``loss.backward()``: no hooks, no vectorisation. Records have
different lengths (right padding), so the checks also cover padding.
"""

from __future__ import annotations

import copy
import math
from functools import lru_cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from scipy import stats
from torch import nn

from privtune.errors import PrivtuneError
from privtune.models.tiny import TINY_FAMILIES, TINY_VOCAB, tiny_model
from privtune.train import dp
from privtune.train.dp import OpacusClipper, SecureNoise, TorchNoise
from privtune.train.losses import IGNORE_INDEX, per_record_loss

LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
                "qwen": ["q_proj", "v_proj"], "gpt-neox": ["query_key_value"]}
MODES = ("fft", "lora")
CASES = [(family, mode) for family in TINY_FAMILIES for mode in MODES]


# ---------------------------------------------------------------------------- helpers
def make_model(family: str, mode: str, *, lora_init=False, seed: int = 0) -> nn.Module:
    """A tiny model in train mode: all parameters trainable (fft) or LoRA r=4 adapters.

    ``lora_init=False`` gives LoRA B a random start, so lora_A has non-zero gradients
    and the per-record check covers both matrices.
    """
    model = tiny_model(family, seed)
    if mode == "lora":
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS[family],
                            init_lora_weights=lora_init, task_type="CAUSAL_LM")
        torch.manual_seed(seed + 1)
        model = get_peft_model(model, config)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model.train()


def make_batch(n: int, length: int = 12, seed: int = 0):
    """(ids, attention_mask, labels) of ``n`` right-padded records of varying length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY_VOCAB, (n, length), generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    attn = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(attn == 0, 0)
    return ids, attn, ids.masked_fill(attn == 0, IGNORE_INDEX)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def reference_grads(model: nn.Module, batch) -> list[list[torch.Tensor]]:
    """Per-record gradients, one backward pass per record, on a plain copy of ``model``."""
    ref = copy.deepcopy(model)
    ids, attn, labels = batch
    out = []
    for i in range(ids.shape[0]):
        ref.zero_grad(set_to_none=True)
        logits = ref(input_ids=ids[i:i + 1], attention_mask=attn[i:i + 1]).logits
        per_record_loss(logits, labels[i:i + 1]).sum().backward()
        out.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in trainable(ref)])
    return out


def flat_norm(tensors) -> torch.Tensor:
    return torch.sqrt(sum(t.double().pow(2).sum() for t in tensors))


def rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return float(flat_norm([g - w for g, w in zip(got, want)]) / flat_norm(want))


def dp_accumulate(clipper, module, batch, max_grad_norm, rows=None):
    ids, attn, labels = batch
    rows = slice(None) if rows is None else rows
    logits = module(input_ids=ids[rows], attention_mask=attn[rows]).logits
    return clipper.accumulate_clipped(per_record_loss(logits, labels[rows]), max_grad_norm)


@lru_cache(maxsize=None)
def case(family: str, mode: str):
    """(model, batch, reference per-record grads) for one family and mode, built once."""
    model = make_model(family, mode)
    batch = make_batch(6, seed=hash((family, mode)) % 1000)
    return model, batch, reference_grads(model, batch)


def clipped_dp_sum(model, batch, max_grad_norm):
    """(per-record norms, clipped gradient sum) from the Opacus clipper with noise off."""
    clipper = OpacusClipper()
    module = clipper.attach(model)
    try:
        norms = dp_accumulate(clipper, module, batch, max_grad_norm)
        clipper.finish_step(0.0, max_grad_norm, 1.0, torch.Generator().manual_seed(0))
        return norms, [p.grad.clone() for p in clipper.params]
    finally:
        clipper.detach()


# ---------------------------------------------------------------------------- per-record gradients
@pytest.mark.parametrize("family,mode", CASES)
def test_per_record_norms_match_per_example_backward(family, mode):
    model, batch, ref = case(family, mode)
    norms, _ = clipped_dp_sum(model, batch, 1e9)
    want = torch.stack([flat_norm(g) for g in ref]).float()
    assert (want > 0).all()
    assert torch.allclose(norms, want, rtol=1e-5, atol=0), (norms, want)


@pytest.mark.parametrize("family,mode", CASES)
def test_clipped_sum_matches_reference(family, mode):
    model, batch, ref = case(family, mode)
    ref_norms = torch.stack([flat_norm(g) for g in ref])
    c = float(ref_norms.median())  # some records clipped, some not
    factors = (c / ref_norms).clamp(max=1.0)
    assert (factors < 1).any() and (factors == 1).any()
    want = [sum(float(f) * g[k].double() for f, g in zip(factors, ref)) for k in range(len(ref[0]))]
    _, got = clipped_dp_sum(model, batch, c)
    assert rel_err(got, want) <= 1e-5
    # Sanity: without clipping the sum would differ clearly, so the check has teeth.
    unclipped = [sum(g[k].double() for g in ref) for k in range(len(ref[0]))]
    assert rel_err(unclipped, want) > 1e-2


def test_lora_models_train_only_adapters():
    for family in TINY_FAMILIES:
        model, _, _ = case(family, "lora")
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert names and all("lora_" in n for n in names)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_tied_embedding_gradient_sums_both_uses(family):
    """The tied weight's per-record gradient must include the input and the output use."""
    model = make_model(family, "fft")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert emb.weight is head.weight
    batch = make_batch(3, seed=7)
    # Reference: untie on a copy so each use's gradient can be seen on its own.
    untied = copy.deepcopy(model)
    untied.get_output_embeddings().weight = nn.Parameter(untied.get_input_embeddings().weight.detach().clone())
    ids, attn, labels = batch
    in_use, out_use = [], []
    for i in range(3):
        untied.zero_grad(set_to_none=True)
        logits = untied(input_ids=ids[i:i + 1], attention_mask=attn[i:i + 1]).logits
        per_record_loss(logits, labels[i:i + 1]).sum().backward()
        in_use.append(untied.get_input_embeddings().weight.grad.clone())
        out_use.append(untied.get_output_embeddings().weight.grad.clone())
    for a, b in zip(in_use, out_use):
        assert a.norm() > 1e-3 * b.norm() and b.norm() > 1e-3 * a.norm()  # both uses matter
    _, got = clipped_dp_sum(model, batch, 1e9)
    tied_index = next(k for k, p in enumerate(trainable(model)) if p is emb.weight)
    want = sum(a + b for a, b in zip(in_use, out_use))
    assert rel_err([got[tied_index]], [want]) <= 1e-5


@pytest.mark.parametrize("family,mode", [(f, "fft") for f in TINY_FAMILIES] + [("gpt-neox", "lora")])
def test_dp_step_without_noise_or_clipping_equals_plain_step(family, mode):
    batch = make_batch(5, seed=3)
    private, plain = make_model(family, mode), make_model(family, mode)
    opt_private = torch.optim.SGD(trainable(private), lr=0.5)
    opt_plain = torch.optim.SGD(trainable(plain), lr=0.5)

    clipper = OpacusClipper()
    module = clipper.attach(private)
    dp_accumulate(clipper, module, batch, 1e9)
    clipper.finish_step(0.0, 1e9, 5.0, torch.Generator())
    opt_private.step()
    clipper.detach()

    ids, attn, labels = batch
    loss = per_record_loss(plain(input_ids=ids, attention_mask=attn).logits, labels).sum() / 5
    loss.backward()
    opt_plain.step()

    before = [p.detach() for p in trainable(make_model(family, mode))]
    moved = [(a - b).abs().max() for a, b in zip(trainable(plain), before)]
    assert max(moved) > 1e-4  # the step did something
    assert rel_err([p.detach() - b for p, b in zip(trainable(private), before)],
                   [p.detach() - b for p, b in zip(trainable(plain), before)]) <= 1e-5


def test_two_chunks_of_four_equal_one_chunk_of_eight():
    model = make_model("llama", "fft")
    batch = make_batch(8, seed=11)
    norms, _ = clipped_dp_sum(model, batch, 1e9)
    c = float(norms.median())  # clip about half the records
    norms_one, grads_one = clipped_dp_sum(model, batch, c)

    clipper = OpacusClipper()
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
    """Opacus #820: DP-LoRA can silently leave adapters untouched. Default LoRA init."""
    model = make_model(family, "lora", lora_init=True)
    names = {id(p): n for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(trainable(model), lr=0.1)
    clipper = OpacusClipper()
    module = clipper.attach(model)
    batch = make_batch(4, seed=5)

    # Without noise the change is the clipped gradient itself: lora_B moves (lora_A's
    # gradient is zero while B is zero, by LoRA's design).
    dp_accumulate(clipper, module, batch, 1.0)
    clipper.finish_step(0.0, 1.0, 4.0, torch.Generator())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lora_b = [n for n in before if "lora_B" in n]
    assert lora_b and all(not torch.equal(before[n], dict(model.named_parameters())[n]) for n in lora_b)

    dp_accumulate(clipper, module, batch, 1.0)
    clipper.finish_step(1.0, 1.0, 4.0, torch.Generator().manual_seed(1))
    optimizer.step()
    clipper.detach()
    after = dict(model.named_parameters())
    for p in trainable(model):
        assert not torch.equal(before[names[id(p)]], p.detach()), names[id(p)]
    for n, p in after.items():
        if not p.requires_grad:
            assert torch.equal(before[n], p.detach()), n  # the frozen base stays put


def test_bf16_autocast_gives_float32_sums_close_to_fp32():
    model = make_model("qwen", "lora")
    batch = make_batch(4, seed=2)
    norms32, grads32 = clipped_dp_sum(model, batch, 1e9)
    clipper = OpacusClipper()
    module = clipper.attach(model)
    ids, attn, labels = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = module(input_ids=ids, attention_mask=attn).logits
    norms16 = clipper.accumulate_clipped(per_record_loss(logits, labels), 1e9)
    clipper.finish_step(0.0, 1e9, 1.0, torch.Generator())
    grads16 = [p.grad.clone() for p in clipper.params]
    clipper.detach()
    assert norms16.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads16)
    assert torch.allclose(norms16, norms32, rtol=5e-2)
    assert rel_err(grads16, grads32) < 5e-2


# ---------------------------------------------------------------------------- attach / detach
def test_detach_restores_a_plain_model_and_allows_reattaching():
    model = make_model("llama", "lora")
    batch = make_batch(2)
    clipper = OpacusClipper()
    module = clipper.attach(model)
    dp_accumulate(clipper, module, batch, 1.0)
    clipper.detach()
    assert not hasattr(model, "autograd_grad_sample_hooks")
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    ids, attn, labels = batch
    per_record_loss(model(input_ids=ids, attention_mask=attn).logits, labels).sum().backward()
    assert all(p.grad is not None for p in trainable(model))
    model.zero_grad(set_to_none=True)
    again = OpacusClipper()
    dp_accumulate(again, again.attach(model), batch, 1.0)
    again.detach()


def test_eval_mode_is_refused_before_backward():
    model = make_model("llama", "lora")
    clipper = OpacusClipper()
    module = clipper.attach(model)
    model.eval()
    ids, attn, labels = make_batch(2)
    loss = per_record_loss(module(input_ids=ids, attention_mask=attn).logits, labels)
    with pytest.raises(RuntimeError, match="train mode"):
        clipper.accumulate_clipped(loss, 1.0)
    clipper.detach()


def test_attaching_twice_is_refused():
    clipper = OpacusClipper()
    clipper.attach(make_model("llama", "lora"))
    with pytest.raises(RuntimeError, match="already attached"):
        clipper.attach(make_model("llama", "lora"))
    clipper.detach()


class _WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.lin(x))


class _ScaledByBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)

    def forward(self, x):
        return x * self.weight * self.scale


@pytest.mark.parametrize("model,kind", [(_WithBatchNorm(), "BatchNorm1d"), (_ScaledByBuffer(), "_ScaledByBuffer")])
def test_unsupported_trainable_layers_fail_at_attach(model, kind):
    with pytest.raises(PrivtuneError, match=kind) as err:
        OpacusClipper().attach(model)
    assert "freeze" in str(err.value)


def test_frozen_model_is_refused():
    model = make_model("llama", "fft")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(PrivtuneError, match="no trainable parameters"):
        OpacusClipper().attach(model)


@settings(max_examples=200, deadline=None)
@given(norms=st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=20),
       c=st.floats(1e-4, 1e4))
def test_clip_factors_bound_norms_and_leave_small_gradients_alone(norms, c):
    n = torch.tensor(norms, dtype=torch.float64)
    f = dp.clip_factors(n, c)
    assert ((f > 0) & (f <= 1)).all()
    assert (n * f <= c * (1 + 1e-12)).all()
    assert (f[n <= c] == 1).all()


def test_engine_registry():
    assert dp.DP_ENGINES["opacus"] is OpacusClipper
    assert isinstance(dp.make_clipper("opacus"), OpacusClipper)
    with pytest.raises(PrivtuneError, match=r"^unknown DP engine 'ghost'; use one of: opacus, privtune\.$"):
        dp.make_clipper("ghost")
    with pytest.raises(ValueError, match="registered twice"):
        dp.register_engine("opacus")(OpacusClipper)


# ---------------------------------------------------------------------------- noise
def _noisy_empty_step(noise, sigma=2.0, c=0.5, expected=4.0):
    model = make_model("llama", "fft")
    clipper = OpacusClipper()
    clipper.attach(model)
    clipper.finish_step(sigma, c, expected, noise)  # an empty Poisson batch: noise only
    grads = torch.cat([p.grad.flatten() for p in clipper.params])
    clipper.detach()
    return grads


@pytest.mark.parametrize("secure", [False, True])
def test_noise_has_std_sigma_c_over_expected_batch(secure):
    grads = _noisy_empty_step(dp.make_noise_generator(0, secure=secure))
    want = 2.0 * 0.5 / 4.0
    assert grads.numel() > 50_000
    assert abs(float(grads.std()) / want - 1) < 0.02
    assert abs(float(grads.mean())) < 5 * want / math.sqrt(grads.numel())


def test_no_noise_and_no_records_gives_zero_gradient():
    grads = _noisy_empty_step(dp.make_noise_generator(0, secure=False), sigma=0.0)
    assert torch.count_nonzero(grads) == 0


def test_seeded_noise_reproduces_and_secure_noise_does_not():
    seeded = [_noisy_empty_step(dp.make_noise_generator(7, secure=False)) for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])
    assert not torch.equal(seeded[0], _noisy_empty_step(dp.make_noise_generator(8, secure=False)))
    secure = [_noisy_empty_step(dp.make_noise_generator(7, secure=True)) for _ in range(2)]
    assert not torch.equal(secure[0], secure[1])


def test_secure_gaussian_is_standard_normal():
    source = dp.make_noise_generator(0, secure=True)
    assert isinstance(source, SecureNoise) and source.secure
    z = source.gaussian((101, 99), std=1.0)  # odd count: Box-Muller pairs trimmed
    assert z.shape == (101, 99) and z.dtype == torch.float32
    assert stats.kstest(z.flatten().double().numpy(), "norm").pvalue > 1e-6
    u = source.uniform(100_000)
    assert u.dtype == torch.float64 and 0 <= float(u.min()) and float(u.max()) < 1
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-6


def test_torch_noise_is_normal_with_given_std():
    z = TorchNoise(torch.Generator().manual_seed(0)).gaussian((200, 100), std=3.0)
    assert stats.kstest(z.flatten().double().numpy() / 3.0, "norm").pvalue > 1e-6


def test_finish_step_rejects_bad_arguments():
    clipper = OpacusClipper()
    clipper.attach(make_model("llama", "lora"))
    with pytest.raises(PrivtuneError, match="noise multiplier"):
        clipper.finish_step(-1.0, 1.0, 4.0, torch.Generator())
    with pytest.raises(PrivtuneError, match="max_grad_norm"):
        clipper.finish_step(1.0, 0.0, 4.0, torch.Generator())
    clipper.detach()


# ---------------------------------------------------------------------------- sampling
def test_poisson_batches_are_deterministic_and_have_the_right_rate():
    n, q, steps = 50, 0.1, 2000
    runs = [list(dp.poisson_batches(n, q, steps, torch.Generator().manual_seed(3))) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    counts = torch.zeros(n)
    for batch in runs[0]:
        assert batch.dtype == torch.int64
        assert torch.equal(batch, batch.unique())  # sorted, no repeats
        counts[batch] += 1
    # Each record independently in each batch with prob q: binomial(steps, q) counts.
    sd = math.sqrt(steps * q * (1 - q))
    assert (counts - steps * q).abs().max() < 5 * sd
    sizes = torch.tensor([len(b) for b in runs[0]], dtype=torch.float64)
    assert abs(float(sizes.mean()) - n * q) < 5 * math.sqrt(n * q * (1 - q) / steps)


def test_poisson_batches_can_be_empty_and_secure():
    batches = list(dp.poisson_batches(10, 0.05, 200, dp.make_noise_generator(0, secure=True)))
    assert len(batches) == 200
    assert any(len(b) == 0 for b in batches) and any(len(b) > 0 for b in batches)
    assert all(b.numel() == 0 or (0 <= int(b.min()) and int(b.max()) < 10) for b in batches)


@pytest.mark.parametrize("rate", [0.0, 1.5])
def test_poisson_batches_reject_bad_rates(rate):
    with pytest.raises(PrivtuneError, match="sample rate"):
        next(dp.poisson_batches(10, rate, 1, torch.Generator()))


def test_physical_chunks():
    idx = torch.arange(10)
    chunks = list(dp.physical_chunks(idx, 4))
    assert [len(c) for c in chunks] == [4, 4, 2] and torch.equal(torch.cat(chunks), idx)
    assert list(dp.physical_chunks(torch.arange(0), 4)) == []
    with pytest.raises(PrivtuneError, match="physical batch size"):
        list(dp.physical_chunks(idx, 0))


# ---------------------------------------------------------------------------- with the training loop
def test_training_loop_runs_dp_lora_and_reports_epsilon():
    """The loop's private path uses exactly this package's API."""
    from privtune.config import DPSettings
    from privtune.data.tokenize import EncodedDataset
    from privtune.train.loop import TrainPlan, train
    from privtune.train.precision import Runtime

    ids, attn, _ = make_batch(12, seed=9)
    data = EncodedDataset(records=[None] * 12, input_ids=ids, attention_mask=attn,
                          sensitive=torch.zeros_like(ids, dtype=torch.bool))
    model = make_model("llama", "lora", lora_init=True)
    before = [p.detach().clone() for p in trainable(model)]
    plan = TrainPlan(epochs=1, batch_size=4, physical_batch_size=2, lr=1e-2, weight_decay=0.0, seed=0,
                     dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp", unit="record"))
    result = train(model, data, plan, Runtime(torch.device("cpu"), "fp32"))
    assert result.steps == 3
    assert 0 < result.privacy.epsilon < math.inf
    assert result.privacy.epsilon == pytest.approx(
        dp.epsilon_for(1.0, result.privacy.delta, 4 / 12, 3, accountant="rdp"))
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, trainable(model)))
    assert not hasattr(model, "autograd_grad_sample_hooks")  # the loop detached the clipper
