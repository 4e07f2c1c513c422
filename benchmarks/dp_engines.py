"""Cost of DP-SGD per engine: step time and peak memory next to non-private training.

For one architecture (random-initialised, no weights needed) and the methods full
fine-tuning and LoRA, trains with engine ``none`` (non-private), ``opacus`` and
``privtune`` through privtune's own training loop (``privtune.train.loop.train``), so
the figures are what a study gets, and prints ONE markdown table with the ratios to
non-private side by side (a ``*-person`` row's ratios are to its engine's record-level
row, when that ran). ``opacus-person`` and ``privtune-person`` are the same engines
under user-level DP (``dp.unit: individual``): the records belong to people of
``--per-person`` records each, and each person's summed gradient is clipped; the plain
``opacus`` / ``privtune`` rows clip records of the same data (``dp.unit: record``).
Usage:

    python benchmarks/dp_engines.py                                  # SmolLM2-135M, CPU, 8 x 128
    python benchmarks/dp_engines.py --arch tiny --batch 4 --seq 32   # seconds, a smoke test
    python benchmarks/dp_engines.py --device cuda --arch pythia-1b --batch 16 --seq 256 --steps 8
    python benchmarks/dp_engines.py --engines privtune,privtune-person --per-person 2 --paired 3   # user-level cost
    python benchmarks/dp_engines.py --background-load 0,2            # quiet, then under 2 busy processes

What is measured, and how:

* Every row runs in a fresh subprocess (same seed, same initial weights), so one row's
  memory high-water mark cannot leak into the next (RSS on CPU never shrinks much).
* Each step holds exactly ``--batch`` records: the data set has ``--batch`` records and
  DP's Poisson sample rate is then 1, so private and non-private steps see the same
  tokens (a realised Poisson batch varies in size, which would blur the comparison).
  One epoch per step; the first step is a warm-up and is not timed; the median of the
  rest is reported. RDP accounting (cheap); noise multiplier 1, C = 1.
* Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, sampled process RSS on CPU
  (``privtune.measures.efficiency.PeakMemory``), over the whole ``train`` call.
* ``--background-load K`` starts K processes spinning on the CPU before the first row
  and stops them after the last (``privtune.measures.load.BackgroundLoad``), as another
  user's jobs would; a list such as ``0,2`` measures every level in turn and prints one
  table per level, so the ratios quiet and loaded come from one command. Each table
  says the 1-minute load average at its start and end (and the mean of samples every
  5 s) and the usable CPUs; each row also stores its own (``load``) in its JSON line.
* The trainable set is the same in private and non-private rows. ``full`` trains every
  parameter except the norms and the input embedding (as in issue 4's Opacus table; a
  tied output head is the same tensor, so it is frozen with it); ``--full-trainable
  all`` trains everything. ``lora`` is PEFT LoRA (default targets of the family).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

from privtune.config import DPSettings, LoraSettings
from privtune.data.records import Record
from privtune.data.tokenize import EncodedDataset
from privtune.measures.efficiency import PeakMemory, count_parameters
from privtune.measures.load import BackgroundLoad, LoadSampler
from privtune.models.tiny import tiny_config
from privtune.train.loop import TrainPlan, train
from privtune.train.methods import get_method
from privtune.train.precision import Runtime

ARCHS = {
    # SmolLM2-135M: Llama, tied embeddings.
    "smollm2-135m": lambda: LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                        tie_word_embeddings=True, max_position_embeddings=2048),
    # Pythia-1B: GPT-NeoX, fused QKV, LayerNorm, untied head.
    "pythia-1b": lambda: GPTNeoXConfig(vocab_size=50304, hidden_size=2048, intermediate_size=8192,
                                       num_hidden_layers=16, num_attention_heads=8, rotary_pct=0.25,
                                       max_position_embeddings=2048, tie_word_embeddings=False),
    "tiny": lambda: tiny_config("llama"),
}
METHODS = ("full", "lora")
ENGINES = ("none", "opacus", "privtune", "opacus-person", "privtune-person")


def synthetic_data(n: int, seq: int, vocab: int, per_person: int) -> EncodedDataset:
    """``n`` records of ``seq`` random tokens; records ``k*per_person ...`` belong to person k."""
    ids = torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    return EncodedDataset([Record(str(i), str(i // per_person), "") for i in range(n)], ids, torch.ones_like(ids),
                          torch.zeros_like(ids, dtype=torch.bool))


def dp_settings(engine: str) -> DPSettings | None:
    """``none``: no DP; ``<engine>``: record-level; ``<engine>-person``: user-level."""
    if engine == "none":
        return None
    name, _, unit = engine.partition("-")
    return DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp", engine=name,
                      unit="individual" if unit == "person" else "record")


def prepare(model: torch.nn.Module, method: str, full_trainable: str, lora_r: int) -> torch.nn.Module:
    """The model with the same trainable set whatever the engine."""
    if method == "lora":
        return get_method("lora").prepare(model, LoraSettings(r=lora_r, alpha=2 * lora_r))
    model = get_method("fft").prepare(model)
    if full_trainable == "blocks":
        model.get_input_embeddings().weight.requires_grad_(False)
        for module in model.modules():
            if "norm" in type(module).__name__.lower():
                module.requires_grad_(False)
    return model


def run_row(method: str, engine: str, args) -> dict:
    """Train one (method, engine) pair; return its median step time and peak memory."""
    device = torch.device(args.device)
    if device.type == "cuda" and args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ARCHS[args.arch](), dtype=torch.float32)
    model = prepare(model, method, args.full_trainable, args.lora_r).to(device)
    trainable, total = count_parameters(model)
    data = synthetic_data(args.batch, args.seq, model.config.vocab_size, args.per_person)
    plan = TrainPlan(epochs=args.steps + 1, batch_size=args.batch, physical_batch_size=args.batch,
                     lr=1e-5, weight_decay=0.0, seed=0, dp=dp_settings(engine))
    marks: list[float] = []
    with PeakMemory(device) as memory, LoadSampler(5.0) as load:
        train(model, data, plan, Runtime(device, args.precision), on_step=lambda: marks.append(time.perf_counter()))
    steps = [b - a for a, b in zip(marks, marks[1:])]  # drops the warm-up step
    return {"method": method, "engine": engine, "s_per_step": statistics.median(steps),
            "steps": [round(s, 4) for s in steps], "peak_gib": memory.peak_bytes / 2**30,
            "memory_kind": memory.kind, "trainable": trainable, "total": total, "load": load.record()}


def paired_ratio(method: str, engine: str, args) -> dict:
    """Median over ``--paired`` alternating runs of (user-level s/step) / (record-level s/step).

    One process and one model, record- and user-level ``train`` calls taking turns, so a
    machine whose load drifts over minutes slows both sides of each pair alike (rows in
    separate subprocesses, minutes apart, do not share that). Time only; memory comes
    from the subprocess rows.
    """
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(ARCHS[args.arch](), dtype=torch.float32)
    model = prepare(model, method, args.full_trainable, args.lora_r).to(device)
    data = synthetic_data(args.batch, args.seq, model.config.vocab_size, args.per_person)

    def seconds_per_step(unit_engine: str) -> float:
        plan = TrainPlan(epochs=args.steps + 1, batch_size=args.batch, physical_batch_size=args.batch,
                         lr=0.0, weight_decay=0.0, seed=0, dp=dp_settings(unit_engine))
        marks: list[float] = []
        train(model, data, plan, Runtime(device, args.precision), on_step=lambda: marks.append(time.perf_counter()))
        return statistics.median(b - a for a, b in zip(marks, marks[1:]))

    pairs = []
    for _ in range(args.paired):
        record = seconds_per_step(engine)
        pairs.append((record, seconds_per_step(f"{engine}-person")))
    ratios = [p / r for r, p in pairs]
    return {"method": method, "engine": engine, "ratio": statistics.median(ratios),
            "pairs": [(round(r, 3), round(p, 3)) for r, p in pairs]}


def run_in_subprocess(method: str, engine: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--row", f"{method}:{engine}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"method": method, "engine": engine, "error": tail[:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def hardware(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {threads or torch.get_num_threads()} torch threads"


def _cell(row: dict, base: dict | None) -> str:
    if "error" in row:
        return f"failed: {row['error']} | "
    time_ratio = f" ({row['s_per_step'] / base['s_per_step']:.2f}x)" if base and "error" not in base else ""
    mem_ratio = f" ({row['peak_gib'] / base['peak_gib']:.2f}x)" if base and "error" not in base else ""
    return f"{row['s_per_step']:.3f}{time_ratio} | {row['peak_gib']:.2f}{mem_ratio}"


def _baseline(by_key: dict, method: str, engine: str) -> dict | None:
    """What a row's ratios are to: a ``*-person`` row's record-level row of the same engine
    when it ran, else the non-private row (none for the non-private row itself)."""
    if engine == "none":
        return None
    record = engine.removesuffix("-person")
    if record != engine and (method, record) in by_key:
        return by_key[(method, record)]
    return by_key.get((method, "none"))


def table(rows: list[dict], engines: list[str]) -> str:
    by_key = {(r["method"], r["engine"]): r for r in rows}
    head = "| method | trainable | " + " | ".join(f"{e} s/step | {e} peak GiB" for e in engines) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(engines))]
    for method in dict.fromkeys(r["method"] for r in rows):
        known = next((r for r in rows if r["method"] == method and "trainable" in r), {})
        trainable = f"{known['trainable'] / 1e6:.3g}M" if known else "?"
        cells = [_cell(by_key[(method, e)], _baseline(by_key, method, e)) for e in engines]
        lines.append(f"| {method} | {trainable} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="smollm2-135m", choices=list(ARCHS))
    parser.add_argument("--methods", default="full,lora", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--engines", default="none,opacus,privtune", help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (one more runs first, as warm-up)")
    parser.add_argument("--precision", default="fp32", choices=["bf16", "fp32"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    parser.add_argument("--no-tf32", dest="tf32", action="store_false", help="on CUDA, plain fp32 matmuls")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--per-person", type=int, default=2,
                        help="records per person (the *-person engines clip people; --batch must be a multiple)")
    parser.add_argument("--full-trainable", default="blocks", choices=["blocks", "all"],
                        help="blocks: freeze norms and input embedding (a tied head with it); all: train everything")
    parser.add_argument("--paired", type=int, default=0,
                        help="also time each engine's record- and user-level runs N times in turns, in one process, "
                             "and print the median ratio (robust to a machine whose load drifts)")
    parser.add_argument("--background-load", default="0",
                        help="K busy processes on the CPU during the measurement; a comma-separated list measures "
                             "each level in turn (0,2: quiet, then loaded)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one method:engine, print JSON
    args = parser.parse_args(argv)
    try:
        args.loads = [int(k) for k in args.background_load.split(",")]
    except ValueError:
        args.loads = [-1]
    if any(k < 0 for k in args.loads):
        parser.error(f"--background-load {args.background_load}: give whole numbers of processes, 0 or more, "
                     "separated by commas")
    for name, allowed in (("methods", METHODS), ("engines", ENGINES)):
        bad = [x for x in getattr(args, name).split(",") if x not in allowed]
        if bad:
            parser.error(f"unknown {name} {bad}; use {', '.join(allowed)}")
    if args.per_person < 1 or args.batch % args.per_person:
        parser.error(f"--per-person {args.per_person} must be at least 1 and divide --batch {args.batch}, "
                     "so every step holds whole people")
    return args


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    if args.row:
        method, engine = args.row.split(":")
        print(json.dumps(run_row(method, engine, args)))
        return
    device = torch.device(args.device)
    kind = "CUDA max allocated" if device.type == "cuda" else "sampled RSS"
    tf32 = ", TF32" if device.type == "cuda" and args.tf32 and args.precision == "fp32" else ""
    print(f"\n`python benchmarks/dp_engines.py {' '.join(argv)}`\n")
    print(f"{args.arch}, batch {args.batch} x {args.seq}, {args.device} {args.precision}{tf32}, "
          f"{hardware(device, args.threads)}, torch {torch.__version__}; median of {args.steps} steps after one warm-up; "
          f"peak memory = {kind}; full = {args.full_trainable}; {args.per_person} records per person")
    engines = args.engines.split(",")
    for k in args.loads:
        with BackgroundLoad(k), LoadSampler(5.0) as load:  # the sampler closes first: its last sample is loaded
            rows, paired = measure(args, argv, k)
        print(f"\n{load_line(k, load)}\n")
        print(table(rows, engines))
        if paired:
            print(f"\nuser-level / record-level s/step, median of {args.paired} alternating pairs in one process:\n")
            print("| method | engine | ratio | (record, user-level) s/step per pair |\n|---|---|---|---|")
            for row in paired:
                print(f"| {row['method']} | {row['engine']} | {row['ratio']:.2f}x | {row['pairs']} |")
        sys.stdout.flush()


def load_line(k: int, load: LoadSampler) -> str:
    """What the machine was under while a table was measured."""
    record = load.record()
    return (f"background load: {k} busy process{'es' if k != 1 else ''}; 1-minute load average "
            f"{record['load_start']:.2f} at the start, {record['load_end']:.2f} at the end (mean "
            f"{record['load_mean']:.2f} over samples every 5 s), on {record['cpus']} usable CPUs")


def measure(args, argv: list[str], k: int) -> tuple[list[dict], list[dict]]:
    """(the rows, the paired ratios), measured while ``k`` busy background processes run."""
    methods, engines = args.methods.split(","), args.engines.split(",")
    rows = []
    for method in methods:
        for engine in engines:
            rows.append(run_in_subprocess(method, engine, argv))
            print(f"  done {method} / {engine} under load {k}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    paired = []
    if args.paired:
        for method in methods:
            for engine in (e for e in engines if f"{e}-person" in engines):
                paired.append(paired_ratio(method, engine, args))
    return rows, paired


if __name__ == "__main__":
    main()
