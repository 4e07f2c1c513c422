"""A white-box audit of the DP-SGD engines: does the ε they claim hold for their releases?

The strongest one-run audit there is (Steinke, Nasr and Jagielski 2023, §6, "white box",
with Dirac canaries as in Nasr et al. 2023, "Tight auditing of differentially private
machine learning"): every canary is a record whose gradient is a different coordinate
axis, so the canaries never interfere, and the auditor sees every step's released
(noisy, clipped, averaged) gradient. A canary's score is the sum of its coordinate over
the steps, in units of C: about ``q · T`` plus N(0, T σ²) if it was trained on, the noise
alone if not. The bound of :mod:`privtune.auditing.one_run` on those scores must stay
below the accountant's ε for a correct engine.

It runs the real code path of a private step (the engine's ``attach`` /
``accumulate_clipped`` / ``finish_step``, :func:`poisson_batches` and the noise source,
each from its own stream) on a one-layer model, ``Embedding(m, 1)`` whose loss for canary
j is ``10 C`` times its row: each record's gradient is ``10 C · e_j``, norm 10 C, so an
engine that does not clip lets ten times the signal through. No optimizer step is taken (the gradient of a linear loss does
not depend on the weights), which is why it takes seconds.

The planted faults show the audit can see a broken engine: ``skip-clipping`` passes an
infinite clipping bound to ``accumulate_clipped`` (noise still scaled to the real C), and
``quarter-noise`` adds a quarter of the noise the accountant assumed. Each must give a
lower bound above the claimed ε; a real engine must not.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from privtune.auditing.one_run import CONFIDENCE, MIN_CANARIES, empirical_epsilon
from privtune.errors import PrivtuneError
from privtune.train import dp, streams

FAULTS = ("skip-clipping", "quarter-noise")


@dataclass(frozen=True)
class MechanismSettings:
    """One DP-SGD mechanism to audit. Defaults: claimed ε ≈ 2.4 at δ = 1e-5, where both
    planted faults are caught with a margin of more than one unit of ε."""

    canaries: int = 4000
    sample_rate: float = 0.5
    steps: int = 20
    noise_multiplier: float = 4.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    canary_norm: float = 10.0  # a canary's gradient norm, in units of C
    physical_batch_size: int = 512
    confidence: float = CONFIDENCE
    seed: int = 0


    def problems(self) -> list[str]:
        """What makes these settings unauditable, each with its fix."""
        found = []
        if self.canaries < MIN_CANARIES:
            found.append(f"--canaries {self.canaries} is below {MIN_CANARIES}: use a few thousand")
        if not 0 < self.sample_rate <= 1:
            found.append(f"--sample-rate {self.sample_rate} is not in (0, 1]")
        if self.steps < 1:
            found.append(f"--steps {self.steps} must be at least 1")
        if not self.noise_multiplier > 0:
            found.append(f"--noise-multiplier {self.noise_multiplier} must be above 0 (no noise claims no ε)")
        if not 0 < self.delta < 1:
            found.append(f"--delta {self.delta} is not in (0, 1)")
        return found


@functools.lru_cache(maxsize=16)
def claimed_epsilon(settings: MechanismSettings) -> float:
    """The accountant's (PRV) ε for the mechanism, as a DP run would report it."""
    return dp.epsilon_for(settings.noise_multiplier, settings.delta, settings.sample_rate, settings.steps)


def canary_scores(engine: str, fault: str | None, settings: MechanismSettings) -> tuple[np.ndarray, np.ndarray]:
    """(scores, trained_on) for every canary, from the released gradients of ``steps`` steps."""
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
    s = settings
    membership = torch.rand(s.canaries, generator=streams.torch_generator(s.seed, streams.AUDIT_CANARIES))
    trained_on = (membership < 0.5).numpy()
    dataset = torch.nonzero(torch.from_numpy(trained_on)).flatten()  # the records: canaries trained on
    model = nn.Embedding(s.canaries, 1)
    clipper = dp.make_clipper(engine)
    module = clipper.attach(model)
    sampler = streams.torch_generator(s.seed, streams.BATCHES)
    noise = dp.make_noise_generator(s.seed, secure=False)
    clip_bound = math.inf if fault == "skip-clipping" else s.max_grad_norm
    noise_multiplier = s.noise_multiplier / 4 if fault == "quarter-noise" else s.noise_multiplier
    expected_batch = s.sample_rate * dataset.numel()
    released = torch.zeros(s.canaries, dtype=torch.float64)
    try:
        for batch in dp.poisson_batches(dataset.numel(), s.sample_rate, s.steps, sampler):
            for rows in dp.physical_chunks(batch, s.physical_batch_size):
                rows_out = module(dataset[rows]).squeeze(-1)  # (B,): each canary's own row
                clipper.accumulate_clipped(rows_out * s.canary_norm * s.max_grad_norm, clip_bound)
            clipper.finish_step(noise_multiplier, s.max_grad_norm, expected_batch, noise)
            released += model.weight.grad.double().flatten() * expected_batch / s.max_grad_norm
            model.weight.grad = None
    finally:
        clipper.detach()
    return released.numpy(), trained_on


def audit_engine(engine: str, fault: str | None = None, settings: MechanismSettings = MechanismSettings()) -> dict:
    """The claimed ε and the empirical lower bound for ``engine`` (optionally broken by ``fault``).

    ``verdict``: a real engine ``passed`` (bound ≤ claimed) or ``FAILED``; a planted
    fault was ``caught`` (bound > claimed) or ``missed`` (the audit is too weak to trust).
    """
    problems = settings.problems()
    if problems:
        raise PrivtuneError(f"cannot audit these DP settings: {'; '.join(problems)}",
                            "change the options named (privtune audit-dp --help)")
    scores, trained_on = canary_scores(engine, fault, settings)
    bound = empirical_epsilon(scores[trained_on], scores[~trained_on], delta=settings.delta,
                              confidence=settings.confidence, seed=settings.seed)
    claimed = claimed_epsilon(settings)
    exceeded = bound.lower_bound > claimed
    verdict = ("caught" if exceeded else "missed") if fault else ("FAILED" if exceeded else "passed")
    return {"engine": engine, "fault": fault, "claimed_epsilon": claimed,
            "epsilon_lower_bound": bound.lower_bound, "confidence": settings.confidence,
            "canaries": settings.canaries, "delta": settings.delta, "bound": bound.method, "verdict": verdict}


def self_test(engines: list[str], settings: MechanismSettings = MechanismSettings()) -> list[dict]:
    """Every engine as it is, then broken by each fault."""
    return [audit_engine(engine, fault, settings) for engine in engines for fault in (None, *FAULTS)]
