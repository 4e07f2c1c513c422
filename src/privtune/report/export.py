"""A study's runs as CSV (one flat row per run, for spreadsheets and pandas) and JSON
(the full dicts, for anything else).

The CSV keeps the identity of each run, every final measure under its own name
(``leakage_gain``, ``utility_ce``, ...), every efficiency figure (``train_seconds``,
...), the DP settings prefixed ``dp_`` (``dp_unit`` beside ``dp_epsilon`` says what ε
protects: individual, record or client), the run's wall and CPU time and load prefixed
``timing_`` (``timing_wall_seconds``, ``timing_load_mean``, ...; its stages as one JSON
cell) and the canary exposure per repetition count
(``exposure_r16``: mean over the canaries inserted 16 times, with ``exposure_r16_method``
exact / bounded / estimated and its proven bounds ``_low`` / ``_high``, empty when
estimated), and the attacks' headline
numbers: per (attack, level) the AUC, the members and non-members it was measured on, the
base model's AUC on the same records, the advantage over it with its 95% interval, the
confounded flag and the TPR at 1% FPR (``mia_lira_online_record_auc``,
``mia_lira_online_record_advantage_low``, ``mia_lira_online_record_tpr_at_1pct_fpr``, ...;
an empty figure has its reason in ``..._auc_na`` / ``..._tpr_at_1pct_fpr_na``), the strongest
attack (chosen on one half of the people, quoted on the other: ``mia_strongest_*``), the extraction
advantage and PII-inference top-1 over all PII types, the backdoor success rates; for
runs that trained on scrubbed text, the tagger and its span recall and precision
(``scrub_tagger``, ``scrub_recall``, ...) and the memorisation gap apart on the values the
tagger missed and caught (``scrub_gap_net_missed``, ``scrub_gap_net_caught``, each with
its interval in ``_low``/``_high``); for federated runs the bytes communicated
(``bytes_communicated``, an efficiency figure) and the spread of leakage gain over clients
(``fed_leakage_gain_spread``); for unlearning runs and their retrained references, the
forget-set figures (``unlearn_forget_ce_s``, ..., the strongest attack on the forget set
chosen two-sided, ``unlearn_forget_mia_*``, and the source model's as ``unlearn_source_*``); with the
privacy audit, the empirical ε lower bound (``empirical_epsilon_lower_bound``, Steinke et al.'s, with
``_gdp_lower_bound``, the claimed ε, canaries, δ and confidence, and why a bound is empty in ``_na``;
every canary's score is in the JSON).
Missing and non-finite values are empty cells. Per-epoch measures, confidence
intervals, ROC curves and per-type rates are left to the JSON.

The JSON holds every run's dict but its per-record statistics (``record_stats``), which
grow with the records (about 100 bytes each per run, against some 60 kB for everything
else: 2 MB a run at 20k records), and go to ``records.json.gz`` beside it
(:func:`write_records`), written one run at a time; see :data:`RECORDS_FORMAT`.

Every file is written aside and renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from privtune.files import private_dir, private_file
from privtune.report import attack_plots, audit, exposure, unlearning
from privtune.report.attack_plots import ALL, auc, interval, mia_entry, tpr_at
from privtune.report.headline import strongest_attack
from privtune.report.plots import exposure_by_repetition

#: The columns of each mean exposure: the bits, how they were obtained, the proven bounds.
EXPOSURE_PARTS = ("", "_method", "_low", "_high")
IDENTITY = ("run_id", "study", "label", "method", "model", "seed", "status", "error")
#: Nested sections flattened into the CSV, with the prefix their keys get.
SECTIONS = (("final", ""), ("efficiency", ""), ("dp", "dp_"), ("timing", "timing_"))
#: Keys that lead their section's columns (the store sorts keys alphabetically, which
#: would bury the headline measures among the raw losses); the rest follow as found.
LEADING = {
    "final": ("leakage_gain", "memorisation_gap", "memorisation_gap_net", "utility_ce", "utility_ppl",
              "utility_gain"),
    "efficiency": ("train_seconds", "seconds_per_epoch", "tokens_per_second", "peak_memory_bytes", "memory_kind",
                   "trainable_params", "total_params", "flops_estimate", "bytes_communicated"),
    "dp": ("epsilon", "unit", "secure_mode", "delta", "noise_multiplier", "max_grad_norm"),
}

#: The keys of a run's ``scrub`` section the CSV keeps (per-type recall is left to the JSON).
SCRUB_KEYS = ("tagger", "replacement", "truth", "recall", "precision", "char_recall", "char_precision",
              "spans_true", "spans_caught", "spans_removed")

def scrub_gap_cells(run: dict) -> dict:
    """A scrubbed run's memorisation gap (net) on the values its tagger missed and caught,
    with its 95% interval, their member/non-member token counts, and why a part has none."""
    by_catch = (run.get("scrub") or {}).get("by_catch") or {}
    cells = {}
    for part in ("missed", "caught"):
        f = by_catch.get(part) or {}
        low, high = f.get("memorisation_gap_net_ci") or (None, None)
        cells.update({f"scrub_gap_net_{part}": f.get("memorisation_gap_net"),
                      f"scrub_gap_net_{part}_low": low, f"scrub_gap_net_{part}_high": high,
                      f"scrub_tokens_{part}_members": f.get("tokens_train"),
                      f"scrub_tokens_{part}_nonmembers": f.get("tokens_test"), f"scrub_gap_{part}_na": f.get("reason")})
    return cells


#: The keys of a run's ``federated`` section the CSV keeps (per-client rows are left to the JSON).
FED_KEYS = ("clients", "rounds", "local_epochs", "split", "alpha", "fraction_fit", "bytes_down", "bytes_up",
            "leakage_gain_spread")


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder; readable by
    its owner only, as what a study reports can identify people (``privtune.files``)."""
    path = Path(path)
    partial = _partial(path)
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
    return path


def _partial(path: Path) -> Path:
    """A private temporary file beside ``path``, to be renamed onto it once written."""
    private_dir(path.parent)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.unlink(missing_ok=True)  # one a crash left keeps its mode
    private_file(partial)
    return partial


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def csv_columns(runs: Sequence[dict]) -> list[str]:
    """The CSV header: identity, then each section's keys in order of first appearance;
    a key already taken by an earlier section gets its section's name as prefix."""
    columns = list(IDENTITY)
    taken = set(columns)
    for section, prefix in SECTIONS:
        present = _unique(k for run in runs for k in (run.get(section) or {}))
        leading = [k for k in LEADING.get(section, ()) if k in present]
        for key in leading + [k for k in present if k not in leading]:
            name = prefix + key
            if name in taken:
                name = f"{section}_{key}"
            columns.append(name)
            taken.add(name)
    reps = sorted({r for run in runs for r in exposure_by_repetition(run)})
    columns += [f"exposure_r{r}{part}" for r in reps for part in EXPOSURE_PARTS]
    if reps:
        columns += ["exposure_top_repetitions"] + [f"exposure_top_mean{part}" for part in EXPOSURE_PARTS]
    columns += [c for c in attack_columns(runs) if c not in taken]
    if any(run.get("scrub") for run in runs):
        columns += [f"scrub_{k}" for k in SCRUB_KEYS] + list(scrub_gap_cells({}))
    if any(run.get("federated") for run in runs):
        columns += [f"fed_{k}" for k in FED_KEYS]
    columns += unlearning.csv_columns(runs)
    columns += audit.csv_columns(runs)
    columns += ["epochs"]
    return columns


def _mia_pairs(runs: Sequence[dict]) -> list[tuple[str, str]]:
    """Every (attack, level) some run has, attacks in display order, record level first."""
    found = {(e["attack"], e["level"]) for run in runs for e in attack_plots.mia_entries(run)}
    attacks = attack_plots.order_attacks([a for a, _ in sorted(found)])
    return [(a, level) for level in attack_plots.LEVELS for a in attacks if (a, level) in found]


#: Per (attack, level) CSV columns, ``mia_<attack>_<level>_<key>``.
MIA_KEYS = ("auc", "auc_na", "n_members", "n_nonmembers", "base_auc", "advantage", "advantage_low", "advantage_high",
            "confounded", "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_na")
#: The strongest attack's columns, ``mia_strongest_<key>``: its figures on the report half.
STRONGEST_KEYS = ("attack", "na", "variants", "auc", "base_auc", "advantage", "advantage_low", "advantage_high",
                  "n_members", "n_nonmembers")


def mia_cells(entry: dict | None) -> dict:
    """One MIA entry under :data:`MIA_KEYS`; a figure that could not be measured is empty
    and its ``_na`` column says why."""
    entry = entry or {}
    low, high = interval(entry.get("advantage_ci"))
    tpr = tpr_at(entry, "0.01")
    return {"auc": auc(entry), "auc_na": entry.get("auc_reason"), "n_members": entry.get("n_members"),
            "n_nonmembers": entry.get("n_nonmembers"), "base_auc": entry.get("base_auc"),
            "advantage": entry.get("advantage"), "advantage_low": low, "advantage_high": high,
            "confounded": entry.get("confounded"), "tpr_at_1pct_fpr": tpr,
            "tpr_at_1pct_fpr_na": (entry.get("tpr_at_fpr_reason") or {}).get("0.01") if math.isnan(tpr) else None}


def attack_columns(runs: Sequence[dict]) -> list[str]:
    """The attack columns of the CSV, for the attacks some run went through."""
    columns = []
    for attack, level in _mia_pairs(runs):
        columns += [f"mia_{attack}_{level}_{key}" for key in MIA_KEYS]
    if columns:
        columns += [f"mia_strongest_{key}" for key in STRONGEST_KEYS]
    for mode in attack_plots.EXTRACTION_MODES:
        if any(ALL in attack_plots.extraction_rates(r, mode) for r in runs):
            columns.append(f"extraction_{mode}_all_advantage")
    if any(ALL in attack_plots.pii_inference(r) for r in runs):
        columns += ["pii_inference_all_top1", "pii_inference_all_chance"]
    if any(attack_plots.backdoor(r) for r in runs):
        columns += ["backdoor_asr_triggered", "backdoor_asr_clean"]
    return columns


def attack_cells(run: dict, pairs: Sequence[tuple[str, str]]) -> dict:
    """A run's attack numbers under the names :func:`attack_columns` gives them."""
    cells: dict = {}
    for attack, level in pairs:
        cells.update({f"mia_{attack}_{level}_{k}": v for k, v in mia_cells(mia_entry(run, attack, level)).items()})
    head = strongest_attack(run)
    if head is not None:
        low, high = interval(head.figures.get("advantage_ci"))
        cells.update({f"mia_strongest_{k}": v for k, v in {
            "attack": f"{head.attack}/{head.level}" if head.attack else None,
            "na": head.reason, "variants": head.variants,
            "auc": head.figures.get("auc"), "base_auc": head.figures.get("base_auc"),
            "advantage": head.figures.get("advantage"), "advantage_low": low, "advantage_high": high,
            "n_members": head.figures.get("n_members"), "n_nonmembers": head.figures.get("n_nonmembers"),
        }.items()})
    for mode in attack_plots.EXTRACTION_MODES:
        cells[f"extraction_{mode}_all_advantage"] = (
            attack_plots.extraction_rates(run, mode).get(ALL) or {}).get("advantage")
    pii = attack_plots.pii_inference(run).get(ALL) or {}
    cells["pii_inference_all_top1"], cells["pii_inference_all_chance"] = pii.get("top1"), pii.get("chance")
    backdoor = attack_plots.backdoor(run) or {}
    cells["backdoor_asr_triggered"], cells["backdoor_asr_clean"] = (
        backdoor.get("asr_triggered"), backdoor.get("asr_clean"))
    return cells


def _exposure_cells(name: str, figure: exposure.ExposureFigure | None) -> dict:
    """A mean exposure and how it was obtained, under the names of :data:`EXPOSURE_PARTS`."""
    if figure is None:
        return {}
    return {name: figure.value, f"{name}_method": figure.method, f"{name}_low": figure.low,
            f"{name}_high": figure.high}


def _cell(value):
    """A CSV cell: empty for missing or non-finite numbers, JSON for anything nested."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def csv_row(run: dict, columns: Sequence[str]) -> dict:
    """One run flattened onto ``columns`` (the names :func:`csv_columns` gave)."""
    row: dict = {k: run.get(k) for k in IDENTITY}
    for section, prefix in SECTIONS:
        for key, value in (run.get(section) or {}).items():
            name = prefix + key
            row[name if name in columns and name not in row else f"{section}_{key}"] = value
    for r, figure in exposure.by_repetition(run).items():
        row.update(_exposure_cells(f"exposure_r{r}", figure))
    top_r, top_figure = exposure.top(run)
    row["exposure_top_repetitions"] = top_r
    row.update(_exposure_cells("exposure_top_mean", top_figure))
    pairs = [(a, level) for a, level in _mia_pairs([run]) if f"mia_{a}_{level}_auc" in columns]
    row.update({k: v for k, v in attack_cells(run, pairs).items() if k not in row})
    row.update({f"scrub_{k}": (run.get("scrub") or {}).get(k) for k in SCRUB_KEYS})
    row.update(scrub_gap_cells(run))
    row.update({f"fed_{k}": (run.get("federated") or {}).get(k) for k in FED_KEYS})
    row.update(unlearning.csv_cells(run))
    row.update(audit.csv_cells(run))
    row["epochs"] = max((e.get("epoch", 0) for e in run.get("epochs") or []), default=None)
    return {c: _cell(row.get(c)) for c in columns}


def write_csv(runs: Sequence[dict], path: str | Path) -> Path:
    """Write one CSV row per run; returns the path."""
    columns = csv_columns(runs)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for run in runs:
        writer.writerow(csv_row(run, columns))
    return write_text_atomic(Path(path), buffer.getvalue())


def _json_safe(value):
    """NaN/inf as null (as the store writes them), tuples as lists, numpy scalars as numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return _json_safe(value.item())
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


#: The run keys whose values grow with the records: kept out of the JSON export, written
#: to the per-record file instead.
PER_RECORD = ("record_stats",)
#: What ``records.json.gz`` holds, written at its head so the file explains itself.
RECORDS_FORMAT = (
    "runs: one entry per run of runs.json that has per-record statistics (run_id, label, record_stats). "
    "record_stats: the population is the members then the non-members (n_members of them members), one value "
    "per record in that order; for each level (record: every scored token, sensitive: the sensitive tokens) "
    "loglik is the record's summed token log-likelihood in nats, tokens its scored tokens at that level, and "
    "stat LiRA's per-record statistic; person: an index per person (never a name); selection_half: true for "
    "the records of the people the strongest attack is chosen on.")


def write_json(runs: Sequence[dict], path: str | Path) -> Path:
    """Write the run dicts, but their per-record statistics (:data:`PER_RECORD`), as a
    JSON list; returns the path."""
    lean = [{k: v for k, v in run.items() if k not in PER_RECORD} for run in runs]
    text = json.dumps(_json_safe(lean), indent=2, allow_nan=False, ensure_ascii=False)
    return write_text_atomic(Path(path), text + "\n")


def write_frontier(runs: Sequence[dict], path: str | Path, shown=None) -> Path:
    """Write ``frontier.json``: per leakage measure, each method family's front, the
    matched-utility rows and the findings (:func:`privtune.report.frontier_section.frontier_json`;
    ``shown``: its frontiers, when the caller has them already)."""
    from privtune.report.frontier_section import frontier_json  # it renders figures: imported on use

    text = json.dumps(_json_safe(frontier_json(runs, shown)), indent=2, allow_nan=False, ensure_ascii=False)
    return write_text_atomic(Path(path), text + "\n")


def has_per_record(run: dict) -> bool:
    return isinstance(run.get("record_stats"), Mapping)


def write_records(runs: Sequence[dict], path: str | Path) -> Path | None:
    """Write the runs' per-record statistics as gzipped JSON (``{"format": ..., "runs":
    [...]}``, :data:`RECORDS_FORMAT`), one run at a time: statistics the store reads on
    demand (:class:`~privtune.study.store.StoredRecordStats`) are read, written and
    dropped, so only one run's are in memory. Returns the path, or None (and no file)
    when no run has any."""
    runs = [run for run in runs if has_per_record(run)]
    if not runs:
        return None
    path = Path(path)
    partial = _partial(path)
    with open(partial, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as packed, \
            io.TextIOWrapper(packed, encoding="utf-8") as out:
        out.write('{"format": ' + json.dumps(RECORDS_FORMAT) + ', "runs": [')
        for i, run in enumerate(runs):
            stats = run["record_stats"]
            stats = stats.read() if hasattr(stats, "read") else stats
            entry = {"run_id": run.get("run_id"), "label": run.get("label"), "record_stats": stats}
            out.write((",\n" if i else "\n") + json.dumps(_json_safe(entry), allow_nan=False, ensure_ascii=False))
        out.write("\n]}\n")
    partial.replace(path)
    return path
