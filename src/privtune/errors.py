"""The one error type users see.

Every failure a user can cause (bad config, bad data, unknown model, impossible DP
settings, out of memory) is raised as a :class:`PrivtuneError` carrying what went wrong
and how to fix it. The CLI prints it on one line and exits non-zero; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


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
