"""Running a study: plan, skip what is done, execute the rest, write every outcome.

A finished run is reused only when its stored result was measured on the same data as
the study has now: its config hash and its data digest (``privtune.data.digest``) are
the cache's key together. A run whose data changed (an edited JSONL file, another
tokenizer) is run again, and the driver says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from privtune.config import StudyConfig
from privtune.data.digest import short
from privtune.errors import CrashLogged, PrivtuneError
from privtune.models.loading import check_safetensors, load_tokenizer
from privtune.study.dataset import build_study_records, study_digests
from privtune.study.shadow_attacks import add_shadow_attacks
from privtune.study.executor import Executor, LocalExecutor, RunHooks, failure_line
from privtune.study.forget import check_forget_sets
from privtune.study.plan import RunSpec, plan_study
from privtune.study.progress import LEFT_ALONE, ProgressSink, default_sink
from privtune.study.stages import study_stage
from privtune.study.store import Store
from privtune.study.unlearning_plan import UNLEARN_ROLE, execution_phases, missing_sources, retrain_run_id, \
    source_run_id

DB_NAME = "privtune.db"


@dataclass
class StudyOutcome:
    done: list[str]
    skipped: list[str]
    failed: dict[str, str]
    db_path: Path
    #: label -> why a run the database held as done ran again (its data changed)
    rerun: dict[str, str] = field(default_factory=dict)
    #: label -> why this process left a pending run alone (another process holds it)
    busy: dict[str, str] = field(default_factory=dict)


def open_store(cfg: StudyConfig) -> Store:
    return Store(Path(cfg.output_dir) / DB_NAME)


def run_study(cfg: StudyConfig, executor: Executor | None = None, show_progress: bool = True,
              say: Callable[[str], None] = print, progress: ProgressSink | None = None) -> StudyOutcome:
    """Execute every run of ``cfg`` that the database does not already hold as done on
    the study's current data; ``say`` gets a line for each finished run that runs again.
    Progress goes to ``progress``; by default bars on a terminal, plain lines otherwise
    (:func:`~privtune.study.progress.default_sink`), nothing without ``show_progress``.

    Each finished run is committed as soon as it ends, so an interruption loses only the
    run in progress; a failed run is recorded with its error and the others go on. A run
    is claimed in the database just before it is handed to the executor: one that
    another process is working on (the same study started twice), or has finished since
    this one planned, is skipped and listed in ``busy``, and so is an unlearning run
    whose source or retrained reference another process holds.
    """
    from privtune.study.runner import StudyContext

    check_forget_sets(cfg)  # a bad forget set fails the study before any run starts
    records = build_study_records(cfg)  # bad data fails here, before a database is made
    digest = study_digests(records, load_tokenizer(cfg.model)).data
    store = open_store(cfg)
    planned_at = time.time()
    plan = plan_study(cfg)
    stale = {r.run_id: why for r in plan if (why := stale_reason(store, r, digest))}
    pending = [r for r in plan if store.status(r.run_id) != "done" or r.run_id in stale]
    retrain = {r.run_id for r in missing_sources(plan, pending, Path(cfg.output_dir) / "artifacts")}
    pending = [r for r in plan if r in pending or r.run_id in retrain]
    outcome = StudyOutcome(done=[], skipped=[r.label for r in plan if r not in pending], failed={},
                           db_path=store.path, rerun={r.label: stale[r.run_id] for r in plan if r.run_id in stale})
    for line in outcome.rerun.values():
        say(line)
    if executor is None:
        executor = LocalExecutor(lambda: StudyContext.build(cfg, records), retries=cfg.retries,
                                 log_dir=Path(cfg.output_dir) / "logs")
    if progress is None:
        progress = default_sink() if show_progress else ProgressSink()

    busy_ids: set[str] = set()

    def claim(spec: RunSpec) -> bool:
        needs = {source_run_id(spec), retrain_run_id(spec)} if spec.role == UNLEARN_ROLE else set()
        held = sorted(by_id[i].label for i in needs & busy_ids)
        why = (f"it needs run {held[0]}, which was left to another privtune process" if held else
               store.claim(spec.run_id, spec.study, spec.label, spec.method, spec.config, spec.role,
                           status="queued", planned_at=planned_at))
        if why:
            busy_ids.add(spec.run_id)
            outcome.busy[spec.label] = why
            progress.run_finished(spec.label, LEFT_ALONE, 0.0, why)  # it counts as handled
        return why is None

    def started(spec: RunSpec) -> None:
        store.start(spec.run_id, spec.study, spec.label, spec.method, spec.config, spec.role)

    def finished(spec: RunSpec, result: dict) -> None:
        used = result["digests"]["data"]
        if used != digest:  # a worker read another copy of the data, or the data changed meanwhile
            failed(spec, f"it ran on data with digest {short(used)}, but the study's data have digest "
                         f"{short(digest)}; give every worker the same data and run the study again")
            return
        _store_result(store, spec.run_id, result)
        outcome.done.append(spec.label)

    def failed(spec: RunSpec, error: str) -> None:
        store.fail(spec.run_id, error)
        outcome.failed[spec.label] = error

    by_id = {r.run_id: r for r in plan}
    hooks = RunHooks(started=started, epoch=lambda s, e, m: store.add_epoch(s.run_id, e, m),
                     finished=finished, failed=failed, progress=progress, claim=claim)
    progress.study_started(len(pending))
    try:
        for phase in execution_phases(pending):  # unlearning runs after the runs they start from
            executor.execute(phase, hooks)
        if cfg.attacks.enabled and cfg.attacks.shadow.models:
            with study_stage(progress, "shadow-model attacks"):
                add_shadow_attacks(cfg, store, digest)
    finally:
        progress.study_finished()
        store.close()
    return outcome


def stale_reason(store: Store, spec: RunSpec, digest: str) -> str | None:
    """Why the database's finished ``spec`` cannot be reused with data of ``digest``
    (``None``: it can, or it has not finished)."""
    if store.status(spec.run_id) != "done":
        return None
    stored = store.data_digest(spec.run_id)
    if stored == digest:
        return None
    again = "measuring it again" if spec.is_base else "retraining"
    if stored is None:
        return f"run {spec.label}: stored without a data digest (by an older privtune), its data unknown; {again}"
    return f"run {spec.label}: data changed since it was stored (digest {short(stored)} -> {short(digest)}); {again}"


def _store_result(store: Store, run_id: str, result: dict) -> None:
    for row in result.get("epochs", []):
        store.add_epoch(run_id, row["epoch"], {k: v for k, v in row.items() if k != "epoch"})
    store.finish(run_id, {k: v for k, v in result.items() if k != "epochs"})


def audit_external(cfg: StudyConfig, model_ref: str, label: str | None = None,
                   say: Callable[[str], None] = print) -> str:
    """Measure and attack a model privtune did not train, as a run of study ``cfg``.

    The study's base run is measured first when the database lacks it, or holds it
    measured on other data (every measure is relative to it). Returns the audit's label.
    A failed audit is stored as failed, like any run, its traceback under ``logs/``, and
    raised as one line naming that file.
    """
    from privtune.study.external import AUDIT_METHOD, AUDIT_ROLE, audit_config, audit_label, audit_model, \
        load_audited_model
    from privtune.study.runner import StudyContext, execute_run

    label = audit_label(cfg, model_ref, label)
    if Path(model_ref).is_dir():  # a corrupt file fails now, not after the base run
        check_safetensors(model_ref)
    run_id, run_cfg = audit_config(cfg, model_ref, label)
    ctx = StudyContext.build(cfg)
    store = open_store(cfg)
    try:
        base = plan_study(cfg)[0]
        digest = ctx.data.digests.data
        why = stale_reason(store, base, digest)
        if why:
            say(why)
        if why or store.status(base.run_id) != "done":
            store.start(base.run_id, base.study, base.label, base.method, base.config, base.role)
            _store_result(store, base.run_id, execute_run(ctx, base))
        store.start(run_id, cfg.name, label, AUDIT_METHOD, run_cfg, AUDIT_ROLE)
        try:
            model = load_audited_model(ctx, model_ref)
            _store_result(store, run_id, audit_model(ctx, model, model_ref))
        except Exception as e:
            line = failure_line(e, run_id, 1, Path(cfg.output_dir) / "logs")
            store.fail(run_id, line)
            if isinstance(e, PrivtuneError):
                raise PrivtuneError(line) from e
            raise CrashLogged(line) from e
        if cfg.attacks.enabled and cfg.attacks.shadow.models:
            add_shadow_attacks(cfg, store, digest)
    finally:
        store.close()
    return label
