"""Bad input through the command line: one line on stderr, a non-zero exit, no traceback."""

import json
import sys

import pytest
import yaml

from privtune import cli


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["privtune", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def write_study(tmp_path, **fields):
    study = {"model": "tiny-llama", "output_dir": str(tmp_path / "out"),
             "data": {"n_individuals": 6, "max_length": 48}, "canaries": {"enabled": False},
             "train": {"epochs": 1, "batch_size": 4}, "methods": [{"method": "lora", "lora": {"r": 2}}]}
    study.update(fields)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


def test_unknown_model(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "run", str(write_study(tmp_path, model="llama-9000")))
    assert_one_line_error(code, err, "unknown model 'llama-9000'", "smollm2-135m")


def test_unknown_method_and_wrong_type(tmp_path, monkeypatch, capsys):
    path = write_study(tmp_path, methods=[{"method": "sft"}], train={"epochs": "many"})
    code, _, err = run_cli(monkeypatch, capsys, "run", str(path))
    assert_one_line_error(code, err, "methods.0.method", "train.epochs")


def test_jsonl_line_that_is_not_json(tmp_path, monkeypatch, capsys):
    data = tmp_path / "tickets.jsonl"
    data.write_text(json.dumps({"text": "Jane paid."}) + "\n{not json\n")
    path = write_study(tmp_path, data={"source": str(data)})
    code, _, err = run_cli(monkeypatch, capsys, "run", str(path))
    assert_one_line_error(code, err, "line 2", "tickets.jsonl")
    assert not (tmp_path / "out" / "privtune.db").exists()  # bad data fails before a database is made


def test_span_outside_text(tmp_path, monkeypatch, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"text": "Jane Doe paid.", "spans": [{"start": 0, "end": 40, "label": "NAME"}]},
            {"text": "Joe paid.", "spans": [{"start": 0, "end": 3, "label": "NAME"}]}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    code, _, err = run_cli(monkeypatch, capsys, "run", str(write_study(tmp_path, data={"source": str(data)})))
    assert_one_line_error(code, err, "line 1")


def test_impossible_dp_target(tmp_path, monkeypatch, capsys):
    path = write_study(tmp_path, train={"epochs": 20, "batch_size": 4},
                       methods=[{"method": "dp-lora", "dp": {"target_epsilon": 0.01, "delta": 1e-4}}])
    code, _, err = run_cli(monkeypatch, capsys, "run", "--no-report", str(path))
    assert_one_line_error(code, err, "run dp-lora failed", "target epsilon 0.01 is unreachable")


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["privtune", "--debug", "run", str(write_study(tmp_path, model="nope"))])
    from privtune.errors import PrivtuneError

    with pytest.raises(PrivtuneError):
        cli.main()


def test_report_without_database(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "report", "--output-dir", str(tmp_path / "none"))
    assert_one_line_error(code, err, "no results database")


def test_unknown_executor_and_address_without_ray(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "run", str(write_study(tmp_path)), "--executor", "slurm")
    assert_one_line_error(code, err, "unknown executor 'slurm'", "--executor ray")
    code, _, err = run_cli(monkeypatch, capsys, "run", str(write_study(tmp_path)), "--address", "auto")
    assert_one_line_error(code, err, "--address needs --executor ray")


def test_summary_names_what_scrubbing_missed():
    scrub = {"tagger": "regex", "recall": 0.69, "precision": 1.0,
             "per_type": {"EMAIL": {"recall": 1.0}, "NAME": {"recall": 0.32}, "ADDRESS": {"recall": 0.0}}}
    runs = [{"label": "fft", "status": "done", "scrub": None},
            {"label": "fft+scrub-regex", "status": "done", "scrub": scrub},
            {"label": "fft+scrub-exact", "status": "failed", "scrub": None}]
    assert cli.scrub_lines(runs) == ["fft+scrub-regex: regex scrubbing removed 69% of the true values whole "
                                     "(precision 100%); lowest recall: ADDRESS 0%, NAME 32%"]
    scrub["by_catch"] = {"missed": {"memorisation_gap_net": 0.78}, "caught": {"memorisation_gap_net": -0.15}}
    assert cli.scrub_lines(runs)[0].endswith("NAME 32%; memorisation gap (net) on missed values +0.78 nats, on "
                                             "caught values -0.15 nats (below 0: the placeholder effect)")
    scrub["by_catch"]["missed"] = {"memorisation_gap_net": None, "reason": "the exact tagger missed no value"}
    assert "on missed values n/a (the exact tagger missed no value)" in cli.scrub_lines(runs)[0]
    scrub["by_catch"]["caught"] = {"memorisation_gap_net": 0.05}  # above 0: no placeholder effect to name
    assert cli.scrub_lines(runs)[0].endswith("on caught values +0.05 nats")
    scrub["by_catch"]["caught"]["memorisation_gap_net_ci"] = [-0.02, 0.12]
    assert cli.scrub_lines(runs)[0].endswith("on caught values +0.05 nats [-0.02, +0.12]")


def test_exact_scrub_on_data_without_spans(tmp_path, monkeypatch, capsys):
    data = tmp_path / "tickets.jsonl"
    rows = [{"text": f"Mail me at user{i}@example.org or call +44 20 7946 09{i:02d}.", "individual": f"p{i}"}
            for i in range(8)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    path = write_study(tmp_path, data={"source": str(data), "tagger": "regex", "max_length": 48},
                       methods=[{"method": "fft", "scrub": {"tagger": "exact"}}],
                       attacks={"mia": {}, "extraction": {"enabled": False}})
    code, _, err = run_cli(monkeypatch, capsys, "run", "--no-report", str(path))
    assert_one_line_error(code, err, "run fft+scrub-exact failed", "labelled by the regex tagger",
                          "use scrub.tagger: regex or presidio")


@pytest.mark.parametrize("fields, needles", [
    ({"attacks": {"mia": {"attacks": ["loss", "nosuch"]}}},
     ("attacks.mia.attacks: unknown attack 'nosuch'", "use one of: loss, zlib, min_k, min_k_pp, reference")),
    ({"data": {"source": "customer-sims"}}, ("data.source: unknown corpus 'customer-sims'", "customer-sim, synbio")),
    ({"attacks": {"mia": {"reference_model": "tiny-lama"}}},
     ("attacks.mia.reference_model: unknown model 'tiny-lama'", "tiny-llama")),
    ({"methods": [{"method": "lora", "dp": None}, {"method": "dp-fft", "dp": {"accountant": "gdp"}}]},
     ("methods.1.dp.accountant", "'prv' or 'rdp'", "'gdp'")),
    ({"methods": [{"method": "dp-fft", "dp": {"engine": "jax"}}]}, ("methods.0.dp.engine", "'privtune' or 'opacus'")),
    ({"methods": [{"method": "fft", "scrub": {"tagger": "spacy"}}]}, ("methods.0.scrub.tagger", "'regex'")),
    ({"data": {"tagger": "flair"}}, ("data.tagger", "'presidio'")),
    ({"methods": [{"method": "unlearn-gd", "unlearn": {"source": "fft", "forget": {"fraction": 0.1}}}]},
     ("methods.0.method: unknown method 'unlearn-gd'", "unlearn-ga")),
])
def test_a_wrong_name_fails_when_the_config_loads_with_the_valid_names(tmp_path, monkeypatch, capsys, fields,
                                                                      needles):
    """Before anything is trained: exit 2, one line naming the field and the valid names."""
    code, _, err = run_cli(monkeypatch, capsys, "run", str(write_study(tmp_path, **fields)))
    assert code == 2
    assert_one_line_error(code, err, "invalid config", *needles)
    assert not (tmp_path / "out").exists()  # no database, no model: nothing ran


def test_an_unexpected_error_is_one_line_with_its_traceback_in_logs(tmp_path, monkeypatch, capsys):
    import privtune.study.driver

    def broken(cfg, **kwargs):
        raise RuntimeError("the cluster said no\nand a second line")

    monkeypatch.setattr(privtune.study.driver, "run_study", broken)
    code, _, err = run_cli(monkeypatch, capsys, "run", str(write_study(tmp_path)))
    assert code == 1
    assert_one_line_error(code, err, "unexpected RuntimeError: the cluster said no (traceback: ", "--debug")
    logs = list((tmp_path / "out" / "logs").glob("privtune-error-*.txt"))
    assert len(logs) == 1 and str(logs[0]) in err.replace("\n", "")
    assert "Traceback" in logs[0].read_text() and "second line" in logs[0].read_text()


@pytest.mark.parametrize("command", ["status", "report"])
def test_reading_a_study_from_a_missing_database_is_an_error_and_creates_none(tmp_path, monkeypatch, capsys, command):
    missing = tmp_path / "nowhere"
    code, _, err = run_cli(monkeypatch, capsys, command, "-o", str(missing), "--study", "default")
    assert_one_line_error(code, err, f"no results database at {missing / 'privtune.db'}")
    assert not (missing / "privtune.db").exists()


@pytest.mark.parametrize("command", ["status", "report"])
def test_a_study_the_database_does_not_hold_is_named_with_the_ones_it_does(tmp_path, monkeypatch, capsys, command):
    from privtune.study.store import Store

    store = Store(tmp_path / "privtune.db")
    store.start("r1", "alpha", "fft", "fft", {})
    store.close()
    code, _, err = run_cli(monkeypatch, capsys, command, "-o", str(tmp_path), "--study", "beta")
    assert_one_line_error(code, err, "holds no study named 'beta'", "use one of: alpha")


def test_plan_lists_the_runs_what_is_stored_and_an_estimate_from_stored_runs_and_trains_nothing(
        tmp_path, monkeypatch, capsys):
    from privtune.study.store import Store

    def study(rates):
        return write_study(tmp_path, attacks={"enabled": False}, save_artifacts=False,
                           methods=[{"method": "lora", "lora": {"r": 2}, "lr": rates}])

    code, out, _ = run_cli(monkeypatch, capsys, "run", str(study([3e-3])), "--plan", "--json")
    assert code in (0, None) and not (tmp_path / "out" / "privtune.db").exists()  # nothing written
    first = [json.loads(line) for line in out.splitlines()]
    assert [(r["label"], r["stored"], r["estimated_seconds"]) for r in first] == [("base", False, None),
                                                                                ("lora-lr0.003", False, None)]
    assert run_cli(monkeypatch, capsys, "run", str(study([3e-3])), "--no-report", "-q")[0] in (0, None)
    store = Store(tmp_path / "out" / "privtune.db")
    lora = next(r for r in store.runs() if r["label"] == "lora-lr0.003")
    store.close()
    # one more point of the sweep: the stored one is skipped, the new one estimated from it
    code, out, _ = run_cli(monkeypatch, capsys, "run", str(study([3e-3, 1e-2])), "--plan", "--json")
    rows = {r["label"]: r for r in map(json.loads, out.splitlines())}
    assert set(rows) == {"base", "lora-lr0.003", "lora-lr0.01"} and rows["base"]["stored"]
    assert rows["lora-lr0.003"]["stored"] and rows["lora-lr0.003"]["run_id"] == lora["run_id"]
    per_record = lora["timing"]["wall_seconds"] / lora["data"]["train_records"]  # one epoch
    assert not rows["lora-lr0.01"]["stored"] and rows["lora-lr0.01"]["estimate_from"] == 1
    assert rows["lora-lr0.01"]["estimated_seconds"] == pytest.approx(per_record * lora["data"]["train_records"])
    code, out, _ = run_cli(monkeypatch, capsys, "run", str(study([3e-3, 1e-2])), "--plan")
    assert "stored: skipped" in out and "to run" in out and "1 to run, 2 stored" in out


def test_json_without_plan_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "run", str(write_study(tmp_path)), "--json")
    assert_one_line_error(code, err, "--json prints the plan", "pass --plan")
