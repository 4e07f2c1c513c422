"""The token scores every run of a study shares, kept on disk for the whole study.

Every run's leakage is measured against the base model θ0, and θ0 (or a named reference
model) is the calibration reference of the membership attacks, so every process that
runs a trained run needs θ0's token scores (:mod:`privtune.measures.token_scores`) on all
the members and non-members: a forward pass over every record. They are the same for
every run, so they are computed once and kept under ``output_dir/scores/``: a resumed
study, a rerun with a method added, an audit, or another worker process reads them
instead of running the model over every record again.

A file is keyed by everything that changes its numbers: the scored model's reference,
the base run's config hash (model, data settings and precision as configured), the data
digest (records and tokenizer, :mod:`privtune.data.digest`), the device (its model:
kernels differ between GPUs, so a shared ``output_dir`` on a mixed Ray cluster does not
mix them) and precision the scores were taken in, the batch size, the versions of the
libraries behind the figures, and :data:`FORMAT`. A checkpoint folder whose weights are replaced
in place keeps its name, as it does for the study's stored runs (keyed by the config
too): delete ``scores/`` with the runs, or give the model a new path. A file that does not match its
data (other shapes or masks) is computed again. Files hold per-token losses on the
private records, so they are private (mode 600, folder 700), written aside and renamed
into place (two workers may write the same file), and read without pickle.
"""

from __future__ import annotations

import os
import platform
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from privtune.data.digest import digest_of
from privtune.data.tokenize import EncodedDataset
from privtune.files import private_dir
from privtune.measures.token_scores import TokenScores
from privtune.versions import dependency_versions

#: Part of every key: raise it when :func:`~privtune.measures.token_scores.score_tokens`
#: computes its numbers differently, so no file kept by older code is read.
FORMAT = 1
FIELDS = ("nll", "mu", "sigma", "valid", "sensitive")
SETS = ("members", "nonmembers")


def device_name(device: torch.device) -> str:
    """``cpu-x86_64``, ``cuda-NVIDIA H100 80GB HBM3``: what the scores' kernels ran on."""
    if device.type == "cuda":
        return f"cuda-{torch.cuda.get_device_name(device)}"
    return f"{device.type}-{platform.machine()}"


@dataclass(frozen=True)
class ScoreCache:
    """Shared scores of one study under ``directory``; ``identity`` is what every key holds
    besides the model (base run, data digest, device, precision, batch size)."""

    directory: Path
    identity: dict

    def path(self, model_ref: str, sets: tuple[str, ...] = SETS) -> Path:
        # Other sets than the members and non-members are part of the key (and the
        # usual pair is not, so files kept before other sets existed keep their names).
        named = {} if sets == SETS else {"sets": list(sets)}
        key = digest_of({"format": FORMAT, "model": model_ref, **self.identity, **named,
                         "versions": dependency_versions()})
        return self.directory / f"{key[:32]}.npz"

    def scores(self, model_ref: str, members: EncodedDataset, nonmembers: EncodedDataset,
               compute: Callable[[], tuple[TokenScores, TokenScores]]) -> tuple[TokenScores, TokenScores]:
        """``model_ref``'s scores on (members, non-members): read when kept, else
        ``compute()``d and kept."""
        return self.scores_of(model_ref, {"members": members, "nonmembers": nonmembers}, compute)

    def scores_of(self, model_ref: str, sets: dict[str, EncodedDataset],
                  compute: Callable[[], tuple[TokenScores, ...]]) -> tuple[TokenScores, ...]:
        """``model_ref``'s scores on each of the named ``sets`` (e.g. the audit canaries),
        in their order: read when kept, else ``compute()``d and kept."""
        names = tuple(sets)
        path = self.path(model_ref, names)
        kept = _read(path, sets)
        if kept is not None:
            return kept
        computed = tuple(compute())
        _write(path, dict(zip(names, computed)))
        return computed


def _read(path: Path, data: dict[str, EncodedDataset]) -> tuple[TokenScores, ...] | None:
    """The kept scores, or None when missing, unreadable or not of these records."""
    try:
        with np.load(path, allow_pickle=False) as kept:
            found = tuple(TokenScores(**{f: kept[f"{s}_{f}"] for f in FIELDS}) for s in data)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):  # missing, cut short, not ours
        return None
    for scores, encoded in zip(found, data.values()):
        valid = encoded.attention_mask[:, 1:].numpy() == 1
        if scores.valid.shape != valid.shape or not np.array_equal(scores.valid, valid) \
                or not np.array_equal(scores.sensitive, encoded.sensitive[:, 1:].numpy() & valid):
            return None
    return found


def _write(path: Path, scores: dict[str, TokenScores]) -> None:
    private_dir(path.parent)
    partial = path.with_name(f".{path.stem}.partial-{os.getpid()}.npz")
    fd = os.open(partial, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **{f"{s}_{f}": getattr(part, f) for s, part in scores.items() for f in FIELDS})
    os.replace(partial, path)
