"""The per-record (or per-person) clipping interface every DP-SGD engine implements.

Record-level DP-SGD (Abadi et al., 2016, "Deep Learning with Differential Privacy",
https://arxiv.org/abs/1607.00133) needs, per logical step, the sum over the sampled
records of each record's gradient clipped to L2 norm <= C, plus Gaussian noise
N(0, sigma^2 C^2), divided by the *expected* batch size q*N. How the clipped per-record
gradients are obtained is the engine's business (Opacus hooks materialise them; ghost
clipping / book-keeping only ever forms their norms), so the interface is three calls the
training loop makes and nothing else:

    module = clipper.attach(model)            # once; forward passes go through ``module``
    for chunk in physical batches:            # any number of times, including zero
        clipper.accumulate_clipped(per_record_loss(module(chunk)), C)
    clipper.finish_step(sigma, C, q * N, noise)   # writes param.grad; caller steps the optimizer
    clipper.detach()                          # once, at the end

User-level DP-SGD clips people, not records: ``accumulate_clipped(loss, C, groups=owner)``
with ``owner`` (B,) the person of each record of the chunk clips each person's gradient
summed over their records in the chunk (``grouping.py``). A person's records must then
all be in one chunk; the loop builds its chunks from whole people.

The noise and accumulator arithmetic lives here, in the base class, so every engine adds
noise the same way; an engine only implements how one chunk's clipped sum is formed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from privtune.errors import PrivtuneError
from privtune.registry import Registry
from privtune.train.dp.grouping import Grouping
from privtune.train.dp.sampling import NoiseSource, as_noise_source


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """min(1, C / ||g_i||) per record: exactly 1 where ||g_i|| <= C (zero gradients too).

    ``torch.where`` rather than a clamp, because torch's scalar division may round C / C
    to just below 1.
    """
    safe = norms.clamp_min(torch.finfo(norms.dtype).tiny)
    return torch.where(norms > max_grad_norm, max_grad_norm / safe, torch.ones_like(norms))


def check_positive(name: str, value: float, fix: str) -> None:
    if not value > 0:  # also rejects NaN
        raise PrivtuneError(f"{name} must be positive, got {value}", fix)


class PerSampleClipper(ABC):
    """Clips each record's (or person's) whole gradient to norm <= C and keeps the running clipped sum.

    Subclasses implement :meth:`attach`, :meth:`accumulate_clipped` and :meth:`detach`;
    they call :meth:`_start` with the trainable parameters in ``attach`` and
    :meth:`_add_to_sum` with each chunk's clipped sum. The accumulator is float32 whatever
    the parameter dtype, so bf16 autocast does not round the sum of many records.
    """

    name: str = ""

    def __init__(self) -> None:
        self._params: list[nn.Parameter] = []
        self._sums: list[torch.Tensor | None] = []
        self.records_in_step = 0  # records accumulated since the last finish_step

    # ------------------------------------------------------------------ engine API
    @abstractmethod
    def attach(self, model: nn.Module) -> nn.Module:
        """Prepare ``model``; return the module to call for forward passes.

        Raises:
            PrivtuneError: a trainable layer has no per-record gradient in this engine.
        """

    @abstractmethod
    def accumulate_clipped(self, per_sample_loss: torch.Tensor, max_grad_norm: float,
                           groups: torch.Tensor | None = None) -> torch.Tensor:
        """Backward ``per_sample_loss.sum()``, clip each record (or group), add the clipped sum.

        Args:
            per_sample_loss: (B,) one loss per record of the chunk, from a forward pass
                through the module :meth:`attach` returned.
            max_grad_norm: C, the bound on each record's (group's) gradient norm over
                all trainable parameters together.
            groups: optional (B,) integer id of each record's group (its person); then
                each group's gradient *summed over its records* is clipped to C.

        Returns:
            The *unclipped* gradient norms (float32, detached): (B,) per record, or one
            per group in the order of the sorted group ids.
        """

    @abstractmethod
    def detach(self) -> None:
        """Undo :meth:`attach` (remove hooks); the model is a plain module again."""

    # ------------------------------------------------------------------ shared
    @property
    def params(self) -> list[nn.Parameter]:
        """The trainable parameters the clipper covers (each tied parameter once)."""
        return self._params

    def finish_step(self, noise_multiplier: float, max_grad_norm: float, expected_batch_size: float,
                    generator: NoiseSource | torch.Generator) -> None:
        """Set ``p.grad = (clipped sum + N(0, sigma^2 C^2)) / expected_batch_size`` and reset.

        Dividing by the *expected* batch size q*N, not the realised one, keeps the
        sensitivity of the update fixed at C / (qN); dividing by the realised size would
        leak it. A step with no records (an empty Poisson batch) still gets its noise.
        """
        if noise_multiplier < 0:
            raise PrivtuneError(f"noise multiplier must be >= 0, got {noise_multiplier}",
                                "set dp.noise_multiplier to 0 or more, or give dp.target_epsilon")
        check_positive("max_grad_norm", max_grad_norm, "set dp.max_grad_norm above 0 (1.0 is usual)")
        check_positive("expected batch size", expected_batch_size, "use a batch size of at least 1")
        if not self._params:
            raise RuntimeError("finish_step called before attach")
        source = as_noise_source(generator)
        std = noise_multiplier * max_grad_norm
        for i, p in enumerate(self._params):
            # Release each sum as it becomes a gradient, so the two never coexist whole.
            total, self._sums[i] = self._sums[i], None
            if total is None:
                total = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            if std > 0:
                total.add_(source.gaussian(p.shape, std=std, device=p.device))
            p.grad = total.div_(expected_batch_size).to(p.dtype)
        self._reset_sums()

    def clipped_sums(self) -> list[torch.Tensor]:
        """The running float32 clipped sums, zeros where no record added to one yet.

        For a data-parallel step: summed over processes in place before :meth:`finish_step`.
        """
        for i, p in enumerate(self._params):
            if self._sums[i] is None:
                self._sums[i] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return self._sums

    def _start(self, params: list[nn.Parameter]) -> None:
        if not params:
            raise PrivtuneError("the model has no trainable parameters",
                                "unfreeze some parameters (or apply LoRA) before DP training")
        self._params = params
        self._reset_sums()

    def _reset_sums(self) -> None:
        self._sums = [None] * len(self._params)
        self.records_in_step = 0

    @staticmethod
    def _grouping(per_sample_loss: torch.Tensor, groups: torch.Tensor | None) -> Grouping | None:
        if groups is None:
            return None
        if tuple(groups.shape) != tuple(per_sample_loss.shape):
            raise ValueError(f"groups must have one id per record: shape {tuple(groups.shape)} for a loss of "
                             f"shape {tuple(per_sample_loss.shape)}")
        return Grouping(groups.to(per_sample_loss.device))

    def _add_to_sum(self, index: int, clipped_sum: torch.Tensor) -> None:
        clipped_sum = clipped_sum.detach().float()
        current = self._sums[index]
        self._sums[index] = clipped_sum if current is None else current.add_(clipped_sum)


# ---------------------------------------------------------------------- registry
DP_ENGINES: Registry[type[PerSampleClipper]] = Registry("DP engine")


def register_engine(name: str):
    """Class decorator: make an engine available to ``dp.engine`` in study configs.

    Engines register where they are defined; ``privtune.train.dp`` imports each engine
    module so the table is complete once the package is imported.
    """

    def add(cls: type[PerSampleClipper]) -> type[PerSampleClipper]:
        if not issubclass(cls, PerSampleClipper):
            raise TypeError(f"{cls.__name__} is not a PerSampleClipper")
        cls.name = name
        return DP_ENGINES.register(name)(cls)

    return add


def make_clipper(name: str) -> PerSampleClipper:
    """A fresh clipper of the engine called ``name``."""
    return DP_ENGINES.lookup(name)()
