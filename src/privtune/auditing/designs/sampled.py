"""The ``sampled`` design: secrets the base model writes at a high temperature.

Mitchell and Andrew (*Advancing the State-of-the-Art in Empirical Privacy Auditing*,
2026) audit with synthetic canaries sampled at high temperature from a language model
prompted with the domain: in-domain enough to be learnt the way the data is (which suits
parameter-efficient fine-tuning, whose adapters learn the domain), unlikely enough that
no two canaries are alike. Here the prompt is a member's text with its sensitive values
replaced by their type (``[NAME]``, ``[EMAIL]``: the domain, without anyone's data, so a
canary cannot copy a person's value into the training set), then the canary's own prefix;
the base model samples :data:`SECRET_TOKENS` tokens at :data:`TEMPERATURE` from the full
distribution (no special tokens), and the canary is the prefix and that text. The
member's text is only the prompt: it is not in the canary.
Each canary samples with a generator of its own, seeded from its own stream, so a canary
does not depend on how many others there are or on which it is batched with.
"""

from __future__ import annotations

import torch

from privtune.auditing.designs import DesignInputs, audit_record, register_canary_design
from privtune.auditing.designs.random_secret import canary_tag
from privtune.auditing.designs.word_tokens import content_rng
from privtune.data.records import Record
from privtune.data.scrub import placeholder, scrub_record

NAME = "sampled"
SECRET_TOKENS = 12
TEMPERATURE = 1.5
#: Characters of the member's text in the prompt.
PROMPT_CHARS = 400
#: Prompts sampled together.
BATCH = 32


def sample_secrets(loaded, prompts: list[str], generators: list[torch.Generator]) -> list[str]:
    """For each prompt, :data:`SECRET_TOKENS` tokens the model samples after it at
    :data:`TEMPERATURE` with its own generator, as text. One batched forward per token
    (prompts left-padded), so a canary's text does not depend on its batch."""
    tokenizer, model = loaded.tokenizer, loaded.model
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, encoded))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    drawn, past = [], None
    with torch.no_grad():
        for _ in range(SECRET_TOKENS):
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, -ids.shape[1]:]
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                        use_cache=True)
            logits = out.logits[:, -1].double() / TEMPERATURE
            logits[:, special[special < logits.shape[1]]] = -torch.inf
            probs = torch.softmax(logits, dim=-1)
            tokens = [int(torch.multinomial(row, 1, generator=g)) for row, g in zip(probs, generators)]
            drawn.append(tokens)
            ids, past = torch.tensor(tokens)[:, None], out.past_key_values
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
    return [tokenizer.decode(list(row)) for row in zip(*drawn)]


@register_canary_design(NAME)
def sampled_secrets(inputs: DesignInputs) -> list[Record]:
    if not inputs.corpus:
        raise ValueError("the sampled design prompts with the members' text: it needs DesignInputs.corpus")
    loaded = inputs.base_model()
    prefixes, prompts, generators = [], [], []
    for i in range(inputs.count):
        rng = content_rng(inputs, NAME, i)
        member = rng.choice(inputs.corpus)
        domain = scrub_record(member, member.spans, placeholder).text[:PROMPT_CHARS]
        prefixes.append(f"Audit note {canary_tag(rng)}:")
        prompts.append(f"{domain}\n\n{prefixes[-1]}")
        generators.append(torch.Generator().manual_seed(rng.getrandbits(63)))
    secrets = []
    for start in range(0, inputs.count, BATCH):
        batch = slice(start, start + BATCH)
        secrets += sample_secrets(loaded, prompts[batch], generators[batch])
    return [audit_record(i, prefix + " ", " ".join(secret.split()) or "-", ".", NAME)  # one line
            for i, (prefix, secret) in enumerate(zip(prefixes, secrets))]
