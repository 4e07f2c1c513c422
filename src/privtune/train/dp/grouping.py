"""The records of a physical chunk grouped by person, for user-level clipping.

User-level DP-SGD (Chua et al. 2024, "Mind the Privacy Unit! User-Level Differential
Privacy for Language Model Fine-Tuning", https://arxiv.org/abs/2406.14322) clips each
sampled person's gradient summed over all their records. Every exact form an engine
keeps of the per-record gradients G_r regroups into the per-person sums
G_u = sum_{r of u} G_r without writing G_r out:

* written-out gradients (B, *shape): an ``index_add`` over the batch dimension;
* factors summed over tokens (a Linear's G_r = sum_t g_rt a_rt^T, an embedding's looked-up
  rows): G_u = sum_{r of u} sum_t g_rt a_rt^T is the same sum over the tokens of all of
  u's records, i.e. the gradient form of one "record" made by laying u's records end to
  end on the token axis. Slots of a person with fewer records than the largest group
  are zero, and zero factors add nothing to a norm, a cross term or a weighted sum.

So a person's records must all be in the same chunk (the loop builds chunks from whole
people, see ``units.py``).
"""

from __future__ import annotations

import torch


class Grouping:
    """Which of ``size`` groups each of the B records of a chunk belongs to.

    Meant for one chunk: :meth:`concat_tokens` remembers each tensor it regrouped, so a
    tensor shared by several forms (the input of q, k and v) stays one shared tensor and
    ``GramCache`` still forms its Gram matrix once. Drop the object after regrouping.

    Attributes:
        index: (B,) int64, each record's group in ``0..size-1`` (groups in the order of
            their sorted ids).
        slot: (B,) int64, each record's position among its group's records.
        size: the number of groups.
        width: the number of records of the largest group.
    """

    def __init__(self, groups: torch.Tensor) -> None:
        if groups.dim() != 1 or groups.numel() == 0 or groups.is_floating_point():
            raise ValueError(f"groups must be a non-empty (B,) integer tensor, got {tuple(groups.shape)} "
                             f"{groups.dtype}")
        _, index = torch.unique(groups, return_inverse=True)
        self.size = int(index.max()) + 1
        counts = torch.bincount(index, minlength=self.size)
        order = torch.argsort(index, stable=True)
        starts = counts.cumsum(0) - counts
        slot = torch.empty_like(index)
        slot[order] = torch.arange(index.numel(), device=index.device) - starts[index[order]]
        self.index, self.slot, self.width = index, slot, int(counts.max())
        self._concatenated: dict[tuple, torch.Tensor] = {}

    @property
    def batch(self) -> int:
        return self.index.numel()

    def sum_records(self, x: torch.Tensor) -> torch.Tensor:
        """(size, ...) float32: the rows of ``x`` (B, ...) summed per group."""
        out = torch.zeros((self.size, *x.shape[1:]), dtype=torch.float32, device=x.device)
        return out.index_add_(0, self.index.to(x.device), x.float())

    def concat_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(size, width*T, ...): each group's records of ``x`` (B, T, ...) end to end, zero-padded."""
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device)
        found = self._concatenated.get(key)
        if found is None:
            found = x.new_zeros((self.size, self.width, *x.shape[1:]))
            found[self.index.to(x.device), self.slot.to(x.device)] = x
            found = found.flatten(1, 2)
            self._concatenated[key] = found
        return found
