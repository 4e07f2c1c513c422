from pathlib import Path

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


def test_lora_rank_sweep_expands_to_labelled_runs_hashed_like_written_out_ones():
    cfg = parse_config({"methods": [{"method": "lora", "lora": {"r": [4, 8, 16], "alpha": 8}},
                                    {"method": "dp-lora", "label": "private", "lora": {"r": [2, 4]}}]})
    assert [m.label for m in cfg.methods] == ["lora-r4", "lora-r8", "lora-r16", "private-r2", "private-r4"]
    assert [m.lora.r for m in cfg.methods] == [4, 8, 16, 2, 4]
    assert all(m.lora.alpha == 8 for m in cfg.methods[:3]) and cfg.methods[3].dp is not None
    swept = plan_study(cfg)[2]
    written = plan_study(parse_config({"methods": [{"method": "lora", "label": "lora-r8", "lora": {"r": 8, "alpha": 8}}]}))[1]
    assert swept.label == "lora-r8" and swept.run_id == written.run_id


def test_target_module_sweep_crosses_with_the_rank_sweep():
    cfg = parse_config({"methods": [{"method": "dora", "lora": {"r": [2, 4], "target_modules": [["q_proj"], ["q_proj", "v_proj"]]}}],
                        "attacks": {"shadow": {"models": 2, "method": "dora-r4-tq_proj"}}})
    assert [m.label for m in cfg.methods] == ["dora-r2-tq_proj", "dora-r2-tq_proj+v_proj",
                                              "dora-r4-tq_proj", "dora-r4-tq_proj+v_proj"]
    assert cfg.methods[1].lora.target_modules == ["q_proj", "v_proj"]
    # A single list is one setting, not a sweep.
    one = parse_config({"methods": [{"method": "lora", "lora": {"target_modules": ["q_proj", "v_proj"]}}]})
    assert [m.label for m in one.methods] == ["lora"] and one.methods[0].lora.target_modules == ["q_proj", "v_proj"]


def test_lr_epochs_and_epsilon_sweeps_expand_to_a_grid_hashed_like_written_out_runs():
    cfg = parse_config({"methods": [
        {"method": "fft", "lr": [1e-4, 3e-4], "epochs": [1, 2]},
        {"method": "dp-lora", "lora": {"r": [4, 8]}, "dp": {"target_epsilon": [1, 8]}, "lr": 5e-3},
        {"method": "dp-fft", "dp": {"noise_multiplier": 1.0}}]})
    assert [m.label for m in cfg.methods] == [
        "fft-lr0.0001-e1", "fft-lr0.0001-e2", "fft-lr0.0003-e1", "fft-lr0.0003-e2",
        "dp-lora-r4-eps1", "dp-lora-r4-eps8", "dp-lora-r8-eps1", "dp-lora-r8-eps8", "dp-fft"]
    assert [(m.lr, m.epochs) for m in cfg.methods[:4]] == [(1e-4, 1), (1e-4, 2), (3e-4, 1), (3e-4, 2)]
    assert [(m.lora.r, m.dp.target_epsilon, m.lr) for m in cfg.methods[4:8]] == [
        (4, 1.0, 5e-3), (4, 8.0, 5e-3), (8, 1.0, 5e-3), (8, 8.0, 5e-3)]
    assert cfg.methods[8].dp.target_epsilon is None
    runs = {r.label: r for r in plan_study(cfg)}
    assert len(runs) == 1 + 9 and len({r.run_id for r in runs.values()}) == 10  # base + one distinct run per point
    written = plan_study(parse_config({"methods": [
        {"method": "fft", "label": "fft-lr0.0003-e2", "lr": 3e-4, "epochs": 2},
        {"method": "dp-lora", "label": "dp-lora-r8-eps1", "lora": {"r": 8}, "dp": {"target_epsilon": 1}, "lr": 5e-3}]}))
    assert [runs[w.label].run_id for w in written[1:]] == [w.run_id for w in written[1:]]  # cached alike


def test_method_settings_get_their_defaults_and_identity():
    cfg = parse_config({"methods": [{"method": "prefix-tuning", "prefix": {"num_virtual_tokens": 4}},
                                    {"method": "prompt-tuning"}, {"method": "ia3"}, {"method": "bitfit"}]})
    prefix, prompt, ia3, bitfit = cfg.methods
    assert prefix.settings.num_virtual_tokens == 4 and prompt.settings.init == "vocab"
    assert ia3.settings.target_modules is None and bitfit.settings is None
    runs = plan_study(cfg)[1:]
    assert runs[0].config["method"]["prefix"] == {"num_virtual_tokens": 4} and "prompt" not in runs[0].config["method"]
    # Runs of the methods that existed before keep the identity they had (no new keys).
    assert set(plan_study(parse_config({"methods": [{"method": "fft"}]}))[1].config["method"]) == {
        "method", "label", "lr", "epochs", "batch_size", "weight_decay", "lora", "dp"}


@pytest.mark.parametrize("raw, needle", [
    ({"methods": [{"method": "dp-ia3"}]}, "methods.0.method: method 'dp-ia3' is not available: .*use dp-lora or dp-bitfit"),
    ({"methods": [{"method": "dp-dora"}]}, "'dp-dora' is not available: .*magnitude.*use dp-lora"),
    ({"methods": [{"method": "dp-prompt-tuning"}]}, "'dp-prompt-tuning' is not available: .*use dp-prefix-tuning"),
    ({"methods": [{"method": "adapterx"}]}, "unknown method 'adapterx'; use one of: fft, lora, dora, ia3, "
                                            "prefix-tuning, prompt-tuning, head-only, bitfit, dp-fft"),
    ({"methods": [{"method": "lora", "prefix": {"num_virtual_tokens": 4}}]}, "lora takes no prefix settings"),
    ({"methods": [{"method": "head-only", "lora": {"r": 4}}]}, "head-only takes no lora settings"),
    ({"methods": [{"method": "ia3", "dp": {"target_epsilon": 8}}]}, "ia3 is not private and has no DP variant: .*dp-lora"),
    ({"methods": [{"method": "prompt-tuning", "prompt": {"num_virtual_tokens": 0}}]}, "num_virtual_tokens"),
    ({"methods": [{"method": "lora", "lora": {"r": [4, 0]}}]}, "lora.r must be >= 1"),
    ({"methods": [{"method": "lora", "lora": {"r": []}}]}, "lora.r must be >= 1"),
    ({"methods": [{"method": "lora", "lora": {"target_modules": [["q_proj"], []]}}]}, "at least one module"),
    ({"methods": [{"method": "lora", "lora": {"r": [4, 4]}}]}, "unique; repeated: lora-r4"),
    ({"methods": [{"method": "fft", "lr": []}]}, "lr must be > 0 \\(or a list of distinct such values\\), got \\[\\]"),
    ({"methods": [{"method": "fft", "lr": [1e-4, -1e-4]}]}, "methods.0: lr must be > 0"),
    ({"methods": [{"method": "fft", "epochs": [2, 0]}]}, "epochs must be an integer >= 1"),
    ({"methods": [{"method": "dp-fft", "dp": {"target_epsilon": [4, 4]}}]}, "dp.target_epsilon must be > 0 \\(or a list of distinct"),
    ({"methods": [{"method": "dp-fft", "dp": {"target_epsilon": 0}}]}, "dp.target_epsilon must be > 0"),
    ({"methods": [{"method": "lora", "lora": {"r": [4, 8]}}], "attacks": {"shadow": {"models": 2, "method": "lora"}}},
     "names no method of the study; use one of: lora-r4, lora-r8"),
])
def test_bad_method_combinations_are_rejected_on_one_line(raw, needle):
    with pytest.raises(PrivtuneError, match=needle) as e:
        parse_config(raw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("raw, needle", [
    ({"methods": [{"method": "dp-lora", "dp": {"unit": "household"}}]},
     "dp.unit: Input should be 'auto', 'individual' or 'record'"),
    ({"methods": [{"method": "fft"}], "canaries": {"search_budget": -1}},
     "canaries.search_budget: Input should be greater than or equal to 0"),
    ({"methods": [{"method": "lora", "federated": {"clients": 2, "client_dp": {"secure_mode": "maybe"}}}]},
     "client_dp.secure_mode: Input should be a valid boolean"),
])
def test_bad_new_privacy_settings_are_rejected_on_one_line(raw, needle):
    with pytest.raises(PrivtuneError, match=needle) as e:
        parse_config(raw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_studies_are_valid(path):
    assert plan_study(load_config(path))


def test_scrub_settings_label_and_identity():
    cfg = parse_config({"methods": [{"method": "fft"}, {"method": "fft", "scrub": {"tagger": "regex"}},
                                    {"method": "fft", "scrub": {"tagger": "regex", "replacement": "surrogate"}},
                                    {"method": "lora", "label": "lora-clean", "scrub": {"tagger": "exact"}}]})
    runs = plan_study(cfg)[1:]
    assert [r.label for r in runs] == ["fft", "fft+scrub-regex", "fft+scrub-regex-surrogate", "lora-clean"]
    assert "scrub" not in runs[0].config["method"]  # unscrubbed runs keep their old identity
    assert runs[1].config["method"]["scrub"] == {"tagger": "regex", "replacement": "placeholder"}
    assert len({r.run_id for r in runs}) == 4
    with pytest.raises(PrivtuneError, match="methods.0.scrub.tagger: Field required"):
        parse_config({"methods": [{"method": "fft", "scrub": {}}]})
    with pytest.raises(PrivtuneError, match="repeated: fft\\+scrub-regex"):
        parse_config({"methods": [{"method": "fft", "scrub": {"tagger": "regex"}}] * 2})


def test_every_registered_name_is_accepted():
    """Driven from the registries, so a new attack, corpus or model needs no config change."""
    from privtune.attacks.mia import ATTACKS
    from privtune.data.corpora import CORPORA
    from privtune.models.registry import MODELS

    for model in MODELS:
        for source in CORPORA:
            cfg = parse_config({"model": model, "data": {"source": source}, "methods": [{"method": "fft"}],
                                "attacks": {"mia": {"attacks": list(ATTACKS), "reference_model": model}}})
            assert cfg.attacks.mia.attacks == list(ATTACKS) and cfg.data.source == source
    assert parse_config({"data": {"source": "people.jsonl"}, "methods": [{"method": "fft"}]})  # a path, read later
