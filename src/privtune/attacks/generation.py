"""Batched text generation for the attacks that prompt a model (extraction, backdoor).

Hugging Face's ``model.generate`` does the decoding (greedy or top-k sampling, with the
KV cache); this module only does what the attacks need around it:

- prompts are tokenised exactly as training text is (``add_special_tokens=True``, as in
  :func:`privtune.data.tokenize.encode_records`), so a prompt cut from a training record
  starts with the same special tokens the model saw in training;
- prompts are sorted by length before batching, so a batch pads little, and LEFT-padded
  (the next token of every row is then predicted from the same column); the attention
  mask tells the model which positions are padding, and ``generate`` derives position
  ids from it, so a padded row decodes like the same prompt alone (tested per family);
- each prompt may ask for its own number of new tokens; a batch decodes to its longest
  request and every row is cut back to its own, which for greedy decoding equals
  decoding that row alone;
- only the generated token ids are decoded, never the prompt;
- a prompt-learning model (prefix or prompt tuning) decodes one prompt per call, with
  no padding and no shared prompt pass: PEFT drops position ids under prompt tuning
  and rebuilds a prefix-tuned model's cache in every forward call (see
  :mod:`privtune.models.forward`), so neither fast path would be exact there;
- the cache is switched on for generation even when training turned ``use_cache`` off
  (gradient checkpointing does), and the model's config and train/eval mode are
  restored afterwards;
- sampling runs under a forked RNG seeded from ``seed``, so results are reproducible and
  the caller's random state is untouched;
- several decodings of the same prompts (extraction's greedy one and its samples,
  :func:`generate_decodings`) share one pass over each batch of prompts: all but the
  last prompt token are run once and the cache copied to each decoding. Greedy decoding
  draws no random numbers, so the samples are the same as from a call of their own;
- with ``targets`` (what each prompt should continue with), a row stops as soon as its
  text can no longer start with its target, and a batch as soon as all its rows have
  stopped. Extraction needs only the yes/no answer, and most prompts (all non-members,
  most members) go wrong within a few tokens, so this cuts decoding several-fold.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from privtune.errors import PrivtuneError
from privtune.models.forward import is_prompt_learning


def pad_id_of(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS, else 0."""
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    return 0


def autocast_context(device: torch.device, autocast_dtype: torch.dtype | None):
    """``torch.autocast`` for ``autocast_dtype`` on ``device``, or a no-op when None."""
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast_dtype)


@contextlib.contextmanager
def inference_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and ``use_cache=True`` for the duration; both restored afterwards."""
    config = getattr(model, "config", None)
    had_cache = getattr(config, "use_cache", None) if config is not None else None
    was_training = model.training
    model.eval()
    if config is not None:
        config.use_cache = True
    try:
        with torch.no_grad():
            yield
    finally:
        if config is not None and had_cache is not None:
            config.use_cache = had_cache
        model.train(was_training)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, each row right-aligned (padding on the left)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def _check_args(prompts: list[str], new_tokens: list[int], greedy: bool, temperature: float, top_k: int,
                n_samples: int, batch_size: int) -> None:
    if len(new_tokens) != len(prompts):
        raise PrivtuneError(f"max_new_tokens has {len(new_tokens)} entries for {len(prompts)} prompts",
                            "pass one int, or one per prompt")
    if any(n < 1 for n in new_tokens):
        raise PrivtuneError(f"max_new_tokens must be at least 1, got {min(new_tokens)}", "ask for 1 or more tokens")
    if batch_size < 1:
        raise PrivtuneError(f"batch_size must be at least 1, got {batch_size}", "use 32, say")
    if n_samples < 1:
        raise PrivtuneError(f"n_samples must be at least 1, got {n_samples}", "ask for 1 or more continuations")
    if greedy and n_samples != 1:
        raise PrivtuneError(f"greedy decoding is deterministic, so n_samples={n_samples} would repeat it",
                            "use n_samples=1 with greedy=True, or greedy=False to sample")
    if not greedy and (temperature <= 0 or top_k < 0):
        raise PrivtuneError(f"sampling needs temperature > 0 and top_k >= 0, got {temperature} and {top_k}",
                            "use temperature=1.0 and top_k=40, say (top_k=0 samples from the whole vocabulary)")


def _generation_config(tokenizer, max_new: int, greedy: bool, temperature: float, top_k: int,
                       n_samples: int) -> GenerationConfig:
    """An explicit config, so a checkpoint's own generation defaults never leak in."""
    common = dict(max_new_tokens=max_new, num_return_sequences=n_samples, use_cache=True,
                  pad_token_id=pad_id_of(tokenizer), eos_token_id=tokenizer.eos_token_id)
    if greedy:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=1.0, **common)


def compatible(text: str, target: str) -> bool:
    """Can a continuation that starts with ``text`` still start with ``target``?

    Leading whitespace is ignored on both sides (as in extraction's comparison), a
    trailing replacement character (half of a multi-byte character) is not held
    against it, and one character past the target is allowed (it tells whether the
    value ended there)."""
    text, target = text.lstrip(), target.lstrip()
    text = text[:-1] if text.endswith("\ufffd") else text
    return target.startswith(text) or (text.startswith(target) and len(text) <= len(target) + 1)


class _StopOffTarget(StoppingCriteria):
    """Per-row stop once the generated text leaves its target (see :func:`compatible`)."""

    def __init__(self, tokenizer, start: int, targets: list[str], n_samples: int):
        self.tokenizer, self.start, self.targets, self.n_samples = tokenizer, start, targets, n_samples

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True,
                                            clean_up_tokenization_spaces=False)
        done = [not compatible(text, self.targets[row // self.n_samples]) for row, text in enumerate(texts)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class Decoding:
    """One way to continue every prompt: greedily, or ``n_samples`` top-k samples at ``temperature``."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 40
    n_samples: int = 1


def generate_continuations(model: torch.nn.Module, tokenizer, prompts: list[str], *,
                           max_new_tokens: int | list[int], greedy: bool = True, temperature: float = 1.0,
                           top_k: int = 40, n_samples: int = 1, batch_size: int = 32,
                           device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None,
                           seed: int = 0, targets: list[str] | None = None) -> list[list[str]]:
    """Decode continuations of ``prompts``.

    Args:
        max_new_tokens: one budget for all prompts, or one per prompt.
        greedy: greedy decoding (then ``n_samples`` must be 1), else top-k sampling at
            ``temperature``.
        n_samples: continuations per prompt when sampling.
        batch_size: prompts per ``generate`` call (each expands to ``n_samples`` rows).
        targets: optional, one per prompt: stop a row early once it cannot start with
            its target any more (its continuation is then cut where it went wrong).

    Returns:
        For each prompt, in the input order, ``n_samples`` decoded continuations (the
        generated tokens only, special tokens skipped, spaces kept as generated).

    Raises:
        PrivtuneError: an empty prompt, a budget below 1 or a bad sampling setting.
    """
    decoding = Decoding(greedy, temperature, top_k, n_samples)
    return generate_decodings(model, tokenizer, prompts, [decoding], max_new_tokens=max_new_tokens,
                              batch_size=batch_size, device=device, autocast_dtype=autocast_dtype, seed=seed,
                              targets=targets)[0]


def generate_decodings(model: torch.nn.Module, tokenizer, prompts: list[str], decodings: list[Decoding], *,
                       max_new_tokens: int | list[int], batch_size: int = 32, device: str | torch.device = "cpu",
                       autocast_dtype: torch.dtype | None = None, seed: int = 0,
                       targets: list[str] | None = None) -> list[list[list[str]]]:
    """:func:`generate_continuations` under each of ``decodings``, the prompts run once for all.

    Returns one list per decoding, as :func:`generate_continuations` returns for it alone.
    """
    prompts = list(prompts)
    new_tokens = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    for d in decodings:
        _check_args(prompts, new_tokens, d.greedy, d.temperature, d.top_k, d.n_samples, batch_size)
    if targets is not None and len(targets) != len(prompts):
        raise PrivtuneError(f"got {len(targets)} targets for {len(prompts)} prompts", "pass one target per prompt")
    if not prompts:
        return [[] for _ in decodings]
    encoded = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise PrivtuneError(f"prompt {empty[0]} tokenises to nothing, so there is nothing to continue",
                            "pass non-empty prompts")
    device = torch.device(device)
    if is_prompt_learning(model):
        batch_size = 1
    # Sorted by budget, then length: a batch decodes for its longest budget and pads to
    # its longest prompt, and decoding steps cost more than padded prompt positions.
    order = sorted(range(len(prompts)), key=lambda i: (new_tokens[i], len(encoded[i]), i))
    results: list[list[list[str]]] = [[[] for _ in prompts] for _ in decodings]
    with inference_mode(model), torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        for first in range(0, len(order), batch_size):
            rows = order[first: first + batch_size]
            per_decoding = _generate_batch(model, tokenizer, [encoded[i] for i in rows], [new_tokens[i] for i in rows],
                                           decodings, device, autocast_dtype,
                                           None if targets is None else [targets[i] for i in rows])
            for texts, out in zip(per_decoding, results):
                for i, outs in zip(rows, texts):
                    out[i] = outs
    return results


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def _generate_batch(model, tokenizer, prompt_ids: list[list[int]], new_tokens: list[int], decodings: list[Decoding],
                    device: torch.device, autocast_dtype: torch.dtype | None,
                    targets: list[str] | None) -> list[list[list[str]]]:
    """Continuations of one batch under each decoding: ``n_samples`` strings per prompt."""
    pad = pad_id_of(tokenizer)
    ids, mask = left_pad(prompt_ids, pad)
    ids, mask = ids.to(device), mask.to(device)
    out = []
    with autocast_context(device, autocast_dtype):
        share = (len(decodings) > 1 or decodings[0].n_samples > 1) and ids.shape[1] > 1 \
            and not is_prompt_learning(model)
        prefill = _prefill(model, ids, mask) if share else None
        for k, d in enumerate(decodings):
            cache = None
            if prefill is not None:
                cache = prefill if k == len(decodings) - 1 else copy.deepcopy(prefill)  # generate extends it
                if d.n_samples > 1:
                    cache.batch_repeat_interleave(d.n_samples)
            config = _generation_config(tokenizer, max(new_tokens), d.greedy, d.temperature, d.top_k, 1)
            stop = None
            if targets is not None:
                stop = StoppingCriteriaList([_StopOffTarget(tokenizer, ids.shape[1], targets, d.n_samples)])
            rows_ids, rows_mask = ids.repeat_interleave(d.n_samples, dim=0), mask.repeat_interleave(d.n_samples, dim=0)
            generated = model.generate(input_ids=rows_ids, attention_mask=rows_mask, generation_config=config,
                                       stopping_criteria=stop, past_key_values=cache)[:, ids.shape[1]:].cpu()
            out.append(_decode_rows(tokenizer, generated, new_tokens, d.n_samples, pad))
    return out


def _decode_rows(tokenizer, generated: torch.Tensor, new_tokens: list[int], n_samples: int,
                 pad: int) -> list[list[str]]:
    """(B * n_samples, <= max new) generated ids, rows grouped per prompt, as texts cut to each prompt's budget."""
    texts = []
    for row, budget in enumerate(new_tokens):
        block = generated[row * n_samples: (row + 1) * n_samples, :budget]
        texts.append([tokenizer.decode(_strip_padding(seq, pad), skip_special_tokens=True,
                                       clean_up_tokenization_spaces=False) for seq in block])
    return texts


def _prefill(model, ids: torch.Tensor, mask: torch.Tensor):
    """The KV cache of every prompt but its last token, run once for every decoding and sample.

    ``generate`` would otherwise run each prompt once per decoding and sample; it
    continues from a cache that holds all but the last prompt token (it needs one token
    to start from).
    """
    positions = (mask[:, :-1].cumsum(dim=1) - 1).clamp_min(0)
    return model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions, use_cache=True,
                 logits_to_keep=1).past_key_values


def _strip_padding(seq: torch.Tensor, pad: int) -> list[int]:
    """Token ids without the padding ``generate`` appends to rows that stopped early."""
    ids = seq.tolist()
    while ids and ids[-1] == pad:
        ids.pop()
    return ids
