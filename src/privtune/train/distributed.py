"""Data-parallel training of one run over several processes (``torchrun``), DP-SGD included.

Every rank draws the same logical batch (the same seeded generator, hence the same
shuffle or Poisson sample), takes its contiguous share of the rows, and computes the
gradient of its share; the shares' gradients are summed over ranks before the optimizer
step, so a step sees exactly the gradient of one process on the whole batch.

Written by hand rather than with DDP (or accelerate, which wraps DDP) because DDP
all-reduces each gradient in its backward hooks, which is too early for DP-SGD: each
record's gradient must be clipped *before* records of different ranks are summed, and
the DP engines only form clipped sums after the backward pass. Here the sum is all-reduced
once per logical step, after the backward passes: the plain gradients (non-private), or
the engines' float32 clipped sums (DP), and the noise is then added once to the global sum
(equal on every rank: seeded sources draw the same values everywhere, and a secure source
is drawn on rank 0 alone and broadcast). One reduction per step also lets ranks take
different numbers of physical chunks (a Poisson batch rarely splits evenly), which DDP
would need ``no_sync`` juggling for.

Rank 0 alone evaluates, attacks and writes; the other ranks wait for it before training
starts and at the end of each epoch on a CPU (gloo) group whose timeout is long, so a
slow evaluation never trips the short watchdog of the NCCL group the gradients go through.

A single process never enters this module's collectives: :func:`current` is ``None`` and
the loop runs exactly as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from privtune.errors import PrivtuneError
from privtune.train.dp.sampling import NoiseSource

BUCKET_ELEMENTS = 1 << 24  # 64 MB of float32 per all-reduce: bounds the extra memory of flattening
CONTROL_TIMEOUT = timedelta(hours=6)  # rank 0's evaluation and attacks may take this long between steps


@dataclass(frozen=True)
class Group:
    """This process's place in a data-parallel run."""

    rank: int
    world_size: int
    local_rank: int
    control: object  # the gloo process group for waiting and small objects

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a batch's row indices (possibly empty)."""
        return rows.tensor_split(self.world_size)[self.rank]

    def wait_for_main(self) -> None:
        """Block until every rank (rank 0 after its evaluation) gets here."""
        dist.barrier(group=self.control)

    def broadcast_object(self, obj=None):
        """Rank 0's ``obj`` on every rank (pickled; for run specs, never for tensors)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def sum_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, group=self.control)
        return int(t.item())

    def max_float(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return float(t.item())

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over ranks in place, in flattened buckets of one dtype and device."""
        bucket: list[torch.Tensor] = []
        size = 0
        for t in tensors:
            if bucket and (t.dtype != bucket[0].dtype or t.device != bucket[0].device
                           or size + t.numel() > BUCKET_ELEMENTS):
                _reduce_bucket(bucket)
                bucket, size = [], 0
            bucket.append(t)
            size += t.numel()
        if bucket:
            _reduce_bucket(bucket)

    def all_reduce_grads_(self, params: list[torch.nn.Parameter]) -> None:
        """Sum ``p.grad`` over ranks. A parameter no rank has a gradient for keeps ``None``,
        as in one process (AdamW then leaves it alone); one only some ranks have gets zeros
        from the others.
        """
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.int64)
        dist.all_reduce(present, group=self.control)
        grads = []
        for p, anywhere in zip(params, present.tolist()):
            if not anywhere:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        self.all_reduce_sum_(grads)


def _reduce_bucket(bucket: list[torch.Tensor]) -> None:
    if len(bucket) == 1:
        dist.all_reduce(bucket[0])
        return
    flat = torch.cat([t.reshape(-1) for t in bucket])
    dist.all_reduce(flat)
    for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
        t.copy_(part.view_as(t))


class BroadcastNoise(NoiseSource):
    """A secure noise source drawn on rank 0 alone and sent to the others.

    Secure noise cannot be seeded, so ranks drawing their own would disagree (on the
    Poisson batch, and on the noise); and one draw per rank summed would be too much noise.
    """

    def __init__(self, source: NoiseSource, group: Group):
        self.source, self.group = source, group
        self.secure = source.secure

    def gaussian(self, shape, *, std, device=None):
        if self.group.is_main:
            noise = self.source.gaussian(shape, std=std, device=device)
        else:
            noise = torch.empty(tuple(shape), dtype=torch.float32, device=device or "cpu")
        dist.broadcast(noise, src=0)
        return noise

    def uniform(self, n):
        values = self.source.uniform(n) if self.group.is_main else torch.empty(n, dtype=torch.float64)
        dist.broadcast(values, src=0, group=self.group.control)
        return values


_GROUP: Group | None = None


def current() -> Group | None:
    """The data-parallel group this process belongs to; ``None`` in a single process."""
    return _GROUP


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device_type: str) -> Group:
    """Join the group ``torchrun`` describes in WORLD_SIZE / RANK / LOCAL_RANK / MASTER_*.

    gloo on the CPU; nccl with one GPU per rank (``cuda:LOCAL_RANK``) on CUDA.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return init(rank, world, int(os.environ.get("LOCAL_RANK", rank)), device_type)


def init(rank: int, world_size: int, local_rank: int, device_type: str, init_method: str = "env://") -> Group:
    """Initialise the process group of a data-parallel run (once per process)."""
    global _GROUP
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise PrivtuneError(f"rank {rank} wants GPU {local_rank} but only {torch.cuda.device_count()} are visible",
                                "start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(local_rank)  # "cuda" now means this rank's GPU everywhere
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=CONTROL_TIMEOUT if backend == "gloo" else None)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if backend == "nccl" else dist.group.WORLD
    _GROUP = Group(rank, world_size, local_rank, control)
    return _GROUP


def shutdown() -> None:
    """Leave the group (at the end of the process's work)."""
    global _GROUP
    if _GROUP is not None:
        dist.destroy_process_group()
        _GROUP = None
