"""Per-record clipping with Opacus's ``GradSampleModule`` in hooks mode.

Opacus (https://github.com/pytorch/opacus) computes per-record gradients with forward
and backward hooks on every trainable layer and stores them as ``param.grad_sample``
(B, *param.shape). We use that and nothing else of Opacus's training machinery: the
clipping, the float32 accumulation over physical chunks and the noise are ours (see
``engine.py``), so the same loop drives every engine and no ``DPOptimizer`` or
``DPDataLoader`` hides a step.

User-level clipping (``groups`` given) sums each person's per-record gradients with an
``index_add`` over the batch dimension and clips the sums.

What the hooks get right and what we add:

* Tied weights (Llama/Gemma input embedding = output head): Opacus counts the forward
  uses of a parameter and sums the per-record gradients of all uses before publishing
  ``grad_sample``; the tests check this against per-record backward passes.
* HF's RMSNorm classes are not ``nn.RMSNorm``, so Opacus uses its generic functorch
  fallback for them: correct, slower.
* Gemma's ``*ScaledWordEmbedding`` multiplies the lookup by a constant buffer; Opacus's
  functorch fallback refuses layers with buffers, so we register an exact grad sampler
  for it below (the ``nn.Embedding`` one, scaled).
* Opacus's strict check rejects any trainable layer with buffers. Persistent buffers
  (BatchNorm running statistics) are state learned from the data and outside the DP
  analysis, so we reject those too; non-persistent buffers are constants derived from
  the config (they are not even saved) and are allowed.
"""

from __future__ import annotations

import importlib
import warnings

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.embedding import compute_embedding_grad_sample
from opacus.grad_sample.utils import register_grad_sampler
from opacus.validators import ModuleValidator
from torch import nn

from privtune.errors import PrivtuneError
from privtune.train.dp.engine import PerSampleClipper, clip_factors, check_positive, register_engine

# (module, class) of HF embeddings computing ``embedding(ids) * embed_scale``.
_SCALED_EMBEDDINGS = (
    ("transformers.models.gemma.modeling_gemma", "GemmaTextScaledWordEmbedding"),
    ("transformers.models.gemma3.modeling_gemma3", "Gemma3TextScaledWordEmbedding"),
    ("transformers.models.gemma4.modeling_gemma4", "Gemma4TextScaledWordEmbedding"),
    ("transformers.models.vaultgemma.modeling_vaultgemma", "VaultGemmaTextScaledWordEmbedding"),
)


def _scaled_embedding_grad_sample(layer: nn.Embedding, activations, backprops: torch.Tensor):
    """Per-record gradient of ``embedding(ids) * embed_scale``: the plain one, scaled.

    The padding row gets no gradient, as in ``nn.Embedding``'s own backward.
    """
    scale = layer.embed_scale.to(layer.weight.dtype)
    grads = compute_embedding_grad_sample(layer, activations, backprops * scale.to(backprops.dtype))
    if layer.padding_idx is not None and layer.weight in grads:
        grads[layer.weight][:, layer.padding_idx] = 0
    return grads


def _register_scaled_embeddings() -> None:
    for module_name, class_name in _SCALED_EMBEDDINGS:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue  # not in this transformers version
        if cls not in GradSampleModule.GRAD_SAMPLERS:
            register_grad_sampler(cls)(_scaled_embedding_grad_sample)


_register_scaled_embeddings()


def _has_own_trainable_params(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _unsupported_layers(model: nn.Module) -> list[str]:
    """Descriptions of trainable layers Opacus cannot give exact per-record gradients."""
    problems = [str(e).split("\n")[0] for e in ModuleValidator.validate(model, strict=False)]
    for name, module in model.named_modules():
        if not _has_own_trainable_params(module):
            continue
        persistent = [b for b, _ in module.named_buffers(recurse=False)
                      if b not in module._non_persistent_buffers_set]
        kind = type(module).__name__
        if persistent:
            problems.append(f"{name} ({kind}) keeps running state in buffers {persistent}")
        elif list(module.buffers(recurse=False)) and type(module) not in GradSampleModule.GRAD_SAMPLERS:
            problems.append(f"{name} ({kind}) has buffers and no per-record gradient rule")
    return problems


@register_engine("opacus")
class OpacusClipper(PerSampleClipper):
    """Materialises per-record gradients with Opacus hooks, then clips and sums them.

    Memory is one float copy of every trainable parameter per record of a physical
    batch, so lower the physical batch size for full fine-tuning of larger models.
    """

    def __init__(self) -> None:
        super().__init__()
        self._gsm: GradSampleModule | None = None

    def attach(self, model: nn.Module) -> nn.Module:
        if self._gsm is not None:
            raise RuntimeError("this clipper is already attached; call detach() first")
        problems = _unsupported_layers(model)
        if problems:
            raise PrivtuneError(
                "Opacus cannot compute per-record gradients for these trainable layers: "
                + "; ".join(problems),
                "freeze them (e.g. train LoRA adapters with dp-lora), or replace them "
                "(BatchNorm by GroupNorm, see opacus.validators.ModuleValidator.fix)")
        params = [p for p in model.parameters() if p.requires_grad]
        self._start(params)
        try:
            self._gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
        except NotImplementedError as e:
            raise PrivtuneError(f"Opacus cannot compute per-record gradients for this model: {e}",
                                "freeze the offending layers or train LoRA adapters (dp-lora)") from None
        return self._gsm

    def detach(self) -> None:
        if self._gsm is not None:
            self._gsm.cleanup()  # removes hooks and the grad_sample attributes
            self._gsm = None

    def accumulate_clipped(self, per_sample_loss: torch.Tensor, max_grad_norm: float,
                           groups: torch.Tensor | None = None) -> torch.Tensor:
        if self._gsm is None:
            raise RuntimeError("accumulate_clipped called before attach")
        if per_sample_loss.dim() != 1 or per_sample_loss.numel() == 0:
            raise ValueError(f"expected a non-empty (B,) per-record loss, got shape {tuple(per_sample_loss.shape)}")
        check_positive("max_grad_norm", max_grad_norm, "set dp.max_grad_norm above 0 (1.0 is usual)")
        if not self._gsm._module.training:
            raise RuntimeError("Opacus records per-record activations only in train mode; call model.train()")
        grouping = self._grouping(per_sample_loss, groups)
        batch = per_sample_loss.shape[0]
        units = grouping.size if grouping is not None else batch

        def per_unit(gs: torch.Tensor) -> torch.Tensor:  # a person's gradient: the sum of their records'
            return grouping.sum_records(gs) if grouping is not None else gs

        with warnings.catch_warnings():
            # Opacus hooks the token embedding, whose integer input needs no gradient;
            # torch warns about that case, which is expected here.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            per_sample_loss.sum().backward()
        try:
            samples = [self._grad_sample(p, batch) for p in self._params]
            # Two passes (norms, then the weighted sum) so only one float32 copy of one
            # parameter's per-record gradients exists at a time under bf16.
            squares = torch.zeros(units, dtype=torch.float32, device=per_sample_loss.device)
            for gs in samples:
                if gs is not None:
                    squares += per_unit(gs).flatten(1).float().pow(2).sum(dim=1).to(squares.device)
            norms = squares.sqrt()
            factors = clip_factors(norms, max_grad_norm)
            for i, gs in enumerate(samples):
                if gs is not None:
                    f = factors.to(gs.device)
                    self._add_to_sum(i, torch.einsum("b,b...->...", f, per_unit(gs).float()))
        finally:
            self._clear_per_sample_state()
        self.records_in_step += batch
        return norms.detach()

    def _grad_sample(self, p: nn.Parameter, batch: int) -> torch.Tensor | None:
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            if p.grad is not None:
                raise RuntimeError(
                    "a trainable parameter got a gradient but no per-record gradient; was the "
                    "forward pass run through the attached module, in train mode?")
            return None  # the parameter did not take part in this forward pass
        if isinstance(gs, list) or gs.shape[0] != batch:
            raise RuntimeError("per-record gradients of several backward passes were mixed; "
                               "call accumulate_clipped once per forward pass")
        return gs

    def _clear_per_sample_state(self) -> None:
        for p in self._params:
            p.grad_sample = None
            p.grad = None
