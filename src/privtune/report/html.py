"""The study report: one self-contained HTML page a person can e-mail or archive.

Figures are embedded as base64 PNG (rendered at 2x for sharp text on high-density
screens; inline SVG would be crisper still, but matplotlib's SVG ids clash when several
figures share one page), CSS is inline and nothing is fetched from the network, so the
file opens the same anywhere, offline, years later. The figures are also saved beside
it under ``figures/`` for slides and papers. The runs' per-record statistics, which grow
with the records, go to ``records.json.gz`` beside it, linked and never embedded: the
page is the same size at 100 records as at 100,000.

Order follows what a reader asks: the headline (which method leaks least, which keeps
the most utility, which trades best, which attack hurts most), then each figure with
its numbers beside it, then the attacks (ROC curves with a table of AUC and TPR at low
FPR under them, extraction, PII inference, backdoor; each shown only when some run was
attacked that way, so an older study renders as before), then what scrubbing left
behind (when some run trained on scrubbed text), then the federated clients' leakage (when
some run was federated), then what unlearning runs still know of their forget set
(:mod:`privtune.report.unlearning`), then where each run's time went
(:mod:`privtune.report.timing`), then a table of every run, failed ones
included with their error. Every column says
which way is better. All text from runs and metadata is HTML-escaped.

Plain ``string.Template``: the page is small and a template engine would add a
dependency for nothing.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from string import Template

import matplotlib.pyplot as plt

from privtune.errors import PrivtuneError
from privtune.files import private_dir, private_file
from privtune.report import attack_plots, exposure, plots
from privtune.report.audit import audit_section
from privtune.report.federated import federated_section
from privtune.report.frontier_section import frontier_section, frontiers
from privtune.report.attack_plots import (
    attack_name, auc, auc_ci, auc_reason, interval, mia_entry, pct, tpr_at, tpr_ci, tpr_reason,
)
from privtune.report.differences import Difference, missed_value_difference, run_difference
from privtune.report.export import write_frontier, write_records, write_text_atomic
from privtune.report.headline import Headline, short_reason, strongest_attack, strongest_overall
from privtune.report.plots import (duration, is_base, is_done, measure, number, pareto_front, styles, top_exposure,
                                   unit_noun)
from privtune.report.timing import timing_section
from privtune.report.unlearning import unlearning_section

#: Pixels per figure inch on the page, and the resolution the PNG is rendered at.
DISPLAY_PX_PER_INCH = 80
RENDER_DPI = 168

META_NAMES = {"study": "study", "model": "model", "dataset": "dataset", "tagger": "PII tagger",
              "device": "device", "created": "created", "privtune": "privtune version",
              "version": "privtune version", "config_hash": "config hash"}


# --- formatting ---------------------------------------------------------------------

def fmt(value, spec: str = ".3f") -> str:
    """A number for the page; an en dash where there is none."""
    value = number(value)
    return "–" if math.isnan(value) else format(value, spec)


def fmt_bytes(value) -> str:
    value = number(value)
    if math.isnan(value):
        return "–"
    for size, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def fmt_count(value) -> str:
    value = number(value)
    if math.isnan(value):
        return "–"
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f}"


def fmt_seconds(value) -> str:
    value = number(value)
    return "–" if math.isnan(value) else duration(value)


def epsilon(run: dict) -> float:
    return number((run.get("dp") or {}).get("epsilon"))


def epsilon_unit(run: dict) -> str:
    """The unit ε covers as a noun: "person", "record", "client", "person, largest over clients".

    Runs stored before ``dp.unit`` existed have no unit; their DP-SGD clipped records.
    """
    head, _, rest = str((run.get("dp") or {}).get("unit") or "record").partition(", ")
    return ", ".join([unit_noun(head)] + ([rest] if rest else []))


def fmt_epsilon(run: dict, spec: str = ".3g") -> str:
    """ε with its unit, as shown in the tables and headline ("8 per person"), "–" for runs without DP."""
    eps = epsilon(run)
    if math.isnan(eps):
        if (run.get("dp") or {}).get("epsilon") != math.inf:
            return "–"
        return f"∞ per {epsilon_unit(run)}"
    return f"{eps:{spec}} per {epsilon_unit(run)}"


# --- the headline -------------------------------------------------------------------

def candidates(runs: Sequence[dict]) -> list[dict]:
    """Finished fine-tuned runs with both a utility and a leakage figure."""
    return [r for r in runs if is_done(r) and not is_base(r)
            and not math.isnan(measure(r, "utility_ce")) and not math.isnan(measure(r, "leakage_gain"))]


def best_tradeoff(runs: Sequence[dict]) -> dict | None:
    """The Pareto-optimal run nearest the ideal corner (lowest leakage and lowest
    utility CE seen), each axis scaled to the range the runs span, so neither unit
    dominates."""
    runs = candidates(runs)
    if not runs:
        return None
    points = [(measure(r, "utility_ce"), measure(r, "leakage_gain")) for r in runs]
    xs, ys = zip(*points)

    def scaled(v: float, lo: float, hi: float) -> float:
        return (v - lo) / (hi - lo) if hi > lo else 0.0

    def distance(i: int) -> float:
        return math.hypot(scaled(xs[i], min(xs), max(xs)), scaled(ys[i], min(ys), max(ys)))

    return runs[min(pareto_front(points), key=distance)]


@dataclass
class Card:
    title: str
    run: str
    detail: str
    kind: str = ""  # "" or "warn"


def _dp_note(run: dict) -> str:
    eps = fmt_epsilon(run)
    return f", ε = {eps}" if eps != "–" else ", no DP"


def headline_cards(runs: Sequence[dict]) -> list[Card]:
    """The few facts a reader wants before any plot."""
    cards: list[Card] = []
    pool = candidates(runs)
    if pool:
        low = min(pool, key=lambda r: measure(r, "leakage_gain"))
        cards.append(Card("Lowest leakage", str(low.get("label")),
                          f"leakage gain {fmt(measure(low, 'leakage_gain'))} nats, memorisation gap (net) "
                          f"{fmt(measure(low, 'memorisation_gap_net'))}{_dp_note(low)}"))
        best = min(pool, key=lambda r: measure(r, "utility_ce"))
        cards.append(Card("Best utility", str(best.get("label")),
                          f"utility CE {fmt(measure(best, 'utility_ce'))} nats (perplexity "
                          f"{fmt(measure(best, 'utility_ppl'), '.2f')}), {fmt(measure(best, 'utility_gain'), '+.3f')} "
                          f"vs base"))
        trade = best_tradeoff(runs)
        cards.append(Card("Best trade-off", str(trade.get("label")),
                          f"on the Pareto front, nearest the ideal corner: utility CE "
                          f"{fmt(measure(trade, 'utility_ce'))}, leakage gain {fmt(measure(trade, 'leakage_gain'))}"
                          f"{_dp_note(trade)}"))
    strongest = strongest_attack_card(runs)
    if strongest:
        cards.append(strongest)
    exposed = [(r, *top_exposure(r)) for r in runs if is_done(r) and not is_base(r)]
    exposed = [(r, rep, e) for r, rep, e in exposed if not math.isnan(e)]
    if exposed:
        run, rep, value = max(exposed, key=lambda t: t[2])
        ceiling = max((number(x.get("max_exposure")) for x in run.get("exposure") or []), default=math.nan)
        of = f" of {ceiling:.1f} possible" if not math.isnan(ceiling) else ""
        figure = exposure.top(run)[1]
        cards.append(Card("Highest canary exposure", str(run.get("label")),
                          f"{value:.1f} bits{of} ({exposure.how(figure)}), canaries inserted {rep}×", "warn"))
    for status, advice in (("failed", "see the table below for the error"),
                           ("interrupted", "their process ended before they finished; run the study again to resume")):
        stopped = [r for r in runs if r.get("status") == status]
        if stopped:
            cards.append(Card(f"{len(stopped)} run{'s' if len(stopped) > 1 else ''} {status}",
                              ", ".join(str(r.get("label")) for r in stopped), advice, "warn"))
    return cards


def fmt_interval(low: float, high: float, spec: str = ".2f") -> str:
    """``[low–high]``, or "" when the interval is unknown."""
    if math.isnan(number(low)) or math.isnan(number(high)):
        return ""
    return f"[{format(low, spec)}–{format(high, spec)}]"


def fmt_advantage(head: Headline) -> str:
    """A headline's advantage over the base model with its interval, AUC and group sizes."""
    return (f"advantage over the base model {head.number('advantage'):+.2f} "
            f"{fmt_interval(*interval(head.figures.get('advantage_ci')))}, AUC {head.number('auc'):.2f} "
            f"{fmt_interval(*interval(head.figures.get('auc_ci')))} vs {head.number('base_auc'):.2f} "
            f"(n {head.figures.get('n_members')}/{head.figures.get('n_nonmembers')})")


def strongest_attack_card(runs: Sequence[dict]) -> Card | None:
    """The strongest membership attack over the fine-tuned runs, chosen on one half of
    the people and quoted on the other (:mod:`privtune.report.headline`), or why no
    figure can be quoted."""
    found = strongest_overall(runs)
    if found is None:
        return None
    run, head = found
    if head.attack is None:
        return Card("Strongest attack", "n/a", head.reason or "")
    exposed = str(run.get("label"))
    if run.get("method") != run.get("label"):
        exposed += f" ({run.get('method')})"
    if head.reason:
        return Card("Strongest attack", head.name, f"most exposed: {exposed}; n/a: {head.reason}")
    low = interval(head.figures.get("advantage_ci"))[0]
    return Card("Strongest attack", head.name,
                f"most exposed: {exposed}, {fmt_advantage(head)}, on the people held back while choosing it "
                f"among {head.variants} attack variants", "warn" if low > 0 else "")


def _difference_note(diff: Difference) -> str:
    return (f"difference {diff.value:+.3f}, 95% interval [{diff.low:+.3f}, {diff.high:+.3f}], paired over "
            f"{diff.records} records of {diff.people} people")


def verdict(runs: Sequence[dict]) -> str:
    """One sentence comparing the least leaky run with the most useful one, claiming a
    difference only where its paired interval (:mod:`privtune.report.differences`)
    excludes 0."""
    pool = candidates(runs)
    if len(pool) < 2:
        return ""
    low = min(pool, key=lambda r: measure(r, "leakage_gain"))
    best = min(pool, key=lambda r: measure(r, "utility_ce"))
    if low is best:
        return f"{low.get('label')} has both the lowest leakage gain and the best utility: no trade-off to make here."
    low_leak, best_leak = measure(low, "leakage_gain"), measure(best, "leakage_gain")
    leak = run_difference(best, low, "leakage_gain")
    cost = run_difference(low, best, "utility_ce")
    gains = f"leakage gain {low_leak:.3f} vs {best_leak:.3f} nats"
    if leak is None:
        return (f"{low.get('label')} has a lower leakage gain than {best.get('label')} ({gains}); these runs were "
                f"stored without per-record statistics, so whether the difference is measurable is unknown.")
    if not leak.measurable:
        head = (f"{low.get('label')} and {best.get('label')}: no measurable difference in leakage ({gains}; "
                f"{_difference_note(leak)})")
    else:
        head = f"{low.get('label')} leaks less than {best.get('label')} ({gains}; {_difference_note(leak)})"
    if cost is None:
        tail = "and whether their utility differs is unknown (no per-record statistics for it)"
    elif not cost.measurable:
        tail = f"and no measurable difference in utility ({_difference_note(cost)})"
    else:
        tail = (f"for {cost.value:.3f} nats more utility CE (perplexity {fmt(measure(low, 'utility_ppl'), '.2f')} "
                f"vs {fmt(measure(best, 'utility_ppl'), '.2f')}; {_difference_note(cost)})")
    return f"{head}, {tail}."


# --- tables ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    """A table column: header, direction (+1 higher is better, -1 lower, 0 neither),
    the value to compare (for highlighting the best) and how to show it."""
    header: str
    better: int
    value: Callable[[dict], float] | None
    show: Callable[[dict], str]
    title: str = ""
    mark_worst: bool = False  # also shade the worst value (attack tables)

    def heading(self) -> str:
        arrow = {1: "\u00a0↑", -1: "\u00a0↓"}.get(self.better, "")  # the arrow never wraps alone
        tip = f' title="{escape(self.title)}"' if self.title else ""
        return f"<th{tip}>{escape(self.header)}{arrow}</th>"


def _final(key: str, spec: str = ".3f") -> tuple[Callable[[dict], float], Callable[[dict], str]]:
    return (lambda r: measure(r, key)), (lambda r: fmt(measure(r, key), spec))


def _eff(key: str, show: Callable) -> tuple[Callable[[dict], float], Callable[[dict], str]]:
    return (lambda r: measure(r, key, "efficiency")), (lambda r: show(measure(r, key, "efficiency")))


def _top_exposure_cell(run: dict) -> str:
    rep, figure = exposure.top(run)
    return "–" if figure is None else _exposure_html(figure, rep)


def _exposure_html(figure: exposure.ExposureFigure, rep: int) -> str:
    """Exposure bits, how they were obtained and the repetition count, as a table cell."""
    if figure.method == "bounded":
        shown = f"{figure.value:.1f} <small>[{figure.low:.1f}–{figure.high:.1f}] bounded, {rep}×</small>"
    else:
        shown = f"{'≈' if figure.method == 'estimated' else ''}{figure.value:.1f} <small>{figure.method}, {rep}×</small>"
    return f'<span class="nowrap">{shown}</span>'


def _headline_advantage(run: dict, level: str | None = None) -> float:
    head = strongest_attack(run, level)
    return math.nan if head is None or head.reason else head.number("advantage")


def _strongest_mia_cell(run: dict, level: str | None = None) -> str:
    """The strongest attack's advantage [interval] and AUC, or n/a with its reason."""
    head = strongest_attack(run, level)
    if head is None or is_base(run):  # the base model is the baseline itself
        return "–"
    if head.reason:
        return f'<span title="{escape(head.reason)}">n/a <small>({escape(short_reason(head.reason))})</small></span>'
    tip = escape(f"{head.name}: {fmt_advantage(head)}, on the people held back while choosing it")
    low, high = interval(head.figures.get("advantage_ci"))
    return (f'<span class="nowrap" title="{tip}">{head.number("advantage"):+.2f} <small>[{low:+.2f}, {high:+.2f}] '
            f'AUC {head.number("auc"):.2f}, {escape(attack_name(head.attack))}</small></span>')


def _status_cell(run: dict) -> str:
    status = str(run.get("status") or "–")
    return f'<span class="status {escape(status)}">{escape(status)}</span>'


def _error_row(run: dict, span: int) -> str:
    """A failed run's error, on its own row under the run, as wide as the table."""
    error = run.get("error")
    if not error:
        return ""
    return (f'<tr class="failed errorrow"><td colspan="{span}"><span class="error">'
            f'{escape(str(error))}</span></td></tr>')


def _label_cell(run: dict, color: str) -> str:
    label = escape(str(run.get("label")))
    return f'<span class="swatch" style="background:{color}"></span><span title="{label}">{label}</span>'


def _escaped(show: Callable[[dict], str]) -> Callable[[dict], str]:
    return lambda r: escape(show(r))


RUN_COLUMNS: tuple[Column, ...] = (
    Column("method", 0, None, lambda r: escape(str(r.get("method")))),
    # Not ranked: ε per person, per record and per client are not one scale.
    Column("ε", 0, None, _escaped(fmt_epsilon),
           "DP budget per unit (a person, a record or a client); for one unit, lower is more private (– = no DP)"),
    Column("leakage gain", -1, *_final("leakage_gain"), "CE_S(base; train) − CE_S(model; train), nats"),
    Column("memorisation gap (net)", -1, *_final("memorisation_gap_net"),
           "CE_S(model; test) − CE_S(model; train), minus the base model's own gap, nats; for a scrubbed run "
           "pooled over the values its tagger caught and missed (apart in What scrubbing leaves behind)"),
    Column("utility CE", -1, *_final("utility_ce"), "CE on non-sensitive held-out tokens, nats"),
    Column("ppl", -1, *_final("utility_ppl", ".2f"), "perplexity = exp(utility CE)"),
    Column("exposure, most-repeated canary", -1, lambda r: top_exposure(r)[1], _top_exposure_cell,
           "mean exposure (bits) of the canaries inserted most often"),
    Column("MIA advantage, strongest attack", -1, _headline_advantage, _strongest_mia_cell,
           "AUC of the strongest membership attack minus the base model's on the same records [95% interval], "
           "on the half of the people not used to choose it; 0 = nothing beyond what the records give"),
    Column("train time", -1, *_eff("train_seconds", fmt_seconds)),
    Column("peak memory", -1, *_eff("peak_memory_bytes", fmt_bytes)),
    Column("trainable params", -1, *_eff("trainable_params", fmt_count)),
    Column("status", 0, None, _status_cell),
)


def _best_index(runs: Sequence[dict], column: Column) -> set[int]:
    """Rows holding the best value of a column, among finished fine-tuned runs."""
    if column.value is None or column.better == 0:
        return set()
    scored = [(i, column.value(r)) for i, r in enumerate(runs) if is_done(r) and not is_base(r)]
    scored = [(i, v) for i, v in scored if not math.isnan(v)]
    if len(scored) < 2:
        return set()
    best = (max if column.better > 0 else min)(v for _, v in scored)
    return {i for i, v in scored if v == best}


def _worst_index(runs: Sequence[dict], column: Column) -> set[int]:
    """Rows holding the worst value of a column that asks for it (see :func:`_best_index`)."""
    if not column.mark_worst:
        return set()
    flipped = Column(column.header, -column.better, column.value, column.show)
    return _best_index(runs, flipped)


def table(runs: Sequence[dict], columns: Sequence[Column], css_class: str = "runs",
          colors: Sequence[str] | None = None) -> str:
    """An HTML table of ``runs``: label first, the best value of each column marked
    (and the worst, for columns that ask). ``colors``: each run's method colour, when
    ``runs`` is a subset of the study (styles are assigned over the whole study)."""
    colors = list(colors) if colors is not None else [s.color for s in styles(runs)]
    best = [_best_index(runs, c) for c in columns]
    worst = [_worst_index(runs, c) for c in columns]
    head = "<tr><th>run</th>" + "".join(c.heading() for c in columns) + "</tr>"
    rows = []
    for i, run in enumerate(runs):
        classes = " ".join(k for k, on in (("base", is_base(run)), ("failed", run.get("status") == "failed")) if on)
        cells = [f"<td class=\"label\">{_label_cell(run, colors[i])}</td>"]
        for column, winners, losers in zip(columns, best, worst):
            mark = ' class="best"' if i in winners else ' class="worst"' if i in losers and i not in winners else ""
            cells.append(f"<td{mark}>{column.show(run)}</td>")
        rows.append(f'<tr class="{classes}">' + "".join(cells) + "</tr>" + _error_row(run, len(cells)))
    return f'<table class="{css_class}"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _on_front(runs: Sequence[dict]) -> set[int]:
    pool = candidates(runs)
    front = pareto_front([(measure(r, "utility_ce"), measure(r, "leakage_gain")) for r in pool])
    return {id(pool[i]) for i in front}


def _epoch_change(key: str) -> Callable[[dict], str]:
    def show(run: dict) -> str:
        epochs = sorted(run.get("epochs") or [], key=lambda e: e.get("epoch", 0))
        if len(epochs) < 2:
            return "–"
        return f"{fmt(epochs[0].get(key), '.2f')} → {fmt(epochs[-1].get(key), '.2f')}"
    return show


def _exposure_at(reps_key: str) -> Callable[[dict], str]:
    def show(run: dict) -> str:
        by_rep = exposure.by_repetition(run)
        if not by_rep:
            return "–"
        r = min((k for k in by_rep if k > 0), default=None) if reps_key == "first" else max(by_rep)
        return "–" if r is None else _exposure_html(by_rep[r], r)
    return show


def _median_gap(run: dict) -> float:
    return measure(run, "ce_s_test_record_p50") - measure(run, "ce_s_train_record_p50")


def side_columns(runs: Sequence[dict]) -> dict[str, tuple[list[dict], tuple[Column, ...]]]:
    """The numbers shown beside each figure: which runs, which columns."""
    done = [r for r in runs if is_done(r)]
    front = _on_front(runs)
    trained = [r for r in done if not is_base(r)]
    return {
        "leakage_utility": (done, (
            Column("utility CE", -1, *_final("utility_ce")),
            Column("leakage gain", -1, *_final("leakage_gain")),
            Column("gap (net)", -1, *_final("memorisation_gap_net")),
            Column("front", 0, None, lambda r: "✓" if id(r) in front else "", "on the Pareto front"),
        )),
        "leakage_utility_epochs": ([r for r in trained if len(r.get("epochs") or []) > 1], (
            Column("epochs", 0, None, lambda r: str(max(e.get("epoch", 0) for e in r["epochs"]))),
            Column("leakage gain", -1, None, _epoch_change("leakage_gain"), "epoch 0 → last epoch"),
            Column("utility CE", -1, None, _epoch_change("utility_ce"), "epoch 0 → last epoch"),
        )),
        "exposure": ([r for r in done if plots.exposure_by_repetition(r)], (
            Column("ε", 0, None, _escaped(fmt_epsilon)),
            Column("inserted once", -1, None, _exposure_at("first"), "mean exposure, bits"),
            Column("most repeated", -1, lambda r: top_exposure(r)[1], _exposure_at("last"), "mean exposure, bits"),
        )),
        "efficiency": ([r for r in trained if r.get("efficiency")], (
            Column("per epoch", -1, *_eff("seconds_per_epoch", fmt_seconds)),
            Column("tokens/s", 1, *_eff("tokens_per_second", lambda v: fmt(v, ",.0f"))),
            Column("trainable", -1, lambda r: measure(r, "trainable_params", "efficiency")
                   / measure(r, "total_params", "efficiency"),
                   lambda r: fmt(100 * measure(r, "trainable_params", "efficiency")
                                 / measure(r, "total_params", "efficiency"), ".2f") + " %",
                   "trainable share of all parameters"),
            Column("FLOPs", -1, *_eff("flops_estimate", lambda v: fmt(v, ".1e")), "estimated matrix-product FLOPs of the training, padded positions included (see the caption)"),
        )),
        "loss_quantiles": ([r for r in done if not math.isnan(measure(r, "ce_s_train_record_p50"))], (
            Column("train p50", 1, *_final("ce_s_train_record_p50"), "median record, members"),
            Column("test p50", 0, *_final("ce_s_test_record_p50"), "median record, non-members"),
            Column("test − train", -1, _median_gap, lambda r: fmt(_median_gap(r), "+.3f"),
                   "gap between the medians: memorisation of typical records"),
        )),
    }


# --- the attack sections ---------------------------------------------------------------------

def _tpr_num(value: float) -> str:
    """A TPR in percent without the sign: one decimal below 10 %, none above."""
    value = 100 * number(value)
    return "–" if math.isnan(value) else f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _fpr_label(fpr: str) -> str:
    return f"{100 * float(fpr):g}%"


def fpr_keys(runs: Sequence[dict], level: str | None = None) -> list[str]:
    """The FPRs TPR was reported at in any run (at ``level``), largest first."""
    keys = {k for r in runs for e in attack_plots.mia_entries(r) if level in (None, e["level"])
            for k in (e.get("tpr_at_fpr") or {}) if not math.isnan(number(_as_float(k)))}
    return sorted(keys, key=lambda k: -float(k))


def _as_float(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _sizes_of(entry: dict) -> str:
    members, nonmembers = entry.get("n_members"), entry.get("n_nonmembers")
    return f"n {members}/{nonmembers}" if members is not None and nonmembers is not None else ""


def _advantage_line(entry: dict) -> str:
    """The base model's AUC on the same records and the advantage over it, or the flag."""
    base = number(entry.get("base_auc"))
    if math.isnan(base):
        return ""
    if entry.get("confounded"):
        return (f'<small class="confounded" title="{escape(str(entry.get("confounded_reason")))}">'
                f'confounded: base {base:.2f}</small>')
    low, high = interval(entry.get("advantage_ci"))
    return (f'<small>base {base:.2f}, adv. {number(entry.get("advantage")):+.2f} '
            f'[{low:+.2f}, {high:+.2f}]</small>')


def mia_cell(entry: dict | None, fprs: Sequence[str]) -> str:
    """AUC with its interval and group sizes, the base model's AUC and the advantage over
    it, then TPR at each FPR with its interval (in %); n/a with the reason where too few
    records measure a figure."""
    if entry is None:
        return "–"
    if math.isnan(auc(entry)):
        return f'n/a <small>({escape(auc_reason(entry))})</small>'
    lines = [f'<b>{auc(entry):.2f}</b> <small>{fmt_interval(*auc_ci(entry))}</small> '
             f'<small>{escape(_sizes_of(entry))}</small>']
    advantage = _advantage_line(entry)
    if advantage:
        lines.append(advantage)
    for fpr in fprs:
        value = tpr_at(entry, fpr)
        if math.isnan(value):
            reason = tpr_reason(entry, fpr).split(",")[0]  # "needs ≥ 1000 non-members"
            lines.append(f'<small class="tpr">@{_fpr_label(fpr)}: n/a ({escape(reason)})</small>')
            continue
        low, high = tpr_ci(entry, fpr)
        ci = "" if math.isnan(low) or math.isnan(high) else f" [{_tpr_num(low)}–{_tpr_num(high)}]"
        lines.append(f'<small class="tpr">@{_fpr_label(fpr)}: {_tpr_num(value)}{ci}</small>')
    return "<br>".join(lines)


def mia_columns(runs: Sequence[dict], level: str) -> tuple[Column, ...]:
    """One column per attack at ``level``: AUC and TPR at low FPR, best and worst shaded."""
    fprs = fpr_keys(runs, level)
    return tuple(Column(attack_name(a), -1, lambda r, a=a: auc(mia_entry(r, a, level)),
                        lambda r, a=a: mia_cell(mia_entry(r, a, level), fprs),
                        "AUC [95% CI] and n members/non-members; the base model's AUC on the same records and the "
                        "advantage over it [95% CI]; TPR (%) at each FPR [95% CI]; 0.5 AUC = chance", mark_worst=True)
                 for a in attack_plots.mia_attacks(runs, level))


def _attacked(runs: Sequence[dict], level: str) -> list[dict]:
    return [r for r in runs if is_done(r) and any(e["level"] == level for e in attack_plots.mia_entries(r))]


def _sizes(runs: Sequence[dict], level: str) -> str:
    """How many members and non-members the attacks scored, e.g. "120 and 120"."""
    pairs = {(e.get("n_members"), e.get("n_nonmembers")) for r in runs for e in attack_plots.mia_entries(r)
             if e["level"] == level}
    if len(pairs) != 1 or None in next(iter(pairs)):
        return ""
    members, nonmembers = next(iter(pairs))
    return f" Scored on {members} training and {nonmembers} held-out records per run."


def mia_table(runs: Sequence[dict], level: str, colors: dict[int, str]) -> str:
    """The full MIA table of one level, with how to read it and which runs it lacks."""
    attacked = _attacked(runs, level)
    if not attacked:
        return ""
    fprs = ", ".join(_fpr_label(f) for f in fpr_keys(runs, level)) or "–"
    ids = {id(r) for r in attacked}
    missing = [str(r.get("label")) for r in runs if is_done(r) and id(r) not in ids]
    lacking = f" No attack results at this level for: {', '.join(missing)}." if missing else ""
    note = (f"Each cell: AUC [95% score interval] and n members/non-members; then the base model's AUC on the "
            f"same records and the fine-tuned model's advantage over it [95% paired interval] (an attack whose "
            f"base-model AUC is far from 0.5 is marked confounded: it measures the records, not memorisation); "
            f"then TPR in % at FPR {fprs} [interval], n/a below 1/FPR non-members. Lower is more private, AUC 0.5 "
            f"and TPR = FPR are chance. Per attack, the least exposed fine-tuned run is shaded green, the most "
            f"exposed orange.{_sizes(runs, level)}{lacking}")
    body = table(attacked, mia_columns(runs, level), "attacks", [colors[id(r)] for r in attacked])
    return (f'<h3>Every attack, {escape(level)} level</h3><p class="note">{escape(note)}</p>'
            f'<div class="wide">{body}</div>')


def _strongest_name(level: str) -> Callable[[dict], str]:
    def show(run: dict) -> str:
        head = strongest_attack(run, level)
        return escape(attack_name(head.attack)) if head and head.attack else "–"
    return show


def _extraction_value(mode: str) -> Callable[[dict], float]:
    return lambda r: number((attack_plots.extraction_rates(r, mode).get(attack_plots.ALL) or {}).get("advantage"))


def _extraction_cell(mode: str) -> Callable[[dict], str]:
    def show(run: dict) -> str:
        row = attack_plots.extraction_rates(run, mode).get(attack_plots.ALL)
        if not row:
            return "–"
        advantage = number(row.get("advantage"))
        sign = "" if math.isnan(advantage) else "+" if advantage >= 0 else ""
        return (f"{sign}{escape(pct(advantage))} <small>({escape(pct(row.get('member_rate'))).rstrip('%')} vs "
                f"{escape(pct(row.get('nonmember_rate'))).rstrip('%')}; {_targets(row)})</small>")
    return show


def _targets(row: dict) -> str:
    """How many values each rate is over: training / held-out people's."""
    return f"n = {fmt(row.get('n_member'), '.0f')} / {fmt(row.get('n_nonmember'), '.0f')}"


def _pii(run: dict, key: str) -> float:
    return number((attack_plots.pii_inference(run).get(attack_plots.ALL) or {}).get(key))


def _backdoor(run: dict, key: str) -> float:
    return number((attack_plots.backdoor(run) or {}).get(key))


def attack_side_columns(runs: Sequence[dict]) -> dict[str, tuple[list[dict], tuple[Column, ...]]]:
    """The numbers beside each attack figure."""
    done = [r for r in runs if is_done(r)]
    sides: dict[str, tuple[list[dict], tuple[Column, ...]]] = {}
    for level in attack_plots.LEVELS:
        sides[f"mia_{level}"] = (_attacked(runs, level), (
            Column("strongest attack", 0, None, _strongest_name(level),
                   "the attack with the largest advantage over the base model on one half of the people"),
            Column("advantage", -1, lambda r, lv=level: _headline_advantage(r, lv),
                   lambda r, lv=level: _strongest_mia_cell(r, lv),
                   "its AUC minus the base model's [95% interval] and its AUC, on the other half; n/a when "
                   "confounded or too few records"),
        ))
    modes = [m for m in attack_plots.EXTRACTION_MODES if any(attack_plots.extraction_rates(r, m) for r in done)]
    sides["extraction"] = ([r for r in done if any(attack_plots.extraction_rates(r, m) for m in modes)], tuple(
        Column(f"{mode} adv.", -1, _extraction_value(mode), _extraction_cell(mode),
               "all PII types: recovered for training people minus for held-out people "
               "(training vs held-out rate; n = values attacked in each group, only values inside "
               "the trained window of data.max_length tokens)") for mode in modes))
    sides["pii_inference"] = ([r for r in done if attack_plots.pii_inference(r)], (
        Column("top-1", -1, lambda r: _pii(r, "top1"), lambda r: escape(pct(_pii(r, "top1"))),
               "all PII types, training people"),
        Column("held-out", 0, None, lambda r: escape(pct(_pii(r, "nonmember_top1"))),
               "the same for held-out people: what the format alone gives"),
        Column("chance", 0, None, lambda r: escape(pct(_pii(r, "chance"), "g")), "1/k"),
        Column("values", 0, None, lambda r: _targets(attack_plots.pii_inference(r).get(attack_plots.ALL) or {}),
               "values ranked: training / held-out people's, only those inside the trained window"),
    ))
    sides["backdoor"] = ([r for r in done if attack_plots.backdoor(r)], (
        Column("with trigger", -1, lambda r: _backdoor(r, "asr_triggered"),
               lambda r: escape(pct(_backdoor(r, "asr_triggered"))), "attack success rate"),
        Column("without", -1, lambda r: _backdoor(r, "asr_clean"), lambda r: escape(pct(_backdoor(r, "asr_clean"))),
               "target emitted without the trigger"),
        Column("prompts", 0, None, lambda r: fmt(_backdoor(r, "n"), ".0f")),
    ))
    return sides


def _clip(text, limit: int = 60) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def backdoor_note(runs: Sequence[dict]) -> str:
    """The trigger and target of the backdoor (set by the study, not personal data)."""
    planted = {(str(b.get("trigger")), str(b.get("target"))) for r in runs if is_done(r)
               for b in [attack_plots.backdoor(r)] if b and b.get("trigger")}
    if len(planted) != 1:
        return ""
    trigger, target = next(iter(planted))
    return f" Trigger: “{_clip(trigger)}”; target: “{_clip(target)}”."


FIGURE_NOTES = {
    "leakage_utility": "Each point is a final model. Left is more useful, down leaks less; the dashed "
                       "step line joins the runs no other run beats on both.",
    "leakage_utility_epochs": "How each run moved while it trained: every epoch buys utility (left) and "
                              "costs privacy (up). Private runs should stay low.",
    "exposure": "How many bits of a secret the model gives away, against how often the secret was in the "
                "training data. At the dashed line the model ranks the true secret first. Filled markers are "
                "exact ranks; hollow ones are not (bounded: the bar is the proven interval; estimated: sampled "
                "only).",
    "efficiency": "What each method costs to train. Memory is what the training added above what the process "
                  "held when the run began (the model is loaded by then): the peak resident set on CPU, "
                  "allocated memory on GPU; for a federated run, the largest client's training, in its worker. "
                  "Tokens/s counts the records' real tokens, padding left out. FLOPs are estimated from the "
                  "model's shapes and count the matrix products the training computed: forward and backward "
                  "through the layers the gradient reaches, attention, every padded position, prompt tuning's "
                  "virtual tokens and prefix tuning's keys, the DP engine's per-record gradients and norms "
                  "(within 2% of PyTorch's FLOP counter on the test models); not elementwise work (norms, "
                  "activations, softmax, the optimiser), the input-embedding lookup (no multiply), DP noise, "
                  "nor the larger norms of user-level DP's grouped records.",
    "loss_quantiles": "The spread over records of the loss on sensitive tokens: 10th, 50th and 90th "
                      "percentile. Means hide the few records a model learnt by heart.",
    "mia_record": "Can an attacker tell a training record from a held-out one? One panel per attack, one "
                  "line per run; the dashed diagonal is guessing. Both axes are logarithmic: what counts is "
                  "the true-positive rate at a very low false-positive rate (left edge).",
    "mia_sensitive": "The same attacks scored on the sensitive tokens only (names, e-mails, numbers ...): "
                     "does the model recognise the values it was trained on?",
    "extraction": "Prompted with the text before a sensitive value, how often the model writes the exact "
                  "value. Held-out people's values were never seen: their rate is what guessing the format "
                  "gives, the bar above it is memorisation.",
    "pii_inference": "Ranking the true value first among k candidates of the same type (one true, k − 1 "
                     "fake). The dashed line is chance, 1/k.",
    "backdoor": "Share of held-out prompts where the model emits the planted target: with the trigger "
                "(the attack works) and without it (the backdoor leaks into normal use).",
}


# --- figures ----------------------------------------------------------------------------

def render_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=RENDER_DPI, facecolor="white")
    plt.close(fig)
    return buffer.getvalue()


def _note(name: str, runs: Sequence[dict]) -> str:
    note = FIGURE_NOTES.get(name, "")
    return note + backdoor_note(runs) if name == "backdoor" else note


def _below(name: str, runs: Sequence[dict], colors: dict[int, str]) -> str:
    """What goes under a figure, full width: the MIA table under its ROC curves."""
    level = name.removeprefix("mia_")
    return mia_table(runs, level, colors) if name.startswith("mia_") and level in attack_plots.LEVELS else ""


def figure_section(name: str, title: str, fig, runs: Sequence[dict], figures_dir: Path | None) -> str:
    width = fig.get_figwidth() * DISPLAY_PX_PER_INCH
    png = render_png(fig)
    if figures_dir is not None:
        path = private_dir(figures_dir) / f"{name}.png"
        path.unlink(missing_ok=True)  # one an older privtune wrote may be readable by others
        private_file(path).write_bytes(png)
    data = base64.b64encode(png).decode("ascii")
    colors = {id(r): s.color for r, s in zip(runs, styles(runs))}  # as in the figures
    side_runs, columns = {**side_columns(runs), **attack_side_columns(runs)}.get(name, ([], ()))
    side = table(side_runs, columns, "side", [colors[id(r)] for r in side_runs]) if side_runs and columns else ""
    return (f'<section class="figure" id="{escape(name)}"><h2>{escape(title)}</h2>'
            f'<div class="row"><img alt="{escape(title)}" style="width:{width:.0f}px" '
            f'src="data:image/png;base64,{data}">'
            f'<aside><p class="note">{escape(_note(name, runs))}</p>{side}</aside></div>'
            f'{_below(name, runs, colors)}</section>')


def report_figures(runs: Sequence[dict]) -> list[tuple[str, str, Callable]]:
    """The figures of this study's page: every measure figure, and the attack figures
    of the attacks some run went through."""
    return [(name, title, make) for name, title, make in plots.FIGURES] + [
        (name, title, make) for name, title, make, shown in attack_plots.FIGURES if shown(runs)]


# --- scrubbing ---------------------------------------------------------------------------

#: Where spans are ground truth (see study/scrubbing.py); otherwise recall compares two taggers.
TRUE_SPANS = ("exact", "given")


def _scrub(run: dict) -> dict:
    return run.get("scrub") or {}


def _type_recall(label: str) -> Column:
    def entry(run: dict) -> dict:
        return _scrub(run).get("per_type", {}).get(label) or {}

    def show(run: dict) -> str:
        e = entry(run)
        return f'{escape(pct(e.get("recall"), ".0f"))} <small>{e["caught"]}/{e["spans"]}</small>' if e else "–"

    return Column(label, 1, lambda r: number(entry(r).get("recall")), show, f"{label} values removed whole")


#: What the memorisation gap on each part of the sensitive values says.
CATCH_TIPS = {
    "missed": ("memorisation gap, net of the base model's, on the sensitive tokens of values the tagger missed "
               "(wholly or in part), nats, with its 95% interval clustered by person: what scrubbing left to "
               "memorise, the figure to read"),
    "caught": ("the same on the values the tagger caught, nats. Below zero is the placeholder effect, not negative "
               "leakage: in place of a caught value the model learns the placeholder (or surrogate) in the "
               "member's context, which makes the true value less likely on members than on non-members"),
}


def _catch_gap(part: str) -> Column:
    def figures(run: dict) -> dict:
        return (_scrub(run).get("by_catch") or {}).get(part) or {}

    def show(run: dict) -> str:
        f = figures(run)
        if not f:
            return "–"  # stored before the split existed
        if f.get("memorisation_gap_net") is None:
            return f'n/a <small title="{escape(str(f.get("reason")))}">({escape(str(f.get("reason")))})</small>'
        ci = f.get("memorisation_gap_net_ci")
        interval = (f"[{ci[0]:+.3f}, {ci[1]:+.3f}] " if ci else
                    "no interval (fewer than 2 people on a side) " if "memorisation_gap_net_ci" in f else "")
        return (f'{fmt(f["memorisation_gap_net"], "+.3f")} <small>{interval}{f["tokens_train"]}/{f["tokens_test"]} '
                'tokens</small>')

    return Column(f"mem. gap (net), {part} values", -1, lambda r: number(figures(r).get("memorisation_gap_net")),
                  show, CATCH_TIPS[part])


def unscrubbed_source(run: dict, runs: Sequence[dict]) -> dict | None:
    """The finished run of the same method and seed trained on the original text (the one
    labelled like ``run`` without its scrub suffix where several qualify), or None."""
    same = [r for r in runs if is_done(r) and not r.get("scrub") and r.get("method") == run.get("method")
            and r.get("seed") == run.get("seed") and r.get("role", "run") == run.get("role", "run")]
    if len(same) > 1:
        same = [r for r in same if str(run.get("label", "")).startswith(str(r.get("label")) + "+scrub")]
    return same[0] if len(same) == 1 else None


def _missed_vs_source(runs: Sequence[dict]) -> Column:
    def figures(run: dict) -> tuple[dict | None, tuple[float, float, float] | None]:
        source = unscrubbed_source(run, runs)
        tagger = _scrub(run).get("tagger")
        return source, (missed_value_difference(run, source, tagger) if source and tagger else None)

    def show(run: dict) -> str:
        source, diff = figures(run)
        if source is None:
            return "n/a <small>(no unscrubbed run of this method)</small>"
        versus = escape(str(source.get("label")))
        if diff is None:
            return f"n/a <small>(no missed value, or runs stored without these statistics; vs {versus})</small>"
        value, low, high = diff
        return f"{value:+.3f} <small>[{low:+.3f}, {high:+.3f}] vs {versus}</small>"

    def value(run: dict) -> float:
        return (figures(run)[1] or (math.nan,))[0]

    return Column("missed values: Δ mem. gap (net) vs unscrubbed", -1, value, show,
                  "the net memorisation gap on the values the tagger missed, minus the same method's trained on the "
                  "original text, on the same tokens, with a 95% interval (paired by record, clustered by person): "
                  "above 0, scrubbing made the model memorise what it missed more; an interval across 0, no "
                  "measurable change")


def scrub_section(runs: Sequence[dict]) -> str:
    """What each scrubbing run's tagger removed from its training text, and what it left:
    span recall and precision against the data's own spans, overall and per type
    (empty when no run scrubbed)."""
    colors = {id(r): s.color for r, s in zip(runs, styles(runs))}
    scrubbed = [r for r in runs if is_done(r) and _scrub(r)]
    if not scrubbed:
        return ""
    types = sorted({t for r in scrubbed for t in _scrub(r).get("per_type", {})})
    columns = (
        Column("tagger", 0, None, lambda r: escape(str(_scrub(r).get("tagger")))),
        Column("replaced by", 0, None, lambda r: escape(str(_scrub(r).get("replacement")))),
        Column("spans removed", 0, None, lambda r: fmt(_scrub(r).get("spans_removed"), ".0f"),
               "tagged spans replaced in the whole training set (canary copies and poison included)"),
        Column("recall", 1, lambda r: number(_scrub(r).get("recall")), lambda r: escape(pct(_scrub(r).get("recall"))),
               "share of true sensitive values removed whole"),
        Column("precision", 1, lambda r: number(_scrub(r).get("precision")),
               lambda r: escape(pct(_scrub(r).get("precision"))), "share of removed spans that overlap a true value"),
        _catch_gap("missed"), _catch_gap("caught"), _missed_vs_source(runs),
        *(_type_recall(t) for t in types),
    )
    truths = sorted({str(_scrub(r).get("truth")) for r in scrubbed} - set(TRUE_SPANS))
    caveat = (f" Here the data's spans were themselves labelled by the {', '.join(truths)} tagger, so these "
              "numbers compare two taggers, not a tagger with the truth." if truths else "")
    note = ("Scrubbed runs train on copies of the records (canaries and poison included) with every span their "
            "tagger found replaced; everything above is measured on the original records, so it shows whether "
            "the true values still leak. A true value counts as removed when the tagger's spans cover all of its "
            "non-space characters (a half-removed name still leaks the other half); a tagger span counts as "
            "correct when it overlaps a true value. Measured on the members and one copy of each canary, "
            "against the data's own spans (exact for the built-in corpora). The memorisation gap is split by what "
            "the tagger did to each true value (the tagger run on the non-members too, so both sides hold the same "
            "kind of value; n is member/non-member tokens): on missed values it is what scrubbing left to "
            "memorise; on caught values it falls below zero when the model learnt the placeholder in the member's "
            "context (the placeholder effect), so the pooled gap of the run table understates what was missed."
            + caveat)
    return (f'<section id="scrubbing"><h2>What scrubbing leaves behind</h2><p class="note">{escape(note)}</p>'
            f'<div class="wide">{table(scrubbed, columns, "side", [colors[id(r)] for r in scrubbed])}</div>'
            f'</section>')


# --- the page ----------------------------------------------------------------------------

CSS = """
:root { --ink:#1d2330; --muted:#667085; --line:#e4e7ec; --bg:#f7f8fa; --good:#e7f6ec; --warn:#fdf1e7; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
       color:var(--ink); background:var(--bg); }
main { max-width:1480px; margin:0 auto; padding:24px 28px 48px; }
h1 { font-size:24px; margin:0 0 6px; }
h2 { font-size:17px; margin:0 0 10px; }
.meta { display:flex; flex-wrap:wrap; gap:6px 22px; color:var(--muted); font-size:13px; margin-bottom:18px; }
.meta b { color:var(--ink); font-weight:600; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(230px,1fr)); gap:12px; margin-bottom:10px; }
.card { background:#fff; border:1px solid var(--line); border-radius:10px; padding:12px 14px; }
.card.warn { background:var(--warn); }
.card .t { font-size:12px; text-transform:uppercase; letter-spacing:.04em; color:var(--muted); }
.card .r { font-size:20px; font-weight:700; margin:2px 0; word-break:break-word; }
.card .d { font-size:13px; color:var(--muted); }
.verdict { font-size:15px; margin:6px 0 18px; }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:16px 18px; margin:16px 0; }
.row { display:flex; flex-wrap:wrap; gap:22px; align-items:flex-start; }
.row img { max-width:100%; height:auto; flex:0 0 auto; }
aside { flex:1 1 300px; min-width:280px; overflow-x:auto; }
.note { color:var(--muted); margin:0 0 10px; }
table { border-collapse:collapse; width:100%; font-variant-numeric:tabular-nums; }
th, td { padding:5px 8px; border-bottom:1px solid var(--line); text-align:right; vertical-align:top; }
th { font-size:12px; color:var(--muted); font-weight:600; vertical-align:bottom; }
table.side th { white-space:nowrap; }
table.side { font-size:13px; }
table.side td, table.side th { padding:4px 6px; }
table.side td { white-space:nowrap; }
th:first-child, td.label { text-align:left; }
td.label { font-weight:600; white-space:nowrap; }
table.side td.label span[title] { display:inline-block; max-width:10.5em; overflow:hidden; text-overflow:ellipsis; vertical-align:bottom; }
table.runs td:nth-child(2), table.runs td:last-child { text-align:left; }
table.runs tr.errorrow td { text-align:left; border-top:none; padding-top:0; padding-left:26px; }
table.runs tr:has(+ tr.errorrow) td { border-bottom:none; }
td.best { background:var(--good); font-weight:700; }
td.worst { background:var(--warn); }
h3 { font-size:15px; margin:18px 0 6px; }
table.attacks { font-size:13px; }
table.attacks td { white-space:nowrap; line-height:1.3; }
table.attacks td.best { font-weight:400; }
table.attacks th { white-space:nowrap; }
table.attacks small.tpr { color:var(--ink); opacity:.75; }
table.attacks small.confounded { color:#9b1c1c; }
tr.base td { color:var(--muted); font-style:italic; }
tr.failed td { background:#fff6f6; }
.swatch { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:7px; }
.status { font-size:12px; padding:1px 7px; border-radius:9px; background:#eef0f3; }
.status.done { background:var(--good); } .status.failed { background:#fde2e2; color:#9b1c1c; }
.status.running, .status.queued { background:#e8effd; }
.status.interrupted { background:#fff1d6; color:#8a5300; }
.error { color:#9b1c1c; font-size:13px; }
.error::before { content:"error: "; font-weight:600; }
small { color:var(--muted); }
.nowrap { white-space:nowrap; }
.wide { overflow-x:auto; }
dl.glossary { display:grid; grid-template-columns:max-content 1fr; gap:4px 14px; margin:0; font-size:13px; }
dl.glossary dt { font-weight:600; } dl.glossary dd { margin:0; color:var(--muted); }
footer { color:var(--muted); font-size:12px; text-align:center; margin-top:24px; }
"""

PAGE = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title><style>$css</style></head>
<body><main>
<h1>$title</h1>
<div class="meta">$meta</div>
<div class="cards">$cards</div>
<p class="verdict">$verdict</p>
$figures
$frontier
$audit
$scrub
$federated
$unlearn
$timing
<section id="runs"><h2>Every run</h2>
<p class="note">↑ higher is better, ↓ lower is better; the best fine-tuned run of each column is shaded.
The base model (the untouched model, in italics) is the reference the gains are measured against.</p>
<div class="wide">$table</div>$records</section>
<section id="glossary"><h2>What the numbers mean</h2><dl class="glossary">$glossary</dl></section>
<footer>written by privtune$version</footer>
</main></body></html>
""")

GLOSSARY = (
    ("CE_S, CE_N", "mean loss (nats) of the model on sensitive / non-sensitive tokens"),
    ("leakage gain ↓", "CE_S(base; train) − CE_S(model; train): how much better the model predicts the "
                       "sensitive values it was trained on than the base model did"),
    ("memorisation gap (net) ↓", "CE_S(model; test) − CE_S(model; train), minus the base model's own gap: "
                                 "what the model learnt about training records' values beyond their format"),
    ("utility CE ↓", "CE_N(model; held-out records); perplexity = exp(utility CE)"),
    ("exposure ↓", "log₂|R| − log₂ rank of a canary among all |R| secrets of its format (Carlini et al., "
                   "2019): exact (rank found by search), bounded (proven interval, sampled estimate inside) or "
                   "estimated (sampled only)"),
    ("ε ↓", "the differential-privacy budget of DP runs at the reported δ"),
    ("empirical ε ≥", "with privacy_audit on: a 95% lower bound on ε from audit canaries, for every run; at least "
                      "this much leaks, which says nothing about how much more"),
    ("MIA AUC ↓", "how well an attack separates training records from held-out ones: 0.5 = chance, 1 = "
                  "perfect; record level scores all tokens, sensitive level the sensitive ones only; n/a below "
                  "10 members or 10 non-members"),
    ("advantage ↓", "the fine-tuned model's AUC minus the base model's on the same records: the base model "
                    "never saw them, so its AUC is what the records alone give; an attack whose base AUC is far "
                    "from 0.5 is confounded and never headlined"),
    ("strongest attack", "the attack × level with the largest advantage on one half of the people, quoted on "
                         "the other half, so that choosing the best of ~10 does not inflate it"),
    ("TPR @ FPR ↓", "share of training records an attack flags while wrongly flagging only 1% (0.1%) of "
                    "held-out ones: the confident hits that matter (Carlini et al., 2022); n/a with fewer than "
                    "100 (1000) held-out records"),
    ("extraction advantage ↓", "share of training people's values the model writes out exactly, minus the "
                               "same share for held-out people (what format guessing alone gives)"),
    ("PII inference top-1 ↓", "share of values ranked first among k candidates; chance is 1/k"),
    ("backdoor ASR ↓", "share of prompts where the model emits the planted target, with and without the trigger"),
    ("seeded or secure DP", "without secure_mode a DP run draws its batches and noise from streams of the run's "
                            "seed: it repeats exactly, and its ε holds against anyone who does not know that seed, "
                            "which the run's config and database store; secure_mode draws them from the OS CSPRNG, "
                            "for models or databases others will see"),
)


def _meta_html(meta: dict) -> str:
    parts = []
    for key, value in meta.items():
        name = META_NAMES.get(key, key.replace("_", " "))
        shown = "–" if value is None or value == "" else str(value)
        parts.append(f"<span>{escape(name)}: <b>{escape(shown)}</b></span>")
    return "".join(parts)


def _cards_html(cards: Sequence[Card]) -> str:
    return "".join(f'<div class="card {c.kind}"><div class="t">{escape(c.title)}</div>'
                   f'<div class="r">{escape(c.run)}</div><div class="d">{escape(c.detail)}</div></div>'
                   for c in cards)


#: The per-record statistics' file, beside the page.
RECORDS_FILE = "records.json.gz"


def records_note(name: str | None) -> str:
    """Where the per-record statistics are: a file beside the page, never the page itself."""
    if not name:
        return ""
    return (f'<p class="note">Per-record statistics of every run (each record\'s summed token log-likelihood and '
            f'token count, overall and on its sensitive tokens, its LiRA statistic and an index of its person; the '
            f'paired intervals above come from them) are in <a href="{escape(name)}">{escape(name)}</a> beside this '
            f'page (gzipped JSON), not in it, so the page keeps its size however many records a study has.</p>')


def render_html(runs: Sequence[dict], *, title: str, meta: dict, figures_dir: Path | None = None,
                records_file: str | None = None, shown_frontiers: list | None = None) -> str:
    """The report page as a string (``figures_dir``: where to save the PNGs too;
    ``records_file``: the name of the per-record file beside it, if one was written;
    ``shown_frontiers``: the runs' :func:`~privtune.report.frontier_section.frontiers`, if
    the caller has them already)."""
    sections = []
    for name, fig_title, make in report_figures(runs):
        sections.append(figure_section(name, fig_title, make(runs), runs, figures_dir))
    version = meta.get("privtune") or meta.get("version")
    return PAGE.substitute(
        title=escape(title), css=CSS, meta=_meta_html(meta), cards=_cards_html(headline_cards(runs)),
        verdict=escape(verdict(runs)), figures="\n".join(sections),
        frontier=frontier_section(runs, shown_frontiers), audit=audit_section(runs),
        scrub=scrub_section(runs),
        federated=federated_section(runs), unlearn=unlearning_section(runs), timing=timing_section(runs),
        table=table(runs, RUN_COLUMNS), records=records_note(records_file),
        glossary="".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in GLOSSARY),
        version=f" {escape(str(version))}" if version else "")


def write_report(runs: list[dict], out_dir: Path, *, title: str, meta: dict) -> Path:
    """Write ``out_dir/report.html``, the figures as PNG under ``out_dir/figures``, the
    runs' per-record statistics in ``out_dir/records.json.gz`` (:func:`write_records`),
    which the page links to rather than embeds, and ``out_dir/frontier.json``
    (:func:`write_frontier`, from the same frontiers as the page's section).

    Raises:
        PrivtuneError: when there are no runs to report.
    """
    if not runs:
        raise PrivtuneError("there are no runs to report",
                            "run the study first (privtune run), or check --study and --output-dir")
    out_dir = Path(out_dir)
    records = write_records(runs, out_dir / RECORDS_FILE)
    if records is None:
        (out_dir / RECORDS_FILE).unlink(missing_ok=True)  # an older report's, of other runs
    shown = frontiers(runs)  # bootstrapped once, for the page and frontier.json
    write_frontier(runs, out_dir / "frontier.json", shown)
    page = render_html(runs, title=title, meta=meta, figures_dir=out_dir / "figures",
                       records_file=records.name if records else None, shown_frontiers=shown)
    return write_text_atomic(out_dir / "report.html", page)
