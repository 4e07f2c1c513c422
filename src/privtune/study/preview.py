"""What ``privtune run STUDY --plan`` shows: the runs a study would do, without training.

Each planned run (:func:`privtune.study.plan.plan_study`, sweeps expanded) with whether
the database already holds a finished copy on the study's current data (then the run is
skipped), and for the others an estimated time: the median, over finished runs of the
same method and model in the database (any study), of their wall time per training
record and epoch, times this run's records and epochs. Crude (it ignores sequence length
and load, which the stored runs record), but drawn from this machine's own runs; a
method never run here has no estimate, and says so.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from privtune.config import StudyConfig
from privtune.study.dataset import build_study_records, study_digests
from privtune.study.plan import RunSpec, plan_study
from privtune.study.store import Store


@dataclass(frozen=True)
class PlannedRun:
    label: str
    method: str
    seed: int
    role: str
    run_id: str
    stored: bool
    #: why a finished copy cannot be reused (data changed), or None
    rerun_reason: str | None
    estimated_seconds: float | None
    #: how many stored runs the estimate rests on
    estimate_from: int

    def to_dict(self) -> dict:
        return asdict(self)


def preview_study(cfg: StudyConfig) -> list[PlannedRun]:
    """Every run ``cfg`` plans, what the database holds of it, and an estimate for the rest."""
    from privtune.models.loading import load_tokenizer  # imported here: transformers
    from privtune.study.driver import DB_NAME, stale_reason  # the driver runs studies; this only reads

    records = build_study_records(cfg)
    digest = study_digests(records, load_tokenizer(cfg.model)).data
    path = Path(cfg.output_dir) / DB_NAME
    store = Store(path) if path.exists() else None
    try:
        history = _history(store) if store else []
        out = []
        for spec in plan_study(cfg):
            done = store is not None and store.status(spec.run_id) == "done"
            why = stale_reason(store, spec, digest) if done else None
            seconds, support = (None, 0) if done and why is None else _estimate(spec, len(records.train), history)
            out.append(PlannedRun(spec.label, spec.method, spec.seed, spec.role, spec.run_id, done and why is None,
                                  why, seconds, support))
        return out
    finally:
        if store is not None:
            store.close()


def _history(store: Store) -> list[tuple[str, str, float]]:
    """(method, model, wall seconds per training record and epoch) of every finished run."""
    out = []
    for run in store.runs(per_record=False):
        wall = (run.get("timing") or {}).get("wall_seconds")
        records = (run.get("data") or {}).get("train_records")
        epochs = (run.get("config", {}).get("method") or {}).get("epochs") or 1
        if run.get("status") == "done" and wall and records:
            out.append((run["method"], run.get("model"), wall / (records * epochs)))
    return out


def _estimate(spec: RunSpec, train_records: int, history) -> tuple[float | None, int]:
    rates = [rate for method, model, rate in history if method == spec.method and model == spec.config.get("model")]
    if not rates:
        return None, 0
    epochs = (spec.config.get("method") or {}).get("epochs") or 1
    return statistics.median(rates) * train_records * epochs, len(rates)


def describe(planned: PlannedRun) -> str:
    """The run's state in words, for the table."""
    if planned.stored:
        return "stored: skipped"
    if planned.rerun_reason:
        return "stored, but its data changed: runs again"
    return "to run"
