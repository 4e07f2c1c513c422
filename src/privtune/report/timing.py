"""The report's "Where the time went" section: each run's stages, CPU time and load.

One table across runs: each run's wall time, the CPU time its process used, the load
the machine was under, and the seconds of each stage (training, the measures after
each epoch, each attack, the canaries, ...; timed exclusively, so a row's stages add up
to its wall time, see :mod:`privtune.study.stages`).

Wall times of one study are only comparable when its runs shared the machine alike.
Load is the 1-minute load average per usable CPU, averaged over the run; it counts the
run's own threads, the same in every run of a study, so a difference between runs comes
from other work on the machine. A CPU-bound run on C CPUs sharing them with L other busy
threads gets about C / (C + L) of them, so it runs about 1 + L / C times slower: a
difference of ``LOAD_SPREAD`` = 0.25 in load per CPU is a difference of about 25% in
wall time, larger than the differences a study compares (a DP run against its
non-private twin, at 1.1 to 1.3x). Runs further than that from the study's median load
are flagged; their CPU seconds, which other work hardly changes, are the figure to
compare.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from html import escape

from privtune.report.plots import duration, is_base, is_done, styles

#: Load per CPU (1-minute load average / usable CPUs) further than this from the study's
#: median flags a run's timings as taken under other conditions (see the module docstring).
LOAD_SPREAD = 0.25


def _timing(run: dict) -> dict:
    return run.get("timing") or {}


def load_per_cpu(run: dict) -> float:
    """The run's mean 1-minute load average per usable CPU; NaN when not recorded."""
    timing = _timing(run)
    load, cpus = timing.get("load_mean"), timing.get("cpus")
    return load / cpus if load is not None and cpus else math.nan


def uneven_load(runs: Sequence[dict]) -> tuple[float, list[dict]]:
    """(the median load per CPU of ``runs``, those more than :data:`LOAD_SPREAD` from it)."""
    loads = [(r, load_per_cpu(r)) for r in runs]
    known = [v for _, v in loads if not math.isnan(v)]
    if not known:
        return math.nan, []
    median = statistics.median(known)
    return median, [r for r, v in loads if not math.isnan(v) and abs(v - median) > LOAD_SPREAD]


def stage_names(runs: Sequence[dict]) -> list[str]:
    """Every stage of ``runs``, in the order they first appear in a trained run (the base
    run's come first only where no trained run has them), ``other`` last."""
    ordered = sorted(runs, key=is_base)  # stable: trained runs in their order, then the base
    names = dict.fromkeys(s["stage"] for r in ordered for s in _timing(r).get("stages", []) if s["stage"] != "other")
    return [*names, "other"]


def _secs(value) -> str:
    """Seconds, with a decimal below 10 s (a tiny study's stages take fractions of one)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.1f} s" if value < 10 else duration(value)


def timing_section(runs: Sequence[dict]) -> str:
    """The stage table of every finished run with recorded timing (empty when none has it)."""
    colors = {id(r): s.color for r, s in zip(runs, styles(runs))}
    timed = [r for r in runs if is_done(r) and _timing(r)]
    if not timed:
        return ""
    median, flagged = uneven_load(timed)
    flagged_ids = {id(r) for r in flagged}
    names = stage_names(timed)
    head = ("<tr><th>run</th><th title=\"from the start of the run to its result\">wall</th>"
            "<th title=\"CPU time of the run's process, all its threads\">CPU</th>"
            "<th title=\"CPU seconds per wall second: the CPUs the run kept busy on average\">CPUs busy</th>"
            "<th title=\"1-minute load average per usable CPU, mean over the run\">load / CPU</th>"
            + "".join(f"<th>{escape(n)}</th>" for n in names) + "</tr>")
    rows = []
    for run in timed:
        timing = _timing(run)
        wall, cpu = timing.get("wall_seconds"), timing.get("cpu_seconds")
        busy = f"{cpu / wall:.2f}" if wall and cpu is not None else "–"
        load = load_per_cpu(run)
        mark = id(run) in flagged_ids
        load_class = ' class="worst"' if mark else ""
        load_cell = "–" if math.isnan(load) else f"{load:.2f}" + (" ⚠" if mark else "")
        by_name = {s["stage"]: s for s in timing.get("stages", [])}
        cells = "".join(f"<td>{_secs(by_name[n]['seconds']) if n in by_name else '–'}</td>" for n in names)
        swatch = f'<span class="swatch" style="background:{colors[id(run)]}"></span>'
        covers = timing.get("cpu_covers", "")
        rows.append(f'<tr><td class="label">{swatch}{escape(str(run.get("label")))}</td><td>{_secs(wall)}</td>'
                    f'<td title="{escape(covers)}">{_secs(cpu)}</td><td>{busy}</td>'
                    f'<td{load_class}>{load_cell}</td>{cells}</tr>')
    note = ("Each run's wall time split into its stages, each timed on its own (the measures after every epoch "
            "are not counted in training), so a row adds up to its wall time; \"other\" is the time between "
            "stages. Load is the machine's 1-minute load average per usable CPU over the run.")
    if flagged:
        note += (f" ⚠ {', '.join(str(r.get('label')) for r in flagged)}: load per CPU more than {LOAD_SPREAD} from "
                 f"the study's median ({median:.2f}), about a {100 * LOAD_SPREAD:.0f}% difference in speed for a "
                 "CPU-bound run: their wall times are not comparable with the others'; compare CPU seconds.")
    return (f'<section id="timing"><h2>Where the time went</h2><p class="note">{escape(note)}</p>'
            f'<div class="wide"><table class="side"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
            f'</div></section>')
