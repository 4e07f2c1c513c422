"""Cost of the score-based attack suite relative to one forward pass (issue 3's goal: ≤ 1.2x).

All score-based attacks read the per-token cache that one forward pass fills, so the
suite costs that pass plus numpy work. This times, on the same records:

- ``forward``: a plain no-grad forward pass (logits only), the floor;
- ``cache``: ``score_tokens`` (forward + per-token NLL and Min-K%++ statistics);
- ``attacks``: ``score_attacks`` on the cached scores (5 attacks x 2 levels, with their intervals).

Usage: ``python benchmarks/attack_cost.py [--arch smollm2-135m|tiny] [--records 120]``.
Random-initialised weights: cost does not depend on them.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from privtune.attacks.mia import score_attacks
from privtune.data.corpora import generate_corpus
from privtune.data.split import split_by_individual
from privtune.data.tokenize import encode_records
from privtune.measures.token_scores import score_tokens
from privtune.models.tiny import tiny_model, tiny_tokenizer
from privtune.train.precision import resolve_runtime

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="smollm2-135m", choices=["smollm2-135m", "tiny"])
    parser.add_argument("--individuals", type=int, default=60, help="people in the corpus (1-3 records each)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    runtime = resolve_runtime("auto", "auto")
    tokenizer = tiny_tokenizer()  # only token ids matter for timing
    if args.arch == "tiny":
        model = tiny_model("llama")
    else:
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2), dtype=torch.float32)
    model.to(runtime.device).eval()
    records = generate_corpus("customer-sim", args.individuals, seed=0)
    members, nonmembers = split_by_individual(records, 0.5, seed=0)
    data = [encode_records(r, tokenizer, 128) for r in (members, nonmembers)]

    def forward_only():
        with torch.no_grad():
            for d in data:
                for s in range(0, len(d), args.batch):
                    with runtime.autocast():
                        model(input_ids=d.input_ids[s:s + args.batch].to(runtime.device),
                              attention_mask=d.attention_mask[s:s + args.batch].to(runtime.device))

    def cache():
        return [score_tokens(model, d, runtime, batch_size=args.batch) for d in data]

    def best(fn):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        return min(times), out

    t_forward, _ = best(forward_only)
    t_cache, (m, n) = best(cache)
    t_attacks, _ = best(lambda: score_attacks(m, n, m, n, members, nonmembers))
    total = t_cache + t_attacks
    print(f"{args.arch}, {len(members)} members + {len(nonmembers)} non-members, {runtime.device} "
          f"{runtime.precision}, {torch.get_num_threads()} threads, best of {args.repeats}")
    print("| step | seconds | vs forward |\n|---|---|---|")
    for name, t in (("forward pass", t_forward), ("token cache (forward + statistics)", t_cache),
                    ("score-based attacks on the cache", t_attacks), ("whole suite", total)):
        print(f"| {name} | {t:.3f} | {t / t_forward:.2f}x |")


if __name__ == "__main__":
    main()
