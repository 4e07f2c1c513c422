"""A study under ``torchrun``: every run trains data-parallel over all the processes.

Rank 0 is the driver as in a single process: it plans, skips what the database holds,
and for each pending run broadcasts the run's spec, then trains its share, evaluates,
attacks, saves the artifact and writes the row; the other ranks receive the spec, train
their share (``runner.train_share``) and wait for the next one. So the ranks agree on the
pending list without reading the database, and only rank 0 ever writes.

A failed run stops the whole study, after rank 0 has recorded it: a rank cannot skip a
run alone without leaving the others waiting in a collective, and ``torchrun`` ends
every rank once one has exited with an error. The same command then resumes, skipping
finished runs; nothing is retried, as a retry of one rank alone would deadlock likewise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from privtune.config import StudyConfig
from privtune.errors import PrivtuneError
from privtune.study.executor import LocalExecutor, RunHooks
from privtune.study.plan import RunSpec
from privtune.train.distributed import Group


@dataclass
class DataParallelExecutor(LocalExecutor):
    """Rank 0's executor: the local executor, announcing each run to the other ranks first."""

    group: Group | None = None

    def release_followers(self) -> None:
        """Tell the other ranks the study is over: once, after its last phase (a study with
        unlearning runs calls :meth:`execute` twice)."""
        self.group.broadcast_object(None)

    def _execute_with_retries(self, spec: RunSpec, hooks: RunHooks) -> None:
        self.group.broadcast_object(spec)
        errors: list[str] = []

        def failed(failed_spec: RunSpec, error: str) -> None:
            hooks.failed(failed_spec, error)
            errors.append(error)

        super()._execute_with_retries(spec, RunHooks(hooks.started, hooks.epoch, hooks.finished, failed,
                                                     hooks.progress))
        if errors:
            raise PrivtuneError(f"run {spec.label} failed in a data-parallel study: {errors[0]}",
                                "fix it and run the same command again; finished runs are skipped")


def data_parallel_executor(cfg: StudyConfig, group: Group) -> DataParallelExecutor:
    from privtune.study.runner import StudyContext

    return DataParallelExecutor(lambda: StudyContext.build(cfg), retries=0,
                                log_dir=Path(cfg.output_dir) / "logs", group=group)


def follow_study(cfg: StudyConfig, group: Group) -> None:
    """Ranks other than 0: train each run rank 0 announces, until it announces the end."""
    from privtune.study.runner import StudyContext, train_share

    context = None
    while (spec := group.broadcast_object()) is not None:
        if context is None:  # built at the first run, as rank 0 builds its own
            context = StudyContext.build(cfg)
        train_share(context, spec)
