"""Step time of one run trained data-parallel (``torchrun``, gloo on the CPU) against one process.

Rows: 1 process x 1 thread, 1 process x N threads and N processes x 1 thread, each for
non-private full fine-tuning and DP full fine-tuning (privtune engine). The model is a
random-initialised architecture of ``dp_engines.py`` (same trainable set: blocks), every
step holds exactly ``--batch`` records (DP's Poisson rate is 1), split evenly over the
processes; the first step is a warm-up, the median of the rest is reported. Each row runs
in a fresh ``torchrun --standalone`` (or plain) subprocess. Usage:

    python benchmarks/data_parallel.py                        # SmolLM2-135M, 8 x 64, 2 processes
    python benchmarks/data_parallel.py --arch tiny --batch 8 --seq 32 --steps 5

On a machine with as many cores as threads in total, N processes x 1 thread do the same
arithmetic as 1 process x N threads; data parallelism wins only where one process cannot
use the hardware (several GPUs, or machines), and here it shows its overhead: the
all-reduce of every trainable gradient per step, and one model copy per process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from privtune.config import DPSettings
from privtune.measures.efficiency import PeakMemory
from privtune.train import distributed
from privtune.train.loop import TrainPlan, train
from privtune.train.precision import Runtime

from dp_engines import ARCHS, hardware, prepare, synthetic_data  # the sibling benchmark: same models


def run_row(method: str, args) -> dict:
    torch.set_num_threads(args.threads)
    group = distributed.init_from_env("cpu") if distributed.launched_by_torchrun() else None
    torch.manual_seed(0)
    model = prepare(AutoModelForCausalLM.from_config(ARCHS[args.arch](), dtype=torch.float32), "full", "blocks", 8)
    data = synthetic_data(args.batch, args.seq, model.config.vocab_size)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp") if method == "dp-fft" else None
    plan = TrainPlan(epochs=args.steps + 1, batch_size=args.batch, physical_batch_size=args.batch,
                     lr=1e-5, weight_decay=0.0, seed=0, dp=dp)
    marks: list[float] = []
    with PeakMemory(torch.device("cpu")) as memory:
        train(model, data, plan, Runtime(torch.device("cpu"), "fp32"), on_step=lambda: marks.append(time.perf_counter()))
    steps = [b - a for a, b in zip(marks, marks[1:])]  # drops the warm-up step
    peak = group.max_float(memory.peak_bytes) if group else memory.peak_bytes
    row = {"method": method, "processes": group.world_size if group else 1, "threads": args.threads,
           "s_per_step": statistics.median(steps), "steps": [round(s, 3) for s in steps], "peak_gib": peak / 2**30}
    if group:
        distributed.shutdown()
    return row if group is None or group.is_main else {}


def run_in_subprocess(method: str, processes: int, threads: int, argv: list[str]) -> dict:
    script = [__file__, *argv, "--row", method, "--threads", str(threads)]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
                if processes > 1 else [sys.executable])
    done = subprocess.run(launcher + script, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"method": method, "processes": processes, "threads": threads, "error": tail[:160]}
    return next(json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"method"'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="smollm2-135m", choices=list(ARCHS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (one more runs first, as warm-up)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)  # internal, per row
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one method, print JSON
    args = parser.parse_args()
    if args.row:
        row = run_row(args.row, args)
        if row:
            print(json.dumps(row))
        return
    argv = sys.argv[1:]
    n = args.processes
    rows = []
    for method in ("fft", "dp-fft"):
        for processes, threads in ((1, 1), (1, n), (n, 1)):
            rows.append(run_in_subprocess(method, processes, threads, argv))
            print(f"  done: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    print(f"\n`python benchmarks/data_parallel.py {' '.join(argv)}`\n")
    print(f"{args.arch}, batch {args.batch} x {args.seq}, cpu fp32, {hardware(torch.device('cpu'), 1).rsplit(',', 1)[0]}, "
          f"torch {torch.__version__}; median of {args.steps} steps after one warm-up; peak = max over processes "
          f"of sampled RSS\n")
    print("| method | processes x threads | s/step | vs 1 x 1 | peak GiB per process |")
    print("|---|---|---|---|---|")
    for method in ("fft", "dp-fft"):
        mine = [r for r in rows if r["method"] == method]
        base = mine[0].get("s_per_step")
        for r in mine:
            if "error" in r:
                print(f"| {method} | {r['processes']} x {r['threads']} | failed: {r['error']} | | |")
                continue
            ratio = f"{r['s_per_step'] / base:.2f}x" if base else ""
            print(f"| {method} | {r['processes']} x {r['threads']} | {r['s_per_step']:.3f} | {ratio} | "
                  f"{r['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
