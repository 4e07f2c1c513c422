"""The report's figures: leakage against utility, its path over epochs, canary exposure,
efficiency and per-record loss quantiles.

Every function takes the study's ``runs`` (the dicts of :meth:`Store.runs`) and returns a
:class:`matplotlib.figure.Figure`; the caller saves or embeds it. Runs that did not
finish, and measures that are missing or not finite (the store writes NaN as null), are
skipped rather than plotted as zeros, so a failed run never breaks a figure. A figure
with nothing to draw says so in its middle instead of showing empty axes.

One colour per *method* (fft, lora, dp-lora, ...) in every figure, so the eye can follow
a method from plot to plot; several runs of one method differ by marker. Matplotlib's
Agg backend is used, so nothing needs a display.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from privtune.report import exposure  # noqa: E402

BASE_METHOD = "base"

#: Fixed colours for the methods privtune ships: warm for plain fine-tuning (leaks
#: most), cool for the private ones, grey for the untouched base model.
METHOD_COLORS = {
    "base": "#6b6b6b", "fft": "#d1495b", "lora": "#edae49",
    "dp-fft": "#00798c", "dp-lora": "#30a14e",
}
#: Colours for methods added later, handed out in order of first appearance.
EXTRA_COLORS = ("#7b4fa0", "#8c564b", "#e377c2", "#66a61e", "#17becf", "#bcbd22")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")

UTILITY_AXIS = "utility: CE on non-sensitive test tokens (nats)  ← better"
LEAK_AXES = {
    "leakage_gain": "leakage gain over base (nats)  ↓ better",
    "memorisation_gap_net": "memorisation gap, net of base (nats)  ↓ better",
}


# --- reading runs ---------------------------------------------------------------

def number(value) -> float:
    """``value`` as a float, or NaN when missing, non-numeric or not finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    value = float(value)
    return value if math.isfinite(value) else math.nan


def measure(run: dict, key: str, section: str = "final") -> float:
    """One measure of a run (``final`` or ``efficiency``), NaN when absent."""
    return number((run.get(section) or {}).get(key))


#: What ε protects, by the ``unit`` a run's ``dp`` section (or a federated client) stores.
UNIT_NOUNS = {"individual": "person", "record": "record", "client": "client"}


def unit_noun(unit: str | None) -> str:
    """The noun for a stored DP unit; none stored means record (DP-SGD before ``dp.unit``)."""
    unit = unit or "record"
    return UNIT_NOUNS.get(unit, unit)


def is_done(run: dict) -> bool:
    return run.get("status") == "done"


def is_base(run: dict) -> bool:
    return run.get("method") == BASE_METHOD


def finished(runs: Sequence[dict]) -> list[dict]:
    """The runs that finished; only these are plotted."""
    return [r for r in runs if is_done(r)]


def exposure_by_repetition(run: dict) -> dict[int, float]:
    """Mean exposure over the canaries inserted r times, for every r of the run (the
    figures of :mod:`privtune.report.exposure`, without how they were obtained)."""
    return {r: figure.value for r, figure in exposure.by_repetition(run).items()}


def top_exposure(run: dict) -> tuple[int | None, float]:
    """(r, mean exposure) of the most repeated canaries, the worst case of the run."""
    r, figure = exposure.top(run)
    return r, figure.value if figure is not None else math.nan


def max_exposures(runs: Sequence[dict]) -> list[float]:
    """The distinct largest possible exposures (log2 of the candidate count)."""
    values = {round(number(row.get("max_exposure")), 3) for run in runs for row in run.get("exposure") or []}
    return sorted(v for v in values if not math.isnan(v))


# --- the Pareto front ------------------------------------------------------------

def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (both minimised).

    A point is dominated when another is at least as good on both axes and strictly
    better on one; identical points do not dominate each other. Points with a NaN
    coordinate are never on the front. The indices come sorted by x, then y, so
    they trace the front from left to right (y then falls).

    One sort and a sweep: after sorting by (x, y), a point is on the front exactly
    when its y is below every y seen at a smaller x, or equal to the y of an
    identical point already on the front.
    """
    order = sorted((i for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))),
                   key=lambda i: (points[i][0], points[i][1]))
    front: list[int] = []
    best_y = math.inf
    for i in order:
        x, y = points[i]
        if y < best_y:
            front.append(i)
            best_y = y
        elif front and points[front[-1]] == (x, y):
            front.append(i)  # an exact duplicate of a front point is not dominated by it
    return front


# --- styles -----------------------------------------------------------------------

@dataclass(frozen=True)
class Style:
    color: str
    marker: str


def styles(runs: Sequence[dict]) -> list[Style]:
    """The colour (by method) and marker (by run within its method) of each run."""
    colors = dict(METHOD_COLORS)
    extra = iter(EXTRA_COLORS * 10)
    seen: dict[str, int] = defaultdict(int)
    out = []
    for run in runs:
        method = str(run.get("method"))
        if method not in colors:
            colors[method] = next(extra)
        out.append(Style(colors[method], MARKERS[seen[method] % len(MARKERS)]))
        seen[method] += 1
    return out


def _styled(runs: Sequence[dict]) -> list[tuple[dict, Style]]:
    """Finished runs with their styles, styles assigned over *all* runs so that they
    match between figures whichever runs a figure leaves out."""
    return [(r, s) for r, s in zip(runs, styles(runs)) if is_done(r)]


# --- helpers for drawing ---------------------------------------------------------

def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **kw):
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), layout="constrained", squeeze=False, **kw)
    for ax in axes.flat:
        ax.grid(True, color="#e6e6e6", linewidth=0.8)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig, axes


def _empty(fig: Figure, message: str = "no finished runs to plot") -> Figure:
    for ax in fig.axes:
        ax.set_axis_off()
    fig.text(0.5, 0.5, message, ha="center", va="center", fontsize=12, color="#888888")
    return fig


def _spread_labels(ax, labels: list, iterations: int = 80) -> None:
    """Push overlapping point labels apart vertically (a small stand-in for adjustText).

    The labels are annotations placed in offset points from their point, so moving
    one means changing its offset; that stays right when the layout engine later
    resizes the axes.
    """
    if len(labels) < 2:
        return
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    points_per_pixel = 72.0 / fig.dpi
    for _ in range(iterations):
        boxes = [t.get_window_extent(renderer) for t in labels]
        clash = next(((i, j) for i in range(len(labels)) for j in range(i + 1, len(labels))
                      if boxes[i].overlaps(boxes[j])), None)
        if clash is None:
            return
        i, j = clash
        lo, hi = (i, j) if (boxes[i].y0, i) <= (boxes[j].y0, j) else (j, i)
        shift = ((boxes[lo].y1 - boxes[hi].y0) / 2 + 1) * points_per_pixel
        for k, sign in ((lo, -1), (hi, +1)):
            dx, dy = labels[k].xyann
            labels[k].xyann = (dx, dy + sign * shift)


def _label_points(ax, points: list[tuple[float, float, str, str]], side: str = "right") -> None:
    """Write each label beside its point (``side`` "right" or "left"), in its colour,
    on a faint white box so that it stays readable over lines, without overlaps; a
    thin leader line joins a label that had to move to its point."""
    dx = 8 if side == "right" else -8
    labels = [ax.annotate(label, (x, y), xytext=(dx, 0), textcoords="offset points", va="center",
                          ha="left" if side == "right" else "right", fontsize=9.5, color=color,
                          fontweight="bold", annotation_clip=False, zorder=6,
                          bbox=dict(boxstyle="round,pad=0.12", facecolor="white", edgecolor="none", alpha=0.85),
                          arrowprops=dict(arrowstyle="-", color=color, lw=0.6, alpha=0.7, shrinkA=0, shrinkB=5))
              for x, y, label, color in points]
    _spread_labels(ax, labels)
    for label in labels:
        if abs(label.xyann[1]) < 6 and label.arrow_patch is not None:
            label.arrow_patch.set_visible(False)


def _pad(ax, side: str = "right", fraction: float = 0.18) -> None:
    """Widen the x range on ``side`` so the labels there stay inside the axes."""
    lo, hi = ax.get_xlim()
    if side == "right":
        ax.set_xlim(lo, hi + (hi - lo) * fraction)
    else:
        ax.set_xlim(lo - (hi - lo) * fraction, hi)


# --- the figures -------------------------------------------------------------------

#: Text sizes chosen for figures shown at about 80 px per inch on the report page.
RC = {"font.size": 10.5, "axes.labelsize": 10, "axes.titlesize": 11.5, "xtick.labelsize": 9.5,
      "ytick.labelsize": 9.5, "legend.fontsize": 9, "figure.titlesize": 12.5}


def _figure_style(make: Callable[[Sequence[dict]], Figure]) -> Callable[[Sequence[dict]], Figure]:
    """Build the figure under the report's text sizes without touching global rcParams."""
    @functools.wraps(make)
    def wrapped(runs: Sequence[dict]) -> Figure:
        with plt.rc_context(RC):
            return make(runs)
    return wrapped


@_figure_style
def leakage_utility(runs: Sequence[dict]) -> Figure:
    """Leakage against utility of each run's final model, with the Pareto front.

    Two panels share the utility axis: leakage as gain over the base model, and as
    the memorisation gap net of the base model's own gap. The front (low leakage and
    low utility CE) is over the fine-tuned runs; the base model is a reference cross.
    """
    fig, axes = _figure(10, 4.4, ncols=2)
    styled = _styled(runs)
    if not any(not math.isnan(measure(r, "utility_ce")) for r, _ in styled):
        return _empty(fig)
    for ax, key in zip(axes.flat, LEAK_AXES):
        points, labels = [], []
        for run, style in styled:
            x, y = measure(run, "utility_ce"), measure(run, key)
            if math.isnan(x) or math.isnan(y):
                continue
            if is_base(run):
                ax.scatter([x], [y], marker="X", s=110, color=style.color, zorder=4, label="base model")
                ax.axvline(x, color=style.color, linestyle=":", linewidth=1)
                ax.axhline(y, color=style.color, linestyle=":", linewidth=1)
            else:
                ax.scatter([x], [y], marker=style.marker, s=70, color=style.color, edgecolor="white",
                           linewidth=0.8, zorder=4)
                points.append((x, y))
            labels.append((x, y, str(run.get("label")), style.color))
        front = pareto_front(points)
        if front:
            xs = [points[i][0] for i in front]
            ys = [points[i][1] for i in front]
            ax.step(xs, ys, where="post", color="#333333", linewidth=1.4, linestyle="--", zorder=3,
                    label="Pareto front")
        ax.set_xlabel(UTILITY_AXIS)
        ax.set_ylabel(LEAK_AXES[key])
        _pad(ax, "right")
        ax.margins(y=0.12)
        _label_points(ax, labels, "right")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", frameon=False)
    fig.suptitle("Leakage vs utility (final models): lower-left is better")
    return fig


@_figure_style
def leakage_utility_epochs(runs: Sequence[dict]) -> Figure:
    """Each run's path through the leakage/utility plane, epoch 0 (before training)
    to the last epoch, an arrow on the last step."""
    fig, axes = _figure(10, 4.4, ncols=2)
    styled = [(r, s) for r, s in _styled(runs) if len(r.get("epochs") or []) > 1]
    if not styled:
        return _empty(fig, "no run with more than one epoch to plot")
    for ax, key in zip(axes.flat, LEAK_AXES):
        ends = []
        for run, style in styled:
            path = [(number(e.get("utility_ce")), number(e.get(key))) for e in sorted(
                run["epochs"], key=lambda e: e.get("epoch", 0))]
            path = [p for p in path if not (math.isnan(p[0]) or math.isnan(p[1]))]
            if len(path) < 2:
                continue
            xs, ys = zip(*path)
            # The whole path (so the axes include its end); markers on all but the last
            # epoch, where the arrow head sits.
            ax.plot(xs, ys, marker=style.marker, markersize=4, markevery=list(range(len(xs) - 1)),
                    color=style.color, linewidth=1.5, alpha=0.9, label=str(run.get("label")))
            ax.annotate("", xy=path[-1], xytext=path[-2],
                        arrowprops=dict(arrowstyle="-|>", color=style.color, lw=1.5, mutation_scale=14))
            ends.append((xs[-1], ys[-1], str(run.get("label")), style.color))
        start = next(((number(r["epochs"][0].get("utility_ce")), number(r["epochs"][0].get(key)))
                      for r, _ in styled), None)
        if start and not any(map(math.isnan, start)):
            marker = ax.scatter(*start, marker="X", s=90, color=METHOD_COLORS["base"], zorder=5, label="epoch 0")
            ax.legend(handles=[marker], loc="upper right", frameon=False)
        ax.set_xlabel(UTILITY_AXIS)
        ax.set_ylabel(LEAK_AXES[key])
        _pad(ax, "left")  # paths run right to left (training lowers the CE): labels lead them
        ax.margins(y=0.12)
        _label_points(ax, ends, "left")
    fig.suptitle("Over training: epoch 0 → last epoch (arrow); markers are epochs")
    return fig


def _rep_position(r: int) -> float:
    """x position on a log2 axis; r = 0 (never inserted) sits one step left of r = 1."""
    return math.log2(r) if r > 0 else -1.0


@_figure_style
def exposure_curves(runs: Sequence[dict]) -> Figure:
    """Mean canary exposure against how often the canary was inserted, one line per run."""
    fig, axes = _figure(7.2, 4.6)
    ax = axes[0, 0]
    styled = [(r, s) for r, s in _styled(runs) if exposure_by_repetition(r)]
    if not styled:
        return _empty(fig, "no canary exposure measured")
    reps = sorted({r for run, _ in styled for r in exposure_by_repetition(run)})
    for run, style in styled:
        by_rep = exposure_by_repetition(run)
        ax.plot([_rep_position(r) for r in by_rep], list(by_rep.values()), marker=style.marker, color=style.color,
                linewidth=2 if not is_base(run) else 1.2, linestyle="-" if not is_base(run) else ":",
                label=str(run.get("label")))
        for r, figure in exposure.by_repetition(run).items():  # what is not exact is drawn hollow
            if figure.method == "exact":
                continue
            ax.plot([_rep_position(r)], [figure.value], marker=style.marker, color=style.color,
                    markerfacecolor="white", linestyle="none")
            if figure.method == "bounded":
                ax.vlines(_rep_position(r), figure.low, figure.high, color=style.color, alpha=0.35, linewidth=1)
    for value in max_exposures(runs):
        ax.axhline(value, color="#333333", linestyle="--", linewidth=1)
        ax.annotate(f"max possible = log₂|R| = {value:.1f} bits", (0.01, value), xycoords=("axes fraction", "data"),
                    xytext=(0, 3), textcoords="offset points", fontsize=9, color="#333333")
    ax.set_xticks([_rep_position(r) for r in reps], ["never" if r == 0 else str(r) for r in reps])
    ax.set_xlabel("times the canary was inserted in the training data (log₂ scale)")
    ax.set_ylabel("exposure (bits)  ↓ better")
    ax.set_ylim(bottom=0)
    ax.margins(y=0.12)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title("Canary exposure (Carlini et al., 2019)")
    return fig


def duration(seconds: float) -> str:
    """Seconds as a person reads them: 42 s, 5.2 min, 3.1 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _human(value: float, unit: str = "") -> str:
    for size, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g} {suffix}{unit}".rstrip()
    return f"{value:.3g} {unit}".rstrip()


#: (efficiency key, panel title, log scale, value format, axis format)
EFFICIENCY_PANELS: tuple[tuple[str, str, bool, Callable[[float], str], Callable[[float], str]], ...] = (
    ("train_seconds", "train time  ↓", False, duration, lambda v: duration(v) if v else "0"),
    ("peak_memory_bytes", "peak memory  ↓", False, lambda v: _human(v, "B"), lambda v: _human(v, "B")),
    ("trainable_params", "trainable params (log)  ↓", True, _human, _human),
    ("tokens_per_second", "tokens/s  ↑", False, lambda v: f"{v:,.0f}", _human),
)


def _time_axis(ax, top_seconds: float) -> None:
    """Ticks at round numbers of the unit the longest bar is best read in."""
    unit, name = (3600, "h") if top_seconds >= 7200 else (60, "min") if top_seconds >= 120 else (1, "s")
    ax.xaxis.set_major_locator(MaxNLocator(3, steps=[1, 2, 5, 10]) if unit == 1 else
                               _ScaledLocator(unit))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / unit:g} {name}" if v else "0"))


class _ScaledLocator(MaxNLocator):
    """MaxNLocator choosing round numbers in a larger unit (minutes, hours)."""

    def __init__(self, unit: float):
        super().__init__(3, steps=[1, 2, 5, 10])
        self.unit = unit

    def tick_values(self, vmin, vmax):
        return super().tick_values(vmin / self.unit, vmax / self.unit) * self.unit


@_figure_style
def efficiency_bars(runs: Sequence[dict]) -> Figure:
    """Small multiples of train time, peak memory, trainable parameters and throughput
    of each fine-tuned run (the base model trains nothing and is left out)."""
    styled = [(r, s) for r, s in _styled(runs) if not is_base(r) and r.get("efficiency")]
    fig, axes = _figure(10, 0.9 + 0.42 * max(len(styled), 2), ncols=len(EFFICIENCY_PANELS), sharey=True)
    if not styled:
        return _empty(fig, "no efficiency figures")
    labels = [str(r.get("label")) for r, _ in styled]
    rows = list(range(len(styled)))[::-1]  # first run on top
    for ax, (key, title, log, fmt, axis_fmt) in zip(axes.flat, EFFICIENCY_PANELS):
        values = [measure(r, key, "efficiency") for r, _ in styled]
        ok = [not math.isnan(v) and (v > 0 or not log) for v in values]
        ax.barh([y for y, good in zip(rows, ok) if good], [v for v, good in zip(values, ok) if good],
                color=[s.color for (_, s), good in zip(styled, ok) if good], height=0.65)
        if log:
            ax.set_xscale("log")
        top = max((v for v, good in zip(values, ok) if good), default=1.0)
        for y, v, good in zip(rows, values, ok):
            text = fmt(v) if good else "n/a"
            ax.text(v if good else (1 if log else 0), y, " " + text, va="center", fontsize=9, color="#333333")
        ax.set_xlim(right=top * (8 if log else 1.45))
        if not log:
            ax.set_xlim(left=0)
        if key == "train_seconds":
            _time_axis(ax, top)
        else:
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _, f=axis_fmt: f(v)))
            if not log:
                ax.xaxis.set_major_locator(MaxNLocator(3))
        ax.set_title(title, fontsize=10.5)
        ax.grid(True, axis="x", color="#e6e6e6")
        ax.grid(False, axis="y")
    axes[0, 0].set_yticks(rows, labels)
    for tick, (_, style) in zip(axes[0, 0].get_yticklabels(), styled):
        tick.set_color(style.color)
        tick.set_fontweight("bold")
    fig.suptitle("Efficiency")
    return fig


@_figure_style
def loss_quantiles(runs: Sequence[dict]) -> Figure:
    """Per-record sensitive-token loss of each final model: p10–p90 bar, median dot,
    training records (members) beside held-out ones (non-members)."""
    styled = [(r, s) for r, s in _styled(runs)
              if not math.isnan(measure(r, "ce_s_train_record_p50"))]
    fig, axes = _figure(max(6.0, 1.1 * len(styled) + 2.5), 4.4)
    ax = axes[0, 0]
    if not styled:
        return _empty(fig, "no per-record quantiles measured")
    for x, (run, style) in enumerate(styled):
        for split, dx, fill in (("train", -0.14, style.color), ("test", 0.14, "white")):
            lo, mid, hi = (measure(run, f"ce_s_{split}_record_p{q}") for q in (10, 50, 90))
            if math.isnan(mid):
                continue
            if not (math.isnan(lo) or math.isnan(hi)):
                ax.plot([x + dx, x + dx], [lo, hi], color=style.color, linewidth=3 if split == "train" else 1.8,
                        solid_capstyle="butt")
            ax.scatter([x + dx], [mid], s=55, marker="o", facecolor=fill, edgecolor=style.color, linewidth=1.8,
                       zorder=4)
    crowded = len(styled) > 6
    ax.set_xticks(range(len(styled)), [str(r.get("label")) for r, _ in styled],
                  rotation=25 if crowded else 0, ha="right" if crowded else "center")
    for tick, (_, style) in zip(ax.get_xticklabels(), styled):
        tick.set_color(style.color)
        tick.set_fontweight("bold")
    ax.set_ylabel("per-record mean loss on sensitive tokens (nats)")
    ax.scatter([], [], s=55, color="#555555", label="train records (members): median, p10–p90")
    ax.scatter([], [], s=55, facecolor="white", edgecolor="#555555", linewidth=1.8,
               label="held-out records: median, p10–p90")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 if not crowded else -0.2), ncols=2,
              frameon=False)
    ax.set_ylim(bottom=0)
    ax.set_title("Sensitive-token loss per record: a train bar far below its test bar = memorised",
                 fontsize=11)
    ax.set_xlim(-0.6, len(styled) - 0.4)
    return fig


#: Every figure of the report, in the order shown: (name, title, function).
FIGURES: tuple[tuple[str, str, Callable[[Sequence[dict]], Figure]], ...] = (
    ("leakage_utility", "Leakage vs utility", leakage_utility),
    ("leakage_utility_epochs", "Leakage vs utility over training", leakage_utility_epochs),
    ("exposure", "Canary exposure", exposure_curves),
    ("efficiency", "Efficiency", efficiency_bars),
    ("loss_quantiles", "Per-record sensitive-token loss", loss_quantiles),
)
