"""Methods that train a chosen subset of the model's own weights (no adapter).

Both freeze everything, then unfreeze by structure rather than by parameter name, so
they work on every family without a per-family table. The trained model is an ordinary
Hugging Face model and is saved whole (``save_pretrained``), like full fine-tuning:
saving only the trained tensors would need a loader of our own for a few MB saved.

- **head-only**: the last transformer block, the final norm and the output head - the
  classic "retrain the top" baseline. Where the family ties the head to the input
  embedding (Llama/SmolLM2, Gemma) there is one matrix, so it trains, and the input
  embedding moves with it: untying would change the architecture of the saved model
  and double its largest matrix. The trainable count says so (it includes that matrix).
- **bitfit** (Ben Zaken et al., 2022, https://arxiv.org/abs/2106.10199): every bias,
  plus the norms' scale (and shift) weights. Llama-family models (SmolLM2, Gemma) have
  no biases at all, so there it trains the norm weights alone; GPT-NeoX and Qwen
  (q/k/v biases) train their biases too.
"""

from __future__ import annotations

from torch import nn

from privtune.errors import PrivtuneError


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the ModuleList with one entry per hidden layer."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers:
            return module
    raise PrivtuneError(f"cannot find the transformer blocks of this {type(model).__name__}",
                        "use lora or fft for this model")


def train_head_only(model: nn.Module) -> nn.Module:
    """Unfreeze the last block, whatever sits between the blocks and the head, and the head."""
    _freeze(model)
    blocks = transformer_blocks(model)
    head = model.get_output_embeddings()
    if head is None:
        raise PrivtuneError(f"{type(model).__name__} has no output head", "use lora or fft for this model")
    for p in blocks[-1].parameters():
        p.requires_grad_(True)
    for p in head.parameters():
        p.requires_grad_(True)
    # The decoder's own direct children other than the blocks and the input embedding:
    # the final norm (rotary tables and dropout have no parameters).
    decoder = model.base_model
    skip = {id(blocks), id(model.get_input_embeddings())}
    for child in decoder.children():
        if id(child) not in skip:
            for p in child.parameters():
                p.requires_grad_(True)
    return model


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def train_bitfit(model: nn.Module) -> nn.Module:
    """Unfreeze every bias and every norm's weights."""
    _freeze(model)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias" or _is_norm(module):
                p.requires_grad_(True)
    return model
