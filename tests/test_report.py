"""The report: HTML page, figures, Pareto front, CSV/JSON export.

The example study (tests/fixtures/runs_example.json) holds a base model, fft, two LoRA
runs, dp-fft, dp-lora and one failed run, with 2-3 epochs each; every finished run also
has attack results (tested in test_attack_report.py).
"""

from __future__ import annotations

import copy
import io
import csv
import html
import json
import math
import re
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure
from matplotlib.text import Text

from privtune.errors import PrivtuneError
from privtune.report import write_csv, write_json, write_report
from privtune.report import html as report_html
from privtune.report import plots

FIXTURE = Path(__file__).parent / "fixtures" / "runs_example.json"
META = {"study": "default", "model": "smollm2-135m", "dataset": "customer-sim", "tagger": "regex",
        "device": "cpu", "created": "2025-01-01 12:00", "privtune": "0.1.0", "config_hash": "a1b2c3d4e5f6"}


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def page(runs, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report")
    path = write_report(runs, out, title="privtune study: default", meta=META)
    return path, path.read_text(encoding="utf-8")


def by_label(runs: list[dict], label: str) -> dict:
    return next(r for r in runs if r["label"] == label)


def texts_of(fig: Figure) -> set[str]:
    return {t.get_text() for t in fig.findobj(Text)}


# --- the page ------------------------------------------------------------------------

def test_report_is_written_beside_its_figures(page, runs):
    path, text = page
    assert path.name == "report.html" and text.startswith("<!DOCTYPE html>")
    figures = report_html.report_figures(runs)  # the measure figures, and the attack ones the fixture has
    assert {name for name, _, _ in plots.FIGURES} < {name for name, _, _ in figures}
    assert {p.name for p in (path.parent / "figures").iterdir()} == {f"{name}.png" for name, _, _ in figures}
    frontier = 'id="frontier"' in text  # its plot is inline only, as the audit section's
    assert text.count('<img ') == len(figures) + frontier


def test_report_is_self_contained(page):
    _, text = page
    assert "http://" not in text and "https://" not in text
    for attr, value in re.findall(r'\b(src|href)\s*=\s*"([^"]*)"', text):
        assert value.startswith("data:image/png;base64,") or value.startswith("#"), (attr, value[:40])
    assert "<link" not in text and "<script" not in text and "@import" not in text


def test_report_shows_every_run_the_dp_budgets_and_the_metadata(page, runs):
    _, text = page
    for run in runs:
        assert html.escape(run["label"]) in text
    # ε of dp-fft and dp-lora-r8 with its unit (stored without one, from before dp.unit: records)
    assert ">7.92 per record<" in text and ">3.04 per record<" in text
    for value in META.values():
        assert html.escape(value) in text


def test_failed_run_is_in_the_table_with_its_error(page, runs):
    _, text = page
    failed = by_label(runs, "dp-fft-ghost")
    assert html.escape(failed["error"]) in text
    assert '<span class="status failed">failed</span>' in text
    assert "1 run failed" in text


def test_headline_names_the_lowest_leakage_best_utility_and_a_front_run(runs):
    cards = {c.title: c.run for c in report_html.headline_cards(runs)}
    assert cards["Lowest leakage"] == "dp-lora-r8"
    assert cards["Best utility"] == "fft"
    pool = report_html.candidates(runs)
    front = plots.pareto_front([(plots.measure(r, "utility_ce"), plots.measure(r, "leakage_gain")) for r in pool])
    assert cards["Best trade-off"] in {pool[i]["label"] for i in front}
    assert cards["Highest canary exposure"] == "fft"
    assert "base" not in cards.values()  # the untouched model wins no prize


def test_every_column_header_says_which_way_is_better(page):
    _, text = page
    table = text[text.index('<table class="runs">'):]
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", table[:table.index("</thead>")])
    # ε has no direction: per person, per record and per client are not one scale.
    directional = [h for h in headers if h not in ("run", "method", "status", "ε")]
    assert "ε" in headers and directional and all(h.endswith(("↑", "↓")) for h in directional)


def test_text_from_runs_and_meta_is_escaped(runs, tmp_path):
    evil = copy.deepcopy(runs)
    evil[1]["label"] = "<script>alert(1)</script>"
    evil[-1]["error"] = 'bad <b>"quote"</b> & more'
    text = write_report(evil, tmp_path, title="<i>t</i>", meta={"study": "<x>"}).read_text()
    assert "<script>" not in text and "<i>t</i>" not in text and "<x>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert html.escape('bad <b>"quote"</b> & more') in text


def test_no_runs_is_a_user_error(tmp_path):
    with pytest.raises(PrivtuneError, match="no runs"):
        write_report([], tmp_path, title="t", meta={})


def test_a_study_with_only_failed_and_running_runs_still_renders(runs, tmp_path):
    failed = by_label(runs, "dp-fft-ghost")
    running = {"run_id": "r1", "label": "lora-live", "method": "lora", "status": "running", "error": None,
               "epochs": [{"epoch": 0, "leakage_gain": 0.0, "utility_ce": 2.4}]}
    text = write_report([failed, running], tmp_path, title="t", meta={}).read_text()
    assert "lora-live" in text and "no finished runs" not in text  # the message is in the PNG, not the HTML
    assert '<span class="status running">running</span>' in text


# --- figures -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,make", [(n, f) for n, _, f in plots.FIGURES])
def test_each_figure_skips_the_failed_run(runs, name, make):
    fig = make(runs)
    try:
        assert isinstance(fig, Figure) and fig.axes
        shown = texts_of(fig) | {t.get_text() for ax in fig.axes for t in ax.get_yticklabels() + ax.get_xticklabels()}
        legends = {t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()}
        assert "dp-fft-ghost" not in shown | legends
        assert "fft" in shown | legends  # and a finished run is there
    finally:
        plt.close(fig)


@pytest.mark.parametrize("name,make", [(n, f) for n, _, f in plots.FIGURES])
def test_each_figure_survives_missing_and_non_finite_values(runs, name, make):
    broken = copy.deepcopy(runs)
    broken[1]["final"]["utility_ce"] = None           # the store writes NaN as null
    broken[2]["final"]["leakage_gain"] = float("nan")
    broken[3]["efficiency"] = None
    broken[3]["exposure"] = []
    broken[4]["epochs"] = broken[4]["epochs"][:1]
    broken[5]["final"]["utility_ppl"] = float("inf")
    only_failed = [by_label(runs, "dp-fft-ghost")]
    for data in (broken, only_failed):
        fig = make(data)
        assert isinstance(fig, Figure)
        fig.savefig(io.BytesIO(), format="png", dpi=40)
        plt.close(fig)
    assert any("no " in t for t in texts_of(make(only_failed)))  # says it has nothing, not empty axes
    plt.close("all")


def test_one_colour_per_method_and_one_marker_per_run_within_it(runs):
    styles = plots.styles(runs)
    colour = {}
    for run, style in zip(runs, styles):
        assert colour.setdefault(run["method"], style.color) == style.color
    assert len(set(colour.values())) == len(colour)
    lora = [s.marker for r, s in zip(runs, styles) if r["method"] == "lora"]
    assert len(set(lora)) == len(lora) == 2
    new = plots.styles([{"method": "fedavg"}, {"method": "unlearn"}, {"method": "fedavg"}])
    assert new[0].color == new[2].color != new[1].color


def test_exposure_is_averaged_per_repetition_count():
    run = {"exposure": [
        {"repetitions": 1, "exposure": 2.0}, {"repetitions": 1, "exposure": 4.0},
        {"repetitions": 16, "exposure": 10.0}, {"repetitions": 16, "exposure": None},
        {"repetitions": 0, "exposure": 1.0}]}
    assert plots.exposure_by_repetition(run) == {0: 1.0, 1: 3.0, 16: 10.0}
    assert plots.top_exposure(run) == (16, 10.0)
    assert plots.top_exposure({})[0] is None


# --- the Pareto front ----------------------------------------------------------------------

def brute_force_front(points: list[tuple[float, float]]) -> set[int]:
    """Indices no other point dominates (both coordinates minimised), the slow way."""
    def ok(p):
        return not (math.isnan(p[0]) or math.isnan(p[1]))

    def dominates(q, p):
        return q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1])

    return {i for i, p in enumerate(points)
            if ok(p) and not any(ok(q) and dominates(q, p) for j, q in enumerate(points) if j != i)}


coordinate = st.one_of(st.integers(0, 6).map(float),  # small grid: ties and duplicates are common
                       st.floats(-1e3, 1e3, allow_nan=False), st.just(math.nan))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(coordinate, coordinate), max_size=25))
def test_pareto_front_matches_brute_force(points):
    front = plots.pareto_front(points)
    assert set(front) == brute_force_front(points)
    assert len(front) == len(set(front))
    assert front == sorted(front, key=lambda i: points[i])  # left to right, y falling


def test_pareto_front_small_example():
    points = [(2.0, 1.0), (1.0, 3.0), (3.0, 0.5), (2.5, 2.0), (1.0, 3.0), (math.nan, 0.0)]
    assert plots.pareto_front(points) == [1, 4, 0, 2]


# --- CSV and JSON ----------------------------------------------------------------------------

def test_csv_has_one_row_per_run_and_the_measures_in_its_header(runs, tmp_path):
    path = write_csv(runs, tmp_path / "runs.csv")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = reader.fieldnames
    assert len(rows) == len(runs)
    for name in ("label", "method", "status", "error", "leakage_gain", "memorisation_gap_net", "utility_ce",
                 "utility_ppl", "ce_s_train_record_p90", "train_seconds", "peak_memory_bytes",
                 "trainable_params", "dp_epsilon", "dp_delta", "exposure_r16", "exposure_top_mean"):
        assert name in header
    assert len(header) == len(set(header))
    row = {r["label"]: r for r in rows}
    assert float(row["dp-fft"]["dp_epsilon"]) == 7.92 and row["fft"]["dp_epsilon"] == ""
    assert float(row["fft"]["leakage_gain"]) == by_label(runs, "fft")["final"]["leakage_gain"]
    assert row["dp-fft-ghost"]["status"] == "failed" and row["dp-fft-ghost"]["error"].startswith("Parameter tying")
    assert row["dp-fft-ghost"]["leakage_gain"] == ""
    assert float(row["fft"]["exposure_r16"]) == pytest.approx(plots.top_exposure(by_label(runs, "fft"))[1])


def test_csv_prefixes_a_key_two_sections_share(tmp_path):
    run = {"label": "x", "final": {"seconds": 1.0}, "efficiency": {"seconds": 2.0}}
    with write_csv([run], tmp_path / "r.csv").open(newline="") as f:
        (row,) = csv.DictReader(f)
    assert row["seconds"] == "1.0" and row["efficiency_seconds"] == "2.0"


def test_json_round_trips(runs, tmp_path):
    path = write_json(runs, tmp_path / "runs.json")
    assert json.loads(path.read_text()) == runs


def test_json_writes_non_finite_numbers_as_null(tmp_path):
    path = write_json([{"final": {"utility_ppl": math.inf, "x": math.nan}, "t": (1, 2)}], tmp_path / "r.json")
    assert json.loads(path.read_text()) == [{"final": {"utility_ppl": None, "x": None}, "t": [1, 2]}]


def test_scrub_section_only_when_a_run_scrubbed(runs):
    assert report_html.scrub_section(runs) == ""
    scrub = {"tagger": "regex", "replacement": "placeholder", "truth": "presidio", "recall": 0.5, "precision": 0.75,
             "spans_removed": 12, "per_type": {"NAME": {"spans": 4, "caught": 1, "recall": 0.25}}}
    scrubbed = [*runs, {**by_label(runs, "fft"), "label": "fft+scrub-regex", "scrub": scrub}]
    section = report_html.scrub_section(scrubbed)
    assert section.count("<tr") == 2 and "fft+scrub-regex" in section  # header and the one scrubbed run
    assert "50.0%" in section and "75.0%" in section and "25% <small>1/4</small>" in section
    assert "labelled by the presidio tagger" in section  # not ground truth: said so
    text = report_html.render_html(scrubbed, title="t", meta={})
    assert text.index('id="scrubbing"') < text.index('id="runs"')
