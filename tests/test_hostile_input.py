"""Hostile and broken input (issue 22): names that would leave ``output_dir``, corrupt
artifacts, unusable output folders, unknown devices, Rich markup in user strings, a
missing extra, and files that hold training text readable by others."""

import json
import os
import sqlite3
import stat
import sys

import pytest
import yaml

from privtune.study.store import Store
from test_cli import assert_one_line_error, run_cli, write_study


def files_under(root):
    return {p for p in root.rglob("*")}


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def usual_umask():
    """The umask most systems give a user, under which files are world-readable."""
    old = os.umask(0o022)
    yield
    os.umask(old)


# --- finding 1: names that escape output_dir ------------------------------------------------

@pytest.mark.parametrize("name, needle", [
    ("../../../../somewhere/x", "has '/' at position 3"),
    ("..", "starts with '.'"),
    ("a\\b", "has '\\\\' at position 2"),
    ("", "is empty"),
])
def test_a_study_name_that_is_no_slug_is_rejected_naming_the_character(tmp_path, monkeypatch, capsys, name, needle):
    code, _, err = run_cli(monkeypatch, capsys, "run", str(write_study(tmp_path, name=name)))
    assert code == 2
    assert_one_line_error(code, err, "name:", needle)
    assert files_under(tmp_path) == {tmp_path / "study.yaml"}  # nothing written, not even output_dir


def test_report_of_a_database_someone_sent_stays_inside_output_dir(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sent" / "out"
    store = Store(out / "privtune.db")
    store.start("r1", "../../../escaped[/]x", "lora[/bold]", "lora", {"model": "tiny-llama"})
    store.close()
    before = files_under(tmp_path) - files_under(out)

    code, stdout, err = run_cli(monkeypatch, capsys, "report", "-o", str(out))
    assert code == 0, err
    assert files_under(tmp_path) - files_under(out) == before  # nothing outside out/
    report = out / "reports" / "_.._.._escaped___x" / "report.html"
    assert report.is_file() and (report.parent / "runs.csv").is_file()
    assert "lora[/bold]" in stdout  # the label, as it is, in the summary


def test_a_crafted_study_name_cannot_reach_outside_through_a_link(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    Store(out / "privtune.db").close()
    db = sqlite3.connect(out / "privtune.db")
    db.execute("INSERT INTO runs (run_id, study, label, method, role, status, config) "
               "VALUES ('r', 'elsewhere', 'fft', 'fft', 'target', 'running', '{}')")
    db.commit()
    db.close()
    (out / "reports").mkdir()
    (out / "reports" / "elsewhere").symlink_to(tmp_path / "target", target_is_directory=True)
    code, _, err = run_cli(monkeypatch, capsys, "report", "-o", str(out))
    assert_one_line_error(code, err, "resolves outside")
    assert not (tmp_path / "target").exists()


# --- finding 2: corrupt artifacts -------------------------------------------------------------

def audit_study(tmp_path):
    return write_study(tmp_path, name="tiny", attacks={"enabled": False})


def test_audit_of_a_truncated_checkpoint_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    from privtune.models.tiny import tiny_model, tiny_tokenizer

    ckpt = tmp_path / "ckpt"
    tiny_model("llama").save_pretrained(ckpt)
    tiny_tokenizer().save_pretrained(ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    capsys.readouterr()
    code, _, err = run_cli(monkeypatch, capsys, "audit", str(ckpt), str(audit_study(tmp_path)))
    assert code == 2
    assert_one_line_error(code, err, str(weights), "truncated or corrupt")


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 7, b"not a safetensors file at all" * 10])
def test_audit_of_a_garbage_adapter_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys, garbage):
    from peft import LoraConfig, get_peft_model

    from privtune.models.tiny import tiny_model

    adapter = tmp_path / "adapter"
    get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    (adapter / "adapter_model.safetensors").write_bytes(garbage)
    capsys.readouterr()
    code, _, err = run_cli(monkeypatch, capsys, "audit", str(adapter), str(audit_study(tmp_path)))
    assert code == 2
    assert_one_line_error(code, err, "adapter_model.safetensors", "not a readable safetensors file")
    assert not (tmp_path / "out").exists()  # it failed before the base run


# --- finding 3: output_dir that cannot be written ----------------------------------------------

def test_output_dir_that_is_a_file_or_under_one_fails_before_any_model_loads(tmp_path, monkeypatch, capsys):
    (tmp_path / "taken").write_text("a file")
    for where in ("taken", "taken/below"):
        path = write_study(tmp_path, output_dir=str(tmp_path / where))
        code, _, err = run_cli(monkeypatch, capsys, "run", str(path))
        assert code == 2
        assert_one_line_error(code, err, "output_dir", "is a file, not a folder")
        code, _, err = run_cli(monkeypatch, capsys, "run", str(write_study(tmp_path)), "-o", str(tmp_path / where))
        assert_one_line_error(code, err, "--output-dir", "is a file, not a folder")


def test_data_export_into_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "taken").write_text("a file")
    code, _, err = run_cli(monkeypatch, capsys, "data", "export", str(write_study(tmp_path)),
                           "--out", str(tmp_path / "taken"))
    assert code == 2
    assert_one_line_error(code, err, "--out", "is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_output_dir_in_a_read_only_folder(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = run_cli(monkeypatch, capsys, "run", str(write_study(tmp_path, output_dir=str(locked / "out"))))
    assert_one_line_error(code, err, "output_dir", "not writable")


# --- finding 4: device ------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["tpu9", "cuda:x", "gpu", "CPU", "cuda:0 "])
def test_an_unknown_device_fails_when_the_config_loads(tmp_path, monkeypatch, capsys, device):
    code, _, err = run_cli(monkeypatch, capsys, "run", str(write_study(tmp_path, device=device)))
    assert code == 2
    assert_one_line_error(code, err, "device: unknown device", "cuda:N")


# --- finding 5 and 15: Rich markup in what users wrote ---------------------------------------

def test_markup_in_a_path_is_printed_as_written(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "d[/]x[bold].jsonl"
    path = write_study(tmp_path, data={"source": str(missing)})
    code, out, err = run_cli(monkeypatch, capsys, "run", str(path))
    assert str(missing) in out  # the banner
    assert code == 2
    assert_one_line_error(code, err, f"data file {missing} not found")


def test_a_study_whose_label_is_markup_runs_and_shows_it_as_written(tmp_path, monkeypatch, capsys):
    path = write_study(tmp_path, attacks={"enabled": False},
                       methods=[{"method": "lora", "label": "mk[/]x[/bold]", "lora": {"r": 2}}])
    code, out, err = run_cli(monkeypatch, capsys, "run", "--no-report", str(path))
    assert code == 0, err
    assert out.count("mk[/]x[/bold]") >= 3  # the banner, the progress bar, the summary


def test_missing_ray_extra_is_one_line_with_its_brackets_before_anything_happens(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    code, out, err = run_cli(monkeypatch, capsys, "run", str(write_study(tmp_path)), "--executor", "ray")
    assert_one_line_error(code, err, "pip install 'privtune[ray]'")
    assert out == ""  # no banner
    assert not (tmp_path / "out").exists()  # no database


# --- finding 11: files that hold training text --------------------------------------------------

def test_exported_data_database_and_report_are_readable_by_their_owner_only(tmp_path, monkeypatch, capsys,
                                                                            usual_umask):
    data = tmp_path / "data"
    code, _, err = run_cli(monkeypatch, capsys, "data", "export", str(write_study(tmp_path)), "--out", str(data))
    assert code == 0, err
    assert mode(data) == 0o700
    assert {p.name: mode(p) for p in data.iterdir()} == {
        "train.jsonl": 0o600, "members.jsonl": 0o600, "nonmembers.jsonl": 0o600}

    out = tmp_path / "out"
    store = Store(out / "privtune.db")
    store.start("r1", "s", "fft", "fft", {"model": "tiny-llama"})
    store.close()
    code, _, err = run_cli(monkeypatch, capsys, "report", "-o", str(out))
    assert code == 0, err
    written = [out, *out.rglob("*")]
    assert {p.relative_to(tmp_path).as_posix(): mode(p) for p in written} == {
        p.relative_to(tmp_path).as_posix(): 0o700 if p.is_dir() else 0o600 for p in written}
    assert {"privtune.db", "report.html", "runs.csv", "runs.json"} <= {p.name for p in written}


def test_an_existing_output_folder_keeps_its_mode(tmp_path, usual_umask):
    os.chmod(tmp_path, 0o755)
    Store(tmp_path / "privtune.db").close()
    assert mode(tmp_path) == 0o755  # the user's own folder: left as it was
    assert mode(tmp_path / "privtune.db") == 0o600


def test_saved_artifacts_are_private(tmp_path, usual_umask):
    from privtune.config import parse_config
    from privtune.study.driver import run_study

    raw = yaml.safe_load(write_study(tmp_path, attacks={"enabled": False}).read_text())
    outcome = run_study(parse_config(raw), show_progress=False)
    assert outcome.failed == {}
    artifacts = tmp_path / "out" / "artifacts"
    (run_dir,) = artifacts.iterdir()
    assert mode(artifacts) == mode(run_dir) == 0o700
    assert json.loads((run_dir / "adapter_config.json").read_text())["r"] == 2


def test_values_a_model_gives_up_are_counted_never_written(tmp_path, monkeypatch, capsys):
    """A model that recovers every attacked value: the database, report, CSV and JSON hold
    the extraction rates and none of the values."""
    from privtune.attacks import extraction
    from privtune.config import parse_config
    from privtune.study.dataset import build_study_records
    from privtune.study.driver import run_study

    def recites(model, tokenizer, prompts, decodings, *, targets, **_):
        return [[[target] * d.n_samples for target in targets] for d in decodings]

    monkeypatch.setattr(extraction, "generate_decodings", recites)
    path = write_study(tmp_path, attacks={"mia": {"attacks": ["loss"]},
                                          "extraction": {"n_samples": 1, "pii_inference": False}})
    cfg = parse_config(yaml.safe_load(path.read_text()))
    assert run_study(cfg, show_progress=False).failed == {}
    code, _, err = run_cli(monkeypatch, capsys, "report", "-o", cfg.output_dir)
    assert code == 0, err

    runs = json.loads((tmp_path / "out" / "reports" / "default" / "runs.json").read_text())
    assert {r["attacks"]["extraction"]["greedy"]["ALL"]["member_rate"] for r in runs} == {1.0}
    members = build_study_records(cfg).members
    values = {r.text[s.start:s.end] for r in members for s in r.spans}
    values = {v for v in values if sum(c.isalnum() for c in v) >= 6}  # long enough not to occur by chance
    assert values
    for written in (tmp_path / "out").rglob("*"):
        if written.is_file():
            content = written.read_bytes().decode("utf-8", errors="replace")
            assert not [v for v in values if v in content], written


def test_a_crash_log_is_private(tmp_path, usual_umask):
    from privtune.study.executor import failure_line

    line = failure_line(RuntimeError("out of memory near 'Jane Doe'"), "abc123", 1, tmp_path / "out" / "logs")
    (log,) = (tmp_path / "out" / "logs").iterdir()
    assert str(log) in line and "Jane Doe" in log.read_text()
    assert mode(log.parent) == 0o700 and mode(log) == 0o600


def test_a_figure_written_over_an_older_readable_copy_is_private(tmp_path, usual_umask):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from privtune.report.html import figure_section

    figures = tmp_path / "figures"
    figures.mkdir()
    old = figures / "leakage.png"
    old.write_bytes(b"an older report's figure")
    old.chmod(0o644)
    figure_section("leakage", "Leakage", plt.figure(), [], figures)
    assert mode(old) == 0o600 and old.read_bytes() != b"an older report's figure"
