"""The report's "Unlearning" section: what each unlearned model still knows of its
forget set, next to the model it started from and the model retrained without it.

The retrained model is the target: an unlearned model has forgotten well when its
forget-set figures are close to the retrained model's, not when they are as bad as
possible (a forget-set loss far above the retrained model's, or a membership AUC far
below 0.5, tells an attacker just as surely who was forgotten). Each cell reads
"unlearned" with "source → retrain" under it; the last column is the gap that matters
most, forget-set CE_S minus the retrained model's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from privtune.report.attack_plots import pct
from privtune.report.headline import Headline, strongest_of
from privtune.report.plots import is_done, number, styles

#: (header, key of the ``unlearning`` section, format, which way is better, what it is).
COLUMNS: tuple[tuple[str, str, str, int, str], ...] = (
    ("forget CE_S", "forget_ce_s", ".3f", 0, "loss on the forget set's sensitive tokens, nats: should match retrain"),
    ("forget leakage gain", "forget_leakage_gain", ".3f", 0,
     "CE_S(base; forget) − CE_S(model; forget), nats: should match retrain"),
    ("forget MIA AUC", "forget_mia_loss_auc", ".3f", 0,
     ("loss attack on whole records, forget records against non-members: retrain's is near 0.5, and so should "
      "the unlearned model's be (the strongest of all attacks is in the CSV, but on a forget set of a few records "
      "the largest of many AUCs is mostly noise); n/a below 10 forget records")),
    ("forget extraction", "forget_extraction", "pct", 0, "share of forget-set values written out exactly (greedy)"),
    ("retain CE_N", "retain_ce_n", ".3f", -1, "loss on the non-sensitive tokens of the members kept, nats"),
    ("utility CE", "utility_ce", ".3f", -1, "loss on non-sensitive held-out tokens, nats"),
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


def _cell(unlearned: dict, source: dict, retrain: dict, key: str, spec: str) -> str:
    return (f"{escape(_shown(unlearned, key, spec))}<br><small>{escape(_shown(source, key, spec))} → "
            f"{escape(_shown(retrain, key, spec))}</small>")


def _gap(unlearned: dict, retrain: dict) -> str:
    gap = number(unlearned.get("forget_ce_s")) - number(retrain.get("forget_ce_s"))
    return "–" if math.isnan(gap) else f"{gap:+.3f}"


def unlearning_runs(runs: Sequence[dict]) -> list[dict]:
    """The finished runs with an unlearning section of their own (not retrained references)."""
    return [r for r in runs if is_done(r) and r.get("role") == "unlearn" and r.get("unlearning")]


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
            + "".join(f'<th title="{escape(tip)}">{escape(h)}{_arrow(better)}</th>' for h, _, _, better, tip in columns)
            + '<th title="forget CE_S of the unlearned model minus the retrained model\'s: 0 is the target; '
              'below 0 still remembers, above 0 overshoots">gap to retrain</th></tr>')
    rows = []
    for run in unlearned:
        section = run["unlearning"]
        retrain_run = by_id.get(section.get("retrain_run")) or {}
        retrain = retrain_run.get("unlearning") or {}
        source = section.get("source") or {}
        cells = [f'<td class="label"><span class="swatch" style="background:{colors[id(run)]}"></span>'
                 f'{escape(str(run.get("label")))}</td>',
                 f'<td>{escape(str(section.get("source_label")))}<br><small>'
                 f'{escape(str(retrain_run.get("label", "retrain not done")))}</small></td>',
                 f'<td>{section.get("individuals")} people<br><small>{section.get("forget_records")} records</small></td>']
        cells += [f"<td>{_cell(section, source, retrain, key, spec)}</td>" for _, key, spec, _, _ in columns]
        cells.append(f"<td>{escape(_gap(section, retrain))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    note = ("Each unlearning run starts from its source run's trained model and tries to forget a set of members "
            "(every record about them). The retrained model is the source method trained from the base model "
            "without them: the gold standard. Each cell shows the unlearned model, and under it source → retrain; "
            "an unlearned model has forgotten well when it is close to the retrained model on the forget set "
            "while keeping the source's retain CE_N and utility. Unlearned models also appear on the plots and in "
            "the run table, measured on all members like every run; DP sources lose their ε when unlearned.")
    return (f'<section id="unlearning"><h2>Unlearning</h2><p class="note">{escape(note)}</p>'
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
