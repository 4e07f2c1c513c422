"""The attack results in the report: ROC figures, the MIA table with its intervals, the
extraction / PII inference / backdoor figures, the headline card and the CSV columns.

The fixture (tests/fixtures/runs_example.json) gives every finished run an "attacks"
section: 8 MIA attacks at 2 levels (the base model near AUC 0.5), extraction and PII
inference over 8 PII types, and a backdoor; the failed run has none. Its MIA entries were
computed by ``roc_metrics`` from synthetic scores of 120 members and 120 non-members (two
records per person), each run's correlated with the base model's on the same records.
"""

from __future__ import annotations

import copy
import csv
import html
import io
import json
import math
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from privtune.report import attack_plots, plots, write_csv, write_report
from privtune.report import export
from privtune.report import html as report_html
from privtune.report.headline import strongest_attack

FIXTURE = Path(__file__).parent / "fixtures" / "runs_example.json"
ATTACK_FIGURES = [(name, make) for name, _, make, _ in attack_plots.FIGURES]


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def page(runs, tmp_path_factory) -> tuple[Path, str]:
    path = write_report(runs, tmp_path_factory.mktemp("report"), title="t", meta={})
    return path, path.read_text(encoding="utf-8")


@pytest.fixture
def quick_png(monkeypatch):
    """Build every figure but skip the PNG encoding, for tests that read only the HTML
    (the figures' own tests save them for real)."""
    def render(fig) -> bytes:
        plt.close(fig)
        return b"png"
    monkeypatch.setattr(report_html, "render_png", render)


def by_label(runs: list[dict], label: str) -> dict:
    return next(r for r in runs if r["label"] == label)


def shown_texts(fig: Figure) -> set[str]:
    texts = {t.get_text() for t in fig.findobj(Text)}
    for ax in fig.axes:
        texts |= {t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()}
    for legend in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]:
        texts |= {t.get_text() for t in legend.get_texts()}
    return texts


def without_attacks(runs: list[dict]) -> list[dict]:
    old = copy.deepcopy(runs)
    for run in old:
        run.pop("attacks", None)
    return old


def section(text: str, name: str) -> str:
    start = text.index(f'<section class="figure" id="{name}">')
    return text[start:text.index("</section>", start)]


# --- the fixture is what the attack suite writes ------------------------------------------

def test_fixture_follows_the_attack_schema(runs):
    for run in runs:
        if run["status"] != "done":
            assert "attacks" not in run
            continue
        mia = run["attacks"]["mia"]
        assert {(e["attack"], e["level"]) for e in mia} == {
            (a, level) for a in attack_plots.ATTACK_NAMES for level in attack_plots.LEVELS}
        for e in mia:
            low, high = e["auc_ci"]
            assert low <= e["auc"] <= high and set(e["tpr_at_fpr"]) == {"0.01", "0.001"}
            assert e["tpr_at_fpr"]["0.001"] is None  # 120 non-members cannot measure 0.1%
            assert len(e["roc"]["fpr"]) == len(e["roc"]["tpr"]) <= 200
            if run["method"] != "base":
                assert e["advantage"] == pytest.approx(e["auc"] - e["base_auc"], abs=2e-4)
                assert set(e["halves"]) == {"select", "report"} and e["confounded"] is False
        if run["method"] == "base":
            assert all(abs(e["auc"] - 0.5) < 0.1 for e in mia)  # the untouched model: near chance
        assert set(run["attacks"]["extraction"]) == {"greedy", "sampling"}
        assert "ALL" in run["attacks"]["pii_inference"] and "asr_triggered" in run["attacks"]["backdoor"]


# --- figures ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,make", ATTACK_FIGURES)
def test_each_attack_figure_renders_from_the_fixture_without_the_failed_run(runs, name, make):
    fig = make(runs)
    try:
        assert isinstance(fig, Figure) and fig.axes
        fig.savefig(io.BytesIO(), format="png", dpi=40)
        texts = shown_texts(fig)
        assert "fft" in texts and "dp-fft-ghost" not in texts
    finally:
        plt.close(fig)


def broken_runs(runs: list[dict]) -> list[dict]:
    """The fixture with every kind of damage a store can hold."""
    broken = copy.deepcopy(runs)
    mia = broken[1]["attacks"]["mia"]
    mia[0]["auc"] = None                                        # NaN written as null
    mia[1]["roc"] = {"fpr": [0.0, None, 0.5, float("nan")], "tpr": [0.1, 0.2]}  # ragged, with holes
    mia[2]["roc"] = None
    mia[3]["tpr_at_fpr"] = None
    mia[4]["auc_ci"] = [None, 0.9]
    mia.append({"attack": "loss", "level": "bogus", "auc": 0.9})   # an unknown level is ignored
    mia.append("not an entry")
    broken[2]["attacks"] = {"mia": None, "extraction": {"greedy": None, "sampling": "x"},
                            "pii_inference": {"EMAIL": {"top1": None, "chance": None}}, "backdoor": []}
    broken[3]["attacks"]["extraction"]["greedy"]["EMAIL"]["member_rate"] = float("nan")
    broken[3]["attacks"]["backdoor"] = {"asr_triggered": None, "asr_clean": None}
    broken[4]["attacks"] = None
    broken[5].pop("attacks")
    return broken


@pytest.mark.parametrize("name,make", ATTACK_FIGURES)
def test_each_attack_figure_tolerates_missing_and_non_finite_sections(runs, name, make):
    for data in (broken_runs(runs), without_attacks(runs), [by_label(runs, "dp-fft-ghost")]):
        fig = make(data)
        assert isinstance(fig, Figure)
        fig.savefig(io.BytesIO(), format="png", dpi=40)
        plt.close(fig)
    fig = make(without_attacks(runs))
    assert any(t.startswith("no ") for t in shown_texts(fig))  # says it has nothing, not empty axes
    plt.close(fig)


def test_roc_figure_is_log_log_with_one_line_per_run_in_its_methods_colour(runs):
    fig = attack_plots.mia_roc_record(runs)
    try:
        assert len(fig.axes) == len(attack_plots.ATTACK_NAMES)
        colours = {r["label"]: s.color for r, s in zip(runs, plots.styles(runs))}
        finished = [r["label"] for r in runs if r["status"] == "done"]
        for ax in fig.axes:
            assert ax.get_xscale() == ax.get_yscale() == "log"
            assert ax.get_xlim()[0] == pytest.approx(1e-3) and ax.get_xlim()[1] == pytest.approx(1)
            curves = [line for line in ax.get_lines() if len(line.get_xdata()) > 2]
            assert len(curves) == len(finished)
            assert sorted(line.get_color() for line in curves) == sorted(colours[label] for label in finished)
            for line in curves:  # zeros are drawn on the axis floor, never lost off the log axis
                assert min(line.get_xdata()) >= 1e-3 and min(line.get_ydata()) >= 1e-3
        # the two LoRA runs share a colour and differ by line style
        lora = [s for r, s in zip(runs, plots.styles(runs)) if r["method"] == "lora"]
        assert len({attack_plots.linestyle(s) for s in lora}) == 2
        assert len({attack_plots.hatch(s) for s in lora}) == 2
    finally:
        plt.close(fig)


# --- readers --------------------------------------------------------------------------------

def test_roc_points_drop_holes_and_sort_by_fpr():
    entry = {"roc": {"fpr": [0.5, 0.0, None, 1.0, 1.5, float("nan")], "tpr": [0.8, 0.1, 0.3, 1.0, 1.0, 0.2]}}
    fpr, tpr = attack_plots.roc_points(entry)
    assert fpr.tolist() == [0.0, 0.5, 1.0] and tpr.tolist() == [0.1, 0.8, 1.0]
    for bad in (None, {}, {"roc": None}, {"roc": {"fpr": "x", "tpr": []}}):
        assert attack_plots.roc_points(bad)[0].size == 0


def test_strongest_attack_is_chosen_on_one_half_and_quoted_on_the_other(runs):
    for run in runs:
        head = strongest_attack(run)
        entries = attack_plots.mia_entries(run)
        if not entries:
            assert head is None
            continue
        if run["method"] == "base":
            assert head.attack is None and "baseline" in head.reason
            continue
        chosen = max(entries, key=lambda e: e["halves"]["select"]["advantage"])
        assert (head.attack, head.level, head.variants, head.reason) == (chosen["attack"], chosen["level"], 16, None)
        assert head.figures == chosen["halves"]["report"]  # not the half it was chosen on
        for level in attack_plots.LEVELS:
            assert strongest_attack(run, level).level == level


def test_attacks_and_pii_types_come_in_display_order():
    run = {"status": "done", "attacks": {"mia": [
        {"attack": "zz_new", "level": "record", "auc": 0.6},
        {"attack": "rmia", "level": "record", "auc": 0.6},
        {"attack": "loss", "level": "record", "auc": 0.6},
        {"attack": "loss", "level": "sensitive", "auc": None}]}}
    assert attack_plots.mia_attacks([run], "record") == ["loss", "rmia", "zz_new"]
    assert attack_plots.mia_attacks([run], "sensitive") == []
    tables = [{"ALL": {}, "EMAIL": {}, "CUSTOM": {}}, {"NAME": {}}]
    assert attack_plots.ordered_types(tables) == ["NAME", "EMAIL", "CUSTOM", "ALL"]


def test_a_backdoor_without_numbers_is_no_backdoor():
    assert attack_plots.backdoor({"attacks": {"backdoor": {"asr_triggered": None, "asr_clean": None}}}) is None
    assert attack_plots.backdoor({"attacks": {"backdoor": {"asr_triggered": 0.5}}})["asr_triggered"] == 0.5
    assert attack_plots.backdoor({}) is None


# --- the page ----------------------------------------------------------------------------------

def table_rows(text: str, css_class: str) -> dict[str, list[str]]:
    """``{run label: [cell html, ...]}`` of the first table with ``css_class`` in ``text``."""
    start = text.index(f'<table class="{css_class}">')
    body = text[start:text.index("</table>", start)]
    rows = {}
    for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body[body.index("<tbody>"):], flags=re.S):
        cells = re.findall(r"<td([^>]*)>(.*?)</td>", row, flags=re.S)
        label = re.search(r'<span title="([^"]*)">', cells[0][1]).group(1)
        rows[html.unescape(label)] = [attrs + "|" + content for attrs, content in cells[1:]]
    return rows


@pytest.mark.parametrize("level", attack_plots.LEVELS)
def test_mia_table_shows_auc_and_tpr_with_their_intervals(page, runs, level):
    _, text = page
    rows = table_rows(section(text, f"mia_{level}"), "attacks")
    attacks = list(attack_plots.ATTACK_NAMES)
    for run in runs:
        if run["status"] != "done":
            assert run["label"] not in rows
            continue
        for attack, cell in zip(attacks, rows[run["label"]]):
            entry = attack_plots.mia_entry(run, attack, level)
            low, high = entry["auc_ci"]
            assert f"<b>{entry['auc']:.2f}</b> <small>[{low:.2f}–{high:.2f}]</small> <small>n 120/120</small>" in cell
            if run["method"] != "base":
                a_low, a_high = entry["advantage_ci"]
                assert (f"base {entry['base_auc']:.2f}, adv. {entry['advantage']:+.2f} "
                        f"[{a_low:+.2f}, {a_high:+.2f}]") in cell
            tpr_low, tpr_high = entry["tpr_at_fpr_ci"]["0.01"]
            shown = [report_html._tpr_num(v) for v in (entry["tpr_at_fpr"]["0.01"], tpr_low, tpr_high)]
            assert f"@1%: {shown[0]} [{shown[1]}–{shown[2]}]" in cell
            assert "@0.1%: n/a (needs ≥ 1000 non-members)" in cell


@pytest.mark.parametrize("level", attack_plots.LEVELS)
def test_mia_table_shades_the_least_and_most_exposed_fine_tuned_run_per_attack(page, runs, level):
    _, text = page
    rows = table_rows(section(text, f"mia_{level}"), "attacks")
    trained = [r for r in runs if r["status"] == "done" and r["method"] != "base"]
    for column, attack in enumerate(attack_plots.ATTACK_NAMES):
        aucs = {r["label"]: attack_plots.mia_entry(r, attack, level)["auc"] for r in trained}
        for label, cells in rows.items():
            marked = cells[column].split("|")[0]
            assert ('class="best"' in marked) == (label in aucs and aucs[label] == min(aucs.values()))
            assert ('class="worst"' in marked) == (label in aucs and aucs[label] == max(aucs.values()))
    assert "↓" in section(text, f"mia_{level}") and "0.5 and TPR = FPR are chance" in text


def test_headline_names_the_strongest_attack_and_the_most_exposed_run(runs):
    cards = {c.title: c for c in report_html.headline_cards(runs)}
    card = cards["Strongest attack"]
    trained = [r for r in runs if r["status"] == "done" and r["method"] != "base"]
    run = max(trained, key=lambda r: strongest_attack(r).select_advantage)  # chosen on the selection half too
    head = strongest_attack(run)
    assert card.run == f"{attack_plots.attack_name(head.attack)} ({head.level})"
    low, high = head.figures["advantage_ci"]
    assert (f"most exposed: {run['label']}, advantage over the base model {head.figures['advantage']:+.2f} "
            f"[{low:.2f}–{high:.2f}], AUC {head.figures['auc']:.2f}") in card.detail
    assert "held back while choosing it among 16 attack variants" in card.detail
    assert card.kind == "warn" and low > 0
    assert "Strongest attack" not in {c.title for c in report_html.headline_cards(without_attacks(runs))}


def test_attack_sections_show_their_numbers(page, runs):
    _, text = page
    fft = by_label(runs, "fft")["attacks"]
    assert f"+{100 * fft['extraction']['greedy']['ALL']['advantage']:.1f}%" in section(text, "extraction")
    assert f"{100 * fft['pii_inference']['ALL']['top1']:.1f}%" in section(text, "pii_inference")
    for kind, row in (("extraction", fft["extraction"]["greedy"]["ALL"]),
                      ("pii_inference", fft["pii_inference"]["ALL"])):
        assert f"n = {row['n_member']} / {row['n_nonmember']}" in section(text, kind)  # targets beside each rate
    backdoor = section(text, "backdoor")
    assert f"{100 * fft['backdoor']['asr_triggered']:.1f}%" in backdoor
    assert html.escape(fft["backdoor"]["trigger"]) in backdoor
    runs_table = text[text.index('<table class="runs">'):]
    assert "MIA advantage, strongest attack" in runs_table
    head = strongest_attack(by_label(runs, "fft"))
    assert f"AUC {head.figures['auc']:.2f}, {html.escape(attack_plots.attack_name(head.attack))}" in runs_table


def test_a_study_without_attacks_renders_as_before(runs, tmp_path, quick_png):
    path = write_report(without_attacks(runs), tmp_path, title="t", meta={})
    text = path.read_text()
    assert {p.stem for p in (path.parent / "figures").iterdir()} == {name for name, _, _ in plots.FIGURES}
    for name, *_ in attack_plots.FIGURES:
        assert f'id="{name}"' not in text
    assert "Strongest attack" not in text


def test_runs_without_attacks_beside_attacked_ones_are_named_not_dropped(runs, tmp_path, quick_png):
    mixed = copy.deepcopy(runs)
    by_label(mixed, "lora-r32").pop("attacks")
    by_label(mixed, "base")["attacks"] = None
    text = write_report(mixed, tmp_path, title="t", meta={}).read_text()
    for level in attack_plots.LEVELS:
        assert "No attack results at this level for: base, lora-r32." in section(text, f"mia_{level}")
    assert "lora-r32" in text[text.index('<table class="runs">'):]


def test_damaged_attack_sections_still_render(runs, tmp_path, quick_png):
    text = write_report(broken_runs(runs), tmp_path, title="t", meta={}).read_text()
    assert 'id="mia_record"' in text and "–" in section(text, "mia_record")


def test_attack_names_from_runs_are_escaped(runs, tmp_path, quick_png):
    evil = copy.deepcopy(runs)
    evil[1]["attacks"]["mia"][0]["attack"] = "<script>x</script>"
    evil[1]["attacks"]["backdoor"]["trigger"] = "<b>go</b>"
    for run in evil[2:6]:
        run["attacks"]["backdoor"]["trigger"] = "<b>go</b>"
    evil[0]["attacks"]["backdoor"]["trigger"] = "<b>go</b>"
    text = write_report(evil, tmp_path, title="t", meta={}).read_text()
    assert "<script>" not in text and "<b>go</b>" not in text
    assert "&lt;script&gt;x&lt;/script&gt;" in text and "&lt;b&gt;go&lt;/b&gt;" in text


# --- CSV -----------------------------------------------------------------------------------------

def read_csv(path: Path) -> tuple[list[str], dict[str, dict]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return reader.fieldnames, {r["label"]: r for r in rows}


def test_csv_has_the_attack_columns(runs, tmp_path):
    header, rows = read_csv(write_csv(runs, tmp_path / "runs.csv"))
    for attack in attack_plots.ATTACK_NAMES:
        for level in attack_plots.LEVELS:
            for key in export.MIA_KEYS:
                assert f"mia_{attack}_{level}_{key}" in header
    for name in ("mia_strongest_attack", "mia_strongest_auc", "mia_strongest_advantage", "mia_strongest_advantage_low",
                 "mia_strongest_n_members", "mia_strongest_na", "extraction_greedy_all_advantage",
                 "extraction_sampling_all_advantage", "pii_inference_all_top1", "backdoor_asr_triggered",
                 "backdoor_asr_clean"):
        assert name in header
    assert len(header) == len(set(header)) and header[-1] == "epochs"
    fft = by_label(runs, "fft")["attacks"]
    entry = attack_plots.mia_entry(by_label(runs, "fft"), "rmia", "sensitive")
    assert float(rows["fft"]["mia_rmia_sensitive_auc"]) == entry["auc"]
    assert float(rows["fft"]["mia_rmia_sensitive_tpr_at_1pct_fpr"]) == entry["tpr_at_fpr"]["0.01"]
    assert float(rows["fft"]["mia_rmia_sensitive_advantage_low"]) == entry["advantage_ci"][0]
    assert rows["fft"]["mia_rmia_sensitive_confounded"] == "False"
    assert rows["fft"]["mia_rmia_sensitive_n_members"] == "120"
    head = strongest_attack(by_label(runs, "fft"))
    assert rows["fft"]["mia_strongest_attack"] == f"{head.attack}/{head.level}"
    assert float(rows["fft"]["mia_strongest_advantage"]) == head.figures["advantage"]
    assert rows["base"]["mia_strongest_attack"] == "" and "baseline" in rows["base"]["mia_strongest_na"]
    assert float(rows["fft"]["extraction_greedy_all_advantage"]) == fft["extraction"]["greedy"]["ALL"]["advantage"]
    assert float(rows["fft"]["pii_inference_all_top1"]) == fft["pii_inference"]["ALL"]["top1"]
    assert float(rows["fft"]["backdoor_asr_triggered"]) == fft["backdoor"]["asr_triggered"]
    assert rows["dp-fft-ghost"]["mia_loss_record_auc"] == "" and rows["dp-fft-ghost"]["backdoor_asr_clean"] == ""


def test_csv_of_a_study_without_attacks_has_no_attack_columns(runs, tmp_path):
    header, _ = read_csv(write_csv(without_attacks(runs), tmp_path / "runs.csv"))
    assert not [c for c in header if c.startswith(("mia_", "extraction_", "pii_", "backdoor_"))]


def test_csv_writes_damaged_attack_numbers_as_empty_cells(runs, tmp_path):
    _, rows = read_csv(write_csv(broken_runs(runs), tmp_path / "runs.csv"))
    assert rows["fft"]["mia_loss_record_auc"] == ""          # null AUC
    assert rows["lora-r32"]["backdoor_asr_triggered"] == ""  # null rates
    assert rows["dp-fft"]["mia_loss_record_auc"] == ""        # "attacks": null
    assert not math.isnan(float(rows["fft"]["mia_zlib_record_auc"]))
    assert np.isfinite(float(rows["dp-lora-r8"]["utility_ce"]))  # the rest of the row is intact
