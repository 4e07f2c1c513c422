"""The white-box audit of the DP engines: every real engine keeps its claimed ε over
several seeds, and an engine broken on purpose (no clipping, a quarter of the noise) is
caught. This is the test that would have seen a sampler or noise defect like the one of
"Every privacy figure honest, part 2"."""

import json

import numpy as np
import pytest

from privtune.auditing.whitebox import FAULTS, MechanismSettings, audit_engine, canary_scores, claimed_epsilon
from privtune.errors import PrivtuneError
from privtune.train.dp import DP_ENGINES
from tests.test_cli import run_cli

ENGINES = sorted(DP_ENGINES)


@pytest.mark.parametrize("engine", ENGINES)
def test_every_real_engine_keeps_its_claimed_epsilon_over_seeds(engine):
    for seed in (0, 1, 2):
        result = audit_engine(engine, None, MechanismSettings(seed=seed))
        assert result["verdict"] == "passed"
        assert 0 < result["epsilon_lower_bound"] < result["claimed_epsilon"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fault", FAULTS)
def test_a_planted_fault_is_caught(engine, fault):
    result = audit_engine(engine, fault)
    assert result["verdict"] == "caught"
    assert result["epsilon_lower_bound"] > result["claimed_epsilon"] + 0.5


def test_the_canary_signal_is_what_the_mechanism_promises():
    """Mean score q·T for a canary trained on, 0 otherwise; spread σ√T (units of C)."""
    s = MechanismSettings(canaries=4000)
    scores, trained_on = canary_scores("privtune", None, s)
    assert trained_on.mean() == pytest.approx(0.5, abs=0.03)
    assert scores[trained_on].mean() == pytest.approx(s.sample_rate * s.steps, abs=0.6)
    assert scores[~trained_on].mean() == pytest.approx(0.0, abs=0.6)
    assert scores[~trained_on].std() == pytest.approx(s.noise_multiplier * np.sqrt(s.steps), rel=0.05)
    assert claimed_epsilon(s) == pytest.approx(2.41, abs=0.01)


def test_unauditable_settings_are_refused_with_the_fix():
    with pytest.raises(PrivtuneError, match="--canaries 5 is below"):
        audit_engine("privtune", None, MechanismSettings(canaries=5))
    with pytest.raises(PrivtuneError, match="--noise-multiplier 0"):
        audit_engine("privtune", None, MechanismSettings(noise_multiplier=0))


def test_cli_self_test_prints_one_json_object_per_engine_and_fault(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "audit-dp", "--engine", "privtune", "--self-test", "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["fault"] for r in rows] == [None, *FAULTS]
    for row in rows:
        assert {"engine", "fault", "claimed_epsilon", "epsilon_lower_bound", "confidence", "canaries"} <= row.keys()
    code, _, err = run_cli(monkeypatch, capsys, "audit-dp", "--engine", "nope")
    assert code == 2 and "unknown DP engine 'nope'" in err
