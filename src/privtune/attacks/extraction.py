"""Extraction of sensitive values and PII inference: does the model *say* what it saw?

Two attacks on the sensitive spans of member (training) and non-member (held-out)
records; the advantage of members over non-members is what training leaked, since
format knowledge ("a card number follows 'card'") helps both sets alike.

- **Prefix extraction** (Carlini et al., "Extracting Training Data from Large Language
  Models", USENIX Security 2021, https://arxiv.org/abs/2012.07805; Lukas et al.,
  "Analyzing Leakage of Personally Identifiable Information in Language Models",
  IEEE S&P 2023, https://arxiv.org/abs/2302.00539): prompt with the text before a
  value, decode, and count an exact recovery when the continuation starts with the
  value — greedily, and with any of ``n_samples`` top-k samples.
- **PII inference** (Lukas et al.'s "PII reconstruction/inference"): score the true
  value and ``k - 1`` decoys of the same type and shape (:mod:`.pii_candidates`) by
  the summed NLL of their tokens after the prefix; top-1 accuracy against chance
  ``1/k``.

Where the prompt ends. Byte-level BPE tokenizers merge a space with the word after it
(``" ORD"`` is one token), so a prompt cut at the value's first character would end in
a lone space token the model never saw before a value in training. The prompt therefore
ends where the *training tokenisation* puts the boundary: just before the first token
that overlaps the value (so after ``"order"``, not after ``"order "``), and the
*target* is the text from there to the value's end (``" ORD-1234567"``): the value with
the few characters (normally one space) that share its first token. The prompt is then
tokenised as the start of the training text was, and the continuation is compared with
the target (leading whitespace ignored, since some decoders drop it); PII decoys are
scored as the same gap followed by the decoy.

Which spans are attacked. A value already written earlier in the same record (an
e-mail repeated in the agent's reply, a first name after the full name) can be copied
from the prompt rather than recalled, so only first occurrences are used; values at the
very start of a text have no prompt and are skipped; one person's value counts once per
set (a person has up to three tickets repeating the same values). Only values wholly
inside the trained window are attacked, for members and non-members alike: every token
of the value among the record's first ``max_length`` tokens (``data.max_length``, as
training truncates). A member value past it was never trained on, so counting it would
dilute the member rate and the advantage with values the model could not have learnt.
Of the rest, up to ``max_spans_per_type`` per label and set are drawn with the seed.
Every rate comes with its number of targets (``n_member``, ``n_nonmember``).

Cost. Prompts are cut to ``max_prefix_chars`` (150: about 40 SmolLM2 tokens, since
digits are one token each), generation stops a row once it leaves its target, sampled
continuations share one prompt pass with the greedy decoding, and PII decoys share their
prefix's KV cache.
Measured on SmolLM2-135M (bf16 autocast, ONE CPU thread, busy shared machine), 60
member and 60 non-member ``customer-sim`` records at the defaults (10 spans per label
and set: 87 + 87 values): extraction (greedy + 2 samples) 46 s, PII inference (k=10)
75 s; ``synbio`` extraction 25 s. Two free cores run a forward pass about 3x faster
than that one thread, so about 35-40 s per model for both. Cost grows linearly with
``max_spans_per_type`` (and with ``k`` for PII inference).

A recovery must end at the value's end: ``ORD-12345678`` does not recover
``ORD-1234567`` (the character after the match may not continue a run of digits or
letters).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
import torch

from privtune.attacks.continuation import check_fast_tokenizer, continuation_losses
from privtune.attacks.generation import Decoding, generate_decodings
from privtune.attacks.masking import mask_value
from privtune.attacks.pii_candidates import candidates
from privtune.data.records import Record, Span
from privtune.errors import PrivtuneError

log = logging.getLogger(__name__)

SETS = ("member", "nonmember")
ALL = "ALL"


@dataclass(frozen=True)
class Target:
    """One attacked value: prompt with ``prompt``, expect ``target`` (gap + value)."""

    record: int
    span: Span
    label: str
    prompt: str
    target: str
    value: str

    @property
    def gap(self) -> str:
        """Characters between the prompt's end and the value (normally one space)."""
        return self.target[: len(self.target) - len(self.value)]


# --------------------------------------------------------------------------- targets

def _trim_prompt(text: str, cut: int, max_prefix_chars: int) -> str:
    """``text[:cut]`` cut to its last ``max_prefix_chars`` characters, starting at a word."""
    start = max(0, cut - max_prefix_chars)
    if start > 0 and not text[start - 1].isspace():
        nxt = next((i for i in range(start, cut) if text[i].isspace()), None)
        start = nxt if nxt is not None else start
    while start < cut and text[start].isspace():
        start += 1
    return text[start:cut]


def _record_targets(index: int, record: Record, offsets: list[tuple[int, int]], max_prefix_chars: int,
                    max_length: int) -> list[Target]:
    """Targets of one record: first occurrences of values wholly inside the first
    ``max_length`` tokens, with a non-empty prompt (``offsets``: the untruncated tokens)."""
    out = []
    for span in record.spans:
        value = record.text[span.start: span.end]
        if not value.strip() or value in record.text[: span.start]:
            continue
        tokens = [t for t, (a, b) in enumerate(offsets) if b > a and a < span.end and span.start < b]
        if not tokens or tokens[-1] >= max_length:
            continue  # not tokenised, or not wholly inside the trained window
        first = tokens[0]
        if first == 0 or offsets[first - 1][1] <= offsets[first - 1][0]:
            continue  # no real token before it
        cut = min(offsets[first - 1][1], span.start)
        prompt = _trim_prompt(record.text, cut, max_prefix_chars)
        if prompt:
            out.append(Target(index, span, span.label, prompt, record.text[cut: span.end], value))
    return out


def select_targets(records: list[Record], tokenizer, *, max_spans_per_type: int, max_prefix_chars: int,
                   max_length: int, seed: int, tag: str) -> list[Target]:
    """Up to ``max_spans_per_type`` targets per label, one per (individual, value), among
    the values wholly inside each record's first ``max_length`` tokens, drawn with
    ``seed`` (``tag`` names the set, so members and non-members draw apart)."""
    check_fast_tokenizer(tokenizer)
    if not records:
        return []
    enc = tokenizer([r.text for r in records], return_offsets_mapping=True, add_special_tokens=True)
    by_label: dict[str, list[Target]] = {}
    for i, (record, offsets) in enumerate(zip(records, enc["offset_mapping"])):
        for target in _record_targets(i, record, offsets, max_prefix_chars, max_length):
            by_label.setdefault(target.label, []).append(target)
    chosen = []
    for label in sorted(by_label):
        pool = by_label[label]
        random.Random(f"extraction/{seed}/{tag}/{label}").shuffle(pool)
        seen: set[tuple[str, str]] = set()
        for target in pool:
            key = (records[target.record].individual, target.value)
            if key not in seen and len(seen) < max_spans_per_type:
                seen.add(key)
                chosen.append(target)
    return chosen


def _targets_of_both(tokenizer, member_records, nonmember_records, max_spans_per_type, max_prefix_chars, max_length,
                     seed):
    if not member_records or not nonmember_records:
        which = "member" if not member_records else "non-member"
        raise PrivtuneError(f"the {which} set is empty, so leakage cannot be compared between members and non-members",
                            "give both training and held-out records")
    if max_spans_per_type < 1 or max_prefix_chars < 1:
        raise PrivtuneError(f"max_spans_per_type and max_prefix_chars must be at least 1, got "
                            f"{max_spans_per_type} and {max_prefix_chars}", "use 20 and 200, say")
    targets = {tag: select_targets(records, tokenizer, max_spans_per_type=max_spans_per_type,
                                   max_prefix_chars=max_prefix_chars, max_length=max_length, seed=seed, tag=tag)
               for tag, records in zip(SETS, (member_records, nonmember_records))}
    if not targets["member"]:
        raise PrivtuneError(f"no member record has a sensitive span with text before it to prompt with inside "
                            f"its first {max_length} tokens", "label sensitive spans in the data (or let the PII "
                            "tagger do it), or raise data.max_length")
    return targets


# --------------------------------------------------------------------------- extraction

def recovered(continuation: str, target: str) -> bool:
    """The continuation starts with ``target`` (leading whitespace ignored on both) and
    does not carry on the value's last run of digits or letters."""
    cont, want = continuation.lstrip(), target.lstrip()
    if not want or not cont.startswith(want):
        return False
    after = cont[len(want): len(want) + 1]
    last = want[-1]
    return not after or not ((after.isdigit() and last.isdigit()) or (after.isalpha() and last.isalpha()))


def rates(hits: dict[str, list[tuple[str, bool]]]) -> dict[str, dict]:
    """Per label and ``ALL``: member and non-member success rates and their difference.

    ``hits[set]`` is a list of (label, success). A rate over no targets is ``None``
    (and so is the advantage), never a made-up zero.
    """
    labels = sorted({label for outcomes in hits.values() for label, _ in outcomes})
    out = {}
    for label in labels + [ALL]:
        entry = {}
        for tag in SETS:
            got = [ok for lab, ok in hits[tag] if label in (ALL, lab)]
            entry[f"{tag}_rate"] = float(np.mean(got)) if got else None
            entry[f"n_{tag}"] = len(got)
        m, n = entry["member_rate"], entry["nonmember_rate"]
        entry["advantage"] = None if m is None or n is None else m - n
        out[label] = {k: entry[k] for k in ("member_rate", "nonmember_rate", "advantage", "n_member", "n_nonmember")}
    return out


def _budgets(tokenizer, targets: list[Target]) -> list[int]:
    """New tokens per target: the target's own token count plus 2."""
    if not targets:
        return []
    ids = tokenizer([t.target for t in targets], add_special_tokens=False)["input_ids"]
    return [len(x) + 2 for x in ids]


def prefix_extraction(model: torch.nn.Module, tokenizer, member_records: list[Record],
                      nonmember_records: list[Record], *, max_length: int, max_prefix_chars: int = 150,
                      max_spans_per_type: int = 10,
                      n_samples: int = 2, temperature: float = 1.0, top_k: int = 40, batch_size: int = 32,
                      device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None,
                      seed: int = 0) -> dict:
    """Exact recovery rates of sensitive values prompted with the text before them, over
    the values wholly inside the records' first ``max_length`` tokens (the trained window).

    Returns:
        ``{"greedy": {label: {"member_rate", "nonmember_rate", "advantage", "n_member",
        "n_nonmember"}, ..., "ALL": {...}}, "sampling": {...}}``; ``"sampling"`` (any of
        ``n_samples`` top-k samples at ``temperature`` recovers) is left out when
        ``n_samples`` is 0.

    Raises:
        PrivtuneError: an empty member or non-member set, no member span to prompt
            with, or a setting below its minimum.
    """
    if n_samples < 0:
        raise PrivtuneError(f"n_samples must be 0 or more, got {n_samples}", "use 0 to skip sampling, or 2, say")
    targets = _targets_of_both(tokenizer, member_records, nonmember_records, max_spans_per_type,
                               max_prefix_chars, max_length, seed)
    flat = [(tag, t) for tag in SETS for t in targets[tag]]
    prompts = [t.prompt for _, t in flat]
    budgets = _budgets(tokenizer, [t for _, t in flat])
    # targets= lets a row stop as soon as it goes wrong: the verdict is the same, decoding
    # is several times shorter (most prompts fail within a few tokens).
    # Greedy and sampled decoding share one pass over the prompts.
    decodings = [Decoding()] + ([Decoding(False, temperature, top_k, n_samples)] if n_samples else [])
    greedy, *sampled = generate_decodings(model, tokenizer, prompts, decodings, max_new_tokens=budgets,
                                          batch_size=batch_size, device=device, autocast_dtype=autocast_dtype,
                                          seed=seed, targets=[t.target for _, t in flat])
    out = {"greedy": rates(_outcomes(flat, [[g[0]] for g in greedy]))}
    if sampled:
        out["sampling"] = rates(_outcomes(flat, sampled[0]))
    return out


def _outcomes(flat: list[tuple[str, Target]], continuations: list[list[str]]) -> dict[str, list[tuple[str, bool]]]:
    hits: dict[str, list[tuple[str, bool]]] = {tag: [] for tag in SETS}
    for (tag, target), outs in zip(flat, continuations):
        ok = any(recovered(c, target.target) for c in outs)
        hits[tag].append((target.label, ok))
        if ok:
            log.debug("extracted %s value %s from a %s record", target.label, mask_value(target.value, target.label), tag)
    return hits


# --------------------------------------------------------------------------- PII inference

def pii_inference(model: torch.nn.Module, tokenizer, member_records: list[Record], nonmember_records: list[Record], *,
                  max_length: int, k: int = 10, max_spans_per_type: int = 10, max_prefix_chars: int = 150,
                  batch_size: int = 64, device: str | torch.device = "cpu",
                  autocast_dtype: torch.dtype | None = None, seed: int = 0) -> dict:
    """Top-1 accuracy of picking the true value among it and ``k - 1`` decoys, over the
    values wholly inside the records' first ``max_length`` tokens (the trained window).

    The true value wins only with a strictly lower loss than every decoy (ties count
    against it). Values too short to have ``k - 1`` distinct decoys are skipped.

    Returns:
        ``{label: {"top1", "chance", "k", "n_member", "member_top1", "nonmember_top1",
        "n_nonmember"}, ..., "ALL": {...}}``, where ``top1`` is the members' accuracy
        and ``chance`` is ``1/k``; an accuracy over no values is ``None``.

    Raises:
        PrivtuneError: ``k`` < 2, an empty member or non-member set, or no member span
            to prompt with.
    """
    if k < 2:
        raise PrivtuneError(f"k must be at least 2 (the true value and a decoy), got {k}", "use k=10, say")
    targets = _targets_of_both(tokenizer, member_records, nonmember_records, max_spans_per_type,
                               max_prefix_chars, max_length, seed)
    flat, prefixes, continuations = [], [], []
    for tag in SETS:
        for target in targets[tag]:
            try:
                decoys = candidates(target.label, target.value, k - 1, seed)
            except PrivtuneError:
                continue  # too short for k - 1 distinct decoys
            flat.append((tag, target))
            prefixes.extend([target.prompt] * k)
            continuations.extend(target.gap + v for v in [target.value] + decoys)
    losses = continuation_losses(model, tokenizer, prefixes, continuations, batch_size=batch_size, device=device,
                                 autocast_dtype=autocast_dtype).reshape(len(flat), k)
    wins = losses[:, 0] < losses[:, 1:].min(axis=1)
    hits: dict[str, list[tuple[str, bool]]] = {tag: [] for tag in SETS}
    for (tag, target), win in zip(flat, wins):
        hits[tag].append((target.label, bool(win)))
    return {label: {"top1": r["member_rate"], "chance": 1.0 / k, "k": k, "n_member": r["n_member"],
                    "member_top1": r["member_rate"], "nonmember_top1": r["nonmember_rate"],
                    "n_nonmember": r["n_nonmember"]}
            for label, r in rates(hits).items()}
