"""A study config expanded into runs, each with the hash that identifies it.

Three roles:

- ``base``: the untouched model, everyone's reference, measured by the same code;
- ``target``: one per (method, seed), the runs the study compares;
- ``shadow``: K models trained like one of the targets, each on a random half of the
  population (members and non-members), for the LiRA and RMIA attacks.

Unlearning methods add two more, ``retrain`` and ``unlearn``
(:mod:`privtune.study.unlearning_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass

from privtune.config import SETTINGS_FIELDS, MethodSpec, StudyConfig, config_hash
from privtune.train.loop import TrainPlan


@dataclass(frozen=True)
class RunSpec:
    """One unit of work: train (unless base) and measure one model."""

    run_id: str
    study: str
    label: str
    method: str
    seed: int
    config: dict
    role: str = "target"

    @property
    def is_base(self) -> bool:
        return self.role == "base"

    @property
    def is_shadow(self) -> bool:
        return self.role == "shadow"

    @property
    def shadow_index(self) -> int:
        return self.config["shadow"]


def shared_config(cfg: StudyConfig) -> dict:
    """What every run of the study shares: what changes its numbers, and the study's name
    (a row of the database belongs to one study, so two studies never share a run)."""
    attacks = cfg.attacks.model_dump(exclude={"shadow"})
    return {
        "study": cfg.name,
        "model": cfg.model,
        "data": cfg.data.model_dump(),
        "canaries": cfg.canaries.model_dump(),
        "backdoor": cfg.backdoor.model_dump(),
        "attacks": attacks,
        "precision": cfg.precision,
        # Only when on, so runs planned before the audit existed keep their identity.
        # compare_designs only when set, for the same reason.
        **({"privacy_audit": cfg.privacy_audit.model_dump(exclude=set() if cfg.privacy_audit.compare_designs
                                                           else {"compare_designs"})}
           if cfg.privacy_audit.enabled else {}),
    }


def _method_config(cfg: StudyConfig, m: MethodSpec) -> dict:
    return {
        "method": m.method, "label": m.label,
        "lr": m.lr if m.lr is not None else cfg.train.lr,
        "epochs": m.epochs if m.epochs is not None else cfg.train.epochs,
        "batch_size": cfg.train.batch_size,
        "weight_decay": cfg.train.weight_decay,
        "lora": m.lora.model_dump() if m.lora else None,
        "dp": m.dp.model_dump() if m.dp else None,
        # The other sections only when set, so runs planned before they existed keep
        # their identity (and are found in the database).
        **{name: getattr(m, name).model_dump() for name in SETTINGS_FIELDS
           if name != "lora" and getattr(m, name) is not None},
        **({"scrub": m.scrub.model_dump()} if m.scrub else {}),
        **({"federated": m.federated.model_dump()} if m.federated else {}),
    }


def method_spec(cfg: StudyConfig, spec: RunSpec) -> MethodSpec:
    """The study's method entry that ``spec`` trains with."""
    return next(m for m in cfg.methods if m.label == spec.config["method"]["label"])


def train_plan(cfg: StudyConfig, spec: RunSpec) -> TrainPlan:
    """The resolved training hyperparameters of ``spec``."""
    m = spec.config["method"]
    return TrainPlan(epochs=m["epochs"], batch_size=m["batch_size"],
                     physical_batch_size=cfg.train.physical_batch_size, lr=m["lr"],
                     weight_decay=m["weight_decay"], seed=spec.seed, dp=method_spec(cfg, spec).dp)


def base_run(cfg: StudyConfig) -> RunSpec:
    """The study's base run: the untouched model, measured like every other."""
    base_cfg = {**shared_config(cfg), "method": {"method": "base"}}
    return RunSpec(config_hash(base_cfg), cfg.name, "base", "base", 0, base_cfg, role="base")


def plan_study(cfg: StudyConfig) -> list[RunSpec]:
    """Base run, then shadows (when asked for), then one run per (method, seed), then the
    retrain and unlearning runs of the unlearning methods."""
    from privtune.study.unlearning_plan import unlearning_runs  # it builds on this module

    shared = shared_config(cfg)
    runs = [base_run(cfg)]
    if cfg.attacks.enabled and cfg.attacks.shadow.models:
        label = cfg.attacks.shadow.method or next(m.label for m in cfg.methods if not m.is_unlearning)
        m = next(x for x in cfg.methods if x.label == label)
        for k in range(cfg.attacks.shadow.models):
            run_cfg = {**shared, "method": _method_config(cfg, m), "seed": k, "shadow": k}
            runs.append(RunSpec(config_hash(run_cfg), cfg.name, f"shadow-{k}", m.method, k, run_cfg, role="shadow"))
    multi_seed = len(cfg.seeds) > 1
    for seed in cfg.seeds:
        for m in (m for m in cfg.methods if not m.is_unlearning):
            run_cfg = {**shared, "method": _method_config(cfg, m), "seed": seed}
            label = f"{m.label}-s{seed}" if multi_seed else m.label
            runs.append(RunSpec(config_hash(run_cfg), cfg.name, label, m.method, seed, run_cfg))
    return runs + unlearning_runs(cfg, runs)
