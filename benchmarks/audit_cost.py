"""The privacy audit's cost: one study run with ``privacy_audit`` off and on, stage by stage.

The audit adds the IN audit canaries (about m/2) to every run's training set and, per
trained run, one scoring pass over the m canaries (the base model's pass is taken once
per study). This runs the same study twice, in fresh output folders, and prints per
stage the wall and CPU seconds summed over the runs, the training rows, and the
audit's share of the study.

Usage: ``python benchmarks/audit_cost.py [study.yaml] [--model tiny-llama] [--canaries 200]``
(default: the packaged default study).
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from importlib import resources
from pathlib import Path

import yaml


def run(raw: dict) -> tuple[float, dict, dict]:
    """(study wall seconds, stage -> [wall s, cpu s] summed over runs, label -> training records)."""
    from privtune.config import parse_config
    from privtune.study.driver import open_store, run_study

    cfg = parse_config(raw)
    start = time.perf_counter()
    outcome = run_study(cfg, show_progress=False)
    wall = time.perf_counter() - start
    if outcome.failed:
        raise SystemExit(f"runs failed: {outcome.failed}")
    store = open_store(cfg)
    stages: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    records = {}
    for r in store.runs(cfg.name):
        for s in r["timing"]["stages"]:
            stages[s["stage"]][0] += s["seconds"]
            stages[s["stage"]][1] += s["cpu_seconds"]
        records[r["label"]] = r["data"]["train_records"]
    store.close()
    return wall, dict(stages), records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="a study config (default: the default study)")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--canaries", type=int, default=200)
    args = parser.parse_args()
    text = Path(args.config).read_text() if args.config else \
        resources.files("privtune.configs").joinpath("default.yaml").read_text()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for audit in (False, True):
            raw = yaml.safe_load(text)
            raw.update(model=args.model, output_dir=f"{tmp}/{audit}", save_artifacts=False,
                       privacy_audit={"enabled": audit, "canaries": args.canaries})
            results[audit] = run(raw)
    names = list(dict.fromkeys(n for _, stages, _ in results.values() for n in stages))
    print("| audit | study wall s | study CPU s (stages) | training records | " + " | ".join(names) + " |")
    print("|---" * (4 + len(names)) + "|")
    for audit, (wall, stages, records) in results.items():
        cpu = sum(v[1] for v in stages.values())
        cells = " | ".join(f"{stages[n][0]:.1f} / {stages[n][1]:.1f}" if n in stages else "–" for n in names)
        print(f"| {'on' if audit else 'off'} | {wall:.0f} | {cpu:.0f} | {max(records.values())} | {cells} |")
    off_cpu = sum(v[1] for v in results[False][1].values())
    on_cpu = sum(v[1] for v in results[True][1].values())
    print(f"\naudit cost: +{on_cpu / off_cpu - 1:.0%} of the study's CPU seconds, "
          f"+{results[True][0] / results[False][0] - 1:.0%} of its wall time (stage cells: wall / CPU s)")


if __name__ == "__main__":
    main()
