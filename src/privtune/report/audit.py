"""The report's "Empirical ε" section, and the CSV columns of the privacy audit.

Every run of a study with ``privacy_audit`` on has an empirical ε lower bound
(:mod:`privtune.auditing.study_audit`) beside the ε its accountant claims (none for a
non-DP run): one scale for all methods. The section is a small plot (per run, the two
bounds and the claimed ε) and a table, under a sentence on what a lower bound means;
a study that compares canary designs gets a table of every design on every run.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from html import escape

from privtune.report.plots import _figure, _figure_style, is_done, number, styles

LOWER_BOUND_NOTE = (
    "A lower bound: the model leaks at least this much for these canaries with {confidence:.0%} confidence; it "
    "is not an estimate of the true ε, and a one-run black-box bound sits far below the ε of a DP run (it checks "
    "an implementation only when the audit is strong, as `privtune audit-dp` is).")
HOW = ("Each run is audited with the same {canaries} canaries ({design} design), each trained on with probability "
       "1/2 (the same half for every run); a canary's score is its secret's loss under the base model minus its "
       "loss under the run's model. Steinke et al. (2023) bound ε from the best of a fixed set of top-k guesses; "
       "the GDP-curve bound (Mahloujifar et al., 2024) is tighter but holds only if the run is Gaussian-DP, which "
       "DP-SGD is only approximately. With {canaries} canaries, even perfect guesses cannot show more than a few "
       "units of ε.")
#: CSV columns, ``empirical_epsilon_<key>``.
CSV_KEYS = ("lower_bound", "gdp_lower_bound", "na", "claimed", "canaries", "delta", "confidence")


def audit_of(run: dict) -> dict:
    return run.get("empirical_epsilon") or {}


def audited(runs: Sequence[dict]) -> bool:
    """Whether some finished run of ``runs`` went through the audit (it had canaries)."""
    return any(is_done(r) and audit_of(r).get("canaries") for r in runs)


def csv_columns(runs: Sequence[dict]) -> list[str]:
    one_run = [f"empirical_epsilon_{k}" for k in CSV_KEYS] if any(audit_of(r) for r in runs) else []
    multi = ["empirical_epsilon_multi_run_lower_bound"] if any(r.get("empirical_epsilon_multi_run") for r in runs) else []
    return one_run + multi


def csv_cells(run: dict) -> dict:
    """The run's audit figures under :func:`csv_columns`; ``_na`` says why a bound is empty."""
    audit = audit_of(run)
    multi_run = run.get("empirical_epsilon_multi_run") or {}
    return {"empirical_epsilon_multi_run_lower_bound": multi_run.get("lower_bound"),
            "empirical_epsilon_lower_bound": audit.get("lower_bound"),
            "empirical_epsilon_gdp_lower_bound": audit.get("gdp_lower_bound"),
            "empirical_epsilon_na": audit.get("reason"), "empirical_epsilon_claimed": audit.get("claimed_epsilon"),
            "empirical_epsilon_canaries": audit.get("canaries"), "empirical_epsilon_delta": audit.get("delta"),
            "empirical_epsilon_confidence": audit.get("confidence")}


def _bound(value, reason: str | None) -> str:
    value = number(value)
    if math.isnan(value):
        return f'n/a <small>{escape(reason or "not measured")}</small>'
    return f"{value:.3g}"


def _claimed(audit: dict) -> str:
    claimed = number(audit.get("claimed_epsilon"))
    return "none <small>(not DP)</small>" if math.isnan(claimed) else f"{claimed:.3g}"


def _canaries(audit: dict) -> str:
    if not audit.get("canaries"):
        return "–"
    inside = len(audit.get("in_scores") or [])
    return f"{audit['canaries']} <small>({inside} trained on)</small>"


def _delta(audit: dict) -> str:
    if audit.get("delta") is None:
        return "–"
    return f'{audit["delta"]:.2g} <small>({escape(audit.get("delta_source") or "")})</small>'


@_figure_style
def audit_figure(runs: Sequence[dict]):
    """Per run: the claimed ε (a cross; none for non-DP runs) and the two lower bounds
    (Steinke filled, GDP curve hollow), each drawn as a bar from zero: "at least this"."""
    rows = [(r, s) for r, s in zip(runs, styles(runs)) if is_done(r) and audit_of(r).get("canaries")]
    fig, axes = _figure(6.4, 0.55 * len(rows) + 1.3)
    ax = axes[0][0]
    top = 1.0
    for y, (run, style) in enumerate(reversed(rows)):
        audit = audit_of(run)
        steinke, gdp, claimed = (number(audit.get(k)) for k in ("lower_bound", "gdp_lower_bound", "claimed_epsilon"))
        if not math.isnan(steinke):
            ax.barh(y, steinke, height=0.5, color=style.color, alpha=0.85, label="_")
        if not math.isnan(gdp):
            ax.plot([gdp], [y], marker="o", markerfacecolor="white", markeredgecolor=style.color, markersize=8)
        if not math.isnan(claimed):
            ax.plot([claimed], [y], marker="X", color="#222222", markersize=9)
        top = max([top] + [v for v in (steinke, gdp, claimed) if not math.isnan(v)])
    ax.set_yticks(range(len(rows)), [str(r.get("label")) for r, _ in reversed(rows)])
    ax.set_xlim(0, top * 1.12)
    ax.set_xlabel("ε: bar = empirical bound (Steinke), ○ GDP curve, ✕ claimed")
    return fig


def multi_run_lines(runs: Sequence[dict]) -> list[str]:
    """One sentence per run with a multi-run (shadow-model) audit."""
    lines = []
    for run in runs:
        audit = run.get("empirical_epsilon_multi_run") if is_done(run) else None
        if not audit:
            continue
        bound = _bound(audit.get("lower_bound"), audit.get("reason"))
        lines.append(f"<b>{escape(str(run.get('label')))}</b>: ε ≥ {bound} "
                     f"(Clopper–Pearson, {audit.get('confidence', 0.95):.0%}, δ {audit.get('delta', 0):.2g}; "
                     f"{audit.get('shadow_models')} shadow models trained like it, {audit.get('canaries')} "
                     f"(record, shadow) observations; claimed: {_claimed(audit)}). "
                     f"{escape(audit.get('caveat') or '')}.")
    return lines


def _multi_run_block(runs: Sequence[dict]) -> str:
    lines = multi_run_lines(runs)
    if not lines:
        return ""
    return ("<h3>Multi-run audit from the shadow models</h3><p class=\"note\">Every population record is trained "
            "on by some shadow models and not by others; each (record, shadow) pair is scored by the shadow's "
            "record statistic minus the base model's, a threshold is chosen on half of the pairs and the bound "
            "computed on the other half.</p><ul>" + "".join(f"<li>{line}</li>" for line in lines) + "</ul>")


def _tpr(entry: dict) -> str:
    tpr = (entry.get("tpr_at_fpr") or {}).get("0.01") or {}
    if tpr.get("tpr") is None:
        return f'n/a <small>{escape(tpr.get("reason") or "not measured")}</small>'
    low, high = tpr["ci"]
    return f"{tpr['tpr']:.3f} <small>[{low:.3f}, {high:.3f}]</small>"


def _auc(entry: dict) -> str:
    if entry.get("auc") is None:
        return "–"
    low, high = entry["auc_ci"]
    return f"{entry['auc']:.3f} <small>[{low:.3f}, {high:.3f}]</small>"


def _designs_block(shown: Sequence[dict]) -> str:
    """With ``compare_designs``: every design's figures on every run, from the same models."""
    rows, notes = [], {}
    for run in shown:
        audit = audit_of(run)
        if not audit.get("compared_designs"):
            continue
        for design, entry in [(audit.get("design"), audit), *audit["compared_designs"].items()]:
            if entry.get("design_note"):
                notes[design] = entry["design_note"]
            rows.append(f'<tr><td class="label">{escape(str(run.get("label")))}</td><td>{escape(str(design))}</td>'
                        f'<td>{_auc(entry)}</td><td>{_tpr(entry)}</td>'
                        f'<td>{_bound(entry.get("lower_bound"), entry.get("reason"))}</td>'
                        f'<td>{_bound(entry.get("gdp_lower_bound"), entry.get("reason"))}</td></tr>')
    if not rows:
        return ""
    head = ("<tr><th>run</th><th>design</th><th title=\"canary AUC, IN against OUT, with its 95% interval\">AUC</th>"
            "<th title=\"needs at least 100 OUT canaries\">TPR at 1% FPR</th><th>empirical ε ≥ (Steinke)</th>"
            "<th>GDP-curve bound</th></tr>")
    note_lines = "".join(f"<li><b>{escape(d)}</b>: {escape(n)}</li>" for d, n in notes.items())
    return ("<h3>Canary designs compared</h3><p class=\"note\">Each design planted its own canaries, with coins "
            "of their own, in the same training runs: the strongest design is the one whose canaries separate "
            "best.</p>" + (f"<ul>{note_lines}</ul>" if note_lines else "")
            + f'<table class="side"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>')


def audit_section(runs: Sequence[dict]) -> str:
    """The empirical-ε section (empty when no finished run was audited, one run or several)."""
    multi = _multi_run_block(runs)
    if not audited(runs):
        return (f'<section id="empirical-epsilon"><h2>Empirical ε</h2>{multi}</section>' if multi else "")
    from privtune.report.html import render_png  # html imports this module

    shown = [r for r in runs if is_done(r) and audit_of(r)]
    first = next(audit_of(r) for r in shown if audit_of(r).get("canaries"))
    confidence = first.get("confidence") or 0.95
    head = ("<tr><th>run</th><th title=\"the accountant's ε; none for a run without DP\">claimed ε</th>"
            f"<th title=\"Steinke, Nasr and Jagielski (2023), one run\">empirical ε ≥ <small>(Steinke, "
            f"{confidence:.0%})</small></th>"
            "<th title=\"Mahloujifar et al. (2024), valid if the run is Gaussian-DP\">GDP-curve bound</th>"
            "<th>canaries</th><th>δ</th></tr>")
    colors = {id(r): s.color for r, s in zip(runs, styles(runs))}
    rows = []
    for run in shown:
        audit = audit_of(run)
        swatch = f'<span class="swatch" style="background:{colors[id(run)]}"></span>'
        rows.append(f'<tr><td class="label">{swatch}{escape(str(run.get("label")))}</td><td>{_claimed(audit)}</td>'
                    f'<td>{_bound(audit.get("lower_bound"), audit.get("reason"))}</td>'
                    f'<td>{_bound(audit.get("gdp_lower_bound"), audit.get("reason"))}</td>'
                    f'<td>{_canaries(audit)}</td><td>{_delta(audit)}</td></tr>')
    png = base64.b64encode(render_png(audit_figure(runs))).decode("ascii")
    note = LOWER_BOUND_NOTE.format(confidence=confidence)
    how = HOW.format(canaries=first.get("canaries"), design=first.get("design", "?"))
    return (f'<section id="empirical-epsilon"><h2>Empirical ε: what the audit canaries show</h2>'
            f'<p class="note"><b>{escape(note)}</b> {escape(how)}</p>'
            f'<div class="row"><img alt="claimed and empirical ε per run" src="data:image/png;base64,{png}">'
            f'<div class="wide"><table class="side"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
            f'</div></div>{_designs_block(shown)}{multi}</section>')
