import pytest

from privtune.config import load_config, parse_config
from privtune.errors import PrivtuneError
from privtune.study.plan import plan_study


def test_default_config_loads_and_plans_base_plus_methods():
    cfg = load_config()
    runs = plan_study(cfg)
    assert [r.label for r in runs] == ["base", "fft", "lora", "dp-fft", "dp-lora"]
    assert len({r.run_id for r in runs}) == len(runs)
    assert runs[4].config["method"]["dp"]["target_epsilon"] == 8


def test_hash_changes_with_what_changes_results_only():
    a = plan_study(parse_config({"methods": [{"method": "lora"}]}))[1]
    b = plan_study(parse_config({"methods": [{"method": "lora"}], "output_dir": "elsewhere", "device": "cpu"}))[1]
    c = plan_study(parse_config({"methods": [{"method": "lora", "lora": {"r": 16}}]}))[1]
    assert a.run_id == b.run_id
    assert a.run_id != c.run_id


def test_a_default_hashes_like_the_same_value_written_out():
    # alpha's default is 16; YAML's "alpha: 16" is an int that validation makes 16.0.
    implicit = plan_study(parse_config({"methods": [{"method": "lora"}]}))[1]
    explicit = plan_study(parse_config({"methods": [{"method": "lora", "lora": {"alpha": 16, "r": 8}}]}))[1]
    assert implicit.run_id == explicit.run_id


def test_two_studies_never_share_a_run():
    first = plan_study(parse_config({"name": "first", "methods": [{"method": "lora"}]}))
    second = plan_study(parse_config({"name": "second", "methods": [{"method": "lora"}]}))
    assert not {r.run_id for r in first} & {r.run_id for r in second}


def test_every_bad_field_is_named_on_one_line():
    with pytest.raises(PrivtuneError) as e:
        parse_config({"methods": [{"method": "sgd", "lr": "fast"}], "train": {"epochs": 0}, "colour": "red"})
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("methods.0.method", "'sgd'", "methods.0.lr", "train.epochs", "colour: unknown field"):
        assert part in msg


@pytest.mark.parametrize("raw, needle", [
    ({"methods": [{"method": "dp-lora", "dp": {"target_epsilon": 8, "noise_multiplier": 1.0}}]}, "exactly one"),
    ({"methods": [{"method": "lora", "dp": {"target_epsilon": 8}}]}, "not private"),
    ({"methods": [{"method": "fft", "lora": {"r": 4}}]}, "no lora"),
    ({"methods": [{"method": "lora"}, {"method": "lora"}]}, "unique"),
    ({"methods": []}, "methods"),
    ({"methods": [{"method": "fft"}], "canaries": {"repetitions": [0, 2]}}, "repetitions"),
])
def test_inconsistent_settings_are_rejected(raw, needle):
    with pytest.raises(PrivtuneError, match=needle):
        parse_config(raw)


def test_noise_multiplier_alone_replaces_the_default_target(tmp_path):
    cfg = parse_config({"methods": [{"method": "dp-fft", "dp": {"noise_multiplier": 1.1}}]})
    assert cfg.methods[0].dp.target_epsilon is None and cfg.methods[0].dp.noise_multiplier == 1.1


def test_yaml_errors_and_missing_file(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("methods: [\n")
    with pytest.raises(PrivtuneError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(PrivtuneError, match="not found"):
        load_config(tmp_path / "missing.yaml")
