"""Membership attacks that need the model itself, not only its cached token scores.

Each maps (model, :class:`ModelAttackInputs`) to per-record scores at each level (whole
record, sensitive tokens), higher meaning "more likely a member", NaN where a record is
not scored; :func:`privtune.attacks.mia.score_attacks` gives them the same metrics as
the other attacks.

- ``recall`` (Xie et al., 2024, "ReCaLL: Membership Inference via Relative Conditional
  Log-Likelihoods"; as MIMIR's ``recall.py``): ``LL(x | P) / LL(x)``, LL the mean
  log-likelihood of the record's scored tokens and P a prefix of non-member records.
  Both LLs are negative; conditioning on non-members lowers a member's LL more than a
  non-member's (the paper's finding), so the ratio is higher for members. (MIMIR returns
  the negated ratio and flips its ROC: the same order.) P is the token sequences of
  ``recall_prefix_records`` non-member records, chosen by a seeded hash of their ids,
  joined back to back; those records, and every other non-member record about the same
  people, are *not scored* (NaN), so the prefix never scores itself nor tells the model
  about a scored record's person (MIMIR takes the first non-members and scores them too).
  Both LLs average the same positions (the record's tokens after its first), at the
  sensitive level its sensitive tokens only. Costs one forward pass over prefix +
  record per record, batched plainly (no KV-cache reuse: PEFT's prompt-learning methods
  replace or shift a passed cache, see :mod:`privtune.models.forward`).
- ``gradnorm`` (Maini et al., 2024, "LLM Dataset Inference"; as MIMIR's ``gradnorm.py``):
  −(mean over the model's parameter tensors of the ∞-norm of the gradient of the
  record's mean token loss), the loss over the scored tokens (at the sensitive level
  the sensitive tokens only). A member sits near a minimum of its loss, so its gradient
  is small. Differentiated with respect to **every** floating-point parameter, frozen
  or not (MIMIR's models have all parameters trainable): the same set for the base
  model and for every method, so the figures compare; a PEFT model's parameters are
  its frozen base weights plus its adapter's. Costs one forward and one backward pass
  per record and level, one record at a time.

Neither is in the default attack set, which admits an attack only if it adds under about
15% to a run's evaluation: on the default study (SmolLM2-135M, 140 records of up to 128
tokens, bf16 on a busy 2-core CPU) one evaluation pass over the population took 73 CPU s,
ReCaLL 355 CPU s (4.9 passes) and GradNorm about 1,430 (some 20 passes; extrapolated
from 12 records). Name them in ``attacks.mia.attacks``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from privtune.data.tokenize import EncodedDataset
from privtune.errors import PrivtuneError
from privtune.measures.token_scores import TokenScores, level_positions, masked_mean
from privtune.registry import Registry
from privtune.models.forward import token_logits
from privtune.train.precision import Runtime


@dataclass
class ModelAttackInputs:
    """What a model attack sees: the population and the model's cached token scores on it."""

    members: EncodedDataset
    nonmembers: EncodedDataset
    scores: tuple[TokenScores, TokenScores]  # the attacked model's, on (members, non-members)
    runtime: Runtime
    levels: tuple[str, ...] = ("record", "sensitive")
    batch_size: int = 16
    seed: int = 0
    recall_prefix_records: int = 3


#: level -> (scores of the members, scores of the non-members), NaN where not scored
LevelScores = dict[str, tuple[np.ndarray, np.ndarray]]
ModelAttack = Callable[[torch.nn.Module, ModelAttackInputs], LevelScores]
MODEL_ATTACKS: Registry[ModelAttack] = Registry("model attack")
register_model_attack = MODEL_ATTACKS.register


def recall_prefix_rows(nonmembers: EncodedDataset, n: int, seed: int) -> tuple[list[int], np.ndarray]:
    """(the non-member rows ReCaLL's prefix is made of, in prefix order; (N,) bool of the
    non-member rows it scores: all but those about the prefix's people)."""
    if n >= len(nonmembers):
        raise PrivtuneError(f"ReCaLL's prefix of {n} non-member records leaves none of the "
                            f"{len(nonmembers)} non-members to score",
                            "lower attacks.mia.recall_prefix_records or add records")
    def rank(i: int) -> bytes:
        return hashlib.sha256(f"privtune-recall-prefix-{seed}-{nonmembers.records[i].id}".encode()).digest()
    rows = sorted(range(len(nonmembers)), key=rank)[:n]
    people = {nonmembers.records[i].individual for i in rows}
    scored = np.array([r.individual not in people for r in nonmembers.records], dtype=bool)
    if not scored.any():
        raise PrivtuneError("ReCaLL's prefix records are about every non-member person: none is left to score",
                            "lower attacks.mia.recall_prefix_records or add records")
    return rows, scored


@torch.no_grad()
def conditional_nll(model: torch.nn.Module, data: EncodedDataset, prefix: torch.Tensor, runtime: Runtime,
                    batch_size: int) -> np.ndarray:
    """(N, L-1) NLL of each target token of ``data`` when ``prefix`` (1-D ids) precedes the
    record: the same layout as ``TokenScores.nll``. Batches hold about as many positions
    as the evaluation's (``batch_size`` records without a prefix)."""
    was_training = model.training
    model.eval()
    n, width = data.input_ids.shape
    lengths = data.attention_mask.sum(dim=1)
    rows_per_batch = max(1, batch_size * width // (width + len(prefix)))
    out = np.zeros((n, width - 1))
    start_of_record = len(prefix)
    for start in range(0, n, rows_per_batch):
        rows = torch.arange(start, min(n, start + rows_per_batch))
        used = max(2, int(lengths[rows].max()))
        ids = torch.cat([prefix.expand(len(rows), -1), data.input_ids[rows, :used]], dim=1).to(runtime.device)
        mask = torch.cat([torch.ones(len(rows), len(prefix), dtype=data.attention_mask.dtype),
                          data.attention_mask[rows, :used]], dim=1).to(runtime.device)
        with runtime.autocast():
            logits = token_logits(model, ids, mask)
        # logits at record position t - 1 (after the prefix) predict the record's token t
        predicting = logits[:, start_of_record:start_of_record + used - 1].float()
        nll = F.cross_entropy(predicting.transpose(1, 2), ids[:, start_of_record + 1:], reduction="none")
        out[rows.numpy(), :used - 1] = nll.cpu().numpy()
    model.train(was_training)
    return np.where(data.attention_mask[:, 1:].numpy() == 1, out, 0.0)


@register_model_attack("recall")
def recall_attack(model: torch.nn.Module, x: ModelAttackInputs) -> LevelScores:
    rows, scored = recall_prefix_rows(x.nonmembers, x.recall_prefix_records, x.seed)
    prefix = torch.cat([x.nonmembers.input_ids[i, :int(x.nonmembers.attention_mask[i].sum())] for i in rows])
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions is not None and len(prefix) + x.members.input_ids.shape[1] > max_positions:
        raise PrivtuneError(f"ReCaLL's prefix ({len(prefix)} tokens) and a record ({x.members.input_ids.shape[1]}) "
                            f"exceed the model's {max_positions} positions",
                            "lower attacks.mia.recall_prefix_records or data.max_length")
    conditioned = [conditional_nll(model, data, prefix, x.runtime, x.batch_size)
                   for data in (x.members, x.nonmembers)]
    out = {}
    for level in x.levels:
        member_score, nonmember_score = (
            masked_mean(cond, level_positions(s, level)) / masked_mean(s.nll, level_positions(s, level))
            for cond, s in zip(conditioned, x.scores))
        out[level] = (member_score, np.where(scored, nonmember_score, np.nan))
    return out


def _gradient_norm(grads) -> float:
    """MIMIR's statistic: the mean over parameter tensors of each gradient's ∞-norm."""
    return float(torch.stack([g.detach().abs().max().float() for g in grads if g is not None]).mean())


@register_model_attack("gradnorm")
def gradnorm_attack(model: torch.nn.Module, x: ModelAttackInputs) -> LevelScores:
    params = [p for p in model.parameters() if p.is_floating_point()]
    trainable = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    out = {level: ([], []) for level in x.levels}
    try:
        for p in params:
            p.requires_grad_(True)
        for side, (data, scores) in enumerate(zip((x.members, x.nonmembers), x.scores)):
            for i in range(len(data)):
                n = int(data.attention_mask[i].sum())
                ids = data.input_ids[i:i + 1, :n].to(x.runtime.device)
                with x.runtime.autocast():
                    logits = token_logits(model, ids, torch.ones_like(ids))
                nll = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none")
                wanted = [(level, torch.as_tensor(level_positions(scores, level)[i, :n - 1], device=nll.device))
                          for level in x.levels]
                last = max((j for j, (_, pos) in enumerate(wanted) if pos.any()), default=-1)
                for j, (level, pos) in enumerate(wanted):
                    if not pos.any():
                        out[level][side].append(np.nan)
                        continue
                    grads = torch.autograd.grad(nll[pos].mean(), params, retain_graph=j < last, allow_unused=True)
                    out[level][side].append(-_gradient_norm(grads))
    finally:
        for p, flag in zip(params, trainable):
            p.requires_grad_(flag)
        model.train(was_training)
    return {level: (np.array(m, dtype=float), np.array(nm, dtype=float)) for level, (m, nm) in out.items()}


get_model_attack = MODEL_ATTACKS.lookup
