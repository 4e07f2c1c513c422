"""Cost of the exact canary rank search on SmolLM2-135M, for the default study's canaries.

For each model and canary this times the sampled scoring the exposure always does (the
true secret and ``--candidates`` candidates, :func:`secret_losses`) and the rank search
(:func:`search_rank`) at each ``--budget``, and prints the prefixes expanded, the batched
forward passes, the seconds and the resulting exposure, beside the skew-normal
extrapolation privtune reported before. Models:

- ``base``: SmolLM2-135M-Instruct as packaged (no canary memorised: every search runs to
  its budget, the worst case);
- ``fft``: the same fine-tuned on the canary copies alone (each inserted r times, as in
  the study), ``--epochs`` epochs of batch 8 at ``--lr`` (the default study's fft), so
  the most repeated canaries are memorised as in a study's fft run.

Usage: ``python benchmarks/exposure_search.py [--budget 1024 4096] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from privtune.data.canaries import candidate_secrets, canary_records, make_canaries
from privtune.measures.exposure import empirical_exposure, exposure_figures, extrapolated_exposure, secret_losses
from privtune.measures.rank_search import search_rank
from privtune.measures.secret_tokens import SecretTokenSpace
from privtune.models.loading import load_model
from privtune.train.precision import resolve_runtime


def fine_tune(model, tokenizer, texts: list[str], epochs: int, lr: float, autocast) -> None:
    """Plain AdamW over ``texts`` in shuffled batches of 8 (right-padded, padding not scored)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(texts), generator=generator).tolist()
        for start in range(0, len(order), 8):
            batch = tokenizer([texts[i] for i in order[start:start + 8]], padding=True, return_tensors="pt")
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            with autocast():
                loss = model(**batch, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, nargs="+", default=[1024])
    parser.add_argument("--candidates", type=int, default=128, help="the default study's n_candidates")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch", type=int, default=64, help="rows per forward pass (the study's default)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    runtime = resolve_runtime("auto", "auto")
    autocast_dtype = torch.bfloat16 if runtime.precision == "bf16" else None  # as the study's runner
    loaded = load_model("smollm2-135m")
    model, tokenizer = loaded.model.to(runtime.device), loaded.tokenizer
    canaries = make_canaries()  # the default study's: r = 1, 2, 4, 8, 16 and 2 references, seed 0
    print(f"device {runtime.device}, autocast {runtime.precision}, {args.threads} threads")
    print("| model | canary (r) | sampled s | budget | method | exposure [low, high] | skew-normal | rank [low, high] "
          "| expanded | passes | search s | search / sampled |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    totals: dict[tuple[str, int], list[float]] = {}
    for name in ("base", "fft"):
        if name == "fft":
            fine_tune(model, tokenizer, [r.text for r in canary_records(canaries)], args.epochs, args.lr,
                      runtime.autocast)
        for canary in canaries:
            candidates = candidate_secrets(canary, args.candidates, seed=0)
            started = time.perf_counter()
            losses = secret_losses(model, tokenizer, canary, [canary.secret] + candidates, batch_size=args.batch,
                                   device=runtime.device, autocast_dtype=autocast_dtype)
            sampled = time.perf_counter() - started
            estimate = empirical_exposure(losses[1:], float(losses[0]), canary.space_size)
            skew_normal = extrapolated_exposure(losses[1:], float(losses[0]), canary.space_size)  # the old figure
            space = SecretTokenSpace.build(tokenizer, canary, candidates)
            for budget in args.budget:
                bounds = search_rank(model, tokenizer, space, budget=budget, batch_size=args.batch,
                                     device=runtime.device, autocast_dtype=autocast_dtype)
                fig = exposure_figures(bounds, estimate, canary.space_size)
                totals.setdefault((name, budget), [0.0, 0.0])
                totals[(name, budget)][0] += sampled
                totals[(name, budget)][1] += bounds.seconds
                shown = f"{fig['exposure']:.1f}" + (f" [{fig['exposure_low']:.1f}, {fig['exposure_high']:.1f}]"
                                                    if fig["exposure_low"] is not None else "")
                print(f"| {name} | {canary.id} ({canary.repetitions}) | {sampled:.1f} | {budget} | "
                      f"{fig['exposure_method']} | {shown} | {skew_normal:.1f} | [{bounds.low}, {bounds.high}] | {bounds.expanded} | "
                      f"{bounds.forward_passes} | {bounds.seconds:.1f} | {bounds.seconds / sampled:.2f}x |", flush=True)
    for (name, budget), (sampled, searched) in totals.items():
        print(f"{name}, budget {budget}: all canaries sampled {sampled:.1f} s, searched {searched:.1f} s")


if __name__ == "__main__":
    main()
