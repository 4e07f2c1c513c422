"""The privacy unit of DP-SGD: who is Poisson-sampled, clipped and protected.

With ``record`` units every training record is sampled and clipped on its own, and ε
protects one record: a person with k records is covered only by group privacy (roughly
k·ε, and a far larger δ). With ``individual`` units (user-level DP-SGD, Chua et al.
2024, "Mind the Privacy Unit!", https://arxiv.org/abs/2406.14322; "user-level sampling"
in Charles et al. 2024, https://arxiv.org/abs/2407.07737) each person is sampled with
rate q and brings all their records; the gradient of the *sum* of their records' losses
is clipped to C as one, so adding or removing a person moves the clipped sum by at most
C and the accountant's analysis holds with the person as the unit.

Why the sum and not the mean: the sensitivity is C either way; the sum weighs every
record as the non-private objective does (a mean over records) until clipping binds,
while a mean would shrink the weight of each record of a person who wrote more.

``train.batch_size`` keeps its meaning, the expected number of *records* per step:
q = batch_size / N_records for either unit, so the expected people per step are
q · N_people = batch_size / (mean records per person), and an epoch is still 1/q steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from privtune.errors import PrivtuneError
from privtune.train.dp.sampling import physical_chunks

UNITS = ("individual", "record")


def resolve_unit(unit: str, individuals: Sequence[str] | None) -> str:
    """``auto`` becomes ``individual`` when anyone owns more than one record, else ``record``."""
    if unit in UNITS:
        return unit
    if unit != "auto":
        raise PrivtuneError(f"unknown privacy unit {unit!r}", "set dp.unit to auto, individual or record")
    if individuals is None:
        raise PrivtuneError("dp.unit auto needs to know whose each training record is",
                            "give the records an individual, or set dp.unit: record")
    return "individual" if len(set(individuals)) < len(individuals) else "record"


@dataclass(frozen=True)
class PrivacyUnits:
    """The unit of each training record.

    Attributes:
        kind: ``individual`` or ``record``.
        owner: (N,) int64, the unit of each record, ``0..count-1`` (records: ``arange(N)``).
    """

    kind: str
    owner: torch.Tensor

    @classmethod
    def of(cls, unit: str, n_records: int, individuals: Sequence[str] | None = None) -> "PrivacyUnits":
        """The units of ``n_records`` records for ``dp.unit`` (``auto`` resolved here)."""
        kind = resolve_unit(unit, individuals)
        if kind == "record":
            return cls(kind, torch.arange(n_records))
        if individuals is None or len(individuals) != n_records:
            raise PrivtuneError("dp.unit individual needs the individual of every training record",
                                "give the records an individual, or set dp.unit: record")
        ids = {person: k for k, person in enumerate(dict.fromkeys(individuals))}
        return cls(kind, torch.tensor([ids[p] for p in individuals], dtype=torch.long))

    @property
    def n_records(self) -> int:
        return self.owner.numel()

    @property
    def count(self) -> int:
        """The number of units (people, or records)."""
        return int(self.owner.max()) + 1 if self.owner.numel() else 0

    @cached_property
    def _members(self) -> list[torch.Tensor]:
        order = torch.argsort(self.owner, stable=True)
        return list(order.split(torch.bincount(self.owner, minlength=self.count).tolist()))

    def rows_of(self, units: torch.Tensor) -> list[torch.Tensor]:
        """Each of ``units``' record rows (ascending), in the order of ``units``."""
        return [self._members[u] for u in units.tolist()]

    def chunks(self, units: torch.Tensor, physical_batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(rows, groups) physical chunks of the sampled ``units``, each unit whole in one chunk.

        Records: the plain split, ``groups`` None. People: packed in the order given, a
        chunk closed when the next person would take it past ``physical_batch_size``
        records; a person with more records than that gets a chunk of their own (larger
        than the physical batch size: a person's gradient is clipped as one).
        """
        if self.kind == "record":
            for rows in physical_chunks(units, physical_batch_size):
                yield rows, None
            return
        if physical_batch_size < 1:
            raise PrivtuneError(f"physical batch size must be at least 1, got {physical_batch_size}",
                                "set train.physical_batch_size to 1 or more")
        pending: list[torch.Tensor] = []
        size = 0
        for rows in self.rows_of(units):
            if pending and size + rows.numel() > physical_batch_size:
                yield self._chunk(pending)
                pending, size = [], 0
            pending.append(rows)
            size += rows.numel()
        if pending:
            yield self._chunk(pending)

    def _chunk(self, parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.cat(parts)
        return rows, self.owner[rows]
