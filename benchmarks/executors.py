"""Wall time of one study grid on the local executor and on a local Ray.

Usage: ``python benchmarks/executors.py [--model tiny-llama] [--seeds 4] [--cpus 2]``.
The grid is fft, lora r=2 and lora r=4 per seed, plus the base run; each executor writes
its own database. The local executor runs one run after another with ``--cpus`` torch
threads; Ray runs ``--cpus`` one-thread runs at a time, each worker loading the model and
data once. The ratio, not the seconds, is the figure to compare across machines.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from privtune.config import parse_config
from privtune.study.driver import run_study
from privtune.study.ray_executor import RayExecutor


def grid(model: str, seeds: int, output_dir: Path):
    return parse_config({
        "name": "grid", "model": model, "output_dir": str(output_dir), "seeds": list(range(seeds)),
        "data": {"source": "customer-sim", "n_individuals": 24, "max_length": 64},
        "canaries": {"repetitions": [1, 4], "n_candidates": 32},
        "attacks": {"extraction": {"max_spans_per_type": 2, "n_samples": 1, "pii_candidates": 3}},
        "train": {"epochs": 2, "batch_size": 4, "physical_batch_size": 4},
        "methods": [{"method": "fft"}, {"method": "lora", "lora": {"r": 2}},
                    {"method": "lora", "label": "lora-r4", "lora": {"r": 4}}],
        "precision": "fp32", "save_artifacts": False,
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(args.cpus)
        cfg = grid(args.model, args.seeds, Path(tmp) / "local")
        start = time.perf_counter()
        assert run_study(cfg, show_progress=False).failed == {}
        local = time.perf_counter() - start

        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        cfg = grid(args.model, args.seeds, Path(tmp) / "ray")
        start = time.perf_counter()
        assert run_study(cfg, executor=RayExecutor(cfg, show_progress=False)).failed == {}
        on_ray = time.perf_counter() - start  # includes the workers' start-up
        ray.shutdown()
    runs = 1 + 3 * args.seeds
    print(f"{args.model}, {runs} runs, {args.cpus} CPUs, torch {torch.__version__}, ray {ray.__version__}")
    print("| executor | wall s | vs local |\n|---|---|---|")
    print(f"| local ({args.cpus} threads, one run at a time) | {local:.1f} | 1.00x |")
    print(f"| ray ({args.cpus} one-thread runs at a time) | {on_ray:.1f} | {on_ray / local:.2f}x |")


if __name__ == "__main__":
    main()
