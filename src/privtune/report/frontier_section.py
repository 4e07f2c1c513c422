"""The report's "Leakage at matched utility" section and ``frontier.json``.

The figures come from :mod:`privtune.report.frontier`; this module lays them out: one
plot per leakage measure with every family's front (points with their seed intervals),
the matched-utility table (each family's leakage at each family's best utility), and the
findings, sentences generated from that table. The same figures go to ``frontier.json``
beside the report, so a script never has to scrape the page.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from html import escape

from privtune.report.frontier import (COST, LEAKAGE, UTILITY, Frontier, Matched, SeedMean, configurations, finding,
                                      points, seed_mean)
from privtune.report.plots import EXTRA_COLORS, METHOD_COLORS, _figure, _figure_style

#: The measures findings are written for (the others are in the table and the plot).
FINDING_MEASURES = ("memorisation_gap_net", "mia_advantage", "empirical_epsilon")


def frontiers(runs: Sequence[dict], *, seed: int = 0) -> list[Frontier]:
    """A :class:`Frontier` per leakage measure that two families or more have points for."""
    pts = points(runs)
    out = []
    for measure in LEAKAGE:
        frontier = Frontier(pts, measure, seed=seed)
        if sum(bool(f) for f in frontier.fronts.values()) >= 2:
            out.append(frontier)
    return out


def findings(frontier: Frontier) -> list[str]:
    """At each family's best utility, that family against every other: one sentence each."""
    out = []
    for level in frontier.levels():
        owner = next(f for f, front in frontier.fronts.items() if front and front[0][0] == level)
        for other in sorted(f for f, front in frontier.fronts.items() if front and f != owner):
            a, b = frontier.at(owner, level), frontier.at(other, level)
            diff = frontier.difference(owner, other, level) if b.reached else None
            out.append(finding(frontier.measure, level, a, b, diff))
    return out


def _colors(families: Sequence[str]) -> dict[str, str]:
    extra = iter(EXTRA_COLORS * 10)
    return {f: METHOD_COLORS.get(f) or next(extra) for f in families}


@_figure_style
def frontier_figure(shown: Sequence[Frontier]):
    """One panel per measure: each family's configurations at every epoch (faint, with
    their seed intervals; at the last epoch, the area shows the training time against the
    slowest run's) and its front (a line)."""
    families = sorted({f for fr in shown for f in fr.fronts})
    colors = _colors(families)
    slowest = max((p.values["train_seconds"] for fr in shown for g in fr.groups.values() for p in g
                   if not math.isnan(p.values["train_seconds"])), default=math.nan)
    fig, axes = _figure(4.2 * len(shown), 3.6, ncols=len(shown))
    for ax, frontier in zip(axes[0], shown):
        for (family, _, _), group in frontier.groups.items():
            u = seed_mean([p.values[UTILITY] for p in group])
            leak = seed_mean([p.values[frontier.measure] for p in group])
            if math.isnan(u.mean) or math.isnan(leak.mean):
                continue
            yerr = [[leak.mean - leak.low], [leak.high - leak.mean]] if leak.low is not None else None
            ax.errorbar(u.mean, leak.mean, yerr=yerr, fmt="none", ecolor=colors[family], alpha=0.35)
            ax.scatter(u.mean, leak.mean, s=_marker_area(group, slowest), color=colors[family], alpha=0.35)
        for family, front in sorted(frontier.fronts.items()):
            if front:
                ax.plot([q[0] for q in front], [q[1] for q in front], "-o", color=colors[family], label=family,
                        markersize=5)
        ax.set_xlabel("utility CE (nats)  ← better")
        ax.set_ylabel(LEAKAGE[frontier.measure] + "  ↓")
    axes[0][0].legend(fontsize=8)
    return fig


def _marker_area(group, slowest: float) -> float:
    """A point's marker area: by its training time (last epoch only; earlier epochs small)."""
    seconds = seed_mean([p.values["train_seconds"] for p in group]).mean
    if math.isnan(seconds) or math.isnan(slowest) or slowest <= 0:
        return 16.0
    return 16.0 + 200.0 * seconds / slowest


def _cell(m: Matched) -> str:
    if not m.reached:
        return '<span class="na">not reached</span>'
    interval = f" <small>[{m.low:.3f}, {m.high:.3f}]</small>" if m.low is not None else ""
    return f"{m.value:.3f}{interval} <small>n={m.seeds}</small>"


def _table(frontier: Frontier) -> str:
    families = sorted(f for f, front in frontier.fronts.items() if front)
    head = "<tr><th>utility CE ≤</th>" + "".join(f"<th>{escape(f)}</th>" for f in families) + "</tr>"
    rows = "".join(f"<tr><td>{level:.3f}</td>" + "".join(f"<td>{_cell(frontier.at(f, level))}</td>" for f in families)
                   + "</tr>" for level in frontier.levels())
    return (f"<h3>{escape(LEAKAGE[frontier.measure])}</h3>"
            f'<table class="side"><thead>{head}</thead><tbody>{rows}</tbody></table>')


def _mean_cell(m: SeedMean, spec: str) -> str:
    if math.isnan(m.mean):
        return "–"
    interval = f" <small>[{format(m.low, spec)}, {format(m.high, spec)}]</small>" if m.low is not None else ""
    return f"{format(m.mean, spec)}{interval} <small>n={m.n}</small>"


def seeds_table(runs: Sequence[dict]) -> str:
    """Each configuration at its last epoch, every measure and cost as its mean over seeds
    with a 95% interval and n."""
    rows = configurations(points(runs))
    if not rows:
        return ""
    measures = [(UTILITY, "utility CE", ".3f"), *((m, LEAKAGE[m].split(" (")[0], ".3f") for m in LEAKAGE),
                ("train_seconds", COST["train_seconds"], ".0f"), ("flops_estimate", COST["flops_estimate"], ".2e")]
    head = "<tr><th>family</th><th>configuration</th>" + "".join(f"<th>{escape(t)}</th>" for _, t, _ in measures)
    body = "".join(f"<tr><td>{escape(family)}</td><td>{escape(config)}</td>"
                   + "".join(f"<td>{_mean_cell(figures[m], spec)}</td>" for m, _, spec in measures) + "</tr>"
                   for (family, config), figures in sorted(rows.items()))
    return ("<h3>Each configuration over its seeds</h3>"
            f'<div class="wide"><table class="side"><thead>{head}</tr></thead><tbody>{body}</tbody></table></div>')


def frontier_section(runs: Sequence[dict], shown: list[Frontier] | None = None) -> str:
    """The section (empty when fewer than two method families have a front); ``shown``:
    :func:`frontiers` of ``runs``, when the caller has them already."""
    shown = frontiers(runs) if shown is None else shown
    if not shown:
        return ""
    from privtune.report.html import render_png  # html imports this module

    seeds = max((len(v) for fr in shown for v in fr.seeds_of.values()), default=0)
    single = ("<b>One seed per configuration: no figure below has an interval, and no difference is called "
              "significant.</b> " if seeds < 2 else "")
    png = base64.b64encode(render_png(frontier_figure(shown))).decode("ascii")
    sentences = [s for fr in shown if fr.measure in FINDING_MEASURES for s in findings(fr)]
    return ('<section id="frontier"><h2>Leakage at matched utility</h2>'
            f'<p class="note">{single}A method that leaks less because it learnt less protects nothing, so each '
            "family (a method, over all its configurations, epochs and seeds) is compared at the utility levels "
            "the families reach: its leakage is read off its Pareto front (linear between front points, never "
            "extrapolated past its best utility), with a 95% bootstrap interval over seeds.</p>"
            f'<img alt="privacy-utility fronts" src="data:image/png;base64,{png}">'
            + "".join(_table(fr) for fr in shown) + seeds_table(runs)
            + "<h3>Findings</h3><ul>" + "".join(f"<li>{escape(s)}</li>" for s in sentences) + "</ul></section>")


def _front_point(frontier: Frontier, family: str, config: str, epoch: int) -> dict:
    group = frontier.groups[(family, config, epoch)]
    figures = {}
    for name in (UTILITY, frontier.measure):
        mean = seed_mean([p.values[name] for p in group])
        figures[name] = {"mean": mean.mean, "low": mean.low, "high": mean.high, "seeds": mean.n}
    return {"config": config, "epoch": epoch, **figures}


def frontier_json(runs: Sequence[dict], shown: list[Frontier] | None = None) -> dict:
    """What ``frontier.json`` holds: per measure, each family's front, the matched-utility
    rows and the findings (``shown`` as in :func:`frontier_section`)."""
    out = {}
    for frontier in frontiers(runs) if shown is None else shown:
        out[frontier.measure] = {
            "fronts": {f: [_front_point(frontier, f, config, epoch) for _, _, config, epoch in front]
                       for f, front in frontier.fronts.items()},
            "matched": [{"level": level, "family": f, "value": m.value, "low": m.low, "high": m.high,
                         "seeds": m.seeds}
                        for level in frontier.levels() for f in sorted(frontier.fronts)
                        for m in [frontier.at(f, level)]],
            "findings": findings(frontier),
        }
    return out
