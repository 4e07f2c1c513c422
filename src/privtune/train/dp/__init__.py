"""DP-SGD: per-record (or per-person) clipping engines, noise, Poisson sampling, accounting.

The training loop uses only the names exported here. Importing this package imports
every engine module, which registers the engine in :data:`DP_ENGINES`.
"""

from privtune.train.dp import opacus_engine  # noqa: F401  (registers "opacus")
from privtune.train.dp import ghost_engine  # noqa: F401  (registers "privtune")
from privtune.train.dp.accountant import (
    ACCOUNTANTS,
    MAX_NOISE_MULTIPLIER,
    PrivacyLedger,
    check_dp_settings,
    epsilon_for,
    make_accountant,
    noise_for_target_epsilon,
)
from privtune.train.dp.engine import DP_ENGINES, PerSampleClipper, clip_factors, make_clipper, register_engine
from privtune.train.dp.ghost_engine import GhostClipper
from privtune.train.dp.opacus_engine import OpacusClipper
from privtune.train.dp.sampling import (
    NoiseSource,
    SecureNoise,
    TorchNoise,
    make_noise_generator,
    physical_chunks,
    poisson_batches,
)
from privtune.train.dp.units import UNITS, PrivacyUnits, resolve_unit

__all__ = [
    "ACCOUNTANTS", "DP_ENGINES", "GhostClipper", "MAX_NOISE_MULTIPLIER", "NoiseSource", "OpacusClipper",
    "PerSampleClipper", "PrivacyLedger", "PrivacyUnits", "UNITS", "SecureNoise", "TorchNoise", "check_dp_settings",
    "clip_factors", "epsilon_for", "make_accountant", "make_clipper", "make_noise_generator",
    "noise_for_target_epsilon", "physical_chunks", "poisson_batches", "register_engine", "resolve_unit",
]
