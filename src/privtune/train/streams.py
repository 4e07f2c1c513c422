"""Independent random streams for training, one per purpose, all derived from the run's seed.

DP-SGD's guarantee assumes that which records a step samples and the noise it adds are
independent draws. Seeding two generators of the same algorithm with the same seed makes
them the *same* stream: the noise of a step is then a function of the uniforms that chose
its batch, and the released gradient gives the batch away (issue 14). So every purpose
gets its own stream, spawned from the run's seed with NumPy's ``SeedSequence`` (a
hash-based derivation designed for exactly this; O'Neill's seed_seq, NumPy NEP 19):
``SeedSequence(seed, spawn_key=(purpose, ...))``. Reruns with the same seed draw the
same values; no stream says anything about another unless its seed is known.

The streams (each a name, hashed into the spawn key, so adding one never moves another):

- ``batches``: which records a step trains on (shuffles, Poisson sampling, unlearning's
  forget and retain order);
- ``dp-noise``: DP-SGD's Gaussian noise (``dp.make_noise_generator``);
- ``init``: the global torch RNG while a method prepares the model (adapter weights);
- ``dropout``: the global torch RNG during training (dropout masks);
- ``fed-clients``: which clients join a federated round;
- ``fed-noise``: DP-FedAvg's server noise;
- ``fed-client-training``: the seed each client's local training derives its own streams from;
- ``audit-canaries``: which audit canaries are trained on (:mod:`privtune.auditing`).

A seed protects nothing from whoever knows it, and privtune's seeds are small integers
stored in the run's config: under ``secure_mode`` the DP draws come from the OS CSPRNG
instead (:class:`privtune.train.dp.SecureNoise`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

BATCHES = "batches"
DP_NOISE = "dp-noise"
INIT = "init"
DROPOUT = "dropout"
FED_CLIENTS = "fed-clients"
FED_NOISE = "fed-noise"
FED_CLIENT_TRAINING = "fed-client-training"
AUDIT_CANARIES = "audit-canaries"
PURPOSES = (BATCHES, DP_NOISE, INIT, DROPOUT, FED_CLIENTS, FED_NOISE, FED_CLIENT_TRAINING, AUDIT_CANARIES)


def _spawn_key(purpose: str, index: tuple[int, ...]) -> tuple[int, ...]:
    if purpose not in PURPOSES:
        raise ValueError(f"unknown random stream {purpose!r}; known: {', '.join(PURPOSES)}")
    if any(i < 0 for i in index):
        raise ValueError(f"stream indices must be >= 0, got {index}")
    name = int.from_bytes(hashlib.blake2b(purpose.encode(), digest_size=8).digest(), "little")
    return (name, *index)


def stream_seed(seed: int, purpose: str, *index: int) -> int:
    """A 64-bit seed for ``purpose``'s stream of the run seeded ``seed`` (``index``: a
    sub-stream, e.g. round and client); any int ``seed``, negative ones included."""
    entropy = 2 * seed if seed >= 0 else -2 * seed - 1  # zigzag: SeedSequence wants a non-negative int
    sequence = np.random.SeedSequence(entropy, spawn_key=_spawn_key(purpose, index))
    return int(sequence.generate_state(1, np.uint64)[0])


def torch_generator(seed: int, purpose: str, device: torch.device | str | None = None) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` (CPU by default) seeded with ``purpose``'s stream."""
    generator = torch.Generator(device=torch.device(device) if device is not None else "cpu")
    return generator.manual_seed(stream_seed(seed, purpose))


def seed_global(seed: int, purpose: str) -> None:
    """Seed torch's global RNGs (CPU and every GPU) with ``purpose``'s stream."""
    torch.manual_seed(stream_seed(seed, purpose))


@contextmanager
def global_stream(seed: int, purpose: str, device: torch.device) -> Iterator[None]:
    """Draw torch's global RNG from ``purpose``'s stream inside, and restore the caller's after.

    For draws no generator argument reaches (dropout inside the model's forward).
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        seed_global(seed, purpose)
        yield
