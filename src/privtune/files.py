"""Where privtune writes, and how: names that stay inside ``output_dir``, and private files.

A study's files hold what it studies: the training text (``privtune data export``), the
database (configs, measures, per-record statistics), reports and saved models that can
be prompted for the values they memorised. So:

- a string that becomes a path component (a study's name) is a *slug*: letters, digits,
  ``-``, ``_`` and ``.``, not starting with ``.``. A name from the config that is not one
  is an error naming the bad character; a name read from a database, which someone may
  have sent, is turned into one (:func:`slug`), and :func:`inside` checks that the path
  it ends up in stays under the directory meant to hold it;
- files are created readable by their owner only (mode 600, and the folders privtune
  creates 700), whatever the umask: :func:`private_dir`, :func:`private_file`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from privtune.errors import PrivtuneError

_SLUG = re.compile(r"[A-Za-z0-9_.-]+")
_BAD = re.compile(r"[^A-Za-z0-9_.-]")
FILE_MODE = 0o600
DIR_MODE = 0o700


def slug_problem(name: str) -> str | None:
    """Why ``name`` cannot be a path component, or ``None`` when it can."""
    if not name:
        return "is empty"
    bad = _BAD.search(name)
    if bad:
        return f"has {bad.group()!r} at position {bad.start() + 1}; use letters, digits, '-', '_' and '.'"
    if name.startswith("."):
        return "starts with '.'; start it with a letter or digit"
    return None


def slug(name: str) -> str:
    """``name`` made a safe path component: every other character becomes ``_``, leading
    dots are dropped (``../../x`` -> ``_.._x``); ``_`` when nothing is left."""
    return _BAD.sub("_", name).lstrip(".") or "_"


def inside(root: str | Path, *parts: str) -> Path:
    """``root / parts``, refusing any path that resolves outside ``root`` (through ``..``
    or a symbolic link)."""
    root = Path(root)
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise PrivtuneError(f"{path} resolves outside {root}", "use a plain name, without '..', '/' or links")
    return path


def writable_dir_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be (made) a directory privtune writes into, or ``None``."""
    path = Path(path)
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder" if existing.exists() else f"{path} cannot be created"
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "the folder" if existing == path else f"its parent {existing}"
        return f"{what} is not writable by this user"
    return None


def private_dir(path: str | Path) -> Path:
    """``path`` with every missing folder on the way created with mode 700; folders that
    exist already (the user's own, such as ``.``) are left as they are."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(folder, DIR_MODE)  # mkdir's mode is masked by the umask
    return path


def private_file(path: str | Path) -> Path:
    """``path``, created empty with mode 600 when missing (an existing file keeps its
    mode); for files other code then opens (SQLite, ``open(..., "w")``), which keep it."""
    path = Path(path)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, FILE_MODE))
        os.chmod(path, FILE_MODE)  # os.open's mode is masked by the umask
    return path
