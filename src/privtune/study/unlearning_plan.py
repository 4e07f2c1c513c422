"""The runs an unlearning method adds to a study, and the order they run in.

Per (source method, forget set, seed) the study adds:

- one ``retrain`` run: the source method trained from the base model on the training
  set without the forget individuals' records, the gold standard an unlearned model
  should look like on the forget set (close to it, not to a loss of infinity);
- one ``unlearn`` run per unlearning method, which starts from the source run's saved
  model. Its stored config holds the source run's config, so its id changes whenever the
  source's does (another learning rate for the source makes a new unlearning run).

Unlearning runs need their source's model, so they run in a second phase, after every
other run; each phase is one ``executor.execute`` call, so the local and the Ray
executors need no notion of dependencies.
"""

from __future__ import annotations

import json
from pathlib import Path

from privtune.config import StudyConfig, config_hash
from privtune.study.plan import RunSpec, _method_config, shared_config

RETRAIN_ROLE = "retrain"
UNLEARN_ROLE = "unlearn"


def unlearning_runs(cfg: StudyConfig, planned: list[RunSpec]) -> list[RunSpec]:
    """Retrain and unlearning runs of ``cfg``, given its other ``planned`` runs."""
    targets = {(r.config["method"]["label"], r.seed): r for r in planned if r.role == "target"}
    multi_seed = len(cfg.seeds) > 1
    retrain_names: dict[tuple[str, str], str] = {}
    out: list[RunSpec] = []
    for seed in cfg.seeds:
        for m in (m for m in cfg.methods if m.is_unlearning):
            suffix = f"-s{seed}" if multi_seed else ""
            source = targets[(m.unlearn.source, seed)]
            forget = m.unlearn.forget.model_dump()
            key = (m.unlearn.source, json.dumps(forget, sort_keys=True))
            if key not in retrain_names:
                n = 1 + sum(1 for s, _ in retrain_names if s == m.unlearn.source)
                retrain_names[key] = f"{m.unlearn.source}+retrain" + (f"-{n}" if n > 1 else "")
            retrain_cfg = {**source.config, "forget": forget}
            retrain = RunSpec(config_hash(retrain_cfg), cfg.name, retrain_names[key] + suffix, source.method, seed,
                              retrain_cfg, role=RETRAIN_ROLE)
            if retrain not in out:
                out.append(retrain)
            method = {**_method_config(cfg, m), "unlearn": m.unlearn.model_dump()}
            run_cfg = {**shared_config(cfg), "method": method, "seed": seed, "source": source.config}
            out.append(RunSpec(config_hash(run_cfg), cfg.name, m.label + suffix, m.method, seed, run_cfg,
                               role=UNLEARN_ROLE))
    return out


def source_run_id(spec: RunSpec) -> str:
    """The id of the run an unlearning run starts from."""
    return config_hash(spec.config["source"])


def retrain_run_id(spec: RunSpec) -> str:
    """The id of the retrained reference an unlearning run is compared with."""
    return config_hash({**spec.config["source"], "forget": spec.config["method"]["unlearn"]["forget"]})


def execution_phases(pending: list[RunSpec]) -> list[list[RunSpec]]:
    """Pending runs in the phases they must run in: unlearning runs after all others."""
    first = [r for r in pending if r.role != UNLEARN_ROLE]
    second = [r for r in pending if r.role == UNLEARN_ROLE]
    return [phase for phase in (first, second) if phase]


def missing_sources(plan: list[RunSpec], pending: list[RunSpec], artifacts_dir: Path) -> list[RunSpec]:
    """Source runs a pending unlearning run needs whose saved model is gone (deleted by
    hand): they are trained again, from the same config and seed."""
    by_id = {r.run_id: r for r in plan}
    needed = {source_run_id(r) for r in pending if r.role == UNLEARN_ROLE}
    return [by_id[i] for i in sorted(needed) if not (Path(artifacts_dir) / i).is_dir()]
