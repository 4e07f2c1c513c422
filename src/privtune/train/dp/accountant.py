"""(epsilon, delta) of Poisson-subsampled Gaussian DP-SGD, via Opacus's accountants.

The analysis is Opacus's, not ours: ``prv`` is the privacy-random-variable accountant of
Gopi, Lee and Wutschitz (2021, https://arxiv.org/abs/2106.02848), numerically tight and
the default; ``rdp`` is Renyi-DP (Mironov 2017; Mironov, Talwar and Zhang 2019,
https://arxiv.org/abs/1908.10530), looser but classic and cheap. Both assume exactly
what the loop does: every step Poisson-samples with rate q (empty batches included) and
adds N(0, sigma^2 C^2) to the sum of per-record gradients clipped to C.

This module adds the things a study needs around them: the noise for a target epsilon,
epsilon for a given noise, a running :class:`PrivacyLedger` that does not depend on the
clipping engine, and one check that turns impossible settings into a
:class:`PrivtuneError` saying what to change.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

from privtune.errors import PrivtuneError

ACCOUNTANTS = ("prv", "rdp")

# Above this noise multiplier the model learns nothing useful; treat the target as unreachable.
MAX_NOISE_MULTIPLIER = 50.0
# The noise search stops within this fraction below the target epsilon.
_RELATIVE_EPSILON_TOLERANCE = 0.005


def make_accountant(name: str) -> IAccountant:
    """A fresh Opacus accountant called ``name`` (``prv`` or ``rdp``)."""
    if name not in ACCOUNTANTS:
        raise PrivtuneError(f"unknown accountant {name!r}", f"use one of: {', '.join(ACCOUNTANTS)}")
    return create_accountant(mechanism=name)


def _epsilon_of(accountant: IAccountant, delta: float) -> float:
    # PRV evaluates log(0) in a branch np.where then discards: silence that numpy noise.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return float(accountant.get_epsilon(delta=delta))


def epsilon_for(noise_multiplier: float, delta: float, sample_rate: float, steps: int,
                accountant: str = "prv") -> float:
    """Epsilon after ``steps`` steps of rate ``sample_rate`` and noise ``noise_multiplier``.

    ``inf`` without noise, 0 before any step.
    """
    acc = make_accountant(accountant)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return _epsilon_of(acc, delta)


def _unreachable(target_epsilon: float, sample_rate: float, steps: int) -> PrivtuneError:
    return PrivtuneError(
        f"target epsilon {target_epsilon:g} is unreachable with {steps} steps at sample rate "
        f"{sample_rate:.4g} (it would need a noise multiplier above {MAX_NOISE_MULTIPLIER:g})",
        "raise dp.target_epsilon, or lower the sample rate (a smaller batch_size) or the "
        "number of steps (fewer epochs)")


def noise_for_target_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                             accountant: str = "prv") -> float:
    """The smallest noise multiplier (to 0.5% of epsilon) that keeps epsilon <= target.

    Raises:
        PrivtuneError: the settings are invalid, or the target needs absurd noise.
    """
    _raise_all(_setting_problems(delta=delta, sample_rate=sample_rate, target_epsilon=target_epsilon,
                                 steps=steps, accountant=accountant))
    make_accountant(accountant)
    try:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"), warnings.catch_warnings():
            # The search tries large noise where RDP's best order is the largest one; harmless.
            warnings.filterwarnings("ignore", message="Optimal order is the")
            sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                         sample_rate=sample_rate, steps=steps, accountant=accountant,
                                         epsilon_tolerance=_RELATIVE_EPSILON_TOLERANCE * target_epsilon)
    except (ValueError, OverflowError):
        raise _unreachable(target_epsilon, sample_rate, steps) from None
    if not sigma <= MAX_NOISE_MULTIPLIER:
        raise _unreachable(target_epsilon, sample_rate, steps)
    return float(sigma)


def _setting_problems(*, n_records: int | None = None, delta: float | None = None,
                      sample_rate: float | None = None, max_grad_norm: float | None = None,
                      target_epsilon: float | None = None, noise_multiplier: float | None = None,
                      steps: int | None = None, accountant: str | None = None,
                      unit: str = "record") -> list[tuple[str, str]]:
    """(problem, fix) for every setting that is wrong on its own or against another.

    ``n_records`` counts the privacy units: records, or people when ``unit`` is
    ``individual`` (delta must then be below 1 / people).
    """
    out: list[tuple[str, str]] = []
    if accountant is not None and accountant not in ACCOUNTANTS:
        out.append((f"unknown accountant {accountant!r}", f"use one of: {', '.join(ACCOUNTANTS)}"))
    if n_records is not None and n_records < 1:
        out.append(("DP training needs at least one training record", "add training data"))
    if sample_rate is not None and not 0 < sample_rate <= 1:
        out.append((f"sample rate must be in (0, 1], got {sample_rate}",
                    "use a batch size between 1 and the number of training records"))
    if delta is not None:
        if not 0 < delta < 1:
            out.append((f"delta must be in (0, 1), got {delta}", "use a small delta such as 1/(10N)"))
        elif n_records is not None and n_records >= 1 and delta >= 1 / n_records:
            units = "people" if unit == "individual" else "records"
            out.append((f"delta {delta:g} must be below 1/N = {1 / n_records:.3g} "
                        f"(N = {n_records} training {units})",
                        f"use delta <= {1 / (10 * n_records):.3g}, i.e. 1/(10N), or leave it unset"))
    if max_grad_norm is not None and not max_grad_norm > 0:
        out.append((f"max_grad_norm must be positive, got {max_grad_norm}",
                    "set dp.max_grad_norm above 0 (1.0 is usual)"))
    if target_epsilon is not None and not target_epsilon > 0:
        out.append((f"target epsilon must be positive, got {target_epsilon}",
                    "set dp.target_epsilon above 0 (1 to 8 is usual)"))
    if noise_multiplier is not None and not noise_multiplier >= 0:
        out.append((f"noise multiplier must be >= 0, got {noise_multiplier}",
                    "set dp.noise_multiplier to 0 or more"))
    if steps is not None and steps < 1:
        out.append((f"DP training needs at least one step, got {steps}", "train for at least one epoch"))
    return out


def _raise_all(problems: list[tuple[str, str]]) -> None:
    if len(problems) == 1:
        raise PrivtuneError(*problems[0])
    if problems:
        raise PrivtuneError("the DP settings have several problems: "
                            + "; ".join(f"{p} ({f})" for p, f in problems),
                            "fix each as said")


def check_dp_settings(*, n_records: int, delta: float, sample_rate: float, max_grad_norm: float,
                      target_epsilon: float | None = None, noise_multiplier: float | None = None,
                      steps: int | None = None, accountant: str = "prv", unit: str = "record") -> None:
    """Raise one :class:`PrivtuneError` listing every impossible DP setting.

    With ``target_epsilon`` and ``steps`` both given it also checks that the target is
    reachable with at most :data:`MAX_NOISE_MULTIPLIER` of noise (this runs the noise
    search, about a second with PRV).
    """
    problems = _setting_problems(n_records=n_records, delta=delta, sample_rate=sample_rate,
                                 max_grad_norm=max_grad_norm, target_epsilon=target_epsilon,
                                 noise_multiplier=noise_multiplier, steps=steps, accountant=accountant, unit=unit)
    _raise_all(problems)
    if target_epsilon is not None and steps is not None:
        noise_for_target_epsilon(target_epsilon, delta, sample_rate, steps, accountant)


class PrivacyLedger:
    """The running privacy spend of one training run, engine-independent.

    The loop calls :meth:`step` once per logical step (empty Poisson batches included)
    and :meth:`epsilon` whenever it reports.
    """

    def __init__(self, accountant: str = "prv"):
        self.accountant_name = accountant
        self._accountant = make_accountant(accountant)
        self.steps = 0

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        self._accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        self.steps += 1

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """(noise multiplier, sample rate, steps) segments, as Opacus keeps them."""
        return list(self._accountant.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``: 0 before any step, ``inf`` if a step had no noise."""
        if self.steps == 0:
            return 0.0
        if any(sigma == 0 for sigma, _, _ in self._accountant.history):
            return math.inf
        return _epsilon_of(self._accountant, delta)
