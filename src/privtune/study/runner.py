"""Executing one run: copy the base model, train it with its method, measure it.

A :class:`StudyContext` holds what every run of a study shares and what is costly to
build twice: the loaded base model, the tokenised data, and the base model's token
scores, against which every trained model's leakage is measured.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from privtune.config import StudyConfig
from privtune.data.tokenize import EncodedDataset
from privtune.measures.efficiency import PeakMemory, count_parameters, training_flops
from privtune.measures.exposure import canary_exposure
from privtune.measures.leakage import leakage_measures
from privtune.measures.token_scores import TokenScores, score_tokens
from privtune.models.loading import LoadedModel, load_model
from privtune.study.dataset import StudyData, build_study_data
from privtune.study.plan import RunSpec, train_plan
from privtune.train.loop import TrainResult, train
from privtune.train.methods import get_method
from privtune.train.precision import Runtime, resolve_runtime

EpochCallback = Callable[[int, dict], None]


@dataclass
class StudyContext:
    """Everything the runs of one study share, built once."""

    cfg: StudyConfig
    runtime: Runtime
    loaded: LoadedModel
    data: StudyData
    base_scores: dict[str, TokenScores] = field(default_factory=dict)

    @classmethod
    def build(cls, cfg: StudyConfig) -> "StudyContext":
        runtime = resolve_runtime(cfg.device, cfg.precision)
        loaded = load_model(cfg.model)
        loaded.model.to(runtime.device)
        data = build_study_data(cfg, loaded.tokenizer)
        return cls(cfg, runtime, loaded, data)

    @property
    def artifacts_dir(self) -> Path:
        return Path(self.cfg.output_dir) / "artifacts"

    def score(self, model: torch.nn.Module, data: EncodedDataset) -> TokenScores:
        return score_tokens(model, data, self.runtime, batch_size=self.cfg.eval_batch_size)

    def base(self) -> dict[str, TokenScores]:
        """The base model's scores on members and non-members (computed once)."""
        if not self.base_scores:
            self.base_scores = {"train": self.score(self.loaded.model, self.data.members),
                                "test": self.score(self.loaded.model, self.data.nonmembers)}
        return self.base_scores

    def base_measures(self) -> dict:
        """The base model's own measures, from its cached scores."""
        base = self.base()
        return leakage_measures(base["train"], base["test"], base["train"], base["test"])

    def measure(self, model: torch.nn.Module) -> dict:
        base = self.base()
        return leakage_measures(self.score(model, self.data.members), self.score(model, self.data.nonmembers),
                                base["train"], base["test"])

    def exposure(self, model: torch.nn.Module) -> list[dict]:
        if not self.data.canaries:
            return []
        return canary_exposure(
            model, self.loaded.tokenizer, self.data.canaries, n_candidates=self.cfg.canaries.n_candidates,
            seed=self.cfg.data.seed, batch_size=max(16, self.cfg.eval_batch_size * 4),
            device=self.runtime.device,
            autocast_dtype=torch.bfloat16 if self.runtime.precision == "bf16" else None)


def execute_run(ctx: StudyContext, spec: RunSpec, on_epoch: EpochCallback = lambda e, m: None,
                on_step: Callable[[], None] = lambda: None) -> dict:
    """Train (unless base) and measure one run; returns its result dict."""
    if spec.is_base:
        return _measure_base(ctx, on_epoch)
    cfg, runtime = ctx.cfg, ctx.runtime
    method = get_method(spec.method)
    plan = train_plan(cfg, spec)
    model = method.prepare(copy.deepcopy(ctx.loaded.model), _lora_settings(cfg, spec))
    trainable, total = count_parameters(model)
    epochs: list[dict] = []
    baseline = ctx.base_measures() | {"epsilon": 0.0 if method.private else None}
    on_epoch(0, baseline)
    epochs.append({"epoch": 0, **baseline})

    def after_epoch(epoch: int, progress: TrainResult) -> None:
        measures = ctx.measure(model)
        if progress.privacy is not None:
            measures["epsilon"] = progress.privacy.epsilon
        on_epoch(epoch, measures)
        epochs.append({"epoch": epoch, **measures})

    torch.manual_seed(spec.seed)
    with PeakMemory(runtime.device) as memory:
        result = train(model, ctx.data.train, plan, runtime, on_epoch_end=after_epoch, on_step=on_step)
    exposure = ctx.exposure(model)
    artifact = _save_artifact(ctx, spec, model) if cfg.save_artifacts else None
    return {
        "final": {k: v for k, v in epochs[-1].items() if k != "epoch"},
        "epochs": epochs,
        "exposure": exposure,
        "dp": _dp_summary(result),
        "efficiency": {
            "train_seconds": result.seconds,
            "seconds_per_epoch": result.seconds / max(1, len(result.epoch_seconds)),
            "tokens_per_second": result.tokens / result.seconds if result.seconds > 0 else math.nan,
            "steps": result.steps, "tokens": result.tokens,
            "peak_memory_bytes": memory.peak_bytes, "memory_kind": memory.kind,
            "trainable_params": trainable, "total_params": total,
            "flops_estimate": training_flops(total, trainable, result.tokens),
            "device": str(runtime.device), "precision": runtime.precision,
        },
        "artifact": str(artifact) if artifact else None,
        "data": ctx.data.summary(),
    }


def _measure_base(ctx: StudyContext, on_epoch: EpochCallback) -> dict:
    measures = ctx.base_measures()
    on_epoch(0, measures)
    trainable, total = count_parameters(ctx.loaded.model)
    return {
        "final": measures, "epochs": [{"epoch": 0, **measures}], "exposure": ctx.exposure(ctx.loaded.model),
        "dp": None,
        "efficiency": {"train_seconds": 0.0, "seconds_per_epoch": 0.0, "tokens_per_second": math.nan,
                       "steps": 0, "tokens": 0, "peak_memory_bytes": math.nan, "memory_kind": "none",
                       "trainable_params": 0, "total_params": total, "flops_estimate": 0.0,
                       "device": str(ctx.runtime.device), "precision": ctx.runtime.precision},
        "artifact": None, "data": ctx.data.summary(),
    }


def _lora_settings(cfg: StudyConfig, spec: RunSpec):
    return next(m for m in cfg.methods if m.label == spec.config["method"]["label"]).lora


def _dp_summary(result: TrainResult) -> dict | None:
    if result.privacy is None:
        return None
    return result.privacy.as_dict()


def _save_artifact(ctx: StudyContext, spec: RunSpec, model: torch.nn.Module) -> Path:
    """Save the model (or adapter) as safetensors; written aside, then renamed into place."""
    final = ctx.artifacts_dir / spec.run_id
    partial = ctx.artifacts_dir / f".{spec.run_id}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    ctx.loaded.tokenizer.save_pretrained(partial)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final
