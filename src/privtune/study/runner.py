"""Executing one run: copy the base model, train it with its method, measure and attack it.

A :class:`StudyContext` holds what every run of a study shares and what is costly to
build twice: the loaded base model, the tokenised data (and its scrubbed copies, for
methods that scrub), and the base model's token scores, against which every trained
model's leakage is measured and which serve as the reference of the calibrated
membership attack (kept on disk for the whole study: :mod:`privtune.study.score_cache`).
Each model is run over the members and non-members once per evaluation, and every
measure and score-based attack reads that one :class:`Evaluation`.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from privtune.auditing.designs import design_of
from privtune.auditing.study_audit import audit_result, canary_scores, embeddings_frozen, not_audited, run_notes
from privtune.config import MethodSpec, StudyConfig
from privtune.data.tokenize import EncodedDataset, encode_records
from privtune.files import private_dir
from privtune.measures.efficiency import PeakMemory, count_parameters
from privtune.measures.flops import flop_profile, training_flops
from privtune.measures.exposure import canary_exposure
from privtune.measures.leakage import leakage_measures
from privtune.measures.token_scores import TokenScores, score_tokens
from privtune.models.loading import LoadedModel, load_model
from privtune.study import attacking
from privtune.study.dataset import StudyData, StudyRecords, build_study_data, shadow_membership
from privtune.study.plan import RunSpec, base_run, method_spec, train_plan
from privtune.study.progress import ProgressSink
from privtune.study.score_cache import ScoreCache, device_name
from privtune.study.scrubbing import TrainingScrubber
from privtune.study.stages import RunTimer, stage
from privtune.study.unlearning_plan import RETRAIN_ROLE, UNLEARN_ROLE
from privtune.train import distributed, streams
from privtune.train.loop import TrainResult, train
from privtune.train.methods import get_method
from privtune.train.precision import Runtime, resolve_runtime
from privtune.versions import dependency_versions

EpochCallback = Callable[[int, dict], None]


@dataclass
class Evaluation:
    """A model's token scores on members and non-members, and the measures from them."""

    members: TokenScores
    nonmembers: TokenScores
    measures: dict


@dataclass
class StudyContext:
    """Everything the runs of one study share, built once."""

    cfg: StudyConfig
    runtime: Runtime
    loaded: LoadedModel
    data: StudyData
    reference: LoadedModel | None = None
    _base: Evaluation | None = field(default=None, repr=False)
    _reference_scores: tuple[TokenScores, TokenScores] | None = field(default=None, repr=False)
    _scrubber: TrainingScrubber | None = field(default=None, repr=False)
    _base_model_attacks: dict = field(default_factory=dict, repr=False)
    _base_audit_scores: TokenScores | None = field(default=None, repr=False)

    @classmethod
    def build(cls, cfg: StudyConfig, records: StudyRecords | None = None) -> "StudyContext":
        """Load the model and encode the data (``records`` when the caller has built them)."""
        runtime = resolve_runtime(cfg.device, cfg.precision)
        loaded = load_model(cfg.model)
        loaded.model.to(runtime.device)
        data = build_study_data(cfg, loaded.tokenizer, records)
        reference = None
        if cfg.attacks.enabled and cfg.attacks.mia.reference_model:
            reference = load_model(cfg.attacks.mia.reference_model)
            attacking.check_same_tokenizer(loaded.tokenizer, reference.tokenizer, cfg.attacks.mia.reference_model)
            reference.model.to(runtime.device)
        return cls(cfg, runtime, loaded, data, reference)

    @property
    def artifacts_dir(self) -> Path:
        return Path(self.cfg.output_dir) / "artifacts"

    @property
    def provenance(self) -> dict:
        """What every result of this context records beyond its config: the digests of the
        data it used (``digests``, the cache's key besides the config) and the libraries'
        ``versions``."""
        return {"digests": self.data.digests.as_dict(), "versions": dependency_versions()}

    def score(self, model: torch.nn.Module, data: EncodedDataset) -> TokenScores:
        return score_tokens(model, data, self.runtime, batch_size=self.cfg.eval_batch_size)

    def score_population(self, model: torch.nn.Module) -> tuple[TokenScores, TokenScores]:
        """``model``'s scores on (members, non-members): one forward pass per record."""
        return self.score(model, self.data.members), self.score(model, self.data.nonmembers)

    @property
    def score_cache(self) -> ScoreCache:
        """Where the scores every run shares (base and reference model) are kept."""
        return ScoreCache(Path(self.cfg.output_dir) / "scores", {
            "base_run": base_run(self.cfg).run_id, "data": self.data.digests.data,
            "device": device_name(self.runtime.device), "precision": self.runtime.precision,
            "batch_size": self.cfg.eval_batch_size})

    def _shared_scores(self, model_ref: str, model: torch.nn.Module) -> tuple[TokenScores, TokenScores]:
        return self.score_cache.scores(model_ref, self.data.members, self.data.nonmembers,
                                       lambda: self.score_population(model))

    @property
    def base(self) -> Evaluation:
        """The base model's evaluation (computed once per study, then read from disk)."""
        if self._base is None:
            with stage("base model scores"):  # once per process: charged to the run that needs it first
                members, nonmembers = self._shared_scores(self.cfg.model, self.loaded.model)
                self._base = Evaluation(members, nonmembers,
                                        leakage_measures(members, nonmembers, members, nonmembers))
        return self._base

    def evaluate(self, model: torch.nn.Module) -> Evaluation:
        base = self.base
        with stage("measures"):
            members, nonmembers = self.score_population(model)
            return Evaluation(members, nonmembers,
                              leakage_measures(members, nonmembers, base.members, base.nonmembers))

    def reference_scores(self) -> tuple[TokenScores, TokenScores]:
        """Scores of the calibration reference: a named model, else the base model."""
        if self.reference is None:
            return self.base.members, self.base.nonmembers
        if self._reference_scores is None:
            with stage("reference model scores"):
                self._reference_scores = self._shared_scores(self.cfg.attacks.mia.reference_model,
                                                             self.reference.model)
        return self._reference_scores

    def base_model_attack(self, name: str):
        """A model attack's scores on the base model, for the advantage over it (once per process)."""
        if name not in self._base_model_attacks:
            self._base_model_attacks[name] = attacking.model_attack_scores(self, name, self.loaded.model, self.base)
        return self._base_model_attacks[name]

    @property
    def scrubber(self) -> TrainingScrubber:
        """Scrubbed copies of the training set, for the methods that ask for them."""
        if self._scrubber is None:
            self._scrubber = TrainingScrubber(self.data.train.records, self.data.tagger, self.loaded.tokenizer,
                                              self.cfg.data.max_length, self.cfg.data.seed)
        return self._scrubber

    @property
    def autocast_dtype(self):
        return torch.bfloat16 if self.runtime.precision == "bf16" else None

    def exposure(self, model: torch.nn.Module) -> list[dict]:
        if not self.data.canaries:
            return []
        with stage("canary exposure"):
            return canary_exposure(
                model, self.loaded.tokenizer, self.data.canaries, n_candidates=self.cfg.canaries.n_candidates,
                search_budget=self.cfg.canaries.search_budget, seed=self.cfg.data.seed,
                batch_size=max(16, self.cfg.eval_batch_size * 4),
                device=self.runtime.device, autocast_dtype=self.autocast_dtype)

    def attack(self, model: torch.nn.Module, evaluation: Evaluation) -> dict:
        return attacking.attack_model(self, model, evaluation)

    def privacy_audit(self, model: torch.nn.Module, dp: dict | None) -> dict:
        """The trained ``model``'s ``empirical_epsilon`` (:mod:`privtune.auditing.study_audit`):
        one pass over the audit canaries, against the base model's (kept for the study)."""
        canaries = self.data.audit
        if canaries is None:
            return not_audited("privacy_audit is off", dp)
        with stage("privacy audit"):
            if self._base_audit_scores is None:
                self._base_audit_scores, = self.score_cache.scores_of(
                    self.cfg.model, {"audit_canaries": canaries}, lambda: (self.score(self.loaded.model, canaries),))
            scores = canary_scores(self.score(model, canaries), self._base_audit_scores)
            return audit_result(scores, self.data.audit_trained, settings=self.cfg.privacy_audit, dp=dp,
                                seed=self.cfg.data.seed, designs=[design_of(r) for r in canaries.records],
                                notes=run_notes(canaries.records, embeddings_frozen(model)))


def execute_run(ctx: StudyContext, spec: RunSpec, on_epoch: EpochCallback = lambda e, m: None,
                progress: ProgressSink | None = None) -> dict:
    """Train (unless base) and measure one run, reporting its stages to ``progress``;
    returns its result dict, with its ``timing`` (:meth:`RunTimer.record`) and the
    context's :attr:`~StudyContext.provenance`."""
    with RunTimer(spec.label, progress) as timer:
        result = _execute(ctx, spec, on_epoch)
    return {**result, "timing": timer.record(_cpu_covers(ctx, spec)), **ctx.provenance}


def _cpu_covers(ctx: StudyContext, spec: RunSpec) -> str:
    """Which processes a run's CPU seconds count."""
    if not spec.is_base and not spec.is_shadow and method_spec(ctx.cfg, spec).federated:
        return "the server process only: Flower's simulated clients train in Ray worker processes, not counted"
    if distributed.current() is not None:
        return "rank 0's process only (the training seconds in efficiency sum every rank's CPU)"
    return "this process, all its threads"


def _execute(ctx: StudyContext, spec: RunSpec, on_epoch: EpochCallback) -> dict:
    if spec.is_base:
        return _measure_base(ctx, on_epoch)
    if spec.is_shadow:
        return _train_shadow(ctx, spec)
    if method_spec(ctx.cfg, spec).federated:
        from privtune.study.federated import execute_federated

        return execute_federated(ctx, spec, on_epoch)
    from privtune.study import unlearning  # it builds on this module

    if spec.role == UNLEARN_ROLE:
        return unlearning.run_unlearning(ctx, spec, on_epoch)
    runtime = ctx.runtime
    retrain = spec.role == RETRAIN_ROLE
    with stage("preparation"):
        scrubbed, train_set = training_set(ctx, spec)
        model = prepared_model(ctx, spec)
    baseline = ctx.base.measures | {"epsilon": 0.0 if get_method(spec.method).private else None}
    on_epoch(0, baseline)
    epochs: list[dict] = [{"epoch": 0, **baseline}]
    latest: list[Evaluation] = []

    def after_epoch(epoch: int, progress: TrainResult) -> None:
        evaluation = ctx.evaluate(model)
        measures = dict(evaluation.measures)
        if progress.privacy is not None:
            measures["epsilon"] = progress.privacy.epsilon
        on_epoch(epoch, measures)
        epochs.append({"epoch": epoch, **measures})
        latest[:] = [evaluation]

    result, memory = _measured_training(ctx, spec, model, train_set, on_epoch_end=after_epoch)
    return measured_result(
        ctx, spec, model, epochs, latest[0], dp=result.privacy.as_dict() if result.privacy else None,
        efficiency=efficiency_record(result, memory, model, runtime), train_tokens=train_set.n_tokens,
        scrub=scrub_report(ctx, scrubbed, latest[0]),
        **({"unlearning": unlearning.retrain_report(ctx, spec, model, latest[0])} if retrain else {}))


def measured_result(ctx: StudyContext, spec: RunSpec, model: torch.nn.Module, epochs: list[dict],
                    evaluation: Evaluation, *, dp: dict | None, efficiency: dict, train_tokens: int,
                    **sections) -> dict:
    """The result every trained run stores (a plain, federated or unlearning run alike):
    its per-epoch measures, exposure and attacks on the final model, its cost, and the
    method's own ``sections``; the model is saved first when the study keeps artifacts."""
    artifact = None
    if ctx.cfg.save_artifacts:
        with stage("saving the model"):
            artifact = save_artifact(ctx, spec, model)
    return {
        "final": {k: v for k, v in epochs[-1].items() if k != "epoch"},
        "epochs": epochs,
        "exposure": ctx.exposure(model),
        "attacks": ctx.attack(model, evaluation),
        "record_stats": attacking.record_stats(evaluation, ctx),
        "dp": dp,
        "empirical_epsilon": ctx.privacy_audit(model, dp),
        "efficiency": efficiency,
        "artifact": str(artifact) if artifact else None,
        "data": {**ctx.data.summary(), "train_tokens": train_tokens},
        **sections,
    }


def scrub_report(ctx: StudyContext, scrubbed, evaluation: Evaluation) -> dict | None:
    """A scrubbed run's ``scrub`` section: its tagger's figures, and its memorisation gap
    apart on the values the tagger missed and caught (``by_catch``); None when the run
    trained on the original text."""
    if scrubbed is None:
        return None
    base = ctx.base
    by_catch = ctx.scrubber.gap_by_catch(scrubbed.stats["tagger"], ctx.data.members, ctx.data.nonmembers,
                                         (evaluation.members, evaluation.nonmembers), (base.members, base.nonmembers))
    return {**scrubbed.stats, "by_catch": by_catch}


def train_share(ctx: StudyContext, spec: RunSpec) -> None:
    """A data-parallel rank other than 0: the run's training, on its share of each batch, and nothing else.

    It builds the model and training set exactly as rank 0 does (same seeds), so every
    rank starts from the same weights; rank 0 alone evaluates, attacks and saves.
    """
    if spec.is_base or spec.role == UNLEARN_ROLE or method_spec(ctx.cfg, spec).federated:
        return  # rank 0 alone: the base is only measured; unlearning and Flower's clients have loops of their own
    data = _shadow_half(ctx, spec)[1] if spec.is_shadow else training_set(ctx, spec)[1]
    _measured_training(ctx, spec, prepared_model(ctx, spec), data)


def method_training_set(ctx: StudyContext, entry: MethodSpec):
    """(scrubbing outcome or None, the encoded set the ``methods`` entry trains on)."""
    scrubbed = ctx.scrubber.training_set(entry.scrub) if entry.scrub else None  # first: a bad scrub fails fast
    return scrubbed, scrubbed.data if scrubbed else ctx.data.train


def training_set(ctx: StudyContext, spec: RunSpec):
    """(scrubbing outcome or None, the encoded set the run trains on)."""
    scrubbed, train_set = method_training_set(ctx, method_spec(ctx.cfg, spec))
    if spec.role == RETRAIN_ROLE:  # the reference an unlearned model is held to: never saw the forget set
        from privtune.study import unlearning

        train_set = unlearning.retrain_training_set(ctx, spec, train_set)
    return scrubbed, train_set


def prepared_model(ctx: StudyContext, spec: RunSpec) -> torch.nn.Module:
    streams.seed_global(spec.seed, streams.INIT)  # before prepare: adapter weights are drawn there
    return get_method(spec.method).prepare(copy.deepcopy(ctx.loaded.model), method_spec(ctx.cfg, spec).settings)


def _measured_training(ctx: StudyContext, spec: RunSpec, model, data: EncodedDataset,
                       **callbacks) -> tuple[TrainResult, PeakMemory]:
    """Train under the peak-memory probe, as the run's ``training`` stage (counted in
    steps); in a data-parallel run the peak is the largest rank's, the CPU time the sum
    over ranks."""
    plan = train_plan(ctx.cfg, spec)
    with PeakMemory(ctx.runtime.device) as memory, \
            stage("training", total=plan.epochs * math.ceil(len(data) / plan.batch_size)) as training:
        result = train(model, data, plan, ctx.runtime, on_step=training.advance, **callbacks)
    group = distributed.current()
    if group is not None:
        memory.peak_bytes = int(group.max_float(memory.peak_bytes))
        result.cpu_seconds = group.sum_int(round(result.cpu_seconds * 1e6)) / 1e6
    return result, memory


def efficiency_record(result: TrainResult, memory: PeakMemory, model: torch.nn.Module, runtime: Runtime,
                      data_parallel: bool = True, dp_engine: str | None = None) -> dict:
    """A run's cost figures; ``data_parallel=False`` for loops that train on rank 0 alone
    (federated, unlearning), whose figures are one process's under ``torchrun`` too.
    ``dp_engine``: the clipping engine of a DP run whose ``result`` has no privacy setup
    (federated clients); otherwise the setup's. Tokens per second counts real tokens, the
    FLOPs every computed position (``measures/flops.py``)."""
    group = distributed.current() if data_parallel else None
    trainable, total = count_parameters(model)
    engine = result.privacy.engine if result.privacy is not None else dp_engine
    return {
        "train_seconds": result.seconds,
        "seconds_per_epoch": result.seconds / max(1, len(result.epoch_seconds)),
        "tokens_per_second": result.tokens / result.seconds if result.seconds > 0 else math.nan,
        # CPU time: unlike wall time, hardly changed by other work on the machine (None:
        # not measured, as for federated clients in other processes)
        "train_cpu_seconds": result.cpu_seconds if result.cpu_seconds > 0 else None,
        "tokens_per_cpu_second": result.tokens / result.cpu_seconds if result.cpu_seconds > 0 else math.nan,
        "steps": result.steps, "tokens": result.tokens,
        "peak_memory_bytes": memory.peak_bytes, "memory_kind": memory.kind,
        "memory_at_start_bytes": memory.start_bytes,
        "trainable_params": trainable, "total_params": total,
        "flops_estimate": training_flops(flop_profile(model), result.records, result.positions, engine,
                                         result.forward_records, result.forward_positions),
        "device": str(runtime.device), "precision": runtime.precision,
        **({"world_size": group.world_size} if group else {}),  # tokens summed, memory the max, over ranks
    }


def _measure_base(ctx: StudyContext, on_epoch: EpochCallback) -> dict:
    base = ctx.base
    on_epoch(0, base.measures)
    _, total = count_parameters(ctx.loaded.model)
    return {
        "final": base.measures, "epochs": [{"epoch": 0, **base.measures}],
        "exposure": ctx.exposure(ctx.loaded.model),
        "attacks": ctx.attack(ctx.loaded.model, base),
        "record_stats": attacking.record_stats(base, ctx),
        "dp": None,
        "empirical_epsilon": not_audited("the base model is not trained: there is nothing to audit"),
        "efficiency": {"train_seconds": 0.0, "seconds_per_epoch": 0.0, "tokens_per_second": math.nan,
                       "train_cpu_seconds": 0.0, "tokens_per_cpu_second": math.nan, "steps": 0, "tokens": 0, "peak_memory_bytes": math.nan, "memory_kind": "none",
                       "trainable_params": 0, "total_params": total, "flops_estimate": 0.0,
                       "device": str(ctx.runtime.device), "precision": ctx.runtime.precision},
        "artifact": None, "data": ctx.data.summary(), "scrub": None,
    }


def _train_shadow(ctx: StudyContext, spec: RunSpec) -> dict:
    """Train a shadow model on a random half of the population; keep only its record stats."""
    with stage("preparation"):
        inside, half = _shadow_half(ctx, spec)
        model = prepared_model(ctx, spec)
    result, memory = _measured_training(ctx, spec, model, half)
    with stage("measures"):
        evaluation = Evaluation(*ctx.score_population(model), {})
    return {
        "record_stats": attacking.record_stats(evaluation, ctx),
        "shadow_in": np.asarray(inside, dtype=bool).tolist(),
        "dp": result.privacy.as_dict() if result.privacy else None,
        "efficiency": efficiency_record(result, memory, model, ctx.runtime),
    }


def _shadow_half(ctx: StudyContext, spec: RunSpec) -> tuple[list[bool], EncodedDataset]:
    """(membership of each population record, the encoded random half a shadow model trains on)."""
    cfg = ctx.cfg
    population = ctx.data.members.records + ctx.data.nonmembers.records
    inside = shadow_membership(population, spec.shadow_index, cfg.data.seed)
    records = [r for r, keep in zip(population, inside) if keep]
    scrub = method_spec(cfg, spec).scrub
    if scrub:  # trained like the target: on scrubbed text
        records = ctx.scrubber.scrub(records, scrub)
    return inside, encode_records(records, ctx.loaded.tokenizer, cfg.data.max_length)


def save_artifact(ctx: StudyContext, spec: RunSpec, model: torch.nn.Module) -> Path:
    """Save the model (or adapter) as safetensors; written aside, then renamed into place."""
    final = ctx.artifacts_dir / spec.run_id
    partial = ctx.artifacts_dir / f".{spec.run_id}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    private_dir(partial)  # mode 700: the weights can be prompted for what they memorised
    model.save_pretrained(partial, safe_serialization=True)
    ctx.loaded.tokenizer.save_pretrained(partial)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final
