"""Executing an unlearning run, and measuring what a model still knows of a forget set.

An unlearning run loads its source run's saved model (a whole model, or a PEFT adapter
on the study's base model), unlearns the forget set with its objective
(:mod:`privtune.train.unlearn`), training exactly what the source trained (the adapter
of an adapter run, the head of a head-only run), and is then measured like every run
(leakage and utility on all members and non-members, exposure, every attack), so it
sits on the study's privacy-utility plot. Its epoch 0 is the source model.

On top, every unlearning run and every retrained reference gets an ``unlearning``
section, :func:`forget_report`, computed from the token scores the evaluation already
holds (only extraction decodes anew):

- forget-set CE_S and CE_N, and its leakage gain over the base model;
- the same on the retain members (the members not forgotten), and utility (CE_N on
  non-members);
- membership inference of forget records against non-members, every score-based attack
  of the study (:mod:`privtune.attacks.mia`), each with the base model's AUC on the same
  records; the retrained model never saw the forget set, so its AUC is what "forgotten"
  looks like (not 0.5: the records themselves differ), and an unlearned model far *below*
  it gives the forget set away just as surely (its records now look unusually unlikely).
  The strongest of them is chosen by the report, two-sided
  (:func:`privtune.report.unlearning.forget_strongest`);
- prefix extraction of the forget set's sensitive values (forget records as "members").

An unlearning run's section also holds the same report for its source model, measured
before the first step, so source, unlearned and retrained models sit side by side.

A DP source may be unlearned: the comparison is informative (DP bounds what each record
contributed in the first place), but the unlearned model has no ε of its own, since the
unlearning steps read forget and retain records without clipping or noise, so it is
reported without one.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch

from privtune.attacks.extraction import prefix_extraction
from privtune.attacks.mia import score_attacks
from privtune.config import ForgetSettings
from privtune.errors import PrivtuneError
from privtune.measures.efficiency import PeakMemory
from privtune.measures.leakage import mean_loss
from privtune.study.attacking import scored_records
from privtune.study.external import load_audited_model
from privtune.study.forget import ForgetSet, resolve_forget_set
from privtune.study.plan import RunSpec
from privtune.study.runner import Evaluation, StudyContext, efficiency_record, measured_result, method_training_set
from privtune.study.stages import stage
from privtune.study.unlearning_plan import retrain_run_id, source_run_id
from privtune.train import streams
from privtune.train.methods import get_method
from privtune.train.unlearn import UnlearnPlan, unlearn
from privtune.train.unlearn_objectives import OBJECTIVES


def forget_set(ctx: StudyContext, settings: dict) -> ForgetSet:
    """The forget set a run's stored ``forget`` settings name."""
    members, nonmembers = ctx.data.members.records, ctx.data.nonmembers.records
    return ForgetSet(resolve_forget_set(ForgetSettings(**settings), members, nonmembers))


def _method(ctx: StudyContext, label: str):
    return next(m for m in ctx.cfg.methods if m.label == label)



def forget_report(ctx: StudyContext, model: torch.nn.Module, evaluation: Evaluation, forget: ForgetSet) -> dict:
    """What ``model`` still knows of the forget set, and what it kept of the rest."""
    members = ctx.data.members.records
    f_rows, r_rows = forget.rows(members)
    own_f, own_r = evaluation.members.rows(f_rows), evaluation.members.rows(r_rows)
    base_f, base_r = ctx.base.members.rows(f_rows), ctx.base.members.rows(r_rows)
    out = {
        "individuals": len(forget.individuals), "forget_records": len(f_rows), "retain_records": len(r_rows),
        "forget_rows": list(f_rows),  # member rows, for intervals from the runs' record_stats
        "forget_ce_s": mean_loss(own_f, True), "forget_ce_n": mean_loss(own_f, False),
        "forget_leakage_gain": mean_loss(base_f, True) - mean_loss(own_f, True),
        "retain_ce_s": mean_loss(own_r, True), "retain_ce_n": mean_loss(own_r, False),
        "retain_leakage_gain": mean_loss(base_r, True) - mean_loss(own_r, True),
        "utility_ce": mean_loss(evaluation.nonmembers, False),
    }
    cfg = ctx.cfg.attacks
    if not cfg.enabled:
        return out
    forget_records, nonmembers = [members[i] for i in f_rows], ctx.data.nonmembers.records
    ref_members, ref_nonmembers = ctx.reference_scores()
    mia = score_attacks(own_f, evaluation.nonmembers, ref_members.rows(f_rows), ref_nonmembers,
                        scored_records(ctx, forget_records), scored_records(ctx, nonmembers),
                        levels=tuple(cfg.mia.levels), attacks=cfg.mia.attacks, k=cfg.mia.k, fprs=tuple(cfg.mia.fprs),
                        base=(base_f, ctx.base.nonmembers), seed=ctx.cfg.data.seed)
    loss = next((e for e in mia if e["attack"] == "loss" and e["level"] == "record"), None)
    out.update(mia=mia, forget_mia_loss_auc=loss["auc"] if loss else None)
    if cfg.extraction.enabled and any(r.spans for r in forget_records):
        ex = cfg.extraction
        extraction = prefix_extraction(model, ctx.loaded.tokenizer, forget_records, nonmembers,
                                       max_spans_per_type=ex.max_spans_per_type, n_samples=ex.n_samples,
                                       max_length=ctx.cfg.data.max_length, device=ctx.runtime.device,
                                       autocast_dtype=ctx.autocast_dtype, seed=ctx.cfg.data.seed)
        out.update(extraction=extraction, forget_extraction=extraction["greedy"]["ALL"]["member_rate"])
    return out


def forget_curve(evaluation: Evaluation, forget: ForgetSet, records) -> dict:
    """The forget set's losses, for the per-epoch rows (cheap: no attack)."""
    f_rows, _ = forget.rows(records)
    own = evaluation.members.rows(f_rows)
    return {"forget_ce_s": mean_loss(own, True), "forget_ce_n": mean_loss(own, False)}


def load_source(ctx: StudyContext, spec: RunSpec) -> torch.nn.Module:
    """The source run's saved model, with the source method's parameters trainable."""
    source = spec.config["source"]["method"]
    artifact = ctx.artifacts_dir / source_run_id(spec)
    if not artifact.is_dir():
        raise PrivtuneError(f"unlearning run {spec.label} starts from the saved model of {source['label']}, but "
                            f"{artifact} does not exist (the source run failed)",
                            f"fix run {source['label']} and run the study again")
    model = load_audited_model(ctx, str(artifact))
    method = get_method(source["method"])
    if not method.adapter:  # an adapter is loaded trainable; a whole model gets the source's trainable set
        model = method.prepare(model, _method(ctx, source["label"]).settings)
    return model


def run_unlearning(ctx: StudyContext, spec: RunSpec, on_epoch: Callable[[int, dict], None]) -> dict:
    """Load the source model, unlearn the forget set, measure the result."""
    cfg, runtime = ctx.cfg, ctx.runtime
    settings = spec.config["method"]
    objective = OBJECTIVES[settings["method"]]
    with stage("preparation"):
        forget = forget_set(ctx, settings["unlearn"]["forget"])
        forget_data, retain_data = forget.split(
            method_training_set(ctx, _method(ctx, settings["unlearn"]["source"]))[1])
        streams.seed_global(spec.seed, streams.INIT)  # what loading and preparing draw, if anything
        model = load_source(ctx, spec)
    members = ctx.data.members.records
    source_eval = ctx.evaluate(model)
    source_report = forget_report(ctx, model, source_eval, forget)
    epochs = [{"epoch": 0, **source_eval.measures, **forget_curve(source_eval, forget, members), "epsilon": None}]
    on_epoch(0, {k: v for k, v in epochs[0].items() if k != "epoch"})
    latest = [source_eval]

    def after_epoch(epoch: int, progress) -> None:
        evaluation = ctx.evaluate(model)
        measures = {**evaluation.measures, **forget_curve(evaluation, forget, members), "epsilon": None}
        on_epoch(epoch, measures)
        epochs.append({"epoch": epoch, **measures})
        latest[:] = [evaluation]

    plan = UnlearnPlan(objective=objective, epochs=settings["epochs"], batch_size=settings["batch_size"],
                       physical_batch_size=cfg.train.physical_batch_size, lr=settings["lr"],
                       weight_decay=settings["weight_decay"], seed=spec.seed, beta=settings["unlearn"]["beta"],
                       retain_weight=settings["unlearn"]["retain_weight"])
    with PeakMemory(runtime.device) as memory, \
            stage("training", total=plan.epochs * math.ceil(len(forget_data) / plan.batch_size)) as training:
        reference = None  # the KL reference is this objective's memory: copied inside the probe
        if objective.retain == "kl" and settings["unlearn"]["retain_weight"] > 0:
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        result = unlearn(model, forget_data, retain_data, plan, runtime, reference=reference,
                         on_epoch_end=after_epoch, on_step=training.advance)
    del reference
    evaluation = latest[0]
    return measured_result(
        ctx, spec, model, epochs, evaluation, dp=None,  # the unlearning steps read the records without noise
        efficiency=efficiency_record(result, memory, model, runtime, data_parallel=False),
        train_tokens=forget_data.n_tokens,
        unlearning={**forget_report(ctx, model, evaluation, forget), "source": source_report,
                    "source_run": source_run_id(spec), "retrain_run": retrain_run_id(spec),
                    "source_label": settings["unlearn"]["source"], "objective": objective.name,
                    "forget_ids": sorted(forget.individuals)})


def retrain_report(ctx: StudyContext, spec: RunSpec, model: torch.nn.Module, evaluation: Evaluation) -> dict:
    """The ``unlearning`` section of a retrained reference."""
    forget = forget_set(ctx, spec.config["forget"])
    return {**forget_report(ctx, model, evaluation, forget), "forget_ids": sorted(forget.individuals)}


def retrain_training_set(ctx: StudyContext, spec: RunSpec, train_set):
    """A retrained reference's training set: ``train_set`` without the forget records."""
    return forget_set(ctx, spec.config["forget"]).split(train_set)[1]

