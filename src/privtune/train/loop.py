"""The one training loop, for every method.

Written out rather than delegated to HF's Trainer because DP-SGD changes the loop
itself: Poisson-sampled logical batches of varying size (of records, or of people with
all their records under user-level DP), split into physical batches, per-record (or
per-person) clipping before accumulation, noise once per logical step, an accountant
stepped alongside. Non-private methods take the same path minus those steps, with
shuffled fixed-size batches, and optimise the same objective (mean over records of each
record's mean token loss), so a difference between methods is the method's and not the
loop's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from privtune.config import DPSettings
from privtune.data.tokenize import EncodedDataset
from privtune.errors import PrivtuneError
from privtune.measures.efficiency import Stopwatch
from privtune.models.forward import token_logits
from privtune.train import distributed, dp, streams
from privtune.train.losses import per_record_loss
from privtune.train.precision import Runtime


@dataclass(frozen=True)
class TrainPlan:
    """Resolved hyperparameters of one training run."""

    epochs: int
    batch_size: int
    physical_batch_size: int
    lr: float
    weight_decay: float
    seed: int
    dp: DPSettings | None = None


@dataclass
class PrivacySetup:
    """What DP-SGD was run with, and what it guarantees."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    max_grad_norm: float
    accountant: str
    unit: str  # what epsilon protects: "individual" or "record"
    n_units: int  # people (or records) in the training set
    engine: str  # the per-record clipping engine (``dp.engine``)
    # False: noise and batches from streams of the run's seed, so ε holds only against
    # whoever does not know the seed; True: from the OS CSPRNG (``dp.secure_mode``).
    secure_mode: bool = False
    epsilon: float = math.nan

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TrainResult:
    """What a training run did. ``tokens`` counts the records' real tokens (throughput is
    tokens per second); ``positions`` every position the model computed, padding included
    (FLOPs are counted on those), over ``records`` forward and backward passes of a record;
    ``forward_records`` / ``forward_positions`` are forward passes alone (a frozen reference
    model's, in unlearning)."""

    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time over the same span as ``seconds``
    epoch_seconds: list[float] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    records: int = 0
    positions: int = 0
    forward_records: int = 0
    forward_positions: int = 0
    privacy: PrivacySetup | None = None

    def count(self, data: EncodedDataset, rows: torch.Tensor) -> None:
        """Add a physical batch of ``data``'s ``rows``, trained on (forward and backward),
        at the width the loop computes it (:func:`batch_width`)."""
        self.tokens += int(data.attention_mask[rows].sum())
        self.records += rows.numel()
        self.positions += rows.numel() * batch_width(data, rows)

    def count_forward(self, data: EncodedDataset, rows: torch.Tensor) -> None:
        """Add a forward pass alone over ``data``'s ``rows``."""
        self.forward_records += rows.numel()
        self.forward_positions += rows.numel() * data.input_ids.shape[1]


def privacy_units(data: EncodedDataset, unit: str) -> dp.PrivacyUnits:
    """The DP units of ``data``'s records for ``dp.unit`` (``auto`` resolved from the records)."""
    individuals = None if unit == "record" else [r.individual for r in data.records]
    return dp.PrivacyUnits.of(unit, len(data), individuals)


def plan_privacy(settings: DPSettings, units: dp.PrivacyUnits, batch_size: int, epochs: int) -> PrivacySetup:
    """Derive the noise (or check the given one) for Poisson sampling of ``units`` over ``epochs``.

    ``batch_size`` is the expected number of records per step for either unit, so the
    sample rate q = batch_size / N_records and the steps are the same; with people as
    units, q applies to each person and delta defaults to 1 / (10 * people).
    """
    n_records, n_units = units.n_records, units.count
    if n_records < 1:
        raise PrivtuneError("DP training needs at least one training record", "add training data")
    sample_rate = min(1.0, batch_size / n_records)
    steps = epochs * math.ceil(n_records / batch_size)
    delta = settings.delta if settings.delta is not None else 1.0 / (10 * n_units)
    if units.kind == "individual" and sample_rate * n_units < 1:
        raise PrivtuneError(
            f"a step of {batch_size} expected records holds {sample_rate * n_units:.2g} people in expectation "
            f"({n_units} people with {n_records / n_units:.1f} records each on average): user-level DP needs at "
            "least one", f"raise train.batch_size to {math.ceil(n_records / n_units)} or more, or set dp.unit: record")
    # The settings are checked on their own here; reachability of the target comes from
    # the noise search itself, which runs once (it is the costly part).
    dp.check_dp_settings(n_records=n_units, delta=delta, sample_rate=sample_rate,
                         max_grad_norm=settings.max_grad_norm, noise_multiplier=settings.noise_multiplier,
                         accountant=settings.accountant, unit=units.kind)
    if settings.noise_multiplier is not None:
        sigma = settings.noise_multiplier
    else:
        sigma = dp.noise_for_target_epsilon(settings.target_epsilon, delta, sample_rate, steps,
                                            accountant=settings.accountant)
    return PrivacySetup(sigma, sample_rate, steps, delta, settings.max_grad_norm, settings.accountant,
                        unit=units.kind, n_units=n_units, engine=settings.engine, secure_mode=settings.secure_mode)


@contextmanager
def out_of_memory_as_user_error(physical_batch_size: int) -> Iterator[None]:
    """Turn an out-of-memory error of a training loop into a one-line error naming the fix
    (the CUDA allocator raises ``OutOfMemoryError``; the CPU allocator a ``RuntimeError``)."""
    error = PrivtuneError(f"out of memory with a physical batch of {physical_batch_size} records",
                          "lower train.physical_batch_size (or data.max_length); the logical batch and results stay "
                          "the same")
    try:
        yield
    except torch.OutOfMemoryError:
        raise error from None
    except RuntimeError as e:
        if "out of memory" in str(e).lower() or "can't allocate memory" in str(e).lower():
            raise error from None
        raise


def train(model: torch.nn.Module, data: EncodedDataset, plan: TrainPlan, runtime: Runtime, *,
          on_epoch_end: Callable[[int, TrainResult], None] = lambda epoch, result: None,
          on_step: Callable[[], None] = lambda: None) -> TrainResult:
    """Train ``model`` in place on ``data``; call ``on_epoch_end(epoch, result)`` after each epoch.

    Time spent inside ``on_epoch_end`` (evaluation) is not counted as training time.
    Under ``torchrun`` every rank calls this with the same arguments and trains on its
    share of each batch (``train/distributed.py``); ``result.tokens`` is then the total
    over ranks.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=plan.weight_decay)
    generator = streams.torch_generator(plan.seed, streams.BATCHES)  # noise and dropout draw from streams of their own
    result = TrainResult()
    labels = data.labels
    if plan.dp is not None:
        result.privacy = plan_privacy(plan.dp, privacy_units(data, plan.dp.unit), plan.batch_size, plan.epochs)
    step_fn = _private_steps if plan.dp is not None else _plain_steps
    model.train()
    group = distributed.current()
    if group:  # rank 0 may have measured the base model first: wait here, not in a gradient all-reduce
        group.wait_for_main()
    with out_of_memory_as_user_error(plan.physical_batch_size), \
            streams.global_stream(plan.seed, streams.DROPOUT, runtime.device):
        step_fn(model, data, labels, plan, runtime, optimizer, generator, result, on_epoch_end, on_step)
    if group is not None:
        result.tokens, result.records, result.positions = (
            group.sum_int(result.tokens), group.sum_int(result.records), group.sum_int(result.positions))
    return result


def batch_width(data: EncodedDataset, rows: torch.Tensor) -> int:
    """The positions a batch of ``rows`` is computed at: its longest record (rows are
    right-padded and the model causal, so the padding after a record changes only the
    work; audit canaries are a quarter of the width of customer-sim's records)."""
    return max(2, int(data.attention_mask[rows].sum(dim=1).max())) if len(rows) else data.input_ids.shape[1]


def _forward_loss(module, data: EncodedDataset, labels, rows, runtime: Runtime) -> torch.Tensor:
    """Each record's loss, the batch cut to its longest record (:func:`batch_width`)."""
    used = batch_width(data, rows)
    ids = data.input_ids[rows, :used].to(runtime.device)
    attn = data.attention_mask[rows, :used].to(runtime.device)
    with runtime.autocast():
        logits = token_logits(module, ids, attn)
    return per_record_loss(logits, labels[rows, :used].to(runtime.device))


def _plain_steps(model, data, labels, plan, runtime, optimizer, generator, result, on_epoch_end, on_step):
    n = len(data)
    group = distributed.current()
    params = [p for p in model.parameters() if p.requires_grad]
    for epoch in range(1, plan.epochs + 1):
        with Stopwatch(runtime.device) as clock:
            order = torch.randperm(n, generator=generator)
            for batch in order.split(plan.batch_size):
                mine = group.shard(batch) if group else batch  # may be empty when batch < ranks
                for rows in mine.split(plan.physical_batch_size) if mine.numel() else ():
                    # Sum of record losses / logical batch size: accumulation gives the batch mean.
                    loss = _forward_loss(model, data, labels, rows, runtime).sum() / len(batch)
                    loss.backward()
                    result.count(data, rows)
                if group:  # the ranks' partial sums make the whole batch's gradient
                    group.all_reduce_grads_(params)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                result.steps += 1
                on_step()
        _close_epoch(epoch, clock, result, on_epoch_end)


def _private_steps(model, data, labels, plan, runtime, optimizer, generator, result, on_epoch_end, on_step):
    privacy = result.privacy
    units = privacy_units(data, privacy.unit)  # records, or people with all their records
    n = units.count  # what is Poisson-sampled and divided by: people or records
    clipper = dp.make_clipper(plan.dp.engine)
    module = clipper.attach(model)
    ledger = dp.PrivacyLedger(privacy.accountant)
    noise = dp.make_noise_generator(plan.seed, secure=plan.dp.secure_mode, device=runtime.device)
    group = distributed.current()
    if group and noise.secure:  # unseeded: one draw, on rank 0, for every rank
        noise = distributed.BroadcastNoise(noise, group)
    steps_per_epoch = privacy.steps // plan.epochs
    expected_batch = privacy.sample_rate * n
    # In secure mode batch membership is secret too: sample it from the secure source.
    sampler = noise if plan.dp.secure_mode else generator
    try:
        for epoch in range(1, plan.epochs + 1):
            with Stopwatch(runtime.device) as clock:
                for batch in dp.poisson_batches(n, privacy.sample_rate, steps_per_epoch, sampler):
                    # Chunks of whole people under user-level DP; ``owners`` None for records.
                    mine = group.shard(batch) if group else batch
                    for rows, owners in units.chunks(mine, plan.physical_batch_size):
                        clipper.accumulate_clipped(_forward_loss(module, data, labels, rows, runtime),
                                                   privacy.max_grad_norm, groups=owners)
                        result.count(data, rows)
                    if group:  # clipped per unit on each rank, summed over ranks, noised once below
                        group.all_reduce_sum_(clipper.clipped_sums())
                    # An empty Poisson batch still gets its noisy step: the accountant assumes it.
                    clipper.finish_step(privacy.noise_multiplier, privacy.max_grad_norm, expected_batch, noise)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    ledger.step(privacy.noise_multiplier, privacy.sample_rate)
                    result.steps += 1
                    on_step()
            privacy.epsilon = ledger.epsilon(privacy.delta)
            _close_epoch(epoch, clock, result, on_epoch_end)
    finally:
        clipper.detach()


def _close_epoch(epoch: int, clock: Stopwatch, result: TrainResult, on_epoch_end) -> None:
    result.seconds += clock.seconds
    result.cpu_seconds += clock.cpu_seconds
    result.epoch_seconds.append(clock.seconds)
    on_epoch_end(epoch, result)
    group = distributed.current()
    if group:  # the other ranks wait while rank 0 evaluates
        group.wait_for_main()
