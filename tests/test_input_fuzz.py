"""Generated bad input through the command line (issue 22): hundreds of mutated study
configs and JSONL data files. Every one is either accepted or rejected with exit 2 and
one line on stderr, never a traceback, and nothing is written outside ``output_dir``.

The configs go through ``privtune run`` with the study itself stubbed out (an accepted
config would otherwise train): loading, the output folder's checks, the executor and the
banner are the real ones. The data files go through ``privtune data preview``, which
loads, checks and tags them and prints them with their spans.
"""

import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from privtune import cli
from privtune.study import driver

HOSTILE_TEXT = st.sampled_from([
    "", " ", ".", "..", "../../../../escaped", "/etc/passwd", "a/b", "~", "$HOME", "mk[/]x[/bold]", "[red]",
    "[link=file:///etc]x[/link]", "x\ny", "x\x00y", "\u202eevil", "tpu9", "cuda:-1", "nan", "1e309", "-1",
]) | st.text(max_size=12)
SCALARS = HOSTILE_TEXT | st.integers(-10**12, 10**12) | st.floats() | st.booleans() | st.none()
VALUES = SCALARS | st.lists(SCALARS, max_size=3) | st.dictionaries(HOSTILE_TEXT, SCALARS, max_size=2)

#: Fields a mutation sets, by dotted path (a method's fields under methods.0; a few are
#: unknown), each with values a user might well write, which the hostile ones join.
PLAUSIBLE = {
    "name": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,8}", fullmatch=True),
    "model": st.sampled_from(["tiny-llama", "tiny-gpt-neox", "nosuch"]),
    "device": st.sampled_from(["auto", "cpu", "cuda:1", "mps"]),
    "precision": st.sampled_from(["auto", "fp32", "bf16"]),
    "seeds": st.lists(st.integers(0, 9), min_size=1, max_size=2),
    "eval_batch_size": st.integers(1, 4), "retries": st.integers(0, 2), "save_artifacts": st.booleans(),
    "data.source": st.sampled_from(["synbio", "customer-sim", "missing.jsonl", "a-file"]),
    "data.n_individuals": st.integers(2, 8), "data.test_fraction": st.floats(0.1, 0.9),
    "data.max_length": st.integers(8, 64), "data.tagger": st.sampled_from(["regex", "auto"]),
    "canaries.repetitions": st.lists(st.integers(1, 4), min_size=1, max_size=2),
    "attacks.mia.attacks": st.lists(st.sampled_from(["loss", "zlib", "min_k"]), max_size=2),
    "attacks.mia.fprs": st.lists(st.floats(0.001, 0.5), min_size=1, max_size=2),
    "attacks.shadow.models": st.sampled_from([0, 2]), "attacks.extraction.n_samples": st.integers(0, 2),
    "backdoor.fraction": st.floats(0.01, 0.5), "train.epochs": st.integers(1, 2),
    "train.batch_size": st.integers(1, 8), "train.lr": st.floats(1e-5, 1e-2),
    "methods.0.method": st.sampled_from(["fft", "lora", "dp-lora", "ia3", "prompt-tuning"]),
    "methods.0.label": HOSTILE_TEXT, "methods.0.lora.r": st.integers(1, 4) | st.lists(st.integers(1, 4), max_size=2),
    "methods.0.dp": st.fixed_dictionaries({}, optional={"target_epsilon": st.floats(0.5, 8)}),
    "methods.0.scrub.tagger": st.sampled_from(["exact", "regex"]),
    "methods.0.federated.clients": st.integers(2, 4),
}
FIELDS = [*PLAUSIBLE, "methods", "data", "methods.0.unlearn", "unknown", "data.unknown", "methods.0.unknown"]


def mutation(field: str):
    return st.tuples(st.just(field), PLAUSIBLE.get(field, VALUES) | VALUES)


#: output_dir is not fuzzed as free text (it is the user's to choose, anywhere); these are the
#: folders it cannot be, and a fine one.
OUTPUT_DIRS = ["out", "out", "out", "deep/new/out", "a-file", "a-file/below"]


def base_study() -> dict:
    return {"name": "fuzz", "model": "tiny-llama", "output_dir": "out",
            "data": {"source": "customer-sim", "n_individuals": 6, "max_length": 48},
            "canaries": {"enabled": False}, "train": {"epochs": 1, "batch_size": 4},
            "methods": [{"method": "lora", "lora": {"r": 2}}]}


def mutate(study: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    node = study
    for key in parents:
        key = int(key) if key.isdigit() else key
        if isinstance(node, list):
            node = node[key]
        else:
            node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else node[key]
        if not isinstance(node, (dict, list)):
            return  # an earlier mutation replaced this section with a scalar
    if isinstance(node, dict):
        node[last] = value


@contextlib.contextmanager
def sandbox():
    """A fresh current folder holding a file that output_dir may name."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "a-file").write_text("not a folder")
        old = Path.cwd()
        os.chdir(root)
        try:
            yield root
        finally:
            os.chdir(old)


def invoke(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    old_argv = sys.argv
    sys.argv = ["privtune", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
                code = 0
            except SystemExit as e:
                code = e.code
    finally:
        sys.argv = old_argv
    return code, out.getvalue(), err.getvalue()


def assert_accepted_or_one_line(code, err) -> None:
    assert "Traceback" not in err
    if code != 0:
        assert code == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err


def tree(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def written_outside(root: Path, before: set[Path], output_dir: str) -> set[Path]:
    """New paths under ``root`` that are neither ``output_dir``, in it, nor one of its parents."""
    out = (root / output_dir).resolve()
    return {p for p in tree(root) - before
            if not ((root / p).resolve() == out or (root / p).resolve().is_relative_to(out)
                    or out.is_relative_to((root / p).resolve()))}


@pytest.fixture
def no_study(monkeypatch):
    """``privtune run`` with the study itself replaced by one that runs nothing."""
    def run_study(cfg, executor=None, **_):
        return driver.StudyOutcome(done=[], skipped=[], failed={}, db_path=Path(cfg.output_dir) / driver.DB_NAME)

    monkeypatch.setattr(driver, "run_study", run_study)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(st.sampled_from(FIELDS).flatmap(mutation), min_size=1, max_size=2),
       output_dir=st.sampled_from(OUTPUT_DIRS))
def test_generated_configs_are_accepted_or_rejected_on_one_line(no_study, mutations, output_dir):
    study = base_study()
    study["output_dir"] = output_dir
    for path, value in mutations:
        mutate(study, path, value)
    with sandbox() as root:
        try:
            text = yaml.safe_dump(study, allow_unicode=True)
        except yaml.YAMLError:
            return  # not representable as YAML (a lone surrogate): nothing a user could write
        (root / "study.yaml").write_text(text, encoding="utf-8", errors="surrogateescape")
        before = tree(root)
        code, _, err = invoke("run", "--no-report", "study.yaml")
        event("accepted" if code == 0 else "rejected")
        assert_accepted_or_one_line(code, err)
        if code != 0:
            assert tree(root) == before  # a rejected config writes nothing at all
        assert not written_outside(root, before, output_dir)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_generated_yaml_documents_are_accepted_or_rejected_on_one_line(document):
    with sandbox() as root:
        (root / "study.yaml").write_text(document, encoding="utf-8", errors="surrogatepass")
        before = tree(root)
        code, _, err = invoke("data", "preview", "study.yaml")
        assert_accepted_or_one_line(code, err)
        assert tree(root) == before  # previewing writes nothing


SPAN = st.fixed_dictionaries({"start": st.integers(-3, 40) | SCALARS, "end": st.integers(-3, 40) | SCALARS,
                              "label": HOSTILE_TEXT | SCALARS})
GOOD_ROW = st.builds(lambda i, extra: {"text": f"Mail jane{i}@example.org now.", "individual": f"p{i}",
                                       "spans": [{"start": 5, "end": 22 + len(str(i)), "label": "EMAIL"}], **extra},
                     st.integers(0, 999), st.fixed_dictionaries({}, optional={"id": HOSTILE_TEXT,
                                                                               "individual": HOSTILE_TEXT}))
ODD_ROW = st.fixed_dictionaries({}, optional={
    "text": HOSTILE_TEXT | SCALARS | st.text(min_size=1, max_size=60), "spans": st.lists(SPAN, max_size=3) | SCALARS,
    "individual": HOSTILE_TEXT | SCALARS, "id": HOSTILE_TEXT | SCALARS})
GOOD_LINE = GOOD_ROW.map(json.dumps)
ODD_LINE = ODD_ROW.map(lambda row: json.dumps(row, ensure_ascii=False, allow_nan=True)) | HOSTILE_TEXT
#: Mostly well-formed files, with at most one odd line somewhere in them.
LINES = st.tuples(st.lists(GOOD_LINE, max_size=6), st.lists(ODD_LINE, max_size=1), st.integers(0, 6)).map(
    lambda parts: parts[0][:parts[2]] + parts[1] + parts[0][parts[2]:])


@settings(max_examples=150, deadline=None)
@given(LINES, st.sampled_from(["regex", "auto"]))
def test_generated_jsonl_data_is_accepted_or_rejected_on_one_line(lines, tagger):
    with sandbox() as root:
        (root / "data.jsonl").write_text("\n".join(line.replace("\n", " ") for line in lines), encoding="utf-8",
                                        errors="surrogatepass")
        study = {**base_study(), "data": {"source": "data.jsonl", "tagger": tagger}}
        (root / "study.yaml").write_text(yaml.safe_dump(study))
        before = tree(root)
        code, _, err = invoke("data", "preview", "study.yaml", "--limit", "8")
        event("accepted" if code == 0 else "rejected")
        assert_accepted_or_one_line(code, err)
        assert tree(root) == before
