"""The privacy–utility frontier (privtune.report.frontier): seed means against scipy,
fronts and interpolation on synthetic points, bootstrap intervals, and findings text."""

import math

import numpy as np
import pytest
from scipy import stats

from privtune.report.frontier import Frontier, finding, leakage_at, points, seed_mean


def run(method, config, seed, epochs, *, status="done", role="target", epsilon=None, scrub=False):
    """A stored run as the report reads it: per-epoch (utility CE, net gap) pairs."""
    return {"status": status, "method": method, "label": f"{config}-s{seed}", "role": role, "seed": seed,
            "config": {"method": {"label": config, **({"scrub": {"tagger": "regex"}} if scrub else {})}},
            "epochs": [{"epoch": 0, "utility_ce": 9.0, "memorisation_gap_net": 0.0}]
            + [{"epoch": e, "utility_ce": u, "memorisation_gap_net": g} for e, (u, g) in enumerate(epochs, 1)],
            "empirical_epsilon": {"lower_bound": epsilon}}


def test_seed_mean_is_the_mean_with_student_t_interval_and_says_n():
    x = [0.12, 0.08, 0.15, 0.11]
    mean = seed_mean(x)
    low, high = stats.t.interval(0.95, 3, loc=np.mean(x), scale=stats.sem(x))
    assert (mean.mean, mean.low, mean.high, mean.n) == pytest.approx((np.mean(x), low, high, 4))
    one = seed_mean([0.3, math.nan])
    assert (one.mean, one.low, one.high, one.n) == (0.3, None, None, 1)


def test_leakage_at_a_level_interpolates_on_the_front_and_never_extrapolates():
    front = [(2.0, 0.5), (2.5, 0.3), (3.0, 0.1)]
    assert leakage_at(front, 1.9) is None  # better utility than the family ever reached
    assert leakage_at(front, 2.0) == 0.5 and leakage_at(front, 2.25) == pytest.approx(0.4)
    assert leakage_at(front, 3.0) == 0.1 and leakage_at(front, 4.0) == 0.1  # reached: its best point there
    assert leakage_at([], 3.0) is None


def test_points_are_every_epoch_of_finished_target_runs_with_final_only_measures_at_the_last():
    runs = [run("lora", "lora", 0, [(3.0, 0.2), (2.8, 0.3)], epsilon=0.4),
            run("fft", "fft", 0, [(2.0, 0.9)], status="failed"), run("fft", "fft", 0, [(2.0, 0.9)], role="shadow"),
            {**run("base", "base", 0, []), "method": "base"}, run("fft", "fft+scrub", 0, [(2.1, 0.4)], scrub=True)]
    pts = points(runs)
    assert [(p.family, p.epoch) for p in pts] == [("lora", 1), ("lora", 2), ("fft+scrub", 1)]
    assert math.isnan(pts[0].values["empirical_epsilon"]) and pts[1].values["empirical_epsilon"] == 0.4
    assert pts[1].values["utility_ce"] == 2.8 and pts[0].values["memorisation_gap_net"] == 0.2


def test_a_family_front_spans_its_configurations_and_epochs_on_seed_means():
    runs = [run("fft", "fft-lr1", s, [(2.5, 0.4), (2.0, 0.8)]) for s in (0, 1)] + \
           [run("fft", "fft-lr2", s, [(2.3, 0.5), (2.2, 0.45)]) for s in (0, 1)]
    frontier = Frontier(points(runs), "memorisation_gap_net", bootstrap=50)
    # (2.3, 0.5) is beaten by (2.2, 0.45); the others trade utility for leakage
    assert frontier.fronts["fft"] == [(2.0, 0.8, "fft-lr1", 2), (2.2, 0.45, "fft-lr2", 2), (2.5, 0.4, "fft-lr1", 1)]
    assert frontier.levels() == [2.0]


def families(gap_a, gap_b, seeds=5, noise=0.01, seed=0):
    """Two families with fronts of the same shape, leakage shifted, over ``seeds`` seeds."""
    rng = np.random.default_rng(seed)
    out = []
    for family, gap in (("lora", gap_a), ("fft", gap_b)):
        for s in range(seeds):
            out.append(run(family, family, s, [(3.0, gap - 0.05 + rng.normal(0, noise)),
                                               (2.5, gap + rng.normal(0, noise)),
                                               (2.0, gap + 0.1 + rng.normal(0, noise))]))
    return points(out)


def test_a_clear_difference_is_significant_and_the_sentence_says_so():
    frontier = Frontier(families(0.05, 0.20), "memorisation_gap_net", bootstrap=300)
    a, b = frontier.at("lora", 2.5), frontier.at("fft", 2.5)
    assert a.low < a.value < a.high and a.seeds == 5
    diff = frontier.difference("lora", "fft", 2.5)
    assert diff[0] == pytest.approx(a.value - b.value) and diff[2] < 0
    text = finding("memorisation_gap_net", 2.5, a, b, diff)
    assert text.startswith("At utility CE ≤ 2.500, lora's net memorisation gap is ") and "is significant." in text


def test_no_difference_is_not_significant_and_the_sentence_says_so():
    frontier = Frontier(families(0.10, 0.10, noise=0.05), "memorisation_gap_net", bootstrap=300)
    diff = frontier.difference("lora", "fft", 2.5)
    assert diff[1] < 0 < diff[2]
    text = finding("memorisation_gap_net", 2.5, frontier.at("lora", 2.5), frontier.at("fft", 2.5), diff)
    assert text.endswith("is not significant.")


def test_a_family_that_never_reaches_a_level_is_said_to_and_not_compared():
    pts = families(0.05, 0.20) + points([run("dp-lora", "dp-lora", s, [(3.4, 0.0), (3.2, 0.01)]) for s in range(3)])
    frontier = Frontier(pts, "memorisation_gap_net", bootstrap=100)
    assert frontier.levels() == pytest.approx([3.2, 2.0])
    dp, fft = frontier.at("dp-lora", 2.5), frontier.at("fft", 2.5)
    assert not dp.reached and frontier.difference("dp-lora", "fft", 2.5) is None
    assert finding("memorisation_gap_net", 2.5, dp, fft, None) == (
        "At utility CE ≤ 2.500, dp-lora never reaches this utility: no comparison (never extrapolated).")
    # at the level dp-lora reaches, fft is read off its own front (its best point there)
    assert frontier.at("fft", 3.2).value == pytest.approx(frontier.fronts["fft"][-1][1])


def test_one_seed_gives_figures_without_intervals_and_no_claim():
    frontier = Frontier(families(0.05, 0.20, seeds=1), "memorisation_gap_net", bootstrap=50)
    a, b = frontier.at("lora", 2.5), frontier.at("fft", 2.5)
    assert a.low is None and a.seeds == 1
    diff = frontier.difference("lora", "fft", 2.5)
    assert diff[1] is None
    text = finding("memorisation_gap_net", 2.5, a, b, diff)
    assert "(one seed: no interval)" in text and text.endswith("so no claim is made.")


def test_the_report_section_and_frontier_json_hold_the_fronts_the_table_and_the_findings(tmp_path):
    import json

    from privtune.report.export import write_frontier
    from privtune.report.frontier_section import frontier_section
    from privtune.report.html import render_html

    rng = np.random.default_rng(0)
    runs = [run(family, family, s, [(3.0, gap - 0.05 + rng.normal(0, 0.01)), (2.5, gap + rng.normal(0, 0.01))])
            for family, gap in (("lora", 0.05), ("fft", 0.2)) for s in range(3)]
    section = frontier_section(runs)
    assert section.startswith('<section id="frontier"><h2>Leakage at matched utility</h2>')
    assert "At utility CE ≤ 2.500, lora&#x27;s net memorisation gap is" in section and "is significant." in section
    assert "One seed per configuration" not in section and "n=3" in section
    assert '<section id="frontier">' in render_html(runs, title="t", meta={})
    saved = json.loads(write_frontier(runs, tmp_path / "frontier.json").read_text())
    gap = saved["memorisation_gap_net"]
    assert [p["epoch"] for p in gap["fronts"]["lora"]] == [2, 1]
    assert gap["fronts"]["lora"][0]["utility_ce"]["seeds"] == 3
    assert {(m["family"], m["level"]) for m in gap["matched"]} == {("fft", 2.5), ("lora", 2.5)}
    assert gap["findings"] and "empirical_epsilon" not in saved  # no run has an empirical ε


def test_one_family_or_a_single_seed_study_says_so_or_shows_nothing():
    from privtune.report.frontier_section import frontier_section

    assert frontier_section([run("lora", "lora", 0, [(3.0, 0.1)])]) == ""
    single = frontier_section([run("lora", "lora", 0, [(3.0, 0.1)]), run("fft", "fft", 0, [(2.0, 0.4)])])
    assert "One seed per configuration" in single and "lora never reaches this utility" in single


def test_each_configuration_over_its_seeds_at_its_last_epoch_with_costs():
    from privtune.report.frontier import configurations
    from privtune.report.frontier_section import seeds_table

    runs = [{**run("lora", "lora-r4", s, [(3.0, 0.3), (2.8, g)]), "efficiency": {"train_seconds": t}}
            for s, (g, t) in enumerate([(0.1, 10.0), (0.2, 14.0), (0.15, 12.0)])]
    figures = configurations(points(runs))[("lora", "lora-r4")]
    expected = stats.t.interval(0.95, 2, loc=0.15, scale=stats.sem([0.1, 0.2, 0.15]))
    gap = figures["memorisation_gap_net"]
    assert (gap.mean, gap.low, gap.high, gap.n) == pytest.approx((0.15, *expected, 3))
    assert figures["train_seconds"].mean == pytest.approx(12.0) and figures["utility_ce"].mean == pytest.approx(2.8)
    assert math.isnan(figures["empirical_epsilon"].mean)
    table = seeds_table(runs)
    assert "0.150 <small>[" in table and "n=3" in table and "<td>lora-r4</td>" in table


def test_the_report_writes_frontier_json_beside_the_page_from_the_same_figures(tmp_path):
    import json

    from privtune.report.frontier_section import frontier_json
    from privtune.report.html import write_report

    runs = [run(family, family, s, [(3.0, gap + 0.01 * s), (2.5, gap + 0.02 * s)])
            for family, gap in (("lora", 0.05), ("fft", 0.2)) for s in range(2)]
    write_report(runs, tmp_path, title="t", meta={})
    assert json.loads((tmp_path / "frontier.json").read_text()) == json.loads(json.dumps(frontier_json(runs)))
