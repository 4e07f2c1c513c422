"""Step time and peak memory of each fine-tuning method, as ratios within one run.

Random-initialised models of the real architectures (no weights needed, so it runs on a
lent GPU too), driven through privtune's own training loop, so what is timed is what a
study runs. Usage:

    python benchmarks/step_times.py                       # SmolLM2-135M arch, CPU or GPU
    python benchmarks/step_times.py --arch pythia-1b --batch 16 --seq 256 --steps 6

Prints a markdown table: median seconds per logical step (first step excluded), peak
memory (CUDA max-allocated, or sampled RSS on CPU), and each private method's ratio to
its non-private twin.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

from privtune.config import DPSettings, LoraSettings
from privtune.data.records import Record
from privtune.data.tokenize import EncodedDataset
from privtune.measures.efficiency import PeakMemory
from privtune.train.loop import TrainPlan, train
from privtune.train.methods import get_method
from privtune.train.precision import resolve_runtime

ARCHS = {
    # SmolLM2-135M: Llama, tied embeddings.
    "smollm2-135m": lambda: LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                        tie_word_embeddings=True, max_position_embeddings=2048),
    # Pythia-1B: GPT-NeoX, fused QKV, LayerNorm.
    "pythia-1b": lambda: GPTNeoXConfig(vocab_size=50304, hidden_size=2048, intermediate_size=8192,
                                       num_hidden_layers=16, num_attention_heads=8, rotary_pct=0.25,
                                       max_position_embeddings=2048, tie_word_embeddings=False),
}


def synthetic_data(n: int, seq: int, vocab: int) -> EncodedDataset:
    ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    return EncodedDataset([Record(str(i), str(i), "") for i in range(n)], ids, torch.ones_like(ids),
                          torch.zeros_like(ids, dtype=torch.bool))


def time_method(base, method_name: str, data, args, runtime) -> dict:
    method = get_method(method_name)
    model = method.prepare(copy.deepcopy(base), LoraSettings(r=8)).to(runtime.device)
    # Noise from a fixed multiplier: the accountant is not what is being timed.
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0) if method.private else None
    plan = TrainPlan(epochs=1, batch_size=args.batch, physical_batch_size=args.batch, lr=1e-5,
                     weight_decay=0.0, seed=0, dp=dp)
    marks = []
    with PeakMemory(runtime.device) as memory:
        train(model, data, plan, runtime, on_step=lambda: marks.append(time.perf_counter()))
    steps = [b - a for a, b in zip(marks, marks[1:])]  # drops the warm-up step
    return {"method": method_name, "s_per_step": statistics.median(steps), "peak_gb": memory.peak_bytes / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="smollm2-135m", choices=list(ARCHS))
    parser.add_argument("--methods", default="fft,dp-fft,lora,dp-lora")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (one more is run as warm-up)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    runtime = resolve_runtime(args.device, args.precision)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(ARCHS[args.arch](), dtype=torch.float32)
    # Poisson sampling draws batch/N of the data per step; N = batch * (steps + 1) gives steps + 1 steps.
    data = synthetic_data(args.batch * (args.steps + 1), args.seq, base.config.vocab_size)
    rows = [time_method(base, m, data, args, runtime) for m in args.methods.split(",")]
    by_name = {r["method"]: r for r in rows}

    print(f"\n{args.arch}, batch {args.batch} x {args.seq}, {runtime.device} {runtime.precision}, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads\n")
    print("| method | s/step | peak GiB | time vs non-private | memory vs non-private |")
    print("|---|---|---|---|---|")
    for r in rows:
        twin = by_name.get(r["method"].removeprefix("dp-")) if r["method"].startswith("dp-") else None
        ratio_t = f"{r['s_per_step'] / twin['s_per_step']:.2f}x" if twin else ""
        ratio_m = f"{r['peak_gb'] / twin['peak_gb']:.2f}x" if twin else ""
        print(f"| {r['method']} | {r['s_per_step']:.3f} | {r['peak_gb']:.2f} | {ratio_t} | {ratio_m} |")


if __name__ == "__main__":
    main()
