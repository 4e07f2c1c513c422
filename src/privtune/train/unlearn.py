"""The unlearning loop: a trained model, a forget set and the rest, one objective.

Written out beside :mod:`privtune.train.loop` rather than folded into it: an unlearning
step reads two datasets at once (a forget batch and a retain batch of the same size),
may need a frozen copy of the source model (the KL term) or the source's log-likelihoods
(NPO's reference, taken once before the first step, since the source is where the model
starts), and has no DP variant. The objectives are in
:mod:`privtune.train.unlearn_objectives`.

Batches. Each epoch is one shuffled pass over the forget set in batches of
``batch_size`` records; each forget batch is paired with the next ``batch_size`` records
of a shuffled, endlessly repeated pass over the retain set (when the objective has a
retain term). Both are split into physical batches for memory, and the loss is summed
over records and divided by the logical batch size, so accumulation gives the batch
mean, as in the training loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from privtune.data.tokenize import EncodedDataset
from privtune.measures.efficiency import Stopwatch
from privtune.models.forward import token_logits
from privtune.train import streams
from privtune.train.loop import TrainResult, out_of_memory_as_user_error
from privtune.train.losses import per_record_loss
from privtune.train.precision import Runtime
from privtune.train.unlearn_objectives import Objective, ga_loss, npo_loss, retain_kl, sequence_nll


@dataclass(frozen=True)
class UnlearnPlan:
    """Resolved settings of one unlearning run."""

    objective: Objective
    epochs: int
    batch_size: int
    physical_batch_size: int
    lr: float
    weight_decay: float
    seed: int
    beta: float | None = None
    retain_weight: float = 0.0

    @property
    def uses_retain(self) -> bool:
        return self.objective.retain is not None and self.retain_weight > 0


def _logits(model, data: EncodedDataset, rows: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    with runtime.autocast():
        return token_logits(model, data.input_ids[rows].to(runtime.device),
                            data.attention_mask[rows].to(runtime.device))


@torch.no_grad()
def reference_nll(model: torch.nn.Module, data: EncodedDataset, runtime: Runtime, batch_size: int) -> torch.Tensor:
    """(N,) summed NLL of every record of ``data`` under ``model`` (NPO's π_ref)."""
    was_training = model.training
    model.eval()
    labels = data.labels
    out = []
    for rows in torch.arange(len(data)).split(batch_size):
        out.append(sequence_nll(_logits(model, data, rows, runtime), labels[rows].to(runtime.device))[0].float().cpu())
    model.train(was_training)
    return torch.cat(out)


def _retain_stream(n: int, generator: torch.Generator) -> Iterator[int]:
    """Retain rows in shuffled passes, one after another, for ever."""
    while True:
        yield from torch.randperm(n, generator=generator).tolist()


def unlearn(model: torch.nn.Module, forget: EncodedDataset, retain: EncodedDataset, plan: UnlearnPlan,
            runtime: Runtime, *, reference: torch.nn.Module | None = None,
            on_epoch_end: Callable[[int, TrainResult], None] = lambda epoch, result: None,
            on_step: Callable[[], None] = lambda: None) -> TrainResult:
    """Unlearn ``forget`` from ``model`` in place; ``reference`` is a frozen copy of the
    source model, needed by the KL retain term only.

    Time spent in ``on_epoch_end`` (evaluation) is not counted as training time.
    """
    if plan.objective.retain == "kl" and plan.uses_retain and reference is None:
        raise ValueError("the KL retain term needs the source model as reference")
    with out_of_memory_as_user_error(plan.physical_batch_size), \
            streams.global_stream(plan.seed, streams.DROPOUT, runtime.device):
        return _unlearn(model, forget, retain, plan, runtime, reference, on_epoch_end, on_step)


def _unlearn(model, forget, retain, plan, runtime, reference, on_epoch_end, on_step) -> TrainResult:
    objective = plan.objective
    result = TrainResult()
    ref_nll = None
    if objective.forget == "npo":  # the source model's NLL of the forget set, once: part of NPO's cost
        with Stopwatch(runtime.device) as clock:
            ref_nll = reference_nll(model, forget, runtime, plan.physical_batch_size)
        result.seconds += clock.seconds
        result.cpu_seconds += clock.cpu_seconds
        result.count_forward(forget, torch.arange(len(forget)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=plan.weight_decay)
    generator = streams.torch_generator(plan.seed, streams.BATCHES)
    retain_rows = _retain_stream(len(retain), generator) if plan.uses_retain else None
    forget_labels, retain_labels = forget.labels, retain.labels
    model.train()
    for epoch in range(1, plan.epochs + 1):
        with Stopwatch(runtime.device) as clock:
            for batch in torch.randperm(len(forget), generator=generator).split(plan.batch_size):
                paired = (torch.tensor([next(retain_rows) for _ in range(len(batch))]) if retain_rows is not None
                          else None)
                for k, rows in enumerate(batch.split(plan.physical_batch_size)):
                    labels = forget_labels[rows].to(runtime.device)
                    nll_sum, counts = sequence_nll(_logits(model, forget, rows, runtime), labels)
                    if objective.forget == "npo":
                        loss = npo_loss(nll_sum, ref_nll[rows].to(runtime.device), plan.beta).sum()
                    else:
                        loss = ga_loss(nll_sum, counts).sum()
                    result.count(forget, rows)
                    if paired is not None:
                        r_rows = paired.split(plan.physical_batch_size)[k]
                        loss = loss + plan.retain_weight * _retain_term(model, reference, retain, retain_labels,
                                                                        r_rows, objective, runtime).sum()
                        result.count(retain, r_rows)
                        if objective.retain == "kl":  # and the frozen source model's forward pass
                            result.count_forward(retain, r_rows)
                    (loss / len(batch)).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                result.steps += 1
                on_step()
        result.seconds += clock.seconds
        result.cpu_seconds += clock.cpu_seconds
        result.epoch_seconds.append(clock.seconds)
        on_epoch_end(epoch, result)
    return result


def _retain_term(model, reference, retain: EncodedDataset, labels: torch.Tensor, rows: torch.Tensor,
                 objective: Objective, runtime: Runtime) -> torch.Tensor:
    """(B,) the retain term of ``rows``: their NLL, or their KL from the source model."""
    logits = _logits(model, retain, rows, runtime)
    target = labels[rows].to(runtime.device)
    if objective.retain == "kl":
        with torch.no_grad():
            ref_logits = _logits(reference, retain, rows, runtime)
        return retain_kl(logits, ref_logits, target)
    return per_record_loss(logits, target)
