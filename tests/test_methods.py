"""Every parameter-efficient method on tiny models: what it trains, that it learns, that
it saves and reloads to the same logits, and that its trainable count is the textbook one."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from test_loop import CPU, mean_loss, toy_data
from transformers import AutoModelForCausalLM

from privtune.config import IA3Settings, LoraSettings, PrefixSettings, PromptSettings
from privtune.measures.efficiency import count_parameters
from privtune.models.forward import token_logits
from privtune.models.tiny import tiny_config, tiny_model, tiny_tokenizer
from privtune.study.runner import save_artifact
from privtune.train.loop import TrainPlan, train
from privtune.train.methods import METHODS, get_method

SETTINGS = {"lora": LoraSettings(r=2), "prefix": PrefixSettings(num_virtual_tokens=3),
            "prompt": PromptSettings(num_virtual_tokens=3), "ia3": IA3Settings(), None: None}
NEW = ("dora", "ia3", "prefix-tuning", "prompt-tuning", "head-only", "bitfit")
#: learning rates at which three epochs on the toy set clearly lower the loss
LR = {"dora": 3e-2, "ia3": 1e-1, "prefix-tuning": 1e-1, "prompt-tuning": 1e-1, "head-only": 3e-3, "bitfit": 3e-2}
#: loss drop those three epochs must reach: prompt tuning's 3 x 64 numbers move a random
#: model least (about 0.06 nats), the rest 0.15 or more
DROP = {"prompt-tuning": 0.03}
FAMILIES = ("llama", "gpt-neox")


def prepared(name: str, family: str, seed: int = 0) -> torch.nn.Module:
    method = get_method(name)
    torch.manual_seed(seed)
    return method.prepare(tiny_model(family), SETTINGS[method.settings])


def expected_trainable(name: str, family: str) -> int:
    """The count from the architecture, worked out by hand rather than read off the model."""
    c = tiny_config(family)
    d, layers, ffn = c.hidden_size, c.num_hidden_layers, c.intermediate_size
    kv = d // c.num_attention_heads * getattr(c, "num_key_value_heads", c.num_attention_heads)
    if family == "llama":
        block = d * d * 2 + d * kv * 2 + 3 * d * ffn + 2 * d  # q, o, k, v, gate/up/down, two norms
        return {
            "dora": layers * (2 * (d + d) + 2 * (d + kv) + d + kv),  # LoRA r=2 on q, v + magnitudes
            "ia3": layers * (kv + kv + ffn),  # k, v outputs; down_proj input
            "prefix-tuning": 3 * layers * 2 * kv,  # keys and values of the KV heads
            "prompt-tuning": 3 * d,
            "head-only": block + d + c.vocab_size * d,  # tied head = the input embedding, counted once
            "bitfit": layers * 2 * d + d,  # norm weights only: Llama has no biases
        }[name]
    # GPT-NeoX: fused QKV, untied head without bias, LayerNorms and Linears with biases.
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * ffn + ffn) + (ffn * d + d) + 2 * 2 * d
    return {
        "dora": layers * (2 * (d + 3 * d) + 3 * d),
        "ia3": layers * (3 * d + ffn),  # query_key_value output; dense_4h_to_h input
        "prefix-tuning": 3 * layers * 2 * d,
        "prompt-tuning": 3 * d,
        "head-only": block + 2 * d + c.vocab_size * d,
        "bitfit": layers * (2 * 2 * d + 3 * d + d + ffn + d) + 2 * d,
    }[name]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", NEW)
def test_trainable_parameter_counts(name, family):
    trainable, total = count_parameters(prepared(name, family))
    assert trainable == expected_trainable(name, family)
    assert trainable < total


def test_head_only_trains_the_last_block_final_norm_and_tied_head():
    model = prepared("head-only", "llama")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("model.layers.1.") for n in names) and not any(n.startswith("model.layers.0.") for n in names)
    assert {"model.norm.weight", "model.embed_tokens.weight"} <= names  # lm_head is that same tensor
    assert model.lm_head.weight.requires_grad


def test_bitfit_trains_biases_where_the_family_has_them():
    llama = {n for n, p in prepared("bitfit", "llama").named_parameters() if p.requires_grad}
    assert llama and all("norm" in n for n in llama)
    qwen = {n for n, p in prepared("bitfit", "qwen").named_parameters() if p.requires_grad}
    assert {n for n in qwen if n.endswith("bias")} == {f"model.layers.{i}.self_attn.{x}_proj.bias"
                                                       for i in range(2) for x in "qkv"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", NEW)
def test_method_learns_and_changes_only_its_parameters(name, family):
    data = toy_data()
    model = prepared(name, family)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = mean_loss_aligned(model, data)
    train(model, data, TrainPlan(epochs=3, batch_size=4, physical_batch_size=4, lr=LR[name], weight_decay=0.0,
                                 seed=0), CPU)
    assert mean_loss_aligned(model, data) < before - DROP.get(name, 0.1)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def mean_loss_aligned(model, data) -> float:
    """``test_loop.mean_loss`` through :func:`token_logits` (prompt tuning adds positions)."""
    return mean_loss(_Aligned(model), data)


class _Aligned(torch.nn.Module):
    """Calls ``model`` and returns logits of the input positions only."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=token_logits(self.model, input_ids, attention_mask))


def _reload(name: str, family: str, path: Path) -> torch.nn.Module:
    if METHODS[name].adapter:
        return PeftModel.from_pretrained(tiny_model(family), path)
    return AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", NEW)
def test_saved_artifact_reloads_to_identical_logits(name, family, tmp_path):
    data = toy_data(4)
    model = prepared(name, family)
    train(model, data, TrainPlan(1, 4, 4, LR[name], 0.0, 0), CPU)
    ctx = SimpleNamespace(artifacts_dir=tmp_path, loaded=SimpleNamespace(tokenizer=tiny_tokenizer()))
    path = save_artifact(ctx, SimpleNamespace(run_id="run"), model)
    files = {p.name for p in path.iterdir()}
    assert ("adapter_model.safetensors" in files) == METHODS[name].adapter
    assert "model.safetensors" in files or "adapter_model.safetensors" in files
    reloaded = _reload(name, family, path).eval()
    model.eval()
    with torch.no_grad():
        want = token_logits(model, data.input_ids, data.attention_mask)
        got = token_logits(reloaded, data.input_ids, data.attention_mask)
    assert want.shape == (4, data.input_ids.shape[1], model.config.vocab_size)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # The trained weights were saved, not the initial ones.
    with torch.no_grad():
        fresh = token_logits(prepared(name, family).eval(), data.input_ids, data.attention_mask)
    assert (fresh - want).abs().max() > 1e-4
