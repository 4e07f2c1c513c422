"""Canary exposure as the report, the CSV and the CLI show it: never a bare number.

Each canary's exposure is ``exact``, ``bounded`` (proven to lie in
``[exposure_low, exposure_high]``, the figure being the sampled estimate clamped into
it) or ``estimated`` (sampled only, no proof); see :mod:`privtune.measures.exposure`.
A mean over several canaries inherits the weakest method among them, and the mean of
their bounds, which bounds the mean. Rows stored before exposures said how they were
obtained hold the skew-normal extrapolation under ``exposure``, which overstates memorised
canaries: they are shown by their sampled figure (``exposure_empirical``), as estimated.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

METHODS = ("exact", "bounded", "estimated")


def _bits(value) -> float:
    """A stored number of bits as a float; NaN when missing or not finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return math.nan
    return float(value)


def _figure(row: dict):
    """The stored bits to show: ``exposure``, or for a row stored by an older privtune
    (no ``exposure_method``) its sampled figure, never its skew-normal extrapolation."""
    if "exposure_method" in row or "exposure_empirical" not in row:
        return row.get("exposure")
    return row["exposure_empirical"]


def _saturated(row: dict) -> bool:
    """The canary beat every sampled candidate: its sampled figure is the most that
    ``m`` candidates can show, log2(m + 1), so the exposure may be anything above it."""
    m = row.get("n_candidates")
    return isinstance(m, int) and m > 0 and _bits(_figure(row)) >= math.log2(m + 1) - 1e-9


@dataclass(frozen=True)
class ExposureFigure:
    """A mean exposure in bits, its proven bounds (NaN when estimated) and its method;
    ``at_least``: an estimate at the sample's ceiling, a floor rather than a value."""

    value: float
    low: float
    high: float
    method: str
    at_least: bool = False


def summarise(rows: list[dict]) -> ExposureFigure | None:
    """The mean exposure of ``rows`` (one per canary), None when none has a number."""
    rows = [r for r in rows if not math.isnan(_bits(_figure(r)))]
    if not rows:
        return None
    methods = [r.get("exposure_method") if r.get("exposure_method") in METHODS else "estimated" for r in rows]
    method = max(methods, key=METHODS.index)
    value = sum(_bits(_figure(r)) for r in rows) / len(rows)
    if method == "estimated":
        estimated = [r for r in rows if r.get("exposure_method") not in ("exact", "bounded")]
        return ExposureFigure(value, math.nan, math.nan, method, at_least=any(map(_saturated, estimated)))
    low = sum(_bits(r.get("exposure_low")) for r in rows) / len(rows)
    high = sum(_bits(r.get("exposure_high")) for r in rows) / len(rows)
    return ExposureFigure(value, low, high, method)


def by_repetition(run: dict) -> dict[int, ExposureFigure]:
    """:func:`summarise` over the canaries inserted r times, for every r of the run."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for row in run.get("exposure") or []:
        if isinstance(row.get("repetitions"), int):
            groups[row["repetitions"]].append(row)
    figures = {r: summarise(rows) for r, rows in sorted(groups.items())}
    return {r: f for r, f in figures.items() if f is not None}


def top(run: dict) -> tuple[int | None, ExposureFigure | None]:
    """(r, figure) of the most repeated canaries, the worst case of the run."""
    figures = by_repetition(run)
    if not figures:
        return None, None
    r = max(figures)
    return r, figures[r]


def how(figure: ExposureFigure) -> str:
    """How the figure was obtained, in words: ``exact``, ``bounded to 7.0–19.9``, ``estimated``."""
    if figure.method == "bounded":
        return f"bounded to {figure.low:.1f}–{figure.high:.1f}"
    return "estimated, at least: the canary beat every sampled secret" if figure.at_least else figure.method


def text(figure: ExposureFigure | None, compact: bool = False) -> str:
    """``12.9 (exact)``, ``8.1 [7.0–19.9] bounded``, ``≈ 2.6 (estimated)``, or for an
    estimate at the sample's ceiling ``≥ 7.0 (estimated)``, in bits.

    ``compact`` (the CLI's summary) shows a bounded figure by what is proven, ``≥ 7.0``,
    and an estimated one as ``≈ 2.6 est.`` (``≥ 7.0 est.`` at the ceiling).
    """
    if figure is None:
        return "–"
    if figure.method == "exact":
        return f"{figure.value:.1f} (exact)"
    if figure.method == "bounded":
        return f"≥ {figure.low:.1f}" if compact else f"{figure.value:.1f} [{figure.low:.1f}–{figure.high:.1f}] bounded"
    sign = "≥" if figure.at_least else "≈"
    return f"{sign} {figure.value:.1f}" + (" est." if compact else " (estimated)")
