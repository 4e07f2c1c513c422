"""The one error type users see.

Every failure a user can cause (bad config, bad data, unknown model, impossible DP
settings, out of memory) is raised as a :class:`PrivtuneError` carrying what went wrong
and how to fix it. The CLI prints it on one line and exits non-zero. Anything else is a
bug, or a failure of something privtune drives (a Ray cluster); the user still sees one
line, and its whole traceback goes to a file (:func:`write_traceback`).
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path


class PrivtuneError(Exception):
    """A problem the user can fix: ``problem`` says what is wrong, ``fix`` what to do."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.problem.rstrip(".")
        if self.fix:
            text += f"; {self.fix.rstrip('.')}"
        return " ".join(text.split()) + "."


class CrashLogged(Exception):
    """An unexpected error (a bug, not the user's to fix) already stored with its run and
    logged: the CLI shows its one line and exits 1, not 2."""


def write_traceback(error: BaseException, log_dir: Path, stem: str, unique: bool = True) -> Path:
    """Write ``error``'s whole traceback (:func:`whole_traceback`) to a file under
    ``log_dir`` and return its path: ``STEM-TIME-PID.txt``, or ``STEM.txt`` without
    ``unique``.

    The file is readable by its owner alone (600, in folders created 700): a traceback can
    quote the data a run read.
    """
    from privtune.files import private_dir  # files.py imports this module

    name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt" if unique else f"{stem}.txt"
    path = private_dir(log_dir) / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file of that name keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(whole_traceback(error))
    return path


def whole_traceback(error: BaseException) -> str:
    """The traceback with every error that led to it, even one hidden by ``raise ... from
    None`` (a user error such as out of memory replaces the allocator's own error, which
    the log should still show)."""
    hidden = error.__context__ if error.__suppress_context__ and error.__cause__ is None else None
    text = "".join(traceback.format_exception(error))
    if hidden is None:
        return text
    return "".join(traceback.format_exception(hidden)) + "\nThe error above was reported as:\n\n" + text
