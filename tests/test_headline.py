"""The strongest attack and the findings sentences: n/a where the records cannot support
a figure, never a confounded attack, unbiased under selection, and differences between
runs claimed only when their paired interval excludes 0."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privtune import cli
from privtune.attacks.metrics import roc_metrics, selection_half
from privtune.config import parse_config
from privtune.report import html as report_html
from privtune.report.differences import run_difference
from privtune.report.headline import strongest_attack, strongest_overall
from privtune.study.driver import open_store, run_study

ATTACKS = ("loss", "zlib", "min_k", "min_k_pp", "reference")


def entry(attack, level, scores, base, is_member, select):
    return {"attack": attack, "level": level, "higher_is_member": True,
            **roc_metrics(scores, is_member, base_scores=base, select=select)}


def run(label, entries, method=None):
    return {"label": label, "method": method or label, "status": "done", "attacks": {"mia": entries},
            "final": {}}


def study(members, nonmembers, *, base_separates, shift=0.0, seed=0):
    """A fine-tuned run and the base run, every attack at both levels, on ``members`` and
    ``nonmembers`` records (one per person). ``base_separates``: the attacks on which the
    base model already tells the groups apart (the records differ, not the model)."""
    rng = np.random.default_rng(seed)
    n = members + nonmembers
    is_member = np.r_[np.ones(members, bool), np.zeros(nonmembers, bool)]
    select = selection_half([f"p{i}" for i in range(n)], seed)
    tuned, base_entries = [], []
    for level in ("record", "sensitive"):
        for attack in ATTACKS:
            base = rng.normal(size=n) + (8.0 * is_member if attack in base_separates else 0.0)
            scores = base + 0.5 * rng.normal(size=n) + shift * is_member
            tuned.append(entry(attack, level, scores, base, is_member, select))
            base_entries.append(entry(attack, level, base, None, is_member, None))
    return [run("base", base_entries), run("fft", tuned)]


def test_the_issues_twelve_person_study_headlines_no_perfect_auc():
    # 3 members and 5 non-members; the base model already scores AUC 1.00 with zlib.
    runs = study(3, 5, base_separates={"zlib"}, shift=3.0)
    head = strongest_attack(runs[1])
    assert head.attack is None and head.figures == {}
    assert head.reason == "needs ≥ 10 members and 10 non-members, has 3 and 5"
    card = {c.title: c for c in report_html.headline_cards(runs)}["Strongest attack"]
    assert card.run == "n/a" and "1.00 [1.00–1.00]" not in card.detail and "has 3 and 5" in card.detail
    assert "n/a <small>(needs ≥ 10 per group in each half)</small>" in report_html._strongest_mia_cell(runs[1])
    assert report_html._strongest_mia_cell(runs[0]) == "–"  # the base model is the baseline itself
    assert cli.strongest_lines(runs) == ["fft: strongest membership attack n/a: needs ≥ 10 members and 10 "
                                         "non-members, has 3 and 5"]


def test_an_attack_the_base_model_already_wins_is_never_headlined():
    runs = study(40, 40, base_separates={"zlib"}, shift=0.0)
    zlib = next(e for e in runs[1]["attacks"]["mia"] if e["attack"] == "zlib")
    assert zlib["auc"] > 0.95 and zlib["confounded"] and "never saw these records" in zlib["confounded_reason"]
    head = strongest_attack(runs[1])
    assert head.attack != "zlib" and head.reason is None
    everything = study(40, 40, base_separates=set(ATTACKS), shift=0.0)
    head = strongest_attack(everything[1])
    assert head.attack is None and head.reason.startswith("every attack is confounded")


def test_the_strongest_attack_is_quoted_on_records_it_was_not_chosen_on():
    # Ten null variants (no memorisation at all): the maximum over them on all records is
    # biased upward; chosen on one half and quoted on the other, it is not.
    reported, naive = [], []
    for seed in range(40):
        tuned = study(50, 50, base_separates=set(), seed=seed)[1]
        reported.append(strongest_attack(tuned).figures["advantage"])
        naive.append(max(e["advantage"] for e in tuned["attacks"]["mia"]))
    # Monte Carlo errors of the means: about 0.007 and 0.003.
    assert abs(np.mean(reported)) < 0.025 and np.mean(naive) > 0.03


def test_the_card_chooses_the_run_on_the_selection_half_too():
    weak = study(40, 40, base_separates=set(), shift=0.3, seed=1)[1] | {"label": "lora", "method": "lora"}
    strong = study(40, 40, base_separates=set(), shift=2.0, seed=2)
    run, head = strongest_overall([strong[0], weak, strong[1]])
    assert run["label"] == "fft" and head.figures["advantage_ci"][0] > 0
    card = report_html.strongest_attack_card([strong[0], weak, strong[1]])
    assert card.kind == "warn" and f"(n {head.figures['n_members']}/{head.figures['n_nonmembers']})" in card.detail


# --- differences between runs ------------------------------------------------------------------

def stats_run(label, member_nll, nonmember_nll, tokens, people, final):
    """A run whose ``record_stats`` hold per-record summed losses (sensitive = half the record)."""
    nll = np.r_[member_nll, nonmember_nll]
    return {"label": label, "method": label, "status": "done", "final": final,
            "record_stats": {"n_members": len(member_nll), "person": people,
                             "sensitive": {"loglik": (-nll / 2).tolist(), "tokens": (tokens // 2).tolist()},
                             "record": {"loglik": (-nll).tolist(), "tokens": tokens.tolist()}}}


def pair(effect, seed=0, n=60):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, 60, 2 * n) * 2
    people = [i // 2 for i in range(2 * n)]  # two records per person
    person_effect = np.repeat(rng.normal(0, 0.3, n), 2)  # records of a person are alike
    base_nll = tokens * (3 + person_effect)
    a_nll = base_nll + tokens * rng.normal(0, 0.05, 2 * n) - tokens * effect
    b_nll = base_nll + tokens * rng.normal(0, 0.05, 2 * n)

    def final(nll):
        ce_s = (nll[:n] / 2).sum() / (tokens[:n] // 2).sum()
        base_s = (base_nll[:n] / 2).sum() / (tokens[:n] // 2).sum()
        ce_n = (nll[n:] / 2).sum() / (tokens[n:] - tokens[n:] // 2).sum()
        return {"leakage_gain": base_s - ce_s, "utility_ce": ce_n, "utility_ppl": math.exp(ce_n)}
    return (stats_run("a", a_nll[:n], a_nll[n:], tokens, people, final(a_nll)),
            stats_run("b", b_nll[:n], b_nll[n:], tokens, people, final(b_nll)))


def test_run_difference_is_the_difference_of_the_stored_measures_with_a_clustered_interval():
    a, b = pair(effect=0.0)
    diff = run_difference(a, b, "leakage_gain")
    assert diff.value == pytest.approx(a["final"]["leakage_gain"] - b["final"]["leakage_gain"])
    assert (diff.records, diff.people) == (60, 30)
    # An independent reference: the percentile interval of a bootstrap over people.
    rng = np.random.default_rng(0)
    n = 60
    # a's gain minus b's = b's summed loss minus a's = a's log-likelihood minus b's.
    d = (np.array(a["record_stats"]["sensitive"]["loglik"]) - np.array(b["record_stats"]["sensitive"]["loglik"]))[:n]
    t = np.array(a["record_stats"]["sensitive"]["tokens"])[:n]
    people = np.array(a["record_stats"]["person"])[:n]
    ids = np.unique(people)
    boot = []
    for _ in range(2000):
        chosen = rng.choice(ids, ids.size)
        rows = np.concatenate([np.flatnonzero(people == p) for p in chosen])
        boot.append(d[rows].sum() / t[rows].sum())
    low, high = np.percentile(boot, [2.5, 97.5])
    tolerance = 0.25 * (high - low)
    assert diff.low == pytest.approx(low, abs=tolerance) and diff.high == pytest.approx(high, abs=tolerance)


def test_run_difference_interval_covers_the_truth():
    hits = sum(run_difference(*pair(effect=0.1, seed=s), "leakage_gain").low <= 0.1
               <= run_difference(*pair(effect=0.1, seed=s), "leakage_gain").high for s in range(200))
    assert hits / 200 >= 0.93


def test_findings_say_no_measurable_difference_when_the_interval_covers_zero():
    a, b = pair(effect=0.0, seed=3)
    low, best = sorted((a, b), key=lambda r: r["final"]["leakage_gain"])
    best["final"]["utility_ce"] = low["final"]["utility_ce"] - 0.01  # a trade-off on paper only
    sentence = report_html.verdict([a, b])
    assert "no measurable difference in leakage" in sentence and "% less" not in sentence
    assert "paired over 60 records of 30 people" in sentence


def test_findings_claim_a_difference_only_when_the_interval_excludes_zero():
    a, b = pair(effect=0.2, seed=4)  # a memorised: its members' loss fell by 0.2 nats a token
    b["final"]["utility_ce"] = a["final"]["utility_ce"] + 0.05  # a is also the more useful
    sentence = report_html.verdict([a, b])
    assert sentence.startswith("b leaks less than a (leakage gain")
    diff = run_difference(a, b, "leakage_gain")
    assert diff.low > 0 and f"difference {diff.value:+.3f}" in sentence


def test_findings_make_no_claim_without_per_record_statistics():
    a, b = pair(effect=0.2, seed=4)
    b["final"]["utility_ce"] = a["final"]["utility_ce"] + 0.05
    for r in (a, b):
        r.pop("record_stats")
    assert "whether the difference is measurable is unknown" in report_html.verdict([a, b])


# --- end to end ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_twelve_person_tiny_study_headlines_nothing(tmp_path):
    """The issue's study: 12 people, tiny Llama, three methods, one epoch."""
    cfg = parse_config({
        "name": "tiny12", "model": "tiny-llama", "output_dir": str(tmp_path / "out"),
        "data": {"source": "customer-sim", "n_individuals": 12, "max_length": 64},
        "canaries": {"enabled": False}, "train": {"epochs": 1, "batch_size": 4, "lr": 3e-3},
        "methods": [{"method": "fft"}, {"method": "lora", "lora": {"r": 2}}, {"method": "bitfit"}],
        "attacks": {"extraction": {"enabled": False}}, "precision": "fp32", "eval_batch_size": 8})
    assert run_study(cfg, show_progress=False).failed == {}
    store = open_store(cfg)
    runs = store.runs("tiny12")
    store.close()
    for r in runs:
        for e in r["attacks"]["mia"]:
            assert (e["auc"] is None) == (min(e["n_members"], e["n_nonmembers"]) < 10)
            assert all(v is None for v in e["tpr_at_fpr"].values())  # far fewer than 100 non-members
        if r["method"] != "base":
            assert strongest_attack(r).reason is not None
            assert r["record_stats"]["person"] and len(r["record_stats"]["selection_half"]) == len(
                r["record_stats"]["person"])
    page = report_html.render_html(runs, title="t", meta={})
    assert "Strongest attack" in page and "[1.00–1.00]" not in page


def test_a_clustered_interval_over_few_people_uses_students_t():
    from scipy.stats import t

    from privtune.report.differences import paired_difference

    diff, tokens, people = np.array([1.0, 3.0, 2.0]), np.array([2.0, 2.0, 1.0]), np.array(["a", "a", "b"])
    got = paired_difference(diff, tokens, people)
    value = diff.sum() / tokens.sum()
    residuals = np.array([diff[:2].sum() - value * 4, diff[2] - value * 1])  # one per person
    se = math.sqrt(2 / 1 * np.sum(residuals ** 2)) / tokens.sum()
    half = t.ppf(0.975, 1) * se  # 12.7 standard errors, not 1.96, with 2 people
    assert got.value == pytest.approx(value) and got.people == 2
    assert (got.low, got.high) == pytest.approx((value - half, value + half))
