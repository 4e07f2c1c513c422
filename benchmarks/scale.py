"""How the default study's cost and outputs grow with the number of records (issue 20).

For each size N (records, members and non-members together) this runs the packaged
default study (same methods, measures and attacks) through the command line, as a user
would, with only the model, the number of people and the output folder changed:

- ``privtune run <config> --no-report --quiet``, then ``privtune report``, each in its
  own process, whose peak resident memory (``ru_maxrss`` from ``wait4``) and wall time
  are recorded;
- the seconds of each stage, summed over the study's runs, from what every run stores
  (``result["timing"]["stages"]``, :mod:`privtune.study.stages`), and the machine's load
  average over the runs (the machine may be shared: compare rows only at similar load);
- the size of the database, the JSON export (``runs.json``), the per-record file
  (``records.json.gz``), the CSV and the HTML report.

The built-in corpus has one to three records per person; the number of people for N
records comes from the ratio of a small corpus of the same generator and seed, and the
table shows the records the study actually got.

Usage::

    python benchmarks/scale.py --sizes 100,1000,10000 --out scale.md     # tiny random model
    python benchmarks/scale.py --model smollm2-135m --sizes 200,2000 --out scale-smollm2.md

``--workdir`` keeps each size's study; run again with the same folder and the studies
are found done in their databases (nothing is trained), so only the report is measured
anew, while the study's own figures (stage times, peak memory) are read from the first
run's ``measured.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sqlite3
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import yaml

#: The stages shown, in this order; any other stage a run stores is added after them.
STAGES = ("training", "measures", "base model scores", "canary exposure", "membership attacks", "extraction",
          "PII inference", "record stats", "saving the model", "preparation", "other")
#: The output files measured, relative to the output folder, with their column names.
OUTPUTS = (("privtune.db", "database"), ("reports/default/runs.json", "JSON export"),
           ("reports/default/records.json.gz", "per-record file"), ("reports/default/runs.csv", "CSV"),
           ("reports/default/report.html", "HTML report"))


def people_for(records: int, source: str, seed: int) -> int:
    """People the built-in corpus needs for about ``records`` records."""
    from privtune.data.corpora import generate_corpus

    sample = 200
    ratio = len(generate_corpus(source, sample, seed)) / sample
    return max(2, round(records / ratio))


def study_config(model: str, people: int, output_dir: Path) -> dict:
    """The packaged default study with only the model, the people and the output folder changed."""
    cfg = yaml.safe_load(resources.files("privtune.configs").joinpath("default.yaml").read_text())
    cfg["model"] = model
    cfg["data"]["n_individuals"] = people
    cfg["output_dir"] = str(output_dir)
    return cfg


def timed_process(argv: list[str]) -> dict:
    """Run ``argv``; its wall seconds and peak resident memory (this child alone)."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)  # the summary tables; errors still show
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed with exit code {process.returncode}")
    return {"seconds": time.perf_counter() - started, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "cpu_seconds": usage.ru_utime + usage.ru_stime}


def stored_timing(db: Path) -> dict:
    """Stage seconds summed over the study's runs, the runs' wall seconds, load and records."""
    con = sqlite3.connect(db)
    try:
        rows = [json.loads(r) for (r,) in con.execute("SELECT result FROM runs WHERE status='done'")]
    finally:
        con.close()
    stages: dict[str, float] = {}
    for result in rows:
        for entry in result["timing"]["stages"]:
            stages[entry["stage"]] = stages.get(entry["stage"], 0.0) + entry["seconds"]
    loads = [r["timing"]["load_mean"] for r in rows if r["timing"].get("load_mean") is not None]
    data = next((r["data"] for r in rows if r.get("data")), {})
    return {"runs": len(rows), "run_seconds": sum(r["timing"]["wall_seconds"] for r in rows), "stages": stages,
            "load_mean": sum(loads) / len(loads) if loads else math.nan,
            "load_max": max((r["timing"].get("load_max") or math.nan for r in rows), default=math.nan),
            "records": data.get("members", 0) + data.get("nonmembers", 0), "cpus": rows[0]["timing"].get("cpus")}


def measure_size(n: int, args) -> dict:
    """Run (or find done) the study of about ``n`` records and report it; its figures."""
    folder = Path(args.workdir) / f"{Path(args.model).name}-{n}"
    out = folder / "out"
    measured = folder / "measured.json"
    config = folder / "study.yaml"
    if measured.exists():
        row = json.loads(measured.read_text())
    else:
        folder.mkdir(parents=True, exist_ok=True)
        people = people_for(n, "customer-sim", 0)
        config.write_text(yaml.safe_dump(study_config(args.model, people, out), sort_keys=False))
        study = timed_process([sys.executable, "-m", "privtune", "run", str(config), "--no-report", "--quiet"])
        row = {"n": n, "people": people, "study": study, **stored_timing(out / "privtune.db")}
        measured.write_text(json.dumps(row, indent=1))
    row["report"] = timed_process([sys.executable, "-m", "privtune", "report", "-o", str(out)])
    row["sizes"] = {name: (out / path).stat().st_size if (out / path).exists() else None for path, name in OUTPUTS}
    for suffix in ("-wal", "-shm"):  # SQLite's side files, when a reader left them
        side = out / f"privtune.db{suffix}"
        if side.exists():
            row["sizes"]["database"] += side.stat().st_size
    print(f"N={n}: {row['records']} records, study {row['study']['seconds']:.0f} s, report "
          f"{row['report']['seconds']:.1f} s", flush=True)
    return row


def _mb(value) -> str:
    return "–" if value is None else f"{value / 1e6:.2f}"


def stage_names(rows: list[dict]) -> list[str]:
    """The stages some size has, those of :data:`STAGES` first and in its order."""
    stages = [s for s in STAGES if any(s in r["stages"] for r in rows)]
    return stages + sorted({s for r in rows for s in r["stages"]} - set(stages))


def markdown(rows: list[dict], args) -> str:
    """The table: stage seconds, peak memory and output sizes per N."""
    stages = stage_names(rows)
    header = (["records", "people", "load (mean)", "study s", "study CPU s", "report s"] + [f"{s} s" for s in stages]
              + ["peak RSS study MB", "peak RSS report MB"] + [f"{name} MB" for _, name in OUTPUTS])
    lines = [f"Model {args.model}, {rows[0]['runs']} runs per study, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs; seconds are wall seconds summed over the runs.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r["records"]), str(r["people"]), f"{r['load_mean']:.1f}", f"{r['study']['seconds']:.0f}",
                 f"{r['study']['cpu_seconds']:.0f}",
                 f"{r['report']['seconds']:.1f}"]
        cells += [f"{r['stages'][s]:.1f}" if s in r["stages"] else "–" for s in stages]
        cells += [_mb(r["study"]["peak_rss_bytes"]), _mb(r["report"]["peak_rss_bytes"])]
        cells += [_mb(r["sizes"][name]) for _, name in OUTPUTS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, model: str) -> None:
    """Seconds per stage (left) and sizes and memory (right) against records, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r["records"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6))
    colors = iter(plt.cm.tab20.colors)
    for stage in [s for s in stage_names(rows) if any(r["stages"].get(s, 0) > 0 for r in rows)]:
        left.plot(records, [r["stages"].get(stage, math.nan) for r in rows], marker="o", label=stage,
                  color=next(colors))
    left.plot(records, [r["report"]["seconds"] for r in rows], marker="s", linestyle="--", label="report",
              color=next(colors))
    first = rows[0]["stages"].get("training") or rows[0]["study"]["seconds"]
    left.plot(records, [first * n / records[0] for n in records], color="grey", linestyle=":", label="∝ records")
    left.set(xscale="log", yscale="log", xlabel="records", ylabel="wall seconds (all runs)",
             title=f"time per stage, {model}")
    left.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    for _, name in OUTPUTS:
        values = [r["sizes"][name] for r in rows]
        if all(v is not None for v in values):
            right.plot(records, [v / 1e6 for v in values], marker="o", label=name)
    right.plot(records, [r["study"]["peak_rss_bytes"] / 1e6 for r in rows], marker="s", linestyle="--",
               label="peak RSS, study")
    right.plot(records, [r["report"]["peak_rss_bytes"] / 1e6 for r in rows], marker="s", linestyle=":",
               label="peak RSS, report")
    right.set(xscale="log", yscale="log", xlabel="records", ylabel="MB", title="outputs and memory")
    right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama", help="a registered model name (default: tiny-llama)")
    parser.add_argument("--sizes", default="100,1000,10000", help="records per study, comma-separated")
    parser.add_argument("--workdir", default="scale-runs", help="where each size's study is kept")
    parser.add_argument("--out", default="scale.md", help="the markdown table; the plot goes beside it as .png")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rows = [measure_size(n, args) for n in sizes]
    out = Path(args.out)
    out.write_text(markdown(rows, args))
    plot(rows, out.with_suffix(".png"), args.model)
    (out.with_suffix(".json")).write_text(json.dumps(rows, indent=1))
    print(out.read_text())


if __name__ == "__main__":
    main()
