"""Exposure figures in the report, the CSV and the CLI always say how they were obtained."""

from __future__ import annotations

import csv
import math

import pytest

from privtune.report import exposure, write_csv
from privtune.report.html import _top_exposure_cell

EXACT = {"repetitions": 16, "exposure": 12.9, "exposure_method": "exact", "exposure_low": 12.9,
         "exposure_high": 12.9}
BOUNDED = {"repetitions": 16, "exposure": 9.0, "exposure_method": "bounded", "exposure_low": 7.0,
           "exposure_high": 19.9}
ESTIMATED = {"repetitions": 1, "exposure": 1.5, "exposure_method": "estimated", "exposure_low": None,
             "exposure_high": None}
OLD = {"repetitions": 1, "exposure": 2.5}  # stored before exposures said how they were obtained


def test_a_mean_takes_the_weakest_method_and_the_mean_bounds():
    assert exposure.summarise([EXACT]) == exposure.ExposureFigure(12.9, 12.9, 12.9, "exact")
    mixed = exposure.summarise([EXACT, BOUNDED])
    assert mixed.method == "bounded" and mixed.value == pytest.approx(10.95)
    assert (mixed.low, mixed.high) == (pytest.approx(9.95), pytest.approx(16.4))
    guessed = exposure.summarise([EXACT, ESTIMATED])
    assert guessed.method == "estimated" and math.isnan(guessed.low) and math.isnan(guessed.high)
    assert exposure.summarise([OLD]).method == "estimated"
    assert exposure.summarise([{"repetitions": 1, "exposure": None}]) is None
    run = {"exposure": [EXACT, BOUNDED, ESTIMATED, OLD]}
    assert sorted(exposure.by_repetition(run)) == [1, 16]
    assert exposure.top(run)[0] == 16 and exposure.top({}) == (None, None)


def test_an_estimate_at_the_samples_ceiling_is_a_floor_not_a_value():
    """A canary that beats all m sampled secrets shows log2(m + 1) bits whatever its rank:
    the figure says "at least", and one that lost to some does not."""
    ceiling = {"repetitions": 4, "exposure": math.log2(33), "exposure_method": "estimated", "n_candidates": 32}
    below = {**ceiling, "exposure": 3.2}
    old = {"repetitions": 4, "exposure": 19.93, "exposure_empirical": math.log2(33), "n_candidates": 32}
    assert exposure.text(exposure.summarise([ceiling]), compact=True) == "≥ 5.0 est."
    assert exposure.text(exposure.summarise([ceiling])) == "≥ 5.0 (estimated)"
    assert "beat every sampled secret" in exposure.how(exposure.summarise([ceiling]))
    assert exposure.text(exposure.summarise([below]), compact=True) == "≈ 3.2 est."
    # A row stored by an older privtune shows its sampled figure, never its skew-normal 19.93.
    assert exposure.text(exposure.summarise([old]), compact=True) == "≥ 5.0 est."


def test_texts_name_the_method():
    exact, bounded, estimated = (exposure.summarise([row]) for row in (EXACT, BOUNDED, ESTIMATED))
    assert exposure.text(exact) == exposure.text(exact, compact=True) == "12.9 (exact)"
    assert exposure.text(bounded) == "9.0 [7.0–19.9] bounded"
    assert exposure.text(bounded, compact=True) == "≥ 7.0"  # what is proven
    assert exposure.text(estimated) == "≈ 1.5 (estimated)" and exposure.text(estimated, compact=True) == "≈ 1.5 est."
    assert exposure.text(None) == "–"
    assert exposure.how(bounded) == "bounded to 7.0–19.9" and exposure.how(exact) == "exact"
    assert "bounded" in _top_exposure_cell({"exposure": [BOUNDED]}) and "[7.0–19.9]" in _top_exposure_cell(
        {"exposure": [BOUNDED]})
    assert "exact, 16×" in _top_exposure_cell({"exposure": [EXACT]})


def test_csv_carries_the_method_and_bounds(tmp_path):
    runs = [{"label": "fft", "status": "done", "exposure": [EXACT, ESTIMATED]},
            {"label": "lora", "status": "done", "exposure": [BOUNDED, OLD]}]
    with write_csv(runs, tmp_path / "runs.csv").open(newline="") as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    fft, lora = rows["fft"], rows["lora"]
    assert (fft["exposure_r16"], fft["exposure_r16_method"], fft["exposure_r16_low"]) == ("12.9", "exact", "12.9")
    assert fft["exposure_r1_method"] == "estimated" and fft["exposure_r1_low"] == fft["exposure_r1_high"] == ""
    assert lora["exposure_top_mean"] == "9.0" and lora["exposure_top_mean_method"] == "bounded"
    assert (lora["exposure_top_mean_low"], lora["exposure_top_mean_high"]) == ("7.0", "19.9")
