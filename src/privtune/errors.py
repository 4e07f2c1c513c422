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


def write_traceback(error: BaseException, log_dir: Path, stem: str) -> Path:
    """Write ``error``'s whole traceback to a new file under ``log_dir`` and return its path.

    The file is readable by its owner alone: a traceback can quote the data a run read.
    """
    log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = log_dir / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(traceback.format_exception(error)))
    return path
