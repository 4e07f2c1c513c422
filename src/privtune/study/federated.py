"""A federated run of a study: deal the training set to clients, train by FedAvg, measure.

The result is one model, measured exactly like any run (every measure after every round,
the round standing for an epoch; exposure and attacks on the final model), plus a
``federated`` section: the split, per-client records and individuals, per-client
leakage (CE_S on each client's own member records, from the same token scores as the
study-wide measures, so no extra forward pass), bytes communicated each way, and the
privacy of the run. ``dp`` carries the headline epsilon: client-level under
``client_dp`` (the privacy unit is a client), else for ``dp-`` methods the largest
epsilon over the clients of their local DP-SGD, whose unit (a person or a record of the
client's, ``dp.unit``) ``dp["unit"]`` names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from privtune.data.clients import client_summary, split_clients
from privtune.measures.efficiency import PeakMemory
from privtune.measures.leakage import mean_loss
from privtune.measures.token_scores import TokenScores
from privtune.study.plan import RunSpec, method_spec, train_plan
from privtune.study.stages import stage
from privtune.train.federated import FederatedResult, federated_train
from privtune.train.loop import TrainResult
from privtune.train.methods import get_method



def client_leakage(model_members: TokenScores, base_members: TokenScores, model_nonmembers: TokenScores,
                   member_rows: list[list[int]]) -> list[dict]:
    """Per client, on its own member records: CE_S of the model and of the base, the
    leakage gain, and the memorisation gap against the study's held-out records."""
    ce_s_test = mean_loss(model_nonmembers, True)
    out = []
    for rows in member_rows:
        model, base = model_members.rows(rows), base_members.rows(rows)
        ce_s, base_s = mean_loss(model, True), mean_loss(base, True)
        out.append({"ce_s_train": ce_s, "base_ce_s_train": base_s, "leakage_gain": base_s - ce_s,
                    "memorisation_gap": ce_s_test - ce_s, "ce_n_train": mean_loss(model, False)})
    return out


def client_memory(server: PeakMemory, client_peaks: list[float]) -> dict:
    """Peak memory of a federated run: the clients train in Ray worker processes, so the
    driver's probe sees only the server (aggregation, the per-round evaluation). The
    headline is the most any one client's local training added (what a client device
    needs, as a centralised run's figure is what its training needs); the server's is
    kept beside it, and each client's is in ``per_client``. Each worker starts from its
    own size, so no one "memory at start" goes with the headline."""
    took_part = [p for p in client_peaks if not math.isnan(p)]
    return {"peak_memory_bytes": max(took_part) if took_part else math.nan, "memory_at_start_bytes": math.nan,
            "server_peak_memory_bytes": server.peak_bytes}


def _privacy(progress: FederatedResult) -> dict | None:
    if progress.client_privacy is not None:
        return {**progress.client_privacy.as_dict(), "unit": "client"}
    if progress.record_privacy:
        worst = max(progress.record_privacy, key=lambda r: r["epsilon"])
        return {**worst, "unit": f"{worst['unit']}, largest over clients"}
    return None


def execute_federated(ctx, spec: RunSpec, on_epoch: Callable[[int, dict], None]) -> dict:
    """Train and measure one federated run (``ctx``: the study's :class:`StudyContext`)."""
    from privtune.study.runner import (
        Evaluation, efficiency_record, measured_result, prepared_model, scrub_report,
        training_set)

    cfg, runtime = ctx.cfg, ctx.runtime
    entry = method_spec(cfg, spec)
    fed = entry.federated
    with stage("preparation"):
        scrubbed, train_set = training_set(ctx, spec)
        rows = split_clients(ctx.data.train.records, fed.clients, fed.split, fed.alpha, cfg.data.seed)
        clients = [train_set.subset(r) for r in rows]
        model = prepared_model(ctx, spec)
    n_members = len(ctx.data.members)
    member_rows = [[i for i in r if i < n_members] for r in rows]
    private = get_method(spec.method).private or fed.client_dp is not None
    baseline = ctx.base.measures | {"epsilon": 0.0 if private else None}
    on_epoch(0, baseline)
    epochs: list[dict] = [{"epoch": 0, **baseline}]
    latest: list[Evaluation] = []

    def after_round(server_round: int, progress: FederatedResult) -> None:
        evaluation = ctx.evaluate(model)
        measures = dict(evaluation.measures)
        privacy = _privacy(progress)
        if privacy is not None:
            measures["epsilon"] = privacy["epsilon"]
        epochs.append({"epoch": server_round, **measures})
        latest[:] = [evaluation]
        training.advance()

    local = replace(train_plan(cfg, spec), epochs=fed.local_epochs)
    # Counted in rounds; after_round runs in Flower's server thread, which the stage timer allows.
    with PeakMemory(runtime.device) as memory, stage("training", total=fed.rounds) as training:
        progress = federated_train(model, clients, local, fed, runtime, on_round_end=after_round)
    for row in epochs[1:]:  # here, not in after_round: Flower's server runs that in its own thread
        on_epoch(row["epoch"], {k: v for k, v in row.items() if k != "epoch"})
    evaluation = latest[0]
    summary = client_summary(ctx.data.train.records, rows)
    leakage = client_leakage(evaluation.members, ctx.base.members, evaluation.nonmembers, member_rows)
    for row, leak, rounds in zip(summary, leakage, progress.participation):
        row.update(leak, rounds=rounds)
    for row, peak in zip(summary, progress.client_peak_memory):
        row["peak_memory_bytes"] = peak
    for row, privacy in zip(summary, progress.record_privacy or []):
        row.update(epsilon=privacy["epsilon"], unit=privacy.get("unit"))
    as_loop = TrainResult(seconds=progress.seconds, epoch_seconds=[r.get("seconds", math.nan) for r in progress.rounds],
                          steps=progress.steps, tokens=progress.tokens, records=progress.records,
                          positions=progress.positions)
    efficiency = efficiency_record(as_loop, memory, model, runtime, data_parallel=False,
                                   dp_engine=local.dp.engine if local.dp is not None else None)
    efficiency.update(**client_memory(memory, progress.client_peak_memory),
                      bytes_communicated=progress.bytes_down + progress.bytes_up,
                      client_train_seconds=progress.client_seconds)
    return measured_result(
        ctx, spec, model, epochs, evaluation, dp=_privacy(progress), efficiency=efficiency,
        train_tokens=train_set.n_tokens, scrub=scrub_report(ctx, scrubbed, evaluation),
        federated={
            "clients": fed.clients, "rounds": fed.rounds, "local_epochs": fed.local_epochs, "split": fed.split,
            "alpha": fed.alpha if fed.split == "non-iid" else None, "fraction_fit": fed.fraction_fit,
            "bytes_down": progress.bytes_down, "bytes_up": progress.bytes_up,
            "per_round": progress.rounds, "per_client": summary,
            "client_dp": progress.client_privacy.as_dict() if progress.client_privacy else None,
            "record_dp": progress.record_privacy,
            "leakage_gain_spread": float(np.nanmax([c["leakage_gain"] for c in leakage])
                                         - np.nanmin([c["leakage_gain"] for c in leakage])),
        })
