"""Study-level attacks: LiRA and RMIA from the shadow models, added to every target run.

They need every shadow model's per-record statistics, so they run after all runs of a
study have finished, in the driver, from what the database holds; rerunning a study
recomputes them in seconds without training anything.
"""

from __future__ import annotations

import numpy as np

from privtune.attacks.metrics import roc_metrics
from privtune.attacks.shadow import lira, rmia
from privtune.config import StudyConfig

SHADOW_ATTACKS = ("lira_online", "lira_offline", "rmia")


def shadow_attack_entries(cfg: StudyConfig, run: dict, shadows: list[dict]) -> list[dict]:
    """LiRA (online, offline) and RMIA entries of the ``"mia"`` schema for one run."""
    stats = run["record_stats"]
    n_members = stats["n_members"]
    shadow_in = np.array([s["shadow_in"] for s in shadows], dtype=bool)
    entries = []
    for level in cfg.attacks.mia.levels:
        target_stat = np.array(stats[level]["stat"], dtype=float)
        target_ll = np.array(stats[level]["loglik"], dtype=float)
        tokens = np.maximum(np.array(stats[level]["tokens"]), 1)
        shadow_stat = np.array([s["record_stats"][level]["stat"] for s in shadows], dtype=float)
        shadow_ll = np.array([s["record_stats"][level]["loglik"] for s in shadows], dtype=float)
        is_member = np.arange(len(target_stat)) < n_members
        scores = {
            "lira_online": lira(target_stat, shadow_stat, shadow_in, online=True),
            "lira_offline": lira(target_stat, shadow_stat, shadow_in, online=False),
            # RMIA's population z: the same records, whose shadow membership is known.
            "rmia": rmia(target_ll, shadow_ll, shadow_in, target_ll, shadow_ll, population_in=shadow_in,
                         target_lengths=tokens, population_lengths=tokens),
        }
        for name, score in scores.items():
            keep = np.isfinite(score)
            metrics = roc_metrics(score[keep], is_member[keep], fprs=tuple(cfg.attacks.mia.fprs),
                                  n_bootstrap=cfg.attacks.mia.n_bootstrap, seed=cfg.data.seed)
            entries.append({"attack": name, "level": level, "higher_is_member": True, **metrics,
                            "shadow_models": len(shadows)})
    return entries


def add_shadow_attacks(cfg: StudyConfig, store, data_digest: str) -> int:
    """Recompute the shadow attacks of every finished run of the study measured on the data
    of ``data_digest`` (the shadows' record statistics are of those records); returns how many runs."""

    def current(run: dict) -> bool:
        return run["status"] == "done" and (run.get("digests") or {}).get("data") == data_digest

    shadows = [r for r in store.runs(cfg.name, roles=("shadow",)) if current(r)]
    if len(shadows) < 2:
        return 0
    updated = 0
    for run in store.runs(cfg.name):
        if not current(run) or "record_stats" not in run:
            continue
        attacks = run.setdefault("attacks", {})
        kept = [e for e in attacks.get("mia", []) if e["attack"] not in SHADOW_ATTACKS]
        attacks["mia"] = kept + shadow_attack_entries(cfg, run, shadows)
        store.update_result(run["run_id"], _stored_result(run))
        updated += 1
    return updated


def _stored_result(run: dict) -> dict:
    """The result part of a run dict as read back from the store (identity fields dropped)."""
    identity = {"run_id", "study", "label", "method", "role", "status", "error", "config", "model", "seed", "epochs"}
    return {k: v for k, v in run.items() if k not in identity}
