"""Person-clustered token means and their intervals (privtune.measures.intervals), checked
against scipy's textbook intervals where the two must agree, and by coverage."""

import numpy as np
import pytest
from scipy import stats

from privtune.measures.intervals import clustered_mean, difference_interval


def test_one_record_of_one_token_per_person_gives_the_mean_and_its_t_interval():
    x = np.random.default_rng(0).normal(1.0, 2.0, 25)
    mean = clustered_mean(x, np.ones(25), np.arange(25))
    assert mean.value == pytest.approx(x.mean()) and mean.se == pytest.approx(stats.sem(x))
    low, high = mean.interval(0.95)
    expected = stats.t.interval(0.95, 24, loc=x.mean(), scale=stats.sem(x))
    assert (low, high) == pytest.approx(expected)


def test_two_groups_of_people_give_welch_s_interval():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.5, 1.0, 30), rng.normal(0.0, 3.0, 12)
    interval = difference_interval(clustered_mean(a, np.ones(30), np.arange(30)),
                                   clustered_mean(b, np.ones(12), np.arange(12)))
    welch = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert interval == pytest.approx((welch.low, welch.high))


def test_a_person_s_records_count_as_one_cluster_not_as_independent_records():
    rng = np.random.default_rng(2)
    person_effect = rng.normal(0, 1, 20)
    people = np.repeat(np.arange(20), 5)
    sums = person_effect[people] + rng.normal(0, 0.1, 100)  # five near-copies per person
    clustered = clustered_mean(sums, np.ones(100), people)
    naive = clustered_mean(sums, np.ones(100), np.arange(100))
    assert clustered.value == pytest.approx(naive.value) and clustered.se > 1.8 * naive.se
    assert clustered.people == 20 and clustered.records == 100


def test_the_interval_of_a_difference_of_ratio_means_covers_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(3)
    hits, trials = 0, 400
    for _ in range(trials):
        groups = []
        for shift, n in ((0.4, 15), (0.1, 25)):  # per-token effect; records of 1-3 per person, 2-9 tokens each
            people = np.repeat(np.arange(n), rng.integers(1, 4, n))
            tokens = rng.integers(2, 10, people.size).astype(float)
            person = rng.normal(0, 0.3, n)[people]
            sums = tokens * (shift + person) + rng.normal(0, 1, people.size) * np.sqrt(tokens)
            groups.append(clustered_mean(sums, tokens, people))
        low, high = difference_interval(*groups)
        hits += low <= 0.3 <= high
    assert 0.92 <= hits / trials <= 0.98


def test_no_interval_without_two_people_or_without_tokens():
    assert clustered_mean(np.ones(3), np.ones(3), np.zeros(3)) is None
    assert clustered_mean(np.ones(3), np.zeros(3), np.arange(3)) is None
    assert clustered_mean(np.array([1.0, np.nan]), np.ones(2), np.arange(2)) is None
