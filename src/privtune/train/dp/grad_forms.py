"""Per-record gradients of one use of a parameter, kept in the cheapest exact form.

DP-SGD needs two things of every record i's gradient G_i: its norm (to get the clip
factor c_i = min(1, C/||G_i||)) and the weighted sum sum_i c_i G_i. Materialising G_i for
every record costs B copies of the parameter; for the layers of a language model the
gradient has structure that gives both quantities exactly without that copy
(Li et al. 2022, "Large Language Models Can Be Strong Differentially Private Learners",
https://arxiv.org/abs/2110.05679 ; Bu et al. 2023, "Differentially Private Optimization on
Large Model at Small Cost", https://arxiv.org/abs/2210.00038):

* :class:`Outer` - a Linear weight: G_i = sum_t g_it a_it^T from the layer's inputs a
  (B,T,i) and output gradients g (B,T,o). ||G_i||^2 = sum_{t,s} (a_t.a_s)(g_t.g_s) costs
  T^2 (i+o) per record ("ghost norm") instead of T i o, and sum_i c_i G_i is one matmul
  of the c-weighted g with a ("book-keeping": no second backward pass).
* :class:`Rows` - an embedding table: G_i = sum_t e_{id_t} g_t^T, non-zero only on the
  rows record i looked up. Norms by summing g over equal ids; the weighted sum is an
  ``index_add``.
* :class:`PerSample` - the gradient itself, (B, *shape): for parameters that are small
  next to their activations (norm weights, biases, LoRA matrices), where it is the
  cheaper form in both time and memory.

For user-level DP every form also regroups into the per-person sums of its G_i
(:meth:`GradForm.grouped`, see ``grouping.py``), after which norms, cross terms and
weighted sums are those of the people.

A parameter used several times in one forward pass (an input embedding tied to the
output head, a module called twice) has the *sum* of its uses as its per-record
gradient, so its squared norm has cross terms: ||U + V||^2 = ||U||^2 + ||V||^2 +
2<U, V>. :func:`inner` gives <U_i, V_i> for every pair of forms without materialising
either. All norm arithmetic is float32, whatever the activations' dtype (bf16 autocast).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from privtune.train.dp.grouping import Grouping

class GramCache:
    """Per-record Gram matrices ``t @ t^T`` (B,T,T) in float32, each computed once.

    q/k/v projections (and gate/up in an MLP) share one input tensor, so its Gram matrix
    is needed three (two) times. Tensors announced with :meth:`expect` are cached until
    their last expected use and then dropped, so at most a few Gram matrices are alive;
    others are computed and not kept. The key is the tensor's memory, which stays valid
    while the forms holding the tensors are alive.
    """

    def __init__(self) -> None:
        self._grams: dict[tuple, torch.Tensor] = {}
        self._uses_left: Counter[tuple] = Counter()

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)

    def expect(self, t: torch.Tensor) -> None:
        """Announce one future :meth:`gram` call for ``t``."""
        self._uses_left[self._key(t)] += 1

    def gram(self, t: torch.Tensor) -> torch.Tensor:
        key = self._key(t)
        found = self._grams.pop(key, None)
        if found is None:
            f = t.float()
            found = torch.bmm(f, f.transpose(1, 2))
        self._uses_left[key] -= 1
        if self._uses_left[key] > 0:
            self._grams[key] = found
        else:
            del self._uses_left[key]
        return found

    @classmethod
    def for_forms(cls, forms: Iterable[GradForm]) -> "GramCache":
        """A cache expecting the activation Gram matrix of every :class:`Outer` in ``forms``."""
        cache = cls()
        for f in forms:
            if isinstance(f, Outer):
                cache.expect(f.a)
        return cache


class GradForm(ABC):
    """The per-record gradients G_1..G_B of one parameter use, in some exact form."""

    @property
    @abstractmethod
    def batch(self) -> int:
        """B, the number of records."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the form's tensors live."""

    @abstractmethod
    def sq_norms(self, cache: GramCache | None = None) -> torch.Tensor:
        """(B,) float32: ||G_i||_F^2."""

    @abstractmethod
    def weighted_sum(self, factors: torch.Tensor) -> torch.Tensor:
        """sum_i factors[i] G_i, float32, shaped like the parameter."""

    @abstractmethod
    def materialize(self) -> torch.Tensor:
        """(B, *shape) float32: every G_i written out. Slow; for tests and cross terms."""

    @abstractmethod
    def grouped(self, grouping: Grouping) -> "GradForm":
        """The same form of the per-group sums sum_{i in group} G_i (batch ``grouping.size``)."""


@dataclass
class PerSample(GradForm):
    """G_i given outright: ``samples`` (B, *param.shape), float32."""

    samples: torch.Tensor

    @property
    def batch(self) -> int:
        return self.samples.shape[0]

    @property
    def device(self) -> torch.device:
        return self.samples.device

    def sq_norms(self, cache=None):
        return self.samples.flatten(1).pow(2).sum(1)

    def weighted_sum(self, factors):
        flat = factors.to(self.samples) @ self.samples.flatten(1)
        return flat.view(self.samples.shape[1:])

    def materialize(self):
        return self.samples

    def grouped(self, grouping):
        return PerSample(grouping.sum_records(self.samples))

    def merged(self, other: "PerSample") -> "PerSample":
        """The form of the summed gradient of two uses (in place: both are ours)."""
        return PerSample(self.samples.add_(other.samples))


@dataclass
class Outer(GradForm):
    """G_i = sum_t g[i,t] a[i,t]^T of a Linear weight (o, i), kept as its two factors.

    ``a``: (B, T, i) the layer's inputs; ``g``: (B, T, o) the gradients of its outputs;
    either may be bf16 under autocast.
    """

    a: torch.Tensor
    g: torch.Tensor

    @property
    def batch(self) -> int:
        return self.a.shape[0]

    @property
    def device(self) -> torch.device:
        return self.g.device

    def sq_norms(self, cache=None):
        cache = cache or GramCache()
        return (cache.gram(self.a) * cache.gram(self.g)).sum((1, 2))

    def weighted_sum(self, factors):
        g = self.g * factors.to(self.g.dtype)[:, None, None]
        return (g.flatten(0, 1).T @ self.a.flatten(0, 1)).float()

    def materialize(self):
        return torch.bmm(self.g.float().transpose(1, 2), self.a.float())

    def grouped(self, grouping):
        return Outer(grouping.concat_tokens(self.a), grouping.concat_tokens(self.g))


@dataclass
class Rows(GradForm):
    """G_i = sum_t onehot(ids[i,t]) g[i,t]^T of an embedding table (num_rows, d).

    Positions looking up ``padding_idx`` get no gradient, as in ``nn.Embedding``; their
    ``g`` is zeroed once here so no later step needs a mask.
    """

    ids: torch.Tensor  # (B, T) int64
    g: torch.Tensor  # (B, T, d)
    num_rows: int
    padding_idx: int | None = None

    def __post_init__(self) -> None:
        if self.padding_idx is not None:
            self.g = self.g.masked_fill((self.ids == self.padding_idx)[..., None], 0)

    @property
    def batch(self) -> int:
        return self.ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.g.device

    def sq_norms(self, cache=None):
        # Sum g over equal (record, id) pairs, then square: linear in B*T, not quadratic.
        batch, d = self.batch, self.g.shape[-1]
        records = torch.arange(batch, device=self.ids.device)[:, None].expand_as(self.ids)
        keys = (records * self.num_rows + self.ids).flatten()
        unique, inverse = torch.unique(keys, return_inverse=True)
        summed = torch.zeros(unique.numel(), d, dtype=torch.float32, device=self.g.device)
        summed.index_add_(0, inverse, self.g.reshape(-1, d).float())
        out = torch.zeros(batch, dtype=torch.float32, device=self.g.device)
        return out.index_add_(0, unique // self.num_rows, summed.pow(2).sum(1))

    def weighted_sum(self, factors):
        d = self.g.shape[-1]
        g = (self.g.float() * factors.to(self.g.device, torch.float32)[:, None, None]).reshape(-1, d)
        out = torch.zeros(self.num_rows, d, dtype=torch.float32, device=self.g.device)
        return out.index_add_(0, self.ids.flatten(), g)

    def materialize(self):
        out = torch.zeros(self.batch, self.num_rows, self.g.shape[-1], dtype=torch.float32, device=self.g.device)
        for i in range(self.batch):
            out[i].index_add_(0, self.ids[i], self.g[i].float())
        return out

    def grouped(self, grouping):
        # Padding slots look up row 0 with a zero gradient; g already has the padding
        # row's positions zeroed, so the new form needs no padding_idx.
        return Rows(grouping.concat_tokens(self.ids), grouping.concat_tokens(self.g), self.num_rows)


# ---------------------------------------------------------------------- cross terms
def _dense_dense(x: PerSample, y: PerSample) -> torch.Tensor:
    return (x.samples.flatten(1) * y.samples.flatten(1)).sum(1)


def _dense_outer(x: PerSample, y: Outer) -> torch.Tensor:
    # <D_i, sum_t g_t a_t^T> = sum_t g_t . (D_i a_t)
    return (torch.bmm(y.a.float(), x.samples.transpose(1, 2)) * y.g.float()).sum((1, 2))


def _dense_rows(x: PerSample, y: Rows) -> torch.Tensor:
    # <D_i, sum_t e_id g_t^T> = sum_t D_i[id_t] . g_t
    d = y.g.shape[-1]
    picked = torch.gather(x.samples, 1, y.ids[..., None].expand(-1, -1, d))
    return (picked * y.g.float()).sum((1, 2))


def _outer_outer(x: Outer, y: Outer) -> torch.Tensor:
    # sum_{t,s} (a_t . a'_s)(g_t . g'_s)
    a = torch.bmm(x.a.float(), y.a.float().transpose(1, 2))
    g = torch.bmm(x.g.float(), y.g.float().transpose(1, 2))
    return (a * g).sum((1, 2))


def _outer_rows(x: Outer, y: Rows) -> torch.Tensor:
    # A tied output head (weight V x d) and input embedding:
    # <sum_s g_s h_s^T, sum_t e_{id_t} e_t^T> = sum_{s,t} g_s[id_t] (h_s . e_t)
    length = y.ids.shape[1]
    picked = torch.gather(x.g.float(), 2, y.ids[:, None, :].expand(-1, x.g.shape[1], length))
    dots = torch.bmm(x.a.float(), y.g.float().transpose(1, 2))
    return (picked * dots).sum((1, 2))


def _rows_rows(x: Rows, y: Rows) -> torch.Tensor:
    same = (x.ids[:, :, None] == y.ids[:, None, :]).float()
    return (torch.bmm(x.g.float(), y.g.float().transpose(1, 2)) * same).sum((1, 2))


_INNER: dict[tuple[type, type], Callable[[GradForm, GradForm], torch.Tensor]] = {
    (PerSample, PerSample): _dense_dense,
    (PerSample, Outer): _dense_outer,
    (PerSample, Rows): _dense_rows,
    (Outer, Outer): _outer_outer,
    (Outer, Rows): _outer_rows,
    (Rows, Rows): _rows_rows,
}


def inner(x: GradForm, y: GradForm) -> torch.Tensor:
    """(B,) float32: <X_i, Y_i>, the per-record inner product of two uses' gradients."""
    fn = _INNER.get((type(x), type(y)))
    if fn is not None:
        return fn(x, y)
    fn = _INNER.get((type(y), type(x)))
    if fn is not None:
        return fn(y, x)
    raise TypeError(f"no inner product between {type(x).__name__} and {type(y).__name__}")


def merge_dense(forms: Sequence[GradForm]) -> list[GradForm]:
    """The same uses with all :class:`PerSample` forms summed into one (fewer cross terms)."""
    dense = [f for f in forms if isinstance(f, PerSample)]
    rest = [f for f in forms if not isinstance(f, PerSample)]
    if len(dense) > 1:
        total = PerSample(dense[0].samples.clone())
        for f in dense[1:]:
            total = total.merged(f)
        dense = [total]
    return dense + rest


def total_sq_norms(forms: Sequence[GradForm], cache: GramCache | None = None) -> torch.Tensor:
    """(B,) ||sum_u G_{u,i}||^2 over the uses ``forms`` of one parameter, cross terms included."""
    forms = merge_dense(forms)
    total = forms[0].sq_norms(cache)
    for j, x in enumerate(forms):
        if j:
            total = total + x.sq_norms(cache)
        for y in forms[j + 1:]:
            total = total + 2 * inner(x, y)
    return total


def total_weighted_sum(forms: Sequence[GradForm], factors: torch.Tensor) -> torch.Tensor:
    """sum_i factors[i] sum_u G_{u,i}: one parameter's clipped gradient sum, float32."""
    total = forms[0].weighted_sum(factors)
    for f in forms[1:]:
        total = total.add_(f.weighted_sum(factors))
    return total
