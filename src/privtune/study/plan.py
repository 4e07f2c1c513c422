"""A study config expanded into runs, each with the hash that identifies it.

The base model (no training) is a run of its own: every method is measured against it,
and it is measured by the same code as every trained model.
"""

from __future__ import annotations

from dataclasses import dataclass

from privtune.config import StudyConfig, config_hash
from privtune.train.loop import TrainPlan


@dataclass(frozen=True)
class RunSpec:
    """One unit of work: train (unless ``method == "base"``) and measure one model."""

    run_id: str
    study: str
    label: str
    method: str
    seed: int
    config: dict

    @property
    def is_base(self) -> bool:
        return self.method == "base"


def _shared(cfg: StudyConfig) -> dict:
    """What every run of the study shares and what changes its numbers."""
    return {
        "model": cfg.model,
        "data": cfg.data.model_dump(),
        "canaries": cfg.canaries.model_dump(),
        "precision": cfg.precision,
    }


def train_plan(cfg: StudyConfig, spec: RunSpec) -> TrainPlan:
    """The resolved training hyperparameters of ``spec``."""
    m = spec.config["method"]
    return TrainPlan(epochs=m["epochs"], batch_size=m["batch_size"],
                     physical_batch_size=cfg.train.physical_batch_size, lr=m["lr"],
                     weight_decay=m["weight_decay"], seed=spec.seed,
                     dp=next(x for x in cfg.methods if x.label == m["label"]).dp)


def plan_study(cfg: StudyConfig) -> list[RunSpec]:
    """The base run, then one run per (method, seed), in config order."""
    shared = _shared(cfg)
    base_cfg = {**shared, "method": {"method": "base"}}
    runs = [RunSpec(config_hash(base_cfg), cfg.name, "base", "base", 0, base_cfg)]
    multi_seed = len(cfg.seeds) > 1
    for seed in cfg.seeds:
        for m in cfg.methods:
            method = {
                "method": m.method, "label": m.label,
                "lr": m.lr if m.lr is not None else cfg.train.lr,
                "epochs": m.epochs if m.epochs is not None else cfg.train.epochs,
                "batch_size": cfg.train.batch_size,
                "weight_decay": cfg.train.weight_decay,
                "lora": m.lora.model_dump() if m.lora else None,
                "dp": m.dp.model_dump() if m.dp else None,
            }
            run_cfg = {**shared, "method": method, "seed": seed}
            label = f"{m.label}-s{seed}" if multi_seed else m.label
            runs.append(RunSpec(config_hash(run_cfg), cfg.name, label, m.method, seed, run_cfg))
    return runs
