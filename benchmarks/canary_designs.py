"""Which audit canary design is strongest: one table from a study that compares designs.

A study with ``privacy_audit.compare_designs`` plants every design's canaries in the same
training runs and stores, per run and design, the canaries' scores and the bounds
(``empirical_epsilon`` and its ``compared_designs``). This prints, for each run and
design, the canaries' AUC with its 95% interval, TPR at 1% FPR (``n/a`` below 100 OUT
canaries), the one-run lower bounds (Steinke et al.; Mahloujifar et al.'s Gaussian
curve) and the ε the run claims, as a Markdown table.

Usage: ``privtune run examples/canary-designs.yaml -o DIR`` then
``python benchmarks/canary_designs.py DIR/reports/canary-designs/runs.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def design_rows(run: dict) -> list[tuple[str, dict]]:
    """(design, its audit result) for every design a run was audited with, headline first."""
    audit = run.get("empirical_epsilon") or {}
    if audit.get("lower_bound") is None:
        return []
    return [(audit["design"], audit), *audit.get("compared_designs", {}).items()]


def tpr_cell(entry: dict) -> str:
    tpr = entry.get("tpr_at_fpr", {}).get("0.01") or {}
    if tpr.get("tpr") is None:
        return f"n/a ({tpr.get('reason', 'not measured')})"
    low, high = tpr["ci"]
    return f"{tpr['tpr']:.3f} [{low:.3f}, {high:.3f}]"


def table(runs: list[dict]) -> str:
    lines = ["| run | claimed ε | design | canaries (IN/OUT) | AUC [95% CI] | TPR @ 1% FPR [95% CI] "
             "| ε ≥ (Steinke) | ε ≥ (GDP) |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for design, entry in design_rows(run):
            claimed = entry.get("claimed_epsilon")
            low, high = entry["auc_ci"]
            lines.append(
                f"| {run['label']} | {'–' if claimed is None else f'{claimed:.2f}'} | {design} "
                f"| {entry['canaries']} ({len(entry['in_scores'])}/{len(entry['out_scores'])}) "
                f"| {entry['auc']:.3f} [{low:.3f}, {high:.3f}] | {tpr_cell(entry)} "
                f"| {entry['lower_bound']:.3f} | {entry['gdp_lower_bound']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_json", type=Path, help="a study's reports/<name>/runs.json")
    args = parser.parse_args()
    runs = [r for r in json.loads(args.runs_json.read_text()) if design_rows(r)]
    if not runs:
        raise SystemExit(f"{args.runs_json}: no run has an empirical ε; run a study with privacy_audit enabled")
    print(table(runs))


if __name__ == "__main__":
    main()
