"""The training loop on tiny models of each family, without DP (DP has its own tests)."""

import copy

import pytest
import torch

from privtune.config import LoraSettings
from privtune.data.records import Record, Span
from privtune.data.tokenize import encode_records
from privtune.errors import PrivtuneError
from privtune.measures.efficiency import count_parameters
from privtune.models.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer
from privtune.train.loop import TrainPlan, train
from privtune.train.losses import per_record_loss
from privtune.train.methods import get_method
from privtune.train.precision import Runtime

CPU = Runtime(torch.device("cpu"), "fp32")


def toy_data(n=12):
    tok = tiny_tokenizer()
    recs = [Record(f"r{i}", f"p{i}", f"Customer {i} paid with card 4111 1111 1111 {1000 + i} today.",
                   [Span(27, 46, "CARD")]) for i in range(n)]
    return encode_records(recs, tok, 32)


def mean_loss(model, data):
    with torch.no_grad():
        return per_record_loss(model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits,
                               data.labels).mean().item()


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("method", ["fft", "lora"])
def test_training_lowers_the_loss(family, method):
    data = toy_data()
    model = get_method(method).prepare(tiny_model(family), LoraSettings(r=4))
    before = mean_loss(model, data)
    seen = []
    result = train(model, data, TrainPlan(epochs=3, batch_size=4, physical_batch_size=4, lr=3e-3 if method == "fft" else 3e-2,
                                          weight_decay=0.0, seed=0), CPU, on_epoch_end=lambda e, r: seen.append(e))
    assert seen == [1, 2, 3] and result.steps == 9 and len(result.epoch_seconds) == 3
    assert result.tokens == 3 * int(data.attention_mask.sum())
    assert mean_loss(model, data) < before - 0.15


def test_gradient_accumulation_equals_one_big_batch():
    data = toy_data(8)
    a, b = tiny_model("llama"), tiny_model("llama")
    for physical, model in ((8, a), (3, b)):
        train(model, data, TrainPlan(epochs=1, batch_size=8, physical_batch_size=physical, lr=1e-2,
                                     weight_decay=0.0, seed=0), CPU)
    for pa, pb in zip(a.parameters(), b.parameters()):
        # Adam magnifies float noise on near-zero gradients; 1e-4 is 1% of one step.
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-4)


def test_lora_trains_only_the_adapter():
    model = get_method("lora").prepare(tiny_model("gpt-neox"), LoraSettings(r=2))
    trainable, total = count_parameters(model)
    assert 0 < trainable < total / 10
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    base = copy.deepcopy([p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n])
    train(model, toy_data(), TrainPlan(1, 4, 4, 1e-2, 0.0, 0), CPU)
    after = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(torch.equal(x, y) for x, y in zip(base, after))


def test_unknown_method():
    with pytest.raises(PrivtuneError, match="unknown method 'sft'.*fft, lora, dora, ia3, prefix-tuning, prompt-tuning, "
                                            "head-only, bitfit, dp-fft, dp-lora, dp-prefix-tuning, dp-head-only, dp-bitfit"):
        get_method("sft")
    with pytest.raises(PrivtuneError, match="'dp-ia3' is not available: .*IA3.*use dp-lora"):
        get_method("dp-ia3")
