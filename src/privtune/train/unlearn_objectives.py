"""Unlearning objectives: what a model minimises to forget a set of records.

Each is a forget term on the forget set, optionally plus a retain term on the rest of
the training set that keeps the model from forgetting everything else:

- ``unlearn-ga``: gradient ascent on the forget set (Jang et al., 2023, "Knowledge
  Unlearning for Mitigating Privacy Risks in Language Models",
  https://arxiv.org/abs/2210.01504): minimise −NLL, the training loss with its sign
  flipped. Unbounded below, so it soon wrecks the model (Zhang et al. call this
  "catastrophic collapse").
- ``unlearn-ga-retain``: the same plus the NLL of retain records ("gradient difference",
  Liu et al., 2022, "Continual Learning and Private Unlearning",
  https://arxiv.org/abs/2203.12817; Maini et al., 2024, TOFU, https://arxiv.org/abs/2401.06121).
- ``unlearn-ga-kl``: gradient ascent plus KL(source ‖ model) on retain records, so the
  model keeps the source's whole next-token distribution there, not just its top token
  (TOFU's "KL minimisation").
- ``unlearn-npo``: Negative Preference Optimization (Zhang, Lin, Bai & Mei, 2024,
  https://arxiv.org/abs/2404.05868): ``L = (2/β) E[log(1 + (π_θ(y|x) / π_ref(y|x))^β)]``
  over forget records, the source model as reference; optionally plus the retain NLL
  ("NPO+RT" in the paper) with ``retain_weight`` > 0. Its gradient is GA's reweighted
  by ``2 σ(β log-ratio)``, which falls to zero as the forget records become unlikely, so
  it diverges far more slowly than GA. β → 0 recovers GA.

Units. GA's forget term uses each record's *mean* token NLL, exactly the training loss
negated (so a GA step of learning rate η undoes a training step of the same size).
NPO's π(y|x) is the *sequence* likelihood, as in the paper: ``log π = −(summed NLL)``.
The retain NLL and KL are means over a record's tokens, averaged over records.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from privtune.train.losses import IGNORE_INDEX, per_token_nll


@dataclass(frozen=True)
class Objective:
    """One unlearning method.

    Attributes:
        name: the name study configs use (``method:``).
        forget: the forget term: ``ga`` (−mean NLL) or ``npo``.
        retain: the retain term: ``nll``, ``kl`` (to the source), or None (none at all).
        default_retain_weight: its weight when the config leaves ``retain_weight`` unset.
        retain_optional: a retain weight of 0 is allowed (NPO alone, or NPO+RT).
    """

    name: str
    forget: str
    retain: str | None
    default_retain_weight: float
    retain_optional: bool = False

    def check_retain_weight(self, weight: float) -> str | None:
        """Why ``weight`` does not suit this method, or None."""
        if self.retain is None and weight:
            return f"{self.name} has no retain term; use unlearn-ga-retain or unlearn-ga-kl for one"
        if self.retain is not None and not self.retain_optional and weight <= 0:
            return f"{self.name} needs retain_weight > 0; use unlearn-ga for gradient ascent alone"
        return None


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("unlearn-ga", "ga", None, 0.0),
    Objective("unlearn-ga-retain", "ga", "nll", 1.0),
    Objective("unlearn-ga-kl", "ga", "kl", 1.0),
    Objective("unlearn-npo", "npo", "nll", 0.0, retain_optional=True),
)}

#: β of NPO when the config leaves it unset (the paper's default for TOFU).
DEFAULT_BETA = 0.1


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) summed next-token NLL of each record, and (B,) its number of scored tokens."""
    nll = per_token_nll(logits, labels)
    return nll.sum(dim=1), (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).clamp_min(1)


def ga_loss(nll_sum: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B,) gradient-ascent loss: minus each record's mean token NLL."""
    return -(nll_sum / counts)


def npo_loss(nll_sum: torch.Tensor, ref_nll_sum: torch.Tensor, beta: float) -> torch.Tensor:
    """(B,) NPO loss ``(2/β) log(1 + (π_θ/π_ref)^β)`` from summed NLLs.

    ``log(π_θ/π_ref) = ref_nll − nll``, and ``log(1 + e^z)`` is ``softplus(z)``, which
    stays finite where the ratio under- or overflows.
    """
    return (2.0 / beta) * F.softplus(beta * (ref_nll_sum - nll_sum))


def retain_kl(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) KL(reference ‖ model) of the next-token distributions, mean over each record's
    scored positions (the positions the NLL is taken at)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    ref_logp = torch.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)  # (B, T-1)
    scored = labels[:, 1:] != IGNORE_INDEX
    return (kl * scored).sum(dim=1) / scored.sum(dim=1).clamp_min(1)
