"""The strongest membership attack on a run: the one figure the CLI summary, the report's
headline card and tables and the CSV all quote, chosen here and nowhere else.

Choosing the largest of ~10 attack × level variants and quoting it on the same records
is biased upward (the winner's curse). Each entry therefore carries its figures on two
fixed halves of the individuals (:func:`privtune.attacks.metrics.selection_half`): the
attack is chosen by its advantage over the base model on the *selection* half and
reported, AUC and advantage with their intervals, on the *report* half, which played
no part in the choice. Attacks flagged ``confounded`` (the base model already separates
the records) are never chosen, and nothing is quoted when the report half has too few
records; each such case is a :class:`Headline` with a ``reason`` instead of numbers.
The forget set of an unlearned model is ranked the same way, two-sided
(:func:`strongest_of`), since unlearning can push its records far below the baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from privtune.report.attack_plots import attack_name, mia_entries
from privtune.report.plots import is_base, is_done, number


@dataclass(frozen=True)
class Headline:
    """A run's strongest attack and its figures on the report half, or why there is none."""

    attack: str | None = None
    level: str | None = None
    #: auc, auc_ci, base_auc, base_auc_ci, advantage, advantage_ci, n_members, n_nonmembers
    figures: dict = field(default_factory=dict)
    select_advantage: float = math.nan
    variants: int = 0
    reason: str | None = None
    #: +1: members score higher than under the base model; -1: lower (chosen two-sided only).
    direction: int = 1

    @property
    def name(self) -> str:
        return f"{attack_name(self.attack)} ({self.level})" if self.attack else "n/a"

    def number(self, key: str) -> float:
        return number(self.figures.get(key))


def short_reason(reason: str) -> str:
    """A few words of a headline's reason, for a table cell (the full one is its tooltip)."""
    if "needs ≥" in reason:
        return "needs ≥ " + reason.split("needs ≥ ")[1].split(" members")[0] + " per group in each half"
    if reason.startswith("every attack is confounded"):
        return "every attack confounded"
    return reason.split(":")[0]


def _not_chosen(reason: str, variants: int) -> Headline:
    return Headline(reason=reason, variants=variants)


def strongest_attack(run: dict, level: str | None = None) -> Headline | None:
    """The run's strongest attack (at ``level``, or over both); None when it has no
    membership attack at all."""
    entries = [e for e in mia_entries(run) if level in (None, e["level"])]
    if not entries:
        return None
    if is_base(run):
        return _not_chosen("the base model is the baseline the attacks are measured against", len(entries))
    return strongest_of(entries)


def _selection_advantage(entry: dict) -> float:
    return number((entry["halves"].get("select") or {}).get("advantage"))


def strongest_of(entries: Sequence[dict], *, two_sided: bool = False) -> Headline:
    """The strongest of a model's attack ``entries`` (``attacks.mia`` schema, with halves),
    chosen on the selection half and quoted on the report half.

    By default the attack whose AUC exceeds the base model's most is chosen: a fine-tuned
    model that scores its members *less* likely than the base model does leaks nothing
    new. ``two_sided`` ranks by the distance from the base model's AUC in either
    direction, for a model that was pushed away from its members on purpose (an
    unlearned model): an AUC far below the blind baseline gives the records away as
    surely as one far above it, read the other way round. The headline's ``direction``
    says which way the chosen attack reads.
    """
    variants = len(entries)
    split = [e for e in entries if isinstance(e.get("halves"), dict)]
    if not split:
        return _not_chosen("no base-model scores to compare with (the base run failed, was measured on other "
                           "data, or the run was stored by an older privtune): rerun the study", variants)
    clear = [e for e in split if e.get("confounded") is False]
    if not clear:
        confounded = [e for e in split if e.get("confounded")]
        if confounded:
            worst = max(confounded, key=lambda e: abs(number(e.get("base_auc")) - 0.5))
            return _not_chosen(f"every attack is confounded, e.g. {attack_name(worst['attack'])} "
                               f"({worst['level']}): {worst.get('confounded_reason')}", variants)
        return _not_chosen(str(split[0].get("auc_reason") or "no attack has an AUC"), variants)
    choosable = [e for e in clear if not math.isnan(_selection_advantage(e))]
    if not choosable:
        half = clear[0]["halves"].get("select") or {}
        return _not_chosen(f"the selection half {half.get('auc_reason') or 'has no advantage'}", variants)
    rank = (lambda e: abs(_selection_advantage(e))) if two_sided else _selection_advantage
    best = max(choosable, key=rank)
    report = best["halves"].get("report") or {}
    chosen = dict(attack=best["attack"], level=best["level"], variants=variants,
                  select_advantage=_selection_advantage(best), direction=-1 if _selection_advantage(best) < 0 else 1)
    if math.isnan(number(report.get("advantage"))):
        return Headline(**chosen, figures=report,
                        reason=f"the report half {report.get('auc_reason') or 'has no advantage'}")
    return Headline(**chosen, figures=report)


def strongest_overall(runs: Sequence[dict]) -> tuple[dict, Headline] | None:
    """The fine-tuned run whose strongest attack has the largest advantage on the
    selection half (the run, too, is chosen on that half), with its headline; a run
    whose headline is n/a when no run has one; None when no run was attacked."""
    found = [(r, strongest_attack(r)) for r in runs if is_done(r) and not is_base(r)]
    found = [(r, h) for r, h in found if h is not None]
    if not found:
        return None
    measured = [(r, h) for r, h in found if h.reason is None]
    if not measured:
        return found[0]
    return max(measured, key=lambda t: t[1].select_advantage)
