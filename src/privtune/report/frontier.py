"""The privacy–utility frontier of each method family, and leakage at matched utility.

A method that leaks less because it learnt less has protected nothing: the fair
comparison is leakage at the same utility. Every finished run is a point per epoch
(utility CE on the non-members' non-sensitive tokens, lower is better; and each leakage
measure, lower is better); a *configuration* is a method entry of the study (its label:
one point of a sweep), seen over its seeds; a *family* is the method (``fft``, ``lora``,
``dp-lora``...; scrubbed and federated runs are families of their own).

- **Seeds**: a configuration's figure at an epoch is the mean over its seeds, with a 95%
  Student-t interval and n (:func:`seed_mean`); one seed has no interval, and says so.
- **The front**: a family's Pareto front over its configurations and epochs, on the
  seed means (:func:`privtune.report.plots.pareto_front`).
- **Matched utility**: at a utility level, a family's leakage is read off its front:
  linear between the two front points around the level, the leakage of its best-utility
  point at or below the level when the level lies past its front (a level it has
  reached), and ``None`` below its best utility (never reached: never extrapolated).
  The interval is a bootstrap over seeds (each configuration's seeds resampled, the
  front rebuilt), and so is the difference between two families.

The measures that exist only after training (the strongest attack's advantage, canary
exposure, empirical ε) have one point per run, at its last epoch, as do its costs
(training time, FLOPs, peak memory), which the report shows beside the fronts.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

from privtune.report.headline import strongest_attack
from privtune.report.plots import is_base, is_done, number, pareto_front, top_exposure

UTILITY = "utility_ce"
#: Leakage measures on the frontier (all lower-is-better): name -> what the report calls it.
LEAKAGE = {
    "memorisation_gap_net": "net memorisation gap (nats)",
    "mia_advantage": "strongest attack's advantage (AUC − base AUC)",
    "top_exposure": "canary exposure, most repeated canaries (bits)",
    "empirical_epsilon": "empirical ε lower bound",
}
#: Measures every epoch has; the others only the last.
PER_EPOCH = {UTILITY, "memorisation_gap_net"}
BOOTSTRAP = 1000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Point:
    """One run at one epoch: its family, configuration, seed, and every measure (NaN: none)."""

    family: str
    config: str
    seed: int
    epoch: int
    values: dict


@dataclass(frozen=True)
class SeedMean:
    """A mean over seeds, its 95% interval (None with one seed) and n."""

    mean: float
    low: float | None
    high: float | None
    n: int


def family_of(run: dict) -> str:
    """A run's method family: its method, marked when scrubbed or federated."""
    method = run.get("config", {}).get("method") or {}
    return run["method"] + ("+scrub" if method.get("scrub") else "") + ("+fed" if method.get("federated") else "")


#: What each configuration costs to train (final epoch only), shown beside the fronts.
COST = {"train_seconds": "training time (s)", "flops_estimate": "training FLOPs", "peak_memory_bytes": "peak memory"}


def _final_values(run: dict) -> dict:
    headline = strongest_attack(run)
    audit = run.get("empirical_epsilon") or {}
    efficiency = run.get("efficiency") or {}
    return {"mia_advantage": headline.number("advantage") if headline is not None else math.nan,
            "top_exposure": top_exposure(run)[1], "empirical_epsilon": number(audit.get("lower_bound")),
            **{k: number(efficiency.get(k)) for k in COST}}


def points(runs: Sequence[dict]) -> list[Point]:
    """Every finished trained target run at every epoch it measured."""
    out = []
    for run in runs:
        if not is_done(run) or is_base(run) or run.get("role", "target") != "target":
            continue
        config = (run.get("config", {}).get("method") or {}).get("label") or run["label"]
        epochs = [e for e in run.get("epochs") or [] if e.get("epoch", 0) >= 1]
        last = max((e["epoch"] for e in epochs), default=None)
        for row in epochs:
            values = {k: number(row.get(k)) for k in PER_EPOCH}
            values.update(_final_values(run) if row["epoch"] == last
                          else dict.fromkeys((LEAKAGE.keys() | COST.keys()) - PER_EPOCH, math.nan))
            out.append(Point(family_of(run), config, int(run.get("seed") or 0), int(row["epoch"]), values))
    return out


def seed_mean(values: Sequence[float], confidence: float = CONFIDENCE) -> SeedMean:
    """Mean over seeds (NaNs dropped), with its Student-t interval when n ≥ 2."""
    x = np.asarray([v for v in values if not math.isnan(v)], float)
    if x.size == 0:
        return SeedMean(math.nan, None, None, 0)
    if x.size == 1:
        return SeedMean(float(x[0]), None, None, 1)
    half = student_t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return SeedMean(float(x.mean()), float(x.mean() - half), float(x.mean() + half), int(x.size))


def configurations(pts: Sequence[Point]) -> dict[tuple[str, str], dict[str, SeedMean]]:
    """Every (family, configuration) at its last epoch: each measure's mean over seeds."""
    last: dict[tuple[str, str], int] = {}
    for p in pts:
        last[(p.family, p.config)] = max(p.epoch, last.get((p.family, p.config), 0))
    names = [UTILITY, *LEAKAGE, *COST]
    return {key: {m: seed_mean([p.values[m] for p in group]) for m in names}
            for key, group in ((k, [p for p in pts if (p.family, p.config) == k and p.epoch == e])
                               for k, e in last.items())}


def _groups(pts: Sequence[Point]) -> dict[tuple[str, str, int], list[Point]]:
    """Points by (family, configuration, epoch): one per seed."""
    out: dict[tuple[str, str, int], list[Point]] = defaultdict(list)
    for p in pts:
        out[(p.family, p.config, p.epoch)].append(p)
    return dict(out)


def front(candidates: Sequence[tuple]) -> list[tuple]:
    """The Pareto front of ``(utility, leakage, ...)`` points, both lower-is-better, by utility."""
    return [candidates[i] for i in pareto_front([c[:2] for c in candidates])]


def leakage_at(front_points: Sequence[tuple], level: float) -> float | None:
    """A front's leakage at utility ``level`` (see the module docstring); None when the
    front never reaches the level."""
    if not front_points or level < front_points[0][0]:
        return None
    for (u0, l0, *_), (u1, l1, *_) in zip(front_points, front_points[1:]):
        if u0 <= level <= u1:
            return l0 if u1 == u0 else l0 + (l1 - l0) * (level - u0) / (u1 - u0)
    return front_points[-1][1]


def family_fronts(pts: Sequence[Point], measure: str, means=None) -> dict[str, list[tuple]]:
    """Each family's front for ``measure`` on the seed means (or on ``means``: (family,
    config, epoch) -> {measure: value}, as a bootstrap replicate gives them), as
    (utility, leakage, configuration, epoch) points."""
    if means is None:
        means = {key: {m: seed_mean([p.values[m] for p in group]).mean for m in (UTILITY, measure)}
                 for key, group in _groups(pts).items()}
    by_family: dict[str, list[tuple]] = defaultdict(list)
    for (family, config, epoch), values in means.items():
        by_family[family].append((values[UTILITY], values[measure], config, epoch))
    return {family: front(candidates) for family, candidates in by_family.items()}


@dataclass(frozen=True)
class Matched:
    """A family's leakage at a utility level, with its bootstrap interval over seeds."""

    family: str
    level: float
    value: float | None
    low: float | None
    high: float | None
    seeds: int

    @property
    def reached(self) -> bool:
        return self.value is not None


class Frontier:
    """One leakage measure's fronts, their bootstrap replicates over seeds, and the
    matched-utility figures read off them (replicates drawn once, shared by all)."""

    def __init__(self, pts: Sequence[Point], measure: str, *, seed: int = 0, bootstrap: int = BOOTSTRAP):
        self.measure = measure
        self.groups = _groups(pts)
        self.fronts = family_fronts(pts, measure)
        seeds: dict[tuple[str, str], set[int]] = defaultdict(set)
        for (family, config, _), group in self.groups.items():
            seeds[(family, config)].update(p.seed for p in group)
        self.seeds_of = {key: sorted(v) for key, v in seeds.items()}
        #: per family, the fewest seeds any of its configurations has
        self.seeds = {f: min(len(v) for (g, _), v in self.seeds_of.items() if g == f) for f in self.fronts}
        rng = np.random.default_rng(seed)
        several = any(len(v) >= 2 for v in self.seeds_of.values())  # one seed each: nothing to resample
        self.draws = [self._replicate(rng) for _ in range(bootstrap)] if several else []

    def _replicate(self, rng: np.random.Generator) -> dict[str, list[tuple[float, float]]]:
        """Every family's front with each configuration's seeds resampled with
        replacement (one draw for all of its epochs)."""
        draw = {key: rng.choice(seeds, size=len(seeds)) for key, seeds in self.seeds_of.items()}
        means = {}
        for (family, config, epoch), group in self.groups.items():
            by_seed = {p.seed: p for p in group}
            chosen = [by_seed[s] for s in draw[(family, config)] if s in by_seed]
            means[(family, config, epoch)] = {m: seed_mean([p.values[m] for p in chosen]).mean
                                              for m in (UTILITY, self.measure)}
        return family_fronts((), self.measure, means)

    def at(self, family: str, level: float) -> Matched:
        """``family``'s leakage at utility ``level``; an interval when each of its
        configurations has two seeds or more."""
        value = leakage_at(self.fronts.get(family, []), level)
        low = high = None
        if value is not None and self.seeds.get(family, 0) >= 2:
            low, high = _percentiles([leakage_at(d.get(family, []), level) for d in self.draws])
        return Matched(family, level, value, low, high, self.seeds.get(family, 0))

    def difference(self, a: str, b: str, level: float) -> tuple[float, float | None, float | None] | None:
        """``a``'s leakage at ``level`` minus ``b``'s, with its bootstrap interval (None
        without two seeds on both sides); None when either never reaches the level."""
        va, vb = leakage_at(self.fronts.get(a, []), level), leakage_at(self.fronts.get(b, []), level)
        if va is None or vb is None:
            return None
        if min(self.seeds.get(a, 0), self.seeds.get(b, 0)) < 2:
            return va - vb, None, None
        diffs = []
        for d in self.draws:
            la, lb = leakage_at(d.get(a, []), level), leakage_at(d.get(b, []), level)
            diffs.append(None if la is None or lb is None else la - lb)
        low, high = _percentiles(diffs)
        return va - vb, low, high

    def levels(self) -> list[float]:
        """The utility levels worth comparing at: each family's best utility, worst first."""
        return sorted({f[0][0] for f in self.fronts.values() if f}, reverse=True)


def _percentiles(samples: Sequence[float | None]) -> tuple[float | None, float | None]:
    """The central 95% of the replicates that reached the level (None when under 90% did:
    then the level is too near the family's best utility to bound)."""
    reached = np.asarray([s for s in samples if s is not None], float)
    if reached.size < 0.9 * len(samples):
        return None, None
    tail = (1 - CONFIDENCE) / 2
    return float(np.quantile(reached, tail)), float(np.quantile(reached, 1 - tail))


def finding(measure: str, level: float, a: Matched, b: Matched,
            diff: tuple[float, float | None, float | None] | None) -> str:
    """One sentence comparing two families at a utility level, from the figures alone."""
    name = LEAKAGE[measure].split(" (")[0]
    head = f"At utility CE ≤ {level:.3f}"
    for m in (a, b):
        if not m.reached:
            return f"{head}, {m.family} never reaches this utility: no comparison (never extrapolated)."

    def figure(m: Matched) -> str:
        interval = f" [{m.low:.3f}, {m.high:.3f}]" if m.low is not None else " (one seed: no interval)"
        return f"{m.value:.3f}{interval}"
    text = f"{head}, {a.family}'s {name} is {figure(a)} against {b.family}'s {figure(b)}"
    if diff is None or diff[1] is None:
        return text + "; the difference has no interval (too few seeds), so no claim is made."
    value, low, high = diff
    verdict = "significant" if not low <= 0 <= high else "not significant"
    return text + f"; the difference {value:+.3f} [{low:+.3f}, {high:+.3f}] is {verdict}."
