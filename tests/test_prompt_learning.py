"""Measures and attacks on prefix- and prompt-tuned models read the same token
probabilities as a plain whole-sequence forward pass of one record at a time.

Prompt tuning adds virtual positions to the logits and ignores position ids; prefix
tuning rebuilds its KV cache in every forward call. The references here use neither
batching, padding nor caches, so they are right by construction."""

from __future__ import annotations

import pytest
import torch
from test_loop import CPU, toy_data
from test_methods import prepared

from privtune.attacks.extraction import continuation_losses
from privtune.attacks.generation import generate_continuations
from privtune.measures.token_scores import score_tokens
from privtune.models.forward import is_prompt_learning, token_logits
from privtune.models.tiny import tiny_model, tiny_tokenizer

METHODS = ("prefix-tuning", "prompt-tuning")
PROMPTS = ["Customer John Smith paid with card", "Hi", "Order AB-1234567 was shipped to 12 Main"]


def shaken(name: str, family: str) -> torch.nn.Module:
    """A prompt-learning model whose learned tokens are far from their start, in eval mode."""
    model = prepared(name, family)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def alone(model, ids: list[int]) -> torch.Tensor:
    """(T, V) log-probabilities of one unpadded record."""
    x = torch.tensor([ids])
    with torch.no_grad():
        return torch.log_softmax(token_logits(model, x, torch.ones_like(x))[0].float(), dim=-1)


def test_token_logits_keep_the_input_length():
    data = toy_data(2)
    plain = tiny_model("llama").eval()
    with torch.no_grad():
        assert torch.equal(token_logits(plain, data.input_ids, data.attention_mask),
                           plain(input_ids=data.input_ids, attention_mask=data.attention_mask).logits)
    model = shaken("prompt-tuning", "llama")
    assert is_prompt_learning(model) and not is_prompt_learning(plain)
    with torch.no_grad():
        full = model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
    assert full.shape[1] == data.input_ids.shape[1] + 3
    assert token_logits(model, data.input_ids, data.attention_mask).shape[1] == data.input_ids.shape[1]


@pytest.mark.parametrize("family", ["llama", "gpt-neox"])
@pytest.mark.parametrize("name", METHODS)
def test_token_scores_match_records_scored_alone(name, family):
    data = toy_data(5)
    model = shaken(name, family)
    scores = score_tokens(model, data, CPU, batch_size=4)
    for row in range(5):
        length = int(data.attention_mask[row].sum())
        ids = data.input_ids[row, :length].tolist()
        want = -alone(model, ids)[torch.arange(length - 1), torch.tensor(ids[1:])]
        torch.testing.assert_close(torch.from_numpy(scores.nll[row, :length - 1]), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("name", METHODS)
def test_greedy_generation_matches_decoding_by_hand(name, family):
    tok = tiny_tokenizer()
    model = shaken(name, family)
    got = generate_continuations(model, tok, PROMPTS, max_new_tokens=6, batch_size=8)
    for prompt, outs in zip(PROMPTS, got):
        ids = tok(prompt)["input_ids"]
        for _ in range(6):
            ids = ids + [int(alone(model, ids)[-1].argmax())]
        start = len(tok(prompt)["input_ids"])
        assert outs == [tok.decode(ids[start:], skip_special_tokens=True, clean_up_tokenization_spaces=False)]
    sampled = generate_continuations(model, tok, PROMPTS, max_new_tokens=4, greedy=False, n_samples=2)
    assert [len(s) for s in sampled] == [2, 2, 2]


@pytest.mark.parametrize("name", METHODS)
def test_continuation_losses_match_records_scored_alone(name):
    tok = tiny_tokenizer()
    model = shaken(name, "llama")
    prefixes, continuations = ["Customer John Smith paid with", "Customer John Smith paid with", "Hi there"], \
        [" card 4111", " cash", " friend"]
    got = continuation_losses(model, tok, prefixes, continuations)
    for value, pre, cont in zip(got, prefixes, continuations):
        full, start = tok(pre + cont)["input_ids"], len(tok(pre)["input_ids"])
        logp = alone(model, full)
        assert value == pytest.approx(float(-sum(logp[t - 1, full[t]] for t in range(start, len(full)))), rel=1e-5)
