"""Independent random streams (issue 14): the noise DP-SGD releases says nothing about which
records were sampled, reruns repeat, and federated client-level DP cannot be replayed from
the stored seed.

The attacker of the issue knows the generator algorithm and the published DP settings,
but not the seed. Torch draws float32 Gaussians on the CPU by Box-Muller over chunks of 16
uniforms, so the released noise gives back the uniforms behind it; when the batch sampler
and the noise share one stream, those uniforms are the sampler's, and membership follows.
"""

import math

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from privtune.config import DPSettings
from privtune.data.records import Record
from privtune.data.tokenize import EncodedDataset
from privtune.models.tiny import tiny_model
from privtune.train import dp, streams
from privtune.train.loop import TrainPlan, train
from privtune.train.precision import resolve_runtime

N_RECORDS, RATE, SIGMA, CLIP = 128, 0.5, 1.0, 1.0


def underlying_uniforms(z: torch.Tensor) -> torch.Tensor:
    """Invert torch's CPU Box-Muller: the float32 uniform each N(0, 1) value was made from.

    In a chunk of 16, values j and j+8 come from uniforms (u1, u2) as
    ``sqrt(-2 log(1 - u1)) * (cos, sin)(2 pi u2)``.
    """
    chunks = z.double().reshape(-1, 2, 8)
    a, b = chunks[:, 0], chunks[:, 1]
    u = torch.empty_like(chunks)
    u[:, 0] = 1 - torch.exp(-(a * a + b * b) / 2)
    u[:, 1] = (torch.atan2(b, a) / (2 * math.pi)) % 1.0
    return u.reshape(-1)


def predicted_batch(noise: torch.Tensor, n: int, rate: float) -> torch.Tensor:
    """The attack: record j is in the batch iff the sampler's j-th float64 uniform < rate.

    That uniform is the low 53 bits of the generator's words 2j and 2j+1; the float32
    uniform behind noise value 2j is the low 24 bits of word 2j, so its top 21 bits are
    ``frac(8 u)``.
    """
    u = underlying_uniforms(noise.flatten()[:16 * math.ceil(2 * n / 16)])
    return (u[0:2 * n:2] * 8) % 1.0 < rate


def test_the_attack_recovers_the_batch_when_sampler_and_noise_share_a_stream():
    """The positive control: on this torch, one seed for both gives every record away."""
    for seed in range(3):
        batch = torch.rand(N_RECORDS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) < RATE
        noise = dp.TorchNoise(torch.Generator().manual_seed(seed)).gaussian((4, 64), std=2.5)
        assert torch.equal(predicted_batch(noise / 2.5, N_RECORDS, RATE), batch)


def _disjoint_records(n: int, length: int = 6) -> EncodedDataset:
    """Records whose tokens avoid the first embedding rows (so those rows carry the noise
    only); record j starts with its own token 16 + j, which names it in a forward."""
    rng = torch.Generator().manual_seed(0)
    ids = torch.randint(16 + n, 512, (n, length), generator=rng)
    ids[:, 0] = 16 + torch.arange(n)
    records = [Record(id=f"r{j}", individual=f"p{j}", text="") for j in range(n)]
    return EncodedDataset(records, ids, torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool))


def _first_step(seed: int, data: EncodedDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(the released gradient of the input embedding at step 1, the records step 1 trained on)."""
    model = tiny_model("gpt-neox")
    embedding = model.get_input_embeddings()
    assert next(model.parameters()) is embedding.weight  # the first noise drawn is this table's
    seen, released = set(), []

    def record_batch(module, args):
        if not released:
            seen.update((args[0][:, 0] - 16).tolist())

    def release(optimizer, args, kwargs):
        if not released:
            released.append(embedding.weight.grad.detach().clone())

    hooks = [embedding.register_forward_pre_hook(record_batch),
             register_optimizer_step_pre_hook(release)]
    plan = TrainPlan(epochs=1, batch_size=int(RATE * len(data)), physical_batch_size=len(data), lr=1e-3,
                     weight_decay=0.0, seed=seed,
                     dp=DPSettings(noise_multiplier=SIGMA, max_grad_norm=CLIP))
    try:
        train(model, data, plan, resolve_runtime("cpu", "fp32"))
    finally:
        for h in hooks:
            h.remove()
    batch = torch.zeros(len(data), dtype=torch.bool)
    batch[sorted(seen)] = True
    return released[0], batch


def test_step_one_released_gradient_does_not_give_the_batch_away():
    """From the released noisy gradient of step 1 alone, the attack does no better than chance."""
    data = _disjoint_records(N_RECORDS)
    untouched = 16 * math.ceil(2 * N_RECORDS / 16)
    correct, total = 0, 0
    for seed in range(3):
        grad, batch = _first_step(seed, data)
        assert 0 < int(batch.sum()) < N_RECORDS
        noise = grad.flatten()[:untouched]
        assert noise.abs().min() > 0  # rows no record touches: noise / (q N), nothing else
        z = noise * (RATE * N_RECORDS) / (SIGMA * CLIP)  # the published settings give the scale
        correct += int((predicted_batch(z, N_RECORDS, RATE) == batch).sum())
        total += N_RECORDS
    # Chance is 1/2 at q = 1/2; the shared stream of the old loop gave 100%.
    assert abs(correct / total - 0.5) < 4 * math.sqrt(0.25 / total), f"{correct}/{total} memberships recovered"


def test_noise_magnitude_does_not_depend_on_the_batch_over_seeds():
    """No attack-specific knowledge: over 10,000 seeds, |noise_k| has the same mean whether
    record j was sampled or not, for the first 16 records and noise values (Welch t)."""
    seeds, n = 10_000, 16
    sampled = np.zeros((seeds, n), dtype=bool)
    magnitude = np.zeros((seeds, 16))
    for s in range(seeds):
        batch = next(dp.poisson_batches(n, RATE, 1, streams.torch_generator(s, streams.BATCHES)))
        sampled[s, batch] = True
        magnitude[s] = dp.make_noise_generator(s, secure=False).gaussian((16,), std=1.0).abs().numpy()
    worst = 0.0
    for j in range(n):
        a, b = magnitude[sampled[:, j]], magnitude[~sampled[:, j]]
        t = (a.mean(0) - b.mean(0)) / np.sqrt(a.var(0) / len(a) + b.var(0) / len(b))
        worst = max(worst, float(np.abs(t).max()))
    assert worst < 5.5  # 256 tests: P(max |t| > 5.5 | independent) ~ 1e-5; the old loop's shared stream gives 11.1


def test_streams_repeat_and_differ_by_purpose_and_seed():
    seeds = {(s, p): streams.stream_seed(s, p) for s in (-1, 0, 1, 2**40) for p in streams.PURPOSES}
    assert len(set(seeds.values())) == len(seeds)
    assert all(streams.stream_seed(s, p) == v for (s, p), v in seeds.items())
    assert streams.stream_seed(0, streams.FED_CLIENT_TRAINING, 1, 2) != streams.stream_seed(0, streams.FED_CLIENT_TRAINING, 2, 1)
    with pytest.raises(ValueError, match="unknown random stream"):
        streams.stream_seed(0, "noise")


def test_dropout_draws_from_the_run_s_stream_and_leaves_the_caller_s_rng_alone():
    """Same seed, same model whatever the global RNG held before; the caller's RNG is untouched."""
    from transformers import AutoModelForCausalLM

    from privtune.models.tiny import tiny_config

    config = tiny_config("gpt-neox")
    config.hidden_dropout = config.attention_dropout = 0.5
    data = _disjoint_records(8)

    def trained(seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        torch.manual_seed(global_seed)
        before = torch.random.get_rng_state()
        plan = TrainPlan(epochs=1, batch_size=4, physical_batch_size=4, lr=1e-2, weight_decay=0.0, seed=seed)
        train(model, data, plan, resolve_runtime("cpu", "fp32"))
        assert torch.equal(torch.random.get_rng_state(), before)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(trained(3, 10), trained(3, 11))
    assert not torch.equal(trained(3, 10), trained(4, 10))
