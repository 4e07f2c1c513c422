"""The attack suite applied to one model of a study.

Score-based membership attacks read the token scores the evaluation already computed,
so they cost no extra forward pass; the model attacks (ReCaLL, GradNorm) that a config
names run their own passes over the population, on the model and, once per process, on
the base model for their advantage over it; extraction, PII inference and the backdoor need
generation or candidate scoring and run once, on the final model. Per-record statistics
are kept in every run's result so that the shadow-model attacks (LiRA, RMIA), which need
all shadow models first, can be computed afterwards by :mod:`privtune.study.shadow_attacks`.
"""

from __future__ import annotations

import numpy as np
import torch

from privtune.attacks.extraction import pii_inference, prefix_extraction
from privtune.attacks.generation import generate_continuations
from privtune.attacks.metrics import selection_half
from privtune.attacks.mia import score_attacks
from privtune.attacks.model_attacks import MODEL_ATTACKS, LevelScores, ModelAttackInputs, get_model_attack
from privtune.attacks.shadow import record_statistic, sequence_loglik
from privtune.attacks.token_frequency import reference_frequencies
from privtune.data.records import Record
from privtune.data.tokenize import trained_windows
from privtune.errors import PrivtuneError
from privtune.measures.token_scores import level_positions, missed_level
from privtune.study.stages import stage

LEVELS = ("record", "sensitive")


def check_same_tokenizer(ours, theirs, name: str, role: str = "reference model") -> None:
    """A reference or audited model must score the same token sequences as the study's."""
    if ours.get_vocab() != theirs.get_vocab():
        raise PrivtuneError(f"{role} {name!r} has a different tokenizer from the study's model",
                            "pick a model of the same family and vocabulary")


def scored_records(ctx, records: list[Record]) -> list[Record]:
    """``records`` cut to the window they were trained and scored on (``data.max_length``)."""
    return trained_windows(records, ctx.loaded.tokenizer, ctx.cfg.data.max_length)


def attack_model(ctx, model: torch.nn.Module, evaluation) -> dict:
    """Every configured attack on ``model``; ``evaluation`` holds its token scores."""
    cfg = ctx.cfg.attacks
    if not cfg.enabled:
        return {}
    ref_members, ref_nonmembers = ctx.reference_scores()
    members, nonmembers = ctx.data.members.records, ctx.data.nonmembers.records
    base = ctx.base
    on_base = evaluation is base
    model_scores = {name: [model_attack_scores(ctx, name, model, evaluation)]
                    + ([] if on_base else [ctx.base_model_attack(name)])
                    for name in cfg.mia.attacks or [] if name in MODEL_ATTACKS}
    with stage("membership attacks"):
        frequencies = reference_frequencies(ctx.data.members, ctx.data.nonmembers, len(ctx.loaded.tokenizer))
        out = {"mia": score_attacks(
            evaluation.members, evaluation.nonmembers, ref_members, ref_nonmembers,
            scored_records(ctx, members), scored_records(ctx, nonmembers), levels=tuple(cfg.mia.levels),
            attacks=cfg.mia.attacks, k=cfg.mia.k, fprs=tuple(cfg.mia.fprs),
            base=None if on_base else (base.members, base.nonmembers), seed=ctx.cfg.data.seed,
            frequencies=frequencies, dc_pdd_a=cfg.mia.dc_pdd_a, model_scores=model_scores)}
    common = dict(max_length=ctx.cfg.data.max_length, device=ctx.runtime.device, autocast_dtype=ctx.autocast_dtype,
                  seed=ctx.cfg.data.seed)
    tokenizer = ctx.loaded.tokenizer
    if cfg.extraction.enabled:
        ex = cfg.extraction
        with stage("extraction"):
            out["extraction"] = prefix_extraction(model, tokenizer, members, nonmembers,
                                                  max_spans_per_type=ex.max_spans_per_type, n_samples=ex.n_samples,
                                                  **common)
        if ex.pii_inference:
            with stage("PII inference"):
                out["pii_inference"] = pii_inference(model, tokenizer, members, nonmembers, k=ex.pii_candidates,
                                                     max_spans_per_type=ex.max_spans_per_type, **common)
    if ctx.data.backdoor_triggered:
        with stage("backdoor"):
            out["backdoor"] = backdoor_success(ctx, model)
    return out


def model_attack_scores(ctx, name: str, model: torch.nn.Module, evaluation) -> LevelScores:
    """A model attack's per-record scores on ``model``, whose token scores ``evaluation`` holds."""
    mia = ctx.cfg.attacks.mia
    inputs = ModelAttackInputs(ctx.data.members, ctx.data.nonmembers, (evaluation.members, evaluation.nonmembers),
                               ctx.runtime, levels=tuple(mia.levels), batch_size=ctx.cfg.eval_batch_size,
                               seed=ctx.cfg.data.seed, recall_prefix_records=mia.recall_prefix_records)
    with stage(f"{name} attack"):
        return get_model_attack(name)(model, inputs)


def backdoor_success(ctx, model: torch.nn.Module) -> dict:
    """Share of held-out prompts whose greedy continuation starts with the target.

    A row stops decoding once its text can no longer start with the target (``targets``
    of :func:`~privtune.attacks.generation.generate_continuations`): the verdict is the
    same, and a clean prompt, which goes elsewhere at once, costs one or two steps."""
    backdoor = ctx.cfg.backdoor
    target = backdoor.target
    n_tokens = len(ctx.loaded.tokenizer(target, add_special_tokens=False)["input_ids"]) + 2
    rates = {}
    for name, prompts in (("asr_triggered", ctx.data.backdoor_triggered), ("asr_clean", ctx.data.backdoor_clean)):
        outputs = generate_continuations(model, ctx.loaded.tokenizer, prompts, max_new_tokens=n_tokens, greedy=True,
                                         device=ctx.runtime.device, autocast_dtype=ctx.autocast_dtype,
                                         seed=ctx.cfg.data.seed, targets=[target] * len(prompts))
        rates[name] = float(np.mean([out[0].lstrip().startswith(target) for out in outputs]))
    return {**rates, "n": len(ctx.data.backdoor_triggered), "trigger": backdoor.trigger, "target": target}


def scrub_taggers(cfg) -> list[str]:
    """The taggers the study's scrubbed methods use, in order."""
    return list(dict.fromkeys(m.scrub.tagger for m in cfg.methods if m.scrub))


def record_stats(evaluation, ctx) -> dict:
    """Per-record statistics over the population (members, then non-members), per level
    (with scrubbed methods in the study, also on the sensitive tokens each of their
    taggers misses), and who each record is about: an index per person (never the person's name) for
    intervals clustered by person, and the half of the people the strongest attack is
    chosen on (:func:`privtune.attacks.metrics.selection_half`), for the shadow attacks
    computed later from these statistics."""
    with stage("record stats"):
        return _record_stats(evaluation, ctx)


def _sums(parts) -> dict:
    """Each population record's summed log-likelihood and token count over its positions
    (``parts``: (members' scores, positions), (non-members' scores, positions))."""
    return {"loglik": np.concatenate([sequence_loglik(s, p) for s, p in parts]).tolist(),
            "tokens": np.concatenate([p.sum(axis=1) for _, p in parts]).astype(int).tolist()}


def _record_stats(evaluation, ctx) -> dict:
    stats = {}
    for level in LEVELS:
        parts = [(s, level_positions(s, level)) for s in (evaluation.members, evaluation.nonmembers)]
        stats[level] = {"stat": np.concatenate([record_statistic(s, p) for s, p in parts]).tolist(), **_sums(parts)}
    for tagger in scrub_taggers(ctx.cfg):
        # Members' and non-members' values this tagger misses: how a scrubbed run and the same
        # method unscrubbed compare on what scrubbing left (report.differences.missed_value_difference).
        try:
            missed = ctx.scrubber.missed(tagger, ctx.data.members, ctx.data.nonmembers)
        except PrivtuneError:  # a tagger these data cannot take: the scrubbed run fails and says why
            continue
        stats[missed_level(tagger)] = _sums([(s, s.sensitive & mask) for s, mask in
                                             zip((evaluation.members, evaluation.nonmembers), missed)])
    stats["n_members"] = int(evaluation.members.nll.shape[0])
    people = [r.individual for r in ctx.data.members.records + ctx.data.nonmembers.records]
    index = {p: i for i, p in enumerate(dict.fromkeys(people))}
    stats["person"] = [index[p] for p in people]
    stats["selection_half"] = selection_half(people, ctx.cfg.data.seed).tolist()
    return stats
