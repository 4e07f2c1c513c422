"""The report's attack figures, and the readers of each run's ``"attacks"`` section.

Figures: ROC curves of every membership-inference attack (one figure per level,
record and sensitive tokens, one panel per attack), extraction rates per PII type,
PII inference top-1 against chance, and backdoor success with and without trigger.

ROC curves are drawn log-log from FPR 0.1 % to 100 %, as in Carlini et al., "Membership
Inference Attacks From First Principles" (2022): an attack that is right about a few
records at a very low false-positive rate is the one that matters, and a linear axis
hides it in the corner. The chance line is the diagonal TPR = FPR. Points below the
axis floor (FPR or TPR of 0, or under 0.1 %) are drawn on the floor, so a curve that
starts high at FPR 0 shows as such at the left edge.

The readers never trust a section's shape: runs written before the attack suite, the
base model, failed runs and sections with nulls (the store writes NaN as null) read as
"nothing measured" rather than raising, so an old study still renders. Colours and
run markers come from :mod:`privtune.report.plots`, one colour per method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from privtune.data.corpora import LABELS
from privtune.report.plots import (
    MARKERS, Style, _empty, _figure, _figure_style, _styled, is_base, is_done, number,
)

LEVELS = ("record", "sensitive")
LEVEL_TITLES = {"record": "whole records", "sensitive": "sensitive tokens only"}
#: Display names, in the order panels and table columns follow; attacks not listed
#: here (added later) come after them under their own name.
ATTACK_NAMES = {
    "loss": "LOSS", "zlib": "zlib ratio", "min_k": "Min-K%", "min_k_pp": "Min-K%++",
    "reference": "reference (θ0)", "lira_online": "LiRA online", "lira_offline": "LiRA offline",
    "rmia": "RMIA",
}
#: The FPRs the report quotes TPR at, as the schema's string keys.
REPORTED_FPRS = ("0.01", "0.001")
ROC_FLOOR = 1e-3
#: Wide figures leave about 440 px of a 1400 px page for the numbers beside them.
FIGURE_WIDTH = 10.5
EXTRACTION_MODES = ("greedy", "sampling")
ALL = "ALL"
#: One line style per run within its method, matching the run's marker in other figures.
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 1)), (0, (8, 2)))
#: ... and one bar hatch, for the same reason.
HATCHES = ("", "////", "....", "xxxx", "\\\\\\\\", "++++", "oo")


def attack_name(attack: str) -> str:
    return ATTACK_NAMES.get(attack, attack)


def pct(value: float, spec: str = ".1f") -> str:
    """A rate in [0, 1] as a percentage, "–" when there is none."""
    value = number(value)
    return "–" if math.isnan(value) else format(100 * value, spec) + "%"


# --- reading the "attacks" section ---------------------------------------------------

def attacks_of(run: dict) -> dict:
    """A run's attack results, ``{}`` for runs that have none (or a malformed one)."""
    section = run.get("attacks")
    return section if isinstance(section, dict) else {}


def mia_entries(run: dict) -> list[dict]:
    """The well-formed MIA entries of a run (dicts naming their attack and level)."""
    entries = attacks_of(run).get("mia")
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("attack"), str)
            and e.get("level") in LEVELS]


def mia_entry(run: dict, attack: str, level: str) -> dict | None:
    return next((e for e in mia_entries(run) if e["attack"] == attack and e["level"] == level), None)


def auc(entry: dict | None) -> float:
    return number((entry or {}).get("auc"))


def interval(value) -> tuple[float, float]:
    """A ``[low, high]`` pair as floats, NaNs when missing or malformed."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return number(value[0]), number(value[1])
    return math.nan, math.nan


def auc_ci(entry: dict | None) -> tuple[float, float]:
    return interval((entry or {}).get("auc_ci"))


#: Why an entry stored before TPRs were checked for enough non-members shows none.
LEGACY_TPR = "stored by an older privtune, which reported TPR below 1/FPR non-members: rerun the study"


def _legacy(entry: dict | None) -> bool:
    """An entry from before the n/a rules (it has no record of its group sizes)."""
    return entry is not None and "n_nonmembers" not in entry


def tpr_at(entry: dict | None, fpr: str) -> float:
    if _legacy(entry):
        return math.nan
    return number(((entry or {}).get("tpr_at_fpr") or {}).get(fpr))


def tpr_ci(entry: dict | None, fpr: str) -> tuple[float, float]:
    if _legacy(entry):
        return math.nan, math.nan
    return interval(((entry or {}).get("tpr_at_fpr_ci") or {}).get(fpr))


def order_attacks(found: Sequence[str]) -> list[str]:
    known = [a for a in ATTACK_NAMES if a in found]
    return known + [a for a in dict.fromkeys(found) if a not in ATTACK_NAMES]


def mia_attacks(runs: Sequence[dict], level: str) -> list[str]:
    """The attacks with an AUC or a ROC curve at ``level`` in some finished run (an AUC is
    null on too few records, the curve is still drawn), in display order."""
    return order_attacks([e["attack"] for r in runs if is_done(r) for e in mia_entries(r)
                          if e["level"] == level and (not math.isnan(auc(e)) or roc_points(e)[0].size)])


def auc_reason(entry: dict | None) -> str:
    """Why an entry has no AUC: its stored reason, or "not measured"."""
    return str((entry or {}).get("auc_reason") or "not measured")


def tpr_reason(entry: dict | None, fpr: str) -> str:
    """Why an entry has no TPR at ``fpr``: its stored reason, or "not measured"."""
    if _legacy(entry):
        return LEGACY_TPR
    return str(((entry or {}).get("tpr_at_fpr_reason") or {}).get(fpr) or "not measured")


def roc_points(entry: dict | None) -> tuple[np.ndarray, np.ndarray]:
    """The (fpr, tpr) of an entry's ROC, finite pairs in [0, 1] sorted by FPR; empty
    arrays when the curve is missing or malformed."""
    roc = (entry or {}).get("roc")
    if not isinstance(roc, dict) or not isinstance(roc.get("fpr"), list) or not isinstance(roc.get("tpr"), list):
        return np.empty(0), np.empty(0)
    pairs = [(number(f), number(t)) for f, t in zip(roc["fpr"], roc["tpr"])]
    pairs = sorted((f, t) for f, t in pairs if 0 <= f <= 1 and 0 <= t <= 1)
    if not pairs:
        return np.empty(0), np.empty(0)
    fpr, tpr = map(np.asarray, zip(*pairs))
    return fpr, tpr


def _rates(section, keys: Sequence[str]) -> dict[str, dict]:
    """``{PII type: row}`` of a per-type section, keeping rows that are dicts."""
    if not isinstance(section, dict):
        return {}
    return {str(t): row for t, row in section.items() if isinstance(row, dict) and any(k in row for k in keys)}


def extraction_rates(run: dict, mode: str) -> dict[str, dict]:
    """Extraction results of a run per PII type (``mode``: greedy or sampling)."""
    section = attacks_of(run).get("extraction")
    return _rates(section.get(mode) if isinstance(section, dict) else None,
                  ("member_rate", "nonmember_rate", "advantage"))


def pii_inference(run: dict) -> dict[str, dict]:
    """PII inference results of a run per PII type."""
    return _rates(attacks_of(run).get("pii_inference"), ("top1", "member_top1"))


def backdoor(run: dict) -> dict | None:
    """The run's backdoor result, when the study poisoned its data and it was measured."""
    section = attacks_of(run).get("backdoor")
    if not isinstance(section, dict):
        return None
    if math.isnan(number(section.get("asr_triggered"))) and math.isnan(number(section.get("asr_clean"))):
        return None
    return section


def ordered_types(tables: Sequence[dict[str, dict]]) -> list[str]:
    """PII types found in any table: the corpora's label order first, then others as
    found, the ``ALL`` summary last."""
    found = list(dict.fromkeys(t for table in tables for t in table if t != ALL))
    types = [t for t in LABELS if t in found] + [t for t in found if t not in LABELS]
    return types + ([ALL] if any(ALL in table for table in tables) else [])


def has_mia(runs: Sequence[dict], level: str) -> bool:
    return bool(mia_attacks(runs, level))


def has_extraction(runs: Sequence[dict]) -> bool:
    return any(extraction_rates(r, m) for r in runs if is_done(r) for m in EXTRACTION_MODES)


def has_pii_inference(runs: Sequence[dict]) -> bool:
    return any(pii_inference(r) for r in runs if is_done(r))


def has_backdoor(runs: Sequence[dict]) -> bool:
    return any(backdoor(r) for r in runs if is_done(r))


# --- drawing helpers ---------------------------------------------------------------------

def _nth_of_method(style: Style) -> int:
    """Which run of its method this is (0 for the first), read back from its marker."""
    return MARKERS.index(style.marker) if style.marker in MARKERS else 0


def linestyle(style: Style):
    """The line style of a run: solid for a method's first run, then dashed, dotted ..."""
    return LINESTYLES[_nth_of_method(style) % len(LINESTYLES)]


def hatch(style: Style) -> str:
    """The bar hatch of a run: plain for a method's first run, then striped, dotted ..."""
    return HATCHES[_nth_of_method(style) % len(HATCHES)]


def _percent_axis(axis) -> None:
    """Log ticks at 0.1 %, 1 %, 10 %, 100 %."""
    axis.set_major_locator(FixedLocator([1e-3, 1e-2, 1e-1, 1.0]))
    axis.set_minor_locator(NullLocator())
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))


def _legend_below(fig: Figure, runs_styles: Sequence[tuple[dict, Style]], extra: Sequence = (),
                  bars: bool = False) -> None:
    """One legend for all panels, under them: a line (or a bar swatch) per run."""
    if bars:
        handles = [Patch(facecolor=s.color, edgecolor="white", hatch=hatch(s), alpha=0.55 if is_base(r) else 1.0,
                         label=str(r.get("label"))) for r, s in runs_styles]
    else:
        handles = [Line2D([], [], color=s.color, linestyle=linestyle(s), linewidth=2.2 if not is_base(r) else 1.4,
                          label=str(r.get("label"))) for r, s in runs_styles]
    fig.legend(handles=handles + list(extra), loc="outside lower center", ncols=min(8, len(handles) + len(extra)),
               frameon=False)


def _type_ticks(ax, types: Sequence[str]) -> None:
    ax.set_xticks(range(len(types)), types, rotation=0)
    for tick in ax.get_xticklabels():
        if tick.get_text() == ALL:
            tick.set_fontweight("bold")
    if ALL in types and len(types) > 1:  # a rule between the types and their summary
        ax.axvline(len(types) - 1.5, color="#bbbbbb", linewidth=1)


def _group_offsets(n: int, width: float = 0.8) -> tuple[list[float], float]:
    """x offsets of ``n`` bars sharing one group slot, and each bar's width."""
    bar = width / max(n, 1)
    return [(i - (n - 1) / 2) * bar for i in range(n)], bar


# --- the figures ---------------------------------------------------------------------------

def _roc_panel(ax, attack: str, level: str, styled: Sequence[tuple[dict, Style]]) -> None:
    grid = np.array([ROC_FLOOR, 1.0])
    ax.plot(grid, grid, color="#999999", linestyle="--", linewidth=1, zorder=1)
    for fpr in REPORTED_FPRS:
        ax.axvline(float(fpr), color="#cccccc", linestyle=":", linewidth=1, zorder=1)
    base = None
    for run, style in styled:
        entry = mia_entry(run, attack, level)
        fpr, tpr = roc_points(entry)
        if len(fpr) < 2:
            continue
        ax.plot(np.clip(fpr, ROC_FLOOR, 1), np.clip(tpr, ROC_FLOOR, 1), color=style.color,
                linestyle=linestyle(style), linewidth=1.9 if not is_base(run) else 1.2,
                alpha=0.95, zorder=3 if not is_base(run) else 2)
        if is_base(run):
            base = entry
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(ROC_FLOOR, 1)
    ax.set_ylim(ROC_FLOOR, 1.05)
    _percent_axis(ax.xaxis)
    _percent_axis(ax.yaxis)
    # The base model's AUC, not the best run's: a maximum over runs is biased upward, and
    # the base model's is the blind baseline every run's curve must be read against.
    title = attack_name(attack)
    if base is not None and not math.isnan(auc(base)):
        title += f"\nbase model AUC {auc(base):.2f}" + (" (confounded)" if base.get("confounded") else "")
    ax.set_title(title, fontsize=10.5)


def mia_roc(runs: Sequence[dict], level: str) -> Figure:
    """ROC of every MIA attack at ``level``, one panel per attack, one line per run."""
    attacks = mia_attacks(runs, level)
    ncols = min(4, max(len(attacks), 1))
    nrows = max(1, math.ceil(len(attacks) / ncols))
    fig, axes = _figure(FIGURE_WIDTH, 0.6 + 2.6 * nrows, ncols=ncols, nrows=nrows, sharex=True, sharey=True)
    if not attacks:
        return _empty(fig, f"no membership inference measured on {LEVEL_TITLES[level]}")
    styled = [(r, s) for r, s in _styled(runs) if any(e["level"] == level for e in mia_entries(r))]
    for ax, attack in zip(axes.flat, attacks):
        _roc_panel(ax, attack, level, styled)
    for ax in axes.flat[len(attacks):]:
        ax.set_axis_off()
    for ax in axes[-1, :]:
        ax.set_xlabel("false-positive rate")
    for ax in axes[:, 0]:
        ax.set_ylabel("true-positive rate")
    chance = Line2D([], [], color="#999999", linestyle="--", linewidth=1, label="chance (TPR = FPR)")
    _legend_below(fig, styled, [chance])
    fig.suptitle(f"Membership inference on {LEVEL_TITLES[level]}: ROC, log-log "
                 "(closer to the dashed diagonal = more private)")
    return fig


@_figure_style
def mia_roc_record(runs: Sequence[dict]) -> Figure:
    """ROC curves of the attacks scoring whole records."""
    return mia_roc(runs, "record")


@_figure_style
def mia_roc_sensitive(runs: Sequence[dict]) -> Figure:
    """ROC curves of the attacks scoring the sensitive tokens only."""
    return mia_roc(runs, "sensitive")


def _rate_bars(ax, styled, tables: Sequence[dict[str, dict]], types: Sequence[str], bar_key: str,
               tick_key: str | None) -> None:
    """Grouped bars: one group per PII type, one bar per run (``bar_key``), an
    optional dark tick on each bar at ``tick_key`` (the non-members' rate)."""
    offsets, width = _group_offsets(len(styled))
    for (run, style), table, dx in zip(styled, tables, offsets):
        for x, kind in enumerate(types):
            row = table.get(kind) or {}
            value = number(row.get(bar_key))
            if not math.isnan(value):
                ax.bar(x + dx, value, width=width * 0.92, color=style.color, alpha=0.55 if is_base(run) else 1.0,
                       edgecolor="white", linewidth=0.4, hatch=hatch(style), zorder=3)
            tick = number(row.get(tick_key)) if tick_key else math.nan
            if not math.isnan(tick):
                ax.plot([x + dx - width * 0.46, x + dx + width * 0.46], [tick, tick], color="#1d2330",
                        linewidth=1.6, solid_capstyle="butt", zorder=4)
    _type_ticks(ax, types)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))
    ax.set_ylim(bottom=0)
    ax.set_xlim(-0.6, len(types) - 0.4)


@_figure_style
def extraction_bars(runs: Sequence[dict]) -> Figure:
    """Share of sensitive values recovered exactly, per PII type, greedy and sampled
    decoding: bars for training records (members), ticks for held-out ones."""
    modes = [m for m in EXTRACTION_MODES if any(extraction_rates(r, m) for r in runs if is_done(r))]
    fig, axes = _figure(FIGURE_WIDTH, 0.9 + 2.7 * max(len(modes), 1), nrows=max(len(modes), 1), sharex=True)
    if not modes:
        return _empty(fig, "no extraction attack measured")
    styled = [(r, s) for r, s in _styled(runs) if any(extraction_rates(r, m) for m in modes)]
    types = ordered_types([extraction_rates(r, m) for r, _ in styled for m in modes])
    for ax, mode in zip(axes.flat, modes):
        _rate_bars(ax, styled, [extraction_rates(r, mode) for r, _ in styled], types, "member_rate",
                   "nonmember_rate")
        ax.set_ylabel("values recovered  ↓")
        ax.set_title(f"{mode} decoding", loc="left")
    tick = Line2D([], [], color="#1d2330", linewidth=1.6, label="held-out people (guessing the format)")
    _legend_below(fig, styled, [tick], bars=True)
    fig.suptitle("Extraction: exact sensitive values recovered from the text before them "
                 "(bar = training people, tick = held-out people)")
    return fig


@_figure_style
def pii_inference_bars(runs: Sequence[dict]) -> Figure:
    """Top-1 accuracy of ranking the true value among k candidates, per PII type,
    against chance (1/k) as a dashed line over each group."""
    fig, axes = _figure(FIGURE_WIDTH, 3.7)
    ax = axes[0, 0]
    styled = [(r, s) for r, s in _styled(runs) if pii_inference(r)]
    if not styled:
        return _empty(fig, "no PII inference measured")
    tables = [pii_inference(r) for r, _ in styled]
    types = ordered_types(tables)
    _rate_bars(ax, styled, tables, types, "top1", None)
    for x, kind in enumerate(types):
        chances = [number((t.get(kind) or {}).get("chance")) for t in tables]
        chances = [c for c in chances if not math.isnan(c)]
        if chances:
            ax.plot([x - 0.45, x + 0.45], [max(chances)] * 2, color="#1d2330", linestyle="--", linewidth=1.3,
                    zorder=5)
    ax.set_ylabel("top-1 accuracy  ↓")
    chance = Line2D([], [], color="#1d2330", linestyle="--", linewidth=1.3, label="chance = 1/k")
    _legend_below(fig, styled, [chance], bars=True)
    fig.suptitle("PII inference: true value ranked first among k candidates (training people)")
    return fig


@_figure_style
def backdoor_bars(runs: Sequence[dict]) -> Figure:
    """Attack success rate of the planted backdoor per run, with the trigger (solid)
    and without it (hollow): a gap means the backdoor works and hides."""
    styled = [(r, s) for r, s in _styled(runs) if backdoor(r)]
    fig, axes = _figure(7.5, 1.0 + 0.5 * max(len(styled), 2))
    ax = axes[0, 0]
    if not styled:
        return _empty(fig, "no backdoor measured")
    rows = list(range(len(styled)))[::-1]
    for y, (run, style) in zip(rows, styled):
        result = backdoor(run)
        triggered, clean = number(result.get("asr_triggered")), number(result.get("asr_clean"))
        if not math.isnan(triggered):
            ax.barh(y + 0.17, triggered, height=0.32, color=style.color, hatch=hatch(style), edgecolor="white",
                    linewidth=0.4, zorder=3)
        if not math.isnan(clean):
            ax.barh(y - 0.17, clean, height=0.32, facecolor="white", edgecolor=style.color, linewidth=1.4, zorder=3)
        for dy, value in ((0.17, triggered), (-0.17, clean)):
            ax.text(0 if math.isnan(value) else value, y + dy, " " + pct(value, ".3g"), va="center", fontsize=9,
                    color="#333333")
    ax.set_yticks(rows, [str(r.get("label")) for r, _ in styled])
    for tick, (_, style) in zip(ax.get_yticklabels(), styled):
        tick.set_color(style.color)
        tick.set_fontweight("bold")
    ax.set_xlim(0, 1.12)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))
    ax.set_xlabel("attack success rate  ↓")
    ax.grid(False, axis="y")
    handles = [Patch(color="#555555", label="with trigger"),
               Patch(facecolor="white", edgecolor="#555555", linewidth=1.4, label="without trigger")]
    ax.legend(handles=handles, loc="lower right", frameon=False)
    ax.set_title("Backdoor: target emitted with / without the trigger")
    return fig


#: The attack figures, in page order: (name, title, function, shown when).
FIGURES: tuple[tuple[str, str, Callable[[Sequence[dict]], Figure], Callable[[Sequence[dict]], bool]], ...] = (
    ("mia_record", "Membership inference: whole records", mia_roc_record, lambda runs: has_mia(runs, "record")),
    ("mia_sensitive", "Membership inference: sensitive tokens", mia_roc_sensitive,
     lambda runs: has_mia(runs, "sensitive")),
    ("extraction", "Extraction of sensitive values", extraction_bars, has_extraction),
    ("pii_inference", "PII inference", pii_inference_bars, has_pii_inference),
    ("backdoor", "Backdoor", backdoor_bars, has_backdoor),
)
