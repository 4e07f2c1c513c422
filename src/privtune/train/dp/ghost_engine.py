"""privtune's own per-record clipping engine: ghost norms and book-keeping, one backward.

Why not only Opacus: its hooks mode materialises every record's gradient of every
trainable parameter (B copies of the model for full fine-tuning) and still lets
autograd form the ordinary summed gradient; its ghost mode needs a second backward pass,
refuses tied embeddings and runs HF's RMSNorm classes through a slow generic fallback
(measurements in issue 4 and BENCHMARKS.md). This engine follows Bu et al. 2023
("Differentially Private Optimization on Large Model at Small Cost",
https://arxiv.org/abs/2210.00038, "book-keeping"):

1. one forward and one backward pass; each supported layer (``layers.py``) returns
   only its input gradient and keeps its per-record weight gradients in the cheapest
   exact form (``grad_forms.py``): ghost-norm factors (activations a, output
   gradients g) for big Linears, the gradients themselves for small parameters (norms,
   biases, LoRA), looked-up rows for embeddings - chosen per layer and call by cost;
2. the per-record norms over all parameters, with the cross terms of parameters used
   twice (an input embedding tied to the output head: its per-record gradient is the
   sum of both uses, so its norm is not the sum of the two norms);
3. the clipped sum sum_i c_i G_i per parameter from the kept forms (for a ghost Linear
   one matmul of the c-weighted g with a), added to the float32 accumulator of the base
   class, which adds the noise in ``finish_step``.

User-level clipping regroups the kept forms of a chunk into per-person forms before
step 2 (``grouping.py``): a person's summed Linear gradient is the ghost form of their
records laid end to end on the token axis, so ghost norms and cross terms (tied
parameters) stay exact.

A trainable layer of a class without a rule fails at :meth:`GhostClipper.attach`, and a
trainable parameter that reaches autograd outside the rules (used by some other code
path) fails at the first step: nothing is ever silently left unclipped.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from privtune.errors import PrivtuneError
from privtune.train.dp.engine import PerSampleClipper, check_positive, clip_factors, register_engine
from privtune.train.dp.grad_forms import GradForm, GramCache, PerSample, total_sq_norms, total_weighted_sum
from privtune.train.dp.layers import rule_for

LINEAR_MODES = ("auto", "ghost", "per-sample")


def linear_uses_per_sample(mode: str, tokens: int, d_in: int, d_out: int) -> bool:
    """Whether a Linear's per-record weight gradients are written out (else ghost norms).

    ``auto``: when they take no more memory than the activations ghost norms keep,
    d_in*d_out <= tokens*(d_in+d_out); that is also exactly when they are cheaper to
    compute (see ``layers.LinearRule``).
    """
    if mode == "auto":
        return d_in * d_out <= tokens * (d_in + d_out)
    return mode == "per-sample"


def _unsupported(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """(supported trainable layers, descriptions of the trainable layers we cannot handle)."""
    layers, problems = [], []
    for name, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        kind = type(module).__name__
        rule = rule_for(module)
        if rule is None:
            problems.append(f"{name or 'the model'} ({kind})")
            continue
        issue = rule.problem(module)
        extra = [n for n in own if n not in rule.params]
        if issue:
            problems.append(f"{name} ({kind}): {issue}")
        elif extra:
            problems.append(f"{name} ({kind}) has parameters {extra} the {kind} rule does not cover")
        elif "forward" in module.__dict__:
            problems.append(f"{name} ({kind}) already has its forward replaced (accelerate hooks?)")
        else:
            layers.append((name, module))
    return layers, problems


class _StepRecorder:
    """Collects the forms of one backward pass, per parameter index (the layers' Recorder)."""

    def __init__(self, index: dict[int, int], mode: str) -> None:
        self.index = index  # id(parameter) -> position in the clipper's parameter list
        self.mode = mode
        self.names: dict[int, str] = {}  # id(module) -> name, for errors and choices
        self.batch = 0
        self.active = False
        self.forms: dict[int, list[GradForm]] = {}
        self.choices: Counter[str] = Counter()

    def use_per_sample(self, tokens: int, d_in: int, d_out: int) -> bool:
        return linear_uses_per_sample(self.mode, tokens, d_in, d_out)

    def record(self, module: nn.Module, forms: dict[str, GradForm]) -> None:
        name = self.names.get(id(module), type(module).__name__)
        if not self.active:
            raise RuntimeError(f"a backward pass reached {name} outside accumulate_clipped; the DP engine "
                               "is attached, so call clipper.detach() before other backward passes")
        for pname, form in forms.items():
            if form.batch != self.batch:
                raise RuntimeError(
                    f"{name} ran on a tensor whose first dimension is {form.batch}, not the {self.batch} "
                    "records of the batch; per-record gradients need batch-first inputs to every layer")
            i = self.index[id(getattr(module, pname))]
            self.choices[f"{type(module).__name__}.{pname}:{type(form).__name__}"] += 1
            kept = self.forms.setdefault(i, [])
            if isinstance(form, PerSample):
                dense = next((k for k, f in enumerate(kept) if isinstance(f, PerSample)), None)
                if dense is not None:  # a second use: add, so one dense copy is kept
                    kept[dense] = kept[dense].merged(form)
                    continue
            kept.append(form)


@register_engine("privtune")
class GhostClipper(PerSampleClipper):
    """Per-record clipping with ghost norms and book-keeping, in a single backward pass.

    Args:
        linear_mode: ``auto`` picks per Linear layer and call the cheaper of ghost norms
            and written-out per-record gradients; ``ghost`` / ``per-sample`` force one
            (for tests and benchmarks).

    Memory: the inputs and output gradients of ghost-normed Linears are kept until the
    end of the backward pass, instead of the summed gradient being formed on the way.
    """

    def __init__(self, linear_mode: str = "auto") -> None:
        super().__init__()
        if linear_mode not in LINEAR_MODES:
            raise PrivtuneError(f"unknown linear mode {linear_mode!r}", f"use one of: {', '.join(LINEAR_MODES)}")
        self.linear_mode = linear_mode
        self._layers: list[nn.Module] = []
        self._recorder: _StepRecorder | None = None

    # ------------------------------------------------------------------ engine API
    def attach(self, model: nn.Module) -> nn.Module:
        if self._recorder is not None:
            raise RuntimeError("this clipper is already attached; call detach() first")
        layers, problems = _unsupported(model)
        if problems:
            raise PrivtuneError(
                "the privtune DP engine has no per-record gradient rule for these trainable layers: "
                + "; ".join(problems),
                "freeze them (e.g. train LoRA adapters with dp-lora), or use dp.engine: opacus")
        params = [p for p in model.parameters() if p.requires_grad]
        self._start(params)
        recorder = _StepRecorder({id(p): i for i, p in enumerate(params)}, self.linear_mode)
        for name, module in layers:
            recorder.names[id(module)] = name
            module.forward = rule_for(module).forward(module, recorder)
            self._layers.append(module)
        self._recorder = recorder
        return model

    def detach(self) -> None:
        for module in self._layers:
            module.__dict__.pop("forward", None)
        self._layers = []
        self._recorder = None

    def accumulate_clipped(self, per_sample_loss: torch.Tensor, max_grad_norm: float,
                           groups: torch.Tensor | None = None) -> torch.Tensor:
        recorder = self._recorder
        if recorder is None:
            raise RuntimeError("accumulate_clipped called before attach")
        if per_sample_loss.dim() != 1 or per_sample_loss.numel() == 0:
            raise ValueError(f"expected a non-empty (B,) per-record loss, got shape {tuple(per_sample_loss.shape)}")
        check_positive("max_grad_norm", max_grad_norm, "set dp.max_grad_norm above 0 (1.0 is usual)")
        grouping = self._grouping(per_sample_loss, groups)
        batch = per_sample_loss.shape[0]
        try:
            self._backward(per_sample_loss, recorder)
            units = batch
            if grouping is not None:  # every form becomes the form of the people's sums
                recorder.forms = {i: [f.grouped(grouping) for f in forms] for i, forms in recorder.forms.items()}
                units = grouping.size
                del grouping  # it holds the regrouped tensors; the forms hold them now
            norms = self._norms(recorder, units, per_sample_loss.device)
            factors = clip_factors(norms, max_grad_norm)
            for i in sorted(recorder.forms):
                forms = recorder.forms.pop(i)  # free each parameter's activations once used
                self._add_to_sum(i, total_weighted_sum(forms, factors.to(forms[0].device)))
                del forms
        finally:
            recorder.forms = {}
        self.records_in_step += batch
        return norms.detach()

    @property
    def last_choices(self) -> dict[str, int]:
        """How many uses of each (layer class, parameter, form) the last backward pass made."""
        return dict(self._recorder.choices) if self._recorder is not None else {}

    # ------------------------------------------------------------------ steps
    def _backward(self, loss: torch.Tensor, recorder: _StepRecorder) -> None:
        # Gradients already on the parameters (set by finish_step, not yet zeroed) are
        # put aside so that any new one must come from a use the rules did not see.
        kept_grads = [p.grad for p in self._params]
        for p in self._params:
            p.grad = None
        recorder.batch, recorder.active, recorder.forms = loss.shape[0], True, {}
        recorder.choices.clear()
        try:
            loss.sum().backward()
        finally:
            recorder.active = False
        stray = [i for i, p in enumerate(self._params) if p.grad is not None]
        for p, g in zip(self._params, kept_grads):
            p.grad = g
        if stray:
            raise RuntimeError(
                f"{len(stray)} trainable parameter(s) got an ordinary gradient, so some code uses them "
                "outside the layers the DP engine handles (shapes: "
                f"{[tuple(self._params[i].shape) for i in stray[:3]]}); their per-record gradients would "
                "be unclipped - freeze them or use dp.engine: opacus")

    def _norms(self, recorder: _StepRecorder, batch: int, device: torch.device) -> torch.Tensor:
        squares = torch.zeros(batch, dtype=torch.float32, device=device)
        cache = GramCache.for_forms(f for forms in recorder.forms.values() for f in forms)
        for forms in recorder.forms.values():
            squares += total_sq_norms(forms, cache).to(device)
        return squares.sqrt()
