"""The report's "Unlearning" section: what each unlearned model still knows of its
forget set, next to the model it started from and the model retrained without it.

The retrained model is the target: an unlearned model has forgotten well when its
forget-set figures are close to the retrained model's, not when they are as bad as
possible (a forget-set loss far above the retrained model's, or a membership AUC far
below the retrained model's, tells an attacker just as surely who was forgotten). Each
cell reads "unlearned" with "source → retrain" under it and, where the runs' per-record
statistics allow, the unlearned model's difference from the retrained one with a 95%
interval, paired over the same records: token means by the delta method clustered by
person (:func:`privtune.report.differences.rows_difference`), the loss attack's AUC by
MOVER with DeLong's correlation (:func:`privtune.attacks.metrics.paired_difference`).
Above the table, one line per unlearned model gives the gap that matters most,
forget-set CE_S minus the retrained model's, beside what it cost: retain CE_N and
utility against the retrained model's. The intervals cover the choice of records; the
retrained model's own training randomness shows only as the spread over the study's
seeds, when it has several.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from html import escape

import numpy as np

from privtune.attacks.metrics import paired_difference, too_few
from privtune.report.attack_plots import pct
from privtune.report.differences import Difference, rows_difference
from privtune.report.headline import Headline, strongest_of
from privtune.report.plots import is_done, number, styles

#: (header, key of the ``unlearning`` section, format, which way is better, what it is).
COLUMNS: tuple[tuple[str, str, str, int, str], ...] = (
    ("forget CE_S", "forget_ce_s", ".3f", 0,
     "loss on the forget set's sensitive tokens, nats: should match retrain (Δ: minus retrain's, 95% interval)"),
    ("forget leakage gain", "forget_leakage_gain", ".3f", 0,
     "CE_S(base; forget) − CE_S(model; forget), nats: should match retrain (Δ: minus retrain's, 95% interval)"),
    ("forget MIA AUC", "forget_mia_loss_auc", ".3f", 0,
     ("loss attack on whole records, forget records against non-members. The target is the retrained model's "
      "AUC, not 0.5: it never saw the forget set, but the records themselves differ from the non-members "
      "(a review measured 0.73 [0.49–0.91] and 0.59 for retrained models). Δ: the unlearned model's AUC minus "
      "the retrained model's on the same records, 95% interval (MOVER, DeLong's correlation). The strongest of "
      "all attacks, chosen two-sided against the base model, is in the CSV (unlearn_forget_mia_*). n/a below "
      "10 forget records")),
    ("forget extraction", "forget_extraction", "pct", 0,
     "share of forget-set values written out exactly (greedy); no interval"),
    ("retain CE_N", "retain_ce_n", ".3f", -1,
     "loss on the non-sensitive tokens of the members kept, nats (Δ: minus retrain's, 95% interval)"),
    ("utility CE", "utility_ce", ".3f", -1,
     "loss on non-sensitive held-out tokens, nats (Δ: minus retrain's, 95% interval)"),
)


MIA_KEY = "forget_mia_loss_auc"


def _show(value, spec: str) -> str:
    value = number(value)
    if math.isnan(value):
        return "–"
    return pct(value) if spec == "pct" else format(value, spec)


def _arrow(better: int) -> str:
    return {1: "\u00a0↑", -1: "\u00a0↓"}.get(better, "")


def _loss_entry(section: dict) -> dict:
    return next((e for e in section.get("mia") or [] if isinstance(e, dict) and e.get("attack") == "loss"
                 and e.get("level") == "record"), {})


def _shown(section: dict, key: str, spec: str) -> str:
    """A figure of one model's section; "n/a" where the attack ran but the forget set is
    too small for an AUC (its reason is in the column's tooltip and the JSON)."""
    if key == MIA_KEY and section.get(key) is None and _loss_entry(section).get("auc_reason"):
        return "n/a"
    return _show(section.get(key), spec)


# --- against the retrained model -----------------------------------------------------------

def _rows(section: dict, run: dict) -> tuple[list[int], list[int], list[int]] | None:
    """(forget rows, retain rows, non-member rows) of the population in ``run``'s
    ``record_stats``, or None for a run stored without them."""
    forget, stats = section.get("forget_rows"), run.get("record_stats")
    if not isinstance(forget, list) or not isinstance(stats, Mapping) or not isinstance(stats.get("n_members"), int):
        return None
    n_members, n_all = stats["n_members"], len(stats.get("person") or [])
    chosen = set(forget)
    return forget, [i for i in range(n_members) if i not in chosen], list(range(n_members, n_all))


def _loss_scores(run: dict, rows: list[int]) -> np.ndarray:
    """The loss attack's score of each record (−mean NLL over its tokens) from ``record_stats``."""
    record = run["record_stats"]["record"]
    loglik = np.asarray([math.nan if v is None else v for v in record["loglik"]], dtype=float)[rows]
    tokens = np.asarray(record["tokens"], dtype=float)[rows]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tokens > 0, loglik / tokens, np.nan)


def auc_difference(unlearned: dict, retrain: dict, forget: list[int], nonmembers: list[int]) -> Difference | None:
    """The loss attack's AUC (forget records against non-members) of ``unlearned`` minus
    ``retrain``'s on the same records, with its MOVER interval; None when the runs were
    not scored on the same records or there are too few for an AUC."""
    try:
        if unlearned["record_stats"]["record"]["tokens"] != retrain["record_stats"]["record"]["tokens"]:
            return None  # not the same records
        scores = [(_loss_scores(r, forget), _loss_scores(r, nonmembers)) for r in (unlearned, retrain)]
    except (KeyError, TypeError, IndexError):
        return None
    keep_m = ~(np.isnan(scores[0][0]) | np.isnan(scores[1][0]))
    keep_n = ~(np.isnan(scores[0][1]) | np.isnan(scores[1][1]))
    (um, un), (rm, rn) = [(m[keep_m], n[keep_n]) for m, n in scores]
    if too_few(um.size, un.size):
        return None
    diff = paired_difference((um, un), (rm, rn))
    people = np.asarray(unlearned["record_stats"]["person"])[np.r_[forget, nonmembers].astype(int)]
    low, high = diff["interval"]
    return Difference(diff["difference"], low, high, int(um.size + un.size), int(np.unique(people).size))


def retrain_differences(unlearned: dict, retrain: dict) -> dict[str, Difference | None]:
    """Each figure of the unlearning table, the unlearned model's minus the retrained
    model's, paired over the same records, with a 95% interval (None where not measurable)."""
    rows = _rows(unlearned.get("unlearning") or {}, unlearned)
    if rows is None or not retrain.get("record_stats"):
        return {}
    forget, retain, nonmembers = rows
    ce_s = rows_difference(unlearned, retrain, "sensitive", forget)
    gain = None if ce_s is None else Difference(-ce_s.value, -ce_s.high, -ce_s.low, ce_s.records, ce_s.people)
    return {"forget_ce_s": ce_s, "forget_leakage_gain": gain,  # same base model: the gain moves against CE_S
            MIA_KEY: auc_difference(unlearned, retrain, forget, nonmembers),
            "retain_ce_n": rows_difference(unlearned, retrain, "non-sensitive", retain),
            "utility_ce": rows_difference(unlearned, retrain, "non-sensitive", nonmembers)}


def _delta(diff: Difference | None) -> str:
    return "" if diff is None else f"Δ {diff.value:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]"


def _cell(unlearned: dict, source: dict, retrain: dict, key: str, spec: str, diff: Difference | None) -> str:
    delta = _delta(diff)
    return (f"{escape(_shown(unlearned, key, spec))}<br><small>{escape(_shown(source, key, spec))} → "
            f"{escape(_shown(retrain, key, spec))}</small>" + (f"<br><small>{escape(delta)}</small>" if delta else ""))


def _gap(unlearned: dict, retrain: dict, diff: Difference | None) -> str:
    if diff is not None:
        return f"{diff.value:+.3f}<br><small>[{diff.low:+.3f}, {diff.high:+.3f}]</small>"
    gap = number(unlearned.get("forget_ce_s")) - number(retrain.get("forget_ce_s"))
    return "–" if math.isnan(gap) else f"{gap:+.3f}<br><small>no interval</small>"


def _identity(run: dict) -> str:
    """A retrained reference's config without its seed: the same reference over seeds."""
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    return json.dumps({k: v for k, v in config.items() if k != "seed"}, sort_keys=True, default=str)


def retrain_spread(retrain: dict, runs: Sequence[dict]) -> list[float]:
    """The forget CE_S of every finished retrained reference that differs from ``retrain``
    only in its seed (itself included)."""
    same = [r for r in runs if is_done(r) and r.get("role") == "retrain" and _identity(r) == _identity(retrain)]
    values = [number((r.get("unlearning") or {}).get("forget_ce_s")) for r in same]
    return [v for v in values if not math.isnan(v)]


def summary_line(run: dict, retrain_run: dict, diffs: dict, runs: Sequence[dict]) -> str:
    """An unlearned model's headline: its gap to the retrained model on the forget set,
    beside its retain CE_N and utility against the retrained model's."""
    section, retrain = run["unlearning"], retrain_run.get("unlearning") or {}
    label = str(run.get("label"))
    if not retrain:
        return f"{label}: no retrained reference finished, so there is nothing to compare it with."
    gap = diffs.get("forget_ce_s")
    if gap is None:
        head = (f"forget CE_S {_show(section.get('forget_ce_s'), '.3f')} against the retrained model's "
                f"{_show(retrain.get('forget_ce_s'), '.3f')} (no interval: a run was stored without per-record "
                f"statistics or the forget set has fewer than two people)")
    else:
        verdict = "no measurable gap" if not gap.measurable else (
            "still remembers (below the retrained model)" if gap.value < 0
            else "overshoots (above the retrained model)")
        head = (f"forget CE_S gap to retrain {gap.value:+.3f} nats [{gap.low:+.3f}, {gap.high:+.3f}], "
                f"{verdict}, on {gap.records} records of {gap.people} people")
    costs = []
    for key, name in (("retain_ce_n", "retain CE_N"), ("utility_ce", "utility CE")):
        d = diffs.get(key)
        costs.append(f"{name} {_show(section.get(key), '.3f')} (retrain {_show(retrain.get(key), '.3f')}"
                     + (f", Δ {d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}])" if d else ")"))
    spread = retrain_spread(retrain_run, runs)
    seeds = (f"; retrained forget CE_S over {len(spread)} seeds {min(spread):.3f}–{max(spread):.3f}"
             if len(spread) > 1 else "; one retrain seed, so the retrained model's own training randomness is "
             "not in the interval")
    return f"{label}: {head}; {'; '.join(costs)}{seeds}."


def unlearning_runs(runs: Sequence[dict]) -> list[dict]:
    """The finished runs with an unlearning section of their own (not retrained references)."""
    return [r for r in runs if is_done(r) and r.get("role") == "unlearn" and r.get("unlearning")]


GAP_TIP = ("forget CE_S of the unlearned model minus the retrained model's on the same forget records, with a 95% "
           "interval (delta method, clustered by person): 0 is the target; below 0 still remembers, above 0 "
           "overshoots (the forget set then stands out the other way)")


def unlearning_section(runs: Sequence[dict]) -> str:
    """The section's HTML (empty when no unlearning run finished)."""
    unlearned = unlearning_runs(runs)
    if not unlearned:
        return ""
    colors = {id(r): s.color for r, s in zip(runs, styles(runs))}
    by_id = {r.get("run_id"): r for r in runs if is_done(r)}
    # Attack columns only where the attack ran (a study may turn extraction off).
    columns = [c for c in COLUMNS if any(r["unlearning"].get(c[1]) is not None
                                         or (c[1] == MIA_KEY and r["unlearning"].get("mia")) for r in unlearned)]
    head = ("<tr><th>run</th><th>source</th><th>forgets</th>"
            f'<th title="{escape(GAP_TIP)}">gap to retrain</th>'
            + "".join(f'<th title="{escape(tip)}">{escape(h)}{_arrow(better)}</th>' for h, _, _, better, tip in columns)
            + "</tr>")
    rows, lines = [], []
    for run in unlearned:
        section = run["unlearning"]
        retrain_run = by_id.get(section.get("retrain_run")) or {}
        retrain = retrain_run.get("unlearning") or {}
        source = section.get("source") or {}
        diffs = retrain_differences(run, retrain_run) if retrain else {}
        lines.append(summary_line(run, retrain_run, diffs, runs))
        cells = [f'<td class="label"><span class="swatch" style="background:{colors[id(run)]}"></span>'
                 f'{escape(str(run.get("label")))}</td>',
                 f'<td>{escape(str(section.get("source_label")))}<br><small>'
                 f'{escape(str(retrain_run.get("label", "retrain not done")))}</small></td>',
                 f'<td>{section.get("individuals")} people<br><small>{section.get("forget_records")} records</small></td>',
                 f"<td>{_gap(section, retrain, diffs.get('forget_ce_s'))}</td>"]
        cells += [f"<td>{_cell(section, source, retrain, key, spec, diffs.get(key))}</td>"
                  for _, key, spec, _, _ in columns]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = ("Each unlearning run starts from its source run's trained model and tries to forget a set of members "
            "(every record about them). The retrained model is the source method trained from the base model "
            "without them: the gold standard. Each cell shows the unlearned model, under it source → retrain, and "
            "the unlearned model's difference from the retrained model (Δ) with its 95% interval, paired over the "
            "same records; an unlearned model has forgotten well when Δ on the forget set is near 0 while retain "
            "CE_N and utility stay near the retrained model's. The intervals cover the choice of records, not the "
            "retrained model's training randomness (run several seeds for that). Unlearned models also appear on "
            "the plots and in the run table, measured on all members like every run; DP sources lose their ε "
            "when unlearned.")
    summary = "".join(f"<li>{escape(line)}</li>" for line in lines)
    return (f'<section id="unlearning"><h2>Unlearning</h2><ul class="unlearning-summary">{summary}</ul>'
            f'<p class="note">{escape(note)}</p>'
            f'<div class="wide"><table class="side"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
            f'</div></section>')


def forget_strongest(section: dict) -> Headline | None:
    """The strongest attack on a model's forget set (None when no attack ran), chosen as
    the main headline chooses (:func:`privtune.report.headline.strongest_of`: on one half
    of the people, quoted on the other, confounded attacks never) but two-sided: an
    unlearned model that scores its forget records far *below* the base model's AUC on
    them gives them away as surely as one far above. The largest AUC would pick an attack
    that reads the records rather than the model (zlib at 0.64 where the base model, too,
    scores 0.64) over one the unlearning pushed to 0.2."""
    entries = [e for e in section.get("mia") or [] if isinstance(e, dict) and isinstance(e.get("attack"), str)]
    return strongest_of(entries, two_sided=True) if entries else None


def _strongest_cells(section: dict) -> dict:
    head = forget_strongest(section)
    if head is None:
        return dict.fromkeys(("mia_auc", "mia_attack", "mia_advantage", "mia_direction", "mia_na"))
    return {"mia_auc": head.figures.get("auc"), "mia_attack": f"{head.attack}/{head.level}" if head.attack else None,
            "mia_advantage": head.figures.get("advantage"),
            "mia_direction": ("higher" if head.direction > 0 else "lower") if head.attack else None,
            "mia_na": head.reason}


#: The CSV columns of the unlearning section (``unlearn_`` + key), for runs that have one.
#: ``forget_mia_*``: the strongest attack on the forget set (:func:`forget_strongest`), its
#: AUC and advantage over the base model on the report half, which way it reads
#: (``lower``: forget records score below the base model's AUC), and why it is n/a.
CSV_KEYS = ("source_label", "source_run", "retrain_run", "objective", "individuals", "forget_records",
            "retain_records", "forget_ce_s", "forget_ce_n", "forget_leakage_gain", "retain_ce_s", "retain_ce_n",
            "retain_leakage_gain", "forget_mia_auc", "forget_mia_attack", "forget_mia_advantage",
            "forget_mia_direction", "forget_mia_na", "forget_mia_loss_auc", "forget_extraction")

#: The source model's figures the CSV repeats beside them (``unlearn_source_`` + key).
SOURCE_CSV_KEYS = ("forget_ce_s", "forget_leakage_gain", "forget_mia_auc", "forget_mia_attack", "forget_extraction",
                   "retain_ce_n")


def _figures(section: dict) -> dict:
    return {**section, **{f"forget_{k}": v for k, v in _strongest_cells(section).items()}}


def csv_cells(run: dict) -> dict:
    """A run's unlearning numbers under their CSV names (the source model's as ``unlearn_source_*``)."""
    section = run.get("unlearning") or {}
    figures, source = _figures(section), _figures(section.get("source") or {})
    cells: dict[str, object] = {f"unlearn_{k}": figures.get(k) for k in CSV_KEYS}
    cells.update({f"unlearn_source_{k}": source.get(k) for k in SOURCE_CSV_KEYS})
    return cells


def csv_columns(runs: Sequence[dict]) -> list[str]:
    """The unlearning columns, when some run has the section."""
    if not any(r.get("unlearning") for r in runs):
        return []
    return [f"unlearn_{k}" for k in CSV_KEYS] + [f"unlearn_source_{k}" for k in SOURCE_CSV_KEYS]
