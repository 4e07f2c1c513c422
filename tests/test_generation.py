"""Batched generation: equals one-prompt-at-a-time decoding and a slow cache-free loop."""

from __future__ import annotations

import pytest
import torch

from privtune.attacks.generation import generate_continuations
from privtune.errors import PrivtuneError
from privtune.models.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer

PROMPTS = ["Hi, order", "Customer: My card was declined yesterday and now it is blocked. " * 2 + "Card",
           "The", "Call me on 0909"]
BUDGETS = [5, 8, 3, 6]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def slow_greedy(model, tok, prompt: str, n: int) -> str:
    """Argmax one token at a time over the whole sequence, no cache, no padding."""
    ids = tok(prompt, add_special_tokens=True)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tok.eos_token_id:
                break
    return tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_batched_greedy_equals_unbatched(family, tok):
    model = tiny_model(family, seed=1)
    batched = generate_continuations(model, tok, PROMPTS, max_new_tokens=BUDGETS, batch_size=4)
    alone = [generate_continuations(model, tok, [p], max_new_tokens=n, batch_size=1)[0]
             for p, n in zip(PROMPTS, BUDGETS)]
    assert batched == alone
    assert all(len(outs) == 1 for outs in batched)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_greedy_matches_slow_loop_and_decodes_only_new_tokens(family, tok):
    model = tiny_model(family, seed=2)
    got = generate_continuations(model, tok, PROMPTS, max_new_tokens=BUDGETS, batch_size=3)
    assert [g[0] for g in got] == [slow_greedy(model, tok, p, n) for p, n in zip(PROMPTS, BUDGETS)]


def test_sampling_is_deterministic_and_leaves_global_rng_alone(tok):
    model = tiny_model("llama", seed=0)
    state = torch.get_rng_state()
    a = generate_continuations(model, tok, PROMPTS, max_new_tokens=6, greedy=False, n_samples=3, seed=5)
    assert torch.equal(state, torch.get_rng_state())
    b = generate_continuations(model, tok, PROMPTS, max_new_tokens=6, greedy=False, n_samples=3, seed=5)
    c = generate_continuations(model, tok, PROMPTS, max_new_tokens=6, greedy=False, n_samples=3, seed=6)
    assert a == b and a != c
    assert [len(x) for x in a] == [3] * len(PROMPTS)
    assert len({s for x in a for s in x}) > len(PROMPTS)  # samples differ from each other


def test_restores_mode_and_use_cache(tok):
    model = tiny_model("qwen", seed=0)
    model.train()
    model.config.use_cache = False
    generate_continuations(model, tok, ["Hello"], max_new_tokens=2)
    assert model.training and model.config.use_cache is False


def test_bad_arguments_raise(tok):
    model = tiny_model("llama", seed=0)
    for kwargs in (dict(max_new_tokens=0), dict(max_new_tokens=[2]), dict(max_new_tokens=2, n_samples=2),
                   dict(max_new_tokens=2, greedy=False, temperature=0.0), dict(max_new_tokens=2, batch_size=0)):
        with pytest.raises(PrivtuneError):
            generate_continuations(model, tok, ["a", "b"], **kwargs)
    with pytest.raises(PrivtuneError):
        generate_continuations(model, tok, [""], max_new_tokens=2)
    assert generate_continuations(model, tok, [], max_new_tokens=2) == []


def test_targets_stop_rows_early_without_changing_the_verdict(tok):
    from privtune.attacks.generation import compatible

    assert compatible(" ORD-12", " ORD-1234567") and compatible("ORD-1234567.", " ORD-1234567")
    assert not compatible(" ORD-9", " ORD-1234567") and not compatible(" ORD-1234567. Th", " ORD-1234567")
    assert compatible(" ORD-1\ufffd", " ORD-1234567")
    model = tiny_model("llama", seed=1)
    full = generate_continuations(model, tok, PROMPTS, max_new_tokens=8)
    # Targets that the first generated characters match, then leave.
    targets = [f[0][:2] + "\u2603" for f in full]
    cut = generate_continuations(model, tok, PROMPTS, max_new_tokens=8, targets=targets)
    for (whole,), (short,), target in zip(full, cut, targets):
        assert whole.startswith(short) and len(short) < len(whole)
        assert not compatible(short, target)
    # A target the text does follow never stops it.
    assert generate_continuations(model, tok, PROMPTS, max_new_tokens=8, targets=[f[0] for f in full]) == full


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_shared_prefill_for_samples_equals_separate_runs(family, tok):
    """Samples reuse one prompt pass; with greedy decoding every copy must equal the plain run."""
    from privtune.attacks.generation import Decoding, _generate_batch

    model = tiny_model(family, seed=1).eval()
    ids = tok(PROMPTS)["input_ids"]
    with torch.no_grad():
        [plain] = _generate_batch(model, tok, ids, BUDGETS, [Decoding()], torch.device("cpu"), None, None)
        [shared] = _generate_batch(model, tok, ids, BUDGETS, [Decoding(n_samples=3)], torch.device("cpu"), None, None)
    assert shared == [p * 3 for p in plain]


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("n_samples", [1, 2])
def test_decodings_sharing_one_prompt_pass_equal_their_own_calls(family, n_samples, tok):
    """Extraction's greedy decoding and its samples from one pass over the prompts: the
    continuations of separate calls, samples included (greedy draws no random numbers)."""
    from privtune.attacks.generation import Decoding, generate_decodings

    model = tiny_model(family, seed=1)
    common = dict(max_new_tokens=BUDGETS, batch_size=3, seed=4)
    targets = [p[-3:] for p in PROMPTS]  # mostly off target at once: rows stop early
    for stop in (None, targets):
        greedy, sampled = generate_decodings(model, tok, PROMPTS, [Decoding(), Decoding(False, 1.0, 40, n_samples)],
                                             targets=stop, **common)
        assert greedy == generate_continuations(model, tok, PROMPTS, targets=stop, **common)
        assert sampled == generate_continuations(model, tok, PROMPTS, greedy=False, n_samples=n_samples,
                                                 targets=stop, **common)
