"""Study-level attacks: LiRA and RMIA from the shadow models, added to every target run,
and the multi-run privacy audit of the shadows' training method.

They need every shadow model's per-record statistics, so they run after all runs of a
study have finished, in the driver, from what the database holds; rerunning a study
recomputes them in seconds without training anything.

**Multi-run audit.** K shadows each train on a random half of the population, so every
population record is a canary trained on by some shadows and not by others: K × N
(record, shadow) observations with known membership. Each is scored by LiRA's record
statistic under the shadow minus under the base model (higher = trained on), and
:func:`privtune.auditing.multi_run.clopper_pearson_epsilon` turns them into an ε lower
bound for the method the shadows replicate, stored on that method's runs as
``empirical_epsilon_multi_run``. The unit is a record; records of one person, and all
records of one shadow, are not independent trials, so the bound is an approximation
(said in the result's ``caveat``).
"""

from __future__ import annotations

import numpy as np

from privtune.attacks.metrics import roc_metrics
from privtune.attacks.shadow import lira, online_possible, rmia
from privtune.auditing.multi_run import clopper_pearson_epsilon
from privtune.auditing.study_audit import DEFAULT_DELTA
from privtune.config import StudyConfig

SHADOW_ATTACKS = ("lira_online", "lira_offline", "rmia")


def mean_log_prob(stats: dict) -> np.ndarray:
    """Per record, the mean token log-probability (log of the geometric-mean token
    probability): RMIA's Pr(x|θ) of a text, as in the authors' code (see :func:`rmia`)."""
    return np.array(stats["loglik"], dtype=float) / np.maximum(np.array(stats["tokens"], dtype=float), 1)


def _scores(stats: dict, shadows: list[dict], level: str, rmia_online: bool) -> dict[str, np.ndarray]:
    """Each shadow attack's score per population record, for the model ``stats`` describes."""
    shadow_in = np.array([s["shadow_in"] for s in shadows], dtype=bool)
    target_stat = np.array(stats[level]["stat"], dtype=float)
    target_lp = mean_log_prob(stats[level])
    shadow_stat = np.array([s["record_stats"][level]["stat"] for s in shadows], dtype=float)
    shadow_lp = np.array([mean_log_prob(s["record_stats"][level]) for s in shadows])
    return {
        "lira_online": lira(target_stat, shadow_stat, shadow_in, online=True),
        "lira_offline": lira(target_stat, shadow_stat, shadow_in, online=False),
        # RMIA's population z: the same records, whose shadow membership is known.
        "rmia": rmia(target_lp, shadow_lp, shadow_in, target_lp, shadow_lp, population_in=shadow_in,
                     online=rmia_online),
    }


def shadow_attack_entries(cfg: StudyConfig, run: dict, shadows: list[dict], base: dict | None = None) -> list[dict]:
    """LiRA (online, offline) and RMIA entries of the ``"mia"`` schema for one run.

    RMIA uses one rule for every record: online when every record has an IN and an OUT
    shadow, else offline (recorded as ``rule``), so no record's score depends on whether
    it happens to lack an IN shadow. ``base``: the study's base run, whose scores under
    the same attacks are the blind baseline of the advantage (left out for the base run
    itself and for runs stored without the record split)."""
    stats = run["record_stats"]
    select = stats.get("selection_half")
    paired = base is not None and base is not run and select is not None and "record_stats" in base
    shadow_in = np.array([s["shadow_in"] for s in shadows], dtype=bool)
    entries = []
    for level in cfg.attacks.mia.levels:
        shadow_lp = np.array([mean_log_prob(s["record_stats"][level]) for s in shadows])
        rmia_online = online_possible(shadow_lp, shadow_in)
        is_member = np.arange(len(stats[level]["stat"])) < stats["n_members"]
        base_scores = _scores(base["record_stats"], shadows, level, rmia_online) if paired else {}
        for name, score in _scores(stats, shadows, level, rmia_online).items():
            keep = np.isfinite(score)
            base_score = base_scores.get(name)
            if base_score is not None:
                keep &= np.isfinite(base_score)
            metrics = roc_metrics(score[keep], is_member[keep], fprs=tuple(cfg.attacks.mia.fprs),
                                  base_scores=base_score[keep] if base_score is not None else None,
                                  select=np.asarray(select, dtype=bool)[keep] if paired else None)
            entry = {"attack": name, "level": level, "higher_is_member": True, **metrics,
                     "shadow_models": len(shadows)}
            if name == "rmia":
                entry["rule"] = "online" if rmia_online else "offline"
                # records left out: no token at this level, or (offline) no shadow left them out
                entry["unscored"] = int((~keep).sum())
            entries.append(entry)
    return entries


def add_shadow_attacks(cfg: StudyConfig, store, data_digest: str) -> int:
    """Recompute the shadow attacks of every finished run of the study measured on the data
    of ``data_digest`` (the shadows' record statistics are of those records); returns how many runs."""

    def current(run: dict) -> bool:
        return run["status"] == "done" and (run.get("digests") or {}).get("data") == data_digest

    shadows = [r for r in store.runs(cfg.name, roles=("shadow",)) if current(r)]
    if len(shadows) < 2:
        return 0
    runs = [r for r in store.runs(cfg.name) if current(r) and "record_stats" in r]
    base = next((r for r in runs if r.get("role") == "base"), None)
    shadowed = shadows[0]["config"]["method"]  # the method entry the shadows train like
    updated = 0
    for run in runs:
        attacks = run.setdefault("attacks", {})
        kept = [e for e in attacks.get("mia", []) if e["attack"] not in SHADOW_ATTACKS]
        attacks["mia"] = kept + shadow_attack_entries(cfg, run, shadows, base)
        if run.get("role") == "target" and run["config"].get("method") == shadowed and base is not None:
            run["empirical_epsilon_multi_run"] = shadow_audit(shadows, base, run.get("dp"), seed=cfg.data.seed)
        store.update_result(run["run_id"], _stored_result(run))
        updated += 1
    return updated


def shadow_audit(shadows: list[dict], base: dict, dp: dict | None, *, seed: int, level: str = "record") -> dict:
    """The multi-run ε lower bound of the shadows' method (see the module docstring)."""
    shadow_in = np.array([s["shadow_in"] for s in shadows], dtype=bool)  # (K, N)
    stats = np.array([s["record_stats"][level]["stat"] for s in shadows], dtype=float)
    scores = stats - np.array(base["record_stats"][level]["stat"], dtype=float)[None, :]
    keep = np.isfinite(scores)
    delta = float(dp["delta"]) if dp and dp.get("delta") is not None else DEFAULT_DELTA
    bound = clopper_pearson_epsilon(scores[keep & shadow_in], scores[keep & ~shadow_in], delta=delta, seed=seed)
    return {**bound.to_dict(), "shadow_models": len(shadows), "level": level, "unit": "record",
            "score": "LiRA's record statistic under the shadow minus under the base model",
            "claimed_epsilon": dp.get("epsilon") if dp else None,
            "caveat": "approximate: a person's records, and the records of one shadow, are not independent trials"}


def _stored_result(run: dict) -> dict:
    """The result part of a run dict as read back from the store (identity fields dropped)."""
    identity = {"run_id", "study", "label", "method", "role", "status", "error", "config", "model", "seed", "epochs"}
    return {k: v for k, v in run.items() if k not in identity}
