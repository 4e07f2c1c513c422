"""The randomness of DP-SGD: Poisson-sampled batches and Gaussian noise.

Poisson sampling (each record in a step's batch independently with probability q) is
what the subsampled-Gaussian accountants assume; fixed-size shuffled batches would need a
different analysis. A Poisson batch may be empty, and the loop still takes its noisy step.

Noise comes from a :class:`NoiseSource`:

* :class:`TorchNoise` - a seeded ``torch.Generator``: reproducible runs, fine for
  research, but anyone who knows the seed can subtract the noise. Its stream is spawned
  from the run's seed apart from the batch sampler's (:mod:`privtune.train.streams`):
  one stream for both would make the noise a function of the batch.
* :class:`SecureNoise` - for ``secure_mode``. Opacus uses ``torchcsprng`` here, which
  cannot be installed on this stack, and a NumPy/PCG/SFC generator seeded from
  ``secrets`` is not a CSPRNG (its state is recoverable from outputs). So uniform bits
  come straight from ``os.urandom`` (the kernel CSPRNG, ChaCha20 on Linux) and are turned
  into Gaussians by the Box-Muller transform in float64: 53 random bits per uniform,
  ``u1`` in (0, 1] so ``log(u1)`` is finite, tails reach about 8.6 sigma. It costs about
  8 bytes of kernel randomness per noise value (roughly 1 GB per step for a 135M-parameter
  full fine-tune), acceptable next to a DP-FFT step. Known limit, shared with Opacus: the
  noise is still floating point, so the floating-point attacks on the Gaussian mechanism
  (Mironov 2012; Jin et al. 2022, https://arxiv.org/abs/2112.05307) are mitigated only by
  drawing in float64 and rounding to float32, not ruled out.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch

from privtune.errors import PrivtuneError
from privtune.train import streams

_MANTISSA_BITS = 53
_CHUNK = 1 << 22  # uniforms drawn per os.urandom call, to bound temporary memory


class NoiseSource(ABC):
    """Where DP randomness comes from."""

    secure: bool = False

    @abstractmethod
    def gaussian(self, shape: torch.Size | tuple[int, ...], *, std: float,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """float32 samples of N(0, std^2) with ``shape`` on ``device``."""

    @abstractmethod
    def uniform(self, n: int) -> torch.Tensor:
        """(n,) float64 samples of U[0, 1) on the CPU (for Poisson sampling)."""


class TorchNoise(NoiseSource):
    """Reproducible noise from a seeded ``torch.Generator`` (drawn on its device)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def gaussian(self, shape, *, std, device=None):
        noise = torch.normal(0.0, std, size=tuple(shape), generator=self.generator,
                             device=self.generator.device, dtype=torch.float32)
        return noise.to(device) if device is not None else noise

    def uniform(self, n):
        return torch.rand(n, generator=self.generator, device=self.generator.device,
                          dtype=torch.float64).cpu()


class SecureNoise(NoiseSource):
    """Noise from the kernel CSPRNG (``os.urandom``) via Box-Muller in float64; not seedable."""

    secure = True

    def uniform(self, n):
        """U[0, 1) with 53 random bits each (the low bits of 8 urandom bytes)."""
        parts = []
        for start in range(0, n, _CHUNK):
            count = min(_CHUNK, n - start)
            words = torch.frombuffer(bytearray(os.urandom(8 * count)), dtype=torch.int64)
            parts.append((words & ((1 << _MANTISSA_BITS) - 1)).double() / 2.0 ** _MANTISSA_BITS)
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64)

    def gaussian(self, shape, *, std, device=None):
        n = math.prod(shape)
        pairs = (n + 1) // 2
        u = self.uniform(2 * pairs)
        u1 = 1.0 - u[:pairs]  # in (0, 1]: log is finite
        u2 = u[pairs:]
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = 2.0 * math.pi * u2
        z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
        return (z * std).to(torch.float32).reshape(tuple(shape)).to(device or "cpu")


def make_noise_generator(seed: int, secure: bool, device: torch.device | str | None = None,
                         stream: str = streams.DP_NOISE) -> NoiseSource:
    """The noise source for a run: ``stream`` of the run's ``seed`` (reproducible), or secure.

    In secure mode ``seed`` is ignored on purpose: noise that a seed reproduces is noise
    an attacker who learns the seed can remove.
    """
    if secure:
        return SecureNoise()
    return TorchNoise(streams.torch_generator(seed, stream, device))


def as_noise_source(generator: NoiseSource | torch.Generator) -> NoiseSource:
    """Accept a plain ``torch.Generator`` wherever a :class:`NoiseSource` is expected."""
    if isinstance(generator, NoiseSource):
        return generator
    if isinstance(generator, torch.Generator):
        return TorchNoise(generator)
    raise TypeError(f"expected a NoiseSource or torch.Generator, got {type(generator).__name__}")


def poisson_batches(n_records: int, sample_rate: float, steps: int,
                    generator: torch.Generator | NoiseSource) -> Iterator[torch.Tensor]:
    """Yield ``steps`` index tensors; each record is in each batch with prob. ``sample_rate``.

    Batches are sorted int64 indices, possibly empty. Deterministic for a seeded
    ``torch.Generator``; pass a :class:`SecureNoise` to make the sampling secret too.
    """
    if n_records < 1:
        raise PrivtuneError("DP training needs at least one training record", "add training data")
    if not 0 < sample_rate <= 1:
        raise PrivtuneError(f"sample rate must be in (0, 1], got {sample_rate}",
                            "use a batch size between 1 and the number of training records")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    source = as_noise_source(generator)
    for _ in range(steps):
        yield torch.nonzero(source.uniform(n_records) < sample_rate).flatten()


def physical_chunks(indices: torch.Tensor, physical_batch_size: int) -> Iterator[torch.Tensor]:
    """Split a logical batch into consecutive chunks of at most ``physical_batch_size``.

    An empty batch gives no chunks (the step's noise is still added by ``finish_step``).
    """
    if physical_batch_size < 1:
        raise PrivtuneError(f"physical batch size must be at least 1, got {physical_batch_size}",
                            "set train.physical_batch_size to 1 or more")
    if indices.numel():
        yield from indices.split(physical_batch_size)
